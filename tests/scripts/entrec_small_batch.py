"""Small-batch robustness of EntRec (a script, not a test): trains `entrec.py --variant byol` on synthetic
data at two batch sizes for the same number of epochs and prints the final kNN top-1 of each.

    python tests/scripts/entrec_small_batch.py --epochs 10 --batch-sizes 16 128 [--device cuda] [extra entrec flags]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=10)
p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 128])
args, extra = p.parse_known_args()
for bs in args.batch_sizes:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(ROOT, "entrec.py"), "--dataset", "synthetic", "--variant", "byol",
               "--batch-size", str(bs), "--epochs", str(args.epochs), "--eval-every", str(args.epochs),
               "--out-dir", out, *extra]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        last = json.loads(open(os.path.join(out, "log.jsonl")).read().splitlines()[-1])
        print(f"entrec byol batch {bs:4d}: kNN top-1 {last['knn_top1']:.1f}% after {args.epochs} epochs "
              f"(loss {last['loss']:.3f}, entropy {last['entropy']:.3f}, reconstruction {last['reconstruction']:.3f})",
              flush=True)
