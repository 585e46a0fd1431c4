"""EntRec: vMF-KDE entropy, vMF reconstruction, discrete terms; variants end to end. Numbers by hand."""
import json
import math

import pytest
import torch

from conftest import TINY, arg_error, run
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
    k = 6
    assert discrete_entropy(torch.full((4, k), 1 / k)).item() == pytest.approx(math.log(k))  # uniform: log K
    one = torch.zeros(5, k)
    one[:, 2] = 1
    assert discrete_entropy(one).item() == pytest.approx(0.0, abs=1e-7)  # all rows the same one-hot: 0
    assert discrete_entropy(torch.eye(k)[:4]).item() == pytest.approx(math.log(4))  # N <= K distinct one-hots: log N
    assert discrete_reconstruction(torch.eye(k)[:4], torch.eye(k)[:4]).item() == pytest.approx(0.0, abs=1e-7)
    # uniform vs uniform: H(u, u) = log K both ways
    u = torch.full((3, k), 1 / k)
    assert discrete_reconstruction(u, u).item() == pytest.approx(math.log(k))


ENTREC_TINY = TINY + ["--proj-hidden", "64", "--proj-dim", "32", "--out-dim", "64"]


@pytest.mark.parametrize("variant,extra", [("simclr", []), ("byol", []), ("byol", ["--ema", "0"]),
                                           ("dino", ["--entropy-estimator", "expectation"])])
def test_variants_end_to_end(tmp_path, variant, extra):
    run("entrec.py", *ENTREC_TINY, "--variant", variant, *extra, "--out-dir", tmp_path)
    rec = json.loads(open(tmp_path / "log.jsonl").readline())
    assert rec["loss"] == pytest.approx(rec["reconstruction"] - rec["entropy"], rel=1e-6, abs=1e-6)
    run("eval_linear.py", "--checkpoint", tmp_path / "last.pt", "--probe-epochs", "2", "--limit", "500")


@pytest.mark.parametrize("extra,flag", [(["--kappa", "0"], "--kappa"), (["--kappa", "-2"], "--kappa"),
                                        (["--variant", "moco"], "invalid choice"),
                                        (["--entropy-estimator", "knn"], "invalid choice")])
def test_bad_input(tmp_path, extra, flag, capsys):
    import entrec
    assert flag in arg_error(entrec, ENTREC_TINY + ["--out-dir", str(tmp_path), *extra], capsys)
