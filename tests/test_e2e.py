"""End to end: each script runs on CPU on synthetic data, writes a checkpoint, eval reads it back;
resume continues the same run; bad input stops with a one-line message."""
import json
import shutil

import pytest
import torch

import common
from conftest import TINY, arg_error, call, one_line_error, run

SIMCLR_TINY = TINY + ["--proj-hidden", "64", "--proj-dim", "32"]


def assert_clean_error(p, *words):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in p.stderr, p.stderr


def test_simclr_runs_and_eval_reads_checkpoint(tmp_path, capsys):
    run("simclr.py", *SIMCLR_TINY, "--out-dir", tmp_path)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["args"]["arch"] == "resnet18" and "backbone" in ck
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert log[0]["epoch"] == 1 and "loss" in log[0] and 0 <= log[0]["knn_top1"] <= 100
    call("eval_linear.py", "--checkpoint", tmp_path / "last.pt", "--probe-epochs", "3", "--device", "cpu")
    res = json.load(open(tmp_path / "last.eval.json"))
    for key in ("knn20_top1", "knn200_top1", "linear_top1", "linear_top5"):
        assert 0 <= res[key] <= 100
    assert res["linear_top5"] >= res["linear_top1"] and "linear_top1=" in capsys.readouterr().out


def test_resume_continues_the_same_run(tmp_path):
    # Uninterrupted 2 epochs (keeping the epoch-1 checkpoint) versus a run "killed" after epoch 1:
    # its epoch-1 checkpoint resumed in a fresh folder must end with identical weights.
    a, b = tmp_path / "a", tmp_path / "b"
    args = [a if x == "A" else x for x in SIMCLR_TINY] + ["--epochs", "2", "--eval-every", "0"]
    call("simclr.py", *args, "--out-dir", a, "--save-every", "1")
    b.mkdir()
    shutil.copy(a / "epoch0001.pt", b / "last.pt")
    call("simclr.py", *args, "--out-dir", b, "--resume")
    wa = torch.load(a / "last.pt", weights_only=True)
    wb = torch.load(b / "last.pt", weights_only=True)
    assert wb["epoch"] == 2
    for k, v in wa["model"].items():
        assert torch.equal(v, wb["model"][k]), k


@pytest.mark.parametrize("extra,words", [
    (["--dataset", "mnist"], ["invalid choice"]),
    (["--dataset", "folder", "--data-dir", "/nonexistent/dir"], ["error:", "/nonexistent/dir/train"]),
    (["--dataset", "cifar10", "--data-dir", "TMP", "--no-download"], ["error:", "cifar10", "--dataset synthetic"]),
    (["--dataset", "cifar10", "--data-dir", "TMP"], ["error:", "offline", "--dataset synthetic"]),
])
def test_bad_input_is_a_one_line_error(tmp_path, extra, words, capsys):
    extra = [str(tmp_path) if x == "TMP" else x for x in extra]
    msg = one_line_error("simclr.py", SIMCLR_TINY + ["--out-dir", str(tmp_path / "run"), *extra], capsys)
    assert all(w in msg for w in words), msg


@pytest.mark.parametrize("extra,flag", [(["--batch-size", "0"], "--batch-size"), (["--temperature", "-1"], "--temperature"),
                                        (["--epochs", "0"], "--epochs"), (["--width", "0"], "--width")])
def test_bad_flags(tmp_path, extra, flag, capsys):
    import simclr
    assert flag in arg_error(simclr, SIMCLR_TINY + ["--out-dir", str(tmp_path), *extra], capsys)


def test_tinyimagenet_runs_and_eval_uses_the_same_labels(tmp_path, three_classes, capsys):
    # one flag: --dataset tinyimagenet on the official layout (here a 3-class miniature), decoded at 16 px;
    # eval_linear.py reads the same labels (sorted wnids) for its memory and val splits
    from test_common import make_tiny_imagenet
    make_tiny_imagenet(str(tmp_path / "data" / "tiny-imagenet-200"), per_class=8)
    args = [a for a in SIMCLR_TINY if a not in ("--num-train", "256")]
    args = args[:args.index("--dataset")] + args[args.index("--dataset") + 2:]
    call("simclr.py", *args, "--dataset", "tinyimagenet", "--data-dir", tmp_path / "data", "--image-size", "16",
        "--batch-size", "8", "--out-dir", tmp_path / "run")
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["args"]["image_size"] == 16 and ck["args"]["dataset"] == "tinyimagenet"
    call("eval_linear.py", "--checkpoint", tmp_path / "run" / "last.pt", "--probe-epochs", "2", "--device", "cpu")
    res = json.load(open(tmp_path / "run" / "last.eval.json"))
    assert res["dataset"] == "tinyimagenet" and 0 <= res["knn20_top1"] <= 100
    msg = one_line_error("simclr.py", args + ["--dataset", "tinyimagenet", "--data-dir", tmp_path / "nothing",
                                              "--out-dir", tmp_path / "run2"], capsys)  # offline: the download fails
    assert all(w in msg for w in ("downloading http", "failed", "put tiny-imagenet-200.zip or its extracted folder in"))


def test_corrupt_checkpoint_for_resume_and_eval(tmp_path, capsys):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"\x00garbage")
    p = run("simclr.py", *SIMCLR_TINY, "--out-dir", tmp_path, "--resume", check=False)  # as a user meets it
    assert_clean_error(p, "cannot read checkpoint")
    assert "cannot read checkpoint" in one_line_error("eval_linear.py", ["--checkpoint", bad], capsys)
    assert "does not exist" in one_line_error("eval_linear.py", ["--checkpoint", tmp_path / "missing.pt"], capsys)


@pytest.mark.parametrize("script,arch,extra", [
    ("simclr.py", "resnet18", ["--width", "64", "--proj-hidden", "64"]),
    ("mmae.py", "vit_tiny", ["--decoder-depth", "1", "--decoder-dim", "32"])])
def test_backbone_loads_into_plain_torchvision(tmp_path, script, arch, extra):
    # one epoch, then eval_linear.py --export: a plain torchvision model takes the weights with only its classifier
    # missing, and (its classifier removed) gives exactly the project backbone's pooled features
    import torch.nn as nn
    import torchvision
    call(script, "--dataset", "synthetic", "--arch", arch, "--num-train", "128", "--batch-size", "64", "--epochs", "1",
         "--eval-every", "0", "--device", "cpu", *extra, "--out-dir", tmp_path)
    call("eval_linear.py", "--checkpoint", tmp_path / "last.pt", "--export", tmp_path / "backbone.pt")
    state = torch.load(tmp_path / "backbone.pt", weights_only=True)
    if arch == "resnet18":
        plain = torchvision.models.resnet18()
        plain.conv1, plain.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()  # CIFAR stem (<= 64 px)
        classifier = {"fc.weight", "fc.bias"}
    else:
        plain = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=12, num_heads=3,
                                                     hidden_dim=192, mlp_dim=768)
        classifier = {"heads.head.weight", "heads.head.bias"}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert set(missing) == classifier and not unexpected
    plain.fc = plain.heads = nn.Identity()
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    ours, _ = common.build_backbone(arch, 32, ck["args"]["width"])
    ours.load_state_dict(ck["backbone"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), ours.eval()(x), atol=1e-5)


def test_eval_wordnet_on_a_folder_of_wordnet_classes(tmp_path, capsys, monkeypatch):
    # classes named by WordNet ids (the hand-made taxonomy of test_common): --wordnet adds the three correlations to
    # the JSON; on a dataset whose classes are not WordNet ids, or without data.noun, it is one line before any work
    import numpy as np
    from PIL import Image

    from test_common import WORDNET
    shapes = common.synthetic(36, seed=4)
    for i, (x, y) in enumerate(zip(shapes.images, shapes.labels)):
        folder = tmp_path / "data" / ("train" if i % 4 else "val") / ("n00000003", "n00000004", "n00000006")[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(x.permute(1, 2, 0).numpy())).save(folder / f"{i}.png")
    (tmp_path / "wn").mkdir()
    (tmp_path / "wn" / "data.noun").write_text(WORDNET)
    call("simclr.py", *SIMCLR_TINY, "--dataset", "folder", "--data-dir", tmp_path / "data", "--batch-size", "8",
         "--eval-every", "0", "--out-dir", tmp_path / "run")
    ck = tmp_path / "run" / "last.pt"
    # the centroid similarities of test_common's hand-made case (dog-cat 0.9, dog-tree 0.1, cat-tree 0.2), in the
    # classes' sorted order: Spearman sqrt(3) / 2 with both similarities, cophenetic 1, when the classes reach
    # WordNet in the order of the features' labels
    import eval_linear
    sim = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]])
    monkeypatch.setattr(eval_linear, "centroid_similarities", lambda f, y: (sim, torch.ones(3, dtype=torch.bool)))
    call("eval_linear.py", "--checkpoint", ck, "--probe-epochs", "1", "--wordnet", tmp_path / "wn")
    res = json.load(open(tmp_path / "run" / "last.eval.json"))
    assert (res["wordnet_wup_spearman"], res["wordnet_lch_spearman"]) == pytest.approx((3**0.5 / 2, 3**0.5 / 2))
    assert res["wordnet_cophenetic"] == pytest.approx(1.0)
    monkeypatch.undo()
    # a class missing from data.noun is one line before any feature is computed
    (tmp_path / "wn2").mkdir()
    (tmp_path / "wn2" / "data.noun").write_text(WORDNET.replace("00000006 20 n 01 tree", "00000007 20 n 01 tree"))
    monkeypatch.setattr(common, "extract_features", lambda *a, **k: pytest.fail("features before the WordNet check"))
    msg = one_line_error("eval_linear.py", ["--checkpoint", ck, "--wordnet", tmp_path / "wn2"], capsys)
    assert "1 classes are not in" in msg and "n00000006" in msg
    monkeypatch.undo()
    assert "no data.noun" in one_line_error("eval_linear.py", ["--checkpoint", ck, "--wordnet", tmp_path], capsys)
    call("simclr.py", *SIMCLR_TINY, "--out-dir", tmp_path / "synthetic")
    msg = one_line_error("eval_linear.py", ["--checkpoint", tmp_path / "synthetic" / "last.pt", "--wordnet",
                                            tmp_path / "wn"], capsys)
    assert "classes are WordNet ids" in msg
