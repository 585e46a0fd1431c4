"""DINO: loss closed forms, centre, temperature schedule, EMA; end to end. Expected values by hand."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, arg_error, run
from dino import DINO, DINOLoss, ema_update, get_args


@pytest.mark.parametrize("k", [4, 64, 1000])
def test_uniform_outputs_give_log_k(k):
    # Constant logits: P_t and P_s are uniform, so H(P_t, P_s) = -sum (1/K) log(1/K) = log K for every pair.
    loss_fn = DINOLoss(k, epochs=10)
    student = [torch.full((5, k), 0.3) for _ in range(4)]
    teacher = [torch.full((5, k), -2.0) for _ in range(2)]
    assert loss_fn(student, teacher, 0).item() == pytest.approx(math.log(k), rel=1e-6)


def test_one_hot_teacher_pairs_and_skipped_same_crop():
    # Teacher view 0 is one-hot at class 0, view 1 at class 2 (a logit of 1000 at tau 0.04; centre 0).
    # Student views s0, s1, s2. Pairs (t, s) with s != t: (0,1), (0,2), (1,0), (1,2) -> 4 pairs,
    # L = [CE(s1, 0) + CE(s2, 0) + CE(s0, 2) + CE(s2, 2)] / 4 with CE(s, c) = -log softmax(s / 0.1)[c].
    s = [torch.tensor([[0.1, 0.2, 0.3]]), torch.tensor([[0.5, -0.5, 0.0]]), torch.tensor([[-0.2, 0.0, 0.4]])]
    t = [torch.tensor([[1000.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 1000.0]])]

    def ce(v, c):
        z = [x / 0.1 for x in v[0].tolist()]
        return -(z[c] - math.log(sum(math.exp(x) for x in z)))
    expected = (ce(s[1], 0) + ce(s[2], 0) + ce(s[0], 2) + ce(s[2], 2)) / 4
    assert DINOLoss(3, epochs=10)(s, t, 0).item() == pytest.approx(expected, rel=1e-5)


def test_center_update():
    # c1 = 0.9 c0 + 0.1 m, m = the batch mean of the teacher outputs of both global crops
    loss_fn = DINOLoss(3, epochs=10)
    loss_fn.center.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    t = [torch.tensor([[0.0, 0.0, 6.0], [2.0, 0.0, 0.0]]), torch.tensor([[2.0, 4.0, 0.0], [0.0, 4.0, 2.0]])]
    loss_fn([torch.zeros(2, 3)] * 3, t, 0)  # m = [1, 2, 2]
    assert torch.allclose(loss_fn.center, torch.tensor([[0.9 + 0.1, 1.8 + 0.2, 2.7 + 0.2]]))


def test_teacher_temperature_schedule():
    # linear from 0.04 to 0.07 over 30 epochs (30 points: epoch e -> 0.04 + 0.03 e / 29), then 0.07
    loss_fn = DINOLoss(3, 0.04, 0.07, 30, epochs=100)
    assert loss_fn.teacher_temp(0) == pytest.approx(0.04)
    assert loss_fn.teacher_temp(15) == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert loss_fn.teacher_temp(29) == pytest.approx(0.07)
    assert loss_fn.teacher_temp(60) == pytest.approx(0.07)


def test_ema_and_no_gradient_to_teacher():
    import common
    args = get_args(["--out-dim", "16", "--dataset", "synthetic", "--out-dir", "/tmp/unused"])
    backbone, d = common.build_backbone("resnet18", 32, 8)
    model = DINO(backbone, d, args)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    old = [p.clone() for p in model.teacher.parameters()]
    ema_update(model.teacher, model.student, 0.9)
    for o, t, s in zip(old, model.teacher.parameters(), model.student.parameters()):
        assert torch.allclose(t, 0.9 * o + 0.1 * s)
    views = [torch.randn(4, 3, 32, 32)] * 2 + [torch.randn(4, 3, 16, 16)]
    s_out, t_out = model(views)
    assert len(s_out) == 3 and len(t_out) == 2 and s_out[0].shape == (4, 16)
    model.criterion(s_out, t_out, 0).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert any(p.grad is not None for p in model.student.parameters())


DINO_TINY = TINY + ["--out-dim", "64", "--local-crops", "2", "--warmup-teacher-temp-epochs", "1"]


@pytest.mark.parametrize("arch,extra", [("resnet18", []), ("vit_tiny", ["--num-train", "64", "--batch-size", "32", "--eval-every", "0"])])
def test_dino_end_to_end(tmp_path, arch, extra):
    run("dino.py", *DINO_TINY, "--arch", arch, *extra, "--out-dir", tmp_path)
    rec = json.loads(open(tmp_path / "log.jsonl").readline())
    assert arch == "vit_tiny" or 0 <= rec["knn_top1"] <= 100
    assert 0 <= rec["teacher_entropy"] <= math.log(64) + 1e-6
    assert rec["kl_uniform"] == pytest.approx(math.log(64) - rec["teacher_entropy"], abs=1e-4)
    run("eval_linear.py", "--checkpoint", tmp_path / "last.pt", "--probe-epochs", "2", "--device", "cpu", "--limit", "300")
    assert json.load(open(tmp_path / "last.eval.json"))["arch"] == arch


@pytest.mark.parametrize("extra,flag", [(["--local-crops", "-1"], "--local-crops"), (["--out-dim", "0"], "--out-dim")])
def test_bad_input(tmp_path, extra, flag, capsys):
    import dino
    assert flag in arg_error(dino, DINO_TINY + ["--out-dir", str(tmp_path), *extra], capsys)
