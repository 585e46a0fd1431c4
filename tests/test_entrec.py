"""EntRec: vMF-KDE entropy, vMF reconstruction, discrete terms; variants end to end. Numbers by hand."""
import json
import math

import pytest
import torch

import entrec
from conftest import TINY, arg_error, call
from entrec import (discrete_entropy, discrete_reconstruction, log_vmf_normalizer, sphere_entropy,
                    sphere_reconstruction)

D, K = 16, 10.0


def log_c():
    return log_vmf_normalizer(D, K)


def test_entropy_identical_points():
    # every kernel sum is N e^kappa: log p_i = kappa + log C -> H = -kappa - log C
    z = torch.zeros(7, D, dtype=torch.float64).index_fill_(1, torch.tensor([2]), 3.0)
    assert sphere_entropy(z, K).item() == pytest.approx(-K - log_c(), rel=1e-12)


def test_entropy_orthonormal_points_both_estimators():
    # log p_i = log(e^kappa + N - 1) - log N + log C for every i -> H = log N - log(e^kappa + N - 1) - log C;
    # all p_i equal, so the softmax weights are uniform and "expectation" equals "average"
    n = 5
    z = torch.eye(D, dtype=torch.float64)[:n]
    expected = math.log(n) - math.log(math.exp(K) + n - 1) - log_c()
    assert sphere_entropy(z, K).item() == pytest.approx(expected, rel=1e-12)
    assert sphere_entropy(z, K, "expectation").item() == pytest.approx(expected, rel=1e-12)


def test_entropy_antipodal_pair():
    # log p_i = log(e^kappa + e^-kappa) - log 2 + log C = log cosh(kappa) + log C -> H = -log cosh kappa - log C
    z = torch.zeros(2, D, dtype=torch.float64)
    z[0, 0], z[1, 0] = 1.0, -1.0
    assert sphere_entropy(z, K).item() == pytest.approx(-math.log(math.cosh(K)) - log_c(), rel=1e-12)


def test_expectation_differs_when_densities_differ():
    z = torch.randn(9, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z[1] = z[0]  # a denser point: its weight grows, so the two estimators must disagree
    assert sphere_entropy(z, K, "expectation").item() < sphere_entropy(z, K).item()


def test_reconstruction_aligned_and_orthogonal():
    z = torch.eye(D, dtype=torch.float64)[:4]
    assert sphere_reconstruction(z, 2 * z, K).item() == pytest.approx(-K - log_c(), rel=1e-12)  # -log q = -kappa - log C
    perp = torch.eye(D, dtype=torch.float64)[4:8]
    assert sphere_reconstruction(z, perp, K).item() == pytest.approx(-log_c(), rel=1e-12)  # -log q = -log C


def test_log_normalizer_independent_values():
    assert log_vmf_normalizer(128, 10.0) == pytest.approx(126.6639961151, abs=1e-8)
    for k in (0.5, 10.0):
        assert log_vmf_normalizer(3, k) == pytest.approx(math.log(k / (4 * math.pi * math.sinh(k))), abs=1e-10)
    for d in (3, 64, 500):
        area = math.log(2) + d / 2 * math.log(math.pi) - math.lgamma(d / 2)
        assert log_vmf_normalizer(d, 1e-8) == pytest.approx(-area, abs=1e-8)
    assert all(math.isfinite(log_vmf_normalizer(d, 10.0)) for d in (128, 1024, 4096))


def test_discrete_terms():
    k, eps = 6, 1e-7
    assert discrete_entropy(torch.full((4, k), 1 / k)).item() == pytest.approx(math.log(k))  # uniform: log K
    one = torch.zeros(5, k)
    one[:, 2] = 1
    assert discrete_entropy(one).item() == pytest.approx(0.0, abs=1e-7)  # all rows the same one-hot: 0
    assert discrete_entropy(torch.eye(k)[:4]).item() == pytest.approx(math.log(4))  # N <= K distinct one-hots: log N
    # symmetric cross-entropy with the official eps inside the log, H(a, b) = -sum_k a_k log(b_k + eps):
    # identical one-hots: -log(1 + eps) both ways; different one-hots: -log(0 + eps) = 16.118 both ways (the cap);
    # uniform vs uniform: -log(1/K + eps)
    eye = torch.eye(k, dtype=torch.float64)[:4]
    assert discrete_reconstruction(eye, eye).item() == pytest.approx(-math.log(1 + eps), abs=1e-15)
    assert discrete_reconstruction(eye, eye.roll(1, 1)).item() == pytest.approx(-math.log(eps), rel=1e-12)
    assert -math.log(eps) == pytest.approx(16.118, abs=1e-3)
    u = torch.full((3, k), 1 / k, dtype=torch.float64)
    assert discrete_reconstruction(u, u).item() == pytest.approx(-math.log(1 / k + eps), rel=1e-12)


def test_discrete_reconstruction_is_symmetric_and_pairs_every_crop():
    # entrec_loss for dino: teacher crops t0, t1 against student crops s0, s1, s2 without (0, 0), (1, 1):
    # rec = [R(t0, s1) + R(t0, s2) + R(t1, s0) + R(t1, s2)] / 4 with the symmetric R; ent = mean of the two
    # global student crops' batch entropies; loss = rec - ent.
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    t = [torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(2)]
    tau_t = 0.04 + 0.03 * 2 / 3  # epoch 2 of a 4-epoch linear warm-up from 0.04 to 0.07
    assert entrec.teacher_temp(2, 0.04, 0.07, 4) == pytest.approx(tau_t) and entrec.teacher_temp(9, 0.04, 0.07, 4) == 0.07
    p_t = [torch.softmax(x / tau_t, 1) for x in t]
    p_s = [torch.softmax(x / 0.1, 1) for x in s]
    assert discrete_reconstruction(p_t[0], p_s[1]).item() == pytest.approx(discrete_reconstruction(p_s[1], p_t[0]).item())
    rec = sum(discrete_reconstruction(p_t[i], p_s[j]).item() for i, j in ((0, 1), (0, 2), (1, 0), (1, 2))) / 4
    ent = (discrete_entropy(p_s[0]).item() + discrete_entropy(p_s[1]).item()) / 2
    loss, e, r = entrec.entrec_loss(torch.stack(s), torch.stack(t), None, "dino", student_temp=0.1, teacher_temp=tau_t)
    assert (r.item(), e.item(), loss.item()) == pytest.approx((rec, ent, rec - ent), rel=1e-12)


def tiny(variant):
    extra = ["--out-dim", "64"] if variant == "dino" else []
    return TINY + ["--proj-hidden", "64", "--proj-dim", "32", "--variant", variant] + extra


@pytest.mark.parametrize("variant,extra", [("simclr", []), ("byol", ["--ema", "0"]),
                                           ("dino", ["--local-crops", "2", "--warmup-teacher-temp-epochs", "1"])])
def test_variants_end_to_end(tmp_path, variant, extra):
    call("entrec.py", *tiny(variant), *extra, "--out-dir", tmp_path)
    rec = json.loads(open(tmp_path / "log.jsonl").readline())
    assert rec["loss"] == pytest.approx(rec["reconstruction"] - rec["entropy"], rel=1e-6, abs=1e-6)
    if variant == "dino":  # DINO's head: weight-normalised prototypes on an L2-normalised bottleneck
        sd = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
        assert sd["online.head.v"].shape == (64, 32) and "target.head.v" in sd
        assert 0 <= rec["entropy"] <= math.log(64) + 1e-6
    call("eval_linear.py", "--checkpoint", tmp_path / "last.pt", "--probe-epochs", "2", "--limit", "500")


@pytest.mark.parametrize("variant,extra,words", [
    ("byol", ["--kappa", "0"], ["--kappa"]), ("simclr", ["--kappa", "-2"], ["--kappa"]),
    ("byol", ["--variant", "moco"], ["invalid choice"]), ("byol", ["--entropy-estimator", "knn"], ["invalid choice"]),
    # a flag that the chosen variant would ignore is an error, not silence
    ("simclr", ["--ema", "0.9"], ["--ema does nothing", "simclr"]), ("byol", ["--out-dim", "64"], ["--out-dim"]),
    ("dino", ["--kappa", "5"], ["--kappa does nothing"]), ("byol", ["--local-crops", "2"], ["--local-crops"]),
    ("dino", ["--entropy-estimator", "average"], ["favours collapse"])])
def test_bad_input(tmp_path, variant, extra, words, capsys):
    msg = arg_error(entrec, tiny(variant) + ["--out-dir", str(tmp_path), *extra], capsys)
    assert all(w in msg for w in words), msg
