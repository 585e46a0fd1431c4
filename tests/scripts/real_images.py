"""Real-image evidence (a script, not a test): train every method with one budget on a folder of real photographs,
evaluate each checkpoint with eval_linear.py, and print one markdown table (kNN k=20 / k=200, linear top-1, train
seconds) with the random-init floor of each backbone, measured by the same evaluation.

    python tests/scripts/real_images.py                                   # tin100-32, CPU-sized budget (hours on 2 cores)
    python tests/scripts/real_images.py --num-train 0 --width 64 --epochs 100 --batch-size 256 --time-limit 480  # GPU
    python tests/scripts/real_images.py --runs "hydes kappa 10=hydes.py --kappa 10" "MAE=mmae.py --lam 0"
    python tests/scripts/real_images.py --methods SimCLR DINO --peer lightly   # beside lightly's recipe

Default data: ../shared/data/tin100-32.zip (100 Tiny-ImageNet classes at 32 px, 50k/5k), unzipped once into
data/tin100. Every run keeps its folder under --out; a finished run is not trained again, an interrupted one
continues with --resume, so the script can be stopped and started again. The table is also written to
OUT/table.md.
"""
import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import zipfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import common  # noqa: E402

METHODS = {"SimCLR": "simclr.py", "DINO": "dino.py", "HyDeS": "hydes.py", "EntRec (byol)": "entrec.py",
           "M-MAE": "mmae.py"}
# The 30-epoch runs behind the curves and claims table of docs/results.md (--set claims), most telling first: a partial set is
# already a table.
CLAIMS = [("SimCLR", "simclr.py"), ("HyDeS, kappa 1", "hydes.py --kappa 1"), ("HyDeS, kappa 10", "hydes.py --kappa 10"),
          ("HyDeS, kappa 20", "hydes.py --kappa 20"), ("DINO", "dino.py"), ("EntRec (byol)", "entrec.py"),
          ("M-MAE", "mmae.py --arch vit_tiny"), ("MAE", "mmae.py --arch vit_tiny --lam 0"),
          ("HyDeS, kappa 10, beta 0.5", "hydes.py --kappa 10 --beta 0.5"),
          ("HyDeS, kappa 10, proj-dim 1024", "hydes.py --kappa 10 --proj-dim 1024")]


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zip", default=os.path.join(ROOT, "..", "shared", "data", "tin100-32.zip"),
                   help="ImageFolder zip (train/<class>/*, val/<class>/*), unzipped into --data-dir if that is empty")
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data", "tin100"))
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-train", type=int, default=5000, help="fixed random subset of the training images (0: all)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup-epochs", type=float, default=2)
    p.add_argument("--width", type=int, default=16, help="ResNet-18 width (64: the standard network)")
    p.add_argument("--probe-epochs", type=int, default=100)
    p.add_argument("--eval-limit", type=int, default=10000,
                   help="kNN memory and probe training set: a fixed random subset of N labelled training images "
                        "(0: all); the val split is used whole up to N")
    p.add_argument("--methods", nargs="*", default=list(METHODS), help=f"subset of {list(METHODS)}")
    p.add_argument("--set", choices=("methods", "claims"), default="methods", help="methods: each method's defaults "
                   "(--methods); claims: the runs of the claims table in docs/results.md (CLAIMS)")
    p.add_argument("--eval-every", type=int, default=0, help="kNN monitor of the runs every K epochs (learning curves)")
    p.add_argument("--runs", nargs="*", default=[], help='extra rows, "NAME=script.py --flag value ..."')
    p.add_argument("--peer", choices=("lightly",), help="add SimCLR and DINO rows trained with lightly's CIFAR-10 "
                   "benchmark recipe (tests/scripts/lightly_peer.py; pip install lightly)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "real"))
    p.add_argument("--time-limit", type=float, default=0, help="stop after about this many seconds (0: no limit), "
                   "between epochs of a run, and print how to continue (for a job slot of fixed length)")
    p.add_argument("--wordnet", metavar="DIR", help="also evaluate the WordNet alignment (eval_linear.py --wordnet "
                   "DIR; the classes must be WordNet ids, as tin100's are)")
    p.add_argument("--synthetic", action="store_true", help="train on the synthetic shapes instead of --zip (their "
                   "masks serve eval_linear.py --dense and the foreground share of --pictures)")
    p.add_argument("--eval-flags", default="", help='more eval_linear.py flags, e.g. "--dense --pictures"; the dense '
                   "probe's scores and the foreground share join the table")
    return p.parse_args()


def prepare_data(args):
    if args.synthetic or os.path.isdir(os.path.join(args.data_dir, "train")):
        return
    if not os.path.isfile(args.zip):
        sys.exit(f"error: no data: {args.data_dir}/train does not exist and {args.zip} is not a file (see --zip)")
    print(f"unzipping {args.zip} into {args.data_dir}", flush=True)
    zipfile.ZipFile(args.zip).extractall(args.data_dir)


def hardware(device):
    if device != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, bf16 autocast"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), fp32"


def budget_flags(args):
    data = ["--dataset", "synthetic"] if args.synthetic else ["--dataset", "folder", "--data-dir", args.data_dir]
    return [*data, "--image-size", str(args.image_size),
            "--num-train", str(args.num_train), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--warmup-epochs", str(args.warmup_epochs), "--width", str(args.width), "--eval-every", str(args.eval_every),
            "--device", args.device]


def random_init_checkpoint(path, arch, args):
    """The floor: a backbone at the initialisation a training run with --seed 0 starts from, saved as a checkpoint
    so that it goes through exactly the same evaluation."""
    torch.manual_seed(0)
    backbone, _ = common.build_backbone(arch, args.image_size, args.width)
    saved = {"method": "random-init", "arch": arch, "width": args.width,
             "dataset": "synthetic" if args.synthetic else "folder", "data_dir": args.data_dir,
             "image_size": args.image_size, "seed": 0, "pool": "cls", "patch_size": None}
    common.save_checkpoint(path, {"args": saved, "epoch": 0, "backbone": backbone.state_dict()})


def monitor_knn(ck, args):
    """kNN top-1 of a checkpoint's backbone as the training runs' monitor measures it (common.knn_monitor: memory =
    the training subset, the same normalisation): the point every learning curve of that backbone starts from."""
    saved = torch.load(ck, map_location="cpu", weights_only=True)
    flags = {"classes": None, "data_on": "device", "cache_dir": None, "workers": 0, **saved["args"], "download": False,
             "skip_bad_images": False, "num_train": args.num_train or None, "mean": None}
    data = common.load_data(argparse.Namespace(**flags), torch.device("cpu"))
    backbone, _ = common.build_backbone(saved["args"]["arch"], args.image_size, args.width)
    backbone.load_state_dict(saved["backbone"])
    return common.knn_monitor(backbone, data, torch.device("cpu"))


def read_json(path):
    """A JSON file an earlier piece wrote, or None when it is missing or torn (a piece killed while writing it)."""
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None


DEADLINE = [None]  # set by --time-limit
EXTRA = {"dense_miou": "dense mIoU", "dense_pixel_acc": "dense pixel acc", "foreground_share": "foreground share",
         "foreground_area": "object area"}  # eval numbers shown when present


class TimeUp(Exception):
    pass


def run(cmd, log):
    left = None if DEADLINE[0] is None else DEADLINE[0] - time.time()
    if left is not None and left < 5:
        raise TimeUp
    with open(log, "a") as f:
        p = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        try:
            p.wait(timeout=left)
        except subprocess.TimeoutExpired:  # SIGTERM: the run stops, its last.pt holds the last finished epoch
            p.terminate()
            p.wait()
            raise TimeUp from None
    if p.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed (exit {p.returncode}); see {log}")


def train_and_eval(name, script_flags, args):
    """-> row dict. Trains (or continues) the run in OUT/<name>, evaluates it once."""
    folder = os.path.join(args.out, name.replace(" ", "_").replace("/", "_").replace("(", "").replace(")", ""))
    os.makedirs(folder, exist_ok=True)
    ck, ev, timing = (os.path.join(folder, f) for f in ("last.pt", "last.eval.json", "train_seconds.json"))
    script, *flags = shlex.split(script_flags)
    if script == "random-init":
        if not os.path.isfile(ck):
            random_init_checkpoint(ck, flags[0], args)
        if args.eval_every and not os.path.isfile(os.path.join(folder, "log.jsonl")):  # the curves' epoch 0
            with open(os.path.join(folder, "log.jsonl"), "w") as f:
                f.write(json.dumps({"epoch": 0, "knn_top1": monitor_knn(ck, args), "arch": flags[0]}) + "\n")
        seconds = 0.0
    else:
        done = os.path.isfile(ck) and torch.load(ck, map_location="cpu", weights_only=True)["epoch"] >= args.epochs
        seconds = (read_json(timing) or {"seconds": 0.0})["seconds"]
        if not done:
            print(f"training {name}: {script} {' '.join(flags)}", flush=True)
            t = time.time()
            try:
                run([script, *budget_flags(args), *flags, "--out-dir", folder] + (["--resume"] if os.path.isfile(ck) else []),
                    os.path.join(folder, "train.log"))
            finally:  # the wall time of a run made in pieces is the sum of its pieces
                seconds += time.time() - t
                json.dump({"seconds": seconds}, open(timing, "w"))
            if os.path.isfile(ev):
                os.remove(ev)
    if read_json(ev) is None:  # not evaluated yet, or killed while writing its result
        print(f"evaluating {name}", flush=True)
        limit = ["--limit", str(args.eval_limit)] if args.eval_limit else []
        run(["eval_linear.py", "--checkpoint", ck, "--probe-epochs", str(args.probe_epochs), "--device", args.device,
             "--geometry", *limit, *(["--wordnet", args.wordnet] if args.wordnet else []), *shlex.split(args.eval_flags)],
            os.path.join(folder, "eval.log"))
    res = read_json(ev)
    return {"run": name, "arch": res["arch"], "knn20": res["knn20_top1"], "knn200": res["knn200_top1"],
            "linear": res["linear_top1"], "seconds": seconds,
            **{k: res[k] for k in EXTRA if k in res}}


def main():
    args = get_args()
    DEADLINE[0] = time.time() + args.time_limit if args.time_limit else None
    prepare_data(args)
    runs = [("random init, ResNet-18", "random-init resnet18")]
    if args.set == "claims":
        runs += [("random init, ViT-Tiny/4", "random-init vit_tiny")] + CLAIMS
    else:
        runs += [(m, METHODS[m] + (" --arch vit_tiny" if m == "M-MAE" else "")) for m in args.methods]
    if "M-MAE" in args.methods and args.set == "methods":
        runs.insert(1, ("random init, ViT-Tiny/4", "random-init vit_tiny"))
    runs += [tuple(r.split("=", 1)) for r in args.runs]
    if args.peer:
        runs += [(f"{m}, lightly's recipe", f"tests/scripts/lightly_peer.py --recipe {m.lower()}") for m in ("SimCLR", "DINO")]
    rows, stopped = [], False
    for name, flags in runs:
        try:
            rows.append(train_and_eval(name, flags, args))
        except TimeUp:
            stopped = True
            break
    n = args.num_train or "all"
    data = "synthetic" if args.synthetic else os.path.basename(args.data_dir)
    header = (f"Data: {data} at {args.image_size} px, {n} training images, full val split. "
              f"Budget: {args.epochs} epochs, batch {args.batch_size}, {args.warmup_epochs} warm-up epochs, ResNet-18 "
              f"width {args.width} (M-MAE: ViT-Tiny/4), each method's defaults otherwise. Hardware: "
              f"{hardware(args.device)}. kNN memory and linear probe ({args.probe_epochs} epochs, frozen features): "
              f"{args.eval_limit or 'all'} labelled training images.")
    extra = [k for k in EXTRA if any(k in r for r in rows)]
    lines = [header, "", "| run | backbone | kNN k=20 | kNN k=200 | linear top-1 | "
             + "".join(f"{EXTRA[k]} | " for k in extra) + "train s |", "| --- " * (6 + len(extra)) + "|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['arch']} | {r['knn20']:.2f} | {r['knn200']:.2f} | {r['linear']:.2f} | "
                     + "".join(f"{r[k]:.2f} | " if k in r else "- | " for k in extra) + f"{r['seconds']:.0f} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    if stopped:
        sys.exit(f"stopped by --time-limit with {len(rows)} of {len(runs)} rows; run the same command again to continue "
                 f"from the last finished epoch:\n  python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
