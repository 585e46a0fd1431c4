"""Evaluate a pretrained backbone on frozen features: weighted kNN and a linear probe.

    python eval_linear.py --checkpoint runs/simclr-cifar10-resnet18/last.pt

The backbone is rebuilt from the arguments saved in the checkpoint. Features of the labelled training
images and of the held-out split are extracted once (no augmentation, normalised pixels), then:
  * weighted kNN (DINO protocol; cosine similarity, k nearest vote exp(s / T)): k=20, T=0.07 and
    k=200, T=0.1 (the setting of the HyDeS paper's evaluation code); top-1 and top-5;
  * a linear classifier on the precomputed, standardised features (cross-entropy, SGD with momentum,
    cosine lr, --probe-epochs epochs); top-1 and top-5;
  * with --geometry, the representation geometry of the held-out features: effective rank,
    anisotropy, centre-vector norm, mean pairwise angle over all pairs and over positive pairs.
The numbers are printed and written to <checkpoint>.eval.json beside the checkpoint.
"""
import argparse
import json
import math
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by one of the method scripts")
    p.add_argument("--dataset", default=None, choices=common.DATASETS, help="default: the pretraining dataset")
    p.add_argument("--data-dir", default=None, help="default: the pretraining --data-dir")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True, help="download if missing")
    p.add_argument("--pool", default=None, choices=("cls", "mean"), help="ViT features: CLS token or mean of patch tokens")
    p.add_argument("--probe-epochs", type=int, default=100, help="linear-probe epochs over the frozen features")
    p.add_argument("--probe-lr", type=float, default=0.1, help="linear-probe SGD learning rate (batch 256)")
    p.add_argument("--probe-wd", type=float, default=0.0, help="linear-probe weight decay")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images of each split (quick checks)")
    p.add_argument("--geometry", action="store_true", help="also report effective rank, anisotropy, angles")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe and of the geometry's augmentations")
    args = p.parse_args(argv)
    if args.probe_epochs < 1:
        common.die(f"--probe-epochs must be >= 1, got {args.probe_epochs}")
    return args


def linear_probe(train_f, train_y, test_f, test_y, epochs=100, lr=0.1, wd=0.0, batch_size=256, seed=0):
    """Softmax regression on standardised frozen features; returns (top1, top5) in percent."""
    mu, sd = train_f.mean(0), train_f.std(0) + 1e-6
    train_f, test_f = (train_f - mu) / sd, (test_f - mu) / sd
    C = int(train_y.max()) + 1
    torch.manual_seed(seed)
    clf = torch.nn.Linear(train_f.shape[1], C).to(train_f.device)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    steps = math.ceil(len(train_f) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    for _ in tqdm(range(epochs), desc="linear probe", leave=False):
        for idx in torch.randperm(len(train_f), device=train_f.device).split(batch_size):
            loss = F.cross_entropy(clf(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        pred = clf(test_f).topk(min(5, C), dim=1).indices
    top1 = (pred[:, 0] == test_y).float().mean().item() * 100
    top5 = (pred == test_y[:, None]).any(1).float().mean().item() * 100
    return top1, top5


@torch.no_grad()
def geometry(f, f_pos=None):
    """Representation geometry of features f (N, D) (and of a second view f_pos of the same images):
    effective rank = exp(entropy of the normalised singular values of the centred features);
    anisotropy = mean cosine similarity between distinct samples; centre norm = |mean of the
    L2-normalised features|; mean pairwise angle (degrees) over all pairs and over positive pairs."""
    z = F.normalize(f.double(), dim=1)
    n = len(z)
    s = torch.linalg.svdvals(f.double() - f.double().mean(0))
    p = s / s.sum()
    cos = z @ z.T
    off = cos[~torch.eye(n, dtype=torch.bool, device=z.device)]
    ang = torch.rad2deg(torch.arccos(off.clamp(-1, 1)))
    out = {"effective_rank": torch.exp(-(p * p.clamp_min(1e-300).log()).sum()).item(),
           "anisotropy": off.mean().item(), "center_norm": z.mean(0).norm().item(),
           "angle_all_mean": ang.mean().item(), "angle_all_std": ang.std().item()}
    if f_pos is not None:
        pos = torch.rad2deg(torch.arccos((z * F.normalize(f_pos.double(), dim=1)).sum(1).clamp(-1, 1)))
        out.update(angle_pos_mean=pos.mean().item(), angle_pos_std=pos.std().item())
    return out


def main(args):
    ck = common.load_checkpoint(args.checkpoint)
    saved = ck["args"]
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    name, data_dir = args.dataset or saved["dataset"], args.data_dir or saved["data_dir"]
    kw = dict(data_dir=data_dir, download=args.download, image_size=saved.get("image_size"), seed=saved["seed"])
    memory, val = common.get_dataset(name, split="memory", **kw), common.get_dataset(name, split="val", **kw)
    labelled = memory.labels >= 0
    memory = common.ImageTensors(memory.images[labelled][: args.limit], memory.labels[labelled][: args.limit])
    val = common.ImageTensors(val.images[: args.limit], val.labels[: args.limit])
    size = memory.images.shape[-1]
    backbone, _ = common.build_backbone(saved["arch"], size, saved.get("width", 64), args.pool or saved.get("pool", "cls"),
                                        saved.get("patch_size"))
    try:
        backbone.load_state_dict(ck["backbone"])
    except RuntimeError as e:
        common.die(f"the checkpoint's backbone does not fit {saved['arch']} at {size} px: {str(e).splitlines()[0]}")
    backbone.to(device)
    x = memory.images[:10000].float() / 255
    stats = (x.mean((0, 2, 3)), x.std((0, 2, 3)))  # the same per-channel statistics as in pretraining
    tr_f, tr_y = common.extract_features(backbone, memory, *stats, device)
    te_f, te_y = common.extract_features(backbone, val, *stats, device)
    res = {"checkpoint": os.path.abspath(args.checkpoint), "dataset": name, "epoch": ck["epoch"],
           "arch": saved["arch"], "feature_dim": tr_f.shape[1]}
    for k, T in ((20, 0.07), (200, 0.1)):
        res[f"knn{k}_top1"], res[f"knn{k}_top5"] = common.knn_classify(tr_f, tr_y, te_f, te_y, k, T)
    res["linear_top1"], res["linear_top5"] = linear_probe(tr_f, tr_y, te_f, te_y, args.probe_epochs, args.probe_lr,
                                                          args.probe_wd, seed=args.seed)
    if args.geometry:  # on up to 2000 held-out images; positive pairs = two augmented crops of each
        g = torch.Generator(device=device).manual_seed(args.seed)
        v1, v2 = common.MultiCrop(size, *stats, n_global=2)(val.images[:2000].to(device), g)
        backbone.eval()
        with torch.no_grad():
            pos = geometry(backbone(v1).float(), backbone(v2).float())
        res.update(geometry(te_f[:2000]), angle_pos_mean=pos["angle_pos_mean"], angle_pos_std=pos["angle_pos_std"])
    out = os.path.splitext(args.checkpoint)[0] + ".eval.json"
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(" ".join(f"{k}={v:.2f}" for k, v in res.items() if isinstance(v, float)))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main(get_args())
