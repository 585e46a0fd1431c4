"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations (Chen et al., 2020,
arXiv 2002.05709).

Two augmented views of each of N images pass through backbone f and projector g, z = g(f(x)).
Over the 2N views, with cosine similarities s_ik and positive p(i) = the other view of i's image,

    l_i = -log exp(s_ip(i) / t) / sum_{k != i} exp(s_ik / t),        L = (1 / 2N) sum_i l_i    (Eq. 1)

(NT-Xent; numerically the same as lightly.loss.NTXentLoss with no memory bank).

Run:     python simclr.py --dataset cifar10 --arch resnet18
Offline: python simclr.py --dataset synthetic --width 16 --epochs 20 --batch-size 128 --device cpu
Differs: SGD with momentum (lr 0.3 x batch/256, wd 5e-4, cosine) instead of the paper's LARS, which it uses for
batches of 1024 and more; the projector is SimCLR v2's 3-layer MLP. Results: docs/results.md.
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=common.HelpFormatter)
    a = p.add_argument_group("SimCLR").add_argument
    a("--temperature", type=common.POSITIVE, default=0.2,
      help="NT-Xent temperature t (paper: 0.1 on ImageNet with large batches; 0.2-0.5 on CIFAR)")
    a("--proj-hidden", type=common.COUNT, default=2048, help="projector hidden width")
    a("--proj-dim", type=common.COUNT, default=128, help="projector output dimension (paper: 128)")
    common.add_common_args(p, lr_batch=256)
    p.set_defaults(method="simclr", optimizer="sgd", lr=0.3, wd=5e-4, batch_size=512, epochs=200,
                   global_scale=(0.08, 1.0))
    return common.parse(p, argv)


# ----------------------------------------------------------------------------------------------
# The method. Copy with torch alone: nt_xent
# ----------------------------------------------------------------------------------------------
@torch.autocast("cuda", enabled=False)  # fp32 maths even when called under autocast
@torch.autocast("cpu", enabled=False)
def nt_xent(z1, z2, temperature=0.2, z1_all=None, z2_all=None, offset=0):
    """NT-Xent (Eq. 1). z1, z2: (n, D) projections of the two views, any scale (normalised here); half-precision
    inputs are computed in fp32. One process: z1, z2 are the whole batch. Sharded (several processes): z1, z2 are
    this rank's anchors, rows offset..offset+n of z1_all, z2_all (N, D), the whole batch's, against which they are
    contrasted; the mean over this rank's 2n anchors is returned, and over the ranks it is the whole-batch loss."""
    fp32 = lambda *zs: F.normalize(torch.cat(zs).to(torch.promote_types(z1.dtype, torch.float32)), dim=1)  # noqa
    rows = fp32(z1, z2)  # (2n, D): this rank's anchors
    cols = rows if z1_all is None else fp32(z1_all, z2_all)  # (2N, D): every view of the batch
    N, ar = len(cols) // 2, torch.arange(len(z1), device=rows.device)
    own = torch.cat([ar, ar + N]) + offset  # each anchor's own column
    positive = torch.cat([ar + N, ar]) + offset  # p(i): the other view of its image
    logits = (rows @ cols.T / temperature).scatter(1, own[:, None], float("-inf"))  # (2n, 2N): s_ik / t, k != i
    return F.cross_entropy(logits, positive)  # mean over the anchors of -log softmax_k(s_ik/t)[p(i)]


@torch.no_grad()
def er_terms(z1, z2, temperature=0.2):
    """The two terms of the ER bound (Rodriguez-Galvez et al. 2023) inside NT-Xent, a vMF kernel of kappa = 1 / t:
    entropy H = log(2N - 1) - mean_i logsumexp_{k != i} s_ik / t (the leave-one-out vMF KDE over the 2N views) and
    reconstruction R = -mean_i s_ip(i) / t (-log q of each view under a vMF centred on its positive), both without
    the constant log C_D(1 / t), which cancels in the bound H - R. So NT-Xent = R - H + log(2N - 1). -> (H, R)."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, D)
    n = z.shape[0] // 2
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))  # (2N, 2N), k != i
    entropy = math.log(2 * n - 1) - torch.logsumexp(logits, 1).mean()
    return entropy, -(z[:n] * z[n:]).sum(1).mean() / temperature


def projector(in_dim, hidden, out_dim):
    """g: Linear-BN-ReLU-Linear-BN-ReLU-Linear (SimCLR v2's 3-layer head; features are taken before it)."""
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


class SimCLR(nn.Module):
    def __init__(self, backbone, feat_dim, args):
        super().__init__()
        self.backbone, self.projector = backbone, projector(feat_dim, args.proj_hidden, args.proj_dim)

    def forward(self, views):  # list of 2 tensors (N, 3, S, S) -> two (N, proj_dim), one pass for both views
        return self.projector(common.forward_crops(self.backbone, views)).chunk(2)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train(args):
    run = common.Run(args)  # device, run folder and its lock, signal handlers, seed
    data = common.load_data(args, run.device)  # uint8 images where --data-on says, kNN splits, statistics
    args = run.resolve(data)  # every value the run uses, resolved once: printed, kept in every checkpoint
    aug = common.MultiCrop(args.image_size, data.stats, 2, 0, args.global_scale)
    backbone, feat_dim = common.build_backbone(args.arch, args.image_size, args.width)
    model = common.to_device(SimCLR(backbone, feat_dim, args), run.device, args)
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
                z1, z2 = model(views)
            loss = nt_xent(z1, z2, args.temperature, *common.columns(z1, z2))  # own anchors, every rank's views
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            entropy, reconstruction = er_terms(z1, z2, args.temperature)  # of this rank's views
            metrics.add(loss=loss, entropy=entropy, reconstruction=reconstruction)
            common.check_finite(metrics["loss"], epoch, i)
        record = {"epoch": epoch + 1, **metrics.means(), "lr": lr}  # the one host sync of the epoch
        common.check_finite(record["loss"], epoch)
        if run.monitor_due(epoch):
            record["knn_top1"] = common.knn_monitor(backbone, data, run.device)
        run.save(record, model, backbone, opt)  # last.pt, then the log line
    run.finish()


if __name__ == "__main__":
    train(get_args())
