"""The trainer: multi-class teacher/student distillation with optional DCAM (method.md
section 6), checkpoints, validation and the JSON log.

Training pools the good training images of every category, holds out a seeded, per-category
20 % as validation, and after each epoch computes the validation score (mean over validation
images of the mean of each anomaly map); the checkpoint with the lowest score is ``best.pt``,
the latest ``last.pt`` (with optimiser and RNG state, for ``--resume``). Both are written
atomically and hold everything needed to score: config, backbone, teacher and student weights,
input size and normalisation, and the split (:mod:`dcamkd.checkpoint` defines the format). At the
end of training both are calibrated on the held-out good images (:mod:`dcamkd.calibration`).
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ._version import __version__
from . import distributed as D
from . import ops
from .checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_KIND, build_networks, load_checkpoint, model_from_checkpoint,
                         save_checkpoint)
from .config import TRAIN_FLAGS, TRAIN_NEGATED_FLAGS, TRAIN_OPTIONLESS, TrainConfig
from .device import check_device
from .errors import CheckpointError, InvalidArgumentError, NonFiniteError
from .io import atomic_torch_save, atomic_write_json
from .losses import DistillationLoss
from .models import backbone_spec
from .objective import PRESETS, Objective
from .precision import autocast, compile_module, to_precision
from .scoring import anomaly_map

__all__ = ["Trainer", "train", "seed_everything"]

#: Format version of log.json.
LOG_FORMAT = 1


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _same_folder(data, root) -> bool:
    """Whether the data path ``data`` (relative to the current folder, or absolute) names the
    folder ``root`` a run was trained on (its resolved path, recorded in the split)."""
    if not isinstance(data, (str, os.PathLike)) or not isinstance(root, (str, os.PathLike)):
        return False
    try:
        return Path(data).resolve(strict=True) == Path(root).resolve(strict=True)
    except OSError:
        return False


def _rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


@dataclass
class _Features:
    """Cached teacher pyramids of a fixed dataset, indexed by dataset position."""

    levels: list[Tensor]

    def batch(self, idx: Tensor, device) -> list[Tensor]:
        return [lv.index_select(0, idx).to(device, non_blocking=True) for lv in self.levels]


def _say(msg: str, progress: bool) -> None:
    """One status line: through tqdm when a bar is shown, else plain stdout."""
    if progress:
        from tqdm import tqdm

        tqdm.write(msg)
    else:
        print(msg, flush=True)


class _Distilled(nn.Module):
    """The trained modules (student and DCAM side branch) as one module, so that one
    ``DistributedDataParallel`` wrapper averages the gradients of both.

    ``forward(x)``: ``(B, 3, H, W)`` -> ``(student maps, channel gates, spatial gates)``; the gate
    lists are None without DCAM.
    """

    def __init__(self, student: nn.Module, dcam: Optional[nn.Module]):
        super().__init__()
        self.student, self.dcam = student, dcam

    def forward(self, x: Tensor):
        s = self.student(x)
        cg = sg = None
        if self.dcam is not None:
            cg, sg = self.dcam(s)
        return s, cg, sg


_STALE_TEMPS = ("best.pt", "last.pt", "log.json", "split.json")
#: Settings that ``--resume`` may change: execution, budget, and what happens after training.
_RESUMABLE_CHANGES = ("device", "num_threads", "impl", "steps", "epochs", "diagnostics", "channels_last",
                      "false_alarm_rate", "precision", "compile")


def _resume_diff(cfg: dict[str, Any], ck_cfg: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{setting: (this run's value, the checkpoint's)}`` for the settings that must match to
    resume: not those :data:`_RESUMABLE_CHANGES` lists, not ``preset`` (a name for the rest), and
    the objective field by field, only when the two objectives give different losses (a setting
    the loss ignores, such as ``tau`` without a KL term, does not block)."""
    diff = {k: (v, ck_cfg.get(k)) for k, v in cfg.items()
            if k not in _RESUMABLE_CHANGES and k != "preset" and ck_cfg.get(k) != v}
    new, old = diff.get("objective", (None, None))
    if isinstance(new, dict) and isinstance(old, dict):
        del diff["objective"]
        if not Objective.from_dict(new).same_loss(Objective.from_dict(old)):
            diff.update({k: (new.get(k), old.get(k)) for k in sorted(set(new) | set(old))
                         if new.get(k) != old.get(k)})
    return diff


def _resume_hint(diff: dict[str, tuple[Any, Any]], preset: Optional[str] = None) -> str:
    """How to give a resumed run the checkpoint's settings (e.g. a preset's scoring that changed
    since the run started): ``--preset`` first when it was made with another preset, the options
    of ``dcamkd train`` that set them, and the settings no option sets; a sentence to end an
    error with, empty when there is nothing to say."""
    parts, rest = ([f"--preset {preset}"] if preset else []), []
    for k, (new, old) in diff.items():
        if k == "data":
            continue
        flag = f"--{k.replace('_', '-')}"
        if k in TRAIN_NEGATED_FLAGS and isinstance(old, bool):
            parts.append(f"(leave out {TRAIN_NEGATED_FLAGS[k]})" if old else TRAIN_NEGATED_FLAGS[k])
        elif k in TRAIN_FLAGS and isinstance(old, bool):
            parts.append(flag if old else f"(leave out {flag})")
        elif k in TRAIN_OPTIONLESS or k in TRAIN_FLAGS or isinstance(old, bool) or old is None:
            rest.append(f"{k}={old!r}")
        elif isinstance(old, (str, int, float)):
            parts.append(f"{flag} {old}")
        elif isinstance(old, (list, tuple)) and old:
            parts.append(f"{flag} {','.join(str(x) for x in old)}")
        else:
            rest.append(f"{k}={old!r}")
    hint = f"; to continue it as it was made, pass {' '.join(parts)} (in a grid: set them in its cell)" if parts else ""
    if rest:
        hint += (f"; it was also made with {', '.join(rest)}, which no option of 'dcamkd train' sets: "
                 "train into a new --out instead")
    return hint


class Trainer:
    """Runs one training job described by a :class:`TrainConfig` into ``out_dir``.

    Files written (atomically): ``best.pt``, ``last.pt``, ``log.json`` (config, split sizes,
    per-epoch losses per term and level, validation score, times), ``split.json`` (the
    train/validation file lists). Temporary files left by a killed writer (``.last.pt.*.tmp``...)
    are removed at start.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the trainer joins the process group and trains with
    DistributedDataParallel; ``batch_size`` is the global batch, split evenly over the ranks
    (it must be a multiple of the world size); files and progress output come from rank 0 only.
    See :mod:`dcamkd.distributed`.

    Precision and compilation (:mod:`dcamkd.precision`): with ``precision='bf16'`` the teacher
    forward (cached teacher levels are stored in bfloat16), the student and DCAM forwards of a
    step, and validation run under bfloat16 autocast; the loss accumulates in float32 and the
    weights, the optimiser state and the checkpoints stay float32. With ``compile`` the student
    is compiled in place; ``log.json`` then records ``compile``: the first and second step times
    and their difference ``compile_seconds`` (the compilation of the training graphs).
    """

    def __init__(self, cfg: TrainConfig, out_dir: str | os.PathLike, progress: bool = True):
        from .data import build_datasets, write_split

        self.cfg = cfg.validate()
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        check_device(cfg.device, "device")
        self.distributed, device = D.setup(cfg.device)
        self.rank, self.world = D.rank(), D.world_size()
        self.main = self.rank == 0
        self.progress = progress and self.main
        if cfg.batch_size % self.world:
            raise InvalidArgumentError(
                f"batch_size: the global batch of {cfg.batch_size} images must be a multiple of the "
                f"{self.world} processes")
        self.device = torch.device(device)
        if self.main:
            for p in self.out.iterdir():
                if p.name.endswith(".tmp") and any(p.name.startswith(f".{n}.") for n in _STALE_TEMPS):
                    p.unlink(missing_ok=True)
        seed_everything(cfg.seed)
        spec = backbone_spec(cfg.backbone)
        self.train_ds, self.val_ds, _, split = build_datasets(
            cfg.data, cfg.categories, cfg.image_size, spec.mean, spec.std, cfg.val_fraction, cfg.seed
        )
        self.train_ds.preload()
        self.val_ds.preload()
        self.split = split
        if self.main:
            write_split(split, self.out / "split.json")
        self.teacher, self.student, self.dcam = build_networks(cfg)
        self.teacher.to(self.device)
        self.student.to(self.device)
        if cfg.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
            self.student.to(memory_format=torch.channels_last)
        if cfg.compile:
            compile_module(self.student)
        params = list(self.student.parameters())
        if self.dcam is not None:
            self.dcam.to(self.device)
            params += list(self.dcam.parameters())
        self.net: nn.Module = _Distilled(self.student, self.dcam)
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.loss_fn = DistillationLoss(cfg.objective)
        n_padded = len(self.train_ds) + (-len(self.train_ds)) % self.world
        self.steps_per_epoch = math.ceil(n_padded / cfg.batch_size)
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * self.steps_per_epoch
        self.step = 0
        self.epoch = 0
        self.best_val = math.inf
        self.log: dict[str, Any] = {
            "format_version": LOG_FORMAT,
            "dcamkd_version": __version__,
            "config": cfg.to_dict(),
            "n_train": len(self.train_ds),
            "n_val": len(self.val_ds),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "epochs": [],
        }
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed)
        self._perm: Optional[Tensor] = None  # permutation of the current pass and position in it
        self._pos = 0
        self._train_feats: Optional[_Features] = None
        self._val_feats: Optional[_Features] = None

    # ------------------------------------------------------------------ data
    def _stack(self, ds, indices) -> Tensor:
        return torch.stack([ds[int(i)]["image"] for i in indices])

    @torch.no_grad()
    def _teacher_features(self, ds) -> _Features:
        levels: list[list[Tensor]] = []
        bs = max(1, self.cfg.batch_size)
        for start in range(0, len(ds), bs):
            x = self._stack(ds, range(start, min(len(ds), start + bs))).to(self.device)
            with autocast(self.cfg.precision, self.device):
                feats = self.teacher(x)
            for i, f in enumerate(to_precision(feats, self.cfg.precision)):
                if len(levels) <= i:
                    levels.append([])
                levels[i].append(f.cpu() if self.device.type == "cpu" else f)
        return _Features([torch.cat(lv) for lv in levels])

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, with_optimizer: bool) -> dict[str, Any]:
        spec = backbone_spec(self.cfg.backbone)
        ck = {
            "kind": CHECKPOINT_KIND,
            "format_version": CHECKPOINT_FORMAT,
            "dcamkd_version": __version__,
            "config": self.cfg.to_dict(),
            "image_size": self.cfg.image_size,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "teacher": self.teacher.state_dict(),
            "student": self.student.state_dict(),
            "dcam": self.dcam.state_dict() if self.dcam is not None else None,
            "step": self.step,
            "mine_progress": self.cfg.objective.mining_progress(self.step),
            "epoch": self.epoch,
            "best_val": self.best_val,
            "split": self.split,
        }
        if with_optimizer:
            ck["optimizer"] = self.optimizer.state_dict()
            ck["rng"] = _rng_state()
            ck["shuffle_gen"] = self.shuffle_gen.get_state()
            ck["pass_position"] = (self._perm, self._pos)
            ck["log"] = self.log
        return ck

    def resume(self, path: Optional[str | os.PathLike] = None) -> None:
        """Continue from ``last.pt`` (or ``path``): weights, optimiser, RNG, step, log.

        Raises :class:`CheckpointError` if the checkpoint has no training state or was made
        with another configuration.
        """
        path = Path(path) if path is not None else self.out / "last.pt"
        ck = load_checkpoint(path)
        if "optimizer" not in ck:
            raise CheckpointError(f"checkpoint {path}: holds no optimiser state; resume from last.pt")
        diff = _resume_diff(self.cfg.to_dict(), ck["config"])
        if "data" in diff and _same_folder(self.cfg.data, ck.get("split", {}).get("root")):
            del diff["data"]  # the folder it was trained on (its resolved path), named another way
        if diff:
            made = ck["config"].get("preset")  # a preset it was made with, when this run names another
            preset = made if made in PRESETS and made != self.cfg.preset else None
            raise CheckpointError(f"checkpoint {path}: made with another configuration "
                                  f"(this run, checkpoint): {diff}{_resume_hint(diff, preset)}")
        self.student.load_state_dict(ck["student"])
        if self.dcam is not None:
            self.dcam.load_state_dict(ck["dcam"])
        self.optimizer.load_state_dict(ck["optimizer"])
        _set_rng_state(ck["rng"])
        self.shuffle_gen.set_state(ck["shuffle_gen"])
        self._perm, self._pos = ck.get("pass_position", (None, 0))
        self.step, self.epoch, self.best_val = ck["step"], ck["epoch"], ck["best_val"]
        self.log["epochs"] = ck["log"]["epochs"]

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation scores on the good validation images (method.md section 6).

        Returns ``{'val_score': ...}``: the mean over validation images of the mean of the
        anomaly map that scoring uses (lower is better; selects ``best.pt``). With DCAM it also
        holds ``val_raw`` and ``val_gated``: the same mean for the raw student ``S`` and for the
        gated student ``a * S`` (method.md section 3: the loss pulls the gated student to the
        teacher, so the raw one can drift).
        """
        self.student.eval()
        if self.dcam is not None:
            self.dcam.eval()
        D.broadcast_buffers(self.student)  # rank 0's running statistics on every rank
        D.broadcast_buffers(self.dcam)
        sums = {"raw": 0.0, "gated": 0.0}
        n = 0
        bs = max(1, self.cfg.batch_size // self.world)
        size = (self.cfg.image_size,) * 2
        mine = torch.arange(len(self.val_ds))[self.rank::self.world]  # this rank's shard
        for start in range(0, len(mine), bs):
            idx = mine[start:start + bs]
            x = self._stack(self.val_ds, idx).to(self.device)
            prec = self.cfg.precision
            with autocast(prec, self.device):
                t = self._val_feats.batch(idx, self.device) if self._val_feats is not None else self.teacher(x)
                s = self.student(x)
                g = self.dcam.attend(s) if self.dcam is not None else None
            t, s = to_precision(t, prec), to_precision(s, prec)
            m = anomaly_map(t, s, size, self.cfg.fusion, self.cfg.sigma)
            sums["raw"] += m.flatten(1).mean(dim=1).sum().item()
            if g is not None:
                m = anomaly_map(t, to_precision(g, prec), size, self.cfg.fusion, self.cfg.sigma)
                sums["gated"] += m.flatten(1).mean(dim=1).sum().item()
            n += x.shape[0]
        self.student.train()
        if self.dcam is not None:
            self.dcam.train()
        sums["raw"], sums["gated"], n = D.all_reduce_sum([sums["raw"], sums["gated"], n], self.device)
        n = max(n, 1)
        if self.dcam is None:
            return {"val_score": sums["raw"] / n}
        out = {"val_raw": sums["raw"] / n, "val_gated": sums["gated"] / n}
        out["val_score"] = out["val_gated"] if self.cfg.dcam_at_inference == "keep" else out["val_raw"]
        return out

    def diagnose(self, x: Tensor, t: list[Tensor]) -> dict[str, Any]:
        """Diagnostics on one fixed training batch (the ablation's diagnostics): each term's gradient norm on the
        student parameters, their share and cosine, and DCAM gate statistics per level (mean,
        standard deviation, fraction below 0.05 and above 0.95)."""
        was_training = self.student.training
        saved = {k: v.clone() for k, v in self.student.named_buffers()}  # BN statistics stay untouched
        cg = sg = None
        with autocast(self.cfg.precision, self.device):
            # the eager forward even of a compiled student: the retained graph of the per-term
            # gradients below is refused by compiled backward graphs (donated buffers)
            s = self.student.forward(x)
            if self.dcam is not None:
                cg, sg = self.dcam(s)
        t, s = to_precision(t, self.cfg.precision), to_precision(s, self.cfg.precision)
        terms = self.loss_fn.terms(t, s, cg, sg, self.mining_progress())  # mined as in training
        lam = [self.cfg.objective.lambda_cos, self.cfg.objective.lambda_kl]
        w = self.cfg.objective.level_weights or [1.0] * terms.shape[0]
        params = [p for p in self.student.parameters() if p.requires_grad]
        out: dict[str, Any] = {}
        grads = {}
        for j, name in enumerate(("cos", "kl")):
            part = sum(w[i] * lam[j] * terms[i, j] for i in range(terms.shape[0]))
            if not isinstance(part, Tensor) or not part.requires_grad or lam[j] == 0:
                continue
            g = torch.autograd.grad(part, params, retain_graph=True, allow_unused=True)
            grads[name] = torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten()
                                     for gi, p in zip(g, params)])
            out[f"grad_norm_{name}"] = grads[name].norm().item()
        if len(grads) == 2:
            a, b = grads["cos"], grads["kl"]
            out["grad_share_kl"] = out["grad_norm_kl"] / max(out["grad_norm_kl"] + out["grad_norm_cos"], 1e-30)
            out["grad_cosine_cos_kl"] = (a @ b).item() / max(a.norm().item() * b.norm().item(), 1e-30)
        for kind, gates in (("channel_gate", cg), ("spatial_gate", sg)):
            if gates is None or all(g is None for g in gates):
                continue
            stats = []
            for g in gates:
                g = g.detach().float()
                stats.append({"mean": g.mean().item(), "std": g.std().item(),
                              "frac_lt_0.05": (g < 0.05).float().mean().item(),
                              "frac_gt_0.95": (g > 0.95).float().mean().item()})
            out[kind] = stats
        with torch.no_grad():
            for k, v in self.student.named_buffers():
                v.copy_(saved[k])
        self.student.train(was_training)
        return out

    # ------------------------------------------------------------------ calibration
    def calibrate(self) -> dict[str, Any]:
        """Calibrate ``best.pt`` and ``last.pt`` on the held-out good validation images of every
        category (images the student never trained on; test images never enter), each with its
        own weights, and rewrite both files with their ``calibration``. Rank 0 only.

        Returns:
            ``(calibration of best.pt, None)`` (see :mod:`dcamkd.calibration`), or ``(None,
            reason)`` when no calibration can be made (fewer than two held-out images, or all
            scores tied): training still succeeds, and ``dcamkd calibrate --good DIR`` adds one.
        """
        from .calibration import build_calibration, score_images

        settings = self.cfg.scoring_settings()
        source = {"kind": "validation", "root": self.split["root"], "images": list(self.split["val"])}
        result = None
        for name in ("last.pt", "best.pt"):
            path = self.out / name
            ck = load_checkpoint(path)
            model, _ = model_from_checkpoint({**ck, "calibration": None}, str(self.device))
            scores = score_images(model, self.val_ds, str(self.device), max(1, self.cfg.batch_size))
            try:
                ck["calibration"] = build_calibration(
                    scores, [s.category for s in self.val_ds.samples], self.cfg.false_alarm_rate, settings,
                    source, self.split["categories"], model.precision)
            except InvalidArgumentError as e:
                return None, (f"{e}; the checkpoints are not calibrated: run dcamkd calibrate --checkpoint "
                              f"{self.out / 'best.pt'} --good DIR")
            save_checkpoint(ck, path)
            result = ck["calibration"]
        return result, None

    # ------------------------------------------------------------------ training
    def train_step(self, x: Tensor, t: list[Tensor]) -> Tensor:
        """One optimiser step on a batch ``x`` ``(B, 3, S, S)`` with teacher maps ``t``; returns
        the detached ``(L, 2)`` loss terms. Under DDP ``x`` is this rank's micro-batch and the
        gradients are averaged over ranks. With ``precision='bf16'`` the forward runs under
        bfloat16 autocast and both pyramids enter the loss as bfloat16 (float32 accumulation)."""
        with autocast(self.cfg.precision, x.device):
            s, cg, sg = self.net(x)
        t, s = to_precision(t, self.cfg.precision), to_precision(s, self.cfg.precision)
        terms = self.loss_fn.terms(t, s, cg, sg, self.mining_progress())
        loss = self.loss_fn.combine(terms)
        finite = bool(torch.isfinite(loss))
        if self.distributed:  # every rank raises together, none waits forever in the all-reduce
            finite = D.all_reduce_sum([0.0 if finite else 1.0], self.device)[0] == 0.0
        if not finite:
            raise NonFiniteError(
                f"training loss became {loss.item()} at step {self.step + 1}"
                f"{f' (rank {self.rank} or another)' if self.distributed else ''}; "
                f"per-level terms [cos, kl]: "
                f"{terms.detach().tolist()}. Lower --lr or set --grad-clip"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.optimizer.step()
        return terms.detach()

    def mining_progress(self) -> Tensor:
        """The mining ramp's progress for the next step, ``min(step / ramp_steps, 1)`` (see
        :meth:`dcamkd.objective.Objective.mining_progress`), as a 0-dim float64 tensor on the
        training device: a tensor, so a compiled loss does not recompile as it changes. It is a
        function of :attr:`step`, which checkpoints save, so a resumed run continues the ramp
        where it stopped (checkpoints also record it as ``mine_progress``)."""
        return torch.tensor(self.cfg.objective.mining_progress(self.step), dtype=torch.float64,
                            device=self.device)

    def run(self) -> dict[str, Any]:
        """Train to the step budget; returns the log. Validation and checkpoints every epoch."""
        from tqdm import tqdm

        cfg = self.cfg
        if cfg.cache_teacher:
            self._train_feats = self._teacher_features(self.train_ds)
            self._val_feats = self._teacher_features(self.val_ds)
        self.student.train()
        if self.dcam is not None:
            self.dcam.train()
        self._diag_batch = None
        if cfg.diagnostics and self.main:
            idx = torch.arange(min(len(self.train_ds), cfg.batch_size))
            t = (self._train_feats.batch(idx, self.device) if self._train_feats is not None
                 else self.teacher(self._stack(self.train_ds, idx).to(self.device)))
            self._diag_batch = (self._stack(self.train_ds, idx).to(self.device), t)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, desc="train",
                   dynamic_ncols=True)
        n = len(self.train_ds)
        step_times: list[float] = []  # the first two steps' times, with compile
        while self.step < self.total_steps:
            t0 = time.time()
            if self._perm is None:  # a new pass; else continue a pass cut by the step budget
                self._perm = torch.randperm(n, generator=self.shuffle_gen)
                self._pos = 0
            perm = self._perm
            if self.world > 1:
                perm = D.pad_permutation(perm, self.world)
            sums: Optional[Tensor] = None
            count = 0
            for start in range(self._pos, len(perm), cfg.batch_size):
                if self.step >= self.total_steps:
                    break
                self._pos = min(start + cfg.batch_size, len(perm))
                idx = perm[start:start + cfg.batch_size]
                if self.world > 1:
                    idx = D.shard_batch(idx, self.rank, self.world)
                x = self._stack(self.train_ds, idx).to(self.device)
                if self._train_feats is not None:
                    t = self._train_feats.batch(idx, self.device)
                else:
                    with torch.no_grad(), autocast(cfg.precision, self.device):
                        t = self.teacher(x)
                t_step = time.perf_counter()
                terms = self.train_step(x, t).cpu().double()
                if cfg.compile and len(step_times) < 2:
                    step_times.append(time.perf_counter() - t_step)
                    if len(step_times) == 2:
                        self.log["compile"] = {"first_step_seconds": step_times[0],
                                               "second_step_seconds": step_times[1],
                                               "compile_seconds": step_times[0] - step_times[1]}
                        _say(f"compiled the student: first step {step_times[0]:.1f} s, second "
                             f"{step_times[1]:.2f} s (compilation about {step_times[0] - step_times[1]:.1f} s)",
                             self.progress)
                sums = terms if sums is None else sums + terms
                count += 1
                self.step += 1
                loss_val = self.loss_fn.combine(terms).item()
                bar.set_postfix(epoch=self.epoch + 1, loss=f"{loss_val:.4g}")
                bar.update(1)
            finished = self._pos >= len(perm)
            if finished:
                self.epoch += 1
                self._perm = None
            if self.world > 1 and sums is not None:  # per-rank means -> mean over ranks
                sums = torch.tensor(D.all_reduce_sum(sums.flatten().tolist(), self.device),
                                    dtype=torch.float64).view_as(sums) / self.world
            vals = self.validate()
            val = vals["val_score"]
            mean_terms = (sums / max(count, 1)) if sums is not None else None
            rec = {
                "epoch": self.epoch if finished else self.epoch + 1,
                "partial": not finished,
                "step": self.step,
                "loss": self.loss_fn.combine(mean_terms).item() if mean_terms is not None else None,
                "cos_terms": mean_terms[:, 0].tolist() if mean_terms is not None else None,
                "kl_terms": mean_terms[:, 1].tolist() if mean_terms is not None else None,
                **vals,
                "seconds": time.time() - t0,
            }
            if self._diag_batch is not None:
                rec["diagnostics"] = self.diagnose(*self._diag_batch)
            improved = val < self.best_val
            if improved:
                self.best_val = val
            rec["best"] = improved
            self.log["epochs"].append(rec)
            if not self.main:
                continue
            _say(f"epoch {self.epoch} step {self.step}/{self.total_steps}: loss {rec['loss']:.5g} "
                 f"val {val:.5g}{' (best)' if improved else ''} {rec['seconds']:.0f} s", self.progress)
            if improved:
                atomic_torch_save(self._checkpoint(with_optimizer=False), self.out / "best.pt")
            atomic_torch_save(self._checkpoint(with_optimizer=True), self.out / "last.pt")
            atomic_write_json(self.out / "log.json", self.log)
        bar.close()
        return self.log


def train(cfg: TrainConfig, out_dir: str | os.PathLike, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg`` into ``out_dir`` (resuming from ``out_dir/last.pt`` when ``resume``), then
    calibrate ``best.pt`` and ``last.pt`` on the held-out good images (:meth:`Trainer.calibrate`);
    returns the log dict (with ``calibration``: alpha, settings and thresholds). See
    :class:`Trainer`."""
    if not resume and (Path(out_dir) / "last.pt").is_file():
        raise InvalidArgumentError(
            f"--out {out_dir} already holds a training run (last.pt): pass --resume to continue it, "
            f"or choose another --out"
        )
    tr = Trainer(cfg, out_dir, progress=progress)
    if resume:
        tr.resume()
    t0 = time.time()
    with ops.use(cfg.impl):
        log = tr.run()
    log["train_seconds_this_run"] = time.time() - t0
    if tr.world > 1:
        log["world_size"] = tr.world
    if tr.main:
        t1 = time.time()
        with ops.use(cfg.impl):
            cal, why = tr.calibrate()
        log["calibration_seconds"] = time.time() - t1
        log["calibration"] = ({k: cal[k] for k in ("alpha", "settings", "per_category", "pooled")} if cal
                              else {"skipped": why})
        atomic_write_json(Path(out_dir) / "log.json", log)
    D.barrier()
    return log
