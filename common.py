"""Plumbing shared by every method file: data, batched augmentation, backbones, training utilities.

Nothing method-specific lives here (no losses, heads or teachers). Every dataset is decoded once into
a uint8 tensor (N, 3, H, W) that sits on the training device; augmentation runs as batched tensor ops
on that device, so a GPU run is never waiting for per-image CPU work.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

DATASETS = ("cifar10", "cifar100", "stl10", "folder", "tinyimagenet", "synthetic")
ARCHS = ("resnet18", "resnet50", "vit_tiny", "vit_small")


def die(msg):
    """Stop with a one-line message and exit status 1 (no traceback for a user mistake)."""
    raise SystemExit(f"error: {msg}")


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the help already states its default or the default is resolved later (None)."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_common_args(p):
    a = p.add_argument
    a("--dataset", default="cifar10", choices=DATASETS, help="pretraining data; 'synthetic' needs no download")
    a("--data-dir", default="./data", help="where datasets live (folder: DATA_DIR/train/<class>/*, DATA_DIR/val/<class>/*; "
      "tinyimagenet: DATA_DIR/tiny-imagenet-200/)")
    a("--download", action=argparse.BooleanOptionalAction, default=True, help="download torchvision datasets if missing")
    a("--image-size", type=int, default=None,
      help="folder/tinyimagenet: decode to this size (default: tinyimagenet 64; folder the images' own size up to 64)")
    a("--skip-bad-images", action="store_true", help="folder/tinyimagenet: skip files that cannot be decoded")
    a("--num-train", type=int, default=None, help="train on a fixed random subset of N images (quick runs)")
    a("--arch", default="resnet18", choices=ARCHS, help="backbone; CIFAR stem for ResNets on <=64 px")
    a("--width", type=int, default=64, help="ResNet base width (64 = standard); 16 makes a CPU-sized net")
    a("--epochs", type=int, default=200, help="training epochs")
    a("--batch-size", type=int, default=256, help="global batch size (split across ranks under torchrun)")
    a("--lr", type=float, default=1e-3, help="base learning rate")
    a("--wd", type=float, default=1e-6, help="weight decay (not applied to biases and norm layers)")
    a("--warmup-epochs", type=float, default=10, help="linear lr warm-up before the cosine decay")
    a("--seed", type=int, default=0, help="random seed (runs are deterministic on CPU)")
    a("--out-dir", default=None, help="run folder (default runs/<method>-<dataset>-<arch>)")
    a("--resume", nargs="?", const="auto", default=None, help="resume from PATH, or from OUT_DIR/last.pt if no path")
    a("--save-every", type=int, default=0, help="also keep a copy of the checkpoint every K epochs (0: only last.pt)")
    a("--eval-every", type=int, default=10, help="weighted-kNN monitor on the held-out split every K epochs (0: off)")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:K")
    a("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast (CUDA only; CPU stays fp32)")
    a("--aug", default="batched", choices=("batched", "pil"),
      help="batched tensor augmentation on the device, or the per-image PIL torchvision reference pipeline")
    a("--compile", action="store_true", help="torch.compile the model in place (CUDA; slower start, faster steps)")
    return p


def add_crop_args(p, global_crops=2, local_crops=0, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), notes=None):
    """Crop-count and crop-scale flags; `notes` replaces a flag's "(default ...)" text (a default resolved later)."""
    notes = notes or {}
    a = p.add_argument
    a("--global-crops", type=int, default=global_crops, help=f"large crops per image (default {global_crops})")
    a("--local-crops", type=int, default=local_crops,
      help=f"small crops per image ({notes.get('local_crops', f'default {local_crops}')})")
    a("--global-scale", type=float, nargs=2, default=global_scale,
      help=f"area range of large crops ({notes.get('global_scale', f'default {global_scale}')})")
    a("--local-scale", type=float, nargs=2, default=local_scale, help=f"area range of small crops {local_scale}")


def check_args(args):
    for name in ("epochs", "batch_size", "width"):
        if getattr(args, name) < 1:
            die(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        die(f"--lr must be > 0, got {args.lr}")
    if hasattr(args, "global_crops"):
        if args.global_crops < 1 or (args.local_crops or 0) < 0:  # None: resolved from the image size later
            die(f"need --global-crops >= 1 and --local-crops >= 0, got {args.global_crops} and {args.local_crops}")
        for lo, hi in (r for r in (args.global_scale, args.local_scale) if r is not None):
            if not 0 < lo <= hi <= 1:
                die(f"crop scale ranges need 0 < lo <= hi <= 1, got {lo} {hi}")
    if args.out_dir is None:
        args.out_dir = os.path.join("runs", f"{args.method}-{args.dataset}-{args.arch}")
    if args.resume:  # read it now: a missing or corrupt file stops the run before minutes of data loading
        load_checkpoint(resume_path(args))


# ----------------------------------------------------------------------------------------------
# Data: every split becomes uint8 (N, 3, H, W) + int64 labels (-1 = unlabelled)
# ----------------------------------------------------------------------------------------------
class ImageTensors(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


SHAPES = ("disk", "square", "triangle", "ring", "plus", "diamond", "bar", "half-disk", "two-dots", "frame")


@functools.lru_cache(maxsize=4)  # made once per process (read-only afterwards)
def synthetic(n, seed, size=32):
    """Ten shape kinds with a colour from a palette of four, random position, scale and
    slight rotation, on one of three dark backgrounds with a random shading gradient and pixel noise.

    The label is the shape kind alone; colour, brightness, position and scale are nuisances that the SSL
    augmentations (crops, colour jitter) remove, so a short SSL run measurably beats a random network.
    """
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    y = torch.arange(n) % len(SHAPES)
    y = y[torch.randperm(n, generator=g)]
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
    kinds = [  # inside-tests in the shape's own frame, unit size, one per class (order of SHAPES)
        lambda a, b: rad(a, b) <= 1,
        lambda a, b: box(a, b) <= 0.8,
        lambda a, b: (b > -0.5) & (3**0.5 * a.abs() + b < 1),
        lambda a, b: (rad(a, b) <= 1) & (rad(a, b) >= 0.55),
        lambda a, b: ((a.abs() <= 0.3) & (b.abs() <= 1)) | ((b.abs() <= 0.3) & (a.abs() <= 1)),
        lambda a, b: a.abs() + b.abs() <= 1,
        lambda a, b: (a.abs() <= 1) & (b.abs() <= 0.3),
        lambda a, b: (rad(a, b) <= 1) & (b >= 0),
        lambda a, b: (rad(a - 0.5, b) <= 0.42) | (rad(a + 0.5, b) <= 0.42),
        lambda a, b: (box(a, b) <= 0.9) & (box(a, b) >= 0.55),
    ]
    mask = torch.zeros(n, 1, s2, s2)
    for k, inside in enumerate(kinds):
        sel = y == k
        mask[sel, 0] = inside(pu[sel], pv[sel]).float()
    palette = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.3, 0.9], [0.9, 0.8, 0.1]])
    fg = palette[torch.randint(4, (n,), generator=g)].view(n, 3, 1, 1) * (0.4 + 0.6 * u(n, 1, 1, 1))
    bg = 0.3 * u(n, 1, 1, 1) * fg.mean(1, keepdim=True)  # a darker grey: brightness varies, contrast stays
    shade = 0.25 * (u(n, 1, 1, 1) - 0.5) * (gx + gy - 1)  # a random linear gradient over the image
    img = mask * fg + (1 - mask) * (bg + shade)
    img = F.avg_pool2d(img, 2) + 0.04 * torch.randn(n, 3, size, size, generator=g)
    return ImageTensors((img.clamp(0, 1) * 255).round().to(torch.uint8), y)


def _torchvision_split(name, root, split, download):
    tv = torchvision.datasets
    if name == "stl10":
        split = {"train": "train+unlabeled", "memory": "train", "val": "test"}[split]
        ds = tv.STL10(root, split=split, download=download)
        return ImageTensors(torch.from_numpy(ds.data), torch.as_tensor(ds.labels).long())
    cls = tv.CIFAR10 if name == "cifar10" else tv.CIFAR100
    ds = cls(root, train=split != "val", download=download)
    return ImageTensors(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(ds.targets))


def _images_in(folder):
    """Image files under `folder` (recursively, sorted); other files are ignored, as ImageFolder does."""
    ext = torchvision.datasets.folder.IMG_EXTENSIONS
    return [os.path.join(d, f) for d, _, files in sorted(os.walk(folder, followlinks=True))
            for f in sorted(files) if f.lower().endswith(ext)]


class _Decoded(torch.utils.data.Dataset):
    """File i -> (uint8 (3, S, S) RGB, shorter side S resized then centre-cropped; ok flag). A file PIL cannot
    read gives zeros and ok = False, so one bad file never ends a run from inside a DataLoader worker."""

    def __init__(self, files, size):
        tf = torchvision.transforms
        self.files, self.size = files, size
        self.tf = tf.Compose([tf.Resize(size), tf.CenterCrop(size), tf.PILToTensor()])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.files[i]) as im:
                return self.tf(im.convert("RGB")), True  # grayscale, palette, RGBA, CMYK -> RGB
        except Exception:  # UnidentifiedImageError, truncated file (OSError), missing file, ...
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), False


def _decode(files, labels, size, skip_bad, where):
    """Decode image files once (parallel workers) into ImageTensors; undecodable files are an error or skipped."""
    if not files:
        die(f"no image files found under {where}")
    loader = torch.utils.data.DataLoader(_Decoded(files, size), batch_size=256, num_workers=min(8, os.cpu_count() or 1))
    xs, oks = zip(*tqdm(loader, desc=f"decoding {where}", leave=False))
    x, ok, y = torch.cat(xs), torch.cat(oks), torch.as_tensor(labels)
    if not ok.all():
        bad = [files[i] for i in (~ok).nonzero().flatten().tolist()]
        if not skip_bad:
            die(f"{len(bad)} of {len(files)} files under {where} cannot be read as images (first: {bad[0]}); "
                f"remove them, or pass --skip-bad-images to train without them")
        print(f"warning: skipped {len(bad)} of {len(files)} files under {where} that cannot be read as images "
              f"(first: {bad[0]})", file=sys.stderr)
    return ImageTensors(x[ok], y[ok])


def _first_image_side(files):
    from PIL import Image
    for f in files[:20]:
        try:
            with Image.open(f) as im:
                return min(im.size)
        except Exception:
            continue
    return 64


def _folder_split(root, split, size, skip_bad):
    """ImageFolder layout. Classes are the sub-folders of train/, numbered in sorted order; val/ sub-folders are
    matched to them by name (val may hold fewer classes), so labels mean the same thing in both splits."""
    train = os.path.join(root, "train")
    path = os.path.join(root, "val") if split == "val" else train
    if not os.path.isdir(path):
        die(f"--dataset folder expects images under {path}/<class>/*.jpg (set --data-dir)")
    classes = sorted(e.name for e in os.scandir(train) if e.is_dir()) if os.path.isdir(train) else []
    if not classes:
        die(f"--dataset folder: no class sub-folders in {train}")
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for c in sorted(e.name for e in os.scandir(path) if e.is_dir()):
        if c not in index:
            die(f"class folder '{c}' of {path} is not a class of {train}: val classes are matched to train classes "
                f"by folder name")
        found = _images_in(os.path.join(path, c))
        files, labels = files + found, labels + [index[c]] * len(found)
    return _decode(files, labels, size or min(64, _first_image_side(files)), skip_bad, path)


TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _tinyimagenet_split(data_dir, split, size, skip_bad, download):
    """The official tiny-imagenet-200 layout: train/<wnid>/images/*.JPEG, val/images/*.JPEG labelled by
    val/val_annotations.txt, wnids.txt; labels are the sorted wnids. data_dir holds tiny-imagenet-200/ or is it."""
    root = data_dir if os.path.isfile(os.path.join(data_dir, "wnids.txt")) else os.path.join(data_dir, "tiny-imagenet-200")
    if not os.path.isfile(os.path.join(root, "wnids.txt")) and download:
        try:
            torchvision.datasets.utils.download_and_extract_archive(TINY_IMAGENET_URL, data_dir)
        except Exception as e:
            print(f"download of {TINY_IMAGENET_URL} failed ({type(e).__name__})", file=sys.stderr)
    if not os.path.isfile(os.path.join(root, "wnids.txt")):
        die(f"Tiny-ImageNet is not in {data_dir}: extract tiny-imagenet-200.zip ({TINY_IMAGENET_URL}) there, so that "
            f"{os.path.join(data_dir, 'tiny-imagenet-200', 'wnids.txt')} exists, or point --data-dir at that folder")
    wnids = sorted(open(os.path.join(root, "wnids.txt")).read().split())
    index = {w: i for i, w in enumerate(wnids)}
    files, labels = [], []
    if split == "val":
        ann = os.path.join(root, "val", "val_annotations.txt")
        if not os.path.isfile(ann):
            die(f"Tiny-ImageNet: {ann} is missing (labels of the val images)")
        for line in open(ann):
            name, wnid = line.split("\t")[:2] if "\t" in line else (line.split() + ["", ""])[:2]
            if wnid not in index:
                die(f"Tiny-ImageNet: {ann} labels {name} with '{wnid}', which is not in wnids.txt")
            files.append(os.path.join(root, "val", "images", name))
            labels.append(index[wnid])
    else:
        for w in wnids:
            found = _images_in(os.path.join(root, "train", w))
            files, labels = files + found, labels + [index[w]] * len(found)
    return _decode(files, labels, size or 64, skip_bad, os.path.join(root, "val" if split == "val" else "train"))


def get_dataset(name, data_dir="./data", split="train", download=True, image_size=None, seed=0, skip_bad=False):
    """split: 'train' (pretraining images), 'memory' (labelled train images for kNN/linear), 'val'."""
    if name not in DATASETS:
        die(f"unknown dataset '{name}'; choose from {', '.join(DATASETS)}")
    if name == "synthetic":  # 5000 train / 1000 val images, disjoint seeds
        return synthetic(1000, seed + 1) if split == "val" else synthetic(5000, seed)
    if name == "folder":
        return _folder_split(data_dir, split, image_size, skip_bad)
    if name == "tinyimagenet":
        return _tinyimagenet_split(data_dir, split, image_size, skip_bad, download)
    try:
        return _torchvision_split(name, data_dir, split, download)
    except Exception as e:  # torchvision raises RuntimeError (missing) or URLError/OSError (offline)
        how = "could not be downloaded (offline?)" if download else "is not there and --no-download is set"
        die(f"{name} {how} [{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]. Put the torchvision "
            f"archive (e.g. cifar-10-python.tar.gz) or its extracted folder in --data-dir {data_dir}, "
            f"or try the pipeline offline with --dataset synthetic")


def subset(data, n, seed=0):
    """A fixed random subset of n items, kept in their original order (folders are sorted by class: a prefix
    would hold only the first classes). The same n gives the same subset for every method and --seed."""
    if not n or n >= len(data):
        return data
    keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return ImageTensors(data.images[keep], data.labels[keep])


def load_data(args, device):
    """Pretraining images on `device` plus the labelled kNN memory/query splits (kept on CPU)."""
    kw = dict(data_dir=args.data_dir, download=args.download, image_size=args.image_size, seed=args.seed,
              skip_bad=args.skip_bad_images)
    train = subset(get_dataset(args.dataset, split="train", **kw), args.num_train)
    args.image_size = kw["image_size"] = train.images.shape[-1]  # saved with the run: eval decodes at this size
    memory = train if args.dataset in ("synthetic", "folder", "tinyimagenet") else get_dataset(args.dataset, split="memory", **kw)
    val = get_dataset(args.dataset, split="val", **kw)
    # per-channel statistics of (up to 10k evenly spaced) pretraining images, used to normalise every view
    x = train.images[:: max(1, len(train) // 10000)].float() / 255
    mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3))
    return train.images.to(device), memory, val, (mean, std)


def batches(images, batch_size, epoch, seed, desc):
    """One epoch of uint8 batches; the permutation depends only on (seed, epoch), so resume is exact.

    Under torchrun each rank takes its slice of the same global batch (batch_size is the global size).
    """
    world, rank = world_rank()
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(len(images), generator=g).to(images.device)
    steps = len(images) // batch_size
    if steps == 0:
        die(f"--batch-size {batch_size} is larger than the {len(images)} training images")
    local = batch_size // world
    for s in tqdm(range(steps), desc=desc, disable=rank != 0, leave=False, dynamic_ncols=True):
        yield images[perm[s * batch_size + rank * local: s * batch_size + (rank + 1) * local]]


# ----------------------------------------------------------------------------------------------
# Batched augmentation (SimCLR two-view and DINO multi-crop), all samples at once on the device
# ----------------------------------------------------------------------------------------------
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


def _gray(x):
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def color_jitter(x, g, b=0.4, c=0.4, s=0.2, h=0.1):
    """Brightness, contrast, saturation, hue with per-sample factors (fixed order). x in [0, 1]."""
    B, dev = x.shape[0], x.device
    x = (x * _u((B, 1, 1, 1), 1 - b, 1 + b, g, dev)).clamp(0, 1)
    m = _gray(x).mean((1, 2, 3), keepdim=True)
    x = ((x - m) * _u((B, 1, 1, 1), 1 - c, 1 + c, g, dev) + m).clamp(0, 1)
    gr = _gray(x)
    x = ((x - gr) * _u((B, 1, 1, 1), 1 - s, 1 + s, g, dev) + gr).clamp(0, 1)
    # hue: RGB -> HSV, rotate H, back to RGB
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
    """uint8 (B, 3, H, W) batch -> list of normalised float views: `n_global` crops of `global_size`,
    then `n_local` crops of global_size // 2. Colour jitter 0.4/0.4/0.2/0.1 (p=0.8), grayscale (p=0.2),
    flip; for >= 64 px images DINO's blur (global 1.0 / 0.1, local 0.5) and solarise (2nd global, 0.2)."""

    def __init__(self, image_size, mean, std, n_global=2, n_local=0, global_scale=(0.4, 1.0),
                 local_scale=(0.05, 0.4), color=True, backend="batched"):
        self.gsize, self.lsize = image_size, max(image_size // 2, 8)
        self.n_global, self.n_local = n_global, n_local
        self.gscale, self.lscale = tuple(global_scale), tuple(local_scale)
        self.mean, self.std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
        self.big, self.color = image_size >= 64, color  # color=False: crop + flip only (MAE)
        if backend == "pil":  # the reference: torchvision transforms, image by image, on the CPU
            self.pil = [self.pil_chain(self.gsize, self.gscale, (1.0, 0.1)[i % 2], (0.0, 0.2)[i % 2])
                        for i in range(n_global)] + [self.pil_chain(self.lsize, self.lscale, 0.5, 0.0)] * n_local
        else:
            self.pil = None

    def pil_chain(self, size, scale, blur_p, solarize_p):
        T = torchvision.transforms
        ops = [T.RandomResizedCrop(size, scale=scale), T.RandomHorizontalFlip()]
        if self.color:
            ops += [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2)]
        if self.color and self.big:
            ops += [T.RandomApply([T.GaussianBlur(2 * round(0.05 * size) + 1, (0.1, 2.0))], p=blur_p),
                    T.RandomSolarize(128, p=solarize_p)]
        return T.Compose(ops + [T.ToTensor(), T.Normalize(self.mean.flatten().tolist(), self.std.flatten().tolist())])

    def view(self, x, size, scale, g, blur_p=0.0, solarize_p=0.0):
        """One crop per row of x; blur_p / solarize_p are scalars or per-row (B, 1, 1, 1) tensors."""
        B, dev = x.shape[0], x.device
        coin = lambda p: torch.rand(B, 1, 1, 1, generator=g, device=dev) < p  # noqa: E731
        v = random_resized_crop(x, size, scale, g).clamp(0, 1)
        if self.color:
            v = torch.where(coin(0.8), color_jitter(v, g), v)
            v = torch.where(coin(0.2), _gray(v).expand_as(v), v)
            if self.big:
                v = torch.where(coin(blur_p), gaussian_blur(v, g), v)
                v = torch.where(coin(solarize_p), torch.where(v >= 0.5, 1 - v, v), v)
        v = (v - self.mean.to(dev)) / self.std.to(dev)
        return v.contiguous(memory_format=torch.channels_last) if dev.type == "cuda" else v

    def __call__(self, x, g):
        """uint8 (B, 3, H, W) on the device -> list of n_global + n_local normalised views (B, 3, s, s)."""
        if self.pil is not None:  # uses torch's global RNG, not g
            from PIL import Image
            pils = [Image.fromarray(im.permute(1, 2, 0).cpu().numpy()) for im in x]
            return [torch.stack([tf(p) for p in pils]).to(x.device) for tf in self.pil]
        x, ng, nl = x.float() / 255, self.n_global, self.n_local
        views = self.crops(x, ng, self.gsize, self.gscale, g, [(1.0, 0.1)[i % 2] for i in range(ng)],
                           [(0.0, 0.2)[i % 2] for i in range(ng)])
        return views + self.crops(x, nl, self.lsize, self.lscale, g, [0.5] * nl, [0.0] * nl)

    def crops(self, x, n, size, scale, g, blur_ps, solarize_ps):
        if n == 0:
            return []
        if x.device.type != "cuda":  # CPU: one cache-sized pass per crop is faster
            return [self.view(x, size, scale, g, b, s) for b, s in zip(blur_ps, solarize_ps)]
        B = x.shape[0]  # GPU: all n crops in one pass (few, large kernels), then split
        per_row = lambda ps: torch.tensor(ps, device=x.device).repeat_interleave(B).view(-1, 1, 1, 1)  # noqa: E731
        return list(self.view(x.repeat(n, 1, 1, 1), size, scale, g, per_row(blur_ps), per_row(solarize_ps)).split(B))


def normalize_eval(x, mean, std):
    """uint8 batch -> float normalised, no augmentation (evaluation)."""
    return (x.float() / 255 - mean.view(1, 3, 1, 1).to(x.device)) / std.view(1, 3, 1, 1).to(x.device)


# ----------------------------------------------------------------------------------------------
# Backbones
# ----------------------------------------------------------------------------------------------
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
    """torchvision ViT returning the CLS token after the final LayerNorm (pool='cls') or the mean of
    the patch tokens (pool='mean'). Smaller inputs (multi-crop's local crops) get bicubically
    interpolated position embeddings."""

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
    if arch in ("vit_tiny", "vit_small"):
        dim, heads = (192, 3) if arch == "vit_tiny" else (384, 6)
        patch = patch or (4 if image_size <= 32 else 8 if image_size <= 96 else 16)
        if image_size % patch:
            die(f"image size {image_size} is not divisible by the ViT patch size {patch}")
        vit = ViT(pool, image_size=image_size, patch_size=patch, num_layers=12, num_heads=heads,
                  hidden_dim=dim, mlp_dim=4 * dim)
        return vit, dim
    die(f"unknown arch '{arch}'; choose from {', '.join(ARCHS)}")


# ----------------------------------------------------------------------------------------------
# Device, AMP, distributed, seeds
# ----------------------------------------------------------------------------------------------
def world_rank():
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def setup(args):
    """Seed everything, pick the device, join the process group when launched by torchrun."""
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        dist.init_process_group(backend)
    world, rank = world_rank()
    if args.batch_size % world:
        die(f"--batch-size {args.batch_size} must be divisible by the number of processes {world}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device {args.device} asked for, but no CUDA device is visible")
    device = torch.device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(args, device):
    """bf16 autocast on CUDA only: CPU autocast in bf16 is ~20x slower on CPUs without native bf16."""
    if args.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def gather_with_grad(x):
    """Concatenate x (N, ...) from every rank in rank order; gradients flow back to the local slice."""
    if not dist.is_initialized():
        return x
    xs = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(xs, x.contiguous())
    xs[dist.get_rank()] = x
    return torch.cat(xs)


def aug_generator(args, device, epoch):
    """Augmentation randomness depends on (seed, rank, epoch) only, so a resumed run sees the same crops."""
    return torch.Generator(device=device).manual_seed(args.seed * 1000003 + world_rank()[1] * 7919 + epoch)


def wrap_ddp(model, device, args=None):
    """Compile in place with --compile on CUDA (state_dict keys unchanged); DistributedDataParallel with
    synchronised BatchNorm under torchrun; the model itself otherwise."""
    if args is not None and args.compile and device.type == "cuda":
        model.compile()
    if not dist.is_initialized():
        return model
    if device.type != "cuda":  # SyncBatchNorm is CUDA-only: on CPU (gloo) BatchNorm stays per rank
        return nn.parallel.DistributedDataParallel(model)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device])


def cosine(step, total, base, final=0.0, warmup=0):
    """Linear warm-up from 0 to `base` over `warmup` steps, then cosine from `base` to `final`."""
    if step < warmup:
        return base * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * min(t, 1.0)))


def optimizer(name, model, lr, wd, device, betas=(0.9, 0.999)):
    """'sgd' (momentum 0.9) or 'adamw' (fused single-kernel on CUDA), weight decay on weights only."""
    if name == "sgd":
        return torch.optim.SGD(param_groups(model, wd), lr=lr, momentum=0.9)
    return torch.optim.AdamW(param_groups(model, wd), lr=lr, betas=betas, fused=device.type == "cuda")


def param_groups(model, wd):
    """Weight decay on weight matrices and kernels only, not on biases and norm parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


def check_finite(total, epoch, step, every=50):
    """Stop with a clear message once the running loss sum is not finite. It syncs with the host only every
    `every` steps (a NaN cannot come back, so the sum keeps it); end_epoch checks once more before saving."""
    if (step + 1) % every == 0 and not torch.isfinite(total):
        die(f"the loss became {total.item()} at epoch {epoch + 1} (within steps {step + 2 - every}-{step + 1}); stopping. "
            f"Try a lower --lr, a longer --warmup-epochs, or --no-amp. The last good checkpoint is kept.")


def fp32(loss_fn):
    """Decorator: a loss runs in fp32 even when called under autocast (a bf16 Gram matrix, softmax or log-det
    loses the precision the loss needs). Half-precision tensor arguments (also inside lists) become fp32 and
    autocast is off inside; fp32 and fp64 arguments pass unchanged."""
    def cast(a):
        if isinstance(a, (list, tuple)):
            return type(a)(cast(b) for b in a)
        return a.float() if torch.is_tensor(a) and a.dtype in (torch.float16, torch.bfloat16) else a

    @functools.wraps(loss_fn)
    def wrapped(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for dev in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                stack.enter_context(torch.autocast(dev, enabled=False))
            return loss_fn(*cast(args), **{k: cast(v) for k, v in kwargs.items()})
    return wrapped


# ----------------------------------------------------------------------------------------------
# Checkpoints and logs
# ----------------------------------------------------------------------------------------------
def save_checkpoint(path, state):
    """Atomic: write a temporary file, then rename it over the old one (a crash never leaves half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


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


def resume(args, model, opt):
    """Load model + optimiser state; return the epoch to start from (0 for a fresh run)."""
    if not args.resume:
        return 0
    path = resume_path(args)
    ck = load_checkpoint(path)
    if ck["args"].get("method") != args.method or ck["args"].get("arch") != args.arch:
        die(f"{path} was written by {ck['args'].get('method')}/{ck['args'].get('arch')}, not {args.method}/{args.arch}")
    getattr(model, "module", model).load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    print(f"resumed from {path} at epoch {ck['epoch']}", file=sys.stderr)
    return ck["epoch"]


def resume_path(args):
    return os.path.join(args.out_dir, "last.pt") if args.resume == "auto" else args.resume


def log_json(args, record):
    with open(os.path.join(args.out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------
# Evaluation: frozen features and weighted kNN (DINO protocol)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(backbone, data, mean, std, device, batch_size=512, amp=True):
    was = backbone.training
    backbone.eval()
    feats = []
    for i in range(0, len(data), batch_size):
        x = normalize_eval(data.images[i: i + batch_size].to(device), mean, std)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            feats.append(backbone(x).float())
    backbone.train(was)
    return torch.cat(feats), data.labels.to(device)


@torch.no_grad()
def knn_classify(train_f, train_y, test_f, test_y, k=20, T=0.07, batch_size=1024):
    """Weighted kNN: cosine similarities s to the k nearest train features vote exp(s / T) for their
    class. Returns (top1, top5) accuracy in percent."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    C = int(train_y.max()) + 1
    k = min(k, len(train_f))
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


def knn_monitor(backbone, memory, val, stats, device):
    tr_f, tr_y = extract_features(backbone, memory, *stats, device)
    te_f, te_y = extract_features(backbone, val, *stats, device)
    labelled = tr_y >= 0
    return knn_classify(tr_f[labelled], tr_y[labelled], te_f, te_y)[0]


def end_epoch(args, epoch, model, backbone, opt, evaldata, device, record, extra=None):
    """Rank 0: kNN monitor (every --eval-every epochs and at the end), JSON log line, checkpoint.
    evaldata = (memory, val, (mean, std)); `model` is saved unwrapped from DDP. A non-finite epoch loss stops
    the run before anything is written, so last.pt stays the last good epoch."""
    done = epoch + 1
    if not math.isfinite(record["loss"]):
        die(f"the loss became {record['loss']} during epoch {done}; stopping. Try a lower --lr, a longer "
            f"--warmup-epochs, or --no-amp. The last good checkpoint is kept.")
    if world_rank()[1] != 0:
        return
    if args.eval_every and (done % args.eval_every == 0 or done == args.epochs):
        record["knn_top1"] = knn_monitor(backbone, *evaldata, device)
    record = {"epoch": done, **record}
    log_json(args, record)
    model = getattr(model, "module", model)
    state = {"args": vars(args), "epoch": done, "backbone": backbone.state_dict(),
             "model": model.state_dict(), "optimizer": opt.state_dict(), **(extra or {})}
    save_checkpoint(os.path.join(args.out_dir, "last.pt"), state)
    if args.save_every and done % args.save_every == 0:
        save_checkpoint(os.path.join(args.out_dir, f"epoch{done:04d}.pt"), state)
    tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
