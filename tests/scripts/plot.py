"""Pictures of runs (a script, not a test; matplotlib is its own dependency: pip install matplotlib).

    python tests/scripts/plot.py log runs/hydes-cifar10-resnet18 [more run folders] --out hydes.png
    python tests/scripts/plot.py curves --panel "kappa" runs/claims/HyDeS,_kappa_1 runs/claims/HyDeS,_kappa_10 \\
        --floor runs/claims/random_init,_ResNet-18 --out curves.png

log:    every number a run logs per epoch (loss, the method's diagnostics, kNN top-1, learning rate) against the epoch,
        one panel each, the runs overlaid.
er:     the two terms of the ER bound (entropy, reconstruction; DINO's reconstruction is its loss) of each run,
        as their change since the first epoch, since the methods estimate them up to different constants:
        python tests/scripts/plot.py er runs/curves/SimCLR runs/curves/DINO runs/curves/EntRec_byol --out er.png
curves: kNN top-1 against the epoch, one panel per --panel (a title, then run folders); --floor folders hold the
        kNN of a random-init backbone (tests/scripts/real_images.py writes it as their epoch 0), drawn dashed, and
        every curve of the same backbone starts from it.
A run's log.jsonl is read line by line: a torn last line (a run killed while writing it) is skipped with a warning.
"""
import argparse
import json
import math
import os
import sys


def read_log(folder):
    """-> list of records of OUT_DIR/log.jsonl; lines that are not JSON records are skipped, with one warning."""
    rows, bad = [], 0
    with open(os.path.join(folder, "log.jsonl"), errors="replace") as f:
        for line in f:
            try:
                rows.append(dict(json.loads(line)))
            except ValueError:
                bad += 1
    if bad:
        print(f"warning: {folder}/log.jsonl: skipped {bad} line(s) that are not whole records (a torn write?)",
              file=sys.stderr)
    return rows


def label(folder):
    return os.path.basename(os.path.normpath(folder)).replace("_", " ")


def save(fig, out):
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def plot_log(folders, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    logs = {f: read_log(f) for f in folders}
    keys = sorted({k for rows in logs.values() for r in rows for k, v in r.items()
                   if k != "epoch" and isinstance(v, (int, float))}, key=lambda k: (k != "loss", k == "lr", k))
    cols = min(3, len(keys))
    rows_n = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for i, (f, rows) in enumerate(logs.items()):  # a run keeps its colour in every panel
            pts = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o" if len(pts) < 12 else None, ms=3, color=f"C{i % 10}", label=label(f))
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    save(fig, out)


def plot_er(folders, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 3.8))
    for ax, key, title in ((axes[0], "entropy", "entropy term H"), (axes[1], "reconstruction",
                                                                     "reconstruction term -E log q")):
        for i, f in enumerate(folders):
            rows = [r for r in read_log(f) if r.get("epoch", 0) > 0]
            pts = [(r["epoch"], r.get(key, r["loss"] if key == "reconstruction" else None)) for r in rows]
            pts = [(e, v) for e, v in pts if isinstance(v, (int, float))]
            if pts:
                ax.plot([e for e, _ in pts], [v - pts[0][1] for _, v in pts], marker="o", ms=3, color=f"C{i % 10}",
                        label=label(f))
        ax.set_title(f"{title}, change since epoch 1 (nats)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, out)


def plot_curves(panels, floors, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    floor = {}  # backbone -> (label, kNN at epoch 0)
    for f in floors:
        rows = [r for r in read_log(f) if r.get("epoch") == 0 and "knn_top1" in r]
        if rows:
            floor[rows[0].get("arch", "resnet18")] = (label(f), rows[0]["knn_top1"])
    colour = {f: f"C{i % 10}" for i, f in enumerate(dict.fromkeys(f for _, *fs in panels for f in fs))}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (title, *folders) in zip(axes.flat, panels):
        archs = set()
        for f in folders:
            rows = read_log(f)
            arch = arch_of(f)
            archs.add(arch)
            pts = [(r["epoch"], r["knn_top1"]) for r in rows if "knn_top1" in r]
            if arch in floor:
                pts = [(0, floor[arch][1])] + pts
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, color=colour[f], label=label(f))
        for arch in sorted(archs & floor.keys()):
            ax.axhline(floor[arch][1], ls="--", lw=1, color="grey")
            ax.text(0, floor[arch][1], f" {floor[arch][0]}", fontsize=7, color="grey", va="bottom")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("kNN top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, out)


def arch_of(folder):
    """The backbone a run trained, from its checkpoint's arguments (resnet18 when it cannot be read)."""
    try:
        import torch
        return torch.load(os.path.join(folder, "last.pt"), map_location="cpu", weights_only=True)["args"]["arch"]
    except Exception:
        return "resnet18"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    lg = sub.add_parser("log", help="every logged number of one or more runs against the epoch")
    lg.add_argument("folders", nargs="+")
    lg.add_argument("--out", default="log.png")
    er = sub.add_parser("er", help="the ER bound's entropy and reconstruction terms of runs against the epoch")
    er.add_argument("folders", nargs="+")
    er.add_argument("--out", default="er.png")
    cv = sub.add_parser("curves", help="kNN top-1 against the epoch, in panels")
    cv.add_argument("--panel", nargs="+", action="append", required=True, metavar="TITLE DIR",
                    help="a panel's title, then its run folders (repeat for more panels)")
    cv.add_argument("--floor", nargs="*", default=[], help="random-init folders (epoch-0 kNN in their log.jsonl)")
    cv.add_argument("--out", default="curves.png")
    args = p.parse_args()
    for f in (args.folders if args.what in ("log", "er") else [d for pn in args.panel for d in pn[1:]] + args.floor):
        if not os.path.isfile(os.path.join(f, "log.jsonl")):
            sys.exit(f"error: {f} has no log.jsonl: is it a run folder?")
    if args.what == "log":
        plot_log(args.folders, args.out)
    elif args.what == "er":
        plot_er(args.folders, args.out)
    else:
        plot_curves(args.panel, args.floor, args.out)


if __name__ == "__main__":
    main()
