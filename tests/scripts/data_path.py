"""The data path measured (a script, not a test): images/s of each --data-on tier, against the per-sample PIL pipeline
DINO and lightly load ImageNet with; the anonymous memory of a run as its dataset grows; whether the disk tier feeds
ResNet-50 on a GPU. The numbers of docs/scale.md come from these commands:

    python tests/scripts/data_path.py make --src data/tin10 --out runs/jpeg --count 4000        # ImageNet-like JPEGs
    python tests/scripts/data_path.py speed --data runs/jpeg/4000 --workers 2                    # images/s per tier
    python tests/scripts/data_path.py memory --data runs/jpeg/1000 runs/jpeg/4000                # peak RssAnon per run
    python tests/scripts/data_path.py feed --device cuda                                          # the GPU's step fed?

make writes folders of N training JPEGs (q90, 500 x 375 like a typical ImageNet photograph, upscaled from --src) for
N = count/4 and count, with a small val/. speed decodes --data once into a cache of 224 px squares and times batches
of each tier (read alone, then with the 2 x 224 + 6 x 96 multi-crop on this CPU), then torchvision ImageFolder + PIL
multi-crop in DataLoader workers. memory runs simclr.py on each folder per tier and samples RssAnon of the process and
its workers. feed times a SimCLR step of ResNet-50 at 224 px in bf16 with a batch already on the GPU, then with batches
of the disk tier (a cache of random 256 px squares).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
import common  # noqa: E402


def make(args):
    from PIL import Image
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(args.src, "train")) for f in fs)
    if len(files) < args.count:
        files = files * (args.count // len(files) + 1)
    step = max(1, len(files) // args.count)
    for n in (args.count // 4, args.count):
        for split, count in (("train", n), ("val", 100)):
            chosen = files[:: step][:count] if split == "train" else files[-count:]
            for i, f in enumerate(chosen):
                out = os.path.join(args.out, str(n), split, os.path.basename(os.path.dirname(os.path.dirname(f))))
                os.makedirs(out, exist_ok=True)
                with Image.open(f) as im:
                    im.convert("RGB").resize((500, 375), Image.BICUBIC).save(os.path.join(out, f"{i}.JPEG"), quality=90)
        print(f"wrote {os.path.join(args.out, str(n))}")


def rate(batches, count, work=lambda x: x, sync=lambda: None):
    """Images/s of `work` over `count` batches of an iterator (the first batch, a warm-up, not timed); sync waits
    for the device."""
    it = iter(batches)
    work(next(it))
    sync()
    t, n = time.perf_counter(), 0
    for _ in range(count):
        x = work(next(it))
        n += len(x[0]) if isinstance(x, list) else len(x)
    sync()
    return n / (time.perf_counter() - t)


def speed(args):
    cpu = torch.device("cpu")
    cache = tempfile.mkdtemp(prefix="data_path_")
    train = common.get_dataset("folder", args.data, "train", image_size=224, cache_dir=cache)
    print(f"{len(train.images)} images of {args.data}, decoded once into {cache} at 224 px; batch {args.batch}, "
          f"{args.workers} workers, {os.cpu_count()} CPUs")
    aug = common.MultiCrop(224, (torch.full((3,), 0.5), torch.full((3,), 0.25)), 2, 6)
    g = torch.Generator().manual_seed(0)
    tiers = {"device": train.images[:], "cpu": common.Images(train.images[:]), "disk": train.images}
    for name, images in tiers.items():
        images = images if name == "device" else images.to(cpu, workers=args.workers)
        feed = lambda: common.batches(images, args.batch, 0, 0)  # noqa: E731
        read = rate(feed(), args.batches)
        crops = rate(feed(), max(2, args.batches // 4), lambda x: aug(x, g))
        print(f"  {name:6s}: read {read:8.0f} img/s; read + batched multi-crop on this CPU {crops:6.1f} img/s")
    tf = dino_transform()
    ds = __import__("torchvision").datasets.ImageFolder(os.path.join(args.data, "train"), tf)
    loader = torch.utils.data.DataLoader(ds, args.batch, shuffle=True, num_workers=args.workers, drop_last=True)
    print(f"  ImageFolder + PIL per-sample multi-crop, {args.workers} workers: "
          f"{rate(loader, max(2, args.batches // 4), lambda b: b[0]):6.1f} img/s")


def dino_transform():
    """DINO's DataAugmentationDINO (2 global 224 crops, 6 local 96 crops) as torchvision transforms on PIL images."""
    T = __import__("torchvision").transforms
    jitter = [T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
              T.RandomGrayscale(p=0.2)]
    norm = [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    blur = lambda p: T.RandomApply([T.GaussianBlur(23, (0.1, 2.0))], p=p)  # noqa: E731
    g1 = T.Compose([T.RandomResizedCrop(224, (0.4, 1.0)), *jitter, blur(1.0), *norm])
    g2 = T.Compose([T.RandomResizedCrop(224, (0.4, 1.0)), *jitter, blur(0.1), T.RandomSolarize(128, 0.2), *norm])
    lc = T.Compose([T.RandomResizedCrop(96, (0.05, 0.4)), *jitter, blur(0.5), *norm])
    return lambda im: [g1(im), g2(im)] + [lc(im) for _ in range(6)]


def tree_anon_kb(pid):
    """RssAnon (kB) of a process, and the sum over its descendants (DataLoader workers; a forked worker also counts
    the pages it still shares with its parent)."""
    main, children, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        try:
            kb = int(next(line for line in open(f"/proc/{p}/status") if line.startswith("RssAnon")).split()[1])
            main, children = (kb, children) if p == pid else (main, children + kb)
            for t in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{t}/children").read().split()]
        except (OSError, StopIteration):
            pass
    return main, children


def memory(args):
    cache = tempfile.mkdtemp(prefix="data_path_")
    for tier in ("disk", "device"):
        for data in args.data:
            out = tempfile.mkdtemp(prefix="run_")
            cmd = [sys.executable, os.path.join(ROOT, "simclr.py"), "--dataset", "folder", "--data-dir", data,
                   "--image-size", str(args.image_size), "--width", "4", "--proj-hidden", "64", "--batch-size", "32",
                   "--epochs", "1", "--eval-every", "0", "--device", "cpu", "--data-on", tier, "--cache-dir", cache,
                   "--out-dir", out]
            for phase in (("build", "train") if tier == "disk" else ("train",)):
                peak, p = [0, 0], subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                stop = threading.Event()

                def sample():
                    while not stop.is_set():
                        peak[:] = map(max, peak, tree_anon_kb(p.pid))
                        time.sleep(0.05)
                th = threading.Thread(target=sample)
                th.start()
                t = time.time()
                p.wait()
                stop.set()
                th.join()
                n = sum(len(fs) for _, _, fs in os.walk(os.path.join(data, "train")))
                decoded = n * 3 * args.image_size**2 / 2**20
                print(f"  {tier:6s} {phase:5s} {n:5d} images ({decoded:4.0f} MiB decoded): peak RssAnon "
                      f"{peak[0] / 1024:5.0f} MiB, its workers {peak[1] / 1024:5.0f} MiB; {time.time() - t:.0f} s, "
                      f"exit {p.returncode}")
                out = tempfile.mkdtemp(prefix="run_")
                cmd[-1] = out


def feed(args):
    device = torch.device(args.device)
    import simclr
    cache = tempfile.mkdtemp(prefix="data_path_")
    n, size = args.count, 256
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    disk = common.cached(common.Split(x, torch.zeros(n, dtype=torch.int64)), ("feed", "train", size), cache, False)
    margs = simclr.get_args(["--arch", "resnet50", "--dataset", "synthetic", "--out-dir", cache, "--batch-size",
                             str(args.batch)])
    margs.base_lr = 0.1
    backbone, dim = common.build_backbone("resnet50", 224)
    model = common.to_device(simclr.SimCLR(backbone, dim, margs), device, margs)
    opt = common.optimizer(margs, model)
    aug = common.MultiCrop(224, (torch.full((3,), 0.5), torch.full((3,), 0.25)), 2, 0, (0.08, 1.0))
    g = torch.Generator(device=device).manual_seed(0)

    def step(batch):
        views = aug(batch, g)
        with common.autocast(margs, device):
            z1, z2 = model(views)
        loss = simclr.nt_xent(z1, z2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return batch

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    timed = lambda batches: rate(batches, args.steps, step, sync)  # noqa: E731
    fixed = x[: args.batch].to(device)
    print(f"ResNet-50 SimCLR step at 224 px, batch {args.batch}, {'bf16' if device.type == 'cuda' else 'fp32'} on "
          f"{device}:")
    print(f"  batch already on the device: {timed(iter(lambda: fixed, None)):7.0f} img/s")
    for w in args.feed_workers:
        images = disk.images.to(device, workers=w)
        print(f"  disk tier, {w} workers: {timed(common.batches(images, args.batch, 0, 0)):7.0f} img/s "
              f"(reading alone: {rate(common.batches(images, args.batch, 1, 0), args.steps, sync=sync):7.0f} img/s)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("make")
    a.add_argument("--src", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--count", type=int, default=4000)
    a = sub.add_parser("speed")
    a.add_argument("--data", required=True)
    a.add_argument("--workers", type=int, default=2)
    a.add_argument("--batch", type=int, default=64)
    a.add_argument("--batches", type=int, default=20)
    a = sub.add_parser("memory")
    a.add_argument("--data", nargs="+", required=True)
    a.add_argument("--image-size", type=int, default=128)
    a = sub.add_parser("feed")
    a.add_argument("--device", default="cuda")
    a.add_argument("--count", type=int, default=20000)
    a.add_argument("--batch", type=int, default=256)
    a.add_argument("--steps", type=int, default=30)
    a.add_argument("--feed-workers", type=int, nargs="+", default=[4, 8])
    args = p.parse_args()
    {"make": make, "speed": speed, "memory": memory, "feed": feed}[args.cmd](args)


if __name__ == "__main__":
    main()
