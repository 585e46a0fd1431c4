"""Two gloo processes, each holding half of a fixed batch, reproduce the single-process losses, their
gradients, DINO's centre, and one DDP optimiser step. The training loops gather the whole batch with
common.gather and back-propagate the loss as it is; that is what the workers do."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import common
import dino
import entrec
import hydes
import mmae
import simclr

WORLD = 2


def batch_losses(z1, z2, zv):
    """The losses that need the whole batch, on the (gathered) batch, as the training loops call them."""
    g = common.gather
    return {"simclr": simclr.nt_xent(g(z1), g(z2), 0.2), "hydes": hydes.hydes_loss(g(zv, dim=1), 2.0)[0],
            "entrec": entrec.sphere_entropy(g(z1), 10.0), "tcr": mmae.tcr(g(z1), 3.0)}


def tiny_simclr():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))


def worker(rank, path, data, out):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    z1, z2, zv, t_out = data
    n = z1.shape[0] // WORLD
    sl = slice(rank * n, (rank + 1) * n)
    a, b, c = (t.clone().requires_grad_(True) for t in (z1[sl], z2[sl], zv[:, sl]))
    res = {}
    for name in ("simclr", "hydes", "entrec", "tcr"):
        for t in (a, b, c):
            t.grad = None
        loss = batch_losses(a, b, c)[name]
        loss.backward()  # as the training loops do
        res[name] = (loss.item(), (c.grad if name == "hydes" else a.grad).clone())
    crit = dino.DINOLoss(5, epochs=1)
    crit([torch.zeros(n, 5)] * 3, [t[sl] for t in t_out], 0)
    res["dino_center"] = crit.center.clone()
    # one DDP step of a small projector-like net (eval mode: BatchNorm uses its running statistics,
    # which are the same on every rank; CPU has no SyncBatchNorm)
    net = nn.parallel.DistributedDataParallel(tiny_simclr().eval())
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    xs = x.view(2, 8, 6)[:, rank * 4:(rank + 1) * 4]  # (2 views, local images, 6)
    simclr.nt_xent(common.gather(net(xs[0])), common.gather(net(xs[1]))).backward()
    opt.step()
    res["step"] = [p.detach().clone() for p in net.module.parameters()]
    torch.save(res, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 16, generator=g, dtype=torch.float64), torch.randn(8, 16, generator=g, dtype=torch.float64)
    zv = torch.randn(4, 8, 16, generator=g, dtype=torch.float64)  # (V, N, D)
    t_out = [torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)]
    out = str(tmp_path / "res")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(str(tmp_path / "rdv"), (z1, z2, zv, t_out), out), nprocs=WORLD, join=True)

    a, c = z1.clone().requires_grad_(True), zv.clone().requires_grad_(True)
    full, grads = {}, {}
    for name in ("simclr", "hydes", "entrec", "tcr"):
        a.grad = c.grad = None
        loss = batch_losses(a, z2, c)[name]
        loss.backward()
        full[name], grads[name] = loss.item(), (c.grad if name == "hydes" else a.grad).clone()
    # centre after one update from 0: 0.1 x the mean of all 16 teacher rows of the whole batch
    center = 0.1 * torch.cat(t_out).mean(0, keepdim=True)
    net = tiny_simclr().eval()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1)).view(2, 8, 6)
    simclr.nt_xent(net(x[0]), net(x[1])).backward()
    opt.step()

    for rank in range(WORLD):
        res = torch.load(f"{out}.{rank}", weights_only=True)
        sl = slice(rank * 4, (rank + 1) * 4)
        for name in ("simclr", "hydes", "entrec", "tcr"):
            loss, grad = res[name]
            assert abs(loss - full[name]) < 1e-10, name  # every rank computes the whole-batch loss
            ref = grads[name][:, sl] if name == "hydes" else grads[name][sl]
            # the gather's backward sums the WORLD ranks' (equal) losses' gradients, and DDP then averages over the
            # WORLD ranks: rank grad / WORLD is the single-process gradient of its own rows
            assert torch.allclose(grad / WORLD, ref, atol=1e-10), name
        assert torch.allclose(res["dino_center"], center, atol=1e-6)
        for p, q in zip(res["step"], net.parameters()):
            assert torch.allclose(p, q, atol=1e-6)  # the DDP step lands on the single-process weights


def test_a_script_under_torchrun_trains_one_run_in_one_folder(tmp_path):
    # torchrun on the CPU (gloo): rank 0 claims the run folder and tells the other rank; DDP without SyncBatchNorm
    import subprocess
    import sys

    from conftest import ROOT, TINY
    args = TINY + ["--width", "4", "--proj-hidden", "16", "--proj-dim", "8", "--num-train", "64", "--batch-size", "32",
                   "--epochs", "2"]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "simclr.py"), *args], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert os.listdir(tmp_path / "runs") == ["simclr-synthetic-resnet18"] and p.stderr.count("run folder:") == 1
    ck = torch.load(tmp_path / "runs" / "simclr-synthetic-resnet18" / "last.pt", weights_only=True)
    assert ck["epoch"] == 2 and [r["epoch"] for r in ck["log"]] == [1, 2]
