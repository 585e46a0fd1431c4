"""Plumbing: batched augmentation, kNN vote, schedule, checkpoints, synthetic data."""
import math
import os

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


def test_pil_reference_pipeline_shapes():
    x = common.synthetic(4, 0).images
    aug = common.MultiCrop(32, torch.full((3,), 0.5), torch.full((3,), 0.25), 2, 2, backend="pil")
    assert [tuple(v.shape) for v in aug(x, None)] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2


def test_multicrop_views_shapes_determinism_independence():
    x = common.synthetic(8, 0).images
    aug = common.MultiCrop(32, torch.full((3,), 0.5), torch.full((3,), 0.25), n_global=2, n_local=3)
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


def test_synthetic_is_deterministic_balanced_and_split():
    a, b = common.synthetic(200, 5), common.synthetic(200, 5)
    assert torch.equal(a.images, b.images) and a.images.dtype == torch.uint8 and a.images.shape == (200, 3, 32, 32)
    assert torch.bincount(a.labels).tolist() == [20] * 10
    tr, va = common.get_dataset("synthetic", split="train"), common.get_dataset("synthetic", split="val")
    assert len(tr) == 5000 and len(va) == 1000 and not torch.equal(tr.images[:10], va.images[:10])


def test_build_backbone_feature_dims():
    x = torch.rand(2, 3, 32, 32)
    for arch, width, dim in (("resnet18", 8, 64), ("resnet50", 8, 256)):
        net, d = common.build_backbone(arch, 32, width)
        assert d == dim and net(x).shape == (2, dim)
    vit, d = common.build_backbone("vit_tiny", 32)
    assert d == 192 and vit(x).shape == (2, 192)
    assert math.isclose(sum(p.numel() for p in vit.parameters()) / 1e6, 5.4, rel_tol=0.05)  # ViT-Ti ~5.4M


def test_geometry_closed_forms():
    # N = 8 orthonormal features (rows of I): centred, they have 7 equal singular values and one 0, so the
    # effective rank is 7; all cosines 0 -> anisotropy 0, angle 90 deg (std 0); centre = mean of e_i, norm
    # 1/sqrt(8); a second view equal to the first -> positive angle 0.
    from eval_linear import geometry
    f = torch.eye(8) * 3.0
    g = geometry(f, f.clone())
    assert g["effective_rank"] == pytest.approx(7.0, rel=1e-6)
    assert g["anisotropy"] == pytest.approx(0.0, abs=1e-9) and g["center_norm"] == pytest.approx(8**-0.5)
    assert g["angle_all_mean"] == pytest.approx(90.0) and g["angle_all_std"] == pytest.approx(0.0, abs=1e-6)
    assert g["angle_pos_mean"] == pytest.approx(0.0, abs=1e-3)
