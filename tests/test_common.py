"""Plumbing: batched augmentation, kNN vote, schedule, checkpoints, synthetic data."""
import math
import os
import shutil

import pytest
import torch

import common


def test_random_resized_crop_identity_box():
    # scale = (1, 1) and ratio = (1, 1) on a square image leave one possible box: the whole image. Without
    # flips the bilinear resample at the same size is then the identity.
    x = torch.rand(4, 3, 16, 16)
    y = common.random_resized_crop(x, 16, (1.0, 1.0), torch.Generator().manual_seed(0), ratio=(1, 1), flip=False)
    assert torch.allclose(y, x, atol=1e-5)


def test_random_resized_crop_flip_and_shapes():
    x = torch.arange(8.0).view(1, 1, 1, 8).expand(64, 3, 8, 8).contiguous()
    y = common.random_resized_crop(x, 8, (1.0, 1.0), torch.Generator().manual_seed(0), ratio=(1, 1))
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    same = (y == x).flatten(1).all(1)
    assert (flipped | same).all() and 10 < flipped.sum() < 54  # each image flipped with p = 1/2
    assert common.random_resized_crop(x, 5, (0.1, 0.5), torch.Generator()).shape == (64, 3, 5, 5)


def test_crop_area_follows_scale_range():
    # A crop of a ramp image x(i, j) = j spans the columns [j0, j0 + w): the sampled values' range
    # over the output tells w. Areas w*h / (H*W) must lie in the scale range (up to rounding).
    H = 64
    ramp = torch.arange(H, dtype=torch.float32).view(1, 1, 1, H).expand(500, 1, H, H)
    out = common.random_resized_crop(ramp, 32, (0.2, 0.5), torch.Generator().manual_seed(1), flip=False)
    width = out[:, 0, 0, -1] - out[:, 0, 0, 0]  # about (w - 1) * (31/32) + ... >= 0
    ramp_t = ramp.transpose(-1, -2)
    out_t = common.random_resized_crop(ramp_t, 32, (0.2, 0.5), torch.Generator().manual_seed(1), flip=False)
    height = out_t[:, 0, -1, 0] - out_t[:, 0, 0, 0]
    # centres of the first and last output pixels are (w / 32) * 31 input pixels apart
    area = (width * 32 / 31) * (height * 32 / 31) / H**2
    assert area.min() > 0.2 - 0.03 and area.max() < 0.5 + 0.03
    assert area.mean() == pytest.approx(0.35, abs=0.03)  # area ~ U(0.2, 0.5)
    # the same generator seed draws the same boxes for both images: w / h is the box's aspect ratio,
    # log-uniform in [3/4, 4/3] (up to the integer rounding of w and h): inside the range, mean log ~ 0
    ratio = (width / height).log()
    assert ratio.abs().max() < math.log(4 / 3) + 0.15 and ratio.mean().abs() < 0.03
    assert ratio.min() < math.log(0.8) and ratio.max() > math.log(1.25)  # and it does use the range


def test_multicrop_views_shapes_determinism_independence():
    x = common.synthetic(8, 0).images
    aug = common.MultiCrop(32, (torch.full((3,), 0.5), torch.full((3,), 0.25)), n_global=2, n_local=3)
    views = aug(x, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 3
    again = aug(x, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(views, again))  # same seed, same crops
    # the same image repeated gets different crops (per-sample randomness, not per batch)
    same = aug(x[:1].repeat(4, 1, 1, 1), torch.Generator().manual_seed(1))[0]
    assert not torch.allclose(same[0], same[1])


def test_color_jitter_identity_and_grey_stays_grey():
    x = torch.rand(5, 3, 6, 6)
    assert torch.allclose(common.color_jitter(x, torch.Generator(), 0, 0, 0, 0), x, atol=1e-5)
    # a grey image has zero saturation: saturation and hue jitter of any strength leave it unchanged
    grey = torch.rand(5, 1, 6, 6).expand(5, 3, 6, 6)
    assert torch.allclose(common.color_jitter(grey, torch.Generator(), 0, 0, 0.9, 0.5), grey, atol=1e-5)
    # pure red with hue shifted by h in [-0.1, 0.1] keeps max channel 1 and min channel 0
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(50, 3, 1, 1)
    y = common.color_jitter(red, torch.Generator().manual_seed(0), 0, 0, 0, 0.1)
    assert torch.allclose(y.amax(1), torch.ones(50, 1, 1)) and torch.allclose(y.amin(1), torch.zeros(50, 1, 1))


def test_gray_is_pils_luma():
    # PIL's convert("L") is L = R 299/1000 + G 587/1000 + B 114/1000 rounded to an integer (in 16-bit fixed point):
    # gray() of the same uint8 pixels, times 255 and rounded, gives the same 256 values
    import numpy as np
    from PIL import Image
    x = torch.randint(0, 256, (1, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    pil = torch.from_numpy(np.array(Image.fromarray(x[0].permute(1, 2, 0).numpy()).convert("L")))
    assert torch.equal((common.gray(x.float() / 255)[0, 0] * 255).round().to(torch.uint8), pil)


def test_color_jitter_is_torchvisions_per_sample():
    # The batched jitter draws its four factors per sample from the generator, in this order, as U(1-b, 1+b),
    # U(1-c, 1+c), U(1-s, 1+s), U(-h, h); applied one sample at a time, torchvision's functional ops with those factors
    # must give the same image (the ops of torchvision's ColorJitter, fixed order), up to their grey weights: R 0.2989
    # there, 0.299 here (PIL's), so a grey level differs by 1e-4 R and each of the two blends with it (contrast, factor
    # c in [0.6, 1.4]; saturation, s in [0.8, 1.2]) by at most 1e-4 |1 - factor| <= 0.4e-4: 1e-4 covers both
    from torchvision.transforms.v2 import functional as TF
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = common.color_jitter(x, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    bf, cf, sf = (torch.rand(16, generator=g) * 2 * r + 1 - r for r in (0.4, 0.4, 0.2))
    hf = torch.rand(16, generator=g) * 0.2 - 0.1
    for i in range(16):
        ref = TF.adjust_brightness(x[i], bf[i].item())
        ref = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(ref, cf[i].item()), sf[i].item()), hf[i].item())
        assert torch.allclose(y[i], ref, atol=1e-4), (i, (y[i] - ref).abs().max())


def test_knn_vote_weighting():
    # train: e0 = [1, 0] (class 0), [0.8, 0.6] and [0.6, 0.8] (class 1); query [1, 0]; k = 3.
    # T = 0.1: class 0 gets e^10, class 1 gets e^8 + e^6 < e^10 -> predicts 0.
    # T = 10:  class 0 gets e^0.1 = 1.105, class 1 gets e^0.08 + e^0.06 = 2.145 -> predicts 1.
    tr = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    y = torch.tensor([0, 1, 1])
    q, qy = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    assert common.knn_classify(tr, y, q, qy, k=3, T=0.1)[0] == 100.0
    assert common.knn_classify(tr, y, q, qy, k=3, T=10.0)[0] == 0.0
    assert common.knn_classify(tr, y, q, qy, k=3, T=10.0)[1] == 100.0  # top-5 holds both classes


def test_knn_votes_with_the_nearest_neighbours():
    # Four unit vectors of classes 0..3 at 0, 90, 180 and 270 degrees; queries at 10 and 100 degrees. The nearest
    # training point of the first is class 0 (cosine 0.985; the others 0.174, -0.985, -0.174), of the second class 1:
    # with k = 1 both are right (100%), whereas the least similar neighbour (180 / 270 degrees) would get both wrong.
    # k = 2 at T = 0.07 adds the second nearest (class 1 for the first query, class 0 for the second) with a weight
    # exp((0.174 - 0.985) / 0.07) ~ 1e-5 of the first: still 100%, and top-5 of 4 classes holds every class.
    deg = torch.tensor([0.0, 90.0, 180.0, 270.0]).deg2rad()
    tr, y = torch.stack([deg.cos(), deg.sin()], 1), torch.tensor([0, 1, 2, 3])
    qd = torch.tensor([10.0, 100.0]).deg2rad()
    q, qy = torch.stack([qd.cos(), qd.sin()], 1), torch.tensor([0, 1])
    assert common.knn_classify(tr, y, q, qy, k=1) == (100.0, 100.0)
    assert common.knn_classify(tr, y, q, qy, k=2, T=0.07)[0] == 100.0
    assert common.knn_classify(tr, y, q, torch.tensor([2, 3]), k=1)[0] == 0.0  # the far side is never voted for


def test_a_checkpoint_write_that_fails_halfway_leaves_the_previous_one(tmp_path, monkeypatch):
    # A torch.save that writes half of its bytes, then fails (a full disk, a kill): the write stops with one line and
    # last.pt still holds the previous checkpoint, whole. A checkpoint written straight to last.pt would be torn.
    path = str(tmp_path / "last.pt")
    common.save_checkpoint(path, {"args": {}, "backbone": {"w": torch.ones(64)}, "epoch": 1})
    real_save = torch.save

    def half_then_fail(obj, f):
        real_save(obj, f)
        with open(f, "r+b") as h:
            h.truncate(os.path.getsize(f) // 2)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(SystemExit, match="No space left on device"):
        common.save_checkpoint(path, {"args": {}, "backbone": {"w": torch.zeros(64)}, "epoch": 2})
    monkeypatch.undo()
    ck = common.load_checkpoint(path)
    assert ck["epoch"] == 1 and torch.equal(ck["backbone"]["w"], torch.ones(64))
    assert os.listdir(tmp_path) == ["last.pt"]  # and no temporary file left


def test_columns_offset_counts_rows_along_the_gathered_dim(monkeypatch):
    # HyDeS shards (V crops, n images, D) along dim 1: rank r's rows start at r * n in the gathered (V, W n, D), not at
    # r * V. Rank 1 of 2 with V = 3 crops of n = 4 images: offset 4, and its rows' loss with rank 0's equals the
    # whole batch's (each rank's loss is the mean over its own images; the images are split evenly).
    import hydes
    z = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole = hydes.hydes_loss(z, 2.0)[0]
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setattr(common, "world_rank", lambda: (2, rank))
        monkeypatch.setattr(common, "gather", lambda x, dim=0: z)  # every rank's crops, as the all_gather gives them
        own = z[:, 4 * rank: 4 * rank + 4]
        z_all, offset = common.columns(own, dim=1)
        assert offset == 4 * rank
        per_rank.append(hydes.hydes_loss(own, 2.0, 1.0, 1.0, z_all, offset)[0])
    assert abs((per_rank[0] + per_rank[1]) / 2 - whole) < 1e-12


def test_each_epoch_draws_its_own_order_of_the_images():
    # 16 images numbered by their pixel value, batches of 4: every epoch is a permutation of the 16 (4 batches, no
    # image twice), the same for the same (seed, epoch) (resume is exact), and another for the next epoch or seed.
    x = torch.arange(16, dtype=torch.uint8).view(16, 1, 1, 1).expand(16, 3, 1, 1).contiguous()
    order = lambda epoch, seed=0: torch.cat([b[:, 0, 0, 0] for b in common.batches(x, 4, epoch, seed)]).tolist()  # noqa
    assert sorted(order(0)) == list(range(16)) and order(0) == order(0)
    assert order(1) != order(0) and order(0, seed=1) != order(0)


def test_cosine_schedule_values():
    # warm-up: base * step / warmup; then base -> final along half a cosine
    assert common.cosine(5, 110, 1.0, 0.0, 10) == pytest.approx(0.5)
    assert common.cosine(10, 110, 1.0, 0.0, 10) == pytest.approx(1.0)
    assert common.cosine(60, 110, 1.0, 0.0, 10) == pytest.approx(0.5)  # half way: (1 + cos(pi/2)) / 2
    assert common.cosine(110, 110, 0.996, 1.0) == pytest.approx(1.0)


def test_checkpoint_atomic_and_corrupt(tmp_path):
    path = str(tmp_path / "ck.pt")
    common.save_checkpoint(path, {"args": {"arch": "x"}, "backbone": {"w": torch.ones(2)}, "epoch": 3})
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temporary file left behind
    assert common.load_checkpoint(path)["epoch"] == 3
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        common.load_checkpoint(str(tmp_path / "bad.pt"))
    # a pickled object of any other class (here an argparse.Namespace) would run its module's code when loaded:
    # refused (weights_only), one line
    import argparse
    torch.save({"args": argparse.Namespace(arch="x"), "backbone": {}, "epoch": 1}, tmp_path / "object.pt")
    with pytest.raises(SystemExit, match="cannot read checkpoint .*object.pt"):
        common.load_checkpoint(str(tmp_path / "object.pt"))


def test_synthetic_is_deterministic_balanced_and_split():
    a, b = common.synthetic(200, 5), common.synthetic(200, 5)
    assert torch.equal(a.images, b.images) and a.images.dtype == torch.uint8 and a.images.shape == (200, 3, 32, 32)
    assert torch.bincount(a.labels).tolist() == [20] * 10
    tr, va = common.get_dataset("synthetic", split="train"), common.get_dataset("synthetic", split="val")
    assert len(tr.images) == 5000 and len(va.images) == 1000 and not torch.equal(tr.images[:10], va.images[:10])


def test_build_backbone_feature_dims():
    x = torch.rand(2, 3, 32, 32)
    for arch, width, dim in (("resnet18", 8, 64), ("resnet50", 8, 256)):
        net, d = common.build_backbone(arch, 32, width)
        assert d == dim and net(x).shape == (2, dim)
    vit, d = common.build_backbone("vit_tiny", 32)
    assert d == 192 and vit(x).shape == (2, 192)
    assert math.isclose(sum(p.numel() for p in vit.parameters()) / 1e6, 5.4, rel_tol=0.05)  # ViT-Ti ~5.4M


def test_geometry_closed_forms():
    # N = 8 orthonormal features (rows of 3 I): all cosines 0 -> anisotropy 0, every angle 90 deg (std 0); centre =
    # mean of e_i, norm 1/sqrt(8); centred, the rows have 7 equal singular values and one 0 -> embedding rank 7.
    # Feature correlation: column i is the indicator of sample i: mean 1/8, variance 1/8 - 1/64 = 7/64, covariance of
    # two columns 0 - 1/64 -> Pearson -1/7 for every pair -> mean |corr| 1/7.
    # Labels [0,0,1,1,2,2,3,3]: centroids (e0+e1)/2, ... are 4 orthogonal vectors of one norm -> centred rank 3.
    # Pairs: a_i = e_i, b_i = cos t_i e_i + sin t_i e_{i+4}, t = 10, 20, 30, 40 deg -> positive angles mean 25,
    # sample std sqrt(500/3) = 12.910; d' = (90 - 25) / sqrt((0 + 500/3) / 2) = 65 / 9.1287 = 7.1204.
    from eval_linear import geometry
    f = torch.eye(8) * 3.0
    t = torch.deg2rad(torch.tensor([10.0, 20.0, 30.0, 40.0]))
    a, b = torch.eye(8)[:4], torch.eye(8)[:4] * t.cos()[:, None] + torch.eye(8)[4:] * t.sin()[:, None]
    g = geometry(f, (a, b), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert g["anisotropy"] == pytest.approx(0.0, abs=1e-12) and g["center_norm"] == pytest.approx(8**-0.5)
    assert g["angle_all_mean"] == pytest.approx(90.0) and g["angle_all_std"] == pytest.approx(0.0, abs=1e-9)
    assert g["embedding_rank"] == pytest.approx(7.0, rel=1e-9) and g["centroid_rank"] == pytest.approx(3.0, rel=1e-9)
    assert g["feature_correlation"] == pytest.approx(1 / 7, rel=1e-9)
    assert g["angle_pos_mean"] == pytest.approx(25.0, abs=1e-4) and g["angle_pos_std"] == pytest.approx(12.9099, abs=1e-3)
    assert g["d_prime"] == pytest.approx(65 / (250 / 3) ** 0.5, rel=1e-5)
    # beside them, Wang & Isola's pair: orthonormal rows, uniformity -4; alignment mean(2 - 2 cos t)
    assert g["uniformity"] == pytest.approx(-4.0, abs=1e-9)
    expected_alignment = sum(2 - 2 * math.cos(math.radians(d)) for d in (10, 20, 30, 40)) / 4
    assert g["alignment"] == pytest.approx(expected_alignment, rel=1e-6)


def test_alignment_and_uniformity_closed_forms():
    # Uniformity, t = 2: the n vertices of a regular simplex have pairwise cosine -1/(n-1), so every squared distance is
    # 2 + 2/(n-1) = 2n/(n-1) and log E exp(-2 d^2) = -4n/(n-1): n = 5 -> -5, n = 2 (antipodal) -> -8. Orthonormal rows:
    # d^2 = 2 -> -4. One point repeated: d^2 = 0 -> 0. The scale of a row does not matter (normalised first).
    from eval_linear import alignment, uniformity
    simplex = torch.eye(5) - 0.2  # centred basis vectors: the regular simplex in the plane sum = 0
    assert uniformity(simplex) == pytest.approx(-5.0, abs=1e-12)
    assert uniformity(torch.tensor([[1.0, 0], [-3.0, 0]])) == pytest.approx(-8.0, abs=1e-12)
    assert uniformity(torch.eye(8) * 3) == pytest.approx(-4.0, abs=1e-12)
    assert uniformity(torch.ones(4, 3)) == pytest.approx(0.0, abs=1e-12)
    # Alignment: identical pairs 0; antipodal pairs ||a - (-a)||^2 = 4; unit pairs at angles t: 2 - 2 cos t, here the
    # mean over t = 10, 20, 30, 40 degrees
    a = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    assert alignment(a, 2 * a) == pytest.approx(0.0, abs=1e-12) and alignment(a, -a) == pytest.approx(4.0)
    t = torch.deg2rad(torch.tensor([10.0, 20.0, 30.0, 40.0], dtype=torch.float64))
    e = torch.eye(8, dtype=torch.float64)
    b = e[:4] * t.cos()[:, None] + e[4:] * t.sin()[:, None]
    expected = sum(2 - 2 * math.cos(math.radians(d)) for d in (10, 20, 30, 40)) / 4
    assert alignment(e[:4], b) == pytest.approx(expected, rel=1e-12)


def test_feature_correlation_and_collapse():
    # Columns c1 = (1,-1,1,-1), c2 = (1,1,-1,-1), c3 = 2 c1: |corr| 0 for (c1,c2), (c2,c3) and 1 for (c1,c3) ->
    # mean over the 6 ordered pairs 2/6. Every row has norm sqrt(6): the L2 normalisation keeps the correlations.
    from eval_linear import geometry
    c1, c2 = torch.tensor([1.0, -1, 1, -1]), torch.tensor([1.0, 1, -1, -1])
    assert geometry(torch.stack([c1, c2, 2 * c1], 1))["feature_correlation"] == pytest.approx(1 / 3, rel=1e-9)
    # rows e0, e0, e1, e1: centred they are +-(e0 - e1)/2, one direction -> embedding rank 1; of the 12 ordered
    # pairs, 4 have cosine 1 and 8 cosine 0 -> anisotropy 1/3
    g = geometry(torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]]))
    assert g["embedding_rank"] == pytest.approx(1.0, rel=1e-9) and g["anisotropy"] == pytest.approx(1 / 3)


def test_centroid_order_and_png(tmp_path):
    # 0 ~ 2 (0.9), 2 ~ 3 (0.8), 3 ~ 1 (0.7), all else 0.1: the greedy chain from 0 is 0, 2, 3, 1
    from eval_linear import greedy_order, save_similarity_png
    sim = torch.full((4, 4), 0.1).fill_diagonal_(1.0)
    for i, j, s in ((0, 2, 0.9), (2, 3, 0.8), (3, 1, 0.7)):
        sim[i, j] = sim[j, i] = s
    assert greedy_order(sim) == [0, 2, 3, 1]
    # +1 is pure red, -1 pure blue, 0 white, in cells a person can see, the class names written beside their rows
    import numpy as np
    from PIL import Image
    x0, y0, cell = save_similarity_png(torch.tensor([[1.0, -1.0], [-1.0, 0.0]]), str(tmp_path / "m.png"), ["ab", "cd"])
    px = torch.from_numpy(np.array(Image.open(tmp_path / "m.png").convert("RGB")))  # (H, W, 3)
    at = lambda i, j: px[y0 + i * cell + cell // 2, x0 + j * cell + cell // 2].tolist()  # noqa: E731
    assert at(0, 0) == [255, 0, 0] and at(0, 1) == [0, 0, 255] and at(1, 1) == [255, 255, 255] and cell >= 6
    for i in range(2):  # dark pixels (text) left of each row and above each column
        assert px[y0 + i * cell: y0 + (i + 1) * cell, :x0].min() < 128
        assert px[:y0, x0 + i * cell: x0 + (i + 1) * cell].min() < 128
    # 100 classes: cells of at least 6 px, every 4th name
    _, _, cell = save_similarity_png(torch.eye(100), str(tmp_path / "m100.png"), [f"class {i}" for i in range(100)])
    assert cell >= 6 and Image.open(tmp_path / "m100.png").size[0] >= 100 * cell


def test_class_names_of_a_folder_come_from_words_txt(tmp_path):
    from eval_linear import class_names
    for c in ("n02", "n01", "zebra"):
        (tmp_path / "train" / c).mkdir(parents=True)
    (tmp_path / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tbullfrog\n")
    assert class_names("folder", str(tmp_path), 3) == ["goldfish", "bullfrog", "zebra"]  # sorted folders: n01 n02 zebra
    assert class_names("synthetic", "", 10)[:3] == ["disk", "square", "triangle"]
    assert class_names("cifar10", str(tmp_path / "none"), 2) == ["0", "1"]  # not there: the class numbers


def test_check_finite_syncs_every_k_steps():
    common.check_finite(torch.tensor(float("nan")), 0, 3, every=50)  # not a checking step: no sync, no stop
    with pytest.raises(SystemExit, match=r"the loss became nan in epoch 1 \(within steps 1-50\)"):
        common.check_finite(torch.tensor(float("nan")), 0, 49, every=50)
    with pytest.raises(SystemExit, match="the loss became inf in epoch 3;"):  # the end of an epoch
        common.check_finite(float("inf"), 2)


# ----------------------------------------------------------------------------------------------
# Data a user brings: folder datasets and Tiny-ImageNet
# ----------------------------------------------------------------------------------------------
def write_image(path, colour, mode="RGB", size=(12, 10)):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.new("RGB", size, colour)
    if mode == "L":
        im = im.convert("L")
    elif mode == "P":
        im = im.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode == "RGBA":
        im = im.convert("RGBA")
    im.save(path)


def test_folder_val_classes_matched_to_train_by_name(tmp_path):
    # train {a, b, c}, val {b, c}: ImageFolder alone would number val's classes 0, 1; matched by name they are 1, 2.
    for c, colour in zip("abc", [(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        for i in range(2):
            write_image(str(tmp_path / "train" / c / f"{i}.png"), colour)
    for c in "bc":
        write_image(str(tmp_path / "val" / c / "0.png"), (0, 255, 0) if c == "b" else (0, 0, 255))
    train = common.get_dataset("folder", str(tmp_path), "train", image_size=8)
    val = common.get_dataset("folder", str(tmp_path), "val", image_size=8)
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2] and val.labels.tolist() == [1, 2]
    assert val.images.shape == (2, 3, 8, 8) and val.images[0, 1].float().mean() == 255  # green image, label 1 = b
    # a val class that train does not have: a one-line error naming it
    write_image(str(tmp_path / "val" / "zebra" / "0.png"), (9, 9, 9))
    with pytest.raises(SystemExit, match="class folder 'zebra'"):
        common.get_dataset("folder", str(tmp_path), "val", image_size=8)


def test_folder_bad_files_modes_and_non_images(tmp_path):
    write_image(str(tmp_path / "train" / "a" / "rgb.png"), (200, 100, 50))
    write_image(str(tmp_path / "train" / "a" / "grey.png"), (90, 90, 90), mode="L")
    write_image(str(tmp_path / "train" / "a" / "palette.png"), (10, 200, 30), mode="P")
    write_image(str(tmp_path / "train" / "b" / "rgba.png"), (0, 0, 255), mode="RGBA")
    (tmp_path / "train" / "b" / "notes.txt").write_text("not an image, and not named like one: ignored")
    ds = common.get_dataset("folder", str(tmp_path), "train", image_size=4)
    assert ds.images.shape == (4, 3, 4, 4) and ds.labels.tolist() == [0, 0, 0, 1]
    # sorted file order in a: grey, palette, rgb. Grey 90 -> (90, 90, 90); every mode became 3-channel RGB
    assert ds.images[0].float().mean((1, 2)).tolist() == [90.0, 90.0, 90.0]
    assert ds.images[2].float().mean((1, 2)).tolist() == [200.0, 100.0, 50.0]
    assert ds.images[3].float().mean((1, 2)).tolist() == [0.0, 0.0, 255.0]
    # two undecodable files named as images: one-line error naming the first and the count, or skipped
    (tmp_path / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8 truncated download")
    (tmp_path / "train" / "a" / "fake.png").write_text("a text file named .png")
    with pytest.raises(SystemExit, match=r"2 of 6 files .* cannot be read as images \(first: .*fake.png\)"):
        common.get_dataset("folder", str(tmp_path), "train", image_size=4)
    ds = common.get_dataset("folder", str(tmp_path), "train", image_size=4, skip_bad=True)
    assert ds.labels.tolist() == [0, 0, 0, 1]


def test_folder_default_size_follows_small_images(tmp_path):
    write_image(str(tmp_path / "train" / "a" / "0.png"), (1, 2, 3), size=(20, 24))
    assert common.get_dataset("folder", str(tmp_path), "train").images.shape[-1] == 20  # its own size, <= 64
    write_image(str(tmp_path / "big" / "train" / "a" / "0.png"), (1, 2, 3), size=(300, 200))
    assert common.get_dataset("folder", str(tmp_path / "big"), "train").images.shape[-1] == 64


def make_tiny_imagenet(root, wnids=("n02", "n01", "n03"), per_class=2):
    """The official layout in miniature: wnids.txt (unsorted), train/<wnid>/images/*.JPEG, val/images/*.JPEG +
    val_annotations.txt (tab-separated, with bounding boxes), a boxes file per train class."""
    os.makedirs(root)
    with open(os.path.join(root, "wnids.txt"), "w") as f:
        f.write("\n".join(wnids) + "\n")
    shade = {w: 40 * (i + 1) for i, w in enumerate(sorted(wnids))}  # n01 -> 40, n02 -> 80, n03 -> 120
    for w in wnids:
        for i in range(per_class):
            write_image(os.path.join(root, "train", w, "images", f"{w}_{i}.JPEG"), (shade[w],) * 3, size=(64, 64))
        open(os.path.join(root, "train", w, f"{w}_boxes.txt"), "w").write("boxes, not an image\n")
    os.makedirs(os.path.join(root, "val", "images"))
    with open(os.path.join(root, "val", "val_annotations.txt"), "w") as f:
        for i, w in enumerate(["n03", "n01", "n03"]):
            write_image(os.path.join(root, "val", "images", f"val_{i}.JPEG"), (shade[w],) * 3, size=(64, 64))
            f.write(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63\n")


def test_tinyimagenet_layout(tmp_path, three_classes):
    make_tiny_imagenet(str(tmp_path / "tiny-imagenet-200"))
    for data_dir in (tmp_path, tmp_path / "tiny-imagenet-200"):  # the folder holding it, or the folder itself
        train = common.get_dataset("tinyimagenet", str(data_dir), "train", download=False)
        val = common.get_dataset("tinyimagenet", str(data_dir), "val", download=False)
        # labels are the sorted wnids: n01 -> 0, n02 -> 1, n03 -> 2, in train and val alike
        assert train.labels.tolist() == [0, 0, 1, 1, 2, 2] and val.labels.tolist() == [2, 0, 2]
        assert train.images.shape == (6, 3, 64, 64)  # 64 px by default
        # JPEG keeps a flat grey within a few levels: the label really follows the image
        assert (train.images.float().mean((1, 2, 3)) - torch.tensor([40, 40, 80, 80, 120, 120.0])).abs().max() < 3
        assert (val.images.float().mean((1, 2, 3)) - torch.tensor([120, 40, 120.0])).abs().max() < 3


def test_tinyimagenet_val_labels_missing_or_unknown_are_one_line(tmp_path, three_classes):
    root = tmp_path / "tiny-imagenet-200"
    make_tiny_imagenet(str(root))
    write_image(str(root / "val" / "images" / "val_9.JPEG"), (9, 9, 9), size=(64, 64))
    with open(root / "val" / "val_annotations.txt", "a") as f:
        f.write("val_9.JPEG\tn99\t0\t0\t63\t63\n")  # a wnid that is not a train class
    with pytest.raises(SystemExit, match="labels val_9.JPEG with 'n99', which is not a class"):
        common.get_dataset("tinyimagenet", str(tmp_path), "val", download=False)
    os.remove(root / "val" / "val_annotations.txt")
    with pytest.raises(SystemExit, match="val_annotations.txt is missing"):
        common.get_dataset("tinyimagenet", str(tmp_path), "val", download=False)


def test_tinyimagenet_missing_says_where_to_put_it(tmp_path):
    with pytest.raises(SystemExit, match="extract tiny-imagenet-200.zip .* so that .*tiny-imagenet-200/wnids.txt"):
        common.get_dataset("tinyimagenet", str(tmp_path), "train", download=False)


def test_tinyimagenet_incomplete_copy_is_one_line(tmp_path, three_classes):
    # a class without training images, and a val image without its annotation: both named, nothing decoded
    root = tmp_path / "tiny-imagenet-200"
    make_tiny_imagenet(str(root))
    shutil.rmtree(root / "train" / "n02" / "images")
    write_image(str(root / "val" / "images" / "val_7.JPEG"), (9, 9, 9), size=(64, 64))
    with pytest.raises(SystemExit, match=r"incomplete: 1 classes have no training images \(first: n02\); 4 val images "
                                         r"for 3 annotations\. Delete it"):
        common.get_dataset("tinyimagenet", str(tmp_path), "train", download=False)
    common.TINY_IMAGENET = common.TINY_IMAGENET[:2] + (200,)  # the official count (three_classes restores it)
    with pytest.raises(SystemExit, match="wnids.txt lists 3 classes, not 200"):
        common.get_dataset("tinyimagenet", str(tmp_path), "train", download=False)


def fake_download(payload):
    """A stand-in for torchvision's download_url that writes `payload` (bytes, or an exception to raise)."""
    def download_url(url, root, filename):
        if isinstance(payload, Exception):
            raise payload
        with open(os.path.join(root, filename), "wb") as f:
            f.write(payload)
    return download_url


def test_tinyimagenet_download_is_checked_and_extracted_whole(tmp_path, monkeypatch, three_classes):
    import hashlib
    import io
    import urllib.error
    import zipfile
    make_tiny_imagenet(str(tmp_path / "src" / "tiny-imagenet-200"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for d, _, files in os.walk(tmp_path / "src"):
            for f in files:
                z.write(os.path.join(d, f), os.path.relpath(os.path.join(d, f), tmp_path / "src"))
    good = buf.getvalue()
    data = tmp_path / "data"
    data.mkdir()
    utils = common.torchvision.datasets.utils
    # offline, and an HTTP error: one line with the cause
    for error, said in ((urllib.error.URLError("no network"), r"failed \(no network\); offline, put"),
                        (urllib.error.HTTPError("u", 404, "Not Found", {}, None), r"failed \(HTTP 404\)")):
        monkeypatch.setattr(utils, "download_url", fake_download(error))
        with pytest.raises(SystemExit, match=said):
            common.get_dataset("tinyimagenet", str(data), "train")
    # a truncated archive: its MD5 and the published one are named, nothing is extracted
    monkeypatch.setattr(utils, "download_url", fake_download(good[:1000]))
    got = hashlib.md5(good[:1000]).hexdigest()
    with pytest.raises(SystemExit, match=f"tiny-imagenet-200.zip has MD5 {got}, not the published 90528d7c.*delete it"):
        common.get_dataset("tinyimagenet", str(data), "train")
    assert sorted(os.listdir(data)) == ["tiny-imagenet-200.zip"]
    # the good archive (its MD5 made the published one here), and the leftovers of an interrupted extraction: the
    # leftovers are removed, the archive extracted whole, and it loads
    os.remove(data / "tiny-imagenet-200.zip")
    monkeypatch.setattr(utils, "download_url", fake_download(good))
    monkeypatch.setattr(common, "TINY_IMAGENET", ("u", hashlib.md5(good).hexdigest(), 3))
    (data / "tiny-imagenet-200.part" / "tiny-imagenet-200").mkdir(parents=True)
    (data / "tiny-imagenet-200.part" / "tiny-imagenet-200" / "wnids.txt").write_text("n01\n")
    train = common.get_dataset("tinyimagenet", str(data), "train", image_size=8)
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert sorted(os.listdir(data)) == ["tiny-imagenet-200", "tiny-imagenet-200.zip"]


def test_subset_is_fixed_random_and_covers_classes():
    data = common.Split(torch.zeros(1000, 3, 1, 1, dtype=torch.uint8), torch.arange(1000) // 100)  # sorted
    a, b = common.subset(data, 200), common.subset(data, 200)
    assert torch.equal(a.labels, b.labels) and len(a.images) == 200
    assert torch.bincount(a.labels, minlength=10).min() >= 8  # every class present (a prefix would hold 2)
    assert common.subset(data, None) is data and common.subset(data, 5000) is data
WORDNET = """  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license.
00000001 03 n 01 entity 0 002 ~ 00000002 n 0000 ~ 00000005 n 0000 | that which exists
00000002 05 n 02 animal 0 animate_being 0 003 @ 00000001 n 0000 ~ 00000003 n 0000 ~ 00000004 n 0000 | a living organism
00000003 05 n 01 dog 0 002 @ 00000002 n 0000 #m 00000009 n 0000 | a domestic animal
00000004 05 n 01 cat 0 001 @i 00000002 n 0000 | a feline
00000005 03 n 01 plant 0 002 @ 00000001 n 0000 ~ 00000006 n 0000 | a living organism lacking locomotion
00000006 20 n 01 tree 0 001 @ 00000005 n 0000 | a tall perennial woody plant
"""


def test_wordnet_alignment_on_a_hand_made_taxonomy(tmp_path, capsys):
    # entity (the root) -> animal, plant -> dog, cat (an instance hypernym, @i) under animal, tree under plant: the
    # longest path to the root is D = 2 steps. dog-cat: lowest common hypernym animal (h = 1 + 1 = 2), 1 step from
    # each: Wu-Palmer 2*2 / (1 + 1 + 2*2) = 2/3, path 2, Leacock-Chodorow -log(3 / 4). dog-tree, cat-tree: entity
    # (h = 1), 2 steps each: 2*1 / (2 + 2 + 2) = 1/3, path 4, -log(5 / 4). A synset with itself: 1, path 0, -log(1 / 4).
    import eval_linear as ev
    (tmp_path / "data.noun").write_text(WORDNET)
    parents = ev.read_wordnet(str(tmp_path / "data.noun"))
    assert parents["00000002"] == ["00000001"] and parents["00000004"] == ["00000002"] and parents["00000001"] == []
    wup, lch, path = ev.wordnet_similarities(parents, ["00000003", "00000004", "00000006"])
    assert torch.allclose(wup, torch.tensor([[1, 2 / 3, 1 / 3], [2 / 3, 1, 1 / 3], [1 / 3, 1 / 3, 1]], dtype=wup.dtype))
    assert torch.equal(path, torch.tensor([[0.0, 2, 4], [2, 0, 4], [4, 4, 0]], dtype=path.dtype))
    assert lch[0, 1].item() == pytest.approx(math.log(4 / 3)) and lch[0, 2].item() == pytest.approx(math.log(4 / 5))
    assert lch[0, 0].item() == pytest.approx(math.log(4))
    # Centroid cosines over the pairs (dog-cat, dog-tree, cat-tree) 0.9, 0.1, 0.2: ranks 3, 1, 2; Wu-Palmer's 2/3, 1/3,
    # 1/3 rank 3, 1.5, 1.5. Spearman = Pearson of the centred ranks (1, -1, 0) and (1, -0.5, -0.5):
    # 1.5 / (sqrt 2 sqrt 1.5) = sqrt(3) / 2; Leacock-Chodorow ranks alike. Average linkage on 1 - cosine: dog+cat merge at 0.1, tree joins at
    # (0.9 + 0.8) / 2 = 0.85; cophenetic (0.1, 0.85, 0.85) against the paths (2, 4, 4): proportional once centred -> 1.
    sim = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]])
    res = ev.wordnet_alignment(sim, ["n00000003", "n00000004", "n00000006"], str(tmp_path))
    assert res["wordnet_wup_spearman"] == pytest.approx(3**0.5 / 2)
    assert res["wordnet_lch_spearman"] == pytest.approx(3**0.5 / 2)
    assert res["wordnet_cophenetic"] == pytest.approx(1.0)
    # Mantel p-value: of the 6 orders of 3 classes, 2 (dog and cat in either order) reach the observed correlation,
    # so 999 shuffles give p ~ 1/3 (binomial sd 0.015)
    assert res["wordnet_wup_p"] == pytest.approx(1 / 3, abs=0.05)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "data.noun").write_text("00000003 05 n 01 dog\n")  # a line cut short
    for wnids, where, words in ((["dog", "n00000004", "n00000006"], str(tmp_path), "WordNet noun ids"),
                                (["n00000003"], str(tmp_path / "bad"), "not in WordNet's database format"),
                                (["n00000003", "n00000004", "n00000007"], str(tmp_path), "not in"),
                                (["n00000003", "n00000004", "n00000006"], str(tmp_path / "none"), "no data.noun")):
        with pytest.raises(SystemExit, match=words):
            ev.wordnet_alignment(sim, wnids, where)


def test_wu_palmer_breaks_a_tie_of_lowest_common_hypernyms_by_name_as_nltk(tmp_path):
    # x and y both have the hypernyms zebra and apple, each one step under the root entity (a tie of lowest common
    # hypernyms by shortest depth, 1); apple also sits under cherry, so its longest path to the root is 2, zebra's 1.
    # NLTK takes the first of the tie by synset name: apple.n.01 < zebra.n.01, h = 2 + 1 = 3, Wu-Palmer
    # 2 * 3 / (1 + 1 + 2 * 3) = 3/4 (the smaller offset, zebra, would give 2 * 2 / (1 + 1 + 4) = 2/3). The sense
    # number comes from index.noun: "apple" listing another synset first makes this one apple.n.02, still first.
    import eval_linear as ev
    (tmp_path / "data.noun").write_text(
        "00000001 03 n 01 entity 0 003 ~ 00000002 n 0000 ~ 00000003 n 0000 ~ 00000004 n 0000 | the root\n"
        "00000002 03 n 01 zebra 0 001 @ 00000001 n 0000 | right under the root\n"
        "00000003 03 n 01 Apple 0 002 @ 00000001 n 0000 @ 00000004 n 0000 | under the root and under cherry\n"
        "00000004 03 n 01 cherry 0 001 @ 00000001 n 0000 | under the root\n"
        "00000005 03 n 01 x 0 002 @ 00000002 n 0000 @ 00000003 n 0000 | under zebra and apple\n"
        "00000006 03 n 01 y 0 002 @ 00000002 n 0000 @ 00000003 n 0000 | under zebra and apple\n")
    (tmp_path / "index.noun").write_text("apple n 2 1 @ 2 0 00000009 00000003\nzebra n 1 1 @ 1 0 00000002\n")
    names = ev.synset_names(str(tmp_path))
    assert (names["00000003"], names["00000002"], names["00000005"]) == ("apple.n.02", "zebra.n.01", "x.n.01")
    parents = ev.read_wordnet(str(tmp_path / "data.noun"))
    wup = ev.wordnet_similarities(parents, ["00000005", "00000006"], names)[0]
    assert wup[0, 1].item() == pytest.approx(3 / 4)
    assert ev.wordnet_similarities(parents, ["00000005", "00000006"])[0][0, 1].item() == pytest.approx(2 / 3)


def test_ranks_share_ties_and_cophenetic_distances_follow_average_linkage():
    import eval_linear as ev
    assert ev.ranks(torch.tensor([5.0, 1.0, 5.0, 3.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    # points on a line at 0, 1, 5, 7: merges {0,1} at 1, {5,7} at 2, then the clusters at the mean of their 4
    # cross distances (5 + 7 + 4 + 6) / 4 = 5.5
    x = torch.tensor([0.0, 1.0, 5.0, 7.0])
    coph = ev.cophenetic((x[:, None] - x[None, :]).abs())
    assert coph.tolist() == [[0, 1, 5.5, 5.5], [1, 0, 5.5, 5.5], [5.5, 5.5, 0, 2], [5.5, 5.5, 2, 0]]
