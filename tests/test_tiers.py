"""Where decoded images live (--data-on device / cpu / disk): the same training bit for bit on every tier; the decoded
cache (reused, rebuilt when its source changes, built once under concurrency, never taken half-written, every bad state
one line); the ImageNet / Food-101 / --classes datasets; the estimate that --data-on auto prints."""
import os
import subprocess
import sys
import types

import pytest
import torch
from conftest import ROOT, TINY, call

import common

TIERS_TINY = TINY + ["--width", "4", "--proj-hidden", "16", "--proj-dim", "8", "--num-train", "128", "--batch-size",
                     "32", "--local-crops", "2"]


def test_every_tier_trains_bit_identically_and_eval_reads_the_cache(tmp_path, capsys):
    runs = {}
    for tier in ("device", "cpu", "disk"):
        out = tmp_path / tier
        call("hydes.py", *TIERS_TINY, "--data-on", tier, "--cache-dir", tmp_path / "cache", "--out-dir", out)
        runs[tier] = torch.load(out / "last.pt", weights_only=True)
    err = capsys.readouterr().err
    assert err.count("wrote ") == 2 and "(128 images" in err  # the disk run's train (its subset alone) and val caches
    for tier in ("cpu", "disk"):  # the same batches, crops, losses, weights and kNN
        assert runs[tier]["log"] == runs["device"]["log"]
        assert all(torch.equal(runs[tier]["model"][k], v) for k, v in runs["device"]["model"].items())
    assert runs["disk"]["args"]["data_on"] == "disk"
    res = {t: call("eval_linear.py", "--checkpoint", tmp_path / t / "last.pt", "--probe-epochs", "2", "--device", "cpu")
           for t in ("device", "disk")}
    err = capsys.readouterr().err  # eval read the run's val cache; its memory, all 5,000 training images, is new
    assert "decoding" not in err and err.count("wrote ") == 1 and "(5,000 images" in err
    assert res["disk"]["knn20_top1"] == res["device"]["knn20_top1"]


def test_num_train_decodes_only_its_subset(tmp_path, capsys):
    # --num-train 4 of a folder's 9 images: the files are chosen before decoding (4 decoded, into a cache of 4), and
    # they are the images the subset of the whole decoded folder holds, on every tier
    write_folder(tmp_path / "data")
    src = common.dataset_source("folder", str(tmp_path / "data"), "train", image_size=8)
    whole = common.get_dataset("folder", str(tmp_path / "data"), "train", image_size=8)
    capsys.readouterr()
    part = common.get_dataset("folder", split="train", src=common.subset(src, 4), cache_dir=str(tmp_path / "cache"))
    assert "decoded 4 images" in capsys.readouterr().err
    assert torch.equal(part.images[:], common.subset(whole, 4).images)
    assert torch.equal(part.labels, common.subset(whole, 4).labels)


def test_food101_is_downloaded_by_one_process_at_a_time(tmp_path, monkeypatch):
    # two ranks asking for Food-101 at once (here two threads, each with its own open lock file, as two processes):
    # torchvision's download runs for one while the other waits, never twice at the same time
    import threading
    import time
    inside, overlaps = [], []

    class Food101:  # a download taking 0.2 s that notes whether another one is running
        def __init__(self, root, split, download):
            overlaps.append(bool(inside))
            inside.append(1)
            time.sleep(0.2)
            inside.pop()
            self._image_files, self._labels, self.classes = [os.path.join(root, "x.jpg")], [0], ["apple_pie"]
    monkeypatch.setattr(common.torchvision.datasets, "Food101", Food101)
    threads = [threading.Thread(target=common.dataset_source, args=("food101", str(tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [False, False]


def test_host_memory_stays_within_the_cgroup_limits(tmp_path):
    # A SLURM-like cgroup v2 tree: the job allows 1 GB and uses 0.25, its step below allows 2 GB: what the process can
    # have is the tightest, 1 - 0.25 = 0.75 GB (MemAvailable here is larger); a v1 memory controller likewise
    # (0.5 GB limit, 0.1 used -> 0.4 GB); no limit ("max") leaves MemAvailable.
    v2 = tmp_path / "v2"
    (v2 / "job" / "step").mkdir(parents=True)
    for d, limit, used in ((v2 / "job", "1000000000", "250000000"), (v2 / "job" / "step", "2000000000", "100")):
        (d / "memory.max").write_text(limit + "\n")
        (d / "memory.current").write_text(used + "\n")
    (tmp_path / "own2").write_text("0::/job/step\n")
    available = common.host_memory(str(tmp_path / "none"), str(tmp_path / "none"))
    assert available > 10**9  # this machine's MemAvailable, for the checks below to mean something
    assert common.host_memory(str(v2), str(tmp_path / "own2")) == 750_000_000
    v1 = tmp_path / "v1" / "memory" / "slurm"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("500000000\n")
    (v1 / "memory.usage_in_bytes").write_text("100000000\n")
    (tmp_path / "own1").write_text("5:cpuset:/slurm\n4:memory:/slurm\n")
    assert common.host_memory(str(tmp_path / "v1"), str(tmp_path / "own1")) == 400_000_000
    (v2 / "job" / "memory.max").write_text("max\n")
    assert common.host_memory(str(v2), str(tmp_path / "own2")) == min(available, 2_000_000_000 - 100)


def test_images_index_like_the_tensor_they_stand_for(tmp_path):
    x = torch.randint(0, 256, (7, 3, 4, 4), dtype=torch.uint8)
    disk = common.cached(common.Split(x, torch.arange(7)), ("synthetic", "train", 4), str(tmp_path), False)
    for images in (common.Images(x), disk.images):
        assert len(images) == 7 and images.shape == (7, 3, 4, 4)
        assert torch.equal(images[2:5], x[2:5]) and torch.equal(images[::3], x[::3])
        assert torch.equal(images[torch.tensor([5, 0, 3])], x[[5, 0, 3]])  # rows in the order asked
        sub = images.take(torch.tensor([6, 1, 4]))
        assert torch.equal(sub[torch.tensor([2, 0])], x[[4, 6]])
        got = list(images.to(torch.device("cpu"), workers=1).batches([torch.tensor([1, 2]), torch.tensor([6, 0])]))
        assert torch.equal(got[0], x[[1, 2]]) and torch.equal(got[1], x[[6, 0]])
    assert disk.labels.tolist() == list(range(7))


def test_pixel_stats_closed_form():
    # 3 black and 1 white image: mean 1/4, and over the 4 * 16 pixels per channel the unbiased variance is
    # (16 (3/4)^2 + 48 (1/4)^2) / 63 = 12 / 63
    x = torch.zeros(4, 3, 4, 4, dtype=torch.uint8)
    x[2] = 255
    mean, std = common.pixel_stats(x, chunk=3)  # chunks of 3 and 1 images: the pairwise combination is exercised
    assert torch.allclose(mean, torch.full((3,), 0.25)) and torch.allclose(std, torch.full((3,), (12 / 63) ** 0.5))
    x[:] = 7
    assert torch.equal(common.pixel_stats(x, chunk=3)[1], torch.zeros(3))  # a constant channel: exactly 0


def write_folder(root, classes=("a", "b", "c"), n=3, size=(12, 10), ext="png", val=True):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val") if val else ("train",):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                px = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(root / split / c / f"{i}.{ext}")


def test_cache_is_reused_rebuilt_when_its_images_change_and_bad_states_are_one_line(tmp_path, capsys, monkeypatch):
    write_folder(tmp_path / "data")
    get = lambda size=8: common.get_dataset("folder", str(tmp_path / "data"), "train", image_size=size,  # noqa: E731
                                            cache_dir=str(tmp_path / "cache"))
    first = get()
    assert "wrote " in capsys.readouterr().err and len(first.images) == 9
    again = get()
    assert "wrote " not in capsys.readouterr().err  # reused
    assert torch.equal(again.images[:], first.images[:]) and torch.equal(again.labels, first.labels)
    reference = common.get_dataset("folder", str(tmp_path / "data"), "train", image_size=8)  # in memory
    assert torch.equal(first.images[:], reference.images)
    os.utime(tmp_path / "data" / "train" / "b" / "1.png", ns=(0, 0))  # the source changed: rebuilt
    assert len(get().images) == 9 and "source changed" in capsys.readouterr().err
    (path,) = (tmp_path / "cache").glob("folder-train-8px-*.u8")
    get(16)  # another size sits beside it
    (other,) = (tmp_path / "cache").glob("folder-train-16px-*.u8")
    os.replace(other, path)  # a cache of another size under this one's name
    with pytest.raises(SystemExit, match=f"{path} holds folder train at 16 px, not folder train at 8 px"):
        get()
    os.truncate(path, os.path.getsize(path) - 5)  # torn
    with pytest.raises(SystemExit, match=f"{path} is torn or not a decoded cache"):
        get()
    os.remove(path)
    (tmp_path / "cache" / (path.name + ".tmp999")).write_bytes(b"half a build")  # left by a killed build
    assert len(get().images) == 9 and not list((tmp_path / "cache").glob("*.tmp*"))
    os.remove(path)
    monkeypatch.setattr(common.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=1000))
    with pytest.raises(SystemExit, match=r"cannot write .*: 9 decoded images need 1.8e-06 GB and .* has 1e-06 GB free"):
        get()  # 9 images x (3 x 8 x 8 + 8 label bytes) = 1,800 bytes > 1,000 free


def test_a_killed_build_or_a_stale_cache_never_blocks_the_next_build(tmp_path, monkeypatch, capsys):
    # A disk with room for one cache and 100 bytes more: free = that - the bytes in the cache folder. The stale cache a
    # changed source leaves, or a killed build's whole-size temporary file, takes the room the next build needs
    # (9 x (3 x 8 x 8 + 8) = 1,800 bytes); each is removed before the free space is counted, so the build goes through.
    write_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    get = lambda: common.get_dataset("folder", str(tmp_path / "data"), "train", image_size=8,  # noqa: E731
                                     cache_dir=str(cache))
    get()
    (path,) = cache.glob("*.u8")
    room = os.path.getsize(path) + 100
    monkeypatch.setattr(common.shutil, "disk_usage", lambda p: types.SimpleNamespace(
        free=room - sum(f.stat().st_size for f in cache.iterdir())))
    os.utime(tmp_path / "data" / "train" / "b" / "1.png", ns=(0, 0))  # the source changed
    assert len(get().images) == 9 and "rebuilding it" in capsys.readouterr().err
    os.replace(path, f"{path}.tmp4242")  # a killed build's file, and no cache
    assert len(get().images) == 9 and not list(cache.glob("*.tmp*"))


def test_one_cache_for_every_spelling_of_the_data_folder(tmp_path, monkeypatch, capsys):
    # ./data, data, its absolute path and a symbolic link to it are one source: the cache is built once
    write_folder(tmp_path / "data")
    os.symlink(tmp_path / "data", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    for spelling in ("./data", "data", str(tmp_path / "data"), "link"):
        common.get_dataset("folder", spelling, "train", image_size=8, cache_dir=str(tmp_path / "cache"))
    err = capsys.readouterr().err
    assert err.count("wrote ") == 1 and "source changed" not in err, err


def test_runs_that_start_together_build_the_cache_once(tmp_path):
    write_folder(tmp_path / "data", n=20, size=(64, 48), ext="jpg", val=False)
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import common; d = common.get_dataset('folder', "
            f"{str(tmp_path / 'data')!r}, 'train', image_size=32, cache_dir={str(tmp_path / 'cache')!r}); "
            f"print(int(d.images[:].sum()))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(err.count("wrote ") for _, err in outs) == 1 and len({out for out, _ in outs}) == 1


def test_auto_estimates_the_decoded_size_first_and_says_what_it_chose(capsys, monkeypatch):
    src = common.dataset_source("synthetic")
    assert common.choose_tier(src, torch.device("cpu")) == "device"
    # 5000 x 3 x 32 x 32 bytes = 15,360,000 = 0.0154 GB
    assert "decoded: 5,000 images x 3 x 32 x 32 = 0.0154 GB -> device" in capsys.readouterr().err
    monkeypatch.setattr(common, "host_memory", lambda: 20_000_000)  # less than twice the images: the disk
    assert common.choose_tier(src, torch.device("cpu")) == "disk"
    # the CUDA branch, with the GPU's free memory given: the 15.36 MB need 61.4 MB of GPU or 30.7 MB of host per rank
    gpu, cuda = [0], torch.device("cuda")
    monkeypatch.setattr(common.torch.cuda, "mem_get_info", lambda device: (gpu[0], 10**11))
    for free, host, ranks, tier in ((62_000_000, 0, 1, "device"), (61_000_000, 31_000_000, 1, "cpu"),
                                    (61_000_000, 30_000_000, 1, "disk"), (0, 246_000_000, 8, "cpu"),
                                    (0, 245_000_000, 8, "disk")):
        gpu[0] = free
        monkeypatch.setattr(common, "host_memory", lambda: host)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
        assert common.choose_tier(src, cuda) == tier, (free, host, ranks)
    assert "-> cpu (GPU 0 GB free, host 0.246 GB available for 8 ranks)" in capsys.readouterr().err  # a full GPU


def test_imagenet_layout_crops_and_its_raw_layout(tmp_path, capsys):
    write_folder(tmp_path / "in", classes=("n01440764", "n01443537"), n=2, size=(40, 30), ext="JPEG")
    src = common.dataset_source("imagenet", str(tmp_path / "in"), "train", image_size=21)
    assert (src.size, src.crop) == (24, 21)  # squares 8/7 of the model's side: 21 + 21 // 7
    assert common.dataset_source("imagenet", str(tmp_path / "in"), "train").size == 256  # 224 + 32
    assert common.local_side(224) == 96 and common.local_side(96) == 48 and common.local_side(32) == 16
    out = tmp_path / "run"
    call("simclr.py", *TINY, "--dataset", "imagenet", "--data-dir", tmp_path / "in", "--image-size", "21", "--width",
         "4", "--proj-hidden", "16", "--batch-size", "2", "--out-dir", out)
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["args"]["image_size"] == 21  # the model's side; decoded at 24
    raw = tmp_path / "raw"
    write_folder(raw, n=1, val=False)
    os.makedirs(raw / "val")
    (raw / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    with pytest.raises(SystemExit, match="raw layout .*torchvision"):
        common.dataset_source("imagenet", str(raw), "val")


def test_extract_features_takes_the_centre_crop():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6).to(torch.uint8)
    stats = torch.zeros(3), torch.ones(3) / 255  # normalised = the raw values
    f, _ = common.extract_features(torch.nn.Flatten(), common.Split(x, torch.zeros(2)), stats, torch.device("cpu"), 4)
    assert torch.allclose(f, x[..., 1:5, 1:5].float().flatten(1))


def test_classes_file_keeps_those_classes_and_food101_offline_is_one_line(tmp_path):
    write_folder(tmp_path / "data", classes=("cat", "dog", "owl"), n=2)
    (tmp_path / "keep.txt").write_text("# two of three\nowl\ncat  # a comment\n\n")
    d = common.get_dataset("folder", str(tmp_path / "data"), "val", image_size=8, classes=str(tmp_path / "keep.txt"))
    assert d.labels.tolist() == [0, 0, 1, 1]  # cat, owl relabelled 0, 1 in the dataset's order
    (tmp_path / "bad.txt").write_text("cat\nemu\n")
    with pytest.raises(SystemExit, match="1 of its 2 classes are not classes of the dataset \\(first: emu"):
        common.get_dataset("folder", str(tmp_path / "data"), "train", classes=str(tmp_path / "bad.txt"))
    with pytest.raises(SystemExit, match="--classes selects classes of a folder-like dataset"):
        common.get_dataset("cifar10", str(tmp_path), classes=str(tmp_path / "keep.txt"))
    with pytest.raises(SystemExit, match="food101 is not there and --no-download is set.*food-101"):
        common.get_dataset("food101", str(tmp_path), download=False)
