"""Two gloo processes, each holding half of a fixed batch and computing only its own rows of every loss against the
gathered columns (as the training loops do, through common.columns / common.all_sum), reproduce in float64 the
single-process whole-batch loss and every parameter's gradient after DDP's mean, within 1e-10; DINO's centre and one
DDP optimiser step too. A gradient that misses the other ranks' share (an all-reduce without a backward, lightly's
issue #1920) is caught: the same check fails on it."""
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

WORLD, V, N = 2, 4, 8  # processes, crops, images in the whole batch


def detached_all_sum(x):
    """The trap: the right forward sum, but the gradient reaches only this rank's own term."""
    if not dist.is_initialized():
        return x
    total = x.detach().clone()
    dist.all_reduce(total)
    return x + (total - x.detach())


def losses(e):
    """Every method's loss on the embeddings e (V, n, K) of this rank's images, as its training loop computes it."""
    c = common.columns
    return {
        "simclr": simclr.nt_xent(e[0], e[1], 0.2, *c(e[0], e[1])),
        "hydes": hydes.hydes_loss(e, 2.0, 1.0, 1.0, *c(e, dim=1))[0],
        "entrec_average": entrec.entrec_loss(e[:2], None, None, "simclr", 10.0, "average", 0.1, 0.04,
                                             common.gather(e[:2], dim=1))[0],
        "entrec_expectation": entrec.entrec_loss(e[:2], None, None, "simclr", 10.0, "expectation", 0.1, 0.04,
                                                 common.gather(e[:2], dim=1))[0],
        "entrec_dino": entrec.entrec_loss(e, e[:2].detach() * 0.5, None, "dino", 10.0, "average", 0.1, 0.04,
                                          common.gather(e, dim=1))[0],
        "mmae_tcr": mmae.mmae_loss((e**2).mean(), e[0], 0.5, 3.0, "tcr", common.all_sum)[0],
        "mmae_square": mmae.mmae_loss((e**2).mean(), e[0], 0.5, 3.0, "square", common.all_sum)[0],
        "trap": mmae.mmae_loss((e**2).mean(), e[0], 0.5, 3.0, "tcr", detached_all_sum)[0],
        "dino": dino.DINOLoss(e.shape[-1], epochs=1)(list(e), [e[0].detach(), e[1].detach()], 0)[0],
    }


def embedder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).double()


def results(net, x):
    """-> {method: (loss over the whole batch, [each parameter's gradient])}."""
    out = {}
    for name in losses(net(x)):
        net.zero_grad()
        loss = losses(net(x))[name]
        loss.backward()  # DDP: the gradients are averaged over the ranks here
        metrics = common.Metrics()  # the logged value: under torchrun the mean over the ranks
        metrics.add(loss=loss)
        out[name] = (metrics.means()["loss"], [p.grad.clone() for p in net.parameters()])
    return out


def worker(rank, path, x, t_out, out):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    n = N // WORLD
    res = {"losses": results(nn.parallel.DistributedDataParallel(embedder()), x[:, rank * n: (rank + 1) * n])}
    crit = dino.DINOLoss(5, epochs=1)
    crit([torch.zeros(n, 5)] * 3, [t[rank * n: (rank + 1) * n] for t in t_out], 0)
    res["dino_center"] = crit.center.clone()
    # one DDP step of a projector-like net (eval mode: BatchNorm uses its running statistics, the same on every rank)
    net = nn.parallel.DistributedDataParallel(tiny_simclr().eval())
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    xs = torch.randn(16, 6, generator=torch.Generator().manual_seed(1)).view(2, 8, 6)[:, rank * 4:(rank + 1) * 4]
    z1, z2 = net(xs[0]), net(xs[1])
    simclr.nt_xent(z1, z2, 0.2, *common.columns(z1, z2)).backward()
    opt.step()
    res["step"] = [p.detach().clone() for p in net.module.parameters()]
    res["knn"] = common.knn_monitor(nn.Flatten(), knn_data(), torch.device("cpu"))  # each rank embeds its share
    res["gathered"] = common.gather(torch.full((2,), rank + 0.5, dtype=torch.bfloat16))  # under autocast: in fp32
    torch.save(res, f"{out}.{rank}")
    dist.destroy_process_group()


def knn_data():
    """30 labelled memory images of 3 classes and 7 queries (shares of 15 and 3 / 4 rows), the pixels as features:
    each rank's 15 memory rows hold fewer than k = 20, so the merge also meets padded candidates."""
    g = torch.Generator().manual_seed(2)
    split = lambda n: common.Split(torch.randint(0, 256, (n, 3, 2, 2), generator=g, dtype=torch.uint8),  # noqa
                                   torch.randint(0, 3, (n,), generator=g))
    return common.Data(None, split(30), split(7), (torch.full((3,), 0.5), torch.full((3,), 0.25)), 2)


def tiny_simclr():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))


def test_two_processes_equal_one(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(V, N, 6, generator=g, dtype=torch.float64)  # (crops, images, input)
    t_out = [torch.randn(N, 5, generator=g), torch.randn(N, 5, generator=g)]
    out = str(tmp_path / "res")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(str(tmp_path / "rdv"), x, t_out, out), nprocs=WORLD, join=True)

    full = results(embedder(), x)  # one process, the whole batch
    center = 0.1 * torch.cat(t_out).mean(0, keepdim=True)  # after one update from 0: 0.1 x the mean of all 16 rows
    net = tiny_simclr().eval()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    xs = torch.randn(16, 6, generator=torch.Generator().manual_seed(1)).view(2, 8, 6)
    simclr.nt_xent(net(xs[0]), net(xs[1])).backward()
    opt.step()

    for rank in range(WORLD):
        res = torch.load(f"{out}.{rank}", weights_only=True)
        for name, (loss, grads) in res["losses"].items():
            ref_loss, ref_grads = full[name]
            assert abs(loss - ref_loss) < 1e-10, name
            same = all(torch.allclose(a, b, rtol=0, atol=1e-10) for a, b in zip(grads, ref_grads))
            assert same == (name != "trap"), name  # the trap's gradient misses the other rank's share
        assert torch.allclose(res["dino_center"], center, atol=1e-6)
        assert res["knn"] == common.knn_monitor(nn.Flatten(), knn_data(), torch.device("cpu"))  # the same neighbours
        assert res["gathered"].dtype == torch.float32 and res["gathered"].tolist() == [0.5, 0.5, 1.5, 1.5]
        for p, q in zip(res["step"], net.parameters()):
            assert torch.allclose(p, q, atol=1e-6)  # the DDP step lands on the single-process weights


HARNESS = """
import sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
import dino, entrec, hydes, mmae, simclr
tiny = {tiny!r}
head = ["--proj-hidden", "16", "--proj-dim", "8"]
runs = {{"simclr": (simclr, head + ["--data-on", "disk", "--cache-dir", "cache"]), "dino": (dino, ["--out-dim", "32"]),
        "hydes": (hydes, head + ["--local-crops", "2"]), "entrec": (entrec, head),
        "mmae": (mmae, ["--arch", "vit_tiny", "--patch-size", "8"])}}
for name, (script, extra) in runs.items():
    for more in ([], ["--resume", "--epochs", "2"]):  # one epoch, then resumed for a second one
        script.train(script.get_args(tiny + extra + ["--out-dir", "runs/" + name] + more))
        dist.barrier()  # rank 1 returns before rank 0 has written last.pt: as two launches, one after the other
"""


def test_every_script_trains_and_resumes_under_torchrun(tmp_path):
    # The five scripts under torchrun on the CPU (2 gloo ranks, one process each running every script's train(), as
    # its __main__ does), the kNN monitor after every epoch, a checkpoint, then --resume. Every collective must be
    # called by every rank: one that a rank alone calls (a monitor on rank 0 gathering features) would stop the run
    # at the 120 s --dist-timeout instead of hanging (loose enough for a loaded machine, where one rank's checkpoint or
    # cache write keeps the other waiting). Rank 0 claims each run folder and tells the other rank; DDP without
    # SyncBatchNorm; SimCLR on the disk tier: the two ranks build each cache once and read their own rows.
    import subprocess
    import sys

    from conftest import ROOT, TINY
    tiny = TINY + ["--width", "4", "--num-train", "64", "--batch-size", "32", "--dist-timeout", "120"]
    (tmp_path / "all.py").write_text(HARNESS.format(root=ROOT, tiny=tiny))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "all.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "runs")) == ["dino", "entrec", "hydes", "mmae", "simclr"]
    assert p.stderr.count("run folder:") == 10  # rank 0 alone claims each folder, at the start and at the resume
    assert p.stderr.count("wrote ") == 2 and len(list((tmp_path / "cache").glob("*.u8"))) == 2  # train, val: once
    for name in ("simclr", "dino", "hydes", "entrec", "mmae"):
        ck = torch.load(tmp_path / "runs" / name / "last.pt", weights_only=True)
        assert ck["epoch"] == 2 and [r["epoch"] for r in ck["log"]] == [1, 2], name
        assert ["knn_top1" in r for r in ck["log"]] == [True, True], name  # the monitor ran after both epochs
    # Two nodes rehearsed on one machine, as docs/scale.md launches them (c10d rendezvous, one process per node), each
    # with its own node-local cache: each node builds its caches once, and the first epoch's log equals the one-node
    # 2-rank run's above, bit for bit.
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = [os.path.join(ROOT, "simclr.py"), *tiny, "--proj-hidden", "16", "--proj-dim", "8", "--data-on", "disk",
              "--out-dir", "two-nodes"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(k),
                               "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                               f"127.0.0.1:{port}", "--rdzv-id", "rehearsal", *script, "--cache-dir", f"node{k}"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for k in (0, 1)]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), outs[0][1][-3000:] + outs[1][1][-3000:]
    assert [err.count("wrote ") for _, err in outs] == [2, 2]  # train and val, once on each node
    one = torch.load(tmp_path / "runs" / "simclr" / "last.pt", weights_only=True)["log"][0]
    assert torch.load(tmp_path / "two-nodes" / "last.pt", weights_only=True)["log"] == [one]
