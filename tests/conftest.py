import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a CPU-sized run: 256 synthetic images, ResNet-18 at width 8, small projector, one epoch
TINY = ["--dataset", "synthetic", "--arch", "resnet18", "--width", "8", "--num-train", "256", "--batch-size", "64",
        "--epochs", "1", "--eval-every", "1", "--device", "cpu", "--warmup-epochs", "0"]


def run(script, *args, check=True):
    """Run a script of the project as a user would; return the CompletedProcess."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


@pytest.fixture
def runner():
    return run


def arg_error(module, argv, capsys):
    """get_args(argv) must stop with a one-line 'error:' message and a non-zero exit; returns the message."""
    with pytest.raises(SystemExit) as e:
        module.get_args(argv)
    assert e.value.code not in (0, None)
    msg = str(e.value.code) if isinstance(e.value.code, str) else capsys.readouterr().err
    assert "error:" in msg
    return msg
