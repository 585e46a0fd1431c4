"""The suite's mutation score (a measurement, not a test). Each mutant below is one line changed the way a careful
engineer might get it wrong, with the reason a user would care; the script applies each alone to a copy of the
checkout, runs the test files that guard that line (with --full, the README's whole test command) and prints whether
the suite caught it (killed) or not (survived). docs/testing.md states the score and explains every survivor.

    python tests/scripts/mutation.py                  # every mutant, ~15 minutes on 2 cores
    python tests/scripts/mutation.py --only 1 5 12    # some of them (numbers as listed by --list)
    python tests/scripts/mutation.py --full           # the whole suite for each mutant (~5 minutes each)
"""
import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T = "tests/test_"
# (file, the text as it stands, the mutated text, test files that guard it, why a user would care)
MUTANTS = [
    # the losses
    ("simclr.py", 'logits = (rows @ cols.T / temperature).scatter(1, own[:, None], float("-inf"))',
     "logits = (rows @ cols.T / temperature)", [T + "simclr.py"], "NT-Xent counts each view as its own negative"),
    ("simclr.py", "positive = torch.cat([ar + N, ar]) + offset", "positive = torch.cat([ar, ar + N]) + offset",
     [T + "simclr.py"], "the positive of a view is itself"),
    ("simclr.py", "F.normalize(torch.cat(zs).to(torch.promote_types(z1.dtype, torch.float32)), dim=1)",
     "F.normalize(torch.cat(zs).to(torch.promote_types(z1.dtype, torch.float32)), dim=0)", [T + "simclr.py"],
     "cosine similarities normalised over the batch instead of the features"),
    ("hydes.py", "h_global = (math.log(V * N - 1) - lse_all).mean() - log_c",
     "h_global = (math.log(V * N) - lse_all).mean() - log_c", [T + "hydes.py"],
     "the leave-one-out KDE normalised by VN instead of VN - 1"),
    ("hydes.py", 'lse_all = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1)',
     "lse_all = torch.logsumexp(logits, dim=1)", [T + "hydes.py"], "H_global counts each point in its own density"),
    ("hydes.py", "return beta * h_local - alpha * h_global, h_global, h_local",
     "return beta * h_local + alpha * h_global, h_global, h_local", [T + "hydes.py"],
     "the uniformity term minimised: collapse"),
    ("hydes.py", "positive = (image[:, None] == torch.arange(N, device=z.device).repeat(V)) & ~self_mask",
     "positive = (image[:, None] == torch.arange(N, device=z.device).repeat(V))", [T + "hydes.py"],
     "H_local counts each crop as its own positive"),
    ("dino.py", "p_t = [F.softmax((t - self.center) / tau_t, dim=-1) for t in teacher_out]",
     "p_t = [F.softmax((t + self.center) / tau_t, dim=-1) for t in teacher_out]", [T + "dino.py"],
     "centring adds the centre: collapse to one prototype"),
    ("dino.py", "pairs = [(q, lp) for it, q in enumerate(p_t) for iv, lp in enumerate(log_p_s) if iv != it]",
     "pairs = [(q, lp) for it, q in enumerate(p_t) for iv, lp in enumerate(log_p_s)]", [T + "dino.py"],
     "the teacher's crop is also matched with the student's same crop"),
    ("dino.py", "self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)",
     "self.center.mul_(1 - self.center_momentum).add_(batch_sum / count, alpha=self.center_momentum)",
     [T + "dino.py"], "the centre EMA weighs the new batch by m instead of 1 - m"),
    ("dino.py", "t.lerp_(s, 1 - momentum)", "t.lerp_(s, momentum)", [T + "dino.py"],
     "the teacher EMA moves by m instead of 1 - m"),
    ("dino.py", "p.grad.mul_((clip / (p.grad.norm() + 1e-6)).clamp(max=1.0))",
     "p.grad.mul_(clip / (p.grad.norm() + 1e-6))", [T + "dino.py"],
     "every gradient rescaled to norm clip: small ones scaled up"),
    ("entrec.py", "log_p = torch.logsumexp(kappa * rows @ points.T, dim=1) - math.log(N) + log_vmf_normalizer(D, "
     "kappa)", "log_p = torch.logsumexp(kappa * rows @ points.T, dim=1) + log_vmf_normalizer(D, kappa)",
     [T + "entrec.py"], "the KDE is not normalised by N: entropies off by log N"),
    ("entrec.py", "return -(log_vmf_normalizer(z.shape[1], kappa) + kappa * (mu * z).sum(1)).mean()",
     "return -(log_vmf_normalizer(z.shape[1], kappa) - kappa * (mu * z).sum(1)).mean()", [T + "entrec.py"],
     "reconstruction pushes views apart"),
    ("entrec.py", "return -torch.special.xlogy(p_bar, p_bar).sum()",
     "return -torch.special.xlogy(fp32(p), fp32(p)).sum(-1).mean()", [T + "entrec.py"],
     "the mean of the rows' entropies instead of the entropy of the batch mean"),
    ("mmae.py", "return 2 * torch.linalg.cholesky_ex(eye + (mu / d) * gram).L.diagonal().log().sum()",
     "return 2 * torch.linalg.cholesky_ex(eye + (mu / B) * gram).L.diagonal().log().sum()", [T + "mmae.py"],
     "TCR scaled by the batch size instead of the feature dimension (the authors' code: d)"),
    ("mmae.py", "return l_mae - lam * r, r  # maximise the coding rate", "return l_mae + lam * r, r",
     [T + "mmae.py"], "the coding rate minimised"),
    ("mmae.py", "return (per_patch * mask).sum() / mask.sum()", "return per_patch.mean()", [T + "mmae.py"],
     "MAE's loss on every patch, visible ones too"),
    # augmentation
    ("common.py", "self.groups = [(n_global, image_size, tuple(global_scale), [(1.0, 0.1)[i % 2]",
     "self.groups = [(n_global, image_size, tuple(global_scale), [(0.1, 1.0)[i % 2]", [T + "device_paths.py"],
     "the two global crops' blur probabilities swapped"),
    ("common.py", "v = torch.where(coin(solarize_p), torch.where(v >= 0.5, 1 - v, v), v)",
     "v = torch.where(coin(solarize_p), torch.where(v >= 0.5, v, 1 - v), v)", [T + "device_paths.py"],
     "solarisation inverts the dark pixels instead of the bright ones"),
    ("common.py", "v = torch.where(coin(0.2), gray(v).expand_as(v), v)",
     "v = torch.where(coin(0.8), gray(v).expand_as(v), v)", [T + "common.py", T + "device_paths.py"],
     "grayscale with p 0.8 instead of 0.2"),
    ("common.py", "logr = _u((B, 10), math.log(ratio[0]), math.log(ratio[1]), g, dev)",
     "logr = _u((B, 10), ratio[0], ratio[1], g, dev)", [T + "common.py"], "aspect ratios drawn linearly, not in log"),
    ("common.py", "x = (x * _u((B, 1, 1, 1), 1 - b, 1 + b, g, dev)).clamp(0, 1)",
     "x = (x + _u((B, 1, 1, 1), -b, b, g, dev)).clamp(0, 1)", [T + "common.py"],
     "brightness jitter additive instead of multiplicative (not torchvision's)"),
    ("common.py", "return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]",
     "return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]", [T + "common.py"],
     "grey weights that do not sum to 1: a grey image is no longer left grey"),
    # the kNN classifier and the data order
    ("common.py", "sim, idx = (test_f[i: i + batch_size] @ train_f.T).topk(min(k, len(train_f)), dim=1)",
     "sim, idx = (test_f[i: i + batch_size] @ train_f.T).topk(min(k, len(train_f)), dim=1, largest=False)",
     [T + "common.py"], "kNN votes with the least similar neighbours"),
    ("common.py", "scatter_add_(1, labels[i: i + batch_size], (s / T).exp())",
     "scatter_add_(1, labels[i: i + batch_size], (s * T).exp())", [T + "common.py"], "the vote temperature inverted"),
    ("common.py", "share = lambda d: range(len(d.labels) * rank // world, len(d.labels) * (rank + 1) // world)",
     "share = lambda d: range(0, len(d.labels) // world)", [T + "distributed.py"],
     "the sharded kNN monitor: every rank embeds the first share, the rest of the data is never seen"),
    ("common.py", "        sim, pick = gather(sim, dim=1).topk(k, dim=1)",
     "        sim, pick = gather(sim, dim=1)[:, :k].topk(k, dim=1)", [T + "distributed.py"],
     "the sharded kNN monitor keeps rank 0's candidates alone"),
    ("common.py", "        return bool(every) and (done % every == 0 or done == self.args.epochs)",
     "        return self.rank == 0 and bool(every) and (done % every == 0 or done == self.args.epochs)",
     [T + "distributed.py"], "the monitor on rank 0 alone: M-MAE's gather there deadlocks under torchrun"),
    ("common.py", "perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed * 100003 + epoch))",
     "perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed * 100003))",
     [T + "common.py", T + "tiers.py"], "the same batches every epoch"),
    # the gather and the sharded losses
    ("common.py", "return (*(gather(x, dim) for x in xs), world_rank()[1] * xs[0].shape[dim])",
     "return (*(gather(x, dim) for x in xs), world_rank()[1] * xs[0].shape[0])", [T + "common.py"],
     "the sharded offset counted in crops, not images: every rank but 0 wrong"),
    ("common.py", "        dist.reduce_scatter_tensor(own, torch.cat([g.reshape(-1) for g in grads]))",
     "        own.copy_(grads[dist.get_rank()].reshape(-1))", [T + "distributed.py"],
     "the gather's backward keeps only this rank's gradient (lightly #1920)"),
    ("common.py", "            dist.all_reduce(values)\n            values /= dist.get_world_size()",
     "            values /= dist.get_world_size()", [T + "distributed.py"],
     "logged metrics of rank 0 alone, divided by the world size"),
    # the data and its cache
    ("common.py", "    if flat := (stats[1] < 0.5 / 255).nonzero().flatten().tolist():",
     "    if flat := (stats[1] == 0).nonzero().flatten().tolist():", [T + "runs.py"],
     "images of one mid-grey (std 5.6e-16, not 0) train on noise blown up 1e15-fold"),
    ("common.py", 'h.update(f"{os.path.relpath(f, root)}\\t{y}', 'h.update(f"{f}\\t{y}', [T + "tiers.py"],
     "every spelling of the data folder rebuilds the whole cache"),
    ("common.py", 'glob.glob(glob.escape(path) + ".tmp*") + [path] * os.path.exists(path)',
     'glob.glob(glob.escape(path) + ".tmp*")', [T + "tiers.py"],
     "a stale cache counted against the free space: a rebuild on a nearly full disk stops"),
    ("common.py", "    src = subset(dataset_source(args.dataset, split=\"train\", **kw), args.num_train)",
     "    src = dataset_source(args.dataset, split=\"train\", **kw)", [T + "tiers.py"],
     "--num-train decodes every image first (ImageNet: 1.28 M for a 10,000-image run)"),
    # checkpoints and run safety
    ("common.py", 'torch.save(state, f"{path}.tmp")\n        os.replace(f"{path}.tmp", path)',
     'torch.save(state, path)', [T + "common.py"], "a checkpoint written straight to last.pt: a crash tears it"),
    ("common.py", 'ck = torch.load(path, map_location="cpu", weights_only=True)',
     'ck = torch.load(path, map_location="cpu", weights_only=False)', [T + "common.py"],
     "a checkpoint may run code when loaded"),
    ("common.py", "if (step is None or (step + 1) % every == 0) and not math.isfinite(total):",
     "if step is None and not math.isfinite(total):", [T + "common.py"],
     "a non-finite loss noticed only at the end of the epoch"),
    ("common.py", "        self.writing = True  # a signal now waits for the checkpoint and the log line",
     "        self.writing = False", [T + "run_safety.py"], "a signal during a checkpoint write stops it half-done"),
    ("common.py", "    if \"log\" in ck and old != \"\".join(json.dumps(r) + \"\\n\" for r in records)",
     "    if False and \"log\" in ck and old != \"\".join(json.dumps(r) + \"\\n\" for r in records)",
     [T + "run_safety.py"], "a log line torn by a kill is never mended"),
    # the evaluations
    ("eval_linear.py", "mu, sd = train_f.mean(0), train_f.std(0) + 1e-6",
     "mu, sd = test_f.mean(0), test_f.std(0) + 1e-6", [T + "common.py", T + "e2e.py"],
     "the probe standardised with the test split's statistics (an affine map of both splits: see docs/testing.md)"),
    ("eval_linear.py", "return (a - b).pow(2).sum(1).mean().item()", "return (a - b).norm(dim=1).mean().item()",
     [T + "common.py"], "alignment without the square (not Wang & Isola's)"),
    ("mmae.py", "c1, c2 = (z1 @ z1.T) ** 2, (z2 @ z2.T) ** 2", "c1, c2 = (z1 @ z1.T).abs(), (z2 @ z2.T).abs()",
     [T + "mmae.py"], "the order-2 matrix entropy of unsquared cosines (right on 0/1 Gram matrices only)"),
    ("eval_linear.py", "always[:, counts.argmax()] = confusion.sum(1)", "always[:, counts.argmin()] = confusion.sum(1)",
     [T + "dense.py"], "the dense baseline predicts the rarest class, not the most frequent"),
    ("eval_linear.py", "lcs = offsets[i] if offsets[i] in lcs else min(lcs, key=lambda c: (names or {}).get(c, c))",
     "lcs = offsets[i] if offsets[i] in lcs else min(lcs)", [T + "common.py"],
     "Wu-Palmer ties broken by offset, not by NLTK's synset name (99 of 3,321 pairs differ)"),
    ("eval_linear.py", "common.centre(split.masks[i: i + 32].to(device), size)", "split.masks[i: i + 32].to(device)",
     [T + "dense.py"], "ImageNet's foreground share measured on the 256 px squares, the features seeing 224 px"),
]


def copy_checkout(dst):
    """The tracked and untracked (not ignored) files of the checkout, as the device and CI see them."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))


def run_mutant(k, mutant, full, timeout):
    path, old, new, tests, why = mutant
    with tempfile.TemporaryDirectory() as tmp:
        copy_checkout(tmp)
        text = open(os.path.join(tmp, path)).read()
        if text.count(old) != 1:
            return "stale", 0.0  # the line moved or changed: update the mutant
        open(os.path.join(tmp, path), "w").write(text.replace(old, new))
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"] + ([] if full else tests)
        start = time.time()
        p = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "2"}, preexec_fn=os.setpgrp)
        try:
            verdict = "killed" if p.wait(timeout=timeout) not in (0, 5) else "SURVIVED"
        except subprocess.TimeoutExpired:
            verdict = "killed (timeout)"
        finally:  # a test that failed may have left a process of the mutant running: its whole group goes
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        return verdict, time.time() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", type=int, nargs="+", help="the mutants of these numbers (1-based)")
    p.add_argument("--full", action="store_true", help="run the README's whole test command for each mutant")
    p.add_argument("--list", action="store_true", help="list the mutants and stop")
    p.add_argument("--timeout", type=int, default=900, help="seconds per mutant (a hang counts as killed)")
    args = p.parse_args()
    chosen = [(k, m) for k, m in enumerate(MUTANTS, 1) if not args.only or k in args.only]
    if args.list:
        for k, (path, _, _, tests, why) in chosen:
            print(f"{k:3d} {path:15s} {why}  [{' '.join(os.path.basename(t) for t in tests)}]")
        return
    killed = 0
    for k, m in chosen:
        verdict, seconds = run_mutant(k, m, args.full, args.timeout)
        killed += verdict.startswith("killed")
        print(f"{k:3d} {verdict:16s} {seconds:6.1f} s  {m[0]}: {m[4]}", flush=True)
    print(f"mutation score: {killed} of {len(chosen)} killed ({100 * killed / len(chosen):.0f}%)")


if __name__ == "__main__":
    main()
