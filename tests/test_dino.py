"""DINO: loss closed forms, centre, temperature schedule, EMA; end to end. Expected values by hand."""
import json
import math

import pytest
import torch

from conftest import TINY, arg_error, call
from dino import DINO, DINOLoss, ema_update, get_args, sinkhorn, teacher_entropy


@pytest.mark.parametrize("k", [4, 64, 1000])
def test_uniform_outputs_give_log_k(k):
    # Constant logits: P_t and P_s are uniform, so H(P_t, P_s) = -sum (1/K) log(1/K) = log K for every pair.
    loss_fn = DINOLoss(k, epochs=10)
    student = [torch.full((5, k), 0.3) for _ in range(4)]
    teacher = [torch.full((5, k), -2.0) for _ in range(2)]
    assert loss_fn(student, teacher, 0)[0].item() == pytest.approx(math.log(k), rel=1e-6)


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
    assert DINOLoss(3, epochs=10)(s, t, 0)[0].item() == pytest.approx(expected, rel=1e-5)


def test_center_update():
    # c1 = 0.9 c0 + 0.1 m, m = the batch mean of the teacher outputs of both global crops
    loss_fn = DINOLoss(3, epochs=10)
    loss_fn.center.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    t = [torch.tensor([[0.0, 0.0, 6.0], [2.0, 0.0, 0.0]]), torch.tensor([[2.0, 4.0, 0.0], [0.0, 4.0, 2.0]])]
    loss_fn([torch.zeros(2, 3)] * 3, t, 0)  # m = [1, 2, 2]
    assert torch.allclose(loss_fn.center, torch.tensor([[0.9 + 0.1, 1.8 + 0.2, 2.7 + 0.2]]))
    # The teacher's target is softmax((t - c) / tau_t): a teacher output equal to the centre gives the uniform 1/3
    # (t + c would give softmax(2 c / 0.04), one-hot on the last prototype).
    c = loss_fn.center.clone()
    p_t = loss_fn([torch.zeros(1, 3)] * 3, [c, c], 0)[1]
    assert torch.allclose(p_t[0], torch.full((1, 3), 1 / 3)) and torch.allclose(p_t[1], torch.full((1, 3), 1 / 3))


def test_sinkhorn_balances_prototypes():
    # Already balanced (a permutation pattern, B = K = 2): Sinkhorn leaves softmax(logits / temp) unchanged,
    # P = [[e^2, 1], [1, e^2]] / (e^2 + 1) for logits [[1, 0], [0, 1]] at temp 0.5.
    p = sinkhorn(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 0.5)
    e2 = math.exp(2)
    assert torch.allclose(p, torch.tensor([[e2, 1.0], [1.0, e2]]) / (e2 + 1), atol=1e-6)
    # Every row prefers prototype 0 equally: each prototype must receive half of the mass, so the identical rows
    # become uniform, where the centred softmax would keep [e, 1] / (e + 1).
    p = sinkhorn(torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]), 1.0)
    assert torch.allclose(p, torch.full((3, 2), 0.5), atol=1e-6)
    # DINOLoss with sinkhorn centring: targets are the balanced rows
    loss_fn = DINOLoss(2, epochs=10, centering="sinkhorn")
    _, q = loss_fn([torch.zeros(1, 2)] * 2, [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])], 0)
    assert all(torch.allclose(x.sum(-1), torch.ones(1)) for x in q)
    assert torch.allclose(torch.cat(q).sum(0), torch.ones(2), atol=1e-6)  # each prototype: B / K = 1 of mass


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
        assert torch.allclose(t, 0.9 * o + 0.1 * s, atol=1e-6)  # lerp: o + 0.1 (s - o), rounded otherwise
    views = [torch.randn(4, 3, 32, 32)] * 2 + [torch.randn(4, 3, 16, 16)]
    s_out, t_out = model(views)
    assert len(s_out) == 3 and len(t_out) == 2 and s_out[0].shape == (4, 16)
    model.criterion(s_out, t_out, 0)[0].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert any(p.grad is not None for p in model.student.parameters())


def test_defaults_follow_the_backbone():
    # ResNet: the CIFAR-scale recipe (SGD 0.12 with constant wd 5e-4, BN in a 2-layer head, K = 2048, teacher
    # temperature 0.02, no clipping, no frozen last layer); ViT: the paper's AdamW 5e-4 with wd 0.04 -> 0.4, no BN,
    # 3 layers, clipping 3, last layer frozen for 1 epoch. An explicit choice wins; another optimiser brings its lr/wd.
    keys = ("optimizer", "lr", "wd", "wd_end", "bn_head", "head_layers", "out_dim", "teacher_temp", "clip_grad",
            "freeze_last_layer")

    def got(*argv):
        a = get_args(["--dataset", "synthetic", "--out-dir", "/tmp/unused", *argv])
        return tuple(getattr(a, k) for k in keys)
    assert got() == ("sgd", 0.12, 5e-4, 5e-4, True, 2, 2048, 0.02, 0.0, 0)
    assert got("--arch", "vit_tiny") == ("adamw", 5e-4, 0.04, 0.4, False, 3, 4096, 0.04, 3.0, 1)
    assert got("--optimizer", "adamw", "--lr", "1e-3", "--no-bn-head") == (
        "adamw", 1e-3, 0.04, 0.4, False, 2, 2048, 0.02, 0.0, 0)
    assert got("--wd", "1e-3", "--head-layers", "3")[3:6] == (1e-3, True, 3)  # sgd: constant wd
    from dino import DINOHead
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in DINOHead(8, 16, bn=True).modules()) == 2
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in DINOHead(8, 16).modules())
    # official nlayers: Linear -> [BN] -> GELU, (layers - 1) times, then the Linear to the bottleneck
    assert [m.out_features for m in DINOHead(8, 16, layers=2, hidden=32, bottleneck=4).mlp
            if isinstance(m, torch.nn.Linear)] == [32, 4]


def test_local_crops_follow_the_image_size():
    # 32 px: no local crops (16-px crops miss the object) and wide global crops; 64 px up: 2 + 6 with (0.4, 1)
    from dino import crops
    for size, expected in ((32, (0, (0.08, 1.0))), (64, (6, (0.4, 1.0))), (96, (6, (0.4, 1.0)))):
        c = crops(get_args(["--dataset", "synthetic", "--out-dir", "/tmp/unused"]), size)
        assert (c["local_crops"], tuple(c["global_scale"])) == expected
    c = crops(get_args(["--dataset", "synthetic", "--local-crops", "2", "--out-dir", "/tmp/unused"]), 32)
    assert (c["local_crops"], tuple(c["global_scale"])) == (2, (0.4, 1.0))


DINO_TINY = TINY + ["--out-dim", "64", "--local-crops", "2", "--warmup-teacher-temp-epochs", "1"]


@pytest.mark.parametrize("arch,extra", [("resnet18", []), ("vit_tiny", ["--num-train", "64", "--batch-size", "32", "--eval-every", "0"])])
def test_dino_end_to_end(tmp_path, arch, extra):
    call("dino.py", *DINO_TINY, "--arch", arch, *extra, "--out-dir", tmp_path)
    rec = json.loads(open(tmp_path / "log.jsonl").readline())
    assert arch == "vit_tiny" or 0 <= rec["knn_top1"] <= 100
    assert 0 <= rec["teacher_entropy"] <= math.log(64) + 1e-6
    assert rec["kl_uniform"] == pytest.approx(math.log(64) - rec["teacher_entropy"], abs=1e-4)
    assert rec["teacher_entropy"] - 1e-4 <= rec["entropy"] <= math.log(64) + 1e-6  # concavity: H(mean) >= mean H
    call("eval_linear.py", "--checkpoint", tmp_path / "last.pt", "--probe-epochs", "2", "--device", "cpu", "--limit", "300")
    assert json.load(open(tmp_path / "last.eval.json"))["arch"] == arch


@pytest.mark.parametrize("extra,flag", [(["--local-crops", "-1"], "--local-crops"), (["--out-dim", "0"], "--out-dim"),
                                        (["--head-layers", "0"], "--head-layers")])
def test_bad_input(tmp_path, extra, flag, capsys):
    import dino
    assert flag in arg_error(dino, DINO_TINY + ["--out-dir", str(tmp_path), *extra], capsys)


def test_teacher_entropy_of_one_hot_and_uniform_targets():
    # N = K one-hot targets on distinct classes: each has entropy 0 (KL to uniform log K) while their batch mean is
    # uniform, entropy log K (the ER term at its maximum); K uniform targets: log K, 0 and log K.
    k = 8
    for p, expected in ((torch.eye(k), (0, math.log(k), math.log(k))),
                        (torch.full((k, k), 1 / k), (math.log(k), 0, math.log(k)))):
        assert teacher_entropy(list(p.chunk(2))).tolist() == pytest.approx(expected, abs=1e-6)


def test_clip_gradients_scales_only_the_gradients_above_the_clip():
    # Per-parameter clipping at 1: a gradient of norm 0.5 stays as it is; one of norm 5 is scaled to norm 1 (x 1/5,
    # within the 1e-6 in the denominator).
    from dino import clip_gradients
    net = torch.nn.ModuleDict({"a": torch.nn.Linear(1, 1, bias=False), "b": torch.nn.Linear(1, 1, bias=False)})
    net.a.weight.grad, net.b.weight.grad = torch.tensor([[0.5]]), torch.tensor([[5.0]])
    clip_gradients(net, 1.0)
    assert net.a.weight.grad.item() == 0.5
    assert net.b.weight.grad.item() == pytest.approx(1.0, rel=1e-5)
