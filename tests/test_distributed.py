"""Two gloo processes on a batch split in half give the single-process loss and gradients."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hydes
import simclr


def losses(z1, z2, zv):  # the losses that need the whole batch, on local slices
    return {"simclr": lambda a, b, c: simclr.nt_xent(a, b, 0.2),
            "hydes": lambda a, b, c: hydes.hydes_loss(c, 2.0)[0]}


def worker(rank, world, path, z1, z2, zv, out):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    n = z1.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    a, b = z1[sl].clone().requires_grad_(True), z2[sl].clone().requires_grad_(True)
    c = zv[:, sl].clone().requires_grad_(True)
    res = {}
    for name, fn in losses(a, b, c).items():
        for t in (a, b, c):
            t.grad = None
        loss = fn(a, b, c)
        (loss * world).backward()  # as in the training loops: DDP would average the ranks' gradients
        res[name] = (loss.item(), (a.grad if name == "simclr" else c.grad).clone())
    torch.save(res, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_process_loss_and_gradient_equal_single_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 16, generator=g, dtype=torch.float64), torch.randn(8, 16, generator=g, dtype=torch.float64)
    zv = torch.randn(4, 8, 16, generator=g, dtype=torch.float64)  # (V, N, D)
    out = str(tmp_path / "res")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(2, str(tmp_path / "rdv"), z1, z2, zv, out), nprocs=2, join=True)
    a, c = z1.clone().requires_grad_(True), zv.clone().requires_grad_(True)
    full = {"simclr": simclr.nt_xent(a, z2, 0.2), "hydes": hydes.hydes_loss(c, 2.0)[0]}
    full["simclr"].backward()
    full["hydes"].backward()
    grads = {"simclr": a.grad, "hydes": c.grad}
    for rank in range(2):
        res = torch.load(f"{out}.{rank}", weights_only=True)
        for name in ("simclr", "hydes"):
            loss, grad = res[name]
            assert abs(loss - full[name].item()) < 1e-10, name
            ref = grads[name][rank * 4:(rank + 1) * 4] if name == "simclr" else grads[name][:, rank * 4:(rank + 1) * 4]
            # each rank back-propagates world * loss; DDP then averages the parameter gradients over the
            # world ranks, so the rank's z-gradient / world must equal the single-process one
            assert torch.allclose(grad / 2, ref, atol=1e-10), name
