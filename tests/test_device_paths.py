"""The paths the code takes by device, all run on the CPU: the CPU defaults at every width and image size, and the
CUDA paths (bf16 autocast, one-pass multi-crop, channels-last, fused AdamW, --compile) forced onto CPU tensors
through common.CUDA_PATHS, the one switch the code reads."""
import os

import pytest
import torch

from conftest import run


def image_folder(root, size, per_class=4, classes=2):
    """train/ and val/ of `classes` folders of `per_class` PNG images of size x size px (synthetic shapes)."""
    from PIL import Image

    import common
    data = common.synthetic(2 * per_class * classes, seed=3, size=size)
    for i, (x, y) in enumerate(zip(data.images, data.labels)):
        split = "train" if i % 2 == 0 else "val"
        os.makedirs(root / split / f"c{int(y) % classes}", exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(root / split / f"c{int(y) % classes}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {size: image_folder(tmp_path_factory.mktemp(f"px{size}"), size) for size in (64, 96)}


@pytest.mark.parametrize("script,width,size", [("simclr.py", 4, 64), ("simclr.py", 8, 64), ("hydes.py", 64, 64),
                                               ("simclr.py", 8, 96)])
def test_one_step_on_large_images_at_every_width(folders, tmp_path, script, width, size):
    # From 64 px up the crops are blurred and solarised; above 64 px ResNets keep the standard stem (7x7 stride 2 and
    # max-pool). oneDNN's channels-last backward killed the process (SIGSEGV / SIGABRT, no message) at widths 4 and 8
    # on 64 px images, which therefore stay contiguous on the CPU (width 64 runs channels-last): a subprocess, so that a
    # crash fails this test and not the whole suite.
    p = run(script, "--dataset", "folder", "--data-dir", folders[size], "--image-size", size, "--width", width,
            "--batch-size", 8, "--epochs", 1, "--eval-every", 1, "--device", "cpu", "--proj-hidden", 32,
            "--out-dir", tmp_path / "run", check=False)
    assert p.returncode == 0, f"exit {p.returncode}: {p.stderr[-2000:]}"
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["args"]["image_size"] == size
    stem = ck["backbone"]["conv1.weight"].shape[-1]
    assert stem == (3 if size <= 64 else 7)  # CIFAR stem up to 64 px, the standard one above


def test_compile_runs_a_step_and_keeps_the_checkpoint_keys(tmp_path):
    import shutil
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler on this machine: --compile on the CPU needs one (torch inductor's C++ backend)")
    tiny = ["--dataset", "synthetic", "--width", "4", "--num-train", "16", "--batch-size", "16", "--epochs", "1",
            "--eval-every", "0", "--device", "cpu", "--proj-hidden", "16", "--proj-dim", "8"]
    run("simclr.py", *tiny, "--compile", "--out-dir", tmp_path / "compiled")
    compiled = torch.load(tmp_path / "compiled" / "last.pt", weights_only=True)
    import common
    import simclr
    backbone, dim = common.build_backbone("resnet18", 32, 4)  # the same model, never compiled: its keys
    eager = simclr.SimCLR(backbone, dim, simclr.get_args(tiny + ["--out-dir", str(tmp_path / "unused")]))
    assert compiled["model"].keys() == eager.state_dict().keys()
    assert compiled["backbone"].keys() == backbone.state_dict().keys()
    assert all(v.isfinite().all() for v in compiled["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------------------------
# The CUDA paths, forced onto the CPU (or run on CUDA with SSL_TEST_DEVICE=cuda, as gpu_check.py does)
# ----------------------------------------------------------------------------------------------
DEVICE = os.environ.get("SSL_TEST_DEVICE", "cpu")


@pytest.fixture
def cuda_paths(monkeypatch):
    """The CUDA choices on this test's device: bf16 autocast, one-pass crops, channels-last, fused AdamW."""
    import common
    monkeypatch.setattr(common, "CUDA_PATHS", True)


STEP = ["--dataset", "synthetic", "--width", "8", "--num-train", "16", "--batch-size", "16", "--epochs", "1",
        "--warmup-epochs", "0", "--device", DEVICE]


@pytest.mark.parametrize("script,extra", [
    ("simclr.py", ["--proj-hidden", "32", "--proj-dim", "16", "--eval-every", "1"]),  # the kNN monitor: one for all
    ("hydes.py", ["--proj-hidden", "32", "--proj-dim", "16", "--local-crops", "2"]),
    ("dino.py", ["--out-dim", "64", "--local-crops", "2"]),
    ("dino.py", ["--arch", "vit_tiny", "--out-dim", "64", "--freeze-last-layer", "0"]),
    ("entrec.py", ["--proj-hidden", "32", "--proj-dim", "16"]),
    ("entrec.py", ["--variant", "dino", "--out-dim", "64", "--proj-hidden", "32"]),
    ("mmae.py", ["--arch", "vit_tiny", "--decoder-dim", "32", "--decoder-depth", "1"]),
])
def test_one_step_of_every_method_on_the_cuda_paths(cuda_paths, tmp_path, monkeypatch, script, extra):
    monitored = "--eval-every" in extra
    extra = extra if monitored else extra + ["--eval-every", "0"]
    import torch.nn as nn
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from conftest import call
    seen = {"grad_ok": [], "loss": set(), "out": set(), "conv_in": set(), "fused": set()}

    def before_step(opt, args, kwargs):  # every parameter the optimiser updates has a finite gradient
        seen["fused"].add(bool(opt.defaults.get("fused")))
        seen["grad_ok"] += [p.grad is not None and bool(p.grad.isfinite().all())
                            for group in opt.param_groups for p in group["params"]]

    def after_forward(module, inputs, output):
        if isinstance(module, (nn.Linear, nn.Conv2d)) and isinstance(output, torch.Tensor):
            seen["out"].add(output.dtype)
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and torch.is_grad_enabled():  # training
            seen["conv_in"].add(inputs[0].is_contiguous(memory_format=torch.channels_last))

    backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: (seen["loss"].add(self.dtype),
                                                                         backward(self, *a, **k))[1])
    hooks = [register_optimizer_step_pre_hook(before_step),
             nn.modules.module.register_module_forward_hook(after_forward)]
    try:
        call(script, *STEP, *extra, "--out-dir", tmp_path)
    finally:
        for h in hooks:
            h.remove()
    assert seen["grad_ok"] and all(seen["grad_ok"])
    assert seen["loss"] == {torch.float32}  # the loss in fp32 under autocast
    assert torch.bfloat16 in seen["out"]  # autocast was on
    assert seen["conv_in"] in (set(), {True})  # ResNet convolutions see channels-last crops (ViT: none)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert seen["fused"] == {ck["args"]["optimizer"] == "adamw"}  # AdamW fused; SGD has no fused CPU kernel here
    floats = {k: v.dtype for k, v in ck["model"].items() if v.is_floating_point()}
    assert set(floats.values()) == {torch.float32}, floats  # weights, EMA teacher, DINO centre stay fp32
    log = [line for line in open(tmp_path / "log.jsonl")]
    assert len(log) == 1 and ('"knn_top1"' in log[0]) == monitored  # kNN monitor: bf16 feature extraction


def crops(cuda, x, monkeypatch, seed=0, color=True, n_global=2, n_local=6):
    """MultiCrop views of uint8 x on the one-pass (cuda=True) or the per-crop path, un-normalised to [0, 1]."""
    import common
    monkeypatch.setattr(common, "CUDA_PATHS", cuda)
    stats = (torch.full((3,), 0.5), torch.full((3,), 0.25))
    aug = common.MultiCrop(x.shape[-1], stats, n_global, n_local, color=color)
    return [v.float() * 0.25 + 0.5 for v in aug(x.to(DEVICE), torch.Generator(DEVICE).manual_seed(seed))]


def test_one_pass_crops_follow_the_law_of_the_per_crop_path(monkeypatch):
    # Geometry (no colour): channel 0 of the image is its column ramp j / 63, channel 1 its row ramp. A crop spanning
    # w columns shows a ramp of (w / 64) * (S - 1) / S from its first to its last output pixel; flipped, it descends.
    B, H = 400, 64
    ramp = torch.arange(H) / (H - 1)
    x = (torch.stack([ramp.view(1, H).expand(H, H), ramp.view(H, 1).expand(H, H), torch.full((H, H), 0.5)]) * 255)
    x = x.round().to(torch.uint8).expand(B, 3, H, H)
    law = {}
    for cuda in (True, False):
        views = crops(cuda, x, monkeypatch, color=False)
        assert [tuple(v.shape) for v in views] == [(B, 3, 64, 64)] * 2 + [(B, 3, 32, 32)] * 6
        rows = []
        for v, (lo, hi) in zip(views, [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 6):
            S = v.shape[-1]
            dx = (v[:, 0, S // 2, -1] - v[:, 0, S // 2, 0]) * S / (S - 1)  # +-w / (H - 1) ~ +-w / H
            dy = (v[:, 1, -1, S // 2] - v[:, 1, 0, S // 2]) * S / (S - 1)
            area = dx.abs() * dy.abs()
            assert area.min() > lo - 0.04 and area.max() < hi + 0.04, (cuda, lo, hi)  # scale range respected
            rows.append(torch.stack([area.mean(), (dx < 0).float().mean()]))
        law[cuda] = torch.stack(rows)  # (8 crops, [mean area, flip rate])
    for cuda in (True, False):
        assert (law[cuda][:, 1] - 0.5).abs().max() < 0.1, law  # flips with p = 1/2 (400 draws: sd 0.025)
    assert torch.allclose(law[True][:, 0], law[False][:, 0], atol=0.03), law  # the same mean area, crop by crop
    # Colour on a bright grey image (0.95): brightness jitter keeps it >= 0.57, contrast, saturation, hue and blur leave
    # a flat grey as it is, so a crop below 0.5 was solarised: p 0.2 on the second global crop only (64 px data)
    grey = torch.full((1000, 3, 64, 64), 242, dtype=torch.uint8)
    for cuda in (True, False):
        solarised = torch.stack([(v.mean((1, 2, 3)) < 0.5).float().mean() for v in crops(cuda, grey, monkeypatch)])
        assert torch.allclose(solarised, torch.tensor([0.0, 0.2] + [0.0] * 6), atol=0.04), (cuda, solarised)
    # Colour statistics of real-looking images (synthetic shapes at 64 px: jitter, grey, blur, solarisation all act)
    import common
    shapes = common.synthetic(400, 5, size=64).images
    stats = {cuda: torch.stack([torch.stack([v.mean(), v.std(), v.min(), v.max()])
                                for v in crops(cuda, shapes, monkeypatch)]) for cuda in (True, False)}
    assert stats[True][:, 2].min() > -1e-6 and stats[True][:, 3].max() < 1 + 1e-6  # values stay in [0, 1]
    assert torch.allclose(stats[True][:, :2], stats[False][:, :2], atol=0.02), stats
    # deterministic for a given generator
    again = [crops(True, shapes[:8], monkeypatch, seed=3) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*again))


def test_blur_solarisation_and_grayscale_rates_per_crop(monkeypatch):
    # 64 px data, 2 global + 2 local crops of 1,000 grey images (0.95): the blur is replaced by a marker (every pixel
    # 0.46, which neither a jittered grey, >= 0.57, nor a solarised one, <= 0.43, can be), so each crop's rate of
    # blurred and of solarised images is counted: blur 1.0 / 0.1 on the global crops and 0.5 on the local ones,
    # solarisation 0.2 on the second global crop only (DINO's recipe). 1,000 draws: sd <= 0.016.
    import common
    monkeypatch.setattr(common, "gaussian_blur", lambda x, g: torch.full_like(x, 0.46))
    grey = torch.full((1000, 3, 64, 64), 242, dtype=torch.uint8)
    views = crops(False, grey, monkeypatch, n_local=2)
    blurred = torch.stack([((v - 0.46).abs() < 1e-4).all(3).all(2).all(1).float().mean() for v in views])
    solarised = torch.stack([(v.mean((1, 2, 3)) < 0.44).float().mean() for v in views])
    assert torch.allclose(blurred, torch.tensor([1.0, 0.1, 0.5, 0.5]), atol=0.05), blurred
    assert torch.allclose(solarised, torch.tensor([0.0, 0.2 * 0.9, 0.0, 0.0]), atol=0.04), solarised
    # Grayscale, p 0.2 per crop: on red images (32 px: no blur or solarisation) a crop is grey exactly when its three
    # channels are equal, which the colour jitter alone never makes them (its saturation factor is at least 0.8)
    red = torch.zeros(1000, 3, 32, 32, dtype=torch.uint8)
    red[:, 0] = 200
    grey = torch.stack([(v[:, 0] == v[:, 1]).all(2).all(1).float().mean() for v in crops(False, red, monkeypatch,
                                                                                       n_local=0)])
    assert torch.allclose(grey, torch.tensor([0.2, 0.2]), atol=0.04), grey


def test_gaussian_blur_is_the_normalised_gaussian_of_its_drawn_sigma():
    # A centred unit impulse in a 64 px image, blurred: the kernel is 2 round(0.05 * 64) + 1 = 7 taps wide, sigma is
    # the first draw of the generator, U(0.1, 2), and the output is the outer product of the normalised 1-D Gaussian.
    import math

    import common
    x = torch.zeros(3, 1, 64, 64)
    x[:, :, 32, 32] = 1.0
    y = common.gaussian_blur(x, torch.Generator().manual_seed(0))
    sigma = torch.rand(3, 1, generator=torch.Generator().manual_seed(0)) * 1.9 + 0.1
    for b in range(3):
        k = torch.tensor([math.exp(-t * t / (2 * sigma[b].item() ** 2)) for t in range(-3, 4)])
        k = k / k.sum()
        assert torch.allclose(y[b, 0, 29:36, 29:36], k[:, None] * k[None, :], atol=1e-6)
        assert y[b].sum().item() == pytest.approx(1.0, abs=1e-5)  # inside the image: nothing lost
    flat = torch.full((2, 3, 64, 64), 0.3)
    assert torch.allclose(common.gaussian_blur(flat, torch.Generator()), flat, atol=1e-6)  # reflect padding
