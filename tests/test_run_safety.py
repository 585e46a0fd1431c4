"""What a busy user does to runs: start several at once, kill them at every point of the end of an epoch, interrupt
them, resume one twice. No launch order, kill or interrupt mixes two runs or loses a finished epoch, and each ends in
one line that says how to continue."""
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import common
import simclr
from conftest import ROOT, TINY

FAST = TINY + ["--width", "4", "--proj-hidden", "16", "--proj-dim", "8", "--num-train", "64", "--batch-size", "32"]
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}
LOGS = tempfile.TemporaryDirectory(prefix="run-safety-")  # the subprocesses' stderr, removed when pytest exits


def start(*args, cwd=ROOT, code=None):
    """A script run as a separate process (stderr to a file, read back with .err()); code: python run instead of the
    script, with the script's argv."""
    log = tempfile.NamedTemporaryFile("w+", dir=LOGS.name, suffix=".txt", delete=False)  # never in the checkout
    cmd = [sys.executable, "-c", code, *map(str, args)] if code else [sys.executable, os.path.join(ROOT, "simclr.py"),
                                                                     *map(str, args)]
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log, env=ENV, text=True)
    p.err = lambda: open(log.name).read()
    STARTED.append(p)
    return p


STARTED = []  # the processes this module started: a test that fails must not leave one running


@pytest.fixture(autouse=True)
def no_process_left():
    yield
    while STARTED:
        p = STARTED.pop()
        if p.poll() is None:
            p.kill()
            p.wait()


def test_runs_started_together_get_a_folder_each(tmp_path):
    temperatures = (0.1, 0.2, 0.3)
    procs = [start(*FAST, "--epochs", "1", "--eval-every", "0", "--temperature", t, cwd=tmp_path) for t in temperatures]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.err()
    said = {t: p.err().split("run folder: ")[1].split()[0] for t, p in zip(temperatures, procs)}  # each prints its own
    assert sorted(said.values()) == ["runs/simclr-synthetic-resnet18"] + [f"runs/simclr-synthetic-resnet18-{k}"
                                                                          for k in (2, 3)]
    for t, folder in said.items():  # each folder holds exactly the run that named it
        ck = torch.load(tmp_path / folder / "last.pt", weights_only=True)
        assert ck["args"]["temperature"] == t and ck["args"]["out_dir"] == folder
        assert len(open(tmp_path / folder / "log.jsonl").readlines()) == 1


# A run of 2 epochs killed (SIGKILL, no chance to clean up) at its second end of epoch, at each of its points: KILLER
# wraps the function that runs at that point so that its second call kills the process there. Resumed, the run must be
# the uninterrupted one, bit for bit (after a kill past the last checkpoint, the resume only restores the log).
KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import common, simclr
point, calls = sys.argv[1], []
def kill():
    os.kill(os.getpid(), signal.SIGKILL)
def second(fn, before=None, after=None):
    def wrapped(*a, **k):
        calls.append(1)
        if len(calls) == 2 and before:
            before(*a, **k)
        out = fn(*a, **k)
        if len(calls) == 2 and after:
            after()
        return out
    return wrapped
class Torn:  # a log file that dies in the middle of its line
    def __init__(self, f): self.f = f
    def __enter__(self): return self
    def __exit__(self, *a): self.f.close()
    def write(self, text): self.f.write(text[: len(text) // 2]); self.f.flush(); kill()
def torn_write(path):
    open(path, "wb").write(b"PK half a checkpoint"); kill()
if point == "knn":
    common.knn_monitor = second(common.knn_monitor, before=lambda *a: kill())
elif point == "checkpoint":
    common.save_checkpoint = second(common.save_checkpoint, before=lambda path, state: torn_write(path + ".tmp"))
elif point == "between":
    common.save_checkpoint = second(common.save_checkpoint, after=kill)
elif point == "log":  # the log is opened for appending once per epoch: its second opening is the second epoch's
    def opened(path, mode="r", **k):
        f = open(path, mode, **k)
        if str(path).endswith("log.jsonl") and mode == "a":
            calls.append(1)
            return Torn(f) if len(calls) == 2 else f
        return f
    common.open = opened
simclr.train(simclr.get_args(sys.argv[2:]))
"""


def model_and_log(folder):
    ck = torch.load(folder / "last.pt", weights_only=True)
    return ck["epoch"], ck["model"], ck["optimizer"]["state"], ck["log"], open(folder / "log.jsonl").read()


def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    assert start(*FAST, "--epochs", "2", "--out-dir", out).wait(timeout=300) == 0
    return model_and_log(out)


@pytest.mark.parametrize("point", ["knn", "checkpoint", "between", "log"])
def test_killed_at_any_point_of_the_end_of_an_epoch_resumes_to_the_same_run(tmp_path, uninterrupted, point):
    out = tmp_path / "run"
    p = start(point, *FAST, "--epochs", "2", "--out-dir", out, code=KILLER.format(root=ROOT))
    assert p.wait(timeout=300) == -signal.SIGKILL, p.err()
    assert len(torch.load(out / "last.pt", weights_only=True)["log"]) == (2 if point in ("between", "log") else 1)
    resumed = start("--out-dir", out, "--resume")  # as the user would, in a process of its own like the runs it must
    assert resumed.wait(timeout=300) == 0, resumed.err()  # equal; after a kill past the last checkpoint: only the log
    assert ("did not match the checkpoint" in resumed.err()) == (point in ("between", "log"))  # a warning
    assert same(model_and_log(out), uninterrupted)  # bit-exact: weights, optimiser state, log file
    assert sorted(os.listdir(out)) == [".lock", "last.pt", "log.jsonl"]  # no temporary file left


def interrupt(tmp_path, sig, after_epochs):
    """Start a run of 2 long epochs, send `sig` once `after_epochs` epochs are logged; -> (process, its stderr)."""
    out = tmp_path / "run"
    p = start(*FAST, "--num-train", "512", "--batch-size", "16", "--epochs", "2", "--eval-every", "0", "--out-dir", out,
              cwd=tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        logged = len(open(out / "log.jsonl").readlines()) if (out / "log.jsonl").exists() else 0
        if "run folder:" in p.err() and logged >= after_epochs:
            break
        time.sleep(0.05)
    p.send_signal(sig)
    p.wait(timeout=120)
    return p, p.err()


def test_sigterm_stops_with_one_line_and_the_command_that_continues(tmp_path):
    p, err = interrupt(tmp_path, signal.SIGTERM, after_epochs=1)
    assert p.returncode == 143 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("SIGTERM: stopped in epoch 2 of 2; the last checkpoint is ") and "(epoch 1)" in last, last
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]
    cmd = shlex.split(last.split("continue with: ")[1])
    assert cmd[0] == "python" and cmd[-2] == "--resume"
    done = subprocess.run([sys.executable, *cmd[1:]], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert [r["epoch"] for r in torch.load(tmp_path / "run" / "last.pt", weights_only=True)["log"]] == [1, 2]


def test_sigint_before_the_first_epoch_says_there_is_nothing_to_continue(tmp_path):
    p, err = interrupt(tmp_path, signal.SIGINT, after_epochs=0)
    assert p.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == "SIGINT: stopped in epoch 1 of 2; no epoch has finished: start it again"


def test_ctrl_c_in_the_evaluation_is_one_line(tmp_path):
    simclr.train(simclr.get_args(FAST + ["--out-dir", str(tmp_path / "run")]))
    p = start("--checkpoint", tmp_path / "run" / "last.pt", "--probe-epochs", "100000", "--device", "cpu",
              code=f"import runpy, sys; sys.path.insert(0, {ROOT!r}); sys.argv[0] = 'eval_linear.py'; "
                   f"runpy.run_path({os.path.join(ROOT, 'eval_linear.py')!r}, run_name='__main__')")
    deadline = time.time() + 120
    while time.time() < deadline and "linear probe" not in p.err():  # the probe's progress bar has started
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=60) == 130
    assert "Traceback" not in p.err() and "KeyboardInterrupt" not in p.err(), p.err()
    assert p.err().strip().splitlines()[-1].startswith("SIGINT: evaluation stopped before its results were written")
    assert not (tmp_path / "run" / "last.eval.json").exists()


def test_a_signal_while_writing_waits_for_the_checkpoint_and_log_line(tmp_path, monkeypatch):
    save = common.save_checkpoint

    def save_and_signal(path, state):  # SIGTERM arrives in the middle of the checkpoint write
        os.kill(os.getpid(), signal.SIGTERM)
        save(path, state)
    monkeypatch.setattr(common, "save_checkpoint", save_and_signal)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            simclr.train(simclr.get_args(FAST + ["--epochs", "2", "--out-dir", str(tmp_path)]))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert e.value.code == 143
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1  # whole, and its log line written
    assert len(open(tmp_path / "log.jsonl").readlines()) == 1


def test_a_run_in_use_cannot_be_resumed_twice_nor_continued_into_another_run(tmp_path):
    import fcntl
    for run in ("a", "b"):
        simclr.train(simclr.get_args(FAST + ["--out-dir", str(tmp_path / run)]))
    with pytest.raises(SystemExit, match="holds another run"):  # run a continued in run b's folder: refused
        simclr.train(simclr.get_args(["--resume", str(tmp_path / "a" / "last.pt"), "--epochs", "2", "--out-dir",
                                      str(tmp_path / "b")]))
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["epoch"] == 1
    with open(tmp_path / "a" / ".lock", "a+") as held:  # as a live run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit, match="a running process uses it"):
            simclr.train(simclr.get_args(FAST + ["--out-dir", str(tmp_path / "a"), "--resume", "--epochs", "2"]))


def test_the_plotting_script_reads_a_log_with_a_torn_last_line(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "tests", "scripts"))
    import plot  # matplotlib is only imported to draw
    (tmp_path / "log.jsonl").write_text('{"epoch": 1, "loss": 2.5}\n{"epoch": 2, "loss": 2.25}\n{"epoch": 3, "lo')
    assert plot.read_log(tmp_path) == [{"epoch": 1, "loss": 2.5}, {"epoch": 2, "loss": 2.25}]
    assert "skipped 1 line(s)" in capsys.readouterr().err
