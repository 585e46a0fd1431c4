"""Plumbing shared by every method file, nothing method-specific (no losses, heads or teachers), in two parts.

Part I is what a method file calls, in the order its train() calls it:

    run = Run(args)                 join torchrun's process group, pick the device, claim the run folder, seed
    data = load_data(args, device)  decoded uint8 images (N, 3, S, S) where --data-on says, the kNN splits, statistics
    args = run.resolve(data)        every value the run uses, resolved once: printed, saved in every checkpoint
    MultiCrop, build_backbone, to_device, optimizer, run.resume(model, opt)
    per epoch: batches -> augment -> forward -> loss (gather / columns / all_sum) -> step; Metrics, knn_monitor,
    run.save(record, ...); at the end run.finish()

Part II, below its banner, keeps runs safe and scales them (argument resolution and resume checks, devices and DDP,
dataset sources and decoding, `Images`, tiers and decoded caches, the run folder, checkpoints, signals), then holds the
batched image operations (torchvision's transforms for a whole batch, tested equal to them) and the feature extraction
and neighbour search of the evaluation. A reader of a method needs none of it. Calls go from Part I down into Part II,
never back up.
"""
import argparse
import collections
import contextlib
import datetime
import fcntl
import functools
import glob
import hashlib
import itertools
import json
import math
import os
import shlex
import shutil
import signal
import sys
import textwrap

import numpy
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

IMG_EXTENSIONS = torchvision.datasets.folder.IMG_EXTENSIONS
DATASETS = ("cifar10", "cifar100", "stl10", "folder", "tinyimagenet", "imagenet", "food101", "synthetic")
ARCHS = ("resnet18", "resnet50", "vit_tiny", "vit_small")
# A split of a dataset: uint8 images (N, 3, S, S), int64 labels (N,) (-1: none), masks uint8 (N, H, W) or None
Split = collections.namedtuple("Split", "images labels masks", defaults=(None,))
Data = collections.namedtuple("Data", "images memory val stats size tier cache_dir", defaults=(None, "device", None))
# what load_data gives a run: the training images, the labelled kNN memory and query splits, pixel (mean, std), the
# model's input side, where the training images live (--data-on) and their cache folder (disk tier)


def die(msg):
    """Stop with a one-line message and exit status 1 (no traceback for a user mistake)."""
    raise SystemExit(f"error: {msg}")


# ######################################################################################################################
# PART I: what a method file calls, in the order its train() calls it
# ######################################################################################################################
# ==== Flags ===========================================================================================================
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
    a("--data-dir", default="./data", help="where datasets live (folder and imagenet: DATA_DIR/train/<class>/*, "
      "DATA_DIR/val/<class>/*; tinyimagenet: DATA_DIR/tiny-imagenet-200/; food101: DATA_DIR/food-101/)")
    a("--classes", metavar="FILE", help="folder-like datasets: train on the classes FILE lists, one folder name / wnid "
      "/ class name a line (e.g. the ImageNet-100 list)")
    a("--download", action=argparse.BooleanOptionalAction, default=True, help="download the dataset if missing")
    a("--image-size", type=number(int, 8), help="the model's input side (default: tinyimagenet 64; folder the images' "
      "most common size, at most 64; imagenet and food101 224, from squares decoded at 8/7 of it: 256 px)")
    a("--data-on", choices=("auto", "device", "cpu", "disk"), default="auto", help="where decoded images live: on the "
      "training device, in host memory, or in a decoded cache file read per batch; auto: the first that holds them")
    a("--cache-dir", help="disk tier: the folder of decoded caches (default: DATA_DIR/decoded), reused by later runs "
      "and eval_linear.py, rebuilt when the images change")
    a("--workers", type=NONNEG_INT, help="disk tier: DataLoader processes reading ahead (default: per rank min(8, its "
      "CPUs - 1))")
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
    a("--dist-timeout", type=POSITIVE, default=3600, help="torchrun: seconds a rank waits for the others in a "
      "collective before the run stops; longer than another node takes to build its decoded cache (docs/scale.md)")
    p.set_defaults(lr_batch=lr_batch, mean=None, std=None)  # mean, std: the pixel statistics (Run.resolve)


def parse(p, argv=None):
    """Parse and check the flags. With --resume, flags not given take the checkpoint's values and a given flag that
    differs is an error (resume_args); a run that has already trained its --epochs says so and exits 0."""
    argv = sys.argv[1:] if argv is None else [str(x) for x in argv]
    args = p.parse_args(argv)
    for flag, (lo, hi) in [(k, v) for k, v in vars(args).items() if k.endswith("_scale") and v]:
        if lo > hi:
            die(f"--{flag.replace('_', '-')} needs LO <= HI, got {lo} {hi}")
    try:
        torch.device("cpu" if args.device == "auto" else args.device)
    except RuntimeError:
        die(f"--device {args.device} is not a device: use auto, cpu, cuda or cuda:K")
    return resume_args(p, argv, args) if args.resume else args


# ==== The run's public face ===========================================================================================
class Run:
    """This process's training run: the device, the run folder (locked while the run lives), the values it resolved
    (`config`, what every checkpoint saves as `args`), the last checkpoint written (`saved`), the log records (`log`),
    the epochs finished (`done`) and a signal that arrived while a checkpoint was being written (`signal`)."""

    def __init__(self, args):
        """Join torchrun's process group, pick the device, claim the run folder (rank 0; the others take its name),
        catch SIGINT / SIGTERM, seed."""
        self.args = args  # the flags; from resolve() on, every resolved value
        self.device = init_device(args)
        self.rank = world_rank()[1]
        self.out_dir, self.lock = claim_folder(args, self.rank)
        self.checkpoint = load_checkpoint(args.resume) if args.resume else None  # until resume() has loaded it
        self.config, self.steps = None, None  # fixed by resolve()
        self.saved = None  # (path, epoch) of the last checkpoint written or resumed from
        self.log = []  # the log records, also kept in every checkpoint
        self.done = 0  # epochs finished
        self.writing = False  # a checkpoint and its log line are being written: a signal waits
        self.signal = None  # the signal that arrived while writing
        self.pid = os.getpid()  # DataLoader workers inherit the handler; only this process stops the run
        self.handlers = {s: signal.signal(s, self.interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
        torch.manual_seed(args.seed)  # every random draw of the scripts comes from torch generators
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def resolve(self, data, **resolved):
        """Every value the run uses, resolved once before its first step: the flags, what the method resolved from
        them (`resolved`, e.g. DINO's crops), the run folder, the data tier and cache folder, the decode size, the
        pixel statistics and the learning rate after batch scaling (base_lr = --lr x batch / lr_batch). Printed as one
        `config:` block and saved in every checkpoint; -> them as the namespace train() reads from then on."""
        a = self.args
        self.config = {**vars(a), **resolved, "out_dir": self.out_dir, "data_on": data.tier,
                       "cache_dir": data.cache_dir, "image_size": data.size, "mean": data.stats[0].tolist(),
                       "std": data.stats[1].tolist(), "base_lr": a.lr * a.batch_size / a.lr_batch}
        self.args, self.steps = argparse.Namespace(**self.config), len(data.images) // a.batch_size
        if self.rank == 0:
            show = lambda v: ",".join(map(show, v)) if isinstance(v, (list, tuple)) else (  # noqa: E731
                f"{v:.4g}" if isinstance(v, float) else str(v))
            print(textwrap.fill(" ".join(f"{k}={show(v)}" for k, v in self.config.items()), 120,
                                initial_indent="config: ", subsequent_indent="  "), file=sys.stderr)
        return self.args

    def resume(self, model, opt):
        """Load a resumed run's model and optimiser state and restore its log; -> the epoch to start from (0 for a new
        run). A changed --epochs is said in one line: every schedule is recomputed over the new total."""
        ck, args = self.checkpoint, self.args
        if ck is None:
            return 0
        self.checkpoint = None  # loaded: not kept in memory for the run
        getattr(model, "module", model).load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        self.done, self.saved = ck["epoch"], (args.resume, ck["epoch"])
        self.log = restore_log(ck, os.path.join(self.out_dir, "log.jsonl"))
        if self.rank == 0:
            print(f"resumed from {args.resume} at epoch {self.done}", file=sys.stderr)
            if ck["args"]["epochs"] != args.epochs:  # the cosine of this run's own schedule, with its lr scaling
                s = self.steps
                lr = cosine(self.done * s, args.epochs * s, args.base_lr, 0.0, args.warmup_epochs * s)
                print(restart_note(ck["args"]["epochs"], args.epochs, self.log, lr), file=sys.stderr)
        return self.done

    def monitor_due(self, epoch):
        """Whether the kNN monitor runs after `epoch` (0-based), on every rank: every --eval-every epochs and at the
        end."""
        done, every = epoch + 1, self.args.eval_every
        return bool(every) and (done % every == 0 or done == self.args.epochs)

    def save(self, record, model, backbone, opt):
        """Rank 0: write last.pt (and every --save-every epochs epochNNNN.pt) holding the log records, then append the
        epoch's record to log.jsonl: the log never runs ahead of the checkpoint, and a signal that arrives meanwhile
        waits for both. record: {"epoch": epochs done, ...}."""
        self.done = record["epoch"]
        if self.rank != 0:
            return
        state = {"args": self.config, "epoch": self.done, "backbone": backbone.state_dict(), "log": self.log + [record],
                 "model": getattr(model, "module", model).state_dict(), "optimizer": opt.state_dict()}
        self.writing = True  # a signal now waits for the checkpoint and the log line
        self.saved, self.log = write_checkpoint(self.out_dir, state, self.args.save_every), state["log"]
        self.writing = False
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if self.signal:
            self.stop(self.signal, mid_epoch=False)

    def finish(self):
        """After the last epoch: release the folder and the signals, and say how to evaluate the run and train on."""
        self.release()
        if self.rank == 0:
            script, ck = shlex.quote(sys.argv[0]), shlex.quote(os.path.join(self.out_dir, "last.pt"))
            print(f"done: {self.out_dir}. Evaluate: python eval_linear.py --checkpoint {ck}  Train on: python "
                  f"{script} --resume {ck} --epochs {2 * self.done} (a warm restart: the schedules start again over "
                  f"the new total)", file=sys.stderr)

    def interrupted(self, signum, frame=None):
        """The SIGINT / SIGTERM handler. While a checkpoint and its log line are written the signal waits for them
        (save() stops then); in a DataLoader worker it is left to the main process."""
        self.signal = signum
        if os.getpid() == self.pid and not self.writing:
            self.stop(signum, mid_epoch=True)

    def stop(self, signum, mid_epoch):
        """Release the run, say where it stopped and how to continue it (stop_message), exit 128 + signal."""
        self.release()
        if self.rank == 0:
            print(stop_message(signum, self.done, self.args.epochs, self.saved, mid_epoch), file=sys.stderr)
        raise SystemExit(128 + signum)

    def release(self):
        """Unlock the run folder and give the signals back to the handlers they had before the run."""
        if self.lock:
            self.lock.close()
            self.lock = None
        for s, handler in self.handlers.items():
            signal.signal(s, handler)


# ==== Data: uint8 images (N, 3, S, S) + int64 labels (N,) (-1: none) ==================================================
def load_data(args, device):
    """-> Data: the pretraining images where --data-on says (device: a uint8 tensor on `device`; cpu / disk: Images
    that feed `batches` on it), the labelled kNN memory and query splits, the per-channel pixel (mean, std) of up to
    10k pretraining images (a resumed run's come from its checkpoint) and the model's input side. Writes nothing into
    args: Run.resolve takes the tier, the sizes and the statistics from the Data."""
    kw = dict(data_dir=args.data_dir, download=args.download, image_size=args.image_size, seed=args.seed,
              classes=args.classes)
    src = subset(dataset_source(args.dataset, split="train", **kw), args.num_train)  # files or arrays, not decoded
    tier = choose_tier(src, device) if args.data_on == "auto" else args.data_on  # rank 0's choice on every rank
    cache_dir = args.cache_dir or os.path.join(args.data_dir, "decoded") if tier == "disk" else args.cache_dir
    kw.update(image_size=model_side(args.dataset, args.image_size, source_side(src)), skip_bad=args.skip_bad_images,
              cache_dir=cache_dir if tier == "disk" else None)
    train = get_dataset(args.dataset, split="train", src=src, **kw)
    stats = normalisation(args, train.images)
    if tier == "device":  # one copy of the images: the kNN memory reads the training tensor on the device
        train = train._replace(images=train.images.to(device))
    memory = train if args.dataset in OWN_LABELS else get_dataset(args.dataset, split="memory", **kw)
    images = train.images if tier == "device" else (
        train.images if tier == "disk" else Images(train.images)).to(device, workers=loader_workers(args.workers))
    return Data(images, memory, get_dataset(args.dataset, split="val", **kw), stats, kw["image_size"], tier, cache_dir)


def batches(images, batch_size, epoch, seed):
    """One epoch of uint8 batches on the training device; the permutation depends only on (seed, epoch), so resume is
    exact, and on no tier: every tier yields the same batches. Under torchrun each rank takes its slice of the same
    global batch (batch_size is the global size) and, from Images, reads only those rows."""
    world, rank = world_rank()
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    steps, local = len(images) // batch_size, batch_size // world
    if steps == 0:
        die(f"--batch-size {batch_size} is larger than the {len(images)} training images")
    if isinstance(images, Images):
        feed = images.batches([perm[s * batch_size + rank * local:][:local] for s in range(steps)])
    else:  # on the device: the permutation moves there once, each batch is one index
        perm = perm.to(images.device)
        feed = (images.index_select(0, perm[s * batch_size + rank * local:][:local]) for s in range(steps))
    yield from tqdm(feed, total=steps, desc=f"epoch {epoch + 1}", disable=rank != 0, leave=False, dynamic_ncols=True)


# ==== Batched augmentation, all samples at once on the device =========================================================
class MultiCrop:
    """uint8 (B, 3, H, W) batch -> normalised float views: `n_global` crops of side image_size (from the whole
    decoded square, which may be larger: ImageNet's 224 px crops of 256 px squares), then `n_local` of local_side.
    Colour jitter 0.4/0.4/0.2/0.1 (p=0.8), grayscale (p=0.2), flip; for >= 64 px DINO's blur (p 1.0 / 0.1 global,
    0.5 local) and solarisation (p 0.2, second global crop). color=False: crop + flip only (MAE). The operations
    (random_resized_crop, color_jitter, gray, gaussian_blur) are torchvision's, batched: Part II."""

    def __init__(self, image_size, stats, n_global=2, n_local=0, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4),
                 color=True):
        self.groups = [(n_global, image_size, tuple(global_scale), [(1.0, 0.1)[i % 2] for i in range(n_global)],
                        [(0.0, 0.2)[i % 2] for i in range(n_global)]),  # (count, side, scale, blur p, solarise p)
                       (n_local, local_side(image_size), tuple(local_scale), [0.5] * n_local, [0.0] * n_local)]
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


def local_side(image_size):
    """The side of a local crop: half the image's, or from 224 px up 3/7 of it (DINO's 96 px at 224)."""
    return 96 * image_size // 224 if image_size >= 224 else max(image_size // 2, 8)


# ==== Backbones =======================================================================================================
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


# ==== Devices, optimiser, schedules ===================================================================================
def autocast(args, device):
    """bf16 autocast on the CUDA paths (--no-amp: off); the losses compute in fp32 inside it."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and cuda_paths(device))


def to_device(model, device, args):
    """Move to `device` (channels-last where `channels_last` says; the first convolution then takes its input to that
    layout), compile in place with --compile (state_dict keys unchanged), and under torchrun wrap in
    DistributedDataParallel: compiled first, then wrapped, the order torch's "Where to apply torch.compile?" gives for
    DDP (Dynamo does not trace the wrapper well)."""
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


def aug_generator(args, device, epoch):
    """Augmentation randomness depends on (seed, rank, epoch) only, so a resumed run sees the same crops."""
    return torch.Generator(device=device).manual_seed(args.seed * 1000003 + world_rank()[1] * 7919 + epoch)


# ==== Distributed: the whole batch in a loss, with its gradient =======================================================
def gather(x, dim=0):
    """x of every rank, concatenated along `dim` in rank order, with a gradient (each slice gets the sum over ranks):
    a whole-batch loss, computed alike on every rank, then gives after DDP's gradient mean the single-process one.
    Half-precision x (autocast) is gathered in fp32, so that its gradients are summed over the ranks in fp32."""
    if not dist.is_initialized():
        return x
    return torch.cat(_AllGather.apply(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x), dim)


def columns(*xs, dim=0):
    """For a loss computed on this rank's rows against the whole batch: each x of every rank concatenated along `dim`
    (`gather`, with its gradient), then the offset of this rank's rows in them (0 in one process): the loss takes
    (rows..., columns..., offset). Memory and work per rank are then local x global. Its mean over this rank's rows,
    back-propagated on every rank, gives after DDP's gradient mean the single-process gradient, since each rank's
    gradient reaches the others' rows through the gather (tests/test_distributed.py)."""
    return (*(gather(x, dim) for x in xs), world_rank()[1] * xs[0].shape[dim])


def all_sum(x):
    """x summed over ranks, with a gradient (M-MAE's d x d Z^T Z of the whole batch); x itself in one process."""
    return _AllSum.apply(x) if dist.is_initialized() else x


# ==== Metrics and the non-finite stop =================================================================================
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

    def means(self):  # under torchrun the mean over ranks too (each rank's loss is its own rows' share)
        values = torch.stack(list(self.sums.values())) / self.steps
        if dist.is_initialized():
            dist.all_reduce(values)
            values /= dist.get_world_size()
        return dict(zip(self.sums, values.tolist()))


def check_finite(total, epoch, step=None, every=50):
    """Stop with one line once the running loss sum is not finite: every `every` steps of an epoch (one host sync
    each time; a NaN stays in the sum) and at its end (step None), before anything is written."""
    if (step is None or (step + 1) % every == 0) and not math.isfinite(total):
        where = f" (within steps {step + 2 - every}-{step + 1})" if step is not None else ""
        die(f"the loss became {float(total)} in epoch {epoch + 1}{where}; stopping. Try a lower --lr, a longer "
            f"--warmup-epochs, or --no-amp. The last good checkpoint is kept.")


# ==== Evaluation: frozen features and weighted kNN (DINO protocol) ====================================================
def knn_monitor(backbone, data, device, k=20, T=0.07):
    """kNN top-1 (k=20, T=0.07) of data.val against the labelled images of data.memory, called on every rank: each
    embeds its 1/W of both splits, finds for every query (gathered from all ranks) the k nearest of its own memory
    rows, and each query's W x k candidates are merged into its k nearest, those one process holding every feature
    finds. No rank waits alone on work that grows with the data, and none holds the whole memory's features."""
    world, rank = world_rank()
    share = lambda d: range(len(d.labels) * rank // world, len(d.labels) * (rank + 1) // world)  # noqa: E731
    tr_f, tr_y = extract_features(backbone, data.memory, data.stats, device, data.size, share(data.memory))
    te_f, te_y = extract_features(backbone, data.val, data.stats, device, data.size, share(data.val))
    te_f, te_y = gather_rows(te_f), gather_rows(te_y)  # every query, on every rank
    sim, near = nearest(tr_f[tr_y >= 0], tr_y[tr_y >= 0], te_f, k)  # (Q, k): among this rank's memory rows
    if world > 1:  # the k nearest of the W k candidates
        sim, pick = gather(sim, dim=1).topk(k, dim=1)
        near = gather(near, dim=1).gather(1, pick)
    return vote(sim, near, te_y, T, int(near.max()) + 1)[0]


@torch.no_grad()
def knn_classify(train_f, train_y, test_f, test_y, k=20, T=0.07):
    """Weighted kNN (DINO's protocol): the k train features of largest cosine similarity s to a test feature vote
    exp(s / T) for their class. -> (top1, top5) accuracy in percent."""
    return vote(*nearest(train_f, train_y, test_f, k), test_y, T, int(train_y.max()) + 1)


# ######################################################################################################################
# PART II: what keeps runs safe and scales them. A reader of a method file need not go further: nothing above
# calls back up here from below, and nothing here is method-specific.
# ######################################################################################################################
# ==== Argument resolution and resume checks ===========================================================================
def resume_args(p, argv, args):
    """--resume: the checkpoint to continue (find_resume without a path) and its values for the flags not given (the
    resolved ones too: decode size, recipe, normalisation, crops); a given flag that differs is an error, and --epochs
    may change (the schedules are then recomputed over the new total: Run.resume says so). A run that has trained its
    --epochs already says so and exits 0, after mending a log line that a kill cut after its last checkpoint."""
    resume = find_resume(args) if args.resume == "auto" else args.resume
    out_dir, ck = args.out_dir or os.path.dirname(resume) or ".", load_checkpoint(resume)
    saved = ck["args"]
    if saved.get("method") != args.method:
        die(f"{resume} is a {saved.get('method')} checkpoint, not {args.method}")
    free = {"resume", "out_dir", "device", "amp", "compile", "data_dir", "download", "skip_bad_images", "eval_every",
            "save_every", "epochs", "data_on", "cache_dir", "workers", "dist_timeout"}  # what a resumed run may change
    p.set_defaults(**{k: v for k, v in saved.items() if k not in ("resume", "out_dir", "device")})  # flags not given
    args = argparse.Namespace(**{**vars(p.parse_args(argv)), "resume": resume, "out_dir": out_dir})
    given = vars(args)
    differ = [f"--{k.replace('_', '-')} {given[k]} (the checkpoint has {v})" for k, v in saved.items()
              if k not in free and json.dumps(given.get(k)) != json.dumps(v)]
    if differ:
        die(f"--resume {resume}: a different run: {'; '.join(differ)}. Start a new run instead (no --resume)")
    if ck["epoch"] >= args.epochs:  # nothing to train
        if os.environ.get("RANK", "0") == "0":
            restore_log(ck, os.path.join(out_dir, "log.jsonl"))
        print(f"{resume} has trained {ck['epoch']} of --epochs {args.epochs}: nothing to do (give a larger --epochs "
              f"to train on)", file=sys.stderr)
        raise SystemExit(0)
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


# ==== Devices and DDP set-up ==========================================================================================
CUDA_PATHS = None  # None: the CUDA paths on CUDA devices only; a test sets True to run them on CPU tensors


def cuda_paths(device):
    """Whether to take the paths written for a CUDA GPU (bf16 autocast, one-pass crops, channels-last crops and model,
    fused AdamW), decided here alone so that a test runs them all on the CPU. The CPU stays fp32 and per crop: CPU
    bf16 is ~20x slower."""
    return device.type == "cuda" if CUDA_PATHS is None else CUDA_PATHS


def channels_last(device, args):
    """Whether the model runs channels-last (NHWC): on the CUDA paths (tensor cores), and on the CPU for ResNets of
    width >= 16, where oneDNN's channels-last step was 1.1-1.9x faster at 32-128 px; not below, where its backward
    crashed the process at widths 4 and 8 on 64 px images (docs/scale.md, Devices: the width x size table)."""
    return cuda_paths(device) or (args.arch.startswith("resnet") and args.width >= 16)


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
        dist.init_process_group("nccl" if cuda else "gloo",  # NCCL: CUDA alone, never run by the CPU suite
                                timeout=datetime.timedelta(seconds=args.dist_timeout))
    if args.batch_size % world_rank()[0]:
        die(f"--batch-size {args.batch_size} must be divisible by the number of processes {world_rank()[0]}")
    device = pick_device(args.device)
    if str(device) == "cuda":  # one GPU per rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def world_rank():
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def broadcast(value):
    """Rank 0's value (any picklable object) on every rank; the value itself in one process."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box)
    return box[0]


def gather_rows(x):
    """x (n_r, ...) of every rank concatenated in rank order, where n_r may differ by rank (no gradient): each rank's
    rows padded to the largest n_r for the all_gather, the padding dropped after."""
    if not dist.is_initialized():
        return x
    n = torch.tensor([len(x)], device=x.device)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    most = int(max(counts))
    parts = [x.new_empty((most, *x.shape[1:])) for _ in counts]
    dist.all_gather(parts, torch.cat([x, x.new_zeros((most - len(x), *x.shape[1:]))]))
    return torch.cat([p[: int(c)] for p, c in zip(parts, counts)])


class _AllGather(torch.autograd.Function):
    """dist.all_gather with a backward: the gradient of each rank's slice is the sum over ranks of the gradients that
    reached it (a bare all_gather would have none): a reduce-scatter, which moves 1/W of what an all-reduce of every
    slice would."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads):
        own = grads[0].new_empty(grads[0].numel())
        dist.reduce_scatter_tensor(own, torch.cat([g.reshape(-1) for g in grads]))  # rank k: sum over ranks of slice k
        return own.view_as(grads[0])


class _AllSum(torch.autograd.Function):
    """dist.all_reduce (sum) with a backward: the gradient is the sum over ranks of the gradients of the sum."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


# ==== Dataset sources =================================================================================================
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


# image files with their labels, to decode as `size` px squares for a model of input side `crop`
Source = collections.namedtuple("Source", "files labels where size crop")


FOLDERS = ("folder", "tinyimagenet", "imagenet", "food101")  # the datasets of image files
OWN_LABELS = FOLDERS + ("synthetic",)  # datasets whose labelled kNN memory is their training split
SQUARES = ("imagenet", "food101")  # photographs decoded as squares 8/7 of the model's side, every crop taken from them


def dataset_source(name, data_dir="./data", split="train", download=True, image_size=None, seed=0, classes=None):
    """-> a Split (datasets held as arrays: synthetic, CIFAR, STL-10) or a Source (the image files of a folder-like
    dataset, the decode size and the model's input size). split: 'train' (pretraining images), 'memory' (labelled
    train images for kNN / linear), 'val'. ImageNet and Food-101 photographs are decoded as squares 8/7 of the
    model's side (256 px for 224: shorter side resized, centre crop), from which the crops are taken."""
    if classes and name not in FOLDERS:
        die(f"--classes selects classes of a folder-like dataset ({', '.join(FOLDERS)}), not of {name}")
    if name == "synthetic":  # 5000 train / 1000 val images, disjoint seeds
        return synthetic(1000, seed + 1) if split == "val" else synthetic(5000, seed)
    if name in ("folder", "tinyimagenet", "imagenet"):
        root = data_dir if name == "folder" else _imagenet(data_dir) if name == "imagenet" else _tiny_imagenet(
            data_dir, download)
        files, labels, where, names = _folder_files(root, split, tiny=name == "tinyimagenet")
    elif name == "food101":
        files, labels, where, names = _food101(data_dir, split, download)
    else:
        return _arrays(name, data_dir, split, download)
    if classes:
        files, labels = keep_classes(files, labels, names, classes)
    if not files:
        die(f"no image files found under {where}")
    if name in SQUARES:
        crop = model_side(name, image_size, None)
        return Source(files, labels, where, crop + crop // 7, crop)
    size = image_size or (64 if name == "tinyimagenet" else _common_side(files))
    return Source(files, labels, where, size, size)


def model_side(name, image_size, decoded_side):
    """The side of the model's input, decided here alone: --image-size (default 224) for the photographs of SQUARES,
    whose squares are decoded at 8/7 of it (256 px for 224), else the side the images are decoded at."""
    return image_size or 224 if name in SQUARES else decoded_side


def centre(x, size):
    """The centre size x size pixels of images or masks x (..., S, S) when S is larger (ImageNet's 224 of its 256 px
    squares: DINO's resize 256, centre crop 224); x itself otherwise."""
    if not size or size >= x.shape[-1]:
        return x
    o = (x.shape[-1] - size) // 2
    return x[..., o: o + size, o: o + size]


def source_side(src):
    """The side a Source is decoded at, or that of a Split's images."""
    return src.size if isinstance(src, Source) else src.images.shape[-1]


def get_dataset(name, data_dir="./data", split="train", download=True, image_size=None, seed=0, skip_bad=False,
                classes=None, cache_dir=None, src=None):
    """The split decoded: in host memory, or with cache_dir (the disk tier) as Images over its decoded cache file
    there (built first when missing or stale). src: its dataset_source when the caller has it already. -> Split."""
    src = src or dataset_source(name, data_dir, split, download, image_size, seed, classes)
    if cache_dir:
        return cached(src, (name, "train" if split == "memory" and name in OWN_LABELS else split, source_side(src)),
                      cache_dir, skip_bad, classes)
    return _decode(src, skip_bad) if isinstance(src, Source) else src


def _arrays(name, data_dir, split, download):
    """CIFAR-10/100 and STL-10 through torchvision, as a Split."""
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


def _folder_files(root, split, tiny=False):
    """-> (image files, labels, where, class names). Classes: the sorted sub-folders of train/; val/ sub-folders are
    matched to them by name (val may hold fewer). tiny: Tiny-ImageNet's val/images/*, labelled by
    val/val_annotations.txt."""
    train, path = os.path.join(root, "train"), os.path.join(root, "val" if split == "val" else "train")
    if os.path.isfile(root):
        die(f"--data-dir {root} is a file, not a folder holding train/<class>/ and val/<class>/")
    try:
        classes = torchvision.datasets.folder.find_classes(train)[0]  # the sorted sub-folders
    except (FileNotFoundError, NotADirectoryError):  # no train/ (or a file of that name), or no class folder in it
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
        return [os.path.join(path, "images", n) for n, _ in rows], [classes.index(c) for _, c in rows], ann, classes
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
    return files, labels, path, classes


def _common_side(files):
    """folder's default decode size: the most common shorter side of up to 1000 evenly spaced files, at most 64."""
    from PIL import Image
    sides = collections.Counter()
    for f in files[:: max(1, len(files) // 1000)]:
        with contextlib.suppress(Exception), Image.open(f) as im:
            sides[min(im.size)] += 1
    return min(64, sides.most_common(1)[0][0]) if sides else 64


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


def _imagenet(data_dir):
    """-> data_dir after checking it is not ImageNet's raw layout (a flat val/, or only the devkit archives), which
    is one line that says how to sort it into train/<wnid>/ and val/<wnid>/."""
    val = os.path.join(data_dir, "val")
    flat = os.path.isdir(val) and any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)
                                      for e in itertools.islice(os.scandir(val), 1000))
    raw = [f for f in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC")
           if os.path.exists(os.path.join(data_dir, f))]
    if flat or (raw and not os.path.isdir(os.path.join(data_dir, "train"))):
        q = shlex.quote(data_dir)
        die(f"ImageNet in {data_dir} is in its raw layout ({'val/ holds the images themselves' if flat else raw[0]}), "
            f"not train/<wnid>/*.JPEG and val/<wnid>/*.JPEG: with ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and "
            f"ILSVRC2012_devkit_t12.tar.gz in it, python -c \"import torchvision as t; [t.datasets.ImageNet({q!r}, s) "
            f"for s in ('train', 'val')]\" writes that layout (once; a flat val/ moved aside first)")
    return data_dir


def _food101(data_dir, split, download):
    """-> (files, labels, where, classes) of Food-101 through torchvision (its download and checksum), under a lock in
    data_dir: ranks that start together download it once, the others wait and find it there."""
    try:
        os.makedirs(data_dir, exist_ok=True)
        with open(os.path.join(data_dir, ".food-101.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            ds = torchvision.datasets.Food101(data_dir, "test" if split == "val" else "train", download=download)
    except Exception as e:  # RuntimeError (missing), URLError / OSError (offline)
        how = "could not be downloaded (offline?)" if download else "is not there and --no-download is set"
        die(f"food101 {how} [{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]. Put food-101.tar.gz "
            f"(5 GB, data.vision.ee.ethz.ch) or its extracted food-101/ folder in --data-dir {data_dir}")
    if not hasattr(ds, "_image_files"):  # the file list of torchvision 0.19-0.29's Food101
        die(f"this torchvision {torchvision.__version__} keeps Food-101's file list elsewhere: use --dataset folder on "
            f"{os.path.join(data_dir, 'food-101')} sorted into train/<class>/ and val/<class>/")
    return [str(f) for f in ds._image_files], list(ds._labels), os.path.join(data_dir, "food-101"), ds.classes


def keep_classes(files, labels, classes, path):
    """--classes FILE: only the classes FILE lists (a folder name, wnid or class name a line; '#' comments), labelled
    0..K-1 in the dataset's own order."""
    try:
        wanted = {line.split("#")[0].strip() for line in open(path, errors="replace")} - {""}
    except OSError as e:
        die(f"--classes {path}: {e.strerror}")
    unknown = sorted(wanted - set(classes))
    if unknown or not wanted:
        die(f"--classes {path}: " + (f"{len(unknown)} of its {len(wanted)} classes are not classes of the dataset "
                                     f"(first: {unknown[0]}; the dataset's first is {classes[0]})" if unknown else
                                     "lists no class"))
    new = {c: i for i, c in enumerate(c for c in classes if c in wanted)}
    kept = [(f, new[classes[y]]) for f, y in zip(files, labels) if classes[y] in wanted]
    return [f for f, _ in kept], [y for _, y in kept]


# ==== Decoding, Images, tiers =========================================================================================
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


def _decoded_batches(files, size, where):
    """Image files -> batches of (uint8 (B, 3, size, size), status (B,), shorter sides (B,)), decoded in parallel by
    DataLoader workers, behind a progress bar."""
    loader = torch.utils.data.DataLoader(files, 256, num_workers=min(32, cpus()),
                                         collate_fn=functools.partial(_read, size=size))
    return tqdm(loader, desc=f"decoding {where}", leave=False, dynamic_ncols=True)


def _check_decoded(files, status, sides, where, size, skip_bad):
    """Undecodable files are an error, or skipped with a warning; says what was decoded. -> the mask of good files."""
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
    return ok


def _decode(src, skip_bad):
    """A Source decoded into host memory -> Split."""
    x, status, sides = (torch.cat(t) for t in zip(*_decoded_batches(src.files, src.size, src.where)))
    ok = _check_decoded(src.files, status, sides, src.where, src.size, skip_bad)
    return Split(x[ok], torch.as_tensor(src.labels)[ok])


class Images:
    """Decoded uint8 images (N, 3, S, S) kept off the training device: in host memory (`source`, a tensor) or in a
    decoded cache file (`source`, its path; read through np.memmap, so only the rows asked for are read and none stay
    in the process's own memory). Indexed like the tensor they stand for: len(x), x.shape, x[i:j], x[index] -> uint8
    CPU tensors; x.take(index) -> a view of those rows; x.to(device, workers) -> the same images, feeding `batches`
    on that device."""

    def __init__(self, source, n=None, size=None, rows=None, device=None, workers=0):
        self.source, self.rows, self.device, self.workers = source, rows, device, workers
        self.n, self.size = (len(source), source.shape[-1]) if isinstance(source, torch.Tensor) else (n, size)
        self.map = None  # the memmap, opened by the process that reads (each DataLoader worker its own)

    tier = property(lambda self: "cpu" if isinstance(self.source, torch.Tensor) else "disk")
    shape = property(lambda self: (len(self), 3, self.size, self.size))

    def __len__(self):
        return self.n if self.rows is None else len(self.rows)

    def __getstate__(self):  # to a worker started by spawn: it maps the file itself
        return {**self.__dict__, "map": None}

    def __getitem__(self, key):
        return self.read(torch.arange(len(self))[key] if isinstance(key, slice) else torch.as_tensor(key))

    def take(self, index):
        index = torch.as_tensor(index)
        return Images(self.source, self.n, self.size, index if self.rows is None else self.rows[index], self.device,
                      self.workers)

    def to(self, device, workers=0):
        return Images(self.source, self.n, self.size, self.rows, device, workers)

    def read(self, index, out=None):
        """Rows `index` (int64 (B,)) -> uint8 (B, 3, S, S) on the CPU, into `out` when given."""
        index = index if self.rows is None else self.rows[index]
        if isinstance(self.source, torch.Tensor):
            return self.source[index] if out is None else torch.index_select(self.source, 0, index, out=out)
        if self.map is None:
            self.map = numpy.memmap(self.source, numpy.uint8, "r", shape=(self.n, 3, self.size, self.size))
        if out is None:  # in a DataLoader worker: straight into shared memory, which the batch is sent through
            out = torch.empty((len(index), 3, self.size, self.size), dtype=torch.uint8)
            out = out.share_memory_() if torch.utils.data.get_worker_info() else out
        # mode "clip" (the indices are in range): with "raise", numpy fills `out` through a buffer of the batch's size
        numpy.take(self.map, index.numpy(), axis=0, out=out.numpy(), mode="clip")
        return out

    def batches(self, index):
        """The rows of each index[k] as a uint8 batch on self.device: from host memory gathered into pinned memory
        and copied asynchronously (the host gathers the next batch while the device runs this step); from a file read
        ahead by `workers` DataLoader worker processes (pinned by the loader)."""
        pin = self.device.type == "cuda"
        if self.tier == "cpu":
            for idx in index:
                out = torch.empty((len(idx), 3, self.size, self.size), dtype=torch.uint8, pin_memory=pin)
                yield self.read(idx, out).to(self.device, non_blocking=True)
            return
        loader = torch.utils.data.DataLoader(index, batch_size=None, collate_fn=self.read, num_workers=self.workers,
                                             pin_memory=pin)  # batch_size None: collate_fn reads each index list
        for x in loader:
            yield x.to(self.device, non_blocking=True)


def take(data, index):
    """The items `index` of a Split (Images stay on disk: a view of those rows)."""
    images = data.images.take(index) if isinstance(data.images, Images) else data.images[index]
    return Split(images, data.labels[index], None if data.masks is None else data.masks[index])


def subset(data, n, seed=0):
    """A fixed random subset of n items in their original order (a prefix of a class-sorted folder would hold only
    the first classes); the same for every method and --seed. data: a Split, or a Source, whose files are then
    chosen before anything is decoded."""
    count = len(data.files) if isinstance(data, Source) else len(data.images)
    if not n or n >= count:
        return data
    keep = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    if isinstance(data, Source):
        return data._replace(files=[data.files[i] for i in keep], labels=[data.labels[i] for i in keep])
    return take(data, keep)


def pixel_stats(images, most=10000, chunk=None):
    """Per-channel pixel (mean, std) of up to `most` evenly spaced images, read `chunk` at a time (default: 16 MB of
    them) and combined in float64 by Chan et al.'s pairwise update (a constant channel gives exactly 0)."""
    n, mean, m2 = 0, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    chunk = chunk or max(1, 2**24 // (3 * images.shape[-1] ** 2))
    for part in torch.arange(0, len(images), max(1, len(images) // most)).split(chunk):
        x = images[part.to(images.device) if isinstance(images, torch.Tensor) else part].cpu().double().div_(255)
        k, m = x[:, 0].numel(), x.mean((0, 2, 3))
        delta, n = m - mean, n + k
        m2 = m2 + x.sub_(m.view(1, 3, 1, 1)).square_().sum((0, 2, 3)) + delta**2 * (n - k) * k / n  # in place
        mean = mean + delta * k / n
    return mean.float(), (m2 / max(n - 1, 1)).sqrt().float()


def normalisation(args, images):
    """Per-channel pixel (mean, std): a resumed run's from its checkpoint, else pixel_stats of the training images,
    where a channel of one colour (std below half a grey level: normalised, every pixel would be nan, or rounding
    noise blown up 1e15-fold) is a one-line error."""
    if args.mean is not None:
        return torch.tensor(args.mean), torch.tensor(args.std)
    stats = pixel_stats(images)
    if flat := (stats[1] < 0.5 / 255).nonzero().flatten().tolist():
        where = args.data_dir if args.dataset in FOLDERS else args.dataset
        die(f"the {len(images)} pretraining images of {where} have a pixel standard deviation below half a grey level "
            f"in channel {'/'.join('RGB'[c] for c in flat)} (every pixel one colour there), so they cannot be "
            f"normalised: check the images")
    return stats


def host_memory(cgroups="/sys/fs/cgroup", own="/proc/self/cgroup"):
    """Bytes of host memory this process can have without swapping or being killed: MemAvailable (Linux; else the
    free pages), and no more than the tightest memory limit of its cgroup and their parents leaves (a SLURM job's or a
    container's: cgroup v2 memory.max - memory.current, v1 memory.limit_in_bytes - memory.usage_in_bytes)."""
    try:
        free = 1024 * int(next(line for line in open("/proc/meminfo") if line.startswith("MemAvailable")).split()[1])
    except (OSError, ValueError, StopIteration):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError):
        for line in open(own):  # "0::/path" (v2) or "N:memory,...:/path" (v1)
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers and "memory" not in controllers.split(","):
                continue
            top = cgroups if not controllers else os.path.join(cgroups, "memory")
            limit, usage = ("memory.max", "memory.current") if not controllers else (
                "memory.limit_in_bytes", "memory.usage_in_bytes")
            d = os.path.join(top, path.strip("/"))
            while True:
                with contextlib.suppress(OSError, ValueError):  # no such file here, or "max": no limit at this level
                    read = lambda name: int(open(os.path.join(d, name)).read())  # noqa: E731
                    free = min(free, read(limit) - read(usage))
                if os.path.normpath(d) == os.path.normpath(top):
                    break
                d = os.path.dirname(d)
    return free


def cpus():
    """The CPUs this process may run on (a scheduler's allocation: sched_getaffinity), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_tier(src, device):
    """--data-on auto: the first tier whose memory holds the decoded training images 4x over (GPU) or 2x over (host
    memory, of which each local rank holds a copy); decided by rank 0 for every rank, said in one line. -> 'device',
    'cpu' or 'disk'."""
    if world_rank()[1] != 0:
        return broadcast(None)
    n, side = (len(src.files), src.size) if isinstance(src, Source) else (len(src.images), src.images.shape[-1])
    need, local = n * 3 * side * side, int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    host = host_memory()
    cuda, fits_host = device.type == "cuda", need * local * 2 < host
    gpu = torch.cuda.mem_get_info(device)[0] if cuda else 0
    tier = "device" if (need * 4 < gpu if cuda else fits_host) else "cpu" if cuda and fits_host else "disk"
    gb = lambda b: f"{b / 1e9:,.3g} GB" if b < 1e11 else f"{b / 1e9:,.0f} GB"  # noqa: E731
    print(f"decoded: {n:,} images x 3 x {side} x {side} = {gb(need)} -> {tier} (" + (f"GPU {gb(gpu)} free, " if cuda
          else "") + f"host {gb(host)} available{f' for {local} ranks' if local > 1 else ''})", file=sys.stderr)
    return broadcast(tier)


def loader_workers(workers):
    """--workers, else per rank min(8, its share of the CPUs - 1), at least 1."""
    if workers is not None:
        return workers
    return max(1, min(8, cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


# ==== Decoded caches: a cache file is whole or absent =================================================================
CACHE_MAGIC = b"SSLDEC01"  # the last 8 bytes of a whole cache file


def cache_file(cache_dir, src, key, classes, source):
    """Where the cache of `key` (dataset, split, side) lives: named by them and by a digest of the folder the files
    come from, their count (--num-train) and --classes (of arrays: of their bytes, `source`), so that caches of other
    sizes, subsets, folders and seeds sit side by side."""
    where = f"{os.path.realpath(src.where)}\n{len(src.files)}" if isinstance(src, Source) else source
    ident = hashlib.sha1(f"{where}\n{classes}".encode()).hexdigest()[:8]
    return os.path.join(cache_dir, f"{key[0]}-{key[1]}-{key[2]}px-{ident}.u8")


def fingerprint(src):
    """A digest of what the cache is decoded from: every file's path relative to the dataset's folder (so that
    `./data`, `data` and a link to it are one source), label, size and mtime, and the decode size (a stat per file, no
    reading); or the bytes of images held as arrays."""
    h = hashlib.sha1()
    if isinstance(src, Source):
        h.update(f"{len(src.files)} files at {src.size} px\n".encode())
        root = src.where if os.path.isdir(src.where) else os.path.dirname(src.where)  # Tiny-ImageNet val: its labels
        for f, y in zip(src.files, src.labels):
            try:
                st = os.stat(f)
            except OSError as e:
                die(f"cannot read {f}: {e.strerror}")
            h.update(f"{os.path.relpath(f, root)}\t{y}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    else:
        h.update(memoryview(src.images.contiguous().numpy()).cast("B"))
        h.update(memoryview(src.labels.to(torch.int64).numpy()).cast("B"))
    return h.hexdigest()


def read_cache_meta(path):
    """The metadata of a cache file, once its trailer and its length say it is whole; a torn or foreign file is a
    one-line error naming it. Layout: rows (N, 3, S, S) uint8, labels (N,) int64, JSON, its length, CACHE_MAGIC."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(0, end - 16))
            tail = f.read(16)
            if len(tail) < 16 or tail[8:] != CACHE_MAGIC:
                raise ValueError("no end marker")
            m = int.from_bytes(tail[:8], "little")
            f.seek(max(0, end - 16 - m))
            meta = json.loads(f.read(m))
            if end != meta["n"] * (3 * meta["size"] ** 2 + 8) + m + 16:
                raise ValueError(f"{end} bytes, not the {meta['n']} images it says")
    except (OSError, ValueError, KeyError, TypeError) as e:  # a JSONDecodeError is a ValueError
        die(f"{path} is torn or not a decoded cache ({e}): delete it, and the next run rebuilds it")
    return meta


def cached(src, key, cache_dir, skip_bad, classes=None):
    """-> Split(Images, labels) of the cache file of `key` under cache_dir, built first when missing or when its
    source changed (fingerprint). Built under a lock (ranks and runs that start together build it once; the others
    wait) into a temporary file renamed when whole (a killed build is never taken for a cache). A cache of another
    dataset, split or size under its name is a one-line error."""
    source = fingerprint(src)
    path = cache_file(cache_dir, src, key, classes, source)
    with writing(cache_dir):
        os.makedirs(cache_dir, exist_ok=True)
        lock = open(f"{path}.lock", "a")
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {path}: another process is building it", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        meta = read_cache_meta(path) if os.path.exists(path) else None
        if meta and [meta.get(k) for k in ("dataset", "split", "size")] != list(key):
            die(f"{path} holds {meta.get('dataset')} {meta.get('split')} at {meta.get('size')} px, not {key[0]} "
                f"{key[1]} at {key[2]} px: delete it, or choose another --cache-dir")
        if meta and meta["source"] != source:
            print(f"{path}: its source changed (files, sizes or times): rebuilding it", file=sys.stderr)
        if not meta or meta["source"] != source:
            meta = _build_cache(src, path, key, source, skip_bad)
    labels = numpy.fromfile(path, numpy.int64, meta["n"], offset=meta["n"] * 3 * meta["size"] ** 2)
    return Split(Images(path, meta["n"], meta["size"]), torch.from_numpy(labels))


def _build_cache(src, path, key, source, skip_bad):
    """Decode `src` into PATH.tmp<pid> batch by batch (host memory holds one batch), then rename it to PATH. The
    caller holds the lock. What no lock holder is writing goes first: the temporary file of a build that was killed,
    and a stale cache of PATH (its source changed; a process still reading it keeps its copy until it closes it), so
    that the free space counted is the space the build can have. -> its metadata."""
    for old in glob.glob(glob.escape(path) + ".tmp*") + [path] * os.path.exists(path):
        os.remove(old)
    n = len(src.files) if isinstance(src, Source) else len(src.images)
    need, free = n * (3 * key[2] ** 2 + 8), shutil.disk_usage(os.path.dirname(path)).free
    if need > free:
        die(f"cannot write {path}: {n:,} decoded images need {need / 1e9:.3g} GB and {os.path.dirname(path)} has "
            f"{free / 1e9:.3g} GB free: choose another --cache-dir, or --data-on device / cpu")
    tmp = f"{path}.tmp{os.getpid()}"
    with writing(path, tmp):
        with open(tmp, "wb") as f:
            if isinstance(src, Source):
                parts = []
                for x, status, sides in _decoded_batches(src.files, src.size, src.where):
                    f.write(memoryview((x if bool((status == 0).all()) else x[status == 0]).numpy()))
                    parts.append((status, sides))
                try:
                    ok = _check_decoded(src.files, *(torch.cat(t) for t in zip(*parts)), src.where, src.size, skip_bad)
                except SystemExit:
                    os.remove(tmp)
                    raise
                labels = torch.as_tensor(src.labels)[ok]
            else:
                for i in range(0, n, 1024):
                    f.write(src.images[i: i + 1024].contiguous().numpy().tobytes())
                labels = src.labels
            f.write(labels.to(torch.int64).numpy().tobytes())
            meta = {"dataset": key[0], "split": key[1], "size": key[2], "n": len(labels), "source": source,
                    "from": src.where if isinstance(src, Source) else key[0]}
            blob = json.dumps(meta).encode()
            f.write(blob + len(blob).to_bytes(8, "little") + CACHE_MAGIC)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    print(f"wrote {path} ({meta['n']:,} images at {key[2]} px, {os.path.getsize(path) / 1e9:.3g} GB)", file=sys.stderr)
    return meta


# ==== The run folder, checkpoints, the log, signals ===================================================================
def claim_folder(args, rank):
    """-> (the run folder, its open .lock file flock-ed while this process lives; None on ranks > 0, which take rank
    0's folder). A default folder that holds a run or is locked is passed over for -2, -3, ...; an explicit or resumed
    folder that is locked or holds another run is an error. Temporary files of a run killed while saving are removed."""
    folder, lock = None, None
    if rank == 0:
        default = os.path.join("runs", f"{args.method}-{args.dataset}-{args.arch}")
        folders = [args.out_dir] if args.out_dir else itertools.chain(
            [default], (f"{default}-{k}" for k in itertools.count(2)))
        with writing(f"the run folder {args.out_dir or 'runs/'}"):
            for d in folders:
                os.makedirs(d, exist_ok=True)
                lock = open(os.path.join(d, ".lock"), "w")
                with contextlib.suppress(BlockingIOError):  # locked: a live run
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    here = args.resume and os.path.realpath(os.path.dirname(args.resume)) == os.path.realpath(d)
                    if here or not any(os.path.exists(os.path.join(d, f)) for f in ("last.pt", "log.jsonl")):
                        folder = d
                        break
                lock.close()
                if args.out_dir:
                    die(f"--out-dir {d} holds another run, or a running process uses it: continue it with --resume "
                        f"(once it has stopped), or choose a new --out-dir")
            for tmp in glob.glob(os.path.join(folder, "*.tmp")):  # left by a run killed while saving
                os.remove(tmp)
        print(f"run folder: {folder}", file=sys.stderr)
    return broadcast(folder), lock  # every rank uses rank 0's folder


def write_checkpoint(out_dir, state, save_every=0):
    """OUT_DIR/last.pt (and every `save_every` epochs epochNNNN.pt), then the last record's line appended to
    OUT_DIR/log.jsonl. -> (path, epoch) of the checkpoint."""
    last, done = os.path.join(out_dir, "last.pt"), state["epoch"]
    save_checkpoint(last, state)
    if save_every and done % save_every == 0:
        save_checkpoint(os.path.join(out_dir, f"epoch{done:04d}.pt"), state)
    log = os.path.join(out_dir, "log.jsonl")
    with writing(log), open(log, "a") as f:
        f.write(json.dumps(state["log"][-1]) + "\n")
    return last, done


def restart_note(planned, epochs, log, lr):
    """The line a resumed run with another --epochs prints: its schedules restart over the new total."""
    last = f"{log[-1]['lr']:.3g}" if log and "lr" in log[-1] else "?"
    return (f"note: --epochs {epochs} for a run planned for {planned}: every schedule (learning rate, and the method's "
            f"own) is recomputed over {epochs} epochs, so the learning rate goes from {last} to about {lr:.3g} (a warm "
            f"restart, not the rest of one decay)")


def stop_message(signum, done, total, saved, mid_epoch):
    """The line a stopped run prints: the epoch reached, the last checkpoint and the command that continues it."""
    launch = f"torchrun --nproc_per_node={world_rank()[0]}" if dist.is_initialized() else "python"
    where = f"in epoch {done + 1} of {total}" if mid_epoch else f"after epoch {done} of {total}"
    return f"\n{signal.Signals(signum).name}: stopped {where}; " + (
        f"the last checkpoint is {saved[0]} (epoch {saved[1]}); continue with: {launch} {shlex.quote(sys.argv[0])} "
        f"--resume {shlex.quote(saved[0])}" if saved else "no epoch has finished: start it again")


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


# ==== Batched image operations: torchvision's transforms, for a whole batch on its device =============================
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


# ==== Evaluation: features, nearest neighbours, votes =================================================================
@torch.no_grad()
def extract_features(backbone, data, stats, device, size=None, rows=None, batch_size=512):
    """Backbone features (eval mode) of the images `rows` (a range; default all) of `data`: uint8, no augmentation,
    normalised with `stats`; the centre `size` px of larger squares (ImageNet's 224 of 256: DINO's resize 256, centre
    crop 224). -> (features, labels) of those rows."""
    mean, std = (s.view(1, 3, 1, 1).to(device) for s in stats)
    rows, was, feats = range(len(data.labels)) if rows is None else rows, backbone.training, []
    backbone.eval()
    for i in range(rows.start, rows.stop, batch_size) or [rows.start]:  # no rows: one empty batch, (0, D) features
        x = data.images[i: min(i + batch_size, rows.stop)].to(device)
        x = centre(x, size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda_paths(device)):
            feats.append(backbone((x.float() / 255 - mean) / std).float())
    backbone.train(was)
    return torch.cat(feats), data.labels[rows.start: rows.stop].to(device)


@torch.no_grad()
def nearest(train_f, train_y, test_f, k, batch_size=1024):
    """The k largest cosine similarities of each test feature to the train features, and those rows' labels, (Q, k)
    each; with fewer than k train rows the rest is padded with similarity -inf (a vote of 0)."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    sims, labels = [], []
    for i in range(0, len(test_f), batch_size):
        sim, idx = (test_f[i: i + batch_size] @ train_f.T).topk(min(k, len(train_f)), dim=1)  # (b, k)
        sims, labels = sims + [sim], labels + [train_y[idx]]
    pad = k - min(k, len(train_f))
    return F.pad(torch.cat(sims), (0, pad), value=-math.inf), F.pad(torch.cat(labels), (0, pad))


@torch.no_grad()
def vote(sim, labels, test_y, T, classes, batch_size=1024):
    """Each neighbour (cosine similarity s, label) votes exp(s / T) for its class. -> (top1, top5) in percent."""
    correct1 = correct5 = 0
    for i in range(0, len(sim), batch_size):
        s, y = sim[i: i + batch_size], test_y[i: i + batch_size, None]
        votes = torch.zeros(len(s), classes, device=s.device).scatter_add_(1, labels[i: i + batch_size], (s / T).exp())
        pred = votes.topk(min(5, classes), dim=1).indices
        correct1 += (pred[:, :1] == y).sum().item()
        correct5 += (pred == y).any(1).sum().item()
    return 100 * correct1 / len(test_y), 100 * correct5 / len(test_y)
