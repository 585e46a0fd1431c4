"""HyDeS: Self-Supervised Representation Learning via Hyperspherical Density Shaping
(Rodríguez-Betancourt & Casasola-Murillo, 2026, arXiv 2604.24498).

V crops of each of N images are embedded and projected onto the sphere S^{D-1}. A von Mises-Fisher
kernel K(zi, zj) = C_D(kappa) exp(kappa zi.zj) gives two kernel-density entropy estimates,

    H_global = E_i[ -log E_{j != i} K(zi, zj) ]       over all V*N points of the batch    (Eq. 2)
    H_local  = E_i[ -log E_{j in P(i)} K(zi, zj) ]    P(i): the other V-1 crops of i's image (Eq. 3)

and the objective maximises alpha H_global - beta H_local (Eq. 4), a multi-view mutual-information
estimate: spread the batch over the sphere, pull crops of one image together. No teacher, no EMA,
no stop-gradient. The loss is beta H_local - alpha H_global.

Run:     python hydes.py --dataset cifar10 --kappa 1
Offline: python hydes.py --dataset synthetic --width 16 --epochs 20 --device cpu
Differs: nothing in the objective; log C_D(kappa) is exact (log-space series), so the reported entropies are true
vMF-KDE entropies at any D and kappa. Results, with kappa 1, 10 and 20 side by side: docs/results.md.
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=common.HelpFormatter)
    a = p.add_argument_group("HyDeS").add_argument
    a("--kappa", type=common.number(float, 0, 1000, open_lo=True), default=1.0,
      help="vMF concentration (paper sweeps 0.1, ln 2, 1, 10, 20; 1 is its default). A larger kappa sharpens the "
           "kernel: faster early in training, kappa 1 catching up over long runs (paper, Fig. 7); docs/results.md "
           "compares 1, 10 and 20")
    a("--alpha", type=common.NONNEG, default=1.0, help="weight of H_global, the uniformity term (paper: 1)")
    a("--beta", type=common.NONNEG, default=1.0, help="weight of H_local, the alignment term (paper: 1)")
    a("--proj-hidden", type=common.COUNT, default=2048, help="projector hidden width")
    a("--proj-dim", type=common.number(int, 2), default=128, help="sphere dimension D (paper: no effect over 128-4096)")
    common.add_common_args(p, lr_batch=128, crops=True)
    p.set_defaults(method="hydes", optimizer="adamw", lr=1e-3, wd=1e-6, batch_size=128, epochs=200, global_crops=2,
                   local_crops=6, global_scale=(0.4, 1.0))
    args = common.parse(p, argv)
    if args.global_crops < 2:
        common.die(f"HyDeS needs --global-crops >= 2 (the paper's 2), got {args.global_crops}")
    return args


# ----------------------------------------------------------------------------------------------
# The method. Copy with torch alone: log_vmf_normalizer, hydes_loss
# ----------------------------------------------------------------------------------------------
def log_vmf_normalizer(dim, kappa):
    """log C_D(kappa) of the vMF density on S^{D-1}, in float64, without forming I_v or C_D.

    C_D(k) = k^{v} / ((2 pi)^{D/2} I_v(k)) with v = D/2 - 1, and I_v(k) = (k/2)^v / Gamma(v+1) 0F1(; v+1; k^2/4),
    so  log C_D(k) = v log 2 - (D/2) log(2 pi) + lgamma(D/2) - log 0F1(; D/2; k^2/4).
    The series 0F1(; b; x) = sum_m t_m, t_m = x^m Gamma(b) / (Gamma(b+m) m!), has positive terms that rise to
    a bell around m* = (sqrt(b^2 + 4x) - b) / 2 (where the ratio t_{m+1}/t_m crosses 1) of width
    s = (1/m* + 1/(b+m*))^{-1/2}; outside m* +- (12 s + 50) they are below e^-70 of the peak. The window's
    log-terms come from lgamma and are summed by logsumexp: O(sqrt(kappa)) work, exact to ~1e-15 for any kappa.
    At kappa -> 0 it gives -log|S^{D-1}|, the uniform density."""
    if kappa < 0 or dim < 2:
        raise ValueError(f"need kappa >= 0 and dim >= 2, got kappa={kappa}, dim={dim}")
    b, x = dim / 2, kappa**2 / 4
    log_f = 0.0
    if x > 0:
        peak = (math.sqrt(b * b + 4 * x) - b) / 2
        width = 1 / math.sqrt(1 / max(peak, 1.0) + 1 / (b + peak))
        m = torch.arange(max(0, int(peak - 12 * width) - 50), int(peak + 12 * width) + 51, dtype=torch.float64)
        log_t = m * math.log(x) + math.lgamma(b) - torch.lgamma(b + m) - torch.lgamma(m + 1)  # log t_m
        log_f = torch.logsumexp(log_t, 0).item()
    return (b - 1) * math.log(2) - b * math.log(2 * math.pi) + math.lgamma(b) - log_f


@torch.autocast("cuda", enabled=False)  # fp32 maths even when called under autocast
@torch.autocast("cpu", enabled=False)
def hydes_loss(z, kappa=1.0, alpha=1.0, beta=1.0, z_all=None, offset=0):
    """HyDeS loss (Eq. 4) and its two entropy estimates (Eqs. 2, 3).

    z: (V, N, D) embeddings of V crops of the N images of the whole batch (normalised here; half precision is
    computed in fp32). Returns (loss, h_global, h_local), each a scalar tensor; the entropies include
    log C_D(kappa), which cancels in the loss when alpha = beta. With V = 1 there are no positives: h_local is nan
    and the loss is -alpha h_global. Sharded (several processes): z (V, n, D) is this rank's images, n of them from
    image `offset` on of z_all (V, N, D), the whole batch; the means are over this rank's V*n points, and their
    mean over the ranks is the whole-batch value."""
    fp32 = lambda x: F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)  # noqa: E731
    V, n, D = z.shape
    rows = fp32(z).reshape(V * n, D)  # row v*n + i: crop v of this rank's image i
    cols = rows if z_all is None else fp32(z_all).reshape(-1, D)  # (VN, D), column v*N + j: crop v of image j
    N, log_c = len(cols) // V, log_vmf_normalizer(D, kappa)
    logits = kappa * rows @ cols.T  # (Vn, VN): log K(zi, zj) - log C
    image = offset + torch.arange(n, device=z.device).repeat(V)  # (Vn,) image index of each row
    own = torch.arange(V, device=z.device).repeat_interleave(n) * N + image  # (Vn,) each row's own column
    self_mask = own[:, None] == torch.arange(V * N, device=z.device)  # (Vn, VN)
    # Eq. (2): -log mean_{j != i} K = -(logsumexp_{j != i} kappa zi.zj - log(VN - 1)) - log C
    lse_all = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1)  # (Vn,)
    h_global = (math.log(V * N - 1) - lse_all).mean() - log_c
    if V == 1:
        return -alpha * h_global, h_global, torch.full_like(h_global, float("nan"))
    # Eq. (3): positives P(i) = same image, other crop
    positive = (image[:, None] == torch.arange(N, device=z.device).repeat(V)) & ~self_mask  # (Vn, VN)
    lse_pos = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)  # (Vn,)
    h_local = (math.log(V - 1) - lse_pos).mean() - log_c
    return beta * h_local - alpha * h_global, h_global, h_local  # Eq. (4), negated


@torch.no_grad()
def mean_angles(z):
    """Mean pairwise angle in degrees of z (V, N, D), over all pairs and over positive pairs (same image),
    as a (2,) tensor on z's device (no host sync)."""
    V, N, D = z.shape
    flat = F.normalize(z.float(), dim=-1).reshape(V * N, D)
    ang = torch.rad2deg(torch.arccos((flat @ flat.T).clamp(-1, 1))).fill_diagonal_(0)  # (VN, VN)
    image = torch.arange(N, device=z.device).repeat(V)  # (VN,) image index of each row
    same = image[:, None] == image[None, :]  # (VN, VN): crops of one image
    n_all, n_pos = V * N * (V * N - 1), V * N * (V - 1)  # off-diagonal pairs
    return torch.stack([ang.sum() / n_all, (ang * same).sum() / max(n_pos, 1)])


def projector(in_dim, hidden, out_dim):
    """Linear-BN-ReLU-Linear-BN-ReLU-Linear; its output is projected onto S^{D-1} by the loss."""
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


class HyDeS(nn.Module):
    def __init__(self, backbone, feat_dim, args):
        super().__init__()
        self.backbone, self.projector = backbone, projector(feat_dim, args.proj_hidden, args.proj_dim)

    def forward(self, views):  # list of V tensors (N, 3, S_v, S_v), global crops first -> (V, N, D)
        return self.projector(common.forward_crops(self.backbone, views)).view(len(views), len(views[0]), -1)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train(args):
    run = common.Run(args)  # device, run folder and its lock, signal handlers, seed
    data = common.load_data(args, run.device)  # uint8 images where --data-on says, kNN splits, statistics
    args = run.resolve(data)  # every value the run uses, resolved once: printed, kept in every checkpoint
    aug = common.MultiCrop(args.image_size, data.stats, args.global_crops, args.local_crops, args.global_scale,
                           args.local_scale)
    backbone, feat_dim = common.build_backbone(args.arch, args.image_size, args.width)
    model = common.to_device(HyDeS(backbone, feat_dim, args), run.device, args)
    opt = common.optimizer(args, model)
    start = run.resume(model, opt)
    steps = len(data.images) // args.batch_size
    for epoch in range(start, args.epochs):
        g, metrics = common.aug_generator(args, run.device, epoch), common.Metrics()
        for i, x in enumerate(common.batches(data.images, args.batch_size, epoch, args.seed)):
            step = epoch * steps + i
            lr = common.cosine(step, args.epochs * steps, args.base_lr, 0.0, args.warmup_epochs * steps)
            common.set_schedule(opt, lr)
            views = aug(x, g)
            with common.autocast(args, run.device):
                z = model(views)  # (V, N, D)
            loss, h_global, h_local = hydes_loss(z, args.kappa, args.alpha, args.beta, *common.columns(z, dim=1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            angle_all, angle_pos = mean_angles(z)
            metrics.add(loss=loss, h_global=h_global, h_local=h_local, angle_all=angle_all, angle_pos=angle_pos)
            common.check_finite(metrics["loss"], epoch, i)
        record = {"epoch": epoch + 1, **metrics.means(), "lr": lr}  # the one host sync of the epoch
        common.check_finite(record["loss"], epoch)
        if run.monitor_due(epoch):
            record["knn_top1"] = common.knn_monitor(backbone, data, run.device)
        run.save(record, model, backbone, opt)  # last.pt, then the log line
    run.finish()


if __name__ == "__main__":
    train(get_args())
