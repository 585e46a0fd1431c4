"""Benchmark (a script, not a test): training-step images/s and peak memory per method, the overhead of
each method over a bare backbone forward+backward on the same crops, AMP agreement, and the data
pipeline: batched multi-crop augmentation vs a per-image PIL torchvision pipeline doing the same crops.

    python tests/scripts/benchmark.py                      # CUDA with bf16 autocast when present, else CPU
    python tests/scripts/benchmark.py --device cpu --width 16 --batch-size 64
    python tests/scripts/benchmark.py --peer lightly       # end to end against lightly (pip install lightly)
    python tests/scripts/benchmark.py --compile            # the same with the model torch.compile'd (--compile)

--peer lightly times, in one run, the same SimCLR step and the same DINO step (2 + 6 crops) written as lightly's
examples write them (its losses, heads and transforms; a torch DataLoader with workers feeding PIL images;
one forward per view) against this project's end-to-end step (batched augmentation on the device + the step),
on the same backbone, batch and device. lightly is a benchmark-only dependency, never in requirements.txt.
"""
import argparse
import contextlib
import os
import sys
import time

import torch
import torch.nn as nn
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import common  # noqa: E402
import dino  # noqa: E402
import entrec  # noqa: E402
import hydes  # noqa: E402
import mmae  # noqa: E402
import simclr  # noqa: E402

METHODS = {"simclr": (simclr, 2, 0, (0.08, 1.0)), "hydes": (hydes, 2, 6, (0.4, 1.0)), "dino": (dino, 2, 6, (0.4, 1.0)),
           "entrec": (entrec, 2, 0, (0.08, 1.0)), "mmae": (mmae, 1, 0, (0.2, 1.0))}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, steps, warmup=3):
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / steps


def pil_multicrop(stats, n_global, n_local, image_size=32):
    """The per-image reference the batched MultiCrop is timed against: torchvision transforms on PIL images, one image
    at a time on the CPU, the same crops, jitter and grayscale (no blur/solarisation: 32 px)."""
    from PIL import Image
    T = torchvision.transforms

    def chain(size, scale):
        return T.Compose([T.RandomResizedCrop(size, scale=scale), T.RandomHorizontalFlip(),
                          T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                          T.ToTensor(), T.Normalize(stats[0].tolist(), stats[1].tolist())])
    chains = [chain(image_size, (0.4, 1.0))] * n_global + [chain(image_size // 2, (0.05, 0.4))] * n_local

    def crops(x):
        pils = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in x]
        return [torch.stack([tf(p) for p in pils]) for tf in chains]
    return crops


def build(name, margs, device):
    """-> (model, loss_of(views) -> scalar loss, backbone) for one method, as its train() builds them."""
    mod = METHODS[name][0]
    torch.manual_seed(0)
    backbone, dim = common.build_backbone(margs.arch, 32, margs.width)
    if name == "simclr":
        model = simclr.SimCLR(backbone, dim, margs)
        return model, lambda v: simclr.nt_xent(*model(v), margs.temperature), backbone
    if name == "hydes":
        model = hydes.HyDeS(backbone, dim, margs)
        return model, lambda v: hydes.hydes_loss(model(v), margs.kappa)[0], backbone
    if name == "dino":
        model = dino.DINO(backbone, dim, margs)
        return model, lambda v: model.criterion(*model(v), 0)[0], backbone
    if name == "entrec":
        model = entrec.EntRec(backbone, dim, margs)
        return model, lambda v: entrec.entrec_loss(*model(v), margs.variant, margs.kappa)[0], backbone
    model = mmae.MAE(backbone, dim, margs)

    def loss_of(v):
        pred, mask, z = model(v[0], margs.mask_ratio, torch.Generator(device=v[0].device).manual_seed(0))
        return mod.mae_loss(pred, mod.patchify(v[0], model.patch), mask) - margs.lam * mod.tcr(z, margs.mu)
    return model, loss_of, backbone


def reset_peak(device):
    """Start a new peak: CUDA's allocator statistics, or on the CPU the process's peak resident set (VmHWM), which
    Linux resets when "5" is written to /proc/self/clear_refs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_gib(device):
    """GiB at the peak since reset_peak: memory allocated on the GPU, or the whole process's resident set on the
    CPU (model, optimiser, activations, data and the Python process itself)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    with contextlib.suppress(OSError):
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    return float("nan")


def method_step(name, margs, device, x, aug, amp, steps, compile=False):
    model, loss_fn, backbone = build(name, margs, device)
    layout = torch.channels_last if common.channels_last(device, margs) else torch.preserve_format
    model.to(device, memory_format=layout)
    if compile:  # as --compile does; the warm-up steps below include the compilation
        model.compile()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator(device=device).manual_seed(0)
    ctx = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)  # noqa: E731
    views = aug(x, g)

    def step():
        with ctx():
            loss = loss_fn(views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def bare():  # the backbone alone on the same crops, one pass per crop size
        with ctx():
            sizes = sorted({v.shape[-1] for v in views})
            loss = sum(backbone(torch.cat([v for v in views if v.shape[-1] == s])).float().mean() for s in sizes)
        opt.zero_grad(set_to_none=True)
        loss.backward()

    model.eval()  # AMP agreement: the same weights and crops, bf16 autocast vs fp32 (BN in eval mode)
    with torch.no_grad():
        l32 = loss_fn(views).item()
        with ctx():
            lamp = loss_fn(views).item()
    model.train()
    reset_peak(device)
    t_step = timed(step, device, steps)
    peak = peak_gib(device)
    t_bare = timed(bare, device, steps)
    t_aug = timed(lambda: aug(x, g), device, steps)
    n = x.shape[0]
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:  # forward + backward FLOPs of one step (matmuls and convs)
        step()
    tflops = fc.get_total_flops() / t_step / 1e12
    print(f"{name:7s} {margs.arch:9s} crops={len(views)} batch={n}{' compiled' if compile else ''}: step "
          f"{n / t_step:7.0f} img/s "
          f"(with aug {n / (t_step + t_aug):7.0f}), bare backbone {n / t_bare:7.0f} img/s, overhead "
          f"{100 * (t_step / t_bare - 1):5.1f}%, peak {peak:.2f} GiB{' RSS' if device.type != 'cuda' else ''}, "
          f"loss fp32 {l32:.5f} / amp {lamp:.5f}, "
          f"{tflops:.1f} TFLOP/s", flush=True)


def ours_end_to_end(name, margs, device, images, batch, amp, steps):
    """Seconds per step of this project's loop: uint8 batch on the device -> batched crops -> step."""
    mod, n_global, n_local, scale = METHODS[name]
    model, loss_fn, _ = build(name, margs, device)
    layout = torch.channels_last if common.channels_last(device, margs) else torch.preserve_format
    model.to(device, memory_format=layout)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    aug = common.MultiCrop(32, (torch.full((3,), 0.5), torch.full((3,), 0.25)), n_global, n_local, scale)
    g = torch.Generator(device=device).manual_seed(0)
    x = images[:batch].to(device)

    def step():
        views = aug(x, g)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if name == "dino":
            dino.ema_update(model.teacher, model.student, 0.996)
    return timed(step, device, steps, warmup=2)


def lightly_end_to_end(name, args, device, images, amp, steps):
    """Seconds per step of the same step written with lightly, as its examples do."""
    import copy

    from lightly.loss import DINOLoss, NTXentLoss
    from lightly.models.modules import DINOProjectionHead, SimCLRProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import DINOTransform, SimCLRTransform
    from PIL import Image
    torch.manual_seed(0)
    backbone, dim = common.build_backbone(args.arch, 32, args.width)
    norm = {"mean": [0.5] * 3, "std": [0.25] * 3}
    if name == "simclr":  # colour jitter 0.4/0.4/0.2/0.1 as ours; no blur at 32 px
        transform = SimCLRTransform(input_size=32, cj_strength=0.5, cj_sat=0.4, gaussian_blur=0.0, normalize=norm)
        head = SimCLRProjectionHead(dim, 2048, 128, num_layers=3)  # the same 3-layer projector as simclr.py
        model, criterion = nn.Sequential(backbone, head), NTXentLoss(temperature=0.2)
    else:  # 2 x 32 px + 6 x 16 px crops, no blur/solarisation at 32 px (as ours)
        transform = DINOTransform(global_crop_size=32, local_crop_size=16, n_local_views=6, cj_strength=0.5,
                                  cj_sat=0.4, gaussian_blur=(0.0, 0.0, 0.0), solarization_prob=0.0, normalize=norm)
        model = nn.Sequential(backbone, DINOProjectionHead(dim, 2048, 256, 4096, batch_norm=True))
        # lightly's example builds the teacher head anew (its weight_norm cannot be deep-copied)
        teacher = nn.Sequential(copy.deepcopy(backbone), DINOProjectionHead(dim, 2048, 256, 4096, batch_norm=True))
        deactivate_requires_grad(teacher)
        criterion = DINOLoss(output_dim=4096)
        teacher.to(device)
    layout = torch.channels_last if common.channels_last(device, args) else torch.preserve_format
    model.to(device, memory_format=layout)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]  # decoded once: the peer's best case

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(pil)

        def __getitem__(self, i):
            return transform(pil[i]), 0

    loader = torch.utils.data.DataLoader(Data(), batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=min(8, os.cpu_count() or 1), persistent_workers=True)

    def batches():
        while True:
            yield from loader
    it = batches()

    def step():
        views, _ = next(it)
        views = [v.to(device, non_blocking=True) for v in views]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if name == "simclr":
                loss = criterion(model(views[0]), model(views[1]))
            else:
                update_momentum(model, teacher, m=0.996)
                teacher_out = [teacher(v) for v in views[:2]]
                student_out = [model(v) for v in views]
                loss = criterion(teacher_out, student_out, epoch=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return timed(step, device, steps, warmup=2)


def peer_lightly(args, device, amp):
    try:
        import lightly
    except ImportError:
        sys.exit("--peer lightly needs lightly, a benchmark-only dependency: pip install lightly "
                 "(e.g. in a virtual environment made with --system-site-packages, beside this project's torch)")
    images = common.synthetic(max(4 * args.batch_size, 1024), 0).images
    print(f"peer: lightly {lightly.__version__}, DataLoader workers {min(8, os.cpu_count() or 1)}, backbone "
          f"{args.arch} width {args.width}, batch {args.batch_size}")
    for name in ("simclr", "dino"):
        mod = METHODS[name][0]
        margs = mod.get_args(["--arch", args.arch, "--width", str(args.width), "--dataset", "synthetic",
                              "--out-dir", f"/tmp/bench-{os.getpid()}"] + (["--local-crops", "6"] if name == "dino" else []))
        t_ours = ours_end_to_end(name, margs, device, images, args.batch_size, amp, args.steps)
        t_peer = lightly_end_to_end(name, args, device, images, amp, args.steps)
        b = args.batch_size
        print(f"{name:7s} end to end (augmentation + step): ours {b / t_ours:8.0f} img/s, lightly {b / t_peer:8.0f} img/s,"
              f" ratio {t_peer / t_ours:5.2f}x", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    p.add_argument("--peer", choices=("lightly",), default=None, help="compare SimCLR and DINO end to end with lightly")
    p.add_argument("--compile", action="store_true", help="torch.compile each method's model, as --compile does")
    args = p.parse_args()
    device = torch.device(args.device)
    amp = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    print(f"device {torch.cuda.get_device_name() if amp else 'cpu'} torch {torch.__version__} threads "
          f"{torch.get_num_threads()} amp {'bf16' if amp else 'off'}")
    if args.peer:
        return peer_lightly(args, device, amp)
    images = common.synthetic(max(args.batch_size, 512), 0).images
    x = images[: args.batch_size].to(device)
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    for name, (mod, n_global, n_local, scale) in METHODS.items():
        if args.methods and name not in args.methods.split(","):
            continue
        arch = "vit_tiny" if name == "mmae" else args.arch
        margs = mod.get_args(["--arch", arch, "--width", str(args.width), "--dataset", "synthetic",
                              "--out-dir", f"/tmp/bench-{os.getpid()}"] + (["--local-crops", "6"] if name == "dino" else []))
        aug = common.MultiCrop(32, (mean, std), n_global, n_local, scale, color=name != "mmae")
        method_step(name, margs, device, x, aug, amp, args.steps, args.compile)
    # data pipeline: 2 global + 6 local crops of 32 px images
    aug = common.MultiCrop(32, (mean, std), 2, 6)
    g = torch.Generator(device=device).manual_seed(0)
    xb = images[:512].to(device)
    t_batched = timed(lambda: aug(xb, g), device, 5, warmup=2)
    pil = pil_multicrop((mean, std), 2, 6)
    t_pil = timed(lambda: pil(images[:512]), torch.device("cpu"), 1, warmup=0)
    print(f"multi-crop 2x32px + 6x16px on 512 images: batched ({device.type}) {512 / t_batched:9.0f} img/s, "
          f"PIL per-image (1 CPU process) {512 / t_pil:7.0f} img/s, ratio {t_pil / t_batched:6.1f}x")


if __name__ == "__main__":
    main()
