"""Evaluate a pretrained backbone on frozen features: weighted kNN and a linear probe.

    python eval_linear.py --checkpoint runs/simclr-cifar10-resnet18/last.pt

The backbone is rebuilt from the arguments saved in the checkpoint. Features of the labelled training
images and of the held-out split are extracted once (no augmentation, normalised pixels), then:
  * weighted kNN (DINO protocol; cosine similarity, k nearest vote exp(s / T)): k=20, T=0.07 and
    k=200, T=0.1 (the setting of the HyDeS paper's evaluation code); top-1 and top-5;
  * a linear classifier on the precomputed, standardised features (cross-entropy, SGD with momentum,
    cosine lr, --probe-epochs epochs); top-1 and top-5;
  * with --geometry, the representation geometry of the held-out backbone features, as the HyDeS paper's
    Table III (definitions in `geometry`; the paper names the metrics without formulas), and the class-centroid
    cosine-similarity matrix (its Figure 5) as <checkpoint>.centroids.png: centroids of the L2-normalised
    features minus their mean (ResNet features are >= 0, so raw cosines are all positive), classes in a greedy
    nearest-centroid order so related classes sit together (the order is saved in the JSON); beside them the
    alignment and uniformity of Wang & Isola (2020), the standard pair for contrastive representations;
  * with --wordnet DIR, for classes named by WordNet noun ids (Tiny-ImageNet, ImageNet, tin100), the HyDeS paper's
    Table IV: Spearman correlations of the class-centroid similarities with the Wu-Palmer and Leacock-Chodorow
    similarities of the classes, and the cophenetic correlation of an average-linkage clustering of the centroids
    with the WordNet path lengths; a Mantel permutation test gives the Wu-Palmer correlation a p-value. WordNet is
    read from its 3.0 database file data.noun by a few lines here (no NLTK; the similarities equal NLTK's). The
    paper's third column, MiniLM text-embedding similarities, needs a text model and is not computed;
  * with --dense [SOURCE], the paper's Table II: a linear probe of every pixel's hypercolumn (the backbone's feature
    maps upsampled and concatenated: a ResNet's stem and stages, a ViT's patch tokens after 4 evenly spaced blocks),
    20 epochs of AdamW, pixel accuracy and mIoU of held-out masks beside predicting the most frequent class
    everywhere. Masks: the synthetic shapes' (each pixel 0 or 1 + the shape's kind), PASCAL VOC 2012 (torchvision,
    at the checkpoint's image size: the paper's VOC numbers are of ImageNet-sized backbones), or a folder of images/
    and masks/;
  * with --pictures, where the backbone looks (the paper's Figs. 2-4) as <checkpoint>.pictures.png: a ViT's CLS
    attention averaged over blocks and heads and per head of the last block, or a SmoothGrad saliency (any
    backbone; see `smoothgrad` for which gradient and why), beside the first 3 principal components of the
    hypercolumns as colours; on images with masks, the foreground share of the map's mass against the object's share
    of the pixels (the share of a uniform map), over up to 256 images.
The numbers are printed and written to <checkpoint>.eval.json beside the checkpoint.
"""
import argparse
import collections
import contextlib
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import common


# ==== Flags ===========================================================================================================
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=common.HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by one of the method scripts")
    p.add_argument("--dataset", default=None, choices=common.DATASETS, help="default: the pretraining dataset")
    p.add_argument("--data-dir", default=None, help="default: the pretraining --data-dir")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True, help="download if missing")
    p.add_argument("--pool", default=None, choices=("cls", "mean"),
                   help="ViT features: CLS token or mean of patch tokens")
    p.add_argument("--probe-epochs", type=common.COUNT, default=100,
                   help="linear-probe epochs over the frozen features")
    p.add_argument("--probe-lr", type=common.POSITIVE, default=0.1, help="linear-probe SGD learning rate (batch 256)")
    p.add_argument("--probe-wd", type=common.NONNEG, default=0.0, help="linear-probe weight decay")
    p.add_argument("--limit", type=common.COUNT, default=None,
                   help="use a fixed random subset of N images of each split (quick checks)")
    p.add_argument("--geometry", action="store_true", help="also report the representation geometry and write the "
                   "class-centroid similarity matrix as a PNG")
    p.add_argument("--wordnet", metavar="DIR", help="also correlate the class centroids with WordNet (classes named by "
                   "WordNet noun ids, e.g. tinyimagenet): DIR holds WordNet 3.0's data.noun (Debian's wordnet-base: "
                   "/usr/share/wordnet)")
    p.add_argument("--dense", nargs="?", const="auto", metavar="SOURCE", help="also train the dense segmentation "
                   "probe on hypercolumns (HyDeS paper, Table II) on the masks of SOURCE: synthetic (the default for a "
                   "synthetic checkpoint), voc (PASCAL VOC 2012 in --data-dir) or a folder with images/ and masks/")
    p.add_argument("--dense-epochs", type=common.COUNT, default=20, help="dense-probe epochs (paper: 20)")
    p.add_argument("--pictures", nargs="?", const="auto", choices=("auto", "attention", "saliency"),
                   help="also draw where the backbone looks (attention for a ViT, SmoothGrad saliency otherwise) and "
                   "the hypercolumn PCA as <checkpoint>.pictures.png, on --dense's images (with their masks: the "
                   "foreground share) or the held-out split")
    p.add_argument("--skip-bad-images", action="store_true", help="folder/tinyimagenet: skip undecodable files")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe and of the geometry's augmentations")
    p.add_argument("--export", metavar="PATH", help="only write the backbone's weights to PATH as a plain state dict "
                   "for torchvision's resnet18/resnet50/VisionTransformer (README: loading it) and stop")
    return p.parse_args(argv)


# ==== The linear probe ================================================================================================
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


# ==== Geometry (HyDeS Table III), alignment and uniformity, class centroids (Fig. 5) ==================================
def effective_rank(x):
    """exp(entropy of the normalised singular values) of the centred rows of x (Roy & Vetterli 2007):
    between 1 (all variation along one direction) and min(n - 1, d) (equal variance along every direction)."""
    s = torch.linalg.svdvals(x - x.mean(0))
    p = s / s.sum()
    return torch.exp(-torch.special.xlogy(p, p).sum()).item()


def alignment(a, b):
    """Wang & Isola (2020): E ||z - z+||^2 over positive pairs (rows of a and b, L2-normalised here): 0 when every
    pair is one point, 4 when every pair is antipodal."""
    a, b = F.normalize(a.double(), dim=1), F.normalize(b.double(), dim=1)
    return (a - b).pow(2).sum(1).mean().item()


def uniformity(z, t=2.0):
    """Wang & Isola (2020): log E exp(-t ||z_i - z_j||^2) over the distinct pairs i < j of the rows of z (L2-normalised
    here; their code's pdist), in log space: -4 for orthonormal rows, -4n/(n-1) for the n vertices of a regular
    simplex (the lowest value n points reach), 0 when all rows are one point."""
    d2 = torch.pdist(F.normalize(z.double(), dim=1)).pow(2)  # (n (n - 1) / 2,)
    return (torch.logsumexp(-t * d2, 0) - math.log(len(d2))).item()


@torch.no_grad()
def geometry(f, pairs=None, labels=None):
    """Representation geometry of features f (N, D), computed on the L2-normalised rows z_i:
      anisotropy          mean cosine z_i . z_j over distinct pairs (0: spread, 1: one direction);
      center_norm         ||mean_i z_i|| (0: centred on the sphere, 1: collapsed);
      feature_correlation mean |Pearson correlation| between distinct feature dimensions, over samples;
      embedding_rank      effective rank of the centred z (see effective_rank);
      angle_all_mean/std  pairwise angles in degrees over distinct pairs;
      uniformity          Wang & Isola's uniformity, log E exp(-2 ||z_i - z_j||^2) over distinct pairs;
    with pairs = (a, b), two augmented views (M, D) of the same M images (positive pairs):
      angle_pos_mean/std  angle between the two views of each image;
      alignment           Wang & Isola's alignment, E ||a_i - b_i||^2 of the L2-normalised views;
      d_prime             sensitivity index of positive vs all angles, (mean_all - mean_pos) / sqrt((var_all +
                          var_pos) / 2): how many pooled standard deviations separate the two distributions;
    with class labels (N,):
      centroid_rank       effective rank of the centred class centroids of z (at most C - 1)."""
    z = F.normalize(f.double(), dim=1)
    n = len(z)
    off = ~torch.eye(n, dtype=torch.bool, device=z.device)
    cos = (z @ z.T)[off]
    ang = torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))
    corr = torch.corrcoef(z.T).nan_to_num()  # (D, D); a constant dimension counts as uncorrelated
    d = corr.shape[0]
    out = {"anisotropy": cos.mean().item(), "center_norm": z.mean(0).norm().item(),
           "feature_correlation": ((corr.abs().sum() - corr.diagonal().abs().sum()) / max(d * (d - 1), 1)).item(),
           "embedding_rank": effective_rank(z), "angle_all_mean": ang.mean().item(), "angle_all_std": ang.std().item(),
           "uniformity": uniformity(z)}
    if pairs is not None:
        a, b = (F.normalize(x.double(), dim=1) for x in pairs)
        pos = torch.rad2deg(torch.arccos((a * b).sum(1).clamp(-1, 1)))
        out.update(angle_pos_mean=pos.mean().item(), angle_pos_std=pos.std().item(),
                   d_prime=((ang.mean() - pos.mean()) / ((ang.var() + pos.var()) / 2).sqrt()).item(),
                   alignment=alignment(a, b))
    if labels is not None:
        out["centroid_rank"] = effective_rank(class_centroids(z, labels))
    return out


def class_centroids(z, labels):
    """(C, D) mean of the rows of z in each class 0..C-1 (classes without rows are dropped)."""
    C = int(labels.max()) + 1
    sums = torch.zeros(C, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, labels, z)
    counts = torch.bincount(labels, minlength=C)
    return sums[counts > 0] / counts[counts > 0, None]


def centroid_similarities(f, labels):
    """Cosine similarities (C', C') of the class centroids of the L2-normalised features f, taken relative to the
    mean feature (backbone features are >= 0 after a ReLU, so raw cosines are all positive), and which of the classes
    0..C-1 have rows (C' of them)."""
    z = F.normalize(f.double(), dim=1)
    centroids = F.normalize(class_centroids(z, labels) - z.mean(0), dim=1)
    return centroids @ centroids.T, torch.bincount(labels, minlength=int(labels.max()) + 1) > 0


def greedy_order(sim):
    """A chain through the classes: start at 0, then always the most similar class not yet visited."""
    order, left = [0], set(range(1, len(sim)))
    while left:
        nxt = max(left, key=lambda j: sim[order[-1], j].item())
        order.append(nxt)
        left.remove(nxt)
    return order


# ==== Semantic alignment with WordNet (the HyDeS paper's Table IV) ===================================================
def read_wordnet(path):
    """The noun hypernym graph of WordNet's data.noun (WordNet 3.0 database format, wndb(5)): -> {offset: [hypernym
    offsets]}, offsets as 8-digit strings. A line is `offset lex_filenum ss_type w_cnt word lex_id ... p_cnt ptr ...
    | gloss` (w_cnt in hex, p_cnt decimal, each pointer `symbol offset pos source/target`); hypernyms are the `@`
    (class) and `@i` (instance) pointers; the licence header's lines start with a space."""
    parents = {}
    for line in open(path, encoding="utf-8", errors="replace"):
        if line.startswith(" "):
            continue
        f = line.split(" | ")[0].split()
        w = int(f[3], 16)
        p = 4 + 2 * w  # the pointer count
        ptrs = [f[p + 1 + 4 * k: p + 5 + 4 * k] for k in range(int(f[p]))]
        parents[f[0]] = [o for sym, o, pos, _ in ptrs if sym in ("@", "@i") and pos == "n"]
    return parents


def synset_names(wordnet_dir):
    """{offset: NLTK's name of the synset, "lemma.n.NN"}: its first lemma in data.noun, lower-cased, and its sense
    number, the synset's place among that lemma's noun senses in index.noun (wndb(5): `lemma pos synset_cnt ...
    synset_offset...`, the offsets last; without index.noun: 01). Used where NLTK breaks a tie by name."""
    senses = {}
    with contextlib.suppress(OSError):
        for line in open(os.path.join(wordnet_dir, "index.noun"), encoding="utf-8", errors="replace"):
            if not line.startswith(" "):
                f = line.split()
                senses[f[0]] = f[len(f) - int(f[2]):]
    names = {}
    for line in open(os.path.join(wordnet_dir, "data.noun"), encoding="utf-8", errors="replace"):
        if not line.startswith(" "):
            f = line.split(maxsplit=5)
            offset, lemma = f[0], f[4].lower()
            order = senses.get(lemma, [])
            names[offset] = f"{lemma}.n.{order.index(offset) + 1 if offset in order else 1:02d}"
    return names


def hypernym_distances(parents, offset):
    """{ancestor: fewest hypernym steps from `offset` to it}, the synset itself at 0 (breadth first)."""
    dist, frontier = {offset: 0}, [offset]
    while frontier:
        nxt = []
        for o in frontier:
            for h in parents.get(o, []):
                if h not in dist:
                    dist[h] = dist[o] + 1
                    nxt.append(h)
        frontier = nxt
    return dist


def wordnet_similarities(parents, offsets, names=None):
    """(C, C) Wu-Palmer and Leacock-Chodorow similarities and shortest path lengths of the synsets `offsets`, defined
    as NLTK's wup_similarity, lch_similarity and shortest_path_distance (WordNet 3.0 nouns; checked against NLTK on
    all pairs of tin100's 100 classes). With d(a, c) the fewest hypernym steps from a up to c:
      path(a, b) = min over common hypernyms c of d(a, c) + d(b, c);
      Wu-Palmer  = 2 h / (path(a, l) + path(b, l) + 2 h), l the common hypernym farthest from the root by its
                   shortest path (a itself when it subsumes b; of several as far, NLTK's first by synset name,
                   `names` from synset_names; without names the smallest offset), h = 1 + the longest path from l up
                   to the root;
      Leacock-Chodorow = -log((path + 1) / (2 D)), D the longest path to the root in the whole noun taxonomy (19)."""
    shortest, longest = {}, {}

    def depth(o, memo, pick):  # steps from o up to the root by the shortest / longest path
        if o not in memo:
            memo[o] = 1 + pick(depth(h, memo, pick) for h in parents[o]) if parents.get(o) else 0
        return memo[o]
    D = max(depth(o, longest, max) for o in parents)
    up = [hypernym_distances(parents, o) for o in offsets]
    up_of = {}  # the same for each lowest common hypernym met

    def steps(u, v):  # the shortest path between two synsets, through the common hypernym that makes it shortest
        return min(u[c] + v[c] for c in u.keys() & v.keys())
    C = len(offsets)
    wup, lch, path = (torch.zeros(C, C, dtype=torch.float64) for _ in range(3))
    for i in range(C):
        for j in range(C):
            shared = up[i].keys() & up[j].keys()
            if not shared:
                raise ValueError(f"synsets {offsets[i]} and {offsets[j]} have no common hypernym")
            path[i, j] = steps(up[i], up[j])
            deepest = max(depth(c, shortest, min) for c in shared)
            lcs = [c for c in shared if depth(c, shortest, min) == deepest]
            lcs = offsets[i] if offsets[i] in lcs else min(lcs, key=lambda c: (names or {}).get(c, c))
            if lcs not in up_of:
                up_of[lcs] = hypernym_distances(parents, lcs)
            h = depth(lcs, longest, max) + 1
            wup[i, j] = 2 * h / (steps(up[i], up_of[lcs]) + steps(up[j], up_of[lcs]) + 2 * h)
            lch[i, j] = -math.log((path[i, j].item() + 1) / (2 * D))
    return wup, lch, path


def ranks(x):
    """Ranks 1..n of the entries of x (1-D), ties sharing their average rank (as Spearman's correlation needs): a value
    seen c times whose last copy has sorted position r gets r - (c - 1) / 2."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)  # values sorted ascending
    return (counts.cumsum(0) - (counts - 1) / 2).double()[inverse]


def pearson(a, b):
    """Pearson's correlation of two 1-D tensors (in [-1, 1]; rounding cannot take it past)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return (a @ b / (a.norm() * b.norm())).clamp(-1, 1).item()


def spearman(a, b):
    """Spearman's rank correlation: Pearson's of the ranks (ties averaged)."""
    return pearson(ranks(a), ranks(b))


def cophenetic(dist):
    """Average-linkage (UPGMA) agglomerative clustering of a (C, C) distance matrix -> (C, C) cophenetic distances:
    the linkage distance at which i and j first share a cluster."""
    d = dist.double().clone().fill_diagonal_(math.inf)
    clusters = {i: [i] for i in range(len(d))}
    coph = torch.zeros_like(d)
    while len(clusters) > 1:
        keys = list(clusters)
        sub = d[keys][:, keys]
        flat = int(sub.argmin())
        a, b = keys[flat // len(keys)], keys[flat % len(keys)]
        h = d[a, b].item()
        ia, ib = torch.tensor(clusters[a]), torch.tensor(clusters[b])
        coph[ia[:, None], ib[None, :]] = h
        coph[ib[:, None], ia[None, :]] = h
        na, nb = len(clusters[a]), len(clusters[b])
        merged = (na * d[a] + nb * d[b]) / (na + nb)  # average linkage: the size-weighted mean of the two rows
        d[a], d[:, a] = merged, merged
        d[a, a] = math.inf
        d[b], d[:, b] = math.inf, math.inf
        clusters[a] += clusters.pop(b)
    return coph


def wordnet_graph(wnids, wordnet_dir):
    """The hypernym graph of WordNet 3.0's data.noun in wordnet_dir (read_wordnet), after checking what --wordnet
    needs: classes named by noun ids, a readable data.noun, every class in it; each failure is one line, checked
    before any feature is computed."""
    bad = [w for w in wnids if not (len(w) == 9 and w[0] == "n" and w[1:].isdigit())]
    if bad:
        common.die(f"--wordnet needs classes named by WordNet noun ids (n01443537), got '{bad[0]}'")
    data = os.path.join(wordnet_dir, "data.noun")
    if not os.path.isfile(data):
        common.die(f"--wordnet {wordnet_dir}: no data.noun there (WordNet 3.0 database files; Debian's wordnet-base "
                   f"installs them in /usr/share/wordnet)")
    try:
        parents = read_wordnet(data)
    except (ValueError, IndexError):  # a field that is not a number, or a line cut short
        common.die(f"{data} is not in WordNet's database format (wndb: offset lex_filenum ss_type w_cnt ...)")
    missing = [w for w in wnids if w[1:] not in parents]
    if missing:
        common.die(f"{len(missing)} classes are not in {data} (first: {missing[0]}): is it WordNet 3.0?")
    return parents


def wordnet_alignment(centroid_sim, wnids, wordnet_dir):
    """Spearman correlations between the class-centroid cosine similarities and the WordNet Wu-Palmer / Leacock-
    Chodorow similarities over the class pairs, and the cophenetic correlation: Pearson between the cophenetic
    distances of an average-linkage clustering of the centroids (distance 1 - cosine) and the WordNet path lengths."""
    parents = wordnet_graph(wnids, wordnet_dir)
    try:
        wup, lch, path = wordnet_similarities(parents, [w[1:] for w in wnids], synset_names(wordnet_dir))
    except (ValueError, KeyError) as e:  # no common hypernym, or a hypernym pointer to a synset the file lacks
        common.die(f"{os.path.join(wordnet_dir, 'data.noun')}: the WordNet graph of these classes is incomplete ({e})")
    C = len(wnids)
    pairs = torch.triu_indices(C, C, 1)
    pick = lambda m: m[pairs[0], pairs[1]]  # noqa: E731  (the C (C - 1) / 2 class pairs)
    sim = centroid_sim.double().cpu()
    res = {"wordnet_wup_spearman": spearman(pick(sim), pick(wup)),
           "wordnet_lch_spearman": spearman(pick(sim), pick(lch)),
           "wordnet_cophenetic": pearson(pick(cophenetic(1 - sim)), pick(path))}
    # Mantel test of the Wu-Palmer correlation: the same statistic with the centroids' classes shuffled (rows and
    # columns together, 999 times); p = (1 + #{shuffled >= observed}) / 1000, the chance of that alignment by luck
    rank = torch.zeros(C, C, dtype=torch.float64)
    rank[pairs[0], pairs[1]] = ranks(pick(sim))
    rank, target, g = rank + rank.T, ranks(pick(wup)), torch.Generator().manual_seed(0)
    null = [pearson(pick(rank[p][:, p]), target) for p in (torch.randperm(C, generator=g) for _ in range(999))]
    res["wordnet_wup_p"] = (1 + sum(n >= res["wordnet_wup_spearman"] - 1e-12 for n in null)) / 1000
    return res


# ==== Dense: hypercolumns and the segmentation probe (HyDeS Table II) =================================================
def feature_maps(backbone, x, blocks=4):
    """The per-layer feature maps of a hypercolumn, each (B, C_l, H_l, W_l): a ResNet's stem output and each stage's
    (5 maps, strides 1, 1, 2, 4, 8 on the CIFAR stem); a ViT's patch tokens after `blocks` evenly spaced blocks (the
    last one after the final LayerNorm), as (B, D, S / p, S / p) grids."""
    if isinstance(backbone, common.ResNet):
        x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
        maps = [x]
        for stage in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
            maps.append(x := stage(x))
        return maps
    layers = backbone.encoder.layers
    keep = {len(layers) * (k + 1) // blocks - 1 for k in range(blocks)}
    g = x.shape[-1] // backbone.patch_size
    x = backbone.tokens(x)
    x = torch.cat([backbone.class_token.expand(len(x), -1, -1), x], 1) + backbone.pos_embed(x.shape[1])
    maps = []
    for i, block in enumerate(layers):
        x = block(x)
        if i in keep:
            t = backbone.encoder.ln(x) if i == len(layers) - 1 else x
            maps.append(t[:, 1:].transpose(1, 2).reshape(len(x), -1, g, g))
    return maps


class DenseProbe(torch.nn.Module):
    """A linear classifier of every pixel's hypercolumn (the concatenation of the feature maps upsampled bilinearly to
    the image size), each channel standardised first (BatchNorm without affine, its running statistics at test time).
    Upsampling is linear and a 1x1 classifier acts per channel, so it is computed as the sum over layers of the
    upsampled K-channel logits of each layer at its own resolution: the same function, without materialising a
    (B, sum C_l, S, S) tensor."""

    def __init__(self, channels, classes):
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.BatchNorm2d(c, affine=False) for c in channels)
        self.heads = torch.nn.ModuleList(torch.nn.Conv2d(c, classes, 1, bias=False) for c in channels)
        self.bias = torch.nn.Parameter(torch.zeros(classes, 1, 1))
        for h in self.heads:  # from uniform predictions, as linear probes start
            torch.nn.init.zeros_(h.weight)

    def forward(self, maps, size):  # list of (B, C_l, H_l, W_l) -> (B, K, size, size) logits
        return self.bias + sum(F.interpolate(h(n(m)), size=size, mode="bilinear", align_corners=False)
                               for m, n, h in zip(maps, self.norms, self.heads))


def segmentation_scores(confusion):
    """From a (K, K) confusion matrix (rows: true class, columns: predicted) -> (pixel accuracy, mIoU) in percent;
    IoU_c = TP / (TP + FP + FN), averaged over the classes present in the truth or the predictions."""
    c = confusion.double()
    tp, union = c.diagonal(), c.sum(0) + c.sum(1) - c.diagonal()
    return (tp.sum() / c.sum()).item() * 100, (tp[union > 0] / union[union > 0]).mean().item() * 100


def confusion_matrix(pred, truth, classes, ignore=255):
    """(K, K) counts of (true, predicted) over the pixels whose truth is not `ignore` (VOC's void)."""
    keep = truth != ignore
    return torch.bincount(truth[keep].long() * classes + pred[keep].long(), minlength=classes**2).view(classes, classes)


def dense_probe(backbone, train, val, stats, device, epochs=20, lr=1e-3, batch_size=32, seed=0):
    """The HyDeS paper's Table II protocol: a linear probe on the frozen backbone's hypercolumns (see DenseProbe)
    trained with AdamW (lr 1e-3, batch 32, 20 epochs, cosine lr), cross-entropy over the labelled pixels (255: void,
    ignored), feature maps computed batch by batch (memory stays one batch). -> pixel accuracy and mIoU of the
    held-out masks, beside the same scores of predicting the most frequent training class everywhere."""
    mean, std = (s.view(1, 3, 1, 1).to(device) for s in stats)
    prep = lambda x: (x.to(device).float() / 255 - mean) / std  # noqa: E731
    labels = torch.cat([train.masks.flatten(), val.masks.flatten()])
    for split, what in ((train, "train"), (val, "score")):
        if (split.masks != 255).sum() == 0:
            common.die(f"--dense: every {'training' if what == 'train' else 'held-out'} mask pixel is 255 (void): "
                       f"there is nothing to {what} the probe on")
    classes = int(labels[labels != 255].max()) + 1
    backbone.eval()
    with torch.no_grad():
        channels = [m.shape[1] for m in feature_maps(backbone, prep(train.images[:2]))]
    torch.manual_seed(seed)
    probe = DenseProbe(channels, classes).to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr)
    steps = math.ceil(len(train.images) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    size = train.images.shape[-1]
    for _ in tqdm(range(epochs), desc="dense probe", leave=False):
        for idx in torch.randperm(len(train.images)).split(batch_size):
            with torch.no_grad():
                maps = [m.float() for m in feature_maps(backbone, prep(train.images[idx]))]
            loss = F.cross_entropy(probe(maps, size), train.masks[idx].to(device).long(), ignore_index=255)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    probe.eval()
    confusion = torch.zeros(classes, classes, dtype=torch.long, device=device)
    with torch.no_grad():
        for i in range(0, len(val.images), 256):
            pred = probe(feature_maps(backbone, prep(val.images[i: i + 256])), size).argmax(1)
            confusion += confusion_matrix(pred, val.masks[i: i + 256].to(device), classes)
    counts = torch.bincount(train.masks[train.masks != 255].long(), minlength=classes)
    always = torch.zeros(classes, classes, dtype=torch.long, device=device)
    always[:, counts.argmax()] = confusion.sum(1)  # every pixel predicted as the most frequent class
    (acc, miou), (base_acc, base_miou) = segmentation_scores(confusion), segmentation_scores(always)
    return {"dense_pixel_acc": acc, "dense_miou": miou, "dense_baseline_pixel_acc": base_acc,
            "dense_baseline_miou": base_miou, "dense_classes": classes}


def read_segmentation(pairs, size, where):
    """(image file, mask file) pairs -> a Split of uint8 images (N, 3, size, size) and masks (N, size, size): the
    shorter side resized to `size` (images bilinear, masks nearest: their values are class indices), then the centre
    square."""
    from PIL import Image
    tf = torchvision.transforms
    image_tf = tf.Compose([tf.Resize(size), tf.CenterCrop(size), tf.PILToTensor()])
    mask_tf = tf.Compose([tf.Resize(size, tf.InterpolationMode.NEAREST), tf.CenterCrop(size), tf.PILToTensor()])
    images, masks = [], []
    for image, mask in tqdm(pairs, desc=f"reading {where}", leave=False):
        try:
            with Image.open(image) as im, Image.open(mask) as m:
                if m.mode not in ("L", "P"):
                    common.die(f"{mask}: a mask must be a one-channel image of class indices (mode L or P), not "
                               f"{m.mode}")
                images.append(image_tf(im.convert("RGB")))
                masks.append(mask_tf(m)[0])
        except OSError as e:
            common.die(f"cannot read {image} or {mask} [{type(e).__name__}: {e}]")
    return common.Split(torch.stack(images), torch.full((len(images),), -1), torch.stack(masks))


def segmentation_data(source, name, kw, size):
    """The (train, val) Splits with masks of --dense SOURCE: 'synthetic' or 'auto' (checked: a synthetic checkpoint's
    shape masks), 'voc' (PASCAL VOC 2012
    through torchvision, in --data-dir), or a folder with images/ and masks/ (a mask per image, the same file stem, a
    PNG of class indices, 255 ignored; a fixed random fifth held out)."""
    if source == "auto" and name == "synthetic" or source == "synthetic":
        return (common.get_dataset("synthetic", split=s, seed=kw["seed"]) for s in ("memory", "val"))
    if source == "voc":
        try:
            sets = [torchvision.datasets.VOCSegmentation(kw["data_dir"], "2012", s, download=kw["download"])
                    for s in ("train", "val")]
        except Exception as e:  # missing (RuntimeError) or offline (URLError, OSError)
            common.die(f"PASCAL VOC 2012 could not be found or downloaded in --data-dir {kw['data_dir']} "
                       f"[{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]: put VOCtrainval_11-May-2012"
                       f".tar (or its VOCdevkit folder) there, or use --dense DIR with images/ and masks/")
        return (read_segmentation(list(zip(d.images, d.masks)), size, f"VOC 2012 {d.image_set}") for d in sets)
    folders = [os.path.join(source, f) for f in ("images", "masks")]
    if not all(os.path.isdir(f) for f in folders):
        common.die(f"--dense {source}: expected the folders {folders[0]} and {folders[1]} (or: synthetic, voc)")
    images, masks = ({os.path.splitext(f)[0]: os.path.join(d, f) for f in sorted(os.listdir(d))
                      if f.lower().endswith(common.IMG_EXTENSIONS)} for d in folders)  # file stem -> path
    if not images or (lost := sorted(images.keys() - masks.keys())):
        common.die(f"--dense {source}: " + (f"no mask in {folders[1]} for {images[lost[0]]} ({len(lost)} images "
                                            f"without one)" if images else f"no image files in {folders[0]}"))
    pairs = [(images[k], masks[k]) for k in sorted(images)]
    if len(pairs) < 2:
        common.die(f"--dense {source}: one image with its mask; the probe needs at least 2 (a fifth is held out)")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))
    held = set(order[: max(1, len(pairs) // 5)].tolist())
    return (read_segmentation([p for i, p in enumerate(pairs) if (i in held) == v], size, source) for v in (0, 1))


# ==== Where the backbone looks (HyDeS Figs. 2-4) ======================================================================
def cls_attention(vit, x):
    """CLS-to-patch attention of every block and head of a ViT, (B, blocks, heads, S / p, S / p), each map summing to
    1 over the patches (the share the CLS token gives itself left out). torchvision's blocks do not return their
    weights, so each block is run here as its forward does (x + attn(ln_1 x), then + mlp(ln_2 x)), asking the
    attention for them."""
    g = x.shape[-1] // vit.patch_size
    x = vit.tokens(x)
    x = torch.cat([vit.class_token.expand(len(x), -1, -1), x], 1) + vit.pos_embed(x.shape[1])
    maps = []
    for block in vit.encoder.layers:
        y = block.ln_1(x)
        y, w = block.self_attention(y, y, y, need_weights=True, average_attn_weights=False)  # w (B, heads, T, T)
        x = x + block.dropout(y)
        x = x + block.mlp(block.ln_2(x))
        a = w[:, :, 0, 1:]
        maps.append((a / a.sum(-1, keepdim=True)).reshape(len(x), -1, g, g))
    return torch.stack(maps, 1)


def smoothgrad(backbone, x, samples=16, noise=0.15, seed=0):
    """SmoothGrad (Smilkov et al. 2017) of the norm of the backbone feature ||f(x)||: the gradient averaged over
    `samples` copies of x with Gaussian noise of std `noise` x (max - min of x), then per pixel the largest absolute
    value over the colour channels -> (B, S, S). The backbone feature rather than a projector's, so every method's
    checkpoint is read the same way (eval keeps only the backbone); its norm rather than the similarity to another
    crop, which would depend on the crop drawn."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    sigma = noise * (x.amax((1, 2, 3), keepdim=True) - x.amin((1, 2, 3), keepdim=True))
    total = torch.zeros_like(x)
    for _ in range(samples):
        xn = (x + sigma * torch.randn(x.shape, generator=g, device=x.device)).requires_grad_(True)
        backbone(xn).norm(dim=1).sum().backward()
        total += xn.grad
    return (total / samples).abs().amax(1)


def hypercolumn_pca(backbone, x, size=64):
    """The first three principal components of the hypercolumns of the images x (feature maps upsampled to at most
    `size` px, each channel standardised), taken over all their pixels together, each scaled to [0, 1] between its
    1st and 99th percentile -> (B, 3, s, s) colours: pixels the backbone describes alike get alike colours."""
    s = min(size, x.shape[-1])
    cols = torch.cat([F.interpolate(m.float(), size=s, mode="bilinear", align_corners=False)
                      for m in feature_maps(backbone, x)], 1)  # (B, C, s, s)
    v = cols.permute(0, 2, 3, 1).reshape(-1, cols.shape[1]).double()
    v = (v - v.mean(0)) / (v.std(0) + 1e-6)
    pcs = v @ torch.linalg.svd(v, full_matrices=False).Vh[:3].T  # (B s s, 3)
    lo, hi = torch.quantile(pcs, 0.01, dim=0), torch.quantile(pcs, 0.99, dim=0)
    pcs = ((pcs - lo) / (hi - lo + 1e-12)).clamp(0, 1).float()
    return pcs.reshape(len(x), s, s, 3).permute(0, 3, 1, 2)


def foreground_share(maps, masks):
    """Of non-negative maps (N, H, W) over images with masks (N, S, S) (0 background, 255 void, else an object):
    per image the share of the map's mass on object pixels, and the object's share of the pixels, which a uniform
    map gets (void pixels left out of both). A map coarser than the mask is spread evenly over the
    pixels of each of its cells."""
    if maps.shape[-1] != masks.shape[-1]:
        maps = F.interpolate(maps[:, None].float(), size=masks.shape[-2:], mode="nearest")[:, 0]
    obj, valid = ((masks != 0) & (masks != 255)).float(), (masks != 255).float()
    share = (maps * obj).sum((1, 2)) / (maps * valid).sum((1, 2)).clamp_min(1e-30)
    return share, obj.sum((1, 2)) / valid.sum((1, 2)).clamp_min(1)  # (N,), (N,)


def heat(v):
    """Values (..., H, W) in [0, 1] -> colours (..., 3, H, W), black - red - yellow - white."""
    return torch.stack([(3 * v).clamp(0, 1), (3 * v - 1).clamp(0, 1), (3 * v - 2).clamp(0, 1)], -3)


def save_pictures(columns, path, cell=96):
    """A grid (rows: images; columns: (title, (N, 3, h, w) colours in [0, 1])) as a PNG, each picture scaled to
    `cell` px (nearest: a 32 px image stays crisp), the titles on top."""
    from PIL import Image, ImageDraw
    n, top = len(columns[0][1]), 16
    img = Image.new("RGB", (len(columns) * (cell + 4) + 4, top + n * (cell + 4) + 4), "white")
    draw = ImageDraw.Draw(img)
    for j, (title, pics) in enumerate(columns):
        draw.text((4 + j * (cell + 4), 2), title, fill="black")
        pics = F.interpolate(pics.float().cpu(), size=(cell, cell), mode="nearest").clamp(0, 1)
        for i, p in enumerate(pics):
            tile = Image.fromarray((p.permute(1, 2, 0) * 255).round().byte().numpy())
            img.paste(tile, (4 + j * (cell + 4), top + 4 + i * (cell + 4)))
    img.save(path)


def pictures(backbone, split, stats, device, kind, path, size=None, show=6, measure=256):
    """Where the backbone looks, on `show` images spread over `split`: a PNG grid of each image with its map overlaid
    (ViT, kind 'attention': the CLS attention averaged over blocks and heads, then each head of the last block;
    kind 'saliency': SmoothGrad, any backbone) and the hypercolumn PCA; with masks, the foreground share of the
    maps over the first `measure` images (see foreground_share). The images are the model's input, the centre
    `size` px of larger squares (ImageNet's 224 of 256), as the features see them. -> the numbers for the JSON."""
    mean, std = (s.view(1, 3, 1, 1).to(device) for s in stats)
    backbone.eval()

    def maps(x):  # -> (mean map (B, h, w), [per-head maps]) of normalised images x
        if kind == "saliency":
            return smoothgrad(backbone, x), []
        with torch.no_grad():
            a = cls_attention(backbone, x)  # (B, blocks, heads, g, g)
        return a.mean((1, 2)), list(a[:, -1].unbind(1))

    x = common.centre(split.images[torch.linspace(0, len(split.images) - 1, show).long()].to(device), size)
    xn = (x.float() / 255 - mean) / std
    avg, heads = maps(xn)
    with torch.no_grad():
        pca = hypercolumn_pca(backbone, xn)
    picture = x.float() / 255
    overlay = lambda m: 0.45 * picture + 0.55 * heat(  # noqa: E731  (each map scaled by its own maximum)
        F.interpolate((m / m.amax((1, 2), keepdim=True).clamp_min(1e-30))[:, None], size=x.shape[-2:],
                      mode="nearest")[:, 0])
    title = "attention" if kind == "attention" else "SmoothGrad"
    columns = [("image", picture), (title, overlay(avg))] + [(f"head {h}", overlay(m)) for h, m in enumerate(heads)]
    with common.writing(path):
        save_pictures(columns + [("PCA", pca)], path)
    out = {"pictures": path, "pictures_map": kind}
    if split.masks is not None:
        shares = [foreground_share(maps((common.centre(split.images[i: i + 32].to(device), size).float() / 255 - mean)
                                        / std)[0].detach(), common.centre(split.masks[i: i + 32].to(device), size))
                  for i in range(0, min(measure, len(split.images)), 32)]
        out["foreground_share"], out["foreground_area"] = (torch.cat(v).mean().item() for v in zip(*shares))
    return out


# ==== Class names, and the centroid picture ===========================================================================
SHAPES = ("disk", "square", "triangle", "ring", "plus", "diamond", "bar", "half disk", "two dots", "frame")


def folder_root(name, data_dir):
    """The folder holding train/ of a folder or Tiny-ImageNet dataset."""
    if name in ("folder", "imagenet") or os.path.isfile(os.path.join(data_dir, "wnids.txt")):
        return data_dir
    return os.path.join(data_dir, "tiny-imagenet-200")


def class_wnids(name, data_dir, classes=None):
    """The class folder names (sorted, as the labels are) of a folder-like dataset, those of --classes FILE alone when
    given, for --wordnet."""
    if name not in ("folder", "tinyimagenet", "imagenet"):
        common.die(f"--wordnet needs a dataset whose classes are WordNet ids (folder, tinyimagenet, imagenet), not "
                   f"{name}")
    names = torchvision.datasets.folder.find_classes(os.path.join(folder_root(name, data_dir), "train"))[0]
    return common.keep_classes(names, range(len(names)), names, classes)[0] if classes else names


def class_names(name, data_dir, count, classes=None):
    """Readable names of the classes 0..count-1: torchvision's for CIFAR and STL-10, the shapes of synthetic, the
    folder names for folder and Tiny-ImageNet, or for a wnid the first name that a words.txt beside train/ gives it
    (lines "wnid<TAB>names", as Tiny-ImageNet ships it)."""
    names = []
    with contextlib.suppress(Exception):  # no names found: the class numbers
        if name == "synthetic":
            names = list(SHAPES)
        elif name in ("folder", "tinyimagenet", "imagenet"):
            root = folder_root(name, data_dir)
            names = class_wnids(name, data_dir, classes)
            words = dict(line.rstrip("\n").split("\t", 1) for line in open(os.path.join(root, "words.txt")))
            names = [words[w].split(",")[0] if w in words else w for w in names]
        else:
            Data = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}.get(name)
            names = (Data(data_dir, train=False) if Data else torchvision.datasets.STL10(data_dir, "test")).classes
    return [str(n) for n in names[:count]] + [str(i) for i in range(len(names), count)]


def save_similarity_png(sim, path, names):
    """The class-centroid cosine-similarity matrix (C, C) as a picture a person reads: cells of at least 6 px coloured
    blue (-1), white (0), red (+1), class names on both axes (every k-th one past 30 classes), a colour scale.
    -> (x, y, cell): the top-left corner of the matrix and the cell size, in pixels."""
    from PIL import Image, ImageDraw, ImageFont
    C, s = len(sim), sim.float().clamp(-1, 1)
    cell, every = max(6, min(28, 700 // C)), math.ceil(C / 30)
    try:
        font = ImageFont.load_default(size=max(9, min(14, cell * every - 2)))
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    names = [n if len(n) <= 22 else n[:21] + "." for n in names]
    margin = 10 + int(max(font.getlength(n) for n in names[::every]))
    x0 = y0 = margin
    img = Image.new("RGB", (x0 + C * cell + 80, y0 + C * cell + 34), "white")
    draw = ImageDraw.Draw(img)
    colour = lambda v: tuple(round(255 * c) for c in ((1, 1 - v, 1 - v) if v >= 0 else (1 + v, 1 + v, 1)))  # noqa
    for i in range(C):
        for j in range(C):
            draw.rectangle([x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell - 1, y0 + (i + 1) * cell - 1],
                           fill=colour(s[i, j].item()))
    column = Image.new("RGB", (margin, C * cell), "white")  # column names: drawn across, then turned upright
    cdraw = ImageDraw.Draw(column)
    for i in range(0, C, every):
        mid = y0 + i * cell + cell // 2
        draw.text((x0 - 5, mid), names[i], fill="black", font=font, anchor="rm")
        cdraw.text((margin - 5, (C - 1 - i) * cell + cell // 2), names[i], fill="black", font=font, anchor="rm")
    img.paste(column.rotate(-90, expand=True), (x0, 0))  # clockwise: the last row of `column` is the first column
    bar_x, h = x0 + C * cell + 14, C * cell
    for k in range(h):  # the colour scale: +1 at the top, -1 at the bottom
        draw.line([bar_x, y0 + k, bar_x + 14, y0 + k], fill=colour(1 - 2 * k / max(h - 1, 1)))
    for v, k in ((1, 0), (0, h // 2), (-1, h - 1)):
        draw.text((bar_x + 18, y0 + k), f"{v:+d}" if v else "0", fill="black", font=font, anchor="lm")
    draw.text((x0, y0 + C * cell + 8), "cosine similarity of class centroids (centred features)", fill="black",
              font=font)
    img.save(path)
    return x0, y0, cell


# ==== The checkpoint, its data and its backbone =======================================================================
Eval = collections.namedtuple("Eval", "name data_dir classes memory val seg size backbone stats device base kind")
# what the evaluations share: the dataset (name, folder, --classes of the run), the labelled memory and held-out
# Splits, the (train, val) Splits with masks of --dense or None, the model's input side, the backbone (eval mode, on
# `device`), the pixel statistics, the output path without its extension and the kind of --pictures


def prepare(args, ck):
    """Check what each evaluation asked for needs before any of the minutes of features and probes (a WordNet folder,
    wnid classes, masks, a ViT for attention), then load the splits and the backbone. -> Eval."""
    saved, device = ck["args"], common.pick_device(args.device)
    name, data_dir = args.dataset or saved["dataset"], args.data_dir or saved["data_dir"]
    same = name == saved["dataset"] and data_dir == saved["data_dir"]  # the pretraining images: its classes and cache
    classes = saved.get("classes") if same else None
    if args.wordnet:  # the class names are noun ids of the data.noun there
        wordnet_graph(class_wnids(name, data_dir, classes), args.wordnet)
    kind = args.pictures if args.pictures != "auto" else "attention" if saved["arch"].startswith("vit") else "saliency"
    if kind == "attention" and not saved["arch"].startswith("vit"):
        common.die(f"--pictures attention needs a ViT checkpoint (this one is {saved['arch']}): --pictures saliency")
    if args.dense == "auto" and name != "synthetic":
        common.die(f"the {name} dataset has no segmentation masks: --dense voc (PASCAL VOC 2012), or --dense DIR "
                   f"with DIR/images and DIR/masks")
    kw = dict(data_dir=data_dir, download=args.download, image_size=saved.get("image_size"), seed=saved["seed"],
              skip_bad=args.skip_bad_images or saved.get("skip_bad_images", False), classes=classes,
              cache_dir=saved.get("cache_dir") if same and saved.get("data_on") == "disk" else None)
    memory, val = (common.get_dataset(name, split=s, **kw) for s in ("memory", "val"))
    labelled = (memory.labels >= 0).nonzero().flatten()  # STL-10's unlabelled images are -1
    memory, val = common.subset(common.take(memory, labelled), args.limit), common.subset(val, args.limit)
    size = common.model_side(name, kw["image_size"], memory.images.shape[-1])
    source = args.dense or ("synthetic" if name == "synthetic" and args.pictures else None)  # where masks come from
    seg = [common.subset(s, args.limit) for s in segmentation_data(source, name, kw, size)] if source else None
    backbone, _ = common.build_backbone(saved["arch"], size, saved.get("width", 64), args.pool or saved.get(
        "pool", "cls"), saved.get("patch_size"))
    try:
        backbone.load_state_dict(ck["backbone"])
    except RuntimeError as e:
        common.die(f"the checkpoint's backbone does not fit {saved['arch']} at {size} px: {str(e).splitlines()[0]}")
    if "mean" in saved:  # the per-channel statistics pretraining normalised with
        stats = (torch.tensor(saved["mean"]), torch.tensor(saved["std"]))
    else:  # a checkpoint without them (random init): the statistics of the labelled training images
        stats = common.pixel_stats(memory.images)
    return Eval(name, data_dir, classes, memory, val, seg, size, backbone.to(device).eval(), stats, device,
                os.path.splitext(args.checkpoint)[0], kind)


# ==== main: the evaluations in order ==================================================================================
def knn_and_linear(ev, args):
    """Weighted kNN (k 20, T 0.07 and k 200, T 0.1) and the linear probe on the frozen features of the memory and
    held-out splits. -> (results, the held-out features and labels)."""
    tr_f, tr_y = common.extract_features(ev.backbone, ev.memory, ev.stats, ev.device, ev.size)
    te_f, te_y = common.extract_features(ev.backbone, ev.val, ev.stats, ev.device, ev.size)
    res = {"feature_dim": tr_f.shape[1]}
    for k, T in ((20, 0.07), (200, 0.1)):
        res[f"knn{k}_top1"], res[f"knn{k}_top5"] = common.knn_classify(tr_f, tr_y, te_f, te_y, k, T)
    res["linear_top1"], res["linear_top5"] = linear_probe(tr_f, tr_y, te_f, te_y, args.probe_epochs, args.probe_lr,
                                                          args.probe_wd, seed=args.seed)
    return res, te_f, te_y


def geometry_of(ev, te_f, te_y, seed):
    """--geometry on up to 2,000 held-out images (positive pairs: two augmented crops of each), and the picture of
    the class-centroid similarities in a greedy nearest-centroid order (saved in the results)."""
    keep = common.subset(common.Split(torch.arange(len(ev.val.images)), ev.val.labels), 2000).images
    g = torch.Generator(device=ev.device).manual_seed(seed)
    views = common.MultiCrop(ev.size, ev.stats, n_global=2)(ev.val.images[keep].to(ev.device), g)
    with torch.no_grad():
        pairs = [torch.cat([ev.backbone(c).float() for c in v.split(500)]) for v in views]
    res = geometry(te_f[keep.to(te_f.device)], pairs, te_y[keep.to(te_y.device)])
    sim, _ = centroid_similarities(te_f, te_y)
    order = greedy_order(sim)
    names = class_names(ev.name, ev.data_dir, len(sim), ev.classes)
    with common.writing(ev.base + ".centroids.png"):
        save_similarity_png(sim[order][:, order], ev.base + ".centroids.png", [names[i] for i in order])
    return {**res, "centroid_order": order}


def wordnet_of(ev, te_f, te_y, wordnet_dir):
    """--wordnet: the class-centroid similarities against WordNet's (Table IV), for the classes present."""
    sim, present = centroid_similarities(te_f, te_y)
    wnids = [w for w, p in zip(class_wnids(ev.name, ev.data_dir, ev.classes), present.tolist()) if p]
    return wordnet_alignment(sim, wnids, wordnet_dir)


def main(args):
    ck = common.load_checkpoint(args.checkpoint)
    if args.export:  # the backbone is a torchvision model (CIFAR stem at <= 64 px) without its classifier
        common.save_checkpoint(args.export, ck["backbone"])
        return print(f"wrote {args.export}: load it with load_state_dict(..., strict=False) (README)")
    ev = prepare(args, ck)
    res = {"checkpoint": os.path.abspath(args.checkpoint), "dataset": ev.name, "epoch": ck["epoch"],
           "arch": ck["args"]["arch"]}
    scores, te_f, te_y = knn_and_linear(ev, args)
    res.update(scores)
    if args.geometry:
        res.update(geometry_of(ev, te_f, te_y, args.seed))
    if args.wordnet:
        res.update(wordnet_of(ev, te_f, te_y, args.wordnet))
    if args.dense:
        res.update(dense_probe(ev.backbone, *ev.seg, ev.stats, ev.device, args.dense_epochs, seed=args.seed))
    if args.pictures:
        res.update(pictures(ev.backbone, ev.seg[1] if ev.seg else ev.val, ev.stats, ev.device, ev.kind,
                            ev.base + ".pictures.png", ev.size))
    out = ev.base + ".eval.json"
    with common.writing(out), open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(" ".join(f"{k}={v:.2f}" for k, v in res.items() if isinstance(v, float)))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    try:
        main(get_args())
    except KeyboardInterrupt:  # Ctrl-C during feature extraction or the probe: one line, as training stops
        print("\nSIGINT: evaluation stopped before its results were written (they are written at the end)",
              file=sys.stderr)
        raise SystemExit(130) from None
