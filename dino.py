"""DINO: Emerging Properties in Self-Supervised Vision Transformers (Caron et al., 2021, arXiv 2104.14294).

Self-distillation with no labels. A student g_s sees every crop (2 global + L local), a teacher g_t,
the exponential moving average of the student, sees the 2 global crops. Outputs are K-way
distributions, the teacher's centred and sharpened:

    P_t = softmax((g_t(x) - c) / tau_t),   P_s = softmax(g_s(x') / tau_s)                     (Eq. 1)
    L = 1/n_pairs sum_{t in globals} sum_{s in crops, s != t} H(P_t, P_s),  H(a, b) = -a.log b  (Eq. 3)

and c <- m c + (1 - m) mean_batch g_t (centring, Eq. 4). Centring prevents one dimension from
dominating, sharpening (tau_t < tau_s) prevents the uniform collapse; the teacher is updated as
theta_t <- lambda theta_t + (1 - lambda) theta_s (paper: lambda a cosine from 0.996 to 1).

Defaults (two recipes, RECIPES below). ViT: the paper's (AdamW, 3-layer head without BN, teacher temperature 0.04,
gradient clipping 3, last layer frozen for an epoch) with K = 4096, not tuned here. ResNet, at CIFAR scale: SGD lr
0.12 (x batch/256) with constant wd 5e-4, a 2-layer head with BatchNorm and K = 2048 (lightly's CIFAR-10 benchmark),
teacher temperature 0.02 from the start, no clipping, no frozen layer. Both: teacher momentum 0.99, constant (the
teacher averages ~100 steps); local crops only from 64 px up. Chosen on tin100-32 (5,000 training images, 10 epochs,
batch 128, ResNet-18 width 16, kNN k=20 against those 5,000 images, 2-core CPU), where SimCLR's defaults reach 7.44%
(random init 3.44%): SGD 0.06, a 3-layer head, K 4096, teacher temperature 0.04, momentum 0.99 cosine to 1 and 2+6
crops 4.0%, with 2 crops 3.8%; SGD 0.12, K 2048, no clipping, no frozen layer 4.0%; teacher temperature 0.02 instead
of 0.04 5.0% (the 0.04 teacher stays near uniform, entropy 7.0 of ln 2048 = 7.6); constant momentum 0.99 instead of a
cosine to 1 5.6%; 2-layer head 6.0% (the default, 0.81x SimCLR). No better: lr 0.3 5.7%, Sinkhorn centring (DINOv2;
--centering sinkhorn) 5.4%, 2+6 crops at teacher temperature 0.02 4.4%, AdamW 4.3%, momentum 0.9 (unstable) 4.2%. At
20 epochs the gap stays (SimCLR 9.3%, DINO with the 3-layer head 7.2%): at these budgets DINO learns more slowly than
SimCLR; the HyDeS paper has them level on CIFAR-10 after 200 epochs.

Run:     python dino.py --dataset cifar10      (ResNet-18 recipe; --arch vit_tiny for the ViT one)
Offline: python dino.py --dataset synthetic --width 16 --epochs 20 --device cpu
Result:  tin100-32, 5,000 training images, 10 epochs, batch 128, ResNet-18 width 16, 2-core CPU, defaults: kNN k=20
         5.72% / k=200 7.68%, linear 7.86% (SimCLR 8.68 / 9.72 / 12.34, random init 4.28 / 4.42 / 5.14; README
         table, kNN memory 10,000 images): 0.66x SimCLR at k=20. CIFAR-10 not yet run.
"""
import argparse
import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common


# Two recipes; every flag left unset takes its backbone's value. ResNet: CIFAR-scale (32-96 px, tens of thousands of
# images, 20-400 steps an epoch), chosen on tin100-32 (see Result) after the official ResNet-50 README recipe and
# lightly's CIFAR-10 benchmark. ViT: the paper's ImageNet recipe, except K and the teacher momentum.
RECIPES = {
    "resnet": dict(optimizer="sgd", lr=0.12, wd=5e-4, wd_end=None, bn_head=True, head_layers=2, out_dim=2048,
                   clip_grad=0.0, freeze_last_layer=0, warmup_teacher_temp=0.02, teacher_temp=0.02),
    "vit": dict(optimizer="adamw", lr=5e-4, wd=0.04, wd_end=0.4, bn_head=False, head_layers=3, out_dim=4096,
                clip_grad=3.0, freeze_last_layer=1, warmup_teacher_temp=0.04, teacher_temp=0.04),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=common.HelpFormatter)
    common.add_common_args(p)
    common.add_crop_args(p, global_crops=2, local_crops=None, global_scale=None, notes=dict(
        local_crops="default: 6 from 64 px up (paper: 6 or 10), 0 at 32 px, where a 16-px crop often misses the object",
        global_scale="default: (0.4, 1) with local crops (paper), (0.08, 1) without (official: 0.14)"))
    a = p.add_argument
    r, v = RECIPES["resnet"], RECIPES["vit"]
    a("--out-dim", type=int, default=None, help=f"K, prototypes of the head (ResNet {r['out_dim']}, ViT {v['out_dim']}; "
      "paper: 65536 on ImageNet, which costs time and learns no better on CIFAR-sized data)")
    a("--bn-head", action=argparse.BooleanOptionalAction, default=None,
      help="BatchNorm after the head's hidden layers (official use_bn_in_head; paper: off). Default: on for "
           "ResNets (at init their head outputs are near-identical without it), off for ViTs")
    a("--head-layers", type=int, default=None, help="linear layers of the head's MLP, bottleneck output included "
      f"(official nlayers; paper: 3). ResNet {r['head_layers']} (as lightly's CIFAR-10 runs), ViT {v['head_layers']}")
    a("--norm-last-layer", action=argparse.BooleanOptionalAction, default=True,
      help="fix the weight-normalised last layer's norm to 1 (paper: on; off can help ViT-S stability)")
    a("--momentum-teacher", type=float, default=0.99,
      help="teacher EMA momentum m at the start (paper: 0.996). The teacher averages the student over ~1/(1-m) steps: "
           "0.996 is ~250 steps, 0.2 epoch of ImageNet at batch 1024 but 6 epochs of a 5k-image set at batch 128; "
           "pick m so that 1/(1-m) is a fraction of an epoch's steps, or at most a few hundred steps")
    a("--momentum-teacher-end", type=float, default=0.99, help="final teacher momentum of a cosine from "
      "--momentum-teacher (paper: 1; default: constant, as lightly's CIFAR-10 runs, which learned faster here)")
    a("--warmup-teacher-temp", type=float, default=None,
      help=f"initial teacher temperature (paper: 0.04; ResNet {r['warmup_teacher_temp']}, ViT {v['warmup_teacher_temp']})")
    a("--teacher-temp", type=float, default=None, help="teacher temperature after warm-up (paper: 0.04, up to 0.07; "
      f"ResNet {r['teacher_temp']}: sharper targets learned faster at CIFAR scale; ViT {v['teacher_temp']})")
    a("--warmup-teacher-temp-epochs", type=int, default=30, help="linear teacher-temperature warm-up (30)")
    a("--student-temp", type=float, default=0.1, help="student temperature (0.1)")
    a("--center-momentum", type=float, default=0.9, help="EMA of the teacher-output centre (0.9)")
    a("--centering", default="mean", choices=("mean", "sinkhorn"),
      help="teacher centring: mean (DINO: subtract an EMA of the batch mean) or sinkhorn (DINOv2: Sinkhorn-Knopp)")
    a("--freeze-last-layer", type=int, default=None,
      help=f"epochs with the head's last layer frozen (paper: 1; ResNet {r['freeze_last_layer']}, ViT {v['freeze_last_layer']})")
    a("--optimizer", default=None, choices=("sgd", "adamw"),
      help="default: sgd (momentum 0.9) for ResNets, as the official README's ResNet-50 recipe; adamw for ViTs (paper)")
    a("--wd-end", type=float, default=None, help="weight decay cosine from --wd to this (paper ViT: 0.04 -> 0.4; "
      "ResNet: constant)")
    a("--clip-grad", type=float, default=None, help="per-parameter gradient-norm clipping, 0 disables (paper: 3; "
      f"ResNet {r['clip_grad']}, ViT {v['clip_grad']})")
    a("--min-lr", type=float, default=1e-6, help="final learning rate of the cosine (1e-6)")
    # --lr (x batch/256) and --wd: ResNet sgd 0.12 and 5e-4 constant (lightly's CIFAR-10; official ResNet-50: 0.03,
    # 1e-4), ViT adamw 5e-4 and 0.04 cosine to 0.4 (paper)
    p.set_defaults(method="dino", lr=None, wd=None, batch_size=256, epochs=100)
    args = p.parse_args(argv)
    recipe = dict(RECIPES["vit" if args.arch.startswith("vit") else "resnet"])
    if args.optimizer is not None:  # an explicit optimiser brings its own lr and weight decay
        chosen = RECIPES["vit" if args.optimizer == "adamw" else "resnet"]
        recipe.update({k: chosen[k] for k in ("optimizer", "lr", "wd", "wd_end")})
    for name, value in recipe.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.wd_end is None:  # sgd: constant weight decay
        args.wd_end = args.wd
    if args.head_layers < 1:
        common.die(f"--head-layers must be >= 1, got {args.head_layers}")
    if args.out_dim < 1:
        common.die(f"--out-dim must be >= 1, got {args.out_dim}")
    if min(args.teacher_temp, args.warmup_teacher_temp, args.student_temp) <= 0:
        common.die("temperatures must be > 0")
    if not 0 <= args.momentum_teacher <= args.momentum_teacher_end <= 1:
        common.die(f"need 0 <= --momentum-teacher <= --momentum-teacher-end <= 1, got {args.momentum_teacher} and "
                   f"{args.momentum_teacher_end}")
    common.check_args(args)
    if args.global_crops != 2:
        common.die(f"DINO's teacher sees exactly 2 global crops (--global-crops 2), got {args.global_crops}")
    return args


def resolve_crops(args, image_size):
    """Multi-crop only where a local crop (half the image side) still shows the object: from 64 px up."""
    if args.local_crops is None:
        args.local_crops = 6 if image_size >= 64 else 0
    if args.global_scale is None:
        args.global_scale = (0.4, 1.0) if args.local_crops else (0.08, 1.0)


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------
class DINOHead(nn.Module):
    """3-layer MLP (hidden 2048, [BN,] GELU) -> bottleneck 256 -> L2-normalise -> weight-normalised linear to K.

    Weight normalisation written out: W = g * V / ||V|| row-wise; with norm_last_layer, g = 1 is fixed."""

    def __init__(self, in_dim, out_dim, hidden=2048, bottleneck=256, norm_last_layer=True, bn=False, layers=3):
        super().__init__()
        norm = (lambda: nn.BatchNorm1d(hidden)) if bn else nn.Identity  # noqa: E731  (official use_bn_in_head)
        dims = [in_dim] + [hidden] * (layers - 1)  # official nlayers: Linear (-> [BN] -> GELU) x (layers - 1)
        self.mlp = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), norm(), nn.GELU())],
                                 nn.Linear(dims[-1], bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.v = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.trunc_normal_(self.v, std=0.02)
        self.g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def forward(self, x):  # (N, in_dim) -> (N, K) logits
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, self.g * F.normalize(self.v, dim=1))


@torch.no_grad()
def sinkhorn(logits, temp, iters=3):
    """Sinkhorn-Knopp centring (DINOv2): the soft assignment Q = exp(logits / temp) of B rows to K prototypes
    (B, K), rescaled alternately so that every prototype receives 1/K of the mass and every row 1/B, over the
    whole batch across ranks; returned with rows summing to 1. A balanced, sharp target from the first step."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    top = logits.max()
    if dist.is_initialized():
        dist.all_reduce(top, op=dist.ReduceOp.MAX)  # one stabilising shift for the whole batch
    q = torch.exp((logits - top) / temp)  # (B, K)
    B, K = q.shape[0] * world, q.shape[1]

    def total(x):
        if dist.is_initialized():
            dist.all_reduce(x)
        return x
    q /= total(q.sum())
    for _ in range(iters):
        q /= total(q.sum(0, keepdim=True)) * K  # each prototype: 1/K
        q /= q.sum(1, keepdim=True) * B  # each row: 1/B
    return q * B


class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher and student distributions over crop pairs."""

    def __init__(self, out_dim, warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=30,
                 epochs=100, student_temp=0.1, center_momentum=0.9, centering="mean"):
        super().__init__()
        self.student_temp, self.center_momentum, self.centering = student_temp, center_momentum, centering
        self.register_buffer("center", torch.zeros(1, out_dim))
        warm = torch.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
        self.teacher_temps = torch.cat([warm, torch.full((max(0, epochs - warmup_teacher_temp_epochs),), teacher_temp)])

    def teacher_temp(self, epoch):
        return self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)].item()

    @common.fp32
    @torch.no_grad()
    def targets(self, teacher_out, epoch):
        """P_t for each teacher crop: centred and sharpened (Eq. 1), or Sinkhorn-Knopp balanced."""
        tau_t = self.teacher_temp(epoch)
        if self.centering == "sinkhorn":
            return list(sinkhorn(torch.cat(teacher_out), tau_t).chunk(len(teacher_out)))
        return [F.softmax((t - self.center) / tau_t, dim=-1) for t in teacher_out]  # Eq. (1)

    @common.fp32  # fp32 even when called under autocast
    def forward(self, student_out, teacher_out, epoch):
        """student_out: list of (N, K) logits for every crop, globals first; teacher_out: the 2 globals."""
        p_t = self.targets(teacher_out, epoch)
        log_p_s = [F.log_softmax(s / self.student_temp, dim=-1) for s in student_out]
        total, pairs = 0.0, 0
        for it, q in enumerate(p_t):
            for iv, lp in enumerate(log_p_s):
                if iv == it:  # the same crop seen by both networks: skipped
                    continue
                total = total + (-q * lp).sum(-1).mean()  # H(P_t, P_s), mean over the batch (Eq. 3)
                pairs += 1
        self.update_center(teacher_out)
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_out):  # Eq. (4): c <- m c + (1 - m) batch mean, over all ranks
        t = torch.cat(teacher_out).float()
        batch_sum, count = t.sum(0, keepdim=True), torch.tensor(float(len(t)), device=t.device)
        if dist.is_initialized():
            dist.all_reduce(batch_sum), dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """theta_t <- momentum * theta_t + (1 - momentum) * theta_s, all parameters in one fused (foreach) call."""
    torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1 - momentum)


@torch.no_grad()
def teacher_entropy(p_t):
    """Mean entropy H of the teacher targets P_t (list of (N, K)) and KL(P_t || uniform) = log K - H, the two
    collapse signals DINO tracks, as a (2,) tensor on the device (no host sync)."""
    p = torch.cat(p_t)
    h = -torch.special.xlogy(p, p).sum(-1).mean()
    return torch.stack([h, math.log(p.shape[1]) - h])


class Net(nn.Module):
    def __init__(self, backbone, feat_dim, args):
        super().__init__()
        self.backbone = backbone
        self.head = DINOHead(feat_dim, args.out_dim, norm_last_layer=args.norm_last_layer, bn=args.bn_head,
                             layers=args.head_layers)

    def forward(self, views):  # one backbone pass per crop size, one head pass -> list of (N, K)
        n = views[0].shape[0]
        sizes = sorted({v.shape[-1] for v in views}, reverse=True)
        feats = torch.cat([self.backbone(torch.cat([v for v in views if v.shape[-1] == s])) for s in sizes])
        return list(self.head(feats).split(n))


class DINO(nn.Module):
    """Student, EMA teacher (no gradient) and the loss with its centre, in one module so one state_dict
    (and one checkpoint) holds all three."""

    def __init__(self, backbone, feat_dim, args):
        super().__init__()
        self.student = Net(backbone, feat_dim, args)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.criterion = DINOLoss(args.out_dim, args.warmup_teacher_temp, args.teacher_temp,
                                  args.warmup_teacher_temp_epochs, args.epochs, args.student_temp, args.center_momentum,
                                  args.centering)

    def forward(self, views):
        with torch.no_grad():
            teacher_out = self.teacher(views[:2])  # the teacher sees the 2 global crops
        return self.student(views), teacher_out


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train(args):
    device = common.setup(args)
    images, memory, val, stats = common.load_data(args, device)
    resolve_crops(args, images.shape[-1])
    aug = common.MultiCrop(images.shape[-1], *stats, args.global_crops, args.local_crops, args.global_scale,
                           args.local_scale, backend=args.aug)
    backbone, feat_dim = common.build_backbone(args.arch, images.shape[-1], args.width)
    model = DINO(backbone, feat_dim, args).to(device, memory_format=torch.channels_last)
    model = common.wrap_ddp(model, device, args)
    dino = getattr(model, "module", model)
    base_lr = args.lr * args.batch_size / 256  # linear scaling rule
    opt = common.optimizer(args.optimizer, dino.student, base_lr, args.wd, device)
    start = common.resume(args, model, opt)
    steps = len(images) // args.batch_size
    total_steps = args.epochs * steps
    for epoch in range(start, args.epochs):
        g, sums = common.aug_generator(args, device, epoch), torch.zeros(3, device=device)
        for i, x in enumerate(common.batches(images, args.batch_size, epoch, args.seed, f"epoch {epoch + 1}")):
            step = epoch * steps + i
            opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = common.cosine(
                step, total_steps, base_lr, args.min_lr, args.warmup_epochs * steps)
            opt.param_groups[0]["weight_decay"] = common.cosine(step, total_steps, args.wd, args.wd_end)
            views = aug(x, g)
            with common.autocast(args, device):
                student_out, teacher_out = model(views)
            diag = teacher_entropy(dino.criterion.targets(teacher_out, epoch))  # before the loss moves the centre
            loss = dino.criterion(student_out, teacher_out, epoch)  # fp32 inside; updates the centre
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DINO's loss needs no cross-rank gather: DDP's gradient mean is exact
            if args.clip_grad:  # per-parameter clipping, as in the DINO code
                grads = [p.grad for p in dino.student.parameters() if p.grad is not None]
                for grad, norm in zip(grads, torch._foreach_norm(grads)):
                    grad.mul_((args.clip_grad / (norm + 1e-6)).clamp(max=1.0))
            if epoch < args.freeze_last_layer:  # the last layer stays at its init during epoch 1
                dino.student.head.v.grad = dino.student.head.g.grad = None
            opt.step()
            ema_update(dino.teacher, dino.student,
                       common.cosine(step, total_steps, args.momentum_teacher, args.momentum_teacher_end))
            sums += torch.cat([loss.detach()[None], diag])  # on the device: no host sync per step
            common.check_finite(sums[0], epoch, i)
        m = (sums / steps).tolist()  # the one host sync of the epoch
        common.end_epoch(args, epoch, model, dino.teacher.backbone, opt, (memory, val, stats), device,
                         {"loss": m[0], "teacher_entropy": m[1], "kl_uniform": m[2], "lr": opt.param_groups[0]["lr"]})


if __name__ == "__main__":
    train(get_args())
