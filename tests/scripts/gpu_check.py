"""The GPU check (a script, not a test): everything the docs state about a CUDA GPU, measured in one run
of about 9 minutes that stops cleanly at --time-limit, and writes what it measured to files under --out.

    python tests/scripts/gpu_check.py --out results/                      # on a CUDA machine (docs/testing.md: the GPU check)
    python tests/scripts/gpu_check.py --out /tmp/gc --toy --device cpu    # dry run on the CPU, toy sizes, ~3 minutes

Stages, most important first, so that a run stopped early still has the first ones (each with its share of the
time; what one leaves is carried to the next):
  a. tests.txt      the CUDA-path tests (tests/test_device_paths.py) on the device, and per method one training step
                    in bf16 autocast against fp32 from the same weights and crops: loss difference, gradient cosine;
  b. benchmark.txt  tests/scripts/benchmark.py: images/s per method, overhead over the bare backbone, achieved TFLOP/s
                    (against the chip's bf16 peak), peak memory; eager, then with --compile;
  c. peer.txt       the same SimCLR and DINO steps written with lightly (installed from ./wheels if not importable);
  d. real.txt       tests/scripts/real_images.py on tin100-32 (all 50,000 training images, ResNet-18 width 64, batch
                    256), scored by eval_linear.py; resumable: the same command continues it on a warm machine;
  e. feed.txt       tests/scripts/data_path.py feed: a ResNet-50 SimCLR step at 224 px in bf16 with its batch already on
                    the GPU, then fed by the disk tier (a cache of 256 px squares, 4 and 8 DataLoader workers).
summary.md gathers the lines for the docs; log.txt is everything the stages printed.

Needs, besides the checkout: data/tin100-32.zip for stage d (a copy of ../shared/data/tin100-32.zip; data/ is
git-ignored), and lightly for stage c, installed from wheels/ when pip cannot reach it (`pip download lightly
hydra-core omegaconf antlr4-python3-runtime --no-deps -d wheels` beforehand).
"""
import argparse
import copy
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, HERE]
import benchmark  # noqa: E402
import common  # noqa: E402

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16 of the data sheets (SXM)


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the (at most 8) result files")
    p.add_argument("--time-limit", type=float, default=540, help="seconds for all stages")
    p.add_argument("--device", default="cuda")
    p.add_argument("--toy", action="store_true", help="tiny sizes, for a dry run on the CPU")
    p.add_argument("--stages", default="abcde", help="which stages to run, e.g. 'd' to continue the real-image rows")
    p.add_argument("--real-epochs", type=int, default=30, help="epochs of each real-image run")
    return p.parse_args()


class Stages:
    """Runs commands with a share of the remaining time each; everything they print goes to log.txt, a stage's own
    lines to its file, the lines for the docs to summary.md."""

    def __init__(self, args):
        self.args, self.end = args, time.time() + args.time_limit
        os.makedirs(args.out, exist_ok=True)
        self.log = open(os.path.join(args.out, "log.txt"), "a")

    def left(self):
        return self.end - time.time()

    def run(self, name, cmd, share, env=None):
        """Run cmd (argv after python) for at most share x the time left; append its output to OUT/name."""
        budget = max(10.0, share * self.left())
        t = time.time()
        self.say(f"== {name}: python {' '.join(cmd)}  (budget {budget:.0f} s)")
        try:
            p = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=budget,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
            out, status = p.stdout + p.stderr, f"exit {p.returncode}"
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
            status = "stopped at its time budget"
        with open(os.path.join(self.args.out, name), "a") as f:
            f.write(out + f"\n[{status}, {time.time() - t:.0f} s]\n")
        self.log.write(out)
        self.say(f"   {status} after {time.time() - t:.0f} s")
        return out

    def say(self, line, summary=False):
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()
        if summary:
            with open(os.path.join(self.args.out, "summary.md"), "a") as f:
                f.write(line + "\n")


def agreement(device, toy):
    """Per method: one training step's loss and gradient in bf16 autocast vs fp32, from the same weights and crops
    (BatchNorm in training mode, as in training). -> lines."""
    width, batch = (8, 16) if toy else (64, 256)
    x = common.synthetic(max(batch, 64), 0).images[:batch].to(device)
    stats = (torch.full((3,), 0.5), torch.full((3,), 0.25))
    lines = []
    for name, (mod, n_global, n_local, scale) in benchmark.METHODS.items():
        arch = "vit_tiny" if name == "mmae" else "resnet18"
        margs = mod.get_args(["--arch", arch, "--width", str(width), "--dataset", "synthetic", "--out-dir", "/tmp/gc"]
                             + (["--local-crops", "6"] if name == "dino" else []))
        model, loss_fn, _ = benchmark.build(name, margs, device)
        layout = torch.channels_last if common.channels_last(device, margs) else torch.preserve_format
        model.to(device, memory_format=layout)
        aug = common.MultiCrop(32, stats, n_global, n_local, scale, color=name != "mmae")
        views = aug(x, torch.Generator(device=device).manual_seed(0))
        start, res = copy.deepcopy(model.state_dict()), {}
        for amp in (False, True):
            model.load_state_dict(start)  # the same weights, BatchNorm statistics and DINO centre for both
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(views)
            loss.backward()
            grads = [p.grad.flatten().float() for p in model.parameters() if p.grad is not None]
            res[amp] = (loss.item(), torch.cat(grads), loss.dtype)
        (l32, g32, _), (l16, g16, dtype) = res[False], res[True]
        cos = F.cosine_similarity(g32, g16, dim=0).item()
        lines.append(f"{name:7s} fp32 loss {l32:.5f}, bf16-autocast loss {l16:.5f} ({dtype}), relative difference "
                     f"{abs(l16 - l32) / max(abs(l32), 1e-12):.2e}, gradient cosine {cos:.4f}")
    return lines


def main():
    args = get_args()
    st, device = Stages(args), torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    st.say(f"# gpu_check {time.strftime('%Y-%m-%d')}: {name}, torch {torch.__version__}, "
           f"{'toy sizes' if args.toy else 'full sizes'}", summary=True)
    if "a" in args.stages:
        if not args.toy:  # the toy dry run is already the CPU suite's
            st.run("tests.txt", ["-m", "pytest", "-q", "tests/test_device_paths.py"], 0.2,
                   env={"SSL_TEST_DEVICE": args.device})
        with open(os.path.join(args.out, "tests.txt"), "a") as f:
            for line in agreement(device, args.toy):
                f.write(line + "\n")
                st.say(f"    {line}", summary=True)
    small = ["--width", "8", "--batch-size", "32", "--steps", "2"] if args.toy else ["--batch-size", "512"]
    if "b" in args.stages:
        for extra in ([], ["--compile"]) if device.type == "cuda" else ([],):
            out = st.run("benchmark.txt", ["tests/scripts/benchmark.py", "--device", args.device, *small, *extra], 0.3)
            peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
            for line in out.splitlines():
                if "img/s" in line and peak and "TFLOP/s" in line:
                    tf = float(line.rsplit(",", 1)[1].split()[0])
                    line += f" ({100 * tf / peak:.0f}% of the {peak:.0f} TFLOP/s bf16 peak)"
                if "img/s" in line:
                    st.say(f"    {line.strip()}", summary=True)
    if "c" in args.stages:
        try:
            import lightly  # noqa: F401
        except ImportError:
            wheels = os.path.join(ROOT, "wheels")
            st.say(f"lightly is not installed: pip install --no-index --find-links {wheels} lightly")
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels,
                            "lightly"])
        out = st.run("peer.txt", ["tests/scripts/benchmark.py", "--device", args.device, "--peer", "lightly",
                                  *small], 0.2)
        for line in out.splitlines():
            if "end to end" in line:
                st.say(f"    {line.strip()}", summary=True)
    if "d" in args.stages:
        zipped = os.path.join(ROOT, "data", "tin100-32.zip")
        real = ["tests/scripts/real_images.py", "--device", args.device, "--out", os.path.join(ROOT, "runs", "gpu")]
        real += ["--zip", zipped] if os.path.isfile(zipped) else []
        real += (["--num-train", "512", "--width", "4", "--epochs", "1", "--probe-epochs", "2", "--eval-limit", "1000"]
                 if args.toy else ["--num-train", "0", "--width", "64", "--epochs", str(args.real_epochs),
                                   "--batch-size", "256", "--warmup-epochs", "3"])
        out = st.run("real.txt", real + ["--time-limit", str(max(30.0, st.left() - 150))], 1.0)  # 2 min for e
        for line in out.splitlines():
            if line.startswith("|") or line.startswith("Data:") or "--time-limit" in line:
                st.say(line, summary=True)
    if "e" in args.stages:
        feed = ["--count", "512", "--batch", "32", "--steps", "3", "--feed-workers", "1"] if args.toy else []
        out = st.run("feed.txt", ["tests/scripts/data_path.py", "feed", "--device", args.device, *feed], 1.0)
        for line in out.splitlines():
            if "img/s" in line:
                st.say(f"    {line.strip()}", summary=True)
    st.say(f"gpu_check done, {st.left():.0f} s of --time-limit left; files in {args.out}")


if __name__ == "__main__":
    main()
