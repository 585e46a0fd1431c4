"""DINO: Emerging Properties in Self-Supervised Vision Transformers (Caron et al., 2021, arXiv 2104.14294).

Self-distillation with no labels. A student g_s sees every crop (2 global + L local), a teacher g_t,
the exponential moving average of the student, sees the 2 global crops. Outputs are K-way
distributions, the teacher's centred and sharpened:

    P_t = softmax((g_t(x) - c) / tau_t),   P_s = softmax(g_s(x') / tau_s)                     (Eq. 1)
    L = 1/n_pairs sum_{t in globals} sum_{s in crops, s != t} H(P_t, P_s),  H(a, b) = -a.log b  (Eq. 3)

and c <- m c + (1 - m) mean_batch g_t (centring, Eq. 4). Centring prevents one dimension from
dominating, sharpening (tau_t < tau_s) prevents the uniform collapse; the teacher is updated as
theta_t <- lambda theta_t + (1 - lambda) theta_s (paper: lambda a cosine from 0.996 to 1).

Run:     python dino.py --dataset cifar10      (ResNet-18 recipe; --arch vit_tiny for the ViT one)
Offline: python dino.py --dataset synthetic --width 16 --epochs 20 --device cpu
Differs: two recipes (RECIPES; every flag unset takes its backbone's value). ViT: the paper's (AdamW, 3-layer head
without BN, teacher temperature 0.04, gradient clipping 3, last layer frozen for an epoch) with K = 4096. ResNet, for
CIFAR-scale data (tens of thousands of images, 20-400 steps an epoch): lightly's CIFAR-10 benchmark recipe, SGD
with constant weight decay, a 2-layer head with BatchNorm, K = 2048, teacher temperature 0.02, no clipping, no
frozen layer. Both: teacher momentum 0.99, constant (the paper's 0.996 -> 1 averages ~250 steps, several epochs of
a small dataset), and local crops only from 64 px up. The tuning runs that chose the ResNet recipe and the results
are in docs/results.md.
"""
import argparse
import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common


# Every flag left unset takes its backbone's value. ResNet: CIFAR scale (docs/results.md: how it was
# chosen); ViT: the paper's.
RECIPES = {  # wd_end None: constant weight decay
    "resnet": dict(optimizer="sgd", lr=0.12, wd=5e-4, wd_end=None, bn_head=True, head_layers=2, out_dim=2048,
                   clip_grad=0.0, freeze_last_layer=0, warmup_teacher_temp=0.02, teacher_temp=0.02),
    "vit": dict(optimizer="adamw", lr=5e-4, wd=0.04, wd_end=0.4, bn_head=False, head_layers=3, out_dim=4096,
                clip_grad=3.0, freeze_last_layer=1, warmup_teacher_temp=0.04, teacher_temp=0.04),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=common.HelpFormatter)
    a, R = p.add_argument_group("DINO").add_argument, " (default: the backbone's recipe)"
    a("--out-dim", type=common.COUNT, help="K, prototypes of the head (paper: 65536 on ImageNet)" + R)
    a("--bn-head", action=argparse.BooleanOptionalAction, help="BatchNorm in the head (official use_bn_in_head)" + R)
    a("--head-layers", type=common.COUNT, help="linear layers of the head's MLP (official nlayers; paper: 3)" + R)
    a("--norm-last-layer", action=argparse.BooleanOptionalAction, default=True,
      help="fix the weight-normalised last layer's norm to 1 (paper: on; off can help ViT-S stability)")
    a("--momentum-teacher", type=common.FRACTION, default=0.99, help="teacher EMA momentum m (paper: 0.996). The "
      "teacher averages ~1/(1-m) steps: keep that a fraction of an epoch, at most a few hundred steps")
    a("--momentum-teacher-end", type=common.FRACTION, help="final m of a cosine from --momentum-teacher (paper: 1; "
      "default: --momentum-teacher, constant)")
    a("--warmup-teacher-temp", type=common.POSITIVE, help="initial teacher temperature (paper: 0.04)" + R)
    a("--teacher-temp", type=common.POSITIVE, help="teacher temperature after the warm-up (paper: 0.04-0.07)" + R)
    a("--warmup-teacher-temp-epochs", type=common.NONNEG_INT, default=30, help="linear teacher-temperature warm-up")
    a("--student-temp", type=common.POSITIVE, default=0.1, help="student temperature (paper: 0.1)")
    a("--center-momentum", type=common.FRACTION, default=0.9, help="EMA of the teacher-output centre (paper: 0.9)")
    a("--centering", default="mean", choices=("mean", "sinkhorn"),
      help="teacher centring: mean (DINO: subtract an EMA of the batch mean) or sinkhorn (DINOv2: Sinkhorn-Knopp)")
    a("--freeze-last-layer", type=common.NONNEG_INT, help="epochs with the head's last layer frozen (paper: 1)" + R)
    a("--wd-end", type=common.NONNEG, help="weight decay cosine from --wd to this (paper ViT: 0.4; default: the "
      "backbone's recipe, constant for ResNets)")
    a("--clip-grad", type=common.NONNEG, help="per-parameter gradient-norm clipping, 0 off (paper: 3)" + R)
    a("--min-lr", type=common.NONNEG, default=1e-6, help="final learning rate of the cosine (paper: 1e-6)")
    common.add_common_args(p, lr_batch=256, recipe="the backbone's recipe, RECIPES", crops=True)
    p.set_defaults(method="dino", batch_size=256, epochs=100, global_crops=2)  # local crops, scales: resolve_crops
    args = common.parse(p, argv)
    recipe = dict(RECIPES["vit" if args.arch.startswith("vit") else "resnet"])
    if args.optimizer is not None:  # an explicit optimiser brings its own lr and weight decay
        recipe.update({k: RECIPES["vit" if args.optimizer == "adamw" else "resnet"][k] for k in ("lr", "wd", "wd_end")})
    given = vars(args)  # the flags not given take the recipe's values
    given.update({name: value for name, value in recipe.items() if given[name] is None})
    args.wd_end = args.wd if args.wd_end is None else args.wd_end
    if args.momentum_teacher_end is None:  # the paper's value given alone is a constant momentum
        args.momentum_teacher_end = args.momentum_teacher
    if args.momentum_teacher > args.momentum_teacher_end:
        common.die(f"need --momentum-teacher <= --momentum-teacher-end, got {args.momentum_teacher} and "
                   f"{args.momentum_teacher_end}")
    if args.global_crops != 2:
        common.die(f"DINO's teacher sees exactly 2 global crops (--global-crops 2), got {args.global_crops}")
    return args


def crops(args, image_size):
    """Multi-crop only where a local crop (half the image side) still shows the object: from 64 px up. -> the local
    crop count and global scale, for Run.resolve."""
    local = (6 if image_size >= 64 else 0) if args.local_crops is None else args.local_crops
    scale = ((0.4, 1.0) if local else (0.08, 1.0)) if args.global_scale is None else args.global_scale
    return dict(local_crops=local, global_scale=scale)


# ----------------------------------------------------------------------------------------------
# The method. Copy with torch alone: DINOHead, sinkhorn, DINOLoss, ema_update, clip_gradients
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
    """Cross-entropy between centred, sharpened teacher and student distributions over crop pairs (Eqs. 1, 3, 4)."""

    def __init__(self, out_dim, warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=30,
                 epochs=100, student_temp=0.1, center_momentum=0.9, centering="mean"):
        super().__init__()
        self.student_temp, self.center_momentum, self.centering = student_temp, center_momentum, centering
        self.register_buffer("center", torch.zeros(1, out_dim))
        warm = torch.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
        self.teacher_temps = torch.cat([warm, torch.full((max(0, epochs - warmup_teacher_temp_epochs),), teacher_temp)])

    def teacher_temp(self, epoch):
        return self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)].item()

    @torch.autocast("cuda", enabled=False)  # fp32 maths even when called under autocast
    @torch.autocast("cpu", enabled=False)
    def forward(self, student_out, teacher_out, epoch):
        """student_out: list of (N, K) logits for every crop, globals first; teacher_out: the 2 globals' (N, K).
        Returns (loss, P_t); updates the centre (all-reduced across ranks)."""
        up = lambda x: x.to(torch.promote_types(x.dtype, torch.float32))  # noqa: E731  (half precision -> fp32)
        teacher_out = [up(t).detach() for t in teacher_out]
        tau_t = self.teacher_temp(epoch)
        if self.centering == "sinkhorn":
            p_t = list(sinkhorn(torch.cat(teacher_out), tau_t).chunk(len(teacher_out)))
        else:
            p_t = [F.softmax((t - self.center) / tau_t, dim=-1) for t in teacher_out]  # Eq. (1), teacher
        log_p_s = [F.log_softmax(up(s) / self.student_temp, dim=-1) for s in student_out]  # Eq. (1), student
        pairs = [(q, lp) for it, q in enumerate(p_t) for iv, lp in enumerate(log_p_s) if iv != it]  # not the same crop
        loss = sum((-q * lp).sum(-1).mean() for q, lp in pairs) / len(pairs)  # Eq. (3): mean H(P_t, P_s)
        self.update_center(teacher_out)
        return loss, p_t

    @torch.no_grad()
    def update_center(self, teacher_out):  # Eq. (4): c <- m c + (1 - m) batch mean, over all ranks
        t = torch.cat(teacher_out)
        batch_sum, count = t.sum(0, keepdim=True), torch.tensor(float(len(t)), device=t.device, dtype=t.dtype)
        if dist.is_initialized():
            dist.all_reduce(batch_sum), dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """theta_t <- momentum * theta_t + (1 - momentum) * theta_s, parameter by parameter."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s, 1 - momentum)


@torch.no_grad()
def clip_gradients(model, clip):
    """Per-parameter clipping, as in the DINO code: each gradient with norm above `clip` is scaled to norm `clip`."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_((clip / (p.grad.norm() + 1e-6)).clamp(max=1.0))


@torch.no_grad()
def teacher_entropy(p_t):
    """Of the teacher targets P_t (list of (N, K)): their mean entropy H(P_t) and KL(P_t || uniform) = log K - H, the
    two collapse signals DINO tracks, and the entropy H(mean_i P_t,i) of the batch-mean target, the entropy term of
    the ER bound (Rodriguez-Galvez et al. 2023; its reconstruction term is the loss, the cross-entropy H(P_t, P_s)).
    -> a (3,) tensor on the device (no host sync); the batch mean is this rank's."""
    p = torch.cat(p_t)
    h, p_bar = -torch.special.xlogy(p, p).sum(-1).mean(), p.mean(0)
    return torch.stack([h, math.log(p.shape[1]) - h, -torch.special.xlogy(p_bar, p_bar).sum()])


class Net(nn.Module):
    def __init__(self, backbone, feat_dim, args):
        super().__init__()
        self.backbone = backbone
        self.head = DINOHead(feat_dim, args.out_dim, norm_last_layer=args.norm_last_layer, bn=args.bn_head,
                             layers=args.head_layers)

    def forward(self, views):  # one backbone pass per crop size, one head pass -> list of (N, K)
        return list(self.head(common.forward_crops(self.backbone, views)).split(len(views[0])))


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
    run = common.Run(args)  # device, run folder and its lock, signal handlers, seed
    data = common.load_data(args, run.device)  # uint8 images where --data-on says, kNN splits, statistics
    args = run.resolve(data, **crops(args, data.size))  # + the crops: printed once, kept in every checkpoint
    aug = common.MultiCrop(args.image_size, data.stats, args.global_crops, args.local_crops, args.global_scale,
                           args.local_scale)
    backbone, feat_dim = common.build_backbone(args.arch, args.image_size, args.width)
    model = common.to_device(DINO(backbone, feat_dim, args), run.device, args)
    dino = getattr(model, "module", model)
    opt = common.optimizer(args, dino.student)
    start = run.resume(model, opt)
    steps = len(data.images) // args.batch_size
    for epoch in range(start, args.epochs):
        g, metrics = common.aug_generator(args, run.device, epoch), common.Metrics()
        for i, x in enumerate(common.batches(data.images, args.batch_size, epoch, args.seed)):
            step, total = epoch * steps + i, args.epochs * steps
            lr = common.cosine(step, total, args.base_lr, args.min_lr, args.warmup_epochs * steps)
            common.set_schedule(opt, lr, wd=common.cosine(step, total, args.wd, args.wd_end))
            views = aug(x, g)
            with common.autocast(args, run.device):
                student_out, teacher_out = model(views)
            loss, p_t = dino.criterion(student_out, teacher_out, epoch)  # per-image mean: DDP's gradient mean is exact
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad:
                clip_gradients(dino.student, args.clip_grad)
            if epoch < args.freeze_last_layer:  # the last layer stays at its init during the first epoch(s)
                dino.student.head.v.grad = dino.student.head.g.grad = None
            opt.step()
            ema_update(dino.teacher, dino.student, common.cosine(step, total, args.momentum_teacher,
                                                                 args.momentum_teacher_end))
            entropy, kl_uniform, batch_entropy = teacher_entropy(p_t)
            metrics.add(loss=loss, teacher_entropy=entropy, kl_uniform=kl_uniform, entropy=batch_entropy)
            common.check_finite(metrics["loss"], epoch, i)
        record = {"epoch": epoch + 1, **metrics.means(), "lr": lr}  # the one host sync of the epoch
        common.check_finite(record["loss"], epoch)
        if run.monitor_due(epoch):
            record["knn_top1"] = common.knn_monitor(dino.teacher.backbone, data, run.device)
        run.save(record, model, dino.teacher.backbone, opt)  # last.pt, then the log line
    run.finish()


if __name__ == "__main__":
    train(get_args())
