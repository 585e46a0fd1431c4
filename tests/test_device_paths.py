"""The paths the code takes by device, all run on the CPU: the CPU defaults at every width and image size, and the
CUDA paths (bf16 autocast, one-pass multi-crop, channels-last, fused AdamW, --compile) forced onto CPU tensors
through common.CUDA_PATHS, the one switch the code reads."""
import os

import pytest

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
def folder64(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("px64"), 64)


@pytest.mark.parametrize("script,width", [("simclr.py", 4), ("simclr.py", 8), ("hydes.py", 4), ("hydes.py", 8),
                                          ("hydes.py", 64)])
def test_one_step_at_64_px_for_every_width(folder64, tmp_path, script, width):
    # oneDNN's channels-last 1x1-convolution backward killed the process (SIGSEGV / SIGABRT, no message) at widths 4
    # and 8 on 64 px images; a subprocess, so that a crash fails this test and not the whole suite
    n = len(os.listdir(folder64 / "train" / "c0")) + len(os.listdir(folder64 / "train" / "c1"))
    p = run(script, "--dataset", "folder", "--data-dir", folder64, "--width", width, "--batch-size", n, "--epochs", 1,
            "--eval-every", 0, "--device", "cpu", "--proj-hidden", 32, "--out-dir", tmp_path / "run", check=False)
    assert p.returncode == 0, f"exit {p.returncode}: {p.stderr[-2000:]}"
    assert (tmp_path / "run" / "last.pt").is_file()
