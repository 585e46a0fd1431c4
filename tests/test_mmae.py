"""M-MAE: TCR closed forms and Taylor link to U-MAE, masking, MAE loss; end to end. Numbers by hand."""
import json
import math

import pytest
import torch

from conftest import TINY, arg_error, call, one_line_error
from mmae import mae_loss, matrix_information, patchify, random_masking, sincos_pos_embed, square_reg, tcr, unpatchify


def orthonormal(b, d, seed=0):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q[:b]


@pytest.mark.parametrize("b,d,mu", [(4, 16, 3.0), (16, 16, 1.0), (10, 192, 3.0)])
def test_tcr_orthonormal_rows(b, d, mu):
    # Z^T Z is a rank-B projection: eigenvalues 1 (B times) and 0, so log det(I + (mu/d) Z^T Z) = B log(1 + mu/d)
    assert tcr(orthonormal(b, d), mu).item() == pytest.approx(b * math.log(1 + mu / d), rel=1e-10)


@pytest.mark.parametrize("b,d,mu", [(8, 16, 3.0), (64, 16, 3.0), (300, 192, 1.0)])
def test_tcr_identical_rows(b, d, mu):
    # Z Z^T = 1 1^T (B x B), eigenvalues B and 0 (B-1 times): TCR = log(1 + mu B / d); both Gram sides
    z = torch.zeros(b, d, dtype=torch.float64)
    z[:, 3] = 2.5  # normalised inside
    assert tcr(z, mu).item() == pytest.approx(math.log(1 + mu * b / d), rel=1e-10)
    assert math.isfinite(tcr(z.float(), mu).item())  # collapsed features stay finite in fp32


def test_tcr_sylvester_and_rotation():
    g = torch.Generator().manual_seed(1)
    for b, d in ((6, 20), (20, 6)):
        z = torch.randn(b, d, generator=g, dtype=torch.float64)
        zn = z / z.norm(dim=1, keepdim=True)
        c = 3.0 / d
        big = torch.logdet(torch.eye(d, dtype=torch.float64) + c * zn.T @ zn)  # d x d form, directly
        small = torch.logdet(torch.eye(b, dtype=torch.float64) + c * zn @ zn.T)  # B x B form
        assert big.item() == pytest.approx(small.item(), rel=1e-10)
        assert tcr(z, 3.0).item() == pytest.approx(big.item(), rel=1e-10)
        q = orthonormal(d, d, seed=2)
        assert tcr(z @ q, 3.0).item() == pytest.approx(big.item(), rel=1e-10)


def test_taylor_link_to_umae_square():
    # log det(I + cG) = c tr G - (c^2/2) tr G^2 + O(c^3); tr G = B (unit rows), tr G^2 = B^2 mean((Z Z^T)^2).
    # The remainder must shrink like c^3: halving mu divides it by ~8.
    z = torch.randn(12, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    b, d = z.shape

    def remainder(mu):
        c = mu / d
        return abs(tcr(z, mu).item() - (c * b - c**2 / 2 * b**2 * square_reg(z).item()))
    r1, r2 = remainder(0.1), remainder(0.05)
    assert r1 / r2 == pytest.approx(8.0, rel=0.05)


def test_patchify_roundtrip_and_order():
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(unpatchify(patchify(x, 4), 4), x)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 48) and torch.equal(p[0, 1].view(4, 4, 3)[..., 0], x[0, 0, :4, 4:])  # top-right patch


def test_random_masking_counts_restore_and_independence():
    B, L, D = 16, 64, 5
    x = torch.randn(B, L, D)
    vis, mask, ids_restore = random_masking(x, 0.75, torch.Generator().manual_seed(0))
    assert vis.shape == (B, 16, D) and (mask.sum(1) == 48).all()  # round(64 * 0.25) = 16 visible
    assert len({tuple(m.tolist()) for m in mask}) == B  # a different mask for every sample
    # [visible, zeros for hidden] gathered with ids_restore = the input with hidden tokens zeroed
    full = torch.cat([vis, torch.zeros(B, L - 16, D)], 1).gather(1, ids_restore[..., None].expand(-1, -1, D))
    assert torch.equal(full, x * (1 - mask[..., None]))
    assert random_masking(torch.randn(2, 10, 3), 0.75)[0].shape[1] == 2  # round(2.5) = 2 (half to even)


def test_mae_loss_zero_on_target_and_ignores_visible():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 16, 12, generator=g)
    mask = (torch.rand(3, 16, generator=g) < 0.75).float()
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    pred = normed + 5.0 * (1 - mask[..., None]) * torch.randn(3, 16, 12, generator=g)  # errors on visible only
    assert mae_loss(pred, target, mask, norm_pix=True).item() == pytest.approx(0.0, abs=1e-10)
    # without normalisation: pred = target + 1 on the masked patches gives exactly 1
    assert mae_loss(target + 1.0, target, mask, norm_pix=False).item() == pytest.approx(1.0, rel=1e-6)


def test_sincos_position_embedding():
    # D = 16, grid 4: w_k = 10000^(-k/4), k = 0..3. Token r*4 + c holds [sin(c w), cos(c w), sin(r w), cos(r w)], so
    # for any two tokens PE . PE' = sum_k cos((c - c') w_k) + sum_k cos((r - r') w_k) (sin a sin b + cos a cos b =
    # cos(a - b)); the CLS slot is 0. Token (0, 1) is [sin w, cos w, 0, 1] with w = (1, 0.1, 0.01, 0.001).
    pe = sincos_pos_embed(16, 4)[0].double()
    assert pe.shape == (17, 16) and not pe[0].any()
    w = torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=torch.float64)
    assert torch.allclose(pe[1 + 1], torch.cat([w.sin(), w.cos(), torch.zeros(4), torch.ones(4)]).double(), atol=1e-7)
    rc = [(i // 4, i % 4) for i in range(16)]
    expected = torch.tensor([[(torch.cos((c - c2) * w) + torch.cos((r - r2) * w)).sum().item() for r2, c2 in rc]
                             for r, c in rc], dtype=torch.float64)
    assert torch.allclose(pe[1:] @ pe[1:].T, expected, atol=1e-6)


MMAE_TINY = [("vit_tiny" if a == "resnet18" else "128" if a == "256" else a) for a in TINY] + [
    "--decoder-depth", "1", "--decoder-dim", "64"]


def test_lam_zero_is_mae_and_end_to_end(tmp_path):
    call("mmae.py", *MMAE_TINY, "--lam", "0", "--out-dir", tmp_path / "mae", "--eval-every", "0")
    rec = json.loads(open(tmp_path / "mae" / "log.jsonl").readline())
    assert rec["loss"] == rec["recon"]  # lambda = 0: the objective is the MAE loss exactly
    call("mmae.py", *MMAE_TINY, "--out-dir", tmp_path / "mmae", "--save-recon", "--pool", "mean")
    rec = json.loads(open(tmp_path / "mmae" / "log.jsonl").readline())
    assert rec["loss"] < rec["recon"] and rec["tcr"] > 0 and 1 <= rec["effective_rank"] <= 64
    # a batch of 64: every order-2 matrix entropy lies in [0, log 64], and I_2 <= min of the two views' H_2
    assert 0 <= rec["matrix_mi"] <= rec["matrix_entropy"] + 1e-9 <= math.log(64) + 1e-9
    assert 0 <= rec["matrix_joint_entropy"] <= math.log(64) + 1e-9
    from PIL import Image  # 3 rows of 8 images of 32 px, each drawn at 128 px (4 px patches -> 16 px), 4 px apart
    assert Image.open(tmp_path / "mmae" / "recon_0001.png").size == (8 * 132 + 4, 3 * 132 + 4)
    # the fixed sine-cosine position embeddings are frozen: after training they are still exactly the formula
    ck = torch.load(tmp_path / "mmae" / "last.pt", weights_only=True)
    assert torch.equal(ck["backbone"]["encoder.pos_embedding"], sincos_pos_embed(192, 8))
    assert torch.equal(ck["model"]["decoder_pos"], sincos_pos_embed(64, 8))
    call("eval_linear.py", "--checkpoint", tmp_path / "mmae" / "last.pt", "--probe-epochs", "2", "--limit", "200")
    assert json.load(open(tmp_path / "mmae" / "last.eval.json"))["feature_dim"] == 192


@pytest.mark.parametrize("extra", [["--mask-ratio", "1"], ["--mask-ratio", "0"], ["--mask-ratio", "-0.5"]])
def test_bad_mask_ratio(tmp_path, extra, capsys):
    import mmae
    assert "--mask-ratio" in arg_error(mmae, MMAE_TINY + ["--out-dir", str(tmp_path), *extra], capsys)


def test_patch_not_dividing_image_is_a_clear_error(tmp_path, capsys):
    assert "divisible" in one_line_error("mmae.py", MMAE_TINY + ["--out-dir", tmp_path, "--patch-size", "5"], capsys)


@pytest.mark.parametrize("b,d", [(4, 4), (8, 32)])
def test_matrix_information_closed_forms(b, d):
    # Orthonormal rows: K = I, A = I / B, tr A^2 = 1 / B -> H_2 = log B; K_1 o K_2 = I again -> joint log B, so
    # I_2 = log B + log B - log B = log B. Identical rows: K = 11^T, tr A^2 = 1 -> H_2 = 0; against orthonormal rows
    # the joint is I o 11^T = I -> log B, so I_2 = log B + 0 - log B = 0.
    q, same = orthonormal(b, d), torch.ones(b, d)
    out = matrix_information(q, 3 * q)  # any row scale
    assert [out[k] for k in ("matrix_entropy", "matrix_joint_entropy", "matrix_mi")] == pytest.approx([math.log(b)] * 3)
    out = matrix_information(q, same)
    assert [out[k] for k in ("matrix_entropy", "matrix_joint_entropy", "matrix_mi")] == pytest.approx(
        [math.log(b) / 2, math.log(b), 0], abs=1e-12)


def test_matrix_information_of_rows_at_60_degrees():
    # Two rows at 60 degrees (cosine 1/2): the squared cosines sum to 1 + 1 + 2/4 = 5/2, so H_2 = 2 log 2 - log 5/2
    # = log 1.6 (unsquared cosines would give log 4/3; the von Neumann entropy of eigenvalues 3/4, 1/4 gives 0.562).
    # Against two orthogonal rows (H_2 = log 2) the entrywise product is I: joint log 2, so I_2 = log 1.6.
    z1, z2 = torch.tensor([[1.0, 0.0], [0.5, 3**0.5 / 2]]), torch.eye(2)
    out = matrix_information(z1, z2)
    assert out["matrix_entropy"] == pytest.approx((math.log(1.6) + math.log(2)) / 2)
    assert (out["matrix_joint_entropy"], out["matrix_mi"]) == pytest.approx((math.log(2), math.log(1.6)))
