"""Training configuration (method.md sections 3, 4 and 6).

The objective (loss settings) is one :class:`dcamkd.objective.Objective`, and the presets
(``stfpm``, ``dcam-paper``, ``dcam``) are :data:`dcamkd.objective.PRESETS`: this module only
combines them with the DCAM, optimisation, scoring and execution settings. The defaults of
:class:`TrainConfig` are the ``dcam`` preset (:data:`dcamkd.objective.DEFAULT_PRESET`).

The allowed values of the scoring and export settings (:data:`FUSIONS`,
:data:`DCAM_AT_INFERENCE`, :data:`EXPORT_FORMATS`) are defined here; :mod:`dcamkd.scoring` and
:mod:`dcamkd.export` import them. Like :mod:`dcamkd.objective` and :mod:`dcamkd.backbones`, this
module does not import torch, so the command-line parser takes its choices and defaults from
it without loading torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Optional

from .backbones import BACKBONES, DEFAULT_BACKBONE
from .errors import InvalidArgumentError
from .impls import IMPLS
from .objective import (DCAM_VARIANTS, DEFAULT_PRESET, OBJECTIVE_FIELDS, PRESETS, Objective, check_choice,
                        get_preset)

__all__ = ["TrainConfig", "PRESETS", "FUSIONS", "DCAM_AT_INFERENCE", "EXPORT_FORMATS", "CUSTOM_PRESET",
           "preset_config"]

#: Level fusions of the anomaly map (method.md section 5): ``sum`` (the DCAM reference code) or
#: ``product`` (STFPM).
FUSIONS = ("sum", "product")
#: What scoring does with the DCAM side branch: ``drop`` it (raw student, STFPM's inference
#: network) or ``keep`` it (gated student); method.md section 3.
DCAM_AT_INFERENCE = ("drop", "keep")
#: The ``preset`` recorded for a configuration whose objective or DCAM variant differs from
#: every preset's.
CUSTOM_PRESET = "custom"
#: Formats of ``dcamkd export`` (:mod:`dcamkd.export`).
EXPORT_FORMATS = ("onnx",)


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in every checkpoint.

    Budget: ``steps`` optimiser steps if set, else ``epochs`` passes over the training split.
    Units: ``image_size`` in pixels (square input and evaluation resolution); ``sigma`` in
    pixels of the evaluation map. The loss settings are one :class:`~dcamkd.objective.Objective`
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
    # scoring
    fusion: str = FUSIONS[0]
    sigma: float = 0.0
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

    def validate(self) -> "TrainConfig":
        """Check every field; raises :class:`InvalidArgumentError` naming the field."""
        def bad(name, expected):
            raise InvalidArgumentError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        check_choice("preset", self.preset, (*PRESETS, CUSTOM_PRESET))
        check_choice("backbone", self.backbone, BACKBONES)
        check_choice("dcam", self.dcam, DCAM_VARIANTS)
        check_choice("dcam_at_inference", self.dcam_at_inference, DCAM_AT_INFERENCE)
        check_choice("fusion", self.fusion, FUSIONS)
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
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            bad("device", "'cpu', 'cuda' or 'cuda:N'")
        if self.grad_clip is not None and not self.grad_clip > 0:
            bad("grad_clip", "> 0 or None")
        if self.impl is not None:
            check_choice("impl", self.impl, IMPLS)
        return self

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


def preset_config(preset: str, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` with preset ``preset``'s DCAM variant and objective, then
    ``overrides`` applied (None values are ignored): any :class:`TrainConfig` field, and the
    objective's fields as flat keys (``tau=2.0``, ``lambda_kl=0.1``...) or a whole
    ``objective=``. Validated. ``preset`` is recorded as ``preset`` while the result still
    matches it (:meth:`TrainConfig.matches_preset`), else as ``'custom'``.

    Raises:
        InvalidArgumentError: an unknown preset or key, or a bad value (one line naming it).
    """
    p = get_preset(preset)
    d: dict[str, Any] = {"preset": preset, "dcam": p.dcam, "objective": p.objective}
    d.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig.from_dict(d)
    if cfg.preset == preset and not cfg.matches_preset(preset):
        cfg.preset = CUSTOM_PRESET
    return cfg.validate()
