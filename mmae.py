"""M-MAE: masked autoencoding with a matrix-entropy regulariser, from "Information Flow in
Self-Supervised Learning" (Tan, Yang, Huang, Yuan, Zhang; ICML 2024, arXiv 2309.17281).

An MAE (He et al. 2022) hides a random 75% of the patches; the ViT encoder sees the visible ones (+ CLS),
a light decoder fills in mask tokens and regresses the pixels of the masked patches. M-MAE adds the
total coding rate of the batch of encoder features Z (B, d), rows L2-normalised:

    L = L_MAE - lambda * TCR_mu(Z),     TCR_mu(Z) = log det(I_d + (mu / d) Z^T Z)                    (Eq. 9)

(d divides as in the authors' code, loss_func.py). lambda = 0 is MAE. U-MAE ("How Mask Matters",
Zhang et al. 2022) regularises with mean((Z Z^T)^2), TCR's second-order Taylor term:
TCR = c B - (c^2 / 2) B^2 mean((Z Z^T)^2) + O(c^3), c = mu / d (`--reg square`).
Released ViT-L setting: lambda = 0.01, mu = 3; MAE: mask 0.75, normalised-pixel targets, AdamW
(0.9, 0.95), wd 0.05, base lr 1.5e-4 x batch/256, warm-up then cosine. As in MAE and M-MAE, the encoder and
the decoder use fixed (frozen, not decayed) 2-D sine-cosine position embeddings.

Against the official code (yifanzhang-pro/M-MAE, on facebookresearch/mae): its 8-GPU gather passes the
regulariser's gradient to the local slice only and DDP then averages, so the released run's effective weight is
lambda / 8 (--lam 0.00125 reproduces it on one GPU); here the gradient of the whole-batch TCR is exact at any
number of processes. Its TCR input is the CLS token after the final LayerNorm applied a second time; here once.
The ViT is torchvision's (its own initialisation, no qkv-bias difference), with a decoder of --decoder-depth blocks.

Run:     python mmae.py --dataset cifar10 --arch vit_tiny
Offline: python mmae.py --dataset synthetic --arch vit_tiny --epochs 20 --device cpu
Results: docs/results.md.
"""
import argparse
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.vision_transformer import EncoderBlock

import common


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=common.HelpFormatter)
    a = p.add_argument_group("M-MAE").add_argument
    a("--mask-ratio", type=common.number(float, 0, 1, open_lo=True, open_hi=True), default=0.75,
      help="fraction of patches hidden from the encoder (MAE: 0.75)")
    a("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
      help="regress per-patch normalised pixels (MAE's better setting)")
    a("--decoder-dim", type=common.number(int, 4), default=128, help="decoder width, a multiple of 4 (MAE ImageNet: "
      "512; small data: 128-256)")
    a("--decoder-depth", type=common.COUNT, default=4, help="decoder blocks (MAE ImageNet: 8; small data: 2-4)")
    a("--lam", type=common.NONNEG, default=0.01, help="lambda, weight of the regulariser (paper: 0.01; 0 gives plain "
      "MAE). The released 8-GPU run applied lambda/8 in effect (its gather): --lam 0.00125 reproduces it on one GPU")
    a("--mu", type=common.POSITIVE, default=3.0, help="mu of TCR (released ViT-L script: 3; its parser's default: 1)")
    a("--reg", default="tcr", choices=("tcr", "square"), help="tcr (M-MAE) or square (U-MAE's mean((ZZ^T)^2))")
    a("--pool", default="cls", choices=("cls", "mean"), help="Z: CLS after the final norm, or mean of visible tokens")
    a("--patch-size", type=common.COUNT, default=None, help="ViT patch (default 4 at 32 px, 8 at 96 px)")
    a("--save-recon", action="store_true", help="write a PNG (original / masked / reconstruction) every epoch")
    common.add_common_args(p, lr_batch=256)
    p.set_defaults(method="mmae", arch="vit_tiny", optimizer="adamw", lr=1.5e-4, wd=0.05, batch_size=256, epochs=800,
                   warmup_epochs=40, global_scale=(0.2, 1.0))
    args = common.parse(p, argv)
    if not args.arch.startswith("vit"):
        common.die(f"M-MAE masks ViT patches: use --arch vit_tiny or vit_small, got {args.arch}")
    if args.decoder_dim % 4:
        common.die(f"--decoder-dim must be a multiple of 4 (sine-cosine position embeddings), got {args.decoder_dim}")
    return args


# ----------------------------------------------------------------------------------------------
# The method. Copy with torch alone: patchify, unpatchify, random_masking, mae_loss, tcr, square_reg,
# mmae_loss
# ----------------------------------------------------------------------------------------------
def patchify(imgs, p):
    """(B, 3, H, W) -> (B, L, p*p*3), patches in row-major order, pixels (p, p, 3) within a patch."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, p):
    """(B, L, p*p*3) -> (B, 3, H, W), the inverse of patchify (square images)."""
    B, L, _ = x.shape
    h = int(round(L**0.5))
    x = x.reshape(B, h, h, p, p, 3)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, 3, h * p, h * p)


def random_masking(x, mask_ratio, generator=None):
    """Keep a random subset of round(L (1 - mask_ratio)) tokens per sample (argsort of uniform noise).
    x (B, L, D) -> x_visible (B, keep, D), mask (B, L) with 1 = hidden, ids_restore (B, L) such that
    gathering [visible, hidden] tokens with ids_restore puts every token back at its position."""
    B, L, D = x.shape
    keep = int(round(L * (1 - mask_ratio)))
    noise = torch.rand(B, L, device=x.device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)  # ascending: the first `keep` are kept
    ids_restore = ids_shuffle.argsort(dim=1)
    x_visible = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, D))
    mask = torch.ones(B, L, device=x.device)
    mask[:, :keep] = 0
    return x_visible, mask.gather(1, ids_restore), ids_restore


@torch.autocast("cuda", enabled=False)  # fp32 maths even when called under autocast
@torch.autocast("cpu", enabled=False)
def mae_loss(pred, target_patches, mask, norm_pix=True):
    """Mean squared error on the masked patches only. pred, target_patches (B, L, p*p*3), mask (B, L)."""
    pred, target = (x.to(torch.promote_types(x.dtype, torch.float32)) for x in (pred, target_patches))
    if norm_pix:  # each patch normalised by its own mean and variance
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((pred - target) ** 2).mean(-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def tcr(z, mu, all_sum=None):
    """Total coding rate log det(I_d + (mu/d) Z^T Z) of Z (B, d), rows L2-normalised here, in fp32+.
    By Sylvester's identity it equals log det(I_B + (mu/d) Z Z^T): the smaller Gram matrix is used,
    through a Cholesky factor (the matrix is symmetric positive definite): log det = 2 sum log diag. Z is the
    whole batch; half precision is computed in fp32; non-finite features give nan (the caller stops), not an error.
    Sharded (several processes): z is this rank's rows and all_sum sums a tensor over the ranks with its gradient
    (common.all_sum): Z^T Z of the whole batch is the sum of every rank's d x d one."""
    z = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)
    B, d = z.shape
    gram = all_sum(z.T @ z) if all_sum else z.T @ z if d <= B else z @ z.T  # (min(B, d), min(B, d)), or (d, d)
    eye = torch.eye(gram.shape[0], dtype=z.dtype, device=z.device)
    return 2 * torch.linalg.cholesky_ex(eye + (mu / d) * gram).L.diagonal().log().sum()


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def square_reg(z, all_sum=None):
    """U-MAE's regulariser: the mean of the squared entries of Z Z^T, Z (B, d) the whole batch, rows L2-normalised.
    Sharded (all_sum as for tcr): ||Z Z^T||_F^2 = ||Z^T Z||_F^2, from the d x d matrix summed over the ranks."""
    z = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)
    if all_sum:
        return (all_sum(z.T @ z) ** 2).sum() / all_sum(z.new_tensor(float(len(z)))) ** 2
    return ((z @ z.T) ** 2).mean()


def mmae_loss(l_mae, z, lam=0.01, mu=3.0, reg="tcr", all_sum=None):
    """Eq. (9): L = L_MAE - lambda TCR_mu(Z) (reg "tcr"), or L_MAE + lambda mean((Z Z^T)^2) (U-MAE, reg "square");
    z (B, d) the whole batch (sharded: this rank's rows, with all_sum). Returns (L, the regulariser's value)."""
    if reg == "tcr":
        r = tcr(z, mu, all_sum)
        return l_mae - lam * r, r  # maximise the coding rate
    r = square_reg(z, all_sum)
    return l_mae + lam * r, r  # minimise the squared similarities


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sine-cosine position embedding (1, 1 + grid^2, dim) of a grid x grid patch layout (row-major),
    as in MAE: the first dim/2 channels encode the column x, the last dim/2 the row y, each as
    [sin(p w_k), cos(p w_k)] with w_k = 10000^(-k / (dim/4)), k < dim/4; the CLS slot is zero."""
    w = 10000.0 ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    p = torch.arange(grid, dtype=torch.float64)[:, None] * w  # (grid, dim/4)
    enc = torch.cat([p.sin(), p.cos()], 1)  # (grid, dim/2): one coordinate
    x, y = enc.repeat(grid, 1), enc.repeat_interleave(grid, 0)  # token r*grid + c has column c, row r
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.cat([x, y], 1)]).float()[None]


class MAE(nn.Module):
    """ViT encoder (from common.py) on visible patches + CLS; light Transformer decoder with mask tokens.
    Both use fixed sine-cosine position embeddings (the encoder's learned ones are overwritten and frozen)."""

    def __init__(self, vit, dim, args):
        super().__init__()
        self.encoder, self.patch, self.pool = vit, vit.patch_size, args.pool
        grid = vit.image_size // vit.patch_size
        with torch.no_grad():
            vit.encoder.pos_embedding.copy_(sincos_pos_embed(dim, grid)).requires_grad_(False)
        dd = args.decoder_dim
        self.decoder_embed = nn.Linear(dim, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.register_buffer("decoder_pos", sincos_pos_embed(dd, grid))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Sequential(*[EncoderBlock(max(1, dd // 64), dd, 4 * dd, 0.0, 0.0)
                                       for _ in range(args.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, self.patch**2 * 3)

    def encode(self, imgs, mask_ratio, generator=None):
        vit = self.encoder
        pos = vit.encoder.pos_embedding  # (1, 1 + L, D)
        x, mask, ids_restore = random_masking(vit.tokens(imgs) + pos[:, 1:], mask_ratio, generator)
        cls = (vit.class_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        x = vit.encoder.ln(vit.encoder.layers(vit.encoder.dropout(torch.cat([cls, x], 1))))
        return x, mask, ids_restore  # (B, 1 + keep, D)

    def decode(self, latent, ids_restore):
        x = self.decoder_embed(latent)  # (B, 1 + keep, dd)
        B, L = ids_restore.shape
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(B, L - x.shape[1] + 1, -1)], 1)  # (B, L, dd)
        tokens = tokens.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2]))  # back in place
        x = torch.cat([x[:, :1], tokens], 1) + self.decoder_pos
        return self.decoder_pred(self.decoder_norm(self.decoder(x)))[:, 1:]  # (B, L, p*p*3)

    def forward(self, imgs, mask_ratio, generator=None):
        latent, mask, ids_restore = self.encode(imgs, mask_ratio, generator)
        z = latent[:, 0] if self.pool == "cls" else latent[:, 1:].mean(1)  # (B, D), features of the masked input
        return self.decode(latent, ids_restore), mask, z


@torch.no_grad()
def matrix_information(z1, z2):
    """Matrix-based Renyi entropies of order 2 (Giraldo et al. 2015; the paper's Sec. 3) of two views' Gram matrices
    K_v = Z_v Z_v^T, Z_v (B, d) with rows L2-normalised (so tr K_v = B). With A = K / tr K, H_2(A) = -log tr(A^2); the
    joint entropy is H_2 of K_1 o K_2 / tr(K_1 o K_2) (o: entrywise) and I_2 = H_2(K_1) + H_2(K_2) - H_2(K_1, K_2).
    The traces are sums of squared cosines c_v,ij = z_v,i . z_v,j, which gives I_2 in closed form (Prop. 4.1):
        H_2(K_v) = 2 log B - log sum_ij c_v,ij^2,      H_2(K_1, K_2) = 2 log B - log sum_ij c_1,ij^2 c_2,ij^2.
    Orthonormal rows: every entropy is log B; identical rows: 0. -> {"matrix_entropy": the mean of the two views'
    H_2, "matrix_joint_entropy", "matrix_mi"}, floats."""
    z1, z2 = F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)
    c1, c2 = (z1 @ z1.T) ** 2, (z2 @ z2.T) ** 2  # (B, B) squared cosines
    h1, h2, joint = (2 * math.log(len(z1)) - c.sum().log().item() for c in (c1, c2, c1 * c2))
    return {"matrix_entropy": (h1 + h2) / 2, "matrix_joint_entropy": joint, "matrix_mi": h1 + h2 - joint}


@torch.no_grad()
def uncentred_effective_rank(z):
    """exp(entropy of the normalised singular values) of the row-normalised, uncentred batch features (a float;
    eval_linear.effective_rank centres them first)."""
    if not torch.isfinite(z).all():  # a diverged run: the caller stops on its loss
        return float("nan")
    s = torch.linalg.svdvals(F.normalize(z.float(), dim=1))
    p = s / s.sum()
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum()).item()


@torch.no_grad()
def save_recon(model, imgs, args, stats, path, n=8):
    """Rows: original, masked input, reconstruction (visible patches pasted back), in pixel space, each image enlarged
    to about 128 px (nearest neighbour) so that the patches can be seen."""
    pred, mask, _ = model(imgs[:n], args.mask_ratio)
    target = patchify(imgs[:n].float(), model.patch)
    if args.norm_pix_loss:  # undo the per-patch normalisation with the true patches' statistics
        pred = pred.float() * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    m = mask[..., None]
    rows = [target, target * (1 - m), target * (1 - m) + pred.float() * m]
    mean, std = stats[0].view(1, 3, 1, 1).to(imgs.device), stats[1].view(1, 3, 1, 1).to(imgs.device)
    grid = torch.cat([unpatchify(r, model.patch) * std + mean for r in rows]).clamp(0, 1)
    grid = F.interpolate(grid.float(), scale_factor=max(1, 128 // grid.shape[-1]), mode="nearest")  # patches visible
    torchvision.utils.save_image(grid, path, nrow=n, padding=4, pad_value=1.0)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train(args):
    run = common.Run(args)  # device, run folder and its lock, signal handlers, seed
    data = common.load_data(args, run.device)  # uint8 images where --data-on says, kNN splits, statistics
    args = run.resolve(data)  # every value the run uses, resolved once: printed, kept in every checkpoint
    aug = common.MultiCrop(args.image_size, data.stats, 1, 0, args.global_scale, color=False)
    backbone, feat_dim = common.build_backbone(args.arch, args.image_size, args.width, args.pool, args.patch_size)
    model = common.to_device(MAE(backbone, feat_dim, args), run.device, args)
    mae = getattr(model, "module", model)
    opt = common.optimizer(args, model, betas=(0.9, 0.95))
    start = run.resume(model, opt)
    steps = len(data.images) // args.batch_size
    for epoch in range(start, args.epochs):
        g, metrics = common.aug_generator(args, run.device, epoch), common.Metrics()
        for i, x in enumerate(common.batches(data.images, args.batch_size, epoch, args.seed)):
            step = epoch * steps + i
            lr = common.cosine(step, args.epochs * steps, args.base_lr, 0.0, args.warmup_epochs * steps)
            common.set_schedule(opt, lr)
            imgs = aug(x, g)[0]
            with common.autocast(args, run.device):
                pred, mask, z = model(imgs, args.mask_ratio, g)
            l_mae = mae_loss(pred, patchify(imgs, mae.patch), mask, args.norm_pix_loss)  # this rank's images
            loss, reg = mmae_loss(l_mae, z, args.lam, args.mu, args.reg, common.all_sum)  # Z^T Z summed over ranks
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            metrics.add(loss=loss, recon=l_mae, **{args.reg: reg})
            common.check_finite(metrics["loss"], epoch, i)
        record = {"epoch": epoch + 1, **metrics.means(), "effective_rank": uncentred_effective_rank(z), "lr": lr}
        common.check_finite(record["loss"], epoch)  # effective rank: of the epoch's last batch
        if args.save_recon and run.rank == 0:
            save_recon(mae, imgs, args, data.stats, os.path.join(args.out_dir, f"recon_{epoch + 1:04d}.png"))
        if run.monitor_due(epoch):
            record["knn_top1"] = common.knn_monitor(backbone, data, run.device)
            with torch.no_grad():  # two views: the last batch under two more random masks
                views = [common.gather(mae(imgs, args.mask_ratio, g)[2]) for _ in range(2)]
            record.update(matrix_information(*views))
        run.save(record, model, backbone, opt)  # last.pt, then the log line
    run.finish()


if __name__ == "__main__":
    train(get_args())
