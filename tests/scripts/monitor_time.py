"""The kNN monitor's time per rank as the data grows (a script, not a test): each of W gloo processes embeds its 1/W of
the memory and held-out images and the neighbours are merged (common.knn_monitor), so no rank works alone on the
whole set. Prints, for each data size and W, the seconds of the slowest rank; docs/scale.md scales it to ImageNet-1k.

    python tests/scripts/monitor_time.py --sizes 2000 4000 8000 --worlds 1 2 --width 16
"""
import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import common  # noqa: E402


def worker(rank, world, path, n, width, out):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    data = common.synthetic(n, 0)
    stats = common.pixel_stats(data.images)
    torch.manual_seed(0)
    backbone, _ = common.build_backbone("resnet18", 32, width)
    split = common.Data(None, data, common.synthetic(n // 5, 1), stats, 32)
    dist.barrier()
    start = time.time()
    top1 = common.knn_monitor(backbone, split, torch.device("cpu"))
    seconds = torch.tensor([time.time() - start])
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    if rank == 0:
        torch.save((seconds.item(), top1), out)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 4000, 8000], help="memory images (val: a fifth)")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="numbers of ranks")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 width")
    args = p.parse_args()
    print(f"{'memory':>8} {'val':>6} {'ranks':>5} {'s (slowest rank)':>17} {'img/s per rank':>15} {'kNN top-1':>9}")
    for n in args.sizes:
        for world in args.worlds:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "out.pt")
                mp.spawn(worker, args=(world, os.path.join(tmp, "rdv"), n, args.width, out), nprocs=world)
                seconds, top1 = torch.load(out)
            per_rank = (n + n // 5) / world / seconds
            print(f"{n:8d} {n // 5:6d} {world:5d} {seconds:17.2f} {per_rank:15.0f} {top1:9.2f}", flush=True)


if __name__ == "__main__":
    main()
