"""Plumbing shared by every method file, nothing method-specific (no losses, heads or teachers), in two halves.

Part I, what a researcher reads: arguments, data (every dataset decoded once into uint8 (N, 3, H, W) on the training
device), batched augmentation on the device, backbones, device / distributed / optimisation, evaluation.
Part II, what keeps runs safe: `Run`, the one object that owns a run's folder and its lock, the values it resolved,
its last checkpoint, its log records and a pending signal; then checkpoint files, the log and the non-finite stop.

A train() reads:  run = Run(args) -> data = load_data(args, run.device) -> run.resolve(data) -> model, optimizer ->
start = run.resume(model, opt) -> per epoch: schedule, forward, loss, step, [EMA], metrics; kNN monitor,
run.save(record, ...) -> run.finish().
"""
import argparse
import collections
import contextlib
import fcntl
import functools
import glob
import itertools
import json
import math
import os
import shlex
import shutil
import signal
import sys
import textwrap

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

IMG_EXTENSIONS = torchvision.datasets.folder.IMG_EXTENSIONS
DATASETS = ("cifar10", "cifar100", "stl10", "folder", "tinyimagenet", "synthetic")
ARCHS = ("resnet18", "resnet50", "vit_tiny", "vit_small")


def die(msg):
    """Stop with a one-line message and exit status 1 (no traceback for a user mistake)."""
    raise SystemExit(f"error: {msg}")


# ######################################################################################################################
# PART I: what a researcher reads
# ######################################################################################################################
# ==== Arguments =======================================================================================================
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: ...)" where the help says it or it is resolved later (None)
        return action.help if action.default is None or "default" in action.help else super()._get_help_string(action)


def number(kind=float, lo=-math.inf, hi=math.inf, open_lo=False, open_hi=False):
    """argparse type: a finite int or float in the interval lo..hi (closed ends unless open_lo / open_hi)."""
    def parse(text):
        with contextlib.suppress(ValueError):
            if math.isfinite(x := kind(text)) and (lo < x if open_lo else lo <= x) and (x < hi if open_hi else x <= hi):
                return x
        interval = f"{'(' if open_lo else '['}{lo}, {hi}{')' if open_hi or hi == math.inf else ']'}"
        raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'} in {interval}, "
                                         f"got {text}")
    return parse


POSITIVE, NONNEG, FRACTION = number(float, 0, open_lo=True), number(float, 0), number(float, 0, 1)
COUNT, NONNEG_INT, SCALE = number(int, 1), number(int, 0), number(float, 0, 1, open_lo=True)  # SCALE: a crop's area


def add_common_args(p, lr_batch=256, recipe=None, crops=False):
    """The flags every method file shares, in groups after the method's own (added first); a method sets its defaults
    with p.set_defaults. lr_batch: the batch --lr is given for (scaled linearly); recipe: where --optimizer/--lr/--wd
    defaults come from; crops: multi-crop flags."""
    p.allow_abbrev, later = False, f" (default: {recipe})" if recipe else ""
    a = p.add_argument_group("data").add_argument
    a("--dataset", default="cifar10", choices=DATASETS, help="pretraining data; 'synthetic' needs no download")
    a("--data-dir", default="./data", help="where datasets live (folder: DATA_DIR/train/<class>/*, "
      "DATA_DIR/val/<class>/*; tinyimagenet: DATA_DIR/tiny-imagenet-200/)")
    a("--download", action=argparse.BooleanOptionalAction, default=True, help="download the dataset if missing")
    a("--image-size", type=number(int, 8), help="folder/tinyimagenet: decode size (default: tinyimagenet 64; folder "
      "the images' most common size, at most 64)")
    a("--skip-bad-images", action="store_true", help="folder/tinyimagenet: skip files that cannot be decoded")
    a("--num-train", type=COUNT, help="train on a fixed random subset of N images (quick runs)")
    a = p.add_argument_group("model").add_argument
    a("--arch", default="resnet18", choices=ARCHS, help="backbone; CIFAR stem for ResNets on <=64 px")
    a("--width", type=COUNT, default=64, help="ResNet base width (64 = standard); 16 makes a CPU-sized net")
    a = p.add_argument_group("optimisation and augmentation").add_argument
    a("--epochs", type=COUNT, default=200, help="training epochs")
    a("--batch-size", type=number(int, 2), default=256, help="global batch size, split across ranks under torchrun")
    a("--optimizer", choices=("sgd", "adamw"), help="sgd (momentum 0.9) or adamw" + later)
    a("--lr", type=POSITIVE, help=f"learning rate for a batch of {lr_batch}; the run uses lr x batch-size / {lr_batch}"
      + later)
    a("--wd", type=NONNEG, help="weight decay, on weights only (not biases and norm layers)" + later)
    a("--warmup-epochs", type=NONNEG, default=10, help="linear lr warm-up before the cosine decay")
    a("--global-scale", type=SCALE, nargs=2, metavar=("LO", "HI"), help="area range of the (global) crops")
    if crops:
        a("--global-crops", type=COUNT, help="large crops per image")
        a("--local-crops", type=NONNEG_INT, help="small crops (half the image side) per image")
        a("--local-scale", type=SCALE, nargs=2, default=(0.05, 0.4), metavar=("LO", "HI"), help="their area range")
    a = p.add_argument_group("run").add_argument
    a("--seed", type=int, default=0, help="random seed (runs are deterministic on CPU)")
    a("--out-dir", help="run folder (default: runs/<method>-<dataset>-<arch>, or that name with -2, -3, ... when it "
      "holds another run); an --out-dir that holds a run is only continued, with --resume")
    a("--resume", nargs="?", const="auto", help="continue a run: from PATH, or from --out-dir's last.pt, or from the "
      "newest runs/<method>-<dataset>-<arch>*; flags not given take the checkpoint's values")
    a("--save-every", type=NONNEG_INT, default=0, help="also keep the checkpoint of every K-th epoch (0: only last.pt)")
    a("--eval-every", type=NONNEG_INT, default=10, help="weighted-kNN monitor on the held-out split every K epochs "
      "(0: off)")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:K")
    a("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast (CUDA only; CPU stays fp32)")
    a("--compile", action="store_true", help="torch.compile the model in place (slower start, faster steps; on the "
      "CPU it needs a C++ compiler)")
    p.set_defaults(lr_batch=lr_batch)


def parse(p, argv=None):
    """Parse and check; reads a checkpoint, writes nothing. With --resume, flags not given take the checkpoint's
    values (resolved ones too: decode size, recipe, normalisation, crops), a given flag that differs is an error, and
    --epochs may change (the schedules are then recomputed over the new total: Run.resume says so)."""
    argv = sys.argv[1:] if argv is None else [str(x) for x in argv]
    args = p.parse_args(argv)
    for flag, (lo, hi) in [(k, v) for k, v in vars(args).items() if k.endswith("_scale") and v]:
        if lo > hi:
            die(f"--{flag.replace('_', '-')} needs LO <= HI, got {lo} {hi}")
    try:
        torch.device("cpu" if args.device == "auto" else args.device)
    except RuntimeError:
        die(f"--device {args.device} is not a device: use auto, cpu, cuda or cuda:K")
    if not args.resume:
        return args
    resume = find_resume(args) if args.resume == "auto" else args.resume
    out_dir, saved = args.out_dir or os.path.dirname(resume) or ".", load_checkpoint(resume)["args"]
    if saved.get("method") != args.method:
        die(f"{resume} is a {saved.get('method')} checkpoint, not {args.method}")
    free = {"resume", "out_dir", "device", "amp", "compile", "data_dir", "download", "skip_bad_images", "eval_every",
            "save_every", "epochs"}  # what a resumed run may change; every other value is the run's
    p.set_defaults(**{k: v for k, v in saved.items() if k not in ("resume", "out_dir", "device")})  # flags not given
    args = argparse.Namespace(**{**vars(p.parse_args(argv)), "resume": resume, "out_dir": out_dir})
    differ = [f"--{k.replace('_', '-')} {getattr(args, k)} (the checkpoint has {v})" for k, v in saved.items()
              if k not in free and json.dumps(getattr(args, k)) != json.dumps(v)]
    if differ:
        die(f"--resume {resume}: a different run: {'; '.join(differ)}. Start a new run instead (no --resume)")
    return args


def find_resume(args):
    """--resume without a path: --out-dir's last.pt, else the newest last.pt of runs/<method>-<dataset>-<arch>[-K]."""
    default = os.path.join("runs", f"{args.method}-{args.dataset}-{args.arch}")
    candidates = [os.path.join(args.out_dir or default, "last.pt")]
    if not args.out_dir:
        candidates += glob.glob(f"{default}-[0-9]*/last.pt")  # the -2, -3, ... folders
    found = [f for f in candidates if os.path.isfile(f)]
    if not found:
        die(f"--resume: no last.pt in {args.out_dir or default + '*'} to continue; give a checkpoint path")
    return max(found, key=os.path.getmtime)


# ==== Data: uint8 images (N, 3, H, W) + int64 labels (N,) (-1: none) ==================================================
Split = collections.namedtuple("Split", "images labels masks", defaults=(None,))  # masks: uint8 (N, H, W) or None


@functools.lru_cache(maxsize=4)  # made once per process (read-only afterwards)
def synthetic(n, seed, size=32):
    """Ten shape kinds (the label) with nuisances the SSL augmentations remove: a colour from a palette of four,
    position, scale, slight rotation, a dark background with a random shading gradient, pixel noise. The masks
    label each pixel 0 (background) or 1 + the shape's kind (where at least half of it is inside the shape)."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    y = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    s2 = 2 * size  # draw at 2x, then average-pool: anti-aliased edges
    t = (torch.arange(s2) + 0.5) / s2
    gy, gx = t.view(1, -1, 1), t.view(1, 1, -1)  # (1, S, 1), (1, 1, S)
    cx, cy = [(0.35 + 0.3 * u(n)).view(-1, 1, 1) for _ in range(2)]
    r = (0.15 + 0.3 * u(n)).view(-1, 1, 1)
    th = (math.pi / 6 * (u(n) - 0.5)).view(-1, 1, 1)  # +-15 deg: a diamond stays a diamond
    dx, dy = (gx - cx) / r, (gy - cy) / r
    pu, pv = dx * th.cos() + dy * th.sin(), -dx * th.sin() + dy * th.cos()  # (n, S, S) rotated frame
    box = lambda a, b: torch.maximum(a.abs(), b.abs())  # noqa: E731
    rad = lambda a, b: (a**2 + b**2).sqrt()  # noqa: E731
    kinds = [  # inside-tests in the shape's own frame, unit size, one per class
        lambda a, b: rad(a, b) <= 1,  # disk
        lambda a, b: box(a, b) <= 0.8,  # square
        lambda a, b: (b > -0.5) & (3**0.5 * a.abs() + b < 1),  # triangle
        lambda a, b: (rad(a, b) <= 1) & (rad(a, b) >= 0.55),  # ring
        lambda a, b: ((a.abs() <= 0.3) & (b.abs() <= 1)) | ((b.abs() <= 0.3) & (a.abs() <= 1)),  # plus
        lambda a, b: a.abs() + b.abs() <= 1,  # diamond
        lambda a, b: (a.abs() <= 1) & (b.abs() <= 0.3),  # bar
        lambda a, b: (rad(a, b) <= 1) & (b >= 0),  # half disk
        lambda a, b: (rad(a - 0.5, b) <= 0.42) | (rad(a + 0.5, b) <= 0.42),  # two dots
        lambda a, b: (box(a, b) <= 0.9) & (box(a, b) >= 0.55),  # frame
    ]
    mask = torch.zeros(n, 1, s2, s2)
    for k, inside in enumerate(kinds):
        mask[y == k, 0] = inside(pu[y == k], pv[y == k]).float()
    palette = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.3, 0.9], [0.9, 0.8, 0.1]])
    fg = palette[torch.randint(4, (n,), generator=g)].view(n, 3, 1, 1) * (0.4 + 0.6 * u(n, 1, 1, 1))
    bg = 0.3 * u(n, 1, 1, 1) * fg.mean(1, keepdim=True)  # a darker grey: brightness varies, contrast stays
    shade = 0.25 * (u(n, 1, 1, 1) - 0.5) * (gx + gy - 1)  # a random linear gradient over the image
    img = mask * fg + (1 - mask) * (bg + shade)
    img = F.avg_pool2d(img, 2) + 0.04 * torch.randn(n, 3, size, size, generator=g)
    masks = ((F.avg_pool2d(mask, 2)[:, 0] >= 0.5) * (y.view(-1, 1, 1) + 1)).to(torch.uint8)  # 0 background, 1 + kind
    return Split((img.clamp(0, 1) * 255).round().to(torch.uint8), y, masks)


def _read(files, size):
    """DataLoader collate_fn: image files -> uint8 (B, 3, size, size) (shorter side resized, centre crop), status (B,)
    (0 ok, 1 unreadable, 2 too large) and the shorter sides (B,). Never raises: a worker must not end the run."""
    from PIL import Image
    tf = torchvision.transforms
    resize, out = tf.Compose([tf.Resize(size), tf.CenterCrop(size), tf.PILToTensor()]), []
    for f in files:
        try:
            with Image.open(f) as im:
                if im.mode[0] in "IF":  # 16-bit or float (I;16, I, F): scaled from its range, where RGB would clip
                    hi = im.getextrema()[1]
                    top = 65535 if im.mode.startswith("I;16") else next(t for t in (1, 255, 65535, hi) if hi <= t)
                    im = im.convert("F").point(lambda v: v * 255 / top + 0.5).convert("L")
                out.append((resize(im.convert("RGB")), 0, min(im.size)))  # grey, palette, RGBA, CMYK -> RGB
        except Exception as e:
            bad = 2 if isinstance(e, Image.DecompressionBombError) else 1
            out.append((torch.zeros(3, size, size, dtype=torch.uint8), bad, 0))
    x, status, sides = zip(*out)
    return torch.stack(x), torch.tensor(status), torch.tensor(sides)


def _decode(files, labels, where, size, skip_bad):
    """Decode image files once, in parallel, at `size` px (default: the most common shorter side of up to 1000 evenly
    spaced files, at most 64); undecodable files are an error, or skipped. Says what it did."""
    from PIL import Image
    if not files:
        die(f"no image files found under {where}")
    if not size:
        sides = collections.Counter()
        for f in files[:: max(1, len(files) // 1000)]:
            with contextlib.suppress(Exception), Image.open(f) as im:
                sides[min(im.size)] += 1
        size = min(64, sides.most_common(1)[0][0]) if sides else 64
    loader = torch.utils.data.DataLoader(files, 256, num_workers=min(8, os.cpu_count() or 1),
                                         collate_fn=functools.partial(_read, size=size))
    x, status, sides = (torch.cat(t) for t in zip(*tqdm(loader, desc=f"decoding {where}", leave=False)))
    for code, what in ((2, "are too large to decode (PIL's limit: ~179 million pixels)"),
                       (1, "cannot be read as images")):
        bad = [files[i] for i in (status == code).nonzero().flatten().tolist()]
        msg = f"{len(bad)} of {len(files)} files under {where} {what} (first: {bad[0] if bad else ''})"
        if bad and not skip_bad:
            die(f"{msg}; remove them, or pass --skip-bad-images to train without them")
        if bad:
            print(f"warning: skipped {msg}", file=sys.stderr)
    ok = status == 0
    print(f"decoded {int(ok.sum())} images under {where} at {size} px ({int((sides[ok] != size).sum())} resized)",
          file=sys.stderr)
    return Split(x[ok], torch.as_tensor(labels)[ok])


def _folder_files(root, split, tiny=False):
    """-> (image files, labels, where). Classes: the sorted sub-folders of train/; val/ sub-folders are matched to them
    by name (val may hold fewer). tiny: Tiny-ImageNet's val/images/*, labelled by val/val_annotations.txt."""
    train, path = os.path.join(root, "train"), os.path.join(root, "val" if split == "val" else "train")
    try:
        classes = torchvision.datasets.folder.find_classes(train)[0]  # the sorted sub-folders
    except FileNotFoundError:  # no train/, or no class folder in it
        classes = []
    if not classes or not os.path.isdir(path):
        die(f"no class folders under {path}: expected images in {train}/<class>/ and "
            f"{os.path.join(root, 'val')}/<class>/ (set --data-dir)")
    if tiny and split == "val":  # _tiny_imagenet checked that the annotations are there
        ann = os.path.join(path, "val_annotations.txt")
        rows = [line.split()[:2] for line in open(ann, errors="replace") if line.strip()]
        bad = next((r for r in rows if len(r) < 2 or r[1] not in classes), None)
        if bad:
            die(f"Tiny-ImageNet: {ann} labels {bad[0]} with '{bad[-1]}', which is not a class of {train}")
        return [os.path.join(path, "images", name) for name, _ in rows], [classes.index(c) for _, c in rows], ann
    found, files, labels = sorted(e.name for e in os.scandir(path) if e.is_dir()), [], []
    seen = {os.path.realpath(os.path.join(path, c)) for c in found}  # links are followed, but no real folder twice:
    for c in found:  # a link loop cannot hang, a link into another class cannot relabel
        if c not in classes:
            die(f"class folder '{c}' of {path} is not a class of {train}: val classes are matched to train classes "
                f"by folder name")
        for d, subdirs, names in os.walk(os.path.join(path, c), followlinks=True):
            subdirs[:] = sorted(s for s in subdirs if os.path.realpath(os.path.join(d, s)) not in seen)
            seen.update(os.path.realpath(os.path.join(d, s)) for s in subdirs)
            images = [os.path.join(d, f) for f in sorted(names) if f.lower().endswith(IMG_EXTENSIONS)]
            files, labels = files + images, labels + [classes.index(c)] * len(images)  # other files are ignored
    return files, labels, path


TINY_IMAGENET = ("http://cs231n.stanford.edu/tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de", 200)


def _tiny_imagenet(data_dir, download):
    """-> the root of a complete tiny-imagenet-200 layout (data_dir or data_dir/tiny-imagenet-200), else downloaded: the
    archive's MD5 is checked, then it is extracted into a temporary folder renamed into place when whole, so a half-done
    download or extraction is never taken for the dataset; completeness costs a directory listing."""
    url, md5, classes = TINY_IMAGENET
    root = os.path.join(data_dir, "tiny-imagenet-200")
    archive, tmp = f"{root}.zip", f"{root}.part"
    root = data_dir if os.path.isfile(os.path.join(data_dir, "wnids.txt")) else root
    if not os.path.exists(root) and download:
        try:  # URLError (offline), HTTPError (its status) and a full disk are OSErrors
            if not os.path.isfile(archive):
                torchvision.datasets.utils.download_url(url, data_dir, "tiny-imagenet-200.zip.part")
                os.replace(f"{archive}.part", archive)
        except OSError as e:
            die(f"downloading {url} failed ({f'HTTP {e.code}' if hasattr(e, 'code') else getattr(e, 'reason', e)}); "
                f"offline, put tiny-imagenet-200.zip or its extracted folder in {data_dir}")
        if (got := torchvision.datasets.utils.calculate_md5(archive)) != md5:
            die(f"{archive} has MD5 {got}, not the published {md5} (a truncated or altered download): delete it and "
                f"run again, or put a good copy there")
        with writing(f"{root} (extracting {archive})"):
            shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted extraction
            torchvision.datasets.utils.extract_archive(archive, tmp)
            os.replace(os.path.join(tmp, "tiny-imagenet-200"), root)
            os.rmdir(tmp)
    if not os.path.isfile(os.path.join(root, "wnids.txt")):
        die(f"Tiny-ImageNet is not in {data_dir}: extract tiny-imagenet-200.zip ({url}) there, so that "
            f"{os.path.join(data_dir, 'tiny-imagenet-200', 'wnids.txt')} exists, or point --data-dir at it")
    count = lambda *d: len(os.listdir(os.path.join(root, *d))) if os.path.isdir(os.path.join(root, *d)) else 0  # noqa
    wnids, ann = open(os.path.join(root, "wnids.txt")).read().split(), os.path.join(root, "val", "val_annotations.txt")
    empty = [w for w in wnids if not count("train", w, "images")]
    labelled = sum(1 for line in open(ann) if line.strip()) if os.path.isfile(ann) else -1
    wrong = [m for bad, m in ((len(wnids) != classes, f"wnids.txt lists {len(wnids)} classes, not {classes}"),
                              (empty, f"{len(empty)} classes have no training images (first: {(empty or [''])[0]})"),
                              (labelled < 0, f"{ann} is missing"),
                              (labelled not in (-1, count("val", "images")),
                               f"{count('val', 'images')} val images for {labelled} annotations")) if bad]
    if wrong:
        die(f"Tiny-ImageNet in {root} is incomplete: {'; '.join(wrong)}. Delete it and download or extract "
            f"tiny-imagenet-200.zip again")
    return root


def get_dataset(name, data_dir="./data", split="train", download=True, image_size=None, seed=0, skip_bad=False):
    """split: 'train' (pretraining images), 'memory' (labelled train images for kNN/linear), 'val'."""
    if name == "synthetic":  # 5000 train / 1000 val images, disjoint seeds
        return synthetic(1000, seed + 1) if split == "val" else synthetic(5000, seed)
    if name == "folder":
        return _decode(*_folder_files(data_dir, split), image_size, skip_bad)
    if name == "tinyimagenet":
        return _decode(*_folder_files(_tiny_imagenet(data_dir, download), split, tiny=True), image_size or 64, skip_bad)
    try:
        if name == "stl10":  # pretraining on train+unlabeled (labels -1), kNN memory on train
            part = {"train": "train+unlabeled", "memory": "train", "val": "test"}[split]
            ds = torchvision.datasets.STL10(data_dir, part, download=download)
            return Split(torch.from_numpy(ds.data), torch.as_tensor(ds.labels).long())
        ds = (torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100)(
            data_dir, train=split != "val", download=download)
        return Split(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(ds.targets))
    except Exception as e:  # torchvision raises RuntimeError (missing) or URLError/OSError (offline)
        how = "could not be downloaded (offline?)" if download else "is not there and --no-download is set"
        die(f"{name} {how} [{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]. Put the torchvision "
            f"archive (e.g. cifar-10-python.tar.gz) or its extracted folder in --data-dir {data_dir}, "
            f"or try the pipeline offline with --dataset synthetic")


def subset(data, n, seed=0):
    """A fixed random subset of n items in their original order (a prefix of a class-sorted folder would hold only
    the first classes); the same for every method and --seed."""
    if not n or n >= len(data.images):
        return data
    keep = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Split(data.images[keep], data.labels[keep], None if data.masks is None else data.masks[keep])


Data = collections.namedtuple("Data", "images memory val stats")  # pretraining images on the device, kNN splits, stats


def load_data(args, device):
    """-> Data: the pretraining images (uint8, on `device`), the labelled kNN memory / query splits (on the CPU) and
    the per-channel pixel (mean, std) of up to 10k pretraining images (a resumed run's come from its checkpoint).
    Run.resolve saves the decode size and the statistics in the run's config, for eval and resume."""
    kw = dict(data_dir=args.data_dir, download=args.download, image_size=args.image_size, seed=args.seed,
              skip_bad=args.skip_bad_images)
    train = subset(get_dataset(args.dataset, split="train", **kw), args.num_train)
    kw["image_size"] = train.images.shape[-1]
    own = args.dataset in ("synthetic", "folder", "tinyimagenet")  # no separate labelled train split
    memory = train if own else get_dataset(args.dataset, split="memory", **kw)
    if getattr(args, "mean", None) is None:
        x = train.images[:: max(1, len(train.images) // 10000)].float() / 255
        stats = x.mean((0, 2, 3)), x.std((0, 2, 3))
        if flat := (stats[1] == 0).nonzero().flatten().tolist():  # one colour: normalised, every pixel is nan
            where = args.data_dir if args.dataset in ("folder", "tinyimagenet") else args.dataset
            die(f"the {len(train.images)} pretraining images of {where} have a pixel standard deviation of 0 in "
                f"channel {'/'.join('RGB'[c] for c in flat)} (every pixel one colour there), so they cannot be "
                f"normalised: check the images")
    else:
        stats = torch.tensor(args.mean), torch.tensor(args.std)
    return Data(train.images.to(device), memory, get_dataset(args.dataset, split="val", **kw), stats)


def batches(images, batch_size, epoch, seed):
    """One epoch of uint8 batches; the permutation depends only on (seed, epoch), so resume is exact. Under torchrun
    each rank takes its slice of the same global batch (batch_size is the global size)."""
    world, rank = world_rank()
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed * 100003 + epoch)).to(images.device)
    steps, local = len(images) // batch_size, batch_size // world
    if steps == 0:
        die(f"--batch-size {batch_size} is larger than the {len(images)} training images")
    for s in tqdm(range(steps), desc=f"epoch {epoch + 1}", disable=rank != 0, leave=False, dynamic_ncols=True):
        yield images[perm[s * batch_size + rank * local: s * batch_size + (rank + 1) * local]]


# ==== Batched augmentation, all samples at once on the device =========================================================
def _u(shape, lo, hi, g, device):
    return torch.rand(shape, generator=g, device=device) * (hi - lo) + lo


def random_resized_crop(x, size, scale, g, ratio=(3 / 4, 4 / 3), flip=True):
    """torchvision's RandomResizedCrop + horizontal flip for a whole batch: per-sample boxes (10 tries,
    else the whole image), then one bilinear grid_sample. x float (B, C, H, W) -> (B, C, size, size)."""
    B, _, H, W = x.shape
    dev = x.device
    area = _u((B, 10), scale[0], scale[1], g, dev) * H * W
    logr = _u((B, 10), math.log(ratio[0]), math.log(ratio[1]), g, dev)
    w = (area * logr.exp()).sqrt().round()
    h = (area / logr.exp()).sqrt().round()
    ok = (w >= 1) & (w <= W) & (h >= 1) & (h <= H)
    first = ok.float().argmax(1, keepdim=True)  # first valid try
    w = torch.where(ok.any(1), w.gather(1, first).squeeze(1), torch.full_like(w[:, 0], W))
    h = torch.where(ok.any(1), h.gather(1, first).squeeze(1), torch.full_like(h[:, 0], H))
    j = (torch.rand(B, generator=g, device=dev) * (W - w + 1)).floor()
    i = (torch.rand(B, generator=g, device=dev) * (H - h + 1)).floor()
    sx = w / W * (torch.where(torch.rand(B, generator=g, device=dev) < 0.5, -1.0, 1.0) if flip else 1.0)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = sx, (2 * j + w) / W - 1  # output [-1, 1] -> input box [j, j + w)
    theta[:, 1, 1], theta[:, 1, 2] = h / H, (2 * i + h) / H - 1
    grid = F.affine_grid(theta, (B, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def gray(x):
    """Luma 0.299 R + 0.587 G + 0.114 B (ITU-R 601), (B, 3, H, W) -> (B, 1, H, W): PIL's convert("L"), which the
    official SimCLR and DINO pipelines apply through PIL. torchvision's tensor rgb_to_grayscale weighs R 0.2989 (its
    weights sum to 0.9999, so a grey pixel is not left as it is): not taken, so that a grey image stays grey."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def color_jitter(x, g, b=0.4, c=0.4, s=0.2, h=0.1):
    """torchvision's ColorJitter(b, c, s, h) in its fixed order (brightness, contrast, saturation, hue) with a factor
    per sample: each sample's result is adjust_hue(adjust_saturation(adjust_contrast(adjust_brightness(x)))) of
    torchvision.transforms.v2.functional at that sample's factors, up to the grey weights of `gray` (tested).
    x float (B, 3, H, W) in [0, 1]."""
    B, dev = x.shape[0], x.device
    x = (x * _u((B, 1, 1, 1), 1 - b, 1 + b, g, dev)).clamp(0, 1)
    m = gray(x).mean((1, 2, 3), keepdim=True)  # contrast: blend with the mean grey level
    x = ((x - m) * _u((B, 1, 1, 1), 1 - c, 1 + c, g, dev) + m).clamp(0, 1)
    gr = gray(x)  # saturation: blend with the grey image
    x = ((x - gr) * _u((B, 1, 1, 1), 1 - s, 1 + s, g, dev) + gr).clamp(0, 1)
    # Hue: RGB -> HSV (value v = max, chroma delta = max - min, hue from the sector of the largest channel), shift H
    # by the factor (mod 1), back to RGB by the closed form channel_n = v (1 - sat clamp(min(k, 4 - k), 0, 1)) with
    # k = (n + 6 H) mod 6 and n = 5, 3, 1 for R, G, B ("HSV to RGB, alternative", Wikipedia's HSL and HSV article;
    # the same map as torchvision's _hsv_to_rgb, written without its per-sector lookup).
    v, arg = x.max(1)
    delta = v - x.min(1).values
    r, gg, bb = x.unbind(1)
    d = delta.clamp_min(1e-8)
    hue = torch.where(arg == 0, ((gg - bb) / d) % 6, torch.where(arg == 1, (bb - r) / d + 2, (r - gg) / d + 4)) / 6
    hue = (hue + _u((B, 1, 1), -h, h, g, dev)) % 1.0
    sat = torch.where(v > 0, delta / v.clamp_min(1e-8), torch.zeros_like(v))
    k = (torch.tensor([5.0, 3.0, 1.0], device=dev).view(1, 3, 1, 1) + 6 * hue.unsqueeze(1)) % 6
    return v.unsqueeze(1) * (1 - sat.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1))


def gaussian_blur(x, g, sigma=(0.1, 2.0)):
    """Per-sample Gaussian blur (kernel ~10% of the side, as DINO's 23 px at 224) as one grouped conv."""
    B, C, H, W = x.shape
    k = 2 * max(1, round(0.05 * H)) + 1
    sig = _u((B, 1), sigma[0], sigma[1], g, x.device)
    t = torch.arange(k, device=x.device) - k // 2
    ker = torch.exp(-(t**2) / (2 * sig**2))
    ker = (ker / ker.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, k)
    y = F.pad(x.reshape(1, B * C, H, W), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, ker.view(B * C, 1, 1, k), groups=B * C)
    return F.conv2d(y, ker.view(B * C, 1, k, 1), groups=B * C).view(B, C, H, W)


class MultiCrop:
    """uint8 (B, 3, H, W) batch -> normalised float views: `n_global` crops of the image size, then `n_local` of half
    that side. Colour jitter 0.4/0.4/0.2/0.1 (p=0.8), grayscale (p=0.2), flip; for >= 64 px DINO's blur (p 1.0 / 0.1
    global, 0.5 local) and solarisation (p 0.2, second global crop). color=False: crop + flip only (MAE)."""

    def __init__(self, image_size, stats, n_global=2, n_local=0, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4),
                 color=True):
        self.groups = [(n_global, image_size, tuple(global_scale), [(1.0, 0.1)[i % 2] for i in range(n_global)],
                        [(0.0, 0.2)[i % 2] for i in range(n_global)]),  # (count, side, scale, blur p, solarise p)
                       (n_local, max(image_size // 2, 8), tuple(local_scale), [0.5] * n_local, [0.0] * n_local)]
        self.mean, self.std = stats[0].view(1, 3, 1, 1), stats[1].view(1, 3, 1, 1)
        self.big, self.color = image_size >= 64, color

    def view(self, x, size, scale, g, blur_p=0.0, solarize_p=0.0):
        """One crop per row of x (float in [0, 1]); blur_p / solarize_p are scalars or per-row (B, 1, 1, 1)."""
        B, dev = x.shape[0], x.device
        coin = lambda p: torch.rand(B, 1, 1, 1, generator=g, device=dev) < p  # noqa: E731
        v = random_resized_crop(x, size, scale, g).clamp(0, 1)
        if self.color:
            v = torch.where(coin(0.8), color_jitter(v, g), v)
            v = torch.where(coin(0.2), gray(v).expand_as(v), v)
            if self.big:
                v = torch.where(coin(blur_p), gaussian_blur(v, g), v)
                v = torch.where(coin(solarize_p), torch.where(v >= 0.5, 1 - v, v), v)
        v = (v - self.mean.to(dev)) / self.std.to(dev)
        return v.contiguous(memory_format=torch.channels_last) if cuda_paths(dev) else v  # the GPU's conv layout

    def __call__(self, x, g):
        """uint8 (B, 3, H, W) on the device -> list of normalised views (B, 3, s, s), global crops first."""
        x, views = x.float() / 255, []
        for n, size, scale, blur, solarize in self.groups:
            if n and not cuda_paths(x.device):  # CPU: one cache-sized pass per crop (1.4x faster for 2 + 6 crops)
                views += [self.view(x, size, scale, g, b, s) for b, s in zip(blur, solarize)]
            elif n:  # GPU: the n crops of one size in one pass (few, large kernels), then split
                per_row = [torch.tensor(p, device=x.device).repeat_interleave(len(x)).view(-1, 1, 1, 1)
                           for p in (blur, solarize)]
                views += self.view(x.repeat(n, 1, 1, 1), size, scale, g, *per_row).split(len(x))
        return views


def forward_crops(backbone, views):
    """Backbone features of a list of crops, larger crops first ((N, 3, S_v, S_v) each): one pass per crop size, so
    BatchNorm sees every crop of that size at once. -> (V * N, feature_dim), crops in the given order."""
    sizes = sorted({v.shape[-1] for v in views}, reverse=True)
    return torch.cat([backbone(torch.cat([v for v in views if v.shape[-1] == s])) for s in sizes])


# ==== Backbones =======================================================================================================
class ResNet(torchvision.models.ResNet):
    """torchvision ResNet with stage widths width*(1, 2, 4, 8) and, for small images, the CIFAR stem
    (3x3 conv stride 1, no max-pool). The classifier is removed: forward returns pooled features."""

    def __init__(self, block, layers, width=64, small_input=True):
        super().__init__(block, layers)
        self.inplanes = width
        if small_input:
            self.conv1, self.maxpool = nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.fc = nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class ViT(torchvision.models.VisionTransformer):
    """torchvision ViT returning the CLS token after the final LayerNorm (pool='cls') or the mean of the patch tokens
    (pool='mean'); smaller inputs (local crops) get bicubically interpolated position embeddings."""

    def __init__(self, pool="cls", **kw):
        super().__init__(**kw)
        self.heads, self.pool = nn.Identity(), pool

    def pos_embed(self, n):  # (1, 1 + n, D) for n patches
        pos = self.encoder.pos_embedding
        if n == pos.shape[1] - 1:
            return pos
        g0, g = int(round((pos.shape[1] - 1) ** 0.5)), int(round(n**0.5))
        grid = pos[:, 1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        return torch.cat([pos[:, :1], grid], 1)

    def tokens(self, x):  # (B, 3, S, S) -> (B, L, D) patch tokens, no CLS, no position
        return self.conv_proj(x).flatten(2).transpose(1, 2)

    def forward(self, x):
        x = self.tokens(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed(x.shape[1])
        x = self.encoder.ln(self.encoder.layers(self.encoder.dropout(x)))  # (B, 1 + L, D)
        return x[:, 0] if self.pool == "cls" else x[:, 1:].mean(1)


def build_backbone(arch, image_size=32, width=64, pool="cls", patch=None):
    """-> (backbone, feature_dim). The backbone maps (B, 3, S, S) images to (B, feature_dim).
    ViT patch size: 4 for <= 32 px, 8 for <= 96 px, else 16, unless `patch` is given."""
    R = torchvision.models.resnet
    if arch == "resnet18":
        return ResNet(R.BasicBlock, [2, 2, 2, 2], width, image_size <= 64), 8 * width
    if arch == "resnet50":
        return ResNet(R.Bottleneck, [3, 4, 6, 3], width, image_size <= 64), 32 * width
    dim, heads = (192, 3) if arch == "vit_tiny" else (384, 6)
    patch = patch or (4 if image_size <= 32 else 8 if image_size <= 96 else 16)
    if image_size % patch:
        die(f"image size {image_size} is not divisible by the ViT patch size {patch}")
    return ViT(pool, image_size=image_size, patch_size=patch, num_layers=12, num_heads=heads, hidden_dim=dim,
               mlp_dim=4 * dim), dim


# ==== Device, distributed, optimiser, schedules, metrics ==============================================================
CUDA_PATHS = None  # None: the CUDA paths on CUDA devices only; a test sets True to run them on CPU tensors


def cuda_paths(device):
    """Whether to take the paths written for a CUDA GPU (bf16 autocast, one-pass crops, channels-last crops and model,
    fused AdamW), decided here alone so that a test runs them all on the CPU. The CPU stays fp32 and per crop: CPU
    bf16 is ~20x slower."""
    return device.type == "cuda" if CUDA_PATHS is None else CUDA_PATHS


def channels_last(device, args):
    """Whether the model runs channels-last (NHWC): on the CUDA paths (tensor cores), and on the CPU for ResNets of
    width >= 16, where oneDNN's channels-last step was 1.1-1.9x faster at 32-128 px; not below, where its backward
    crashed the process at widths 4 and 8 on 64 px images (README, Devices: the width x size table)."""
    return cuda_paths(device) or (args.arch.startswith("resnet") and args.width >= 16)


def autocast(args, device):
    """bf16 autocast on the CUDA paths (--no-amp: off); the losses compute in fp32 inside it."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and cuda_paths(device))


def pick_device(name):
    """--device: auto (CUDA when visible, else the CPU), cpu, cuda, cuda:K; anything else is a one-line error."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        die(f"--device {name} is not a device: use auto, cpu, cuda or cuda:K")
    if device.type == "cuda" and not torch.cuda.is_available():
        die(f"--device {name} asked for, but no CUDA device is visible")
    return device


def init_device(args):
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on the CPU) and pick the device: --device,
    or under torchrun this rank's GPU (LOCAL_RANK)."""
    if "RANK" in os.environ and not dist.is_initialized():
        cuda = torch.cuda.is_available() and args.device != "cpu"
        dist.init_process_group("nccl" if cuda else "gloo")  # NCCL: CUDA alone, never run by the CPU suite
    if args.batch_size % world_rank()[0]:
        die(f"--batch-size {args.batch_size} must be divisible by the number of processes {world_rank()[0]}")
    device = pick_device(args.device)
    if str(device) == "cuda":  # one GPU per rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def world_rank():
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


class _AllGather(torch.autograd.Function):
    """dist.all_gather with a backward: the gradient of each rank's slice is the sum over ranks of the gradients that
    reached it (an all-reduce; a bare all_gather would have none)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads):
        total = torch.stack(grads)  # (world, *x.shape)
        dist.all_reduce(total)
        return total[dist.get_rank()]


def gather(x, dim=0):
    """x of every rank, concatenated along `dim` in rank order, with a gradient (each slice gets the sum over ranks):
    a whole-batch loss, computed alike on every rank, then gives after DDP's gradient mean the single-process one."""
    return torch.cat(_AllGather.apply(x), dim) if dist.is_initialized() else x


def aug_generator(args, device, epoch):
    """Augmentation randomness depends on (seed, rank, epoch) only, so a resumed run sees the same crops."""
    return torch.Generator(device=device).manual_seed(args.seed * 1000003 + world_rank()[1] * 7919 + epoch)


def to_device(model, device, args):
    """Move to `device` (channels-last where `channels_last` says; the first convolution then takes its input to that
    layout), compile in place with --compile (state_dict keys unchanged), and under torchrun wrap in
    DistributedDataParallel."""
    layout = torch.channels_last if channels_last(device, args) else torch.preserve_format
    model = model.to(device, memory_format=layout)
    if args.compile:
        model.compile()
    if not dist.is_initialized():
        return model
    if device.type != "cuda":  # gloo on the CPU: BatchNorm stays per rank
        return nn.parallel.DistributedDataParallel(model)
    # CUDA alone (NCCL; no CPU test can run this line): BatchNorm statistics synchronised across ranks
    return nn.parallel.DistributedDataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(model), device_ids=[device])


def optimizer(args, model, betas=(0.9, 0.999)):
    """sgd (momentum 0.9) or adamw (fused on the CUDA paths) at lr args.base_lr (Run.resolve: --lr x batch / lr_batch).
    Weight decay on weight matrices and kernels only (the group marked "decay"), not on biases and norm parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": args.wd, "decay": True},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "decay": False}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.base_lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=args.base_lr, betas=betas, fused=cuda_paths(params[0].device))


def set_schedule(opt, lr, wd=None):
    """This step's learning rate for every group and, when given, its weight decay for the groups marked "decay"."""
    for group in opt.param_groups:
        group["lr"] = lr
        if wd is not None and group["decay"]:
            group["weight_decay"] = wd


def cosine(step, total, base, final=0.0, warmup=0):
    """Linear warm-up from 0 to `base` over `warmup` steps, then cosine from `base` to `final` at step `total`."""
    if step < warmup:
        return base * step / warmup
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * min((step - warmup) / max(1, total - warmup), 1.0)))


class Metrics:
    """An epoch's per-step values, summed by name on the device (no host sync per step); `means()` is the epoch's one
    host sync."""

    def __init__(self):
        self.sums, self.steps = {}, 0

    def add(self, **values):  # once per step: name=scalar tensor
        self.steps += 1
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach()

    def __getitem__(self, name):
        return self.sums[name]

    def means(self):
        return dict(zip(self.sums, (torch.stack(list(self.sums.values())) / self.steps).tolist()))


# ==== Evaluation: frozen features and weighted kNN (DINO protocol) ====================================================
@torch.no_grad()
def extract_features(backbone, data, stats, device, batch_size=512):
    """Backbone features (eval mode) of every image of `data`: uint8, no augmentation, normalised with `stats`."""
    mean, std = (s.view(1, 3, 1, 1).to(device) for s in stats)
    was, feats = backbone.training, []
    backbone.eval()
    for i in range(0, len(data.images), batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda_paths(device)):
            feats.append(backbone((data.images[i: i + batch_size].to(device).float() / 255 - mean) / std).float())
    backbone.train(was)
    return torch.cat(feats), data.labels.to(device)


@torch.no_grad()
def knn_classify(train_f, train_y, test_f, test_y, k=20, T=0.07, batch_size=1024):
    """Weighted kNN: cosine similarities s to the k nearest train features vote exp(s / T) for their class.
    -> (top1, top5) accuracy in percent."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    C, k = int(train_y.max()) + 1, min(k, len(train_f))
    correct1 = correct5 = 0
    for i in range(0, len(test_f), batch_size):
        sim, idx = (test_f[i: i + batch_size] @ train_f.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(sim), C, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (sim / T).exp())
        pred = votes.topk(min(5, C), dim=1).indices
        y = test_y[i: i + batch_size, None]
        correct1 += (pred[:, :1] == y).sum().item()
        correct5 += (pred == y).any(1).sum().item()
    return 100 * correct1 / len(test_f), 100 * correct5 / len(test_f)


def knn_monitor(backbone, data, device):
    """kNN top-1 (k=20) of data.val against the labelled images of data.memory (data: a Data of load_data)."""
    (tr_f, tr_y), (te_f, te_y) = (extract_features(backbone, d, data.stats, device) for d in (data.memory, data.val))
    return knn_classify(tr_f[tr_y >= 0], tr_y[tr_y >= 0], te_f, te_y)[0]


# ######################################################################################################################
# PART II: what keeps runs safe
# ######################################################################################################################
# ==== The run: its folder and lock, resolved values, checkpoints, log, interrupts =====================================
class Run:
    """This process's training run, the one object that holds its state: the device, the run folder (locked while the
    run lives), the resolved values every checkpoint saves (`config`), the last checkpoint written (`saved`), the log
    records (`log`), the epochs finished (`done`) and a signal that arrived while writing (`signal`). SIGINT and
    SIGTERM call its `interrupted`. train() makes one first:

        run = Run(args)        join torchrun's process group, pick the device, claim the folder, catch signals, seed
        run.resolve(data)      fix the resolved values into args, print them once, keep them for the checkpoints
        run.resume(model, opt) a resumed run's weights, optimiser and log; -> the epoch to start from
        run.save(record, ...)  each epoch: last.pt, then its log line
        run.finish()           release the folder, say how to evaluate and how to train on"""

    def __init__(self, args):
        self.args = args
        self.config = None  # the resolved values, fixed by resolve()
        self.lock = None  # the open .lock file of the run folder, flock-ed
        self.checkpoint = None  # a resumed run's checkpoint, until resume() has loaded it
        self.saved = None  # (path, epoch) of the last checkpoint written or resumed from
        self.log = []  # the log records, also kept in every checkpoint
        self.done = 0  # epochs finished
        self.writing = False  # a checkpoint and its log line are being written: a signal waits
        self.signal = None  # the signal that arrived while writing
        self.pid = os.getpid()  # DataLoader workers inherit the handler; only this process stops the run
        previous = signal.getsignal(signal.SIGTERM)
        if isinstance(getattr(previous, "__self__", None), Run):  # a run this process made before (tests train twice)
            previous.__self__.release()
        self.device = init_device(args)
        self.rank = world_rank()[1]
        if self.rank == 0:
            with writing(f"the run folder {args.out_dir or 'runs/'}"):
                args.out_dir = self._claim()
                for tmp in glob.glob(os.path.join(args.out_dir, "*.tmp")):  # left by a run killed while saving
                    os.remove(tmp)
            print(f"run folder: {args.out_dir}", file=sys.stderr)
        if dist.is_initialized():  # every rank uses rank 0's folder
            box = [args.out_dir]
            dist.broadcast_object_list(box)
            args.out_dir = box[0]
        if args.resume:
            self.checkpoint = load_checkpoint(args.resume)
            if self.checkpoint["epoch"] >= args.epochs:  # nothing to train; mend a log cut by a kill after last.pt
                restore_log(self.checkpoint, os.path.join(args.out_dir, "log.jsonl"))
                print(f"{args.resume} has trained {self.checkpoint['epoch']} of --epochs {args.epochs}: nothing to do "
                      f"(give a larger --epochs to train on)", file=sys.stderr)
                self.release()
                raise SystemExit(0)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.interrupted)
        torch.manual_seed(args.seed)  # every random draw of the scripts comes from torch generators
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def _claim(self):
        """Rank 0: the run folder, locked (flock) while this process lives. A default folder that holds a run or is
        locked is passed over for -2, -3, ...; an explicit or resumed folder that is locked or holds another run is an
        error."""
        args = self.args
        default = os.path.join("runs", f"{args.method}-{args.dataset}-{args.arch}")
        folders = [args.out_dir] if args.out_dir else itertools.chain(
            [default], (f"{default}-{k}" for k in itertools.count(2)))
        for d in folders:
            os.makedirs(d, exist_ok=True)
            self.lock = open(os.path.join(d, ".lock"), "w")
            with contextlib.suppress(BlockingIOError):  # locked: a live run
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                resumed_here = args.resume and os.path.realpath(os.path.dirname(args.resume)) == os.path.realpath(d)
                if resumed_here or not any(os.path.exists(os.path.join(d, f)) for f in ("last.pt", "log.jsonl")):
                    return d
            self.release()
            if args.out_dir:
                die(f"--out-dir {d} holds another run, or a running process uses it: continue it with --resume (once "
                    f"it has stopped), or choose a new --out-dir")

    def release(self):
        """Unlock the run folder (a finished run, or a run this process made before)."""
        if self.lock:
            self.lock.close()
            self.lock = None

    def resolve(self, data):
        """Fix what the run resolved into args: the decode size and pixel statistics of `data`, the learning rate
        after scaling (base_lr = --lr x batch / lr_batch), beside what parse and the method file resolved before
        (out dir, recipe, crops). Printed once as one block; `config`, what every checkpoint saves, is this."""
        args = self.args
        args.image_size = data.images.shape[-1]
        args.mean, args.std = data.stats[0].tolist(), data.stats[1].tolist()
        args.base_lr = args.lr * args.batch_size / args.lr_batch
        self.config, self.steps = dict(vars(args)), len(data.images) // args.batch_size
        if self.rank == 0:
            def show(v):
                if isinstance(v, (list, tuple)):
                    return ",".join(map(show, v))
                return f"{v:.4g}" if isinstance(v, float) else str(v)
            print(textwrap.fill(" ".join(f"{k}={show(v)}" for k, v in self.config.items()), 120,
                                initial_indent="config: ", subsequent_indent="  "), file=sys.stderr)

    def resume(self, model, opt):
        """Load a resumed run's model and optimiser state and restore its log; -> the epoch to start from (0 for a new
        run). A changed --epochs is said in one line: every schedule is recomputed over the new total."""
        ck, args = self.checkpoint, self.args
        if ck is None:
            return 0
        self.checkpoint = None  # loaded: not kept in memory for the run
        getattr(model, "module", model).load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        self.done = ck["epoch"]
        self.saved = (args.resume, self.done)
        self.log = restore_log(ck, os.path.join(args.out_dir, "log.jsonl"))
        if self.rank == 0:
            print(f"resumed from {args.resume} at epoch {self.done}", file=sys.stderr)
        planned = ck["args"].get("epochs", args.epochs)
        if planned != args.epochs and self.rank == 0:  # the cosine of this run's own schedule, with its lr scaling
            last = f"{self.log[-1]['lr']:.3g}" if self.log and "lr" in self.log[-1] else "?"
            s = self.steps
            now = cosine(self.done * s, args.epochs * s, args.base_lr, 0.0, args.warmup_epochs * s)
            print(f"note: --epochs {args.epochs} for a run planned for {planned}: every schedule (learning rate, and "
                  f"the method's own) is recomputed over {args.epochs} epochs, so the learning rate goes from {last} "
                  f"to about {now:.3g} (a warm restart, not the rest of one decay)", file=sys.stderr)
        return self.done

    def monitor_due(self, epoch):
        """Whether rank 0 runs the kNN monitor after `epoch` (0-based): every --eval-every epochs and at the end."""
        done, every = epoch + 1, self.args.eval_every
        return self.rank == 0 and bool(every) and (done % every == 0 or done == self.args.epochs)

    def save(self, record, model, backbone, opt):
        """Rank 0: write last.pt (and every --save-every epochs epochNNNN.pt) holding the log records, then append the
        epoch's record to log.jsonl: the log never runs ahead of the checkpoint, and a signal that arrives meanwhile
        waits for both. record: {"epoch": epochs done, ...}."""
        self.done = record["epoch"]
        if self.rank != 0:
            return
        args, done = self.args, record["epoch"]
        log = os.path.join(args.out_dir, "log.jsonl")
        last = os.path.join(args.out_dir, "last.pt")
        state = {"args": self.config, "epoch": done, "backbone": backbone.state_dict(), "log": self.log + [record],
                 "model": getattr(model, "module", model).state_dict(), "optimizer": opt.state_dict()}
        self.writing = True  # a signal now waits for the checkpoint and the log line
        save_checkpoint(last, state)
        self.saved = (last, done)
        self.log = state["log"]
        if args.save_every and done % args.save_every == 0:
            save_checkpoint(os.path.join(args.out_dir, f"epoch{done:04d}.pt"), state)
        with writing(log), open(log, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.writing = False
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if self.signal:
            self._stop(self.signal, mid_epoch=False)

    def finish(self):
        """After the last epoch: release the folder (it holds a finished run, which no other run takes) and print the
        commands that evaluate it and that train on."""
        self.release()
        if self.rank == 0:
            script, ck = shlex.quote(sys.argv[0]), shlex.quote(os.path.join(self.args.out_dir, "last.pt"))
            print(f"done: {self.args.out_dir}. Evaluate: python eval_linear.py --checkpoint {ck}  Train on: python "
                  f"{script} --resume {ck} --epochs {2 * self.done} (a warm restart: the schedules start again over "
                  f"the new total)", file=sys.stderr)

    def interrupted(self, signum, frame=None):
        """The SIGINT / SIGTERM handler. While a checkpoint and its log line are written the signal waits for them
        (Run.save stops then); in a DataLoader worker it is left to the main process."""
        self.signal = signum
        if os.getpid() == self.pid and not self.writing:
            self._stop(signum, mid_epoch=True)

    def _stop(self, signum, mid_epoch):
        """One line with the epoch reached, the last checkpoint and the command that continues it; exit 128 + signal."""
        total, saved = self.args.epochs, self.saved  # saved: (path, epoch) or None
        launch = f"torchrun --nproc_per_node={world_rank()[0]}" if dist.is_initialized() else "python"
        if self.rank == 0:
            where = f"in epoch {self.done + 1} of {total}" if mid_epoch else f"after epoch {self.done} of {total}"
            print(f"\n{signal.Signals(signum).name}: stopped {where}; " + (
                f"the last checkpoint is {saved[0]} (epoch {saved[1]}); continue with: {launch} "
                f"{shlex.quote(sys.argv[0])} --resume {shlex.quote(saved[0])}" if saved else
                "no epoch has finished: start it again"), file=sys.stderr)
        raise SystemExit(128 + signum)


# ==== Checkpoint files, the log, the non-finite stop ==================================================================
def check_finite(total, epoch, step=None, every=50):
    """Stop with one line once the running loss sum is not finite: every `every` steps of an epoch (one host sync
    each time; a NaN stays in the sum) and at its end (step None), before anything is written."""
    if (step is None or (step + 1) % every == 0) and not math.isfinite(total):
        where = f" (within steps {step + 2 - every}-{step + 1})" if step is not None else ""
        die(f"the loss became {float(total)} in epoch {epoch + 1}{where}; stopping. Try a lower --lr, a longer "
            f"--warmup-epochs, or --no-amp. The last good checkpoint is kept.")


@contextlib.contextmanager
def writing(path, tmp=None):
    """An I/O error (full disk, no permission) while writing `path` stops with one line naming it, leaving no `tmp`."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        with contextlib.suppress(OSError, TypeError):
            os.remove(tmp)
        die(f"cannot write {path}: {getattr(e, 'strerror', None) or str(e).splitlines()[0]}")


def save_checkpoint(path, state):
    """Atomic: write PATH.tmp, then rename it over PATH."""
    with writing(path, f"{path}.tmp"):
        torch.save(state, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        die(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"cannot read checkpoint {path} ({type(e).__name__}); is it a file written by these scripts?")
    if not isinstance(ck, dict) or "backbone" not in ck or "args" not in ck:
        die(f"{path} is not a checkpoint of these scripts (no 'backbone'/'args' entries)")
    return ck


def restore_log(ck, log):
    """Rewrite log.jsonl from the checkpoint's records where it differs (a line missing or torn by a kill); -> them."""
    records, old = ck.get("log", []), open(log, errors="replace").read() if os.path.isfile(log) else None
    if "log" in ck and old != "".join(json.dumps(r) + "\n" for r in records) and world_rank()[1] == 0:
        if old is not None:
            print(f"warning: {log} did not match the checkpoint (a line torn, or written after it): rewritten from "
                  f"its {len(records)} records", file=sys.stderr)
        with writing(log, f"{log}.tmp"):
            with open(f"{log}.tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            os.replace(f"{log}.tmp", log)
    return records
