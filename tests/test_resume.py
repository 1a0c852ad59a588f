"""Nothing lost: a training subprocess killed with SIGKILL mid-epoch, and again while a checkpoint
is being written, then resumed with ``--resume``, ends with the weights of an uninterrupted run
(CPU, deterministic mode); no corrupt checkpoint is ever where a reader loads it.

The kills are made deterministic by a driver script that wraps the real CLI: it SIGKILLs its own
process after a given optimiser step (``step:N``), or after the temporary file of the K-th write
of a checkpoint was written and fsynced but before ``os.replace`` moves it into place
(``save:NAME:K``), which is the worst moment for an atomic writer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dcamkd.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    mode, argv = sys.argv[1], sys.argv[2:]
    import torch
    torch.set_num_threads(1)
    import dcamkd.train as T
    if mode.startswith("step:"):
        n = int(mode.split(":")[1])
        orig_step = T.Trainer.train_step
        def train_step(self, x, t):
            out = orig_step(self, x, t)
            if self.step + 1 == n:  # the optimiser step n is done; die before anything else
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        T.Trainer.train_step = train_step
    elif mode.startswith("save:"):
        _, name, k = mode.split(":")
        orig_replace, seen = os.replace, [0]
        def replace(src, dst):
            if os.path.basename(os.fspath(dst)) == name:
                seen[0] += 1
                if seen[0] == int(k):  # temp file written and fsynced, not yet renamed
                    os.kill(os.getpid(), signal.SIGKILL)
            return orig_replace(src, dst)
        os.replace = replace
    from dcamkd.cli import main
    sys.exit(main(argv))
    """
)


def _train(driver: Path, root: Path, out: Path, mode: str = "none", resume: bool = False):
    argv = ["train", "--data", str(root), "--backbone", "tf_efficientnet_lite0", "--preset", "dcam",
            "--image-size", "64", "--batch-size", "2", "--epochs", "3", "--lr", "0.05", "--seed", "3",
            "--deterministic", "--quiet", "--impl", "reference", "--out", str(out)]
    if resume:
        argv.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    return subprocess.run([sys.executable, str(driver), mode, *argv], env=env, capture_output=True,
                          text=True, timeout=300, cwd=str(Path(__file__).resolve().parents[1]))


def _weights(path: Path) -> dict:
    ck = load_checkpoint(path)
    out = {f"student.{k}": v for k, v in ck["student"].items()}
    out.update({f"dcam.{k}": v for k, v in (ck["dcam"] or {}).items()})
    for i, st in ck["optimizer"]["state"].items():
        out[f"momentum.{i}"] = st["momentum_buffer"]
    return out


def test_sigkill_mid_epoch_and_mid_save_then_resume_matches_uninterrupted(make_tree, tmp_path):
    root = make_tree(categories=("alpha",), n_train=8, n_test_good=1, n_defect=1, size=64)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)

    ref = _train(driver, root, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    ck_ref = load_checkpoint(tmp_path / "ref" / "last.pt")
    assert (ck_ref["epoch"], ck_ref["step"]) == (3, 9)  # 6 training images / batch 2 = 3 steps an epoch

    out = tmp_path / "run"
    # 1. SIGKILL after step 5: in the middle of epoch 2 (epoch 1 ended at step 3)
    r = _train(driver, root, out, "step:5")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    ck = load_checkpoint(out / "last.pt")
    assert (ck["epoch"], ck["step"]) == (1, 3)
    epoch1 = ck["student"]

    # 2. resume; SIGKILL while last.pt is written for the second time in this run (end of epoch 3)
    r = _train(driver, root, out, "save:last.pt:2", resume=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    temps = [p for p in out.iterdir() if p.name.startswith(".last.pt.") and p.name.endswith(".tmp")]
    assert len(temps) == 1 and temps[0].stat().st_size > 0  # killed with the new file not yet in place
    ck = load_checkpoint(out / "last.pt")  # the reader's file is intact: the epoch-2 checkpoint
    assert (ck["epoch"], ck["step"]) == (2, 6)
    load_checkpoint(out / "best.pt")
    log = json.loads((out / "log.json").read_text())
    assert log["format_version"] == 1 and log["epochs"][-1]["epoch"] >= 2

    # 3. resume to the end
    r = _train(driver, root, out, resume=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ck = load_checkpoint(out / "last.pt")
    assert (ck["epoch"], ck["step"]) == (3, 9)
    got, want = _weights(out / "last.pt"), _weights(tmp_path / "ref" / "last.pt")
    assert got.keys() == want.keys() and len(got) > 50
    worst = max((got[k].double() - want[k].double()).abs().max().item() for k in want)
    assert worst <= 1e-6, worst
    assert [e["loss"] for e in ck["log"]["epochs"]] == pytest.approx(
        [e["loss"] for e in ck_ref["log"]["epochs"]], rel=0, abs=1e-9)
    assert ck["best_val"] == pytest.approx(ck_ref["best_val"], rel=0, abs=1e-9)
    # the weights did move after epoch 1, so the match is not between two idle states
    moved = max((ck["student"][k].double() - epoch1[k].double()).abs().max().item()
                for k in epoch1 if epoch1[k].is_floating_point())
    assert moved > 1e-4
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # stale temp files cleaned up
