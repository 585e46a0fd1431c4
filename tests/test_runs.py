"""Runs never lose work and every bad input is one line: run folders, resume checks, folder decoding, faults, and a
table of bad flags for every script (non-zero exit, no traceback, a line naming the flag)."""
import json
import os

import numpy as np
import pytest
import torch

import common
import dino
import entrec
import eval_linear
import hydes
import mmae
import simclr
from conftest import TINY, call, one_line_error, run

SIMCLR_TINY = TINY + ["--proj-hidden", "32", "--proj-dim", "16", "--num-train", "128", "--eval-every", "0"]


def lines(path):
    return [json.loads(x) for x in open(path)]


def test_a_second_run_never_writes_into_the_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default folder is runs/<method>-<dataset>-<arch> under the working directory
    simclr.train(simclr.get_args(SIMCLR_TINY))  # the folder is claimed when the run starts
    first = torch.load("runs/simclr-synthetic-resnet18/last.pt", weights_only=True)["args"]
    assert first["out_dir"] == os.path.join("runs", "simclr-synthetic-resnet18")
    simclr.train(simclr.get_args(SIMCLR_TINY + ["--temperature", "0.5"]))
    second = torch.load("runs/simclr-synthetic-resnet18-2/last.pt", weights_only=True)["args"]
    assert second["out_dir"] == os.path.join("runs", "simclr-synthetic-resnet18-2")  # a fresh folder, not the first's
    assert len(lines("runs/simclr-synthetic-resnet18/log.jsonl")) == 1
    assert torch.load("runs/simclr-synthetic-resnet18/last.pt", weights_only=True)["args"]["temperature"] == 0.2
    # an explicit --out-dir that holds a run: one line saying what to do
    with pytest.raises(SystemExit, match="holds another run, or a running process uses it: continue it with --resume"):
        simclr.train(simclr.get_args(SIMCLR_TINY + ["--out-dir", "runs/simclr-synthetic-resnet18"]))
    # --resume without a path continues the newest matching run, with its own flags (temperature 0.5, 1 epoch done)
    resumed = simclr.get_args(["--resume", "--dataset", "synthetic", "--epochs", "2"])
    assert resumed.resume == os.path.join("runs", "simclr-synthetic-resnet18-2", "last.pt")
    assert (resumed.temperature, resumed.width, resumed.num_train, resumed.image_size) == (0.5, 8, 128, 32)
    assert resumed.mean == first["mean"] and len(resumed.mean) == 3  # the normalisation stats come from the checkpoint
    simclr.train(resumed)
    assert [r["epoch"] for r in lines("runs/simclr-synthetic-resnet18-2/log.jsonl")] == [1, 2]


def test_resume_refuses_a_different_run_and_says_when_nothing_is_left(tmp_path, capsys):
    out = str(tmp_path / "run")
    call("simclr.py", *SIMCLR_TINY, "--out-dir", out)
    for flag, value, saved in (("--width", "16", "8"), ("--dataset", "cifar10", "synthetic"),
                               ("--temperature", "0.3", "0.2"), ("--arch", "resnet50", "resnet18")):
        with pytest.raises(SystemExit) as e:
            simclr.get_args(SIMCLR_TINY + ["--out-dir", out, "--resume", flag, value])
        assert f"{flag} {value} (the checkpoint has {saved})" in str(e.value.code), e.value.code
    with pytest.raises(SystemExit, match="a simclr checkpoint, not hydes"):
        hydes.get_args(["--resume", os.path.join(out, "last.pt")])
    with pytest.raises(SystemExit) as e:  # --epochs not above the epochs done: said, exit 0
        simclr.train(simclr.get_args(SIMCLR_TINY + ["--out-dir", out, "--resume"]))
    assert e.value.code == 0 and "nothing to do" in capsys.readouterr().err


def test_a_longer_resume_says_the_schedules_restart(tmp_path, capsys):
    # SIMCLR_TINY: 128 images, batch 64 -> 2 steps an epoch, no warm-up, base lr 0.3 x 64 / 256 = 0.075. One epoch
    # ends at step 1 of 2: 0.075 (1 + cos(pi / 2)) / 2 = 0.0375. Resumed with --epochs 4, its next step is 2 of 8:
    # 0.075 (1 + cos(pi / 4)) / 2 = 0.0640: the cosine starts again over the new total, and the run says so.
    out = str(tmp_path / "run")
    call("simclr.py", *SIMCLR_TINY, "--out-dir", out)
    capsys.readouterr()
    call("simclr.py", *SIMCLR_TINY, "--out-dir", out, "--resume", "--epochs", "4")
    err = capsys.readouterr().err
    note = next(line for line in err.splitlines() if line.startswith("note: --epochs 4 for a run planned for 1"))
    assert "from 0.0375 to about 0.064 (a warm restart" in note, note
    assert "--epochs 8 (a warm restart" in err.strip().splitlines()[-1]  # the "train on" hint of the finished run


def test_images_of_one_colour_are_one_line_before_training(tmp_path, capsys):
    # every pixel of every image the same colour (R 200, G 0, B 50): the pixel standard deviation is 0 in all three
    # channels, so normalising would divide by 0; the data step says so instead of a nan loss later
    for split in ("train", "val"):
        for i in range(4):
            save(str(tmp_path / split / "a" / f"{i}.png"), np.full((8, 8, 3), (200, 0, 50), np.uint8))
    msg = one_line_error("simclr.py", SIMCLR_TINY + ["--dataset", "folder", "--data-dir", tmp_path, "--batch-size",
                                                     "2", "--out-dir", tmp_path / "run"], capsys)
    assert "pixel standard deviation below half a grey level in channel R/G/B" in msg, msg
    # 48 images of one mid-grey (128): their computed standard deviation is rounding noise (5.6e-16 in float64), not
    # 0, and must be caught all the same (below half a grey level, 0.5 / 255)
    for i in range(48):
        save(str(tmp_path / "grey" / "train" / "a" / f"{i}.png"), np.full((32, 32, 3), 128, np.uint8))
    save(str(tmp_path / "grey" / "val" / "a" / "0.png"), np.full((32, 32, 3), 128, np.uint8))
    msg = one_line_error("simclr.py", SIMCLR_TINY + ["--dataset", "folder", "--data-dir", tmp_path / "grey",
                                                     "--batch-size", "2", "--out-dir", tmp_path / "run2"], capsys)
    assert "below half a grey level in channel R/G/B" in msg, msg
    # a --data-dir that is a file, or whose train/ is a file: one line each, no NotADirectoryError
    (tmp_path / "afile").write_text("x")
    (tmp_path / "filetrain").mkdir()
    (tmp_path / "filetrain" / "train").write_text("x")
    for where, said in (("afile", "is a file, not a folder"), ("filetrain", "no class folders under")):
        msg = one_line_error("simclr.py", SIMCLR_TINY + ["--dataset", "folder", "--data-dir", tmp_path / where,
                                                         "--out-dir", tmp_path / f"run-{where}"], capsys)
        assert said in msg, msg


def test_killed_between_checkpoint_and_log_resumes_without_a_duplicate_line(tmp_path):
    out = tmp_path / "run"
    call("simclr.py", *SIMCLR_TINY, "--epochs", "2", "--out-dir", out, "--save-every", "1")
    # as if killed after epoch 1's checkpoint, with epoch 2's log line and a half-written checkpoint left behind
    os.replace(out / "epoch0001.pt", out / "last.pt")
    (out / "last.pt.tmp").write_bytes(b"half a checkpoint")
    call("simclr.py", "--out-dir", out, "--resume")
    assert [r["epoch"] for r in lines(out / "log.jsonl")] == [1, 2] and not (out / "last.pt.tmp").exists()


def test_io_errors_are_one_line_and_leave_no_temp_file(tmp_path, monkeypatch):
    def full_disk(state, f):
        open(f, "wb").write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match="cannot write .*ck.pt: No space left on device"):
        common.save_checkpoint(str(tmp_path / "ck.pt"), {})
    assert os.listdir(tmp_path) == []
    (tmp_path / "file").write_text("x")  # --out-dir below a file cannot be created
    p = run("simclr.py", *SIMCLR_TINY, "--out-dir", tmp_path / "file" / "run", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "cannot write the run folder" in p.stderr, p.stderr


def test_every_method_stops_on_a_non_finite_loss(tmp_path, capsys):
    # lr 1e30 diverges within an epoch; M-MAE's log-det included: one line, no checkpoint written
    mmae_tiny = [a.replace("resnet18", "vit_tiny") for a in TINY] + ["--decoder-depth", "1", "--decoder-dim", "32",
                                                                   "--num-train", "128", "--eval-every", "0"]
    for script, extra in (("simclr.py", SIMCLR_TINY), ("mmae.py", mmae_tiny)):
        msg = one_line_error(script, extra + ["--lr", "1e30", "--out-dir", tmp_path / script], capsys)
        assert "the loss became" in msg, msg
        assert not (tmp_path / script / "last.pt").exists()


# ----------------------------------------------------------------------------------------------
# Folder decoding
# ----------------------------------------------------------------------------------------------
def save(path, array, mode=None):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)


def test_decode_size_follows_most_images_and_16_bit_float_images_convert(tmp_path, capsys):
    ramp16 = np.tile(np.linspace(0, 65535, 24).astype(np.uint16), (24, 1))  # a 16-bit horizontal gradient
    save(str(tmp_path / "train" / "a" / "0_thumb.png"), np.zeros((4, 4, 3), np.uint8))  # first in sort order
    save(str(tmp_path / "train" / "a" / "1_grad16.png"), ramp16)
    save(str(tmp_path / "train" / "b" / "2.png"), np.zeros((24, 24, 3), np.uint8))
    save(str(tmp_path / "train" / "b" / "3_float.tiff"), np.full((24, 24), 0.5, np.float32), "F")
    data = common.get_dataset("folder", str(tmp_path), "train")
    assert data.images.shape == (4, 3, 24, 24)  # 24 px: the most common size, not the 4 px thumbnail
    assert "at 24 px (1 resized)" in capsys.readouterr().err
    grad = data.images[1, 0, 12].float()  # 0 .. 65535 -> 0 .. 255, left to right
    assert grad[0] < 3 and grad[-1] > 252 and (grad[1:] >= grad[:-1]).all()
    assert data.images[3].float().mean().item() == pytest.approx(127.5, abs=1)  # float 0.5 -> mid grey, not white


def test_symlink_loops_neither_hang_nor_relabel(tmp_path):
    for c in "ab":
        save(str(tmp_path / "train" / c / "0.png"), np.zeros((8, 8, 3), np.uint8))
    os.symlink(tmp_path / "train" / "a", tmp_path / "train" / "a" / "loop")  # a loop
    os.symlink(tmp_path / "train" / "b", tmp_path / "train" / "a" / "to_b")  # b's images under a
    assert common.get_dataset("folder", str(tmp_path), "train").labels.tolist() == [0, 1]


def test_oversized_images_are_named(tmp_path, monkeypatch):
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 100 x 100 image stands in for 20000 x 20000
    save(str(tmp_path / "train" / "a" / "huge.png"), np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(SystemExit, match="too large to decode .*huge.png"):
        common.get_dataset("folder", str(tmp_path), "train", image_size=8)


# ----------------------------------------------------------------------------------------------
# Every numeric flag of every script, out of range: a one-line error naming it
# ----------------------------------------------------------------------------------------------
COMMON_BAD = [("--num-train", "-100"), ("--width", "0"), ("--epochs", "0"), ("--batch-size", "1"), ("--lr", "nan"),
              ("--lr", "0"), ("--wd", "-1"), ("--warmup-epochs", "-1"), ("--image-size", "-32"), ("--save-every", "-1"),
              ("--eval-every", "-2"), ("--global-scale", "0 1"), ("--global-scale", "0.5 0.2"), ("--device", "foo")]
BAD = {
    simclr: [("--temperature", "0"), ("--temperature", "inf"), ("--proj-hidden", "0"), ("--proj-dim", "0")],
    hydes: [("--kappa", "inf"), ("--kappa", "1e300"), ("--kappa", "0"), ("--alpha", "-1"), ("--beta", "nan"),
            ("--proj-dim", "1"), ("--proj-hidden", "0"), ("--global-crops", "1"), ("--local-crops", "-1"),
            ("--local-scale", "0.5 2")],
    dino: [("--out-dim", "0"), ("--head-layers", "0"), ("--momentum-teacher", "1.5"), ("--momentum-teacher-end", "-1"),
           ("--teacher-temp", "0"), ("--warmup-teacher-temp", "-1"), ("--warmup-teacher-temp-epochs", "-1"),
           ("--student-temp", "0"), ("--center-momentum", "2"), ("--freeze-last-layer", "-1"), ("--wd-end", "-1"),
           ("--clip-grad", "-1"), ("--min-lr", "-1"), ("--global-crops", "3"), ("--local-crops", "-1")],
    entrec: [("--kappa", "inf"), ("--ema", "1"), ("--ema", "-0.1"), ("--proj-hidden", "0"), ("--proj-dim", "1")],
    mmae: [("--mask-ratio", "1"), ("--mask-ratio", "0"), ("--decoder-dim", "6"), ("--decoder-depth", "0"),
           ("--lam", "-1"), ("--mu", "0"), ("--patch-size", "-4")],
}
ENTREC_DINO = [("--out-dim", "0"), ("--student-temp", "0"), ("--teacher-temp", "-1"), ("--warmup-teacher-temp", "0"),
               ("--warmup-teacher-temp-epochs", "-1"), ("--local-crops", "-1")]
CASES = [(m, f, v, []) for m, bad in BAD.items() for f, v in COMMON_BAD + bad] + \
    [(entrec, f, v, ["--variant", "dino"]) for f, v in ENTREC_DINO] + \
    [(eval_linear, f, v, ["--checkpoint", "x.pt"]) for f, v in (("--probe-epochs", "0"), ("--probe-lr", "-1"),
                                                               ("--limit", "0"), ("--probe-wd", "nan"))]


@pytest.mark.parametrize("module,flag,value,extra", CASES,
                         ids=[f"{m.__name__}{' '.join(e[:2])} {f} {v}" for m, f, v, e in CASES])
def test_bad_flag_is_one_line_naming_it(module, flag, value, extra, tmp_path, capsys):
    argv = ["--dataset", "synthetic", "--out-dir", str(tmp_path / "run")] if module is not eval_linear else []
    with pytest.raises(SystemExit) as e:
        module.get_args(argv + extra + [flag, *value.split()])
    assert e.value.code not in (0, None)
    msg = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in msg and flag in msg, msg


@pytest.mark.parametrize("module,group", [(simclr, "SimCLR"), (hydes, "HyDeS"), (dino, "DINO"), (entrec, "EntRec"),
                                          (mmae, "M-MAE")])
def test_help_starts_with_the_method_and_shows_each_default_once(module, group, capsys):
    import re
    with pytest.raises(SystemExit) as e:
        module.get_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    heads = [line[:-1] for line in out.splitlines() if line and not line[0].isspace() and line.endswith(":")]
    assert heads == ["options", group, "data", "model", "optimisation and augmentation", "run"]
    for block in re.split(r"\n  (?=-)", out.split(f"\n{group}:\n")[1]):  # one block per flag
        assert block.count("default") <= 1, block


def test_evaluation_faults_are_one_line(tmp_path):
    call("simclr.py", *SIMCLR_TINY, "--out-dir", tmp_path)
    ck = str(tmp_path / "last.pt")
    with pytest.raises(SystemExit, match="--device bogus is not a device"):
        eval_linear.main(eval_linear.get_args(["--checkpoint", ck, "--device", "bogus"]))
    os.mkdir(tmp_path / "last.eval.json")  # where the results go is a folder: the write fails
    with pytest.raises(SystemExit, match="cannot write .*last.eval.json"):
        eval_linear.main(eval_linear.get_args(["--checkpoint", ck, "--probe-epochs", "1", "--limit", "64"]))
