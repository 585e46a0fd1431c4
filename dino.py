"""DINO: Emerging Properties in Self-Supervised Vision Transformers (Caron et al., 2021, arXiv 2104.14294).

Self-distillation with no labels. A student g_s sees every crop (2 global + L local), a teacher g_t,
the exponential moving average of the student, sees the 2 global crops. Outputs are K-way
distributions, the teacher's centred and sharpened:

    P_t = softmax((g_t(x) - c) / tau_t),   P_s = softmax(g_s(x') / tau_s)                     (Eq. 1)
    L = 1/n_pairs sum_{t in globals} sum_{s in crops, s != t} H(P_t, P_s),  H(a, b) = -a.log b  (Eq. 3)

and c <- m c + (1 - m) mean_batch g_t (centring, Eq. 4). Centring prevents one dimension from
dominating, sharpening (tau_t < tau_s) prevents the uniform collapse; the teacher is updated as
theta_t <- lambda theta_t + (1 - lambda) theta_s with lambda following a cosine from 0.996 to 1.

Run:     python dino.py --dataset cifar10 --arch vit_tiny
Offline: python dino.py --dataset synthetic --width 16 --out-dim 4096 --epochs 20 --device cpu
Result:  synthetic, ResNet-18, 30 epochs, out-dim 4096, batch 64, teacher momentum 0.99: kNN 40.4%
         (H100, bf16; still rising). CIFAR-10 not yet run.
"""
import argparse
import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    common.add_crop_args(p, global_crops=2, local_crops=6)
    a = p.add_argument
    a("--out-dim", type=int, default=65536, help="K, prototypes of the head (paper: 65536; 4096-65536 on CIFAR)")
    a("--norm-last-layer", action=argparse.BooleanOptionalAction, default=True,
      help="fix the weight-normalised last layer's norm to 1 (paper: on; off can help ViT-S stability)")
    a("--momentum-teacher", type=float, default=0.996, help="teacher EMA start, cosine to 1 (0.996; 0.9995 at small batch)")
    a("--warmup-teacher-temp", type=float, default=0.04, help="initial teacher temperature (0.04)")
    a("--teacher-temp", type=float, default=0.04, help="teacher temperature after warm-up (0.04; up to 0.07)")
    a("--warmup-teacher-temp-epochs", type=int, default=30, help="linear teacher-temperature warm-up (30)")
    a("--student-temp", type=float, default=0.1, help="student temperature (0.1)")
    a("--center-momentum", type=float, default=0.9, help="EMA of the teacher-output centre (0.9)")
    a("--freeze-last-layer", type=int, default=1, help="epochs with the head's last layer frozen (1)")
    a("--wd-end", type=float, default=0.4, help="weight decay cosine from --wd to this (0.04 -> 0.4)")
    a("--clip-grad", type=float, default=3.0, help="per-parameter gradient-norm clipping (3.0; 0 disables)")
    a("--min-lr", type=float, default=1e-6, help="final learning rate of the cosine (1e-6)")
    p.set_defaults(method="dino", lr=5e-4, wd=0.04, batch_size=256, epochs=100)
    args = p.parse_args(argv)
    if args.out_dim < 1:
        common.die(f"--out-dim must be >= 1, got {args.out_dim}")
    if min(args.teacher_temp, args.warmup_teacher_temp, args.student_temp) <= 0:
        common.die("temperatures must be > 0")
    common.check_args(args)
    if args.global_crops != 2:
        common.die(f"DINO's teacher sees exactly 2 global crops (--global-crops 2), got {args.global_crops}")
    return args


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------
class DINOHead(nn.Module):
    """3-layer MLP (hidden 2048, GELU) -> bottleneck 256 -> L2-normalise -> weight-normalised linear to K.

    Weight normalisation written out: W = g * V / ||V|| row-wise; with norm_last_layer, g = 1 is fixed."""

    def __init__(self, in_dim, out_dim, hidden=2048, bottleneck=256, norm_last_layer=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
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


class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher and student distributions over crop pairs."""

    def __init__(self, out_dim, warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=30,
                 epochs=100, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        warm = torch.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
        self.teacher_temps = torch.cat([warm, torch.full((max(0, epochs - warmup_teacher_temp_epochs),), teacher_temp)])

    def teacher_temp(self, epoch):
        return self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)].item()

    def forward(self, student_out, teacher_out, epoch):
        """student_out: list of (N, K) logits for every crop, globals first; teacher_out: the 2 globals."""
        tau_t = self.teacher_temp(epoch)
        p_t = [F.softmax((t.float() - self.center) / tau_t, dim=-1).detach() for t in teacher_out]  # Eq. (1)
        log_p_s = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_out]
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
    """theta_t <- momentum * theta_t + (1 - momentum) * theta_s, parameter by parameter."""
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)


@torch.no_grad()
def teacher_entropy(teacher_out, center, tau_t):
    """Mean entropy of P_t and KL(P_t || uniform) = log K - H: the two collapse signals DINO tracks."""
    p = F.softmax((torch.cat(teacher_out).float() - center) / tau_t, dim=-1)
    h = -(p * p.clamp_min(1e-12).log()).sum(-1).mean().item()
    return h, torch.log(torch.tensor(float(p.shape[1]))).item() - h


class Net(nn.Module):
    def __init__(self, backbone, feat_dim, args):
        super().__init__()
        self.backbone = backbone
        self.head = DINOHead(feat_dim, args.out_dim, norm_last_layer=args.norm_last_layer)

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
                                  args.warmup_teacher_temp_epochs, args.epochs, args.student_temp, args.center_momentum)

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
    aug = common.MultiCrop(images.shape[-1], *stats, args.global_crops, args.local_crops, args.global_scale,
                           args.local_scale, backend=args.aug)
    backbone, feat_dim = common.build_backbone(args.arch, images.shape[-1], args.width)
    model = DINO(backbone, feat_dim, args).to(device, memory_format=torch.channels_last)
    model = common.wrap_ddp(model, device, args)
    dino = getattr(model, "module", model)
    base_lr = args.lr * args.batch_size / 256  # linear scaling rule
    opt = common.adamw(dino.student, base_lr, args.wd, device)
    start = common.resume(args, model, opt)
    steps = len(images) // args.batch_size
    total_steps = args.epochs * steps
    for epoch in range(start, args.epochs):
        g, sums = common.aug_generator(args, device, epoch), torch.zeros(3)
        for i, x in enumerate(common.batches(images, args.batch_size, epoch, args.seed, f"epoch {epoch + 1}")):
            step = epoch * steps + i
            opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = common.cosine(
                step, total_steps, base_lr, args.min_lr, args.warmup_epochs * steps)
            opt.param_groups[0]["weight_decay"] = common.cosine(step, total_steps, args.wd, args.wd_end)
            views = aug(x, g)
            with common.autocast(args, device):
                student_out, teacher_out = model(views)
            diag = teacher_entropy(teacher_out, dino.criterion.center, dino.criterion.teacher_temp(epoch))
            loss = dino.criterion(student_out, teacher_out, epoch)  # fp32 inside; updates the centre
            common.check_finite(loss, epoch, i)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DINO's loss needs no cross-rank gather: DDP's gradient mean is exact
            if args.clip_grad:  # per-parameter clipping, as in the DINO code
                for p in dino.student.parameters():
                    if p.grad is not None:
                        p.grad.mul_((args.clip_grad / (p.grad.norm() + 1e-6)).clamp(max=1.0))
            if epoch < args.freeze_last_layer:  # the last layer stays at its init during epoch 1
                dino.student.head.v.grad = dino.student.head.g.grad = None
            opt.step()
            ema_update(dino.teacher, dino.student, common.cosine(step, total_steps, args.momentum_teacher, 1.0))
            sums += torch.tensor([loss.item(), *diag])
        m = (sums / steps).tolist()
        common.end_epoch(args, epoch, model, dino.teacher.backbone, opt, (memory, val, stats), device,
                         {"loss": m[0], "teacher_entropy": m[1], "kl_uniform": m[2], "lr": opt.param_groups[0]["lr"]})


if __name__ == "__main__":
    train(get_args())
