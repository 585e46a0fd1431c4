"""Where oneDNN's channels-last convolution backward is safe on this CPU: one training step (forward + backward) of
ResNet-18 in channels-last for each width x image size, each in its own subprocess, so that a crash (SIGSEGV,
SIGABRT) is a cell of the table and not the end of the script; and the step time against the contiguous layout.

    python tests/scripts/channels_last_matrix.py --widths 4 8 16 32 64 --sizes 32 64 96 --batch-size 32
"""
import argparse
import os
import subprocess
import sys

CELL = """
import sys, time, torch
sys.path.insert(0, {root!r})
import common
width, size, batch, layout = {width}, {size}, {batch}, {layout!r}
torch.manual_seed(0)
net, _ = common.build_backbone("resnet18", size, width)
fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
net = net.to(memory_format=fmt)
x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
times = []
for _ in range(4):
    t = time.perf_counter()
    net(x).square().mean().backward()
    times.append(time.perf_counter() - t)
print(min(times[1:]))
"""


def cell(root, width, size, batch, layout):
    p = subprocess.run([sys.executable, "-c", CELL.format(root=root, width=width, size=size, batch=batch,
                                                          layout=layout)], capture_output=True, text=True)
    if p.returncode:
        return f"exit {p.returncode}"
    return float(p.stdout.split()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[4, 8, 12, 16, 24, 32, 64])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96])
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print("width  size  contiguous s/step  channels-last s/step  (or how it ended)")
    for w in args.widths:
        for s in args.sizes:
            a, b = (cell(root, w, s, args.batch_size, layout) for layout in ("contiguous", "cl"))
            speed = f"  {a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) else ""
            fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else v  # noqa: E731
            print(f"{w:5d} {s:5d}  {fmt(a):>17}  {fmt(b):>20}{speed}", flush=True)


if __name__ == "__main__":
    main()
