"""NT-Xent closed forms. Every expected value is derived by hand in the comment above it."""
import math

import pytest
import torch
import torch.nn.functional as F

from simclr import er_terms, nt_xent

T = 0.2


def orthonormal(n, d, seed=0):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q[:n].float()  # n orthonormal rows in R^d


@pytest.mark.parametrize("n", [1, 4, 16])
def test_collapse_gives_log_2n_minus_1(n):
    # All 2N embeddings equal: every logit is 1/t, so each anchor's softmax over its 2N-1 others is
    # uniform and l_i = -log(1 / (2N-1)) = log(2N-1).
    z = torch.ones(n, 8)
    assert nt_xent(z, z.clone(), T).item() == pytest.approx(math.log(2 * n - 1), rel=1e-6)


@pytest.mark.parametrize("n,d,t", [(4, 8, 0.2), (8, 8, 0.5), (3, 16, 0.1)])
def test_orthonormal_images_identical_views(n, d, t):
    # z1 = z2, images mutually orthogonal: anchor i sees its positive at s = 1 and the 2N-2 views of the
    # other images at s = 0, so l_i = -log(e^{1/t} / (e^{1/t} + 2N - 2)) = log(1 + (2N-2) e^{-1/t}).
    z = orthonormal(n, d).double()  # the loss is ~1e-4 here: float64 keeps the comparison exact
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / t))
    assert nt_xent(z, z.clone(), t).item() == pytest.approx(expected, rel=1e-5)


def test_two_antipodal_images():
    # N = 2, z1 = z2, the images antipodal: positive at s = 1, the two views of the other image at
    # s = -1: l_i = log(1 + 2 e^{-2/t}). With t = 0.2: log(1 + 2 e^{-10}) = 9.0799e-5.
    z = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    expected = math.log(1 + 2 * math.exp(-2 / T))
    assert expected == pytest.approx(9.0799e-5, rel=1e-4)
    assert nt_xent(z, z.clone(), T).item() == pytest.approx(expected, rel=1e-4)


def test_scale_rotation_and_symmetry_invariance():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    base = nt_xent(z1, z2, T)
    q = orthonormal(5, 5, seed=2)  # a random rotation
    scales = torch.rand(6, 1, generator=g) * 10 + 0.1
    assert torch.allclose(nt_xent(z1 * scales, z2 * 3.0, T), base, atol=1e-5)
    assert torch.allclose(nt_xent(z1 @ q, z2 @ q, T), base, atol=1e-5)
    assert torch.allclose(nt_xent(z2, z1, T), base, atol=1e-6)


def reference_ntxent(z1, z2, t):
    """lightly.loss.NTXentLoss (no memory bank), written out as the sum it defines, anchor by anchor."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2]).double()]
    n2, n = len(z), len(z) // 2
    total = 0.0
    for i in range(n2):
        p = (i + n) % n2
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[p]) / t) / denom)
    return total / n2


def test_matches_the_anchor_by_anchor_sum():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert nt_xent(z1, z2, 0.3).item() == pytest.approx(reference_ntxent(z1, z2, 0.3), rel=1e-5)


def test_gradient_finite_and_pulls_positives_together():
    g = torch.Generator().manual_seed(4)
    z1 = torch.randn(8, 16, generator=g, requires_grad=True)
    z2 = torch.randn(8, 16, generator=g)
    loss = nt_xent(z1, z2, T)
    loss.backward()
    assert torch.isfinite(z1.grad).all()
    cos = lambda a: F.cosine_similarity(a, z2, dim=1).mean()  # noqa: E731
    stepped = (z1 - 0.05 * z1.grad).detach()
    assert cos(stepped) > cos(z1.detach())  # a descent step aligns each view with its positive
    assert nt_xent(stepped, z2, T) < loss


@pytest.mark.parametrize("n,c,t", [(4, 0.0, 0.2), (6, 0.5, 0.5), (3, -0.3, 0.1)])
def test_er_terms_closed_form_and_loss_identity(n, c, t):
    # z1 = z2, every cross-image cosine c: s_ip = 1, so R = -1/t; each anchor's 2N-1 others are its positive (1)
    # and 2N-2 views at c, so H = log(2N-1) - log(e^{1/t} + (2N-2) e^{c/t}); and NT-Xent = R - H + log(2N-1).
    g = torch.full((n, n), c, dtype=torch.float64).fill_diagonal_(1.0)  # Gram matrix of n unit vectors
    z = torch.linalg.cholesky(g)  # rows with exactly those cosines
    h, r = er_terms(z, z.clone(), t)
    assert r.item() == pytest.approx(-1 / t, rel=1e-5)
    assert h.item() == pytest.approx(math.log(2 * n - 1) - math.log(math.exp(1 / t) + (2 * n - 2) * math.exp(c / t)),
                                     rel=1e-5, abs=1e-5)
    z1, z2 = torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(0))
    h, r = er_terms(z1, z2, t)
    assert nt_xent(z1, z2, t).item() == pytest.approx((r - h).item() + math.log(15), rel=1e-5)
