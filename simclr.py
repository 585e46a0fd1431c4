"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations (Chen et al., 2020,
arXiv 2002.05709).

Two augmented views of each of N images pass through backbone f and projector g, z = g(f(x)).
Over the 2N views, with cosine similarities s_ik and positive p(i) = the other view of i's image,

    l_i = -log exp(s_ip(i) / t) / sum_{k != i} exp(s_ik / t),        L = (1 / 2N) sum_i l_i    (Eq. 1)

(NT-Xent; numerically the same as lightly.loss.NTXentLoss with no memory bank).

Run:     python simclr.py --dataset cifar10 --arch resnet18
Offline: python simclr.py --dataset synthetic --width 16 --epochs 20 --batch-size 128 --device cpu
Result:  tin100-32 (100 classes, 32 px), 5,000 training images, 10 epochs, batch 128, ResNet-18 width 16, 2-core CPU:
         kNN k=20 8.68% / k=200 9.72%, linear 12.34% (random init 4.28 / 4.42 / 5.14; README table).
         Synthetic shapes, ResNet-18, 60 epochs, batch 256: kNN 99.1% (H100, bf16). CIFAR-10 not yet run.
"""
import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=common.HelpFormatter)
    common.add_common_args(p)
    p.add_argument("--temperature", type=float, default=0.2,
                   help="NT-Xent temperature t (paper: 0.1 on ImageNet with large batches; 0.2-0.5 on CIFAR)")
    p.add_argument("--proj-hidden", type=int, default=2048, help="projector hidden width (2048)")
    p.add_argument("--proj-dim", type=int, default=128, help="projector output dimension (paper: 128)")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"),
                   help="sgd (momentum 0.9; the paper uses LARS at batch >= 1024) or adamw (try --lr 1e-3)")
    p.add_argument("--min-scale", type=float, default=0.08, help="smallest crop area fraction (paper: 0.08)")
    p.set_defaults(method="simclr", lr=0.3, wd=5e-4, batch_size=512, epochs=200)
    args = p.parse_args(argv)
    if args.temperature <= 0:
        common.die(f"--temperature must be > 0, got {args.temperature}")
    common.check_args(args)
    return args


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------
@common.fp32  # fp32 even when called under autocast
def nt_xent(z1, z2, temperature=0.2):
    """NT-Xent (Eq. 1). z1, z2: (N, D) projections of the two views, any scale (normalised here).
    Under torchrun the views of every rank take part as negatives (gathered with gradient)."""
    z = F.normalize(torch.cat([common.gather_with_grad(z1), common.gather_with_grad(z2)]), dim=1)  # (2N, D)
    n = z.shape[0] // 2
    logits = z @ z.T / temperature  # (2N, 2N): s_ik / t
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # k != i
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)  # p(i): the other view
    return F.cross_entropy(logits, positive)  # mean over the 2N anchors of -log softmax_k(s_ik/t)[p(i)]


def projector(in_dim, hidden, out_dim):
    """g: Linear-BN-ReLU-Linear-BN-ReLU-Linear (SimCLR v2's 3-layer head; features are taken before it)."""
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


class SimCLR(nn.Module):
    def __init__(self, backbone, feat_dim, args):
        super().__init__()
        self.backbone, self.projector = backbone, projector(feat_dim, args.proj_hidden, args.proj_dim)

    def forward(self, views):  # list of 2 tensors (N, 3, S, S)
        n = views[0].shape[0]
        z = self.projector(self.backbone(torch.cat(views)))  # (2N, proj_dim), one pass for both views
        return z[:n], z[n:]


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train(args):
    device = common.setup(args)
    images, memory, val, stats = common.load_data(args, device)
    aug = common.MultiCrop(images.shape[-1], *stats, n_global=2, global_scale=(args.min_scale, 1.0),
                           backend=args.aug)
    backbone, feat_dim = common.build_backbone(args.arch, images.shape[-1], args.width)
    model = SimCLR(backbone, feat_dim, args).to(device, memory_format=torch.channels_last)
    model = common.wrap_ddp(model, device, args)
    base_lr = args.lr * args.batch_size / 256  # linear scaling rule
    opt = common.optimizer(args.optimizer, model, base_lr, args.wd, device)
    start = common.resume(args, model, opt)
    world = dist.get_world_size() if dist.is_initialized() else 1
    steps = len(images) // args.batch_size
    for epoch in range(start, args.epochs):
        g, total = common.aug_generator(args, device, epoch), torch.zeros((), device=device)
        for i, x in enumerate(common.batches(images, args.batch_size, epoch, args.seed, f"epoch {epoch + 1}")):
            step = epoch * steps + i
            for group in opt.param_groups:
                group["lr"] = common.cosine(step, args.epochs * steps, base_lr, 0.0, args.warmup_epochs * steps)
            views = aug(x, g)
            with common.autocast(args, device):
                z1, z2 = model(views)
            loss = nt_xent(z1, z2, args.temperature)
            opt.zero_grad(set_to_none=True)
            (loss * world).backward()  # each rank holds d(loss)/d(own views); DDP averages over ranks
            opt.step()
            total += loss.detach()  # summed on the device: no host sync per step
            common.check_finite(total, epoch, i)
        common.end_epoch(args, epoch, model, backbone, opt, (memory, val, stats), device,
                         {"loss": total.item() / steps, "lr": opt.param_groups[0]["lr"]})


if __name__ == "__main__":
    train(get_args())
