import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# real photographs (10 Tiny-ImageNet classes) for the learning tests; SSL_SHARED_DATA: the folder holding the zip
REAL_IMAGES = os.path.join(os.environ.get("SSL_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data")),
                           "tin10-64.zip")

# a CPU-sized run: 256 synthetic images, ResNet-18 at width 8, small projector, one epoch
TINY = ["--dataset", "synthetic", "--arch", "resnet18", "--width", "8", "--num-train", "256", "--batch-size", "64",
        "--epochs", "1", "--eval-every", "1", "--device", "cpu", "--warmup-epochs", "0"]


@pytest.fixture
def three_classes(monkeypatch):
    """The miniature Tiny-ImageNets of the tests have 3 classes; the completeness check asks for the official 200."""
    import common
    url, md5, _ = common.TINY_IMAGENET
    monkeypatch.setattr(common, "TINY_IMAGENET", (url, md5, 3))


def run(script, *args, check=True):
    """Run a script of the project as a user would; return the CompletedProcess."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def call(script, *args):
    """Run a script's train() (or eval_linear's main()) inside the test process, for tests that check results, not the
    command line: no interpreter start-up, and the synthetic data is made once per process. A non-zero SystemExit
    (a one-line error) fails the test with its message."""
    import importlib
    mod = importlib.import_module(os.path.splitext(script)[0])
    argv = [str(a) for a in args]
    try:
        return (mod.main if script == "eval_linear.py" else mod.train)(mod.get_args(argv))
    except SystemExit as e:
        if e.code not in (0, None):
            raise AssertionError(f"{script} {' '.join(argv)} stopped: {e.code}") from None


def one_line_error(script, argv, capsys):
    """A script's get_args + train (eval_linear: main) in this process must stop with a one-line message and a
    non-zero exit (a SystemExit, which Python prints as that line alone, not another exception with a traceback);
    -> the message."""
    import importlib
    mod = importlib.import_module(script[:-3])
    with pytest.raises(SystemExit) as e:
        (mod.main if script == "eval_linear.py" else mod.train)(mod.get_args([str(a) for a in argv]))
    assert e.value.code not in (0, None)
    msg = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert "\n" not in msg.strip(), msg
    return msg


def arg_error(module, argv, capsys):
    """get_args(argv) must stop with a one-line 'error:' message and a non-zero exit; returns the message."""
    with pytest.raises(SystemExit) as e:
        module.get_args(argv)
    assert e.value.code not in (0, None)
    msg = str(e.value.code) if isinstance(e.value.code, str) else capsys.readouterr().err
    assert "error:" in msg
    return msg


def random_init_knn(train, val, width=8, size=32):
    """The floor of the learning tests: kNN top-1 (k=20) of the ResNet-18 a run with --seed 0 starts from (same
    initial weights), on the same data, normalised with the training images' statistics, as the runs do."""
    import torch

    import common
    torch.manual_seed(0)
    net, _ = common.build_backbone("resnet18", size, width)
    x = train.images[:: max(1, len(train.images) // 10000)].float() / 255
    stats = x.mean((0, 2, 3)), x.std((0, 2, 3))
    return common.knn_monitor(net, common.Data(None, train, val, stats), torch.device("cpu"))


def log_vmf_normalizer_by_quadrature(d, kappa, n=20000):
    """log C_D(kappa) from the integral I_v(k) = (k/2)^v / (sqrt(pi) Gamma(v + 1/2)) int_0^pi e^{k cos t} sin^{2v} t dt
    (v = D/2 - 1), i.e. log C_D = v log 2 - (D/2) log 2pi + log(pi)/2 + lgamma(v + 1/2) - log int(...). The integrand
    is smooth and periodic for even D, so the trapezoid rule on n points is exact to ~1e-13; logsumexp keeps it
    finite at any kappa. A derivation independent of the series the code sums."""
    import math

    import torch
    v = d / 2 - 1
    t = torch.arange(1, n, dtype=torch.float64) * math.pi / n  # the end points contribute 0 (sin = 0, v > 0)
    log_int = torch.logsumexp(kappa * t.cos() + 2 * v * t.sin().log(), 0).item() + math.log(math.pi / n)
    return v * math.log(2) - d / 2 * math.log(2 * math.pi) + 0.5 * math.log(math.pi) + math.lgamma(v + 0.5) - log_int
