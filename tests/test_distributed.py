"""Multi-process training: ``torchrun`` + DistributedDataParallel on CPU with gloo.

Two processes train the real lite0 student (with its batch norm) and the channel DCAM side
branch through the command line; the result must match, within 1e-5, one process that runs the
two per-rank micro-batches of every global batch separately and averages their gradients (plain
DDP: batch-norm statistics per rank, running statistics from rank 0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch.distributed as dist

from dcamkd import ops
from dcamkd.config import preset_config
from dcamkd.distributed import pad_permutation, shard_batch
from dcamkd.errors import InvalidArgumentError
from dcamkd.checkpoint import load_checkpoint
from dcamkd.train import Trainer

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

B, STEPS, WORLD = 4, 3, 2


def test_pad_and_shard_hand_values():
    perm = torch.tensor([5, 3, 0, 4, 1])
    padded = pad_permutation(perm, 2)
    assert padded.tolist() == [5, 3, 0, 4, 1, 5]
    assert pad_permutation(perm, 4).tolist() == [5, 3, 0, 4, 1, 5, 3, 0]
    assert pad_permutation(torch.tensor([7]), 3).tolist() == [7, 7, 7]
    batch = padded[:4]
    assert shard_batch(batch, 0, 2).tolist() == [5, 3] and shard_batch(batch, 1, 2).tolist() == [0, 4]
    with pytest.raises(InvalidArgumentError, match="does not split over 2 ranks"):
        shard_batch(torch.arange(3), 0, 2)


def _reference(cfg, out: Path):
    """One process: every global batch as WORLD micro-batches, gradients averaged; BN running
    statistics kept from micro-batch 0 (rank 0's, which DDP broadcasts)."""
    tr = Trainer(cfg, out, progress=False)
    tr._train_feats = tr._teacher_features(tr.train_ds)
    tr._val_feats = tr._teacher_features(tr.val_ds)
    tr.student.train()
    tr.dcam.train()
    params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    n, step, val_scores = len(tr.train_ds), 0, []
    while step < STEPS:
        perm = pad_permutation(torch.randperm(n, generator=tr.shuffle_gen), WORLD)
        for start in range(0, len(perm), B):
            if step >= STEPS:
                break
            idx = perm[start:start + B]
            acc = [torch.zeros_like(p) for p in params]
            for r in range(WORLD):
                mb = shard_batch(idx, r, WORLD)
                x = tr._stack(tr.train_ds, mb)
                s, cg, sg = tr.net(x)
                loss = tr.loss_fn.combine(tr.loss_fn.terms(tr._train_feats.batch(mb, "cpu"), s, cg, sg))
                for a, g in zip(acc, torch.autograd.grad(loss, params)):
                    a += g
                if r == 0:
                    rank0_buffers = {k: v.clone() for k, v in tr.student.named_buffers()}
            with torch.no_grad():
                for k, v in tr.student.named_buffers():
                    v.copy_(rank0_buffers[k])
            for p, a in zip(params, acc):
                p.grad = a / WORLD
            tr.optimizer.step()
            step += 1
        val_scores.append(tr.validate()["val_score"])
    return tr, val_scores


def test_torchrun_two_gloo_processes_match_averaged_micro_batches(make_tree, tmp_path):
    root = make_tree(categories=("alpha",), n_train=8, n_test_good=1, n_defect=1, size=64)
    out = tmp_path / "ddp"
    argv = ["train", "--data", str(root), "--backbone", "tf_efficientnet_lite0", "--preset", "dcam",
            "--image-size", "64", "--batch-size", str(B), "--steps", str(STEPS), "--lr", "0.05",
            "--seed", "5", "--impl", "reference", "--quiet", "--out", str(out), "--test"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "-m", "dcamkd.cli", *argv]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                       cwd=str(Path(__file__).resolve().parents[1]))
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    assert r.stdout.count("trained 3 steps") == 1  # rank 0 reports, rank 1 stays quiet
    # --test: each rank scores its shard of the test set, rank 0 alone writes and prints
    assert r.stdout.count("| **mean** |") == 1
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == WORLD and res["per_category"]["alpha"]["images_per_rank"] == [1, 1]
    log = json.loads((out / "log.json").read_text())
    assert log["world_size"] == WORLD and log["steps_per_epoch"] == 2  # 6 images padded to 6: 4 + 2
    assert [e["step"] for e in log["epochs"]] == [2, 3]
    ck = load_checkpoint(out / "last.pt")
    assert ck["step"] == STEPS

    cfg = preset_config("dcam", data=str(root), backbone="tf_efficientnet_lite0", image_size=64,
                        batch_size=B, steps=STEPS, lr=0.05, seed=5, impl="reference", num_threads=1)
    torch.manual_seed(0)
    old_threads = torch.get_num_threads()
    try:
        with ops.use(cfg.impl):  # the setting the command line applied
            ref, val_scores = _reference(cfg, tmp_path / "ref")
    finally:
        torch.set_num_threads(old_threads)
    worst = 0.0
    for k, v in ref.student.state_dict().items():
        worst = max(worst, (ck["student"][k].double() - v.double()).abs().max().item())
    for k, v in ref.dcam.state_dict().items():
        worst = max(worst, (ck["dcam"][k].double() - v.double()).abs().max().item())
    assert worst <= 1e-5, worst
    # the weights moved: the match is not between two initial states
    init = Trainer(cfg, tmp_path / "init", progress=False).student.state_dict()
    assert max((init[k].double() - v.double()).abs().max().item()
               for k, v in ref.student.state_dict().items() if v.is_floating_point()) > 1e-3
    # validation was sharded over the ranks and summed: it equals the single-process score
    assert [e["val_score"] for e in log["epochs"]] == pytest.approx(val_scores, rel=1e-5, abs=0)


def test_world_size_without_torchrun_is_an_error(make_tree, tmp_path, monkeypatch):
    root = make_tree(categories=("alpha",), n_train=4, n_test_good=1, n_defect=1, size=32)
    cfg = preset_config("stfpm", data=str(root), backbone="resnet18", teacher_weights=None, image_size=32,
                        batch_size=3, steps=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(InvalidArgumentError, match="RANK.*torchrun"):
        Trainer(cfg, tmp_path / "o", progress=False)
