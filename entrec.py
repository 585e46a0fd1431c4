"""EntRec: the entropy-reconstruction (ER) bound as a training objective, from "The Role of Entropy and
Reconstruction in Multi-View Self-Supervised Learning" (Rodríguez-Gálvez, Blaas, Rodríguez, Bhowmik,
Kolesnikov, Theobald, Zappella; ICML 2023, arXiv 2307.10907).

For two views with embeddings Z1, Z2 the mutual information is bounded below by

    I(Z1; Z2) >= H(Z2) + E[log q(Z2 | Z1)]                                               (ER bound)

(an entropy term that spreads the embeddings, a reconstruction term that predicts one view from the
other); the loss is -(H + E log q), symmetrised over the two views. On the sphere S^{D-1} both use a
von Mises-Fisher kernel of concentration kappa:
  * H: resubstitution kernel density estimate, H = mean_i[-logsumexp_j(kappa zi.zj) + log N] - log C_D;
  * log q(z2 | z1) = log C_D(kappa) + kappa mu(z1).z2, mu(z1) = the (predicted, normalised) other view.
On a discrete support (softmax heads), H = entropy of the batch-mean distribution and the
reconstruction is a cross-entropy. `--variant` keeps the architecture of SimCLR, BYOL (default) or
DINO and replaces its objective by ER.

Run:     python entrec.py --dataset cifar10 --variant byol
Offline: python entrec.py --dataset synthetic --width 16 --epochs 20 --device cpu
Result:  synthetic, ResNet-18, byol variant, 25 epochs: kNN 51.5% (H100, bf16). CIFAR-10 not yet run.
"""
import argparse
import copy
import functools
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    a = p.add_argument
    a("--variant", default="byol", choices=("simclr", "byol", "dino"), help="architecture whose objective ER replaces")
    a("--kappa", type=float, default=10.0, help="vMF concentration of the entropy and reconstruction terms (10)")
    a("--entropy-estimator", default="average", choices=("average", "expectation"),
      help="KDE entropy: uniform average of -log p_i, or weights softmax_i(log p_i) (plug-in)")
    a("--ema", type=float, default=0.99, help="target EMA start, cosine to 1 (BYOL 0.99; 0: stop-gradient online net)")
    a("--proj-hidden", type=int, default=4096, help="projector / predictor hidden width (BYOL: 4096)")
    a("--proj-dim", type=int, default=256, help="projection dimension (BYOL: 256)")
    a("--out-dim", type=int, default=4096, help="dino variant: softmax outputs K")
    a("--student-temp", type=float, default=0.1, help="dino variant: student temperature (0.1)")
    a("--teacher-temp", type=float, default=0.04, help="dino variant: teacher temperature (0.04)")
    a("--min-scale", type=float, default=0.08, help="smallest crop area fraction (0.08)")
    p.set_defaults(method="entrec", lr=1e-3, wd=1e-6, batch_size=256, epochs=200)
    args = p.parse_args(argv)
    if not args.kappa > 0:
        common.die(f"--kappa must be > 0, got {args.kappa}")
    if not 0 <= args.ema < 1:
        common.die(f"--ema must be in [0, 1), got {args.ema}")
    common.check_args(args)
    return args


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)  # called every step with the same (D, kappa)
def log_vmf_normalizer(dim, kappa):
    """log C_D(kappa) of the vMF density on S^{D-1}, float64, without forming I_v or C_D:
    log C_D(k) = (D/2 - 1) log 2 - (D/2) log(2 pi) + lgamma(D/2) - log 0F1(; D/2; k^2/4),
    from I_v(k) = (k/2)^v / Gamma(v+1) 0F1(; v+1; k^2/4), the series summed in log space.
    (Adding a small epsilon inside log I_v, as some code does, breaks once I_v < epsilon, i.e. D >~ 100.)"""
    if kappa < 0 or dim < 2:
        raise ValueError(f"need kappa >= 0 and dim >= 2, got kappa={kappa}, dim={dim}")
    b, x = dim / 2, kappa**2 / 4
    log_f = 0.0
    if x > 0:
        logs, term, m = [0.0], 0.0, 0
        while True:  # log t_m = log t_{m-1} + log x - log(b + m - 1) - log m
            m += 1
            term += math.log(x) - math.log(b + m - 1) - math.log(m)
            logs.append(term)
            if term < max(logs) - 40 and m > x:
                break
        top = max(logs)
        log_f = top + math.log(sum(math.exp(t - top) for t in logs))
    return (b - 1) * math.log(2) - b * math.log(2 * math.pi) + math.lgamma(b) - log_f


def sphere_entropy(z, kappa=10.0, estimator="average"):
    """vMF-KDE entropy of z (N, D) (normalised here), the KDE including each point itself:
    log p_i = logsumexp_j(kappa zi.zj) - log N + log C_D;  H = mean_i(-log p_i)  ("average"), or
    sum_i w_i (-log p_i) with w = softmax_i(log p_i)  ("expectation"). Whole batch across ranks."""
    z = F.normalize(common.gather_with_grad(z).to(torch.promote_types(z.dtype, torch.float32)), dim=1)
    N, D = z.shape
    log_p = torch.logsumexp(kappa * z @ z.T, dim=1) - math.log(N) + log_vmf_normalizer(D, kappa)  # (N,)
    if estimator == "average":
        return -log_p.mean()
    return -(F.softmax(log_p, dim=0) * log_p).sum()


def sphere_reconstruction(mu, z, kappa=10.0):
    """Mean over the batch of -log q(z | mu) = -(log C_D(kappa) + kappa mu.z), mu and z (N, D) normalised here."""
    mu = F.normalize(mu.to(torch.promote_types(mu.dtype, torch.float32)), dim=1)
    z = F.normalize(z.to(mu.dtype), dim=1)
    return -(log_vmf_normalizer(z.shape[1], kappa) + kappa * (mu * z).sum(1)).mean()


def discrete_entropy(p):
    """Entropy of the batch-mean distribution of p (N, K) (rows are probability vectors)."""
    p_bar = common.gather_with_grad(p.float()).mean(0)
    return -torch.special.xlogy(p_bar, p_bar).sum()


def discrete_reconstruction(p1, p2):
    """Symmetric cross-entropy 1/2 mean_i [H(p1_i, p2_i) + H(p2_i, p1_i)], H(a, b) = -sum_k a_k log b_k
    (log clamped at the smallest float, so an exact zero costs ~87 nats instead of inf)."""
    p1, p2 = p1.float(), p2.float()
    tiny = torch.finfo(p1.dtype).tiny
    return -0.5 * (torch.special.xlogy(p1, p2.clamp_min(tiny)).sum(1)
                   + torch.special.xlogy(p2, p1.clamp_min(tiny)).sum(1)).mean()


def mlp(in_dim, hidden, out_dim):
    """Linear-BN-ReLU-Linear, the BYOL projector / predictor."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


class EntRec(nn.Module):
    """Online network (backbone + projector [+ predictor]) and, for byol/dino with --ema > 0, an EMA target."""

    def __init__(self, backbone, feat_dim, args):
        super().__init__()
        self.variant = args.variant
        out = args.out_dim if args.variant == "dino" else args.proj_dim
        self.online = nn.Sequential(backbone, mlp(feat_dim, args.proj_hidden, out))
        self.predictor = mlp(out, args.proj_hidden, out) if args.variant == "byol" else None
        use_target = args.variant != "simclr" and args.ema > 0
        self.target = copy.deepcopy(self.online).requires_grad_(False) if use_target else None

    def forward(self, views):  # 2 views (N, 3, S, S) -> online outputs (2, N, .) and target outputs (2, N, .)
        n = views[0].shape[0]
        x = torch.cat(views)
        z = self.online(x)
        with torch.no_grad():  # the target is never differentiated (--ema 0: the online net, stop-grad)
            t = self.target(x) if self.target is not None else z.detach()
        return z.view(2, n, -1), t.view(2, n, -1)


def entrec_loss(model, z, t, args):
    """-(H + E log q), symmetrised over the two views. z, t: online / target outputs (2, N, .).
    Returns (loss, entropy, reconstruction)."""
    if args.variant == "simclr":  # both branches online; mu(z1) = z1
        rec = sphere_reconstruction(z[0], z[1], args.kappa)  # kappa z1.z2 is symmetric: one direction suffices
        ent = 0.5 * (sphere_entropy(z[0], args.kappa, args.entropy_estimator)
                     + sphere_entropy(z[1], args.kappa, args.entropy_estimator))
    elif args.variant == "byol":  # predict the other view's target projection
        pred = model.predictor(z.flatten(0, 1)).view_as(z)
        rec = 0.5 * (sphere_reconstruction(pred[0], t[1], args.kappa) + sphere_reconstruction(pred[1], t[0], args.kappa))
        ent = 0.5 * (sphere_entropy(z[0], args.kappa, args.entropy_estimator)
                     + sphere_entropy(z[1], args.kappa, args.entropy_estimator))
    else:  # dino: softmax heads; the entropy term replaces DINO's centring
        log_p_s = F.log_softmax(z.float() / args.student_temp, dim=-1)
        p_t = F.softmax(t.float() / args.teacher_temp, dim=-1)
        # teacher -> student cross-entropy only: the sharpened teacher has near-zero entries, so the
        # student -> teacher direction of discrete_reconstruction would be dominated by log(~0)
        rec = -0.5 * ((p_t[1] * log_p_s[0]).sum(-1).mean() + (p_t[0] * log_p_s[1]).sum(-1).mean())
        ent = 0.5 * (discrete_entropy(log_p_s[0].exp()) + discrete_entropy(log_p_s[1].exp()))
    return rec - ent, ent, rec


@torch.no_grad()
def ema_update(target, online, momentum):
    for pt, po in zip(target.parameters(), online.parameters()):
        pt.mul_(momentum).add_(po.detach(), alpha=1 - momentum)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train(args):
    device = common.setup(args)
    images, memory, val, stats = common.load_data(args, device)
    aug = common.MultiCrop(images.shape[-1], *stats, n_global=2, global_scale=(args.min_scale, 1.0),
                           backend=args.aug)
    backbone, feat_dim = common.build_backbone(args.arch, images.shape[-1], args.width)
    model = EntRec(backbone, feat_dim, args).to(device, memory_format=torch.channels_last)
    model = common.wrap_ddp(model, device, args)
    net = getattr(model, "module", model)
    base_lr = args.lr * args.batch_size / 256  # linear scaling rule
    opt = common.adamw(model, base_lr, args.wd, device)
    start = common.resume(args, model, opt)
    world = dist.get_world_size() if dist.is_initialized() else 1
    steps = len(images) // args.batch_size
    for epoch in range(start, args.epochs):
        g, sums = common.aug_generator(args, device, epoch), torch.zeros(3)
        for i, x in enumerate(common.batches(images, args.batch_size, epoch, args.seed, f"epoch {epoch + 1}")):
            step = epoch * steps + i
            for group in opt.param_groups:
                group["lr"] = common.cosine(step, args.epochs * steps, base_lr, 0.0, args.warmup_epochs * steps)
            views = aug(x, g)
            with common.autocast(args, device):
                z, t = model(views)
                loss, ent, rec = entrec_loss(net, z, t, args)
            common.check_finite(loss, epoch, i)
            opt.zero_grad(set_to_none=True)
            # the entropy is batch-wide (identical on every rank), the reconstruction a local mean:
            # x world on the entropy undoes DDP's gradient mean for it
            (rec - ent * world).backward()
            opt.step()
            if net.target is not None:
                ema_update(net.target, net.online, common.cosine(step, args.epochs * steps, args.ema, 1.0))
            sums += torch.tensor([loss.item(), ent.item(), rec.item()])
        m = (sums / steps).tolist()
        common.end_epoch(args, epoch, model, net.online[0], opt, (memory, val, stats), device,
                         {"loss": m[0], "entropy": m[1], "reconstruction": m[2], "lr": opt.param_groups[0]["lr"]})


if __name__ == "__main__":
    train(get_args())
