"""Training configuration (method.md sections 3, 4 and 6).

The objective (loss settings) is one :class:`dcamkd.objective.Objective`, and the presets
(``stfpm``, ``dcam-paper``, ``dcam``, ``stfpm-kd``) are :data:`dcamkd.objective.PRESETS`: this module only
combines them with the DCAM, optimisation, scoring and execution settings. The defaults of
:class:`TrainConfig` are the ``dcam`` preset (:data:`dcamkd.objective.DEFAULT_PRESET`).

The allowed values of the scoring and export settings (:data:`FUSIONS`, :data:`IMAGE_SCORES`,
:data:`DCAM_AT_INFERENCE`, :data:`EXPORT_FORMATS`), the scoring settings as one object
(:class:`ScoringSettings`) and the default target false-alarm rate of the calibration
(:data:`DEFAULT_FALSE_ALARM_RATE`) are defined here; :mod:`dcamkd.scoring`,
:mod:`dcamkd.calibration` and :mod:`dcamkd.export` import them. Like :mod:`dcamkd.objective` and :mod:`dcamkd.backbones`, this
module does not import torch, so the command-line parser takes its choices and defaults from
it without loading torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Optional

from .backbones import BACKBONES, DEFAULT_BACKBONE
from .device import check_device_name
from .errors import InvalidArgumentError
from .impls import IMPLS
from .objective import (DCAM_VARIANTS, DEFAULT_PRESET, DEFAULT_TOPK_FRACTION, FUSIONS, IMAGE_SCORES,
                        OBJECTIVE_FIELDS, PRESETS, Objective, ScoringSettings, check_choice, check_gate_floor,
                        check_sigma,
                        get_preset)

__all__ = ["TrainConfig", "PRESETS", "FUSIONS", "IMAGE_SCORES", "DEFAULT_TOPK_FRACTION", "DEFAULT_FALSE_ALARM_RATE",
           "ScoringSettings", "check_sigma", "DCAM_AT_INFERENCE", "EXPORT_FORMATS", "MASK_MODES", "CUSTOM_PRESET",
           "preset_config", "PRECISIONS", "DEFAULT_PRECISION"]

#: Default target false-alarm rate on good images of a calibrated threshold. 5 % is the usual
#: inspection tolerance and the smallest round rate that the distribution-free threshold reaches
#: from 19 good calibration images (it needs ``n + 1 >= 1 / alpha``), which a 20 % hold-out gives
#: from about 95 good training images per category (:mod:`dcamkd.calibration`).
DEFAULT_FALSE_ALARM_RATE = 0.05
#: What scoring does with the DCAM side branch: ``drop`` it (raw student, STFPM's inference
#: network) or ``keep`` it (gated student); method.md section 3.
DCAM_AT_INFERENCE = ("drop", "keep")
#: The ``preset`` recorded for a configuration whose objective or DCAM variant differs from
#: every preset's.
CUSTOM_PRESET = "custom"
#: Formats of ``dcamkd export`` (:mod:`dcamkd.export`).
EXPORT_FORMATS = ("onnx",)
#: ``dcamkd predict --masks`` values besides a folder (:mod:`dcamkd.predict`).
MASK_MODES = ("auto", "none")
#: Compute precisions of the backbones (``--precision``; :mod:`dcamkd.precision` says what each
#: casts): ``fp32`` (float32 throughout) or ``bf16`` (teacher, student and DCAM forwards under
#: bfloat16 autocast; weights, loss accumulation, anomaly maps and checkpoints stay float32).
PRECISIONS = ("fp32", "bf16")
#: Precision of a run that does not choose one.
DEFAULT_PRECISION = PRECISIONS[0]


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in every checkpoint.

    Budget: ``steps`` optimiser steps if set, else ``epochs`` passes over the training split.
    Units: ``image_size`` in pixels (square input and evaluation resolution); ``sigma`` in
    pixels of the evaluation map. Scoring: ``fusion``, ``sigma``, ``image_score`` and
    ``topk_fraction`` (:class:`ScoringSettings`); ``false_alarm_rate``: the target of the
    calibration made at the end of training (:mod:`dcamkd.calibration`). The loss settings are
    one :class:`~dcamkd.objective.Objective`
    (``cfg.objective.tau``...); :func:`preset_config` also takes its fields as flat keywords.
    ``preset`` records where the objective and DCAM variant came from (a name of
    :data:`~dcamkd.objective.PRESETS`, or ``'custom'``).
    """

    data: str = ""
    categories: Optional[list[str]] = None
    preset: str = DEFAULT_PRESET
    backbone: str = DEFAULT_BACKBONE
    teacher_weights: Optional[str] = "imagenet"
    image_size: int = 256
    # DCAM side branch (method.md section 3)
    dcam: str = PRESETS[DEFAULT_PRESET].dcam
    dcam_reduction: int = 8
    dcam_kernel: int = 7
    dcam_at_inference: str = DCAM_AT_INFERENCE[0]
    # lower bound of every DCAM gate: gate = floor + (1 - floor) * sigmoid(.), so no gate closes
    dcam_gate_floor: float = 0.0
    # the loss (method.md section 4); frozen, validated when built
    objective: Objective = PRESETS[DEFAULT_PRESET].objective
    # optimisation (method.md section 6)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32
    epochs: int = 400
    steps: Optional[int] = None
    grad_clip: Optional[float] = None
    val_fraction: float = 0.2
    seed: int = 0
    # scoring (ScoringSettings) and the calibrated decision (dcamkd.calibration)
    fusion: str = PRESETS[DEFAULT_PRESET].scoring.fusion
    sigma: float = PRESETS[DEFAULT_PRESET].scoring.sigma
    image_score: str = PRESETS[DEFAULT_PRESET].scoring.image_score
    topk_fraction: float = PRESETS[DEFAULT_PRESET].scoring.topk_fraction
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE
    # execution
    device: str = "cpu"
    impl: Optional[str] = None  # implementation of the fused ops (dcamkd.impls.IMPLS); None: $DCAMKD_IMPL
    cache_teacher: bool = True
    deterministic: bool = False
    num_threads: Optional[int] = None
    diagnostics: bool = True
    # channels-last (NHWC) weights and activations for the backbones: same model, about 1.5x
    # faster convolutions on the CPU (oneDNN); numerics differ only by float rounding
    channels_last: bool = True
    # compute precision of the backbone forwards (PRECISIONS; dcamkd.precision); weights and
    # checkpoints stay float32 either way
    precision: str = DEFAULT_PRECISION
    # torch.compile the student (training) and teacher + student (inference); opt-in: the first
    # steps pay the compilation (logged as compile_seconds)
    compile: bool = False

    def validate(self) -> "TrainConfig":
        """Check every field; raises :class:`InvalidArgumentError` naming the field."""
        def bad(name, expected):
            raise InvalidArgumentError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        if isinstance(self.data, os.PathLike):
            self.data = os.fspath(self.data)  # stored as text in checkpoints and logs
        check_choice("preset", self.preset, (*PRESETS, CUSTOM_PRESET))
        check_choice("backbone", self.backbone, BACKBONES)
        check_choice("dcam", self.dcam, DCAM_VARIANTS)
        check_choice("dcam_at_inference", self.dcam_at_inference, DCAM_AT_INFERENCE)
        check_gate_floor(self.dcam_gate_floor)
        if self.dcam == "none":
            if self.dcam_gate_floor != 0:
                bad("dcam_gate_floor", "0 with dcam 'none' (there are no gates to keep open)")
            if self.dcam_at_inference != DCAM_AT_INFERENCE[0]:
                bad("dcam_at_inference", f"{DCAM_AT_INFERENCE[0]!r} with dcam 'none' (there is no DCAM to keep)")
        check_choice("fusion", self.fusion, FUSIONS)
        self.scoring_settings()
        if not 0 < self.false_alarm_rate < 1:
            bad("false_alarm_rate", "in (0, 1)")
        if not isinstance(self.objective, Objective):  # its fields were validated when it was built
            bad("objective", "a dcamkd.objective.Objective")
        for name in ("weight_decay", "momentum", "sigma"):
            if not getattr(self, name) >= 0:
                bad(name, ">= 0")
        if not self.lr > 0:
            bad("lr", "> 0")
        if self.image_size < 32 or self.image_size % 16:
            bad("image_size", "a multiple of 16, >= 32")
        if self.batch_size < 1:
            bad("batch_size", ">= 1")
        if self.steps is None and self.epochs < 1:
            bad("epochs", ">= 1")
        if self.steps is not None and self.steps < 1:
            bad("steps", ">= 1 or None")
        if not 0 < self.val_fraction < 1:
            bad("val_fraction", "in (0, 1)")
        check_device_name(self.device, "device")
        if self.grad_clip is not None and not self.grad_clip > 0:
            bad("grad_clip", "> 0 or None")
        if self.impl is not None:
            check_choice("impl", self.impl, IMPLS)
        check_choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.compile, bool):
            bad("compile", "True or False")
        return self

    def scoring_settings(self) -> ScoringSettings:
        """The run's :class:`ScoringSettings` (validated)."""
        return ScoringSettings(self.fusion, self.sigma, self.image_score, self.topk_fraction)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict; the objective nested under ``'objective'`` (its fields by
        name). ``TrainConfig.from_dict(cfg.to_dict()) == cfg``."""
        d = dataclasses.asdict(self)
        d["objective"] = self.objective.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a dict as :meth:`to_dict` writes it. The objective may also be given as
        flat keys (``tau``, ``lambda_kl``... as in grid files and configurations written before
        the objective was nested), which apply on top of ``d['objective']`` (default
        ``Objective()``).

        Raises:
            InvalidArgumentError: an unknown key (named, with the known ones) or a bad
                objective field.
        """
        d = dict(d)
        if "backend" in d and "impl" not in d:  # configurations written before the 'impl' setting
            old = d.pop("backend")
            d["impl"] = {"auto": None, "cpu": "cpp"}.get(old, old)
        flat = {k: d.pop(k) for k in OBJECTIVE_FIELDS if k in d}
        obj = d.pop("objective", None)
        names = {f.name for f in fields(cls)} - {"objective"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InvalidArgumentError(
                f"unknown config keys {unknown}; known: {sorted(names | {'objective'} | set(OBJECTIVE_FIELDS))}")
        if obj is None:
            obj = Objective()
        elif not isinstance(obj, Objective):
            obj = Objective.from_dict(obj)
        return cls(**d, objective=obj.replace(**flat) if flat else obj)

    def matches_preset(self, name: str) -> bool:
        """True when this configuration's DCAM variant and objective are preset ``name``'s
        (objectives compared with :meth:`~dcamkd.objective.Objective.same_loss`: fields the
        loss ignores do not count)."""
        p = get_preset(name)
        return self.dcam == p.dcam and self.objective.same_loss(p.objective)


#: How ``dcamkd train`` sets the settings (checked against the parser by the tests): each setting
#: of :class:`TrainConfig` and :class:`~dcamkd.objective.Objective` is the option ``--name-with-dashes``
#: taking a value, except these on/off flags, these negated flags, and these without an option.
TRAIN_FLAGS = ("deterministic", "compile")
TRAIN_NEGATED_FLAGS = {"cache_teacher": "--no-cache-teacher", "channels_last": "--no-channels-last"}
TRAIN_OPTIONLESS = ("objective", "dcam_reduction", "dcam_kernel", "val_fraction", "num_threads", "diagnostics", "eps")


def preset_config(preset: str, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` with preset ``preset``'s DCAM variant, objective and scoring, then
    ``overrides`` applied (None values are ignored): any :class:`TrainConfig` field, and the
    objective's fields as flat keys (``tau=2.0``, ``lambda_kl=0.1``...) or a whole
    ``objective=``. Validated. ``preset`` is recorded as ``preset`` while the result still
    matches it (:meth:`TrainConfig.matches_preset`), else as ``'custom'``.

    Raises:
        InvalidArgumentError: an unknown preset or key, or a bad value (one line naming it).
    """
    p = get_preset(preset)
    d: dict[str, Any] = {"preset": preset, "dcam": p.dcam, "objective": p.objective, **p.scoring.to_dict()}
    given = {k: v for k, v in overrides.items() if v is not None}
    d.update(given)
    cfg = TrainConfig.from_dict(d)
    if cfg.preset == preset and not cfg.matches_preset(preset):
        cfg.preset = CUSTOM_PRESET
    cfg = cfg.validate()
    _warn_ignored(cfg, given)
    return cfg


#: Settings that only act under another setting: (setting, the setting it depends on, the values
#: under which it has no effect). Giving one explicitly there draws a warning.
IGNORED_UNDER = (
    ("tau", "kl", ("none",)), ("lambda_kl", "kl", ("none",)), ("kd_reduction", "kl", ("none", "channel")),
    ("topk_fraction", "image_score", ("max",)),
    ("dcam_reduction", "dcam", ("none",)), ("dcam_kernel", "dcam", ("none",)),
)


def _warn_ignored(cfg: "TrainConfig", given: dict[str, Any]) -> None:
    """Warn (one line each) about explicitly given settings that ``cfg`` ignores."""
    import warnings

    for key, dep, off in IGNORED_UNDER:
        if key not in given:
            continue
        value = getattr(cfg.objective, dep) if hasattr(cfg.objective, dep) else getattr(cfg, dep)
        if value in off:
            warnings.warn(f"{key}: has no effect with {dep} {value!r} (ignored)", stacklevel=3)
