"""The checkpoint format: reading, validating, updating, and rebuilding the inference model.

Inference (``test``, ``predict``, ``export``, ``calibrate``, :class:`dcamkd.Detector`) reads
checkpoints through this module and never imports the trainer; the trainer writes them with
the keys below.

A checkpoint is a ``torch.save`` dict with:

* ``kind``: ``'dcamkd-checkpoint'``; ``format_version``: :data:`CHECKPOINT_FORMAT`;
  ``dcamkd_version``;
* ``config``: the :class:`~dcamkd.config.TrainConfig` as a dict; ``image_size``, ``mean``,
  ``std``: the input size (pixels) and normalisation (RGB, values in [0, 1]);
* ``teacher``, ``student``, ``dcam`` (or None): state dicts;
* ``step``, ``epoch``, ``best_val``: where the weights were taken; ``mine_progress``: the
  mining ramp's progress at ``step`` (written since hard mining exists; derived from ``step``);
* ``split`` (format 2): the training/validation split as :func:`dcamkd.data.build_datasets`
  returns it: ``root`` (absolute), ``categories`` (the categories trained on), ``train`` and
  ``val`` (image paths relative to ``root``; ``val`` are the held-out good images) and
  ``counts``;
* ``calibration`` (format 2, once calibrated): see :mod:`dcamkd.calibration`; it holds the
  scoring settings the thresholds were made with, which then are the checkpoint's scoring
  settings;
* ``last.pt`` only: ``optimizer``, ``rng``, ``shuffle_gen``, ``pass_position``, ``log``.

Format 1 (before the split and calibration were recorded) is still read; such a checkpoint
needs ``dcamkd calibrate --good DIR`` before it can make decisions.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from ._version import __version__
from .config import DCAM_AT_INFERENCE, TrainConfig
from .objective import MINE_SETTINGS
from .dcam import DCAM
from .errors import CheckpointError, InvalidArgumentError, MissingFileError
from .io import atomic_torch_save
from .models import backbone_spec, build_student, build_teacher
from .precision import check_precision, compile_module
from .scoring import AnomalyModel, ScoringSettings

__all__ = [
    "CHECKPOINT_KIND",
    "CHECKPOINT_FORMAT",
    "READABLE_FORMATS",
    "load_checkpoint",
    "save_checkpoint",
    "build_networks",
    "scoring_settings",
    "resolve_scoring",
    "trained_categories",
    "model_from_checkpoint",
]

CHECKPOINT_KIND = "dcamkd-checkpoint"
#: Format version written. 2 added ``split`` and ``calibration``.
CHECKPOINT_FORMAT = 2
#: Format versions read.
READABLE_FORMATS = (1, 2)


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, Any]:
    """Read and validate a dcamkd checkpoint.

    Raises:
        MissingFileError: no such file.
        CheckpointError: truncated/unreadable file, not a dcamkd checkpoint, another format
            version, or an unknown backbone.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint: no such file: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path}: cannot be read ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"the file is truncated or not a torch file"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"checkpoint {path}: not a dcamkd checkpoint (no 'kind': '{CHECKPOINT_KIND}')")
    fmt = ckpt.get("format_version")
    if fmt not in READABLE_FORMATS:
        raise CheckpointError(
            f"checkpoint {path}: format version {fmt}, this dcamkd {__version__} reads version "
            f"{' or '.join(map(str, READABLE_FORMATS))}"
        )
    backbone = ckpt.get("config", {}).get("backbone")
    try:
        backbone_spec(backbone)
    except InvalidArgumentError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from e
    _drop_ignored_settings(ckpt.get("config", {}))
    _fill_older_scoring(ckpt.get("config", {}))
    return ckpt


def _fill_older_scoring(cfg: dict[str, Any]) -> None:
    """Checkpoints written before the image-score rule was recorded scored with the map's
    maximum: fill the missing scoring keys with :class:`ScoringSettings`' own defaults (no blur,
    maximum), not with today's preset scoring, so that they keep their meaning."""
    for name, value in ScoringSettings().to_dict().items():
        cfg.setdefault(name, value)


def _drop_ignored_settings(cfg: dict[str, Any]) -> None:
    """Reset, in place, the settings that had no effect in the run and that configurations now
    refuse (mining parameters without mining, a gate floor or ``keep`` without DCAM), so that
    checkpoints written before the refusal still load and mean what they did."""
    obj = cfg.get("objective") if isinstance(cfg.get("objective"), dict) else cfg
    if obj.get("mine", "none") == "none":
        for name in MINE_SETTINGS:
            if name in obj:
                obj[name] = None
    if cfg.get("dcam") == "none":
        if "dcam_gate_floor" in cfg:
            cfg["dcam_gate_floor"] = 0.0
        if "dcam_at_inference" in cfg:
            cfg["dcam_at_inference"] = DCAM_AT_INFERENCE[0]


def save_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a checkpoint dict atomically (the format version written is
    :data:`CHECKPOINT_FORMAT`)."""
    ckpt["format_version"] = CHECKPOINT_FORMAT
    return atomic_torch_save(ckpt, path)


def build_networks(cfg: TrainConfig, teacher_state: Optional[dict] = None):
    """``(teacher, student, dcam or None)`` of a configuration: the teacher from
    ``teacher_state`` when given, else from ``cfg.teacher_weights``; a random student."""
    spec = backbone_spec(cfg.backbone)
    if teacher_state is not None:
        teacher = build_teacher(cfg.backbone, weights=None)
        teacher.load_state_dict(teacher_state)
    else:
        teacher = build_teacher(cfg.backbone, weights=cfg.teacher_weights)
    student = build_student(cfg.backbone)
    dcam = DCAM(spec.channels, cfg.dcam, cfg.dcam_reduction, cfg.dcam_kernel, cfg.dcam_gate_floor) if cfg.dcam != "none" else None
    return teacher, student, dcam


def scoring_settings(ckpt: dict[str, Any]) -> ScoringSettings:
    """The checkpoint's scoring settings: those of its calibration when it has one, else those
    of its training configuration."""
    cal = ckpt.get("calibration")
    if cal:
        return ScoringSettings.from_dict(cal["settings"])
    return TrainConfig.from_dict(ckpt["config"]).scoring_settings()


def resolve_scoring(ckpt: dict[str, Any], source: str = "CKPT", **overrides: Any) -> ScoringSettings:
    """The scoring settings to use: the checkpoint's, with ``overrides`` (``fusion``, ``sigma``,
    ``image_score``, ``topk_fraction``; None = keep) applied only to an uncalibrated checkpoint.

    A calibrated threshold holds only for the settings it was made with, so an override that
    differs from a calibrated checkpoint's settings is refused.

    Raises:
        InvalidArgumentError: such an override (the message says which ``dcamkd calibrate``
            command makes it valid), or an invalid value.
    """
    base = scoring_settings(ckpt)
    given = {k: v for k, v in overrides.items() if v is not None}
    wanted = ScoringSettings.from_dict({**base.to_dict(), **given})
    if ckpt.get("calibration") and wanted != base:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items())
        raise InvalidArgumentError(
            f"checkpoint {source} was calibrated with {base.describe()}; {flags} would make its "
            f"thresholds meaningless. Recalibrate with these settings first: dcamkd calibrate "
            f"--checkpoint {source} {flags}")
    return wanted


def trained_categories(ckpt: dict[str, Any]) -> Optional[list[str]]:
    """The categories the checkpoint was trained on (None for a format-1 checkpoint)."""
    split = ckpt.get("split")
    return list(split["categories"]) if split else None


def model_from_checkpoint(
    ckpt: dict[str, Any] | str | os.PathLike, device: str = "cpu",
    fusion: Optional[str] = None, sigma: Optional[float] = None, image_score: Optional[str] = None,
    topk_fraction: Optional[float] = None, precision: Optional[str] = None, compile: Optional[bool] = None,
) -> tuple[AnomalyModel, TrainConfig]:
    """Build the inference :class:`AnomalyModel` (eval mode, on ``device``) from a checkpoint
    (a dict from :func:`load_checkpoint` or a path).

    The scoring settings are :func:`scoring_settings` of the checkpoint; ``fusion``, ``sigma``,
    ``image_score`` and ``topk_fraction`` override them (the caller checks that an override is
    allowed: :func:`resolve_scoring`).

    ``precision`` (:data:`dcamkd.config.PRECISIONS`) defaults to the calibration's (the
    precision its thresholds were computed in), else the training configuration's; another one
    warns on a calibrated checkpoint. Either precision scores any checkpoint (the weights are
    float32). ``compile`` defaults to the training configuration's. ``compile`` compiles teacher and student in place
    (:func:`dcamkd.precision.compile_module`; the first forward pays the compilation).

    Raises:
        CheckpointError: the weights do not fit the recorded backbone.
        InvalidArgumentError: an invalid scoring setting or precision.
    """
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    cfg = TrainConfig.from_dict(ckpt["config"])
    base = scoring_settings(ckpt).to_dict()
    given = dict(fusion=fusion, sigma=sigma, image_score=image_score, topk_fraction=topk_fraction)
    st = ScoringSettings.from_dict({**base, **{k: v for k, v in given.items() if v is not None}})
    try:
        teacher, student, dcam = build_networks(cfg, teacher_state=ckpt["teacher"])
        student.load_state_dict(ckpt["student"])
        if dcam is not None and ckpt.get("dcam") is not None:
            dcam.load_state_dict(ckpt["dcam"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(
            f"checkpoint weights do not fit backbone {cfg.backbone!r}: {str(e).splitlines()[0]}"
        ) from e
    keep = dcam if cfg.dcam_at_inference == "keep" else None
    calibrated_in = (ckpt.get("calibration") or {}).get("precision")
    if precision is None:
        precision = calibrated_in or cfg.precision
    elif calibrated_in is not None and check_precision(precision) != calibrated_in:
        warnings.warn(f"the thresholds were calibrated in {calibrated_in} and scoring runs in {precision}: scores "
                      f"move by about 1 % between the two; recalibrate with --precision {precision}", stacklevel=2)
    model = AnomalyModel(
        teacher, student, st.fusion, st.sigma, keep,
        image_score=st.image_score, topk_fraction=st.topk_fraction,
        precision=precision,
    )
    model = model.to(device).eval()
    if cfg.channels_last:
        teacher.to(memory_format=torch.channels_last)
        student.to(memory_format=torch.channels_last)
    if cfg.compile if compile is None else compile:
        compile_module(teacher)
        compile_module(student)
    return model, cfg
