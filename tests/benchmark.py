"""Benchmark (a script, not a test): training-step images/s and peak memory per method, the overhead of
each method over a bare backbone forward+backward on the same crops, AMP agreement, and the data
pipeline: batched multi-crop augmentation vs a per-image PIL torchvision pipeline doing the same crops.

    python tests/benchmark.py                      # CUDA with bf16 autocast when present, else CPU
    python tests/benchmark.py --device cpu --width 16 --batch-size 64
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
        return model, lambda v: model.criterion(*model(v), 0), backbone
    if name == "entrec":
        model = entrec.EntRec(backbone, dim, margs)
        return model, lambda v: entrec.entrec_loss(model, *model(v), margs)[0], backbone
    model = mmae.MAE(backbone, dim, margs)

    def loss_of(v):
        pred, mask, z = model(v[0], margs.mask_ratio, torch.Generator(device=v[0].device).manual_seed(0))
        return mod.mae_loss(pred, mod.patchify(v[0], model.patch), mask) - margs.lam * mod.tcr(z, margs.mu)
    return model, loss_of, backbone


def method_step(name, margs, device, x, aug, amp, steps):
    model, loss_fn, backbone = build(name, margs, device)
    model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator(device=device).manual_seed(0)
    ctx = lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp)  # noqa: E731
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
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_step = timed(step, device, steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    t_bare = timed(bare, device, steps)
    t_aug = timed(lambda: aug(x, g), device, steps)
    n = x.shape[0]
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:  # forward + backward FLOPs of one step (matmuls and convs)
        step()
    tflops = fc.get_total_flops() / t_step / 1e12
    print(f"{name:7s} {margs.arch:9s} crops={len(views)} batch={n}: step {n / t_step:7.0f} img/s "
          f"(with aug {n / (t_step + t_aug):7.0f}), bare backbone {n / t_bare:7.0f} img/s, overhead "
          f"{100 * (t_step / t_bare - 1):5.1f}%, peak {peak:.2f} GiB, loss fp32 {l32:.5f} / amp {lamp:.5f}, "
          f"{tflops:.1f} TFLOP/s", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    args = p.parse_args()
    device = torch.device(args.device)
    amp = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    print(f"device {torch.cuda.get_device_name() if amp else 'cpu'} torch {torch.__version__} threads "
          f"{torch.get_num_threads()} amp {'bf16' if amp else 'off'}")
    images = common.synthetic(max(args.batch_size, 512), 0).images
    x = images[: args.batch_size].to(device)
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    for name, (mod, n_global, n_local, scale) in METHODS.items():
        if args.methods and name not in args.methods.split(","):
            continue
        arch = "vit_tiny" if name == "mmae" else args.arch
        margs = mod.get_args(["--arch", arch, "--width", str(args.width), "--dataset", "synthetic",
                              "--out-dir", "/tmp/bench"] + (["--out-dim", "4096"] if name == "dino" else []))
        aug = common.MultiCrop(32, mean, std, n_global, n_local, scale, color=name != "mmae")
        method_step(name, margs, device, x, aug, amp, args.steps)
    # data pipeline: 2 global + 6 local crops of 32 px images
    aug = common.MultiCrop(32, mean, std, 2, 6)
    g = torch.Generator(device=device).manual_seed(0)
    xb = images[:512].to(device)
    t_batched = timed(lambda: aug(xb, g), device, 5, warmup=2)
    pil = common.MultiCrop(32, mean, std, 2, 6, backend="pil")
    t_pil = timed(lambda: pil(images[:512], None), torch.device("cpu"), 1, warmup=0)
    print(f"multi-crop 2x32px + 6x16px on 512 images: batched ({device.type}) {512 / t_batched:9.0f} img/s, "
          f"PIL per-image (1 CPU process) {512 / t_pil:7.0f} img/s, ratio {t_pil / t_batched:6.1f}x")


if __name__ == "__main__":
    main()
