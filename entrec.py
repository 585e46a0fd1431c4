"""EntRec: the entropy-reconstruction (ER) bound as a training objective, from "The Role of Entropy and
Reconstruction in Multi-View Self-Supervised Learning" (Rodríguez-Gálvez, Blaas, Rodríguez, Goliński, Suau,
Ramapuram, Busbridge, Zappella; ICML 2023, arXiv 2307.10907).

For two views with embeddings Z1, Z2 the mutual information is bounded below by

    I(Z1; Z2) >= H(Z2) + E[log q(Z2 | Z1)]                                               (ER bound)

(an entropy term that spreads the embeddings, a reconstruction term that predicts one view from the
other); the loss is -(H + E log q), symmetrised over the views. On the sphere S^{D-1} both use a
von Mises-Fisher kernel of concentration kappa:
  * H: resubstitution kernel density estimate, H = mean_i[-logsumexp_j(kappa zi.zj) + log N] - log C_D;
  * log q(z2 | z1) = log C_D(kappa) + kappa mu(z1).z2, mu(z1) = the (predicted, normalised) other view.
On a discrete support (softmax heads), H = entropy of the batch-mean distribution and the reconstruction is
the symmetric cross-entropy. `--variant` keeps the architecture of SimCLR, BYOL (default: predictor + EMA
target) or DINO (its head, EMA teacher, teacher-temperature warm-up, local crops; the entropy replaces centring).

Against the official code (apple/ml-entropy-reconstruction, which ships the two loss functions):
  * log C_D(kappa) is exact here; the official log(I_v(kappa) + 1e-7) is 83.1 nats off at D = 128, kappa = 10
    (I_v < 1e-7 there; a constant, so gradients are unchanged, but the reported entropies are not);
  * the default estimator is "average" (mean of -log p_i); the official function defaults to "expectation"
    (-log p_i weighted by softmax_i(log p_i): --entropy-estimator expectation);
  * the discrete reconstruction uses the official eps = 1e-7 inside the logs (it caps log(~0) at ~16 nats); the
    discrete entropy is the exact -sum pbar log pbar (official "expectation"); the official discrete "average",
    -mean_k log(pbar_k + eps), is refused: it is smallest at a uniform pbar, so maximising it favours collapse;
  * optimiser: AdamW with a cosine schedule, where the paper's runs use LARS.

Run:     python entrec.py --dataset cifar10 --variant byol      (offline: --dataset synthetic --width 16 --device cpu)
Results: docs/results.md.
"""
import argparse
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# per variant: the defaults of the flags left unset; a flag given for a variant that does not use it is an error
VARIANTS = {
    "simclr": dict(kappa=10.0, proj_hidden=4096, entropy_estimator="average"),
    "byol": dict(kappa=10.0, ema=0.99, proj_hidden=4096, entropy_estimator="average"),
    "dino": dict(ema=0.99, out_dim=4096, student_temp=0.1, teacher_temp=0.04, warmup_teacher_temp=0.04,
                 warmup_teacher_temp_epochs=30, local_crops=0, proj_hidden=2048, entropy_estimator="expectation"),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=common.HelpFormatter)
    a, V = p.add_argument_group("EntRec").add_argument, " (default: VARIANTS)"
    a("--variant", default="byol", choices=tuple(VARIANTS), help="architecture whose objective ER replaces")
    a("--kappa", type=common.number(float, 0, 1000, open_lo=True), help="simclr/byol: vMF concentration of the "
      "entropy and the reconstruction (paper: 10)")
    a("--entropy-estimator", choices=("average", "expectation"), help="simclr/byol: mean of -log p_i (average), or "
      "weighted by softmax_i(log p_i) (expectation); dino: only expectation, -sum_k pbar_k log pbar_k" + V)
    a("--ema", type=common.number(float, 0, 1, open_hi=True), help="byol/dino: target EMA start, cosine to 1 "
      "(BYOL: 0.99; 0: the online net with stop-gradient). The target averages over ~1/(1-m) steps")
    a("--proj-hidden", type=common.COUNT, help="projector / predictor hidden width (BYOL: 4096; DINO head: 2048)")
    a("--proj-dim", type=common.number(int, 2), default=256, help="projection dimension (BYOL: 256); dino: the "
      "head's bottleneck (256)")
    a("--out-dim", type=common.COUNT, help="dino: prototypes K of the softmax head (4096)")
    a("--student-temp", type=common.POSITIVE, help="dino: student temperature (0.1)")
    a("--teacher-temp", type=common.POSITIVE, help="dino: teacher temperature after the warm-up (0.04)")
    a("--warmup-teacher-temp", type=common.POSITIVE, help="dino: initial teacher temperature (0.04)")
    a("--warmup-teacher-temp-epochs", type=common.NONNEG_INT, help="dino: linear teacher-temperature warm-up (30)")
    common.add_common_args(p, lr_batch=256, crops=True)
    p.set_defaults(method="entrec", optimizer="adamw", lr=1e-3, wd=1e-6, batch_size=256, epochs=200, global_crops=2,
                   global_scale=(0.08, 1.0))
    args = common.parse(p, argv)
    given = vars(args)
    for name in set().union(*VARIANTS.values()) - set(VARIANTS[args.variant]):
        if given[name] is not None:
            common.die(f"--{name.replace('_', '-')} does nothing for --variant {args.variant} (only for "
                       f"{', '.join(v for v in VARIANTS if name in VARIANTS[v])})")
    given.update({name: value for name, value in VARIANTS[args.variant].items() if given[name] is None})
    if args.variant == "dino" and args.entropy_estimator == "average":
        common.die("--entropy-estimator average is not an entropy on the discrete support (the official -mean_k "
                   "log(pbar_k + eps) favours collapse: it is smallest at a uniform pbar); dino uses expectation")
    if args.global_crops != 2:
        common.die(f"EntRec uses 2 global crops (--global-crops 2), got {args.global_crops}")
    return args


# ----------------------------------------------------------------------------------------------
# The method. Copy with torch alone: EPS, log_vmf_normalizer, sphere_entropy, sphere_reconstruction,
# fp32, discrete_entropy, discrete_reconstruction, entrec_loss, teacher_temp
# ----------------------------------------------------------------------------------------------
EPS = 1e-7  # inside the logs of the discrete terms, as in the official code


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


def fp32(x):
    """Half precision -> fp32 (fp32 and fp64 unchanged): the losses below compute in fp32 even under autocast."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@torch.autocast("cuda", enabled=False)  # fp32 maths even when called under autocast
@torch.autocast("cpu", enabled=False)
def sphere_entropy(z, kappa=10.0, estimator="average", z_all=None):
    """vMF-KDE entropy of z (N, D), the whole batch (normalised here), the KDE including each point itself:
    log p_i = logsumexp_j(kappa zi.zj) - log N + log C_D;  H = mean_i(-log p_i)  ("average"), or
    sum_i w_i (-log p_i) with w = softmax_i(log p_i)  ("expectation"). Sharded: z (n, D) is this rank's rows of
    z_all (N, D), the KDE's points; "average" is the mean over these rows, "expectation" (weights over every row)
    the whole batch's."""
    points = F.normalize(fp32(z if z_all is None else z_all), dim=1)  # (N, D): the KDE's points
    rows = F.normalize(fp32(z), dim=1) if z_all is not None and estimator == "average" else points  # (n, D)
    N, D = points.shape
    log_p = torch.logsumexp(kappa * rows @ points.T, dim=1) - math.log(N) + log_vmf_normalizer(D, kappa)  # (n,)
    if estimator == "average":
        return -log_p.mean()
    return -(F.softmax(log_p, dim=0) * log_p).sum()


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def sphere_reconstruction(mu, z, kappa=10.0):
    """Mean over the batch of -log q(z | mu) = -(log C_D(kappa) + kappa mu.z), mu and z (N, D) normalised here."""
    mu, z = F.normalize(fp32(mu), dim=1), F.normalize(fp32(z), dim=1)
    return -(log_vmf_normalizer(z.shape[1], kappa) + kappa * (mu * z).sum(1)).mean()


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def discrete_entropy(p):
    """Entropy -sum_k pbar_k log pbar_k of the batch-mean distribution pbar of p (N, K), the whole batch (rows are
    probability vectors; the official "expectation" reduction); sharded too, p is the whole batch's."""
    p_bar = fp32(p).mean(0)  # (K,)
    return -torch.special.xlogy(p_bar, p_bar).sum()


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def discrete_reconstruction(p1, p2):
    """Symmetric cross-entropy 1/2 mean_i [H(p1_i, p2_i) + H(p2_i, p1_i)], H(a, b) = -sum_k a_k log(b_k + eps),
    p1, p2 (N, K) probability vectors (eps = 1e-7 caps log(~0) at ~16 nats, as in the official code)."""
    p1, p2 = fp32(p1), fp32(p2)
    return -0.5 * ((p1 * torch.log(p2 + EPS)).sum(1) + (p2 * torch.log(p1 + EPS)).sum(1)).mean()


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def entrec_loss(z, t, pred=None, variant="byol", kappa=10.0, estimator="average", student_temp=0.1, teacher_temp=0.04,
                z_all=None):
    """-(H + E log q) and its two terms, (loss, entropy, reconstruction), on the whole batch.

    simclr/byol: z, t, pred (2, N, D) online projections, target projections, predictions of the online net.
    dino: z (V, N, K) student logits of every crop, the 2 global crops first; t (2, N, K) the teacher's; pred None.
    Reconstruction pairs every teacher crop with every other student crop. Sharded: z, t, pred hold this rank's
    images and z_all (2 or V, N, .) the whole batch's z (its 2 global crops suffice), the entropy's points."""
    z_all = z if z_all is None else z_all
    if variant == "simclr":  # both branches online; mu(z1) = z1
        rec = sphere_reconstruction(z[0], z[1], kappa)  # kappa z1.z2 is symmetric: one direction suffices
    elif variant == "byol":  # predict the other view's target projection
        rec = 0.5 * (sphere_reconstruction(pred[0], t[1], kappa) + sphere_reconstruction(pred[1], t[0], kappa))
    if variant != "dino":
        ent = 0.5 * sum(sphere_entropy(z[v], kappa, estimator, z_all[v]) for v in range(2))
        return rec - ent, ent, rec
    p_t = F.softmax(fp32(t) / teacher_temp, dim=-1)  # no centring: the entropy term prevents collapse
    p_s = F.softmax(fp32(z) / student_temp, dim=-1)
    pairs = [(i, j) for i in range(len(p_t)) for j in range(len(p_s)) if i != j]
    rec = sum(discrete_reconstruction(p_t[i], p_s[j]) for i, j in pairs) / len(pairs)
    p_all = F.softmax(fp32(z_all[:2]) / student_temp, dim=-1)  # (2, N, K): the whole batch's global crops
    ent = (discrete_entropy(p_all[0]) + discrete_entropy(p_all[1])) / 2  # of the student's global crops
    return rec - ent, ent, rec


def teacher_temp(epoch, warmup_temp=0.04, temp=0.04, warmup_epochs=30):
    """DINO's teacher temperature: linear warm-up over the first epochs, then constant."""
    if epoch >= warmup_epochs:
        return temp
    return warmup_temp + (temp - warmup_temp) * epoch / max(1, warmup_epochs - 1)


def mlp(in_dim, hidden, out_dim):
    """Linear-BN-ReLU-Linear, the BYOL projector / predictor."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


class DINOHead(nn.Module):
    """DINO's head (dino.py): 3-layer MLP (BN for ResNets) -> bottleneck -> L2-normalise -> weight-normalised K."""

    def __init__(self, in_dim, out_dim, hidden=2048, bottleneck=256, bn=True):
        super().__init__()
        norm = (lambda: nn.BatchNorm1d(hidden)) if bn else nn.Identity  # noqa: E731
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), norm(), nn.GELU(), nn.Linear(hidden, hidden), norm(),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.v = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.trunc_normal_(self.v, std=0.02)

    def forward(self, x):  # (N, in_dim) -> (N, K) logits
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.v, dim=1))


class Online(nn.Module):
    """Backbone + head; crops of one size go through the backbone together."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, views):  # list of V crops (N, 3, S, S) -> (V, N, out)
        return self.head(common.forward_crops(self.backbone, views)).view(len(views), len(views[0]), -1)


class EntRec(nn.Module):
    """Online network [+ predictor (byol)] and, for byol/dino with --ema > 0, an EMA target."""

    def __init__(self, backbone, feat_dim, args):
        super().__init__()
        head = (DINOHead(feat_dim, args.out_dim, args.proj_hidden, args.proj_dim, bn=not args.arch.startswith("vit"))
                if args.variant == "dino" else mlp(feat_dim, args.proj_hidden, args.proj_dim))
        self.online = Online(backbone, head)
        self.predictor = mlp(args.proj_dim, args.proj_hidden, args.proj_dim) if args.variant == "byol" else None
        use_target = args.variant != "simclr" and args.ema > 0
        self.target = copy.deepcopy(self.online).requires_grad_(False) if use_target else None

    def forward(self, views):  # -> online z (V, N, .), target t of the 2 global crops (2, N, .), byol predictions
        z = self.online(views)
        pred = self.predictor(z.flatten(0, 1)).view_as(z) if self.predictor is not None else None
        with torch.no_grad():  # the target is never differentiated (--ema 0: the online net, stop-grad)
            t = self.target(views[:2]) if self.target is not None else z[:2].detach()
        return z, t, pred


@torch.no_grad()
def ema_update(target, online, momentum):
    """theta_t <- momentum * theta_t + (1 - momentum) * theta_o, parameter by parameter."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.lerp_(o, 1 - momentum)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train(args):
    run = common.Run(args)  # device, run folder and its lock, signal handlers, seed
    data = common.load_data(args, run.device)  # uint8 images where --data-on says, kNN splits, statistics
    args = run.resolve(data)  # every value the run uses, resolved once: printed, kept in every checkpoint
    aug = common.MultiCrop(args.image_size, data.stats, 2, args.local_crops or 0, args.global_scale, args.local_scale)
    backbone, feat_dim = common.build_backbone(args.arch, args.image_size, args.width)
    model = common.to_device(EntRec(backbone, feat_dim, args), run.device, args)
    net = getattr(model, "module", model)
    opt = common.optimizer(args, model)
    start = run.resume(model, opt)
    steps = len(data.images) // args.batch_size
    for epoch in range(start, args.epochs):
        g, metrics = common.aug_generator(args, run.device, epoch), common.Metrics()
        tau_t = None if args.variant != "dino" else teacher_temp(  # the dino variant's teacher temperature
            epoch, args.warmup_teacher_temp, args.teacher_temp, args.warmup_teacher_temp_epochs)
        for i, x in enumerate(common.batches(data.images, args.batch_size, epoch, args.seed)):
            step = epoch * steps + i
            lr = common.cosine(step, args.epochs * steps, args.base_lr, 0.0, args.warmup_epochs * steps)
            common.set_schedule(opt, lr)
            views = aug(x, g)
            with common.autocast(args, run.device):
                z, t, pred = model(views)
            globals_ = z if len(z) == 2 else z[:2]  # the entropy's points: every rank's 2 global crops
            loss, ent, rec = entrec_loss(z, t, pred, args.variant, args.kappa, args.entropy_estimator,
                                         args.student_temp, tau_t, common.gather(globals_, dim=1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if net.target is not None:
                ema_update(net.target, net.online, common.cosine(step, args.epochs * steps, args.ema, 1.0))
            metrics.add(loss=loss, entropy=ent, reconstruction=rec)
            common.check_finite(metrics["loss"], epoch, i)
        record = {"epoch": epoch + 1, **metrics.means(), "lr": lr}  # the one host sync of the epoch
        common.check_finite(record["loss"], epoch)
        if run.monitor_due(epoch):
            record["knn_top1"] = common.knn_monitor(net.online.backbone, data, run.device)
        run.save(record, model, net.online.backbone, opt)  # last.pt, then the log line
    run.finish()


if __name__ == "__main__":
    train(get_args())
