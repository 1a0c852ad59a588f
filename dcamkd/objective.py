"""The distillation objective as one settings object, and the presets (method.md section 4).

One :class:`Objective` holds everything the loss depends on::

    L = sum_l w_l * (lambda_cos * cosine_term_l + lambda_kl * kl_term_l)

the cosine term (``cos``), the KL term (``kl``) with its temperature ``tau`` and its channel
reduction ``kd_reduction``, the two weights, the norm floor ``eps`` of the cosine distance and
the level weights ``w_l``. It is validated once, when it is built; the loss modules
(:class:`dcamkd.losses.DistillationLoss`), the training configuration
(:class:`dcamkd.config.TrainConfig`), the trainer and the command line all take it from here, and
the allowed values (:data:`COS_MODES`, :data:`KL_MODES`, :data:`KD_REDUCTIONS`, the hard-mining
rules :data:`MINE_RULES` with their defaults :data:`MINE_DEFAULTS`, docs/mining.md) and the default
``eps`` (:data:`DEFAULT_EPS`) are defined here only (:mod:`dcamkd.reference` imports them).

Presets (:data:`PRESETS`, name -> :class:`Preset`: an objective, the DCAM variant trained with
it and the scoring its models are calibrated and tested with):

* ``stfpm``: the multi-class STFPM baseline: no DCAM, channel CD only; scored like ``dcam``
  (:data:`STUDY_SCORING`), so that the two compare fairly.
* ``dcam-paper``: the paper's best configuration with the reference code's semantics: channel
  DCAM, channel CD + spatial KD summed over channels (``kd_reduction='sum_c'``), tau 1, both
  lambdas 1, scored as method.md section 5 says (no blur, image score = the map's maximum). It
  never changes: ablation grids start their cells from it.
* ``dcam``: the DCAM recipe, chosen by the ablation study (README, ``results/ablation/``):
  channel DCAM, channel CD + spatial KD averaged over channels (``'mean_c'``), tau 1,
  ``lambda_kl = 0.1``. The ablation chose it as the DCAM objective that did not lose to STFPM
  on industrial3 (three seeds); the accuracy study's final comparison (five fresh seeds) found
  it level with ``stfpm`` on image AUROC and 0.58 points lower in AUPRO (docs/accuracy.md).
  Scoring: :data:`STUDY_SCORING` (blur sigma 4, mean of the top 1 % of the map), chosen by the
  accuracy study (docs/accuracy.md).
* ``stfpm-kd``: the ``dcam`` preset without DCAM: STFPM's channel CD plus the paper's spatial KD
  averaged over channels at ``lambda_kl = 0.1``, scored like ``dcam``. It is arm B of the
  accuracy study (docs/accuracy-protocol.md), which compared ``dcam`` against it to measure what
  DCAM adds: nothing significant over five seeds (+0.13 image AUROC, +0.14 AUPRO, p 0.20 and
  0.42, docs/accuracy.md). In that study ``stfpm`` did at least as well as both.

The field defaults of :class:`Objective` are the ``dcam`` preset's objective (``Objective() ==
PRESETS['dcam'].objective``), so a bare ``DistillationLoss()``, a bare ``TrainConfig()`` and
``dcamkd train`` without ``--preset`` all train the same objective: the method this library
implements (for accuracy the README recommends ``stfpm``, after the accuracy study). ``dcam-paper``
(the paper's literal objective) is one ``from_preset`` away; it is not the default because its
KL term, summed over channels with weight 1, takes most of the gradient and closes DCAM gates,
and it lost to STFPM by several points in every measure of the ablation.

This module imports nothing from torch (nor anything of dcamkd but :mod:`dcamkd.errors`), so it
sits at the bottom of the package's layers and the command-line parser reads it without loading
torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Optional

from .errors import InvalidArgumentError

__all__ = [
    "COS_MODES",
    "KL_MODES",
    "KD_REDUCTIONS",
    "DEFAULT_EPS",
    "DCAM_VARIANTS",
    "check_gate_floor",
    "MINE_RULES",
    "MINE_COS_MODES",
    "MINE_DEFAULTS",
    "MINE_SETTINGS",
    "STUDY_SCORING",
    "OBJECTIVE_FIELDS",
    "FUSIONS",
    "IMAGE_SCORES",
    "DEFAULT_TOPK_FRACTION",
    "check_sigma",
    "ScoringSettings",
    "check_choice",
    "Objective",
    "Preset",
    "PRESETS",
    "DEFAULT_PRESET",
    "get_preset",
]

#: Cosine terms: channel CD (STFPM's loss), spatial CD, global CD (the cosine distance of each
#: image's whole flattened ``C*H*W`` map: ReContrast's and Dinomaly's loss), none.
COS_MODES = ("channel", "spatial", "global", "none")
#: KL terms: spatial KD (DCAM's entropy distillation), channel KD, none.
KL_MODES = ("spatial", "channel", "none")
#: Channel reductions of the spatial KD: sum over channels (the reference code), mean.
KD_REDUCTIONS = ("sum_c", "mean_c")
#: Lower bound of vector norms in the cosine distance (method.md section 4).
DEFAULT_EPS = 1e-8
#: DCAM attention variants trained beside the student (method.md section 3): none, channel,
#: spatial, cbam (channel then spatial). :mod:`dcamkd.dcam` implements them.
DCAM_VARIANTS = ("none", "channel", "spatial", "cbam")
#: Hard mining of the cosine term's gradient (docs/mining.md): none; ``'quantile'`` (Dinomaly:
#: locations whose distance is below the p-quantile of the batch's get ``factor`` x their
#: gradient); ``'zscore'`` (ReContrast: below mean + alpha * std).
MINE_RULES = ("none", "quantile", "zscore")
#: Cosine terms that can be mined (per-location selection needs per-location rows).
MINE_COS_MODES = ("channel", "global")
#: Per rule, the schedule of the published methods: the level (p or alpha) ramps linearly from
#: ``start`` to ``final`` over ``ramp_steps`` training steps, then stays; ``factor`` multiplies
#: the gradient of the easy locations. quantile: Dinomaly (p 0 -> 0.9 over 1000 steps, factor
#: 0.1); zscore: ReContrast (alpha -3 -> 1, factor 0; their ramp is a tenth of the run, 1000
#: steps here).
MINE_DEFAULTS: Mapping[str, Mapping[str, float]] = MappingProxyType({
    "quantile": MappingProxyType({"start": 0.0, "final": 0.9, "factor": 0.1, "ramp_steps": 1000}),
    "zscore": MappingProxyType({"start": -3.0, "final": 1.0, "factor": 0.0, "ramp_steps": 1000}),
})
#: The Objective fields of a mining schedule (``mine_`` + a key of :data:`MINE_DEFAULTS`).
MINE_SETTINGS = ("mine_start", "mine_final", "mine_factor", "mine_ramp_steps")


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``.

    Raises:
        InvalidArgumentError: ``"<name>: expected one of [...], got <value>"``.
    """
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise InvalidArgumentError(f"{name}: expected one of {list(allowed)}, got {value!r}")
    return value


def _real(name: str, v: Any, positive: bool) -> float:
    """``v`` as a finite float, > 0 (``positive``) or >= 0; else a one-line error naming ``name``."""
    bound = "> 0" if positive else ">= 0"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidArgumentError(f"{name}: expected a finite number {bound}, got {v!r}")
    v = float(v)
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        raise InvalidArgumentError(f"{name}: expected a finite number {bound}, got {v!r}")
    return v


@dataclass(frozen=True)
class Objective:
    """The distillation objective (method.md section 4); immutable, validated when built.

    Fields (the defaults are the ``dcam`` preset's objective, see the module docstring):

    * ``cos``: cosine term, one of :data:`COS_MODES`: ``'channel'`` (channel CD: mean over batch
      and locations of ``d(t_p, s_p)``), ``'spatial'`` (spatial CD) or ``'none'``.
    * ``kl``: KL term, one of :data:`KL_MODES`: ``'spatial'`` (spatial KD: softmax over the H*W
      locations of each channel, DCAM's eq. 4), ``'channel'`` (softmax over channels) or
      ``'none'``. ``cos`` and ``kl`` cannot both be ``'none'``.
    * ``tau``: softmax temperature of the KL term, finite > 0; no ``tau**2`` factor, so ``tau``
      also rescales the term.
    * ``kd_reduction``: spatial KD over channels, one of :data:`KD_REDUCTIONS`: ``'sum_c'`` (sum
      over channels, mean over the batch: the reference code) or ``'mean_c'``.
    * ``lambda_cos``, ``lambda_kl``: weights of the two terms, finite >= 0.
    * ``eps``: lower bound of the norms in the cosine distance, finite > 0 (dimensionless).
    * ``level_weights``: ``w_l`` per pyramid level (finite >= 0), a tuple; None means all 1.
      A list is accepted and stored as a tuple.
    * ``mine``: hard mining of the cosine term's gradient, one of :data:`MINE_RULES`
      (docs/mining.md); needs ``cos`` in :data:`MINE_COS_MODES`. The forward value is unchanged.
    * ``mine_start``, ``mine_final``: the selection level (quantile ``p`` in [0, 1], or z-score
      ``alpha``, finite) at step 0 and after the ramp; ``mine_factor``: gradient factor of the
      easy locations, in [0, 1]; ``mine_ramp_steps``: ramp length in steps (int >= 0). None:
      the rule's value in :data:`MINE_DEFAULTS` (:meth:`mining` resolves them); refused
      (not None) without mining, where they would have no effect.

    Raises:
        InvalidArgumentError: on construction, one line naming the first bad field.
    """

    cos: str = "channel"
    kl: str = "spatial"
    tau: float = 1.0
    kd_reduction: str = "mean_c"
    lambda_cos: float = 1.0
    lambda_kl: float = 0.1
    eps: float = DEFAULT_EPS
    level_weights: Optional[tuple[float, ...]] = None
    mine: str = "none"
    mine_start: Optional[float] = None
    mine_final: Optional[float] = None
    mine_factor: Optional[float] = None
    mine_ramp_steps: Optional[int] = None

    def __post_init__(self) -> None:
        check_choice("cos", self.cos, COS_MODES)
        check_choice("kl", self.kl, KL_MODES)
        if self.cos == "none" and self.kl == "none":
            raise InvalidArgumentError("cos and kl: both 'none' leaves no loss at all")
        check_choice("kd_reduction", self.kd_reduction, KD_REDUCTIONS)
        set_ = object.__setattr__  # frozen: normalise the numbers once, here
        set_(self, "tau", _real("tau", self.tau, positive=True))
        set_(self, "lambda_cos", _real("lambda_cos", self.lambda_cos, positive=False))
        set_(self, "lambda_kl", _real("lambda_kl", self.lambda_kl, positive=False))
        set_(self, "eps", _real("eps", self.eps, positive=True))
        if self.level_weights is not None:
            w = self.level_weights
            if isinstance(w, (str, bytes)) or not hasattr(w, "__iter__"):
                raise InvalidArgumentError(
                    f"level_weights: expected a sequence of finite numbers >= 0 or None, got {w!r}")
            try:
                w = tuple(_real("level_weights", x, positive=False) for x in w)
            except InvalidArgumentError:
                raise InvalidArgumentError(
                    f"level_weights: expected finite numbers >= 0, got {list(self.level_weights)!r}") from None
            if not w:
                raise InvalidArgumentError("level_weights: expected at least one weight, got an empty sequence")
            set_(self, "level_weights", w)
        check_choice("mine", self.mine, MINE_RULES)
        if self.mine != "none" and self.cos not in MINE_COS_MODES:
            raise InvalidArgumentError(
                f"mine: mining needs cos in {list(MINE_COS_MODES)}, got cos={self.cos!r}")
        for name in ("mine_start", "mine_final"):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                    raise InvalidArgumentError(f"{name}: expected a finite number or None, got {v!r}")
                v = float(v)
                if self.mine == "quantile" and not 0.0 <= v <= 1.0:
                    raise InvalidArgumentError(f"{name}: expected a quantile in [0, 1], got {v!r}")
                set_(self, name, v)
        if self.mine_factor is not None:
            f = _real("mine_factor", self.mine_factor, positive=False)
            if f > 1.0:
                raise InvalidArgumentError(f"mine_factor: expected a number in [0, 1], got {f!r}")
            set_(self, "mine_factor", f)
        r = self.mine_ramp_steps
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
            raise InvalidArgumentError(f"mine_ramp_steps: expected an integer >= 0 or None, got {r!r}")
        if self.mine == "none":
            for name in MINE_SETTINGS:
                if getattr(self, name) is not None:
                    raise InvalidArgumentError(f"{name}: has no effect with mine 'none'; choose a rule "
                                               f"({', '.join(r for r in MINE_RULES if r != 'none')}) or leave it unset")

    def mining(self) -> Optional[dict[str, Any]]:
        """The mining schedule with the rule's defaults filled in: ``{'rule', 'start', 'final',
        'factor', 'ramp_steps'}``, or None when ``mine == 'none'``."""
        if self.mine == "none":
            return None
        d = dict(MINE_DEFAULTS[self.mine])
        for k in ("start", "final", "factor", "ramp_steps"):
            v = getattr(self, "mine_" + k)
            if v is not None:
                d[k] = v
        d["ramp_steps"] = int(d["ramp_steps"])
        return {"rule": self.mine, **d}

    def mining_progress(self, step: int) -> float:
        """Ramp progress ``min(step / ramp_steps, 1)`` at training step ``step`` (1 without a
        ramp or without mining)."""
        m = self.mining()
        if m is None or m["ramp_steps"] == 0:
            return 1.0
        return min(float(step) / m["ramp_steps"], 1.0)

    # -- conversions ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain, JSON-ready dict (``level_weights`` as a list or None)."""
        d = dataclasses.asdict(self)
        if d["level_weights"] is not None:
            d["level_weights"] = list(d["level_weights"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Objective":
        """Build from a dict of fields (missing fields take the defaults).

        Raises:
            InvalidArgumentError: an unknown key (named, with the known ones) or a bad value.
        """
        if not isinstance(d, Mapping):
            raise InvalidArgumentError(f"objective: expected a mapping of its fields, got {d!r}")
        unknown = sorted(set(d) - set(OBJECTIVE_FIELDS))
        if unknown:
            raise InvalidArgumentError(f"objective: unknown keys {unknown}; known: {list(OBJECTIVE_FIELDS)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "Objective":
        """A copy with ``changes`` applied (validated). Raises :class:`InvalidArgumentError` for
        an unknown field or a bad value."""
        return Objective.from_dict({**self.to_dict(), **changes})

    # -- comparisons ----------------------------------------------------------------------

    def _effective(self) -> tuple:
        """The fields the loss reads: the KL settings only with a KL term, ``kd_reduction``
        only with the spatial KD, ``lambda_cos`` and ``eps`` only with a cosine term."""
        has_cos, has_kl = self.cos != "none", self.kl != "none"
        return (
            self.cos, self.kl,
            self.tau if has_kl else None,
            self.kd_reduction if self.kl == "spatial" else None,
            self.lambda_cos if has_cos else None,
            self.lambda_kl if has_kl else None,
            self.eps if has_cos else None,
            self.level_weights,
            tuple(sorted(self.mining().items())) if self.mine != "none" else None,
        )

    def same_loss(self, other: "Objective") -> bool:
        """True when ``other`` gives the same loss for every input: equal in every field the
        loss reads (``==`` compares all fields, including ignored ones such as ``tau`` without a
        KL term)."""
        if not isinstance(other, Objective):
            raise InvalidArgumentError(f"other: expected an Objective, got {type(other).__name__}")
        return self._effective() == other._effective()


def check_gate_floor(floor) -> float:
    """A DCAM gate floor (:class:`dcamkd.dcam.ChannelAttention`) as a float; raises :class:`InvalidArgumentError` unless it is a number in [0, 1)."""
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor < 1:
        raise InvalidArgumentError(f"dcam_gate_floor: expected a number in [0, 1), got {floor!r}")
    return float(floor)


# --- scoring: how a map and an image score are made (method.md section 5) ---

#: Level fusions of the anomaly map (method.md section 5): ``sum`` (the DCAM reference code) or
#: ``product`` (STFPM).
FUSIONS = ("sum", "product")
#: Image-score rules: the map's maximum (method.md section 5) or the mean of its top-k fraction.
IMAGE_SCORES = ("max", "topk")
#: Default fraction of a map's pixels averaged by the ``'topk'`` rule (1 %: 656 pixels at 256 x 256).
DEFAULT_TOPK_FRACTION = 0.01


def check_sigma(sigma) -> float:
    """``sigma`` (Gaussian blur, pixels) as a float; raises :class:`InvalidArgumentError` unless
    it is a finite number >= 0."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise InvalidArgumentError(f"sigma must be a finite number >= 0 (pixels; 0 = no blur), got {sigma!r}")
    return float(sigma)


def check_fraction(value, name: str) -> float:
    """``value`` as a float; raises :class:`InvalidArgumentError` naming ``name`` unless it is in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= 1:
        raise InvalidArgumentError(f"{name}: expected a number in (0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ScoringSettings:
    """How an anomaly map and an image score are computed from teacher and student features
    (method.md section 5); a calibrated threshold holds only for the settings it was made with.

    Attributes:
        fusion: level fusion, one of :data:`FUSIONS`.
        sigma: Gaussian blur sigma in pixels of the map (0: no blur).
        image_score: one of :data:`IMAGE_SCORES`.
        topk_fraction: fraction of the map's pixels averaged by ``'topk'`` (in (0, 1]; kept, and
            ignored, for ``'max'``).

    Construction validates every field and raises :class:`InvalidArgumentError` naming it.
    """

    fusion: str = FUSIONS[0]
    sigma: float = 0.0
    image_score: str = IMAGE_SCORES[0]
    topk_fraction: float = DEFAULT_TOPK_FRACTION

    def __post_init__(self) -> None:
        check_choice("fusion", self.fusion, FUSIONS)
        check_choice("image_score", self.image_score, IMAGE_SCORES)
        object.__setattr__(self, "sigma", check_sigma(self.sigma))
        object.__setattr__(self, "topk_fraction", check_fraction(self.topk_fraction, "topk_fraction"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScoringSettings":
        """From a dict holding some of the four fields (other keys are ignored)."""
        return cls(**{k: d[k] for k in ("fusion", "sigma", "image_score", "topk_fraction") if k in d})

    def describe(self) -> str:
        """One line, e.g. ``fusion sum, sigma 4, image score max``."""
        rule = "max" if self.image_score == "max" else f"top-{self.topk_fraction:g} mean"
        return f"fusion {self.fusion}, sigma {self.sigma:g}, image score {rule}"


#: Field names of :class:`Objective`, in order (flat keys of grid files and CLI flags).
OBJECTIVE_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Objective))


@dataclass(frozen=True)
class Preset:
    """A named recipe: the objective, the DCAM variant trained with it (one of
    :data:`DCAM_VARIANTS`; ``'none'``: no attention) and the scoring its models are tested and
    calibrated with (:class:`ScoringSettings`: fusion, blur sigma, image-score rule). Raises
    :class:`InvalidArgumentError` for a bad variant, or an ``objective`` / ``scoring`` of the
    wrong type."""

    objective: Objective
    dcam: str
    scoring: "ScoringSettings" = None  # type: ignore[assignment]  # None: ScoringSettings()

    def __post_init__(self) -> None:
        if not isinstance(self.objective, Objective):
            raise InvalidArgumentError(f"objective: expected an Objective, got {self.objective!r}")
        check_choice("dcam", self.dcam, DCAM_VARIANTS)
        if self.scoring is None:
            object.__setattr__(self, "scoring", ScoringSettings())
        elif not isinstance(self.scoring, ScoringSettings):
            raise InvalidArgumentError(f"scoring: expected a ScoringSettings, got {self.scoring!r}")


#: The scoring of the ``stfpm`` and ``dcam`` presets, chosen by the accuracy study's protocol
#: (docs/accuracy-protocol.md, stage 1) from the saved maps of its A0 and C0 screening runs, seeds
#: 0-2: blur sigma 4 and the mean of the top 1 % of the map, the best of 16 (sigma, rule) cells on
#: the mean of image AUROC and AUPRO (docs/accuracy.md). ``dcam-paper`` keeps method.md section 5's
#: (no blur, maximum).
STUDY_SCORING = ScoringSettings(sigma=4.0, image_score="topk", topk_fraction=DEFAULT_TOPK_FRACTION)

#: The presets, by name (read-only). See the module docstring.
PRESETS: Mapping[str, Preset] = MappingProxyType({
    "stfpm": Preset(Objective(cos="channel", kl="none"), dcam="none", scoring=STUDY_SCORING),
    # the literal reference: every field written out, so that it never moves with the defaults
    "dcam-paper": Preset(Objective(cos="channel", kl="spatial", tau=1.0, kd_reduction="sum_c",
                                   lambda_cos=1.0, lambda_kl=1.0, eps=DEFAULT_EPS, level_weights=None),
                         dcam="channel"),
    "dcam": Preset(Objective(), dcam="channel", scoring=STUDY_SCORING),  # the Objective defaults are this preset
    # the dcam preset without DCAM: arm B of the accuracy study
    "stfpm-kd": Preset(Objective(), dcam="none", scoring=STUDY_SCORING),
})

#: The preset of a bare ``TrainConfig()`` and of ``dcamkd train`` without ``--preset``.
DEFAULT_PRESET = "dcam"


def get_preset(name: str) -> Preset:
    """The :class:`Preset` called ``name``; raises :class:`InvalidArgumentError` listing the
    presets for an unknown name."""
    check_choice("preset", name, PRESETS)
    return PRESETS[name]
