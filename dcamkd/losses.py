"""Distillation losses as ``nn.Module``s: the drop-in API (method.md section 4).

Every module takes lists of teacher and student maps (one ``(B, C, H, W)`` tensor per pyramid
level) and returns a 0-dim loss. The computation runs in the fused pyramid-loss op
(:func:`dcamkd.ops.pyramid_terms`): on CPU tensors the C++ kernel when it is built, on CUDA
tensors the Triton kernel, else the PyTorch reference; :func:`dcamkd.ops.use` or the environment
variable ``DCAMKD_IMPL`` chooses.

    L = sum_l w_l * (lambda_cos * cosine_term_l + lambda_kl * kl_term_l)

* cosine term: ``'channel'`` (channel CD, STFPM's loss) or ``'spatial'`` (spatial CD);
* KL term: ``'spatial'`` (spatial KD, DCAM's) or ``'channel'`` (channel KD);
* optional DCAM gates per level (channel ``(B, C)``, spatial ``(B, H, W)``) applied to the
  student inside the loss.

Gradients flow to the student, the gates and, when it requires grad, the teacher.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import ops
from .errors import InvalidArgumentError, NonFiniteError, ShapeMismatchError
from .reference import COS_MODES, DEFAULT_EPS, KD_REDUCTIONS, KL_MODES

__all__ = [
    "DistillationLoss",
    "ChannelCDLoss",
    "SpatialCDLoss",
    "SpatialKDLoss",
    "ChannelKDLoss",
    "check_pyramids",
]


def _compiling() -> bool:
    """True while torch.compile traces (data-dependent checks are skipped then)."""
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover - older torch
        return False


def _number(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidArgumentError(f"{name} must be a number, got {v!r}")
    return float(v)


def check_pyramids(
    teachers: Sequence[Tensor],
    students: Sequence[Tensor],
    channel_gates: Optional[Sequence[Optional[Tensor]]] = None,
    spatial_gates: Optional[Sequence[Optional[Tensor]]] = None,
    check_finite: bool = True,
) -> None:
    """Validate teacher/student pyramids and gates.

    Raises:
        ShapeMismatchError: level counts, shapes, dtypes or devices disagree; a gate of the
            wrong shape; an empty batch or a zero-size level.
        NonFiniteError: NaN or Inf in an input (when ``check_finite``).
        InvalidArgumentError: an input is not a 4-D floating-point tensor.
    """
    if isinstance(teachers, Tensor) or isinstance(students, Tensor):
        raise InvalidArgumentError("teachers and students must be lists of (B, C, H, W) tensors, one per level")
    if len(teachers) != len(students):
        raise ShapeMismatchError(
            f"teacher pyramid has {len(teachers)} levels, student pyramid {len(students)}"
        )
    if len(teachers) == 0:
        raise ShapeMismatchError("teacher and student pyramids are empty: expected at least one level")
    for name, gates in (("channel_gates", channel_gates), ("spatial_gates", spatial_gates)):
        if gates is not None and len(gates) != len(teachers):
            raise ShapeMismatchError(f"{name} has {len(gates)} entries, the pyramids {len(teachers)} levels")
    for lvl, (t, s) in enumerate(zip(teachers, students)):
        for who, x in (("teacher", t), ("student", s)):
            if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
                raise InvalidArgumentError(
                    f"{who} level {lvl}: expected a 4-D floating-point (B, C, H, W) tensor, got "
                    f"{type(x).__name__ if not isinstance(x, Tensor) else f'{x.dtype} of shape {tuple(x.shape)}'}"
                )
        if t.shape != s.shape:
            raise ShapeMismatchError(
                f"level {lvl}: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}"
            )
        if t.dtype != s.dtype:
            raise ShapeMismatchError(f"level {lvl}: teacher dtype {t.dtype} != student dtype {s.dtype}")
        if t.device != s.device:
            raise ShapeMismatchError(f"level {lvl}: teacher on {t.device}, student on {s.device}")
        if t.numel() == 0:
            raise ShapeMismatchError(
                f"level {lvl}: empty tensor of shape {tuple(t.shape)} (empty batch or zero-size level)"
            )
        B, C, H, W = t.shape
        if channel_gates is not None and channel_gates[lvl] is not None:
            g = channel_gates[lvl]
            if tuple(g.shape) != (B, C) or g.device != t.device:
                raise ShapeMismatchError(
                    f"level {lvl}: channel gate must be ({B}, {C}) on {t.device}, got {tuple(g.shape)} on {g.device}"
                )
        if spatial_gates is not None and spatial_gates[lvl] is not None:
            g = spatial_gates[lvl]
            if tuple(g.shape) != (B, H, W) or g.device != t.device:
                raise ShapeMismatchError(
                    f"level {lvl}: spatial gate must be ({B}, {H}, {W}) on {t.device}, got {tuple(g.shape)} on {g.device}"
                )
        for name, gates in (("channel gate", channel_gates), ("spatial gate", spatial_gates)):
            g = gates[lvl] if gates is not None else None
            if g is not None and not g.is_floating_point():
                raise InvalidArgumentError(f"level {lvl}: {name} must be a floating-point tensor, got {g.dtype}")
        if check_finite and not _compiling():
            for who, x in (("teacher", t), ("student", s),
                           ("channel gate", channel_gates[lvl] if channel_gates is not None else None),
                           ("spatial gate", spatial_gates[lvl] if spatial_gates is not None else None)):
                if x is not None and not bool(torch.isfinite(x).all()):
                    raise NonFiniteError(f"{who} level {lvl} contains NaN or Inf")


class DistillationLoss(nn.Module):
    """Pyramid distillation loss: a cosine term plus a KL term per level (method.md section 4).

    Args:
        cos: ``'channel'`` (channel CD), ``'spatial'`` (spatial CD) or ``'none'``.
        kl: ``'spatial'`` (spatial KD), ``'channel'`` (channel KD) or ``'none'``.
        tau: softmax temperature of the KL term (> 0); no ``tau**2`` factor.
        lambda_cos, lambda_kl: weights of the two terms (>= 0).
        level_weights: ``w_l`` per level (default all 1).
        kd_reduction: ``'sum_c'`` (sum over channels, mean over batch: the reference code) or
            ``'mean_c'`` for the spatial KD.
        eps: lower bound of norms in the cosine distance.
        check_finite: raise :class:`NonFiniteError` on NaN/Inf inputs or a non-finite loss.

    ``forward(teachers, students, channel_gates=None, spatial_gates=None)`` -> 0-dim float32
    (float64 for float64 inputs). The per-level terms of the last call, ``(L, 2)`` detached,
    are kept in :attr:`last_terms` for logging.

    Raises:
        InvalidArgumentError: bad mode names or weights (at construction).
        ShapeMismatchError, NonFiniteError: see :func:`check_pyramids`.
    """

    def __init__(
        self,
        cos: str = "channel",
        kl: str = "spatial",
        tau: float = 1.0,
        lambda_cos: float = 1.0,
        lambda_kl: float = 1.0,
        level_weights: Optional[Sequence[float]] = None,
        kd_reduction: str = "sum_c",
        eps: float = DEFAULT_EPS,
        check_finite: bool = True,
    ):
        super().__init__()
        if cos not in COS_MODES:
            raise InvalidArgumentError(f"cos must be one of {COS_MODES}, got {cos!r}")
        if kl not in KL_MODES:
            raise InvalidArgumentError(f"kl must be one of {KL_MODES}, got {kl!r}")
        if cos == "none" and kl == "none":
            raise InvalidArgumentError("cos='none' and kl='none' together leave no loss at all")
        if kd_reduction not in KD_REDUCTIONS:
            raise InvalidArgumentError(f"kd_reduction must be one of {KD_REDUCTIONS}, got {kd_reduction!r}")
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise InvalidArgumentError(f"tau must be a finite number > 0, got {tau!r}")
        lambda_cos, lambda_kl, eps = _number("lambda_cos", lambda_cos), _number("lambda_kl", lambda_kl), _number("eps", eps)
        for name, v in (("lambda_cos", lambda_cos), ("lambda_kl", lambda_kl)):
            if not (math.isfinite(v) and v >= 0):
                raise InvalidArgumentError(f"{name} must be a finite number >= 0, got {v!r}")
        if level_weights is not None:
            level_weights = [_number("level_weights entry", w) for w in level_weights]
            if any(not math.isfinite(w) or w < 0 for w in level_weights):
                raise InvalidArgumentError(f"level_weights must be finite and >= 0, got {level_weights}")
        if not (eps > 0):
            raise InvalidArgumentError(f"eps must be > 0, got {eps!r}")
        self.cos, self.kl, self.tau = cos, kl, float(tau)
        self.lambda_cos, self.lambda_kl = float(lambda_cos), float(lambda_kl)
        self.level_weights = level_weights
        self.kd_reduction, self.eps = kd_reduction, float(eps)
        self.check_finite = check_finite
        self.last_terms: Optional[Tensor] = None

    def extra_repr(self) -> str:
        return (
            f"cos={self.cos!r}, kl={self.kl!r}, tau={self.tau}, lambda_cos={self.lambda_cos}, "
            f"lambda_kl={self.lambda_kl}, kd_reduction={self.kd_reduction!r}"
        )

    def terms(
        self,
        teachers: Sequence[Tensor],
        students: Sequence[Tensor],
        channel_gates: Optional[Sequence[Optional[Tensor]]] = None,
        spatial_gates: Optional[Sequence[Optional[Tensor]]] = None,
    ) -> Tensor:
        """Per-level ``(L, 2)`` terms ``[cosine, KL]`` (unweighted), with autograd."""
        check_pyramids(teachers, students, channel_gates, spatial_gates, self.check_finite)
        if self.level_weights is not None and len(self.level_weights) != len(teachers):
            raise ShapeMismatchError(
                f"level_weights has {len(self.level_weights)} entries, the pyramids {len(teachers)} levels"
            )
        return ops.pyramid_terms(
            list(teachers), list(students),
            None if channel_gates is None else list(channel_gates),
            None if spatial_gates is None else list(spatial_gates),
            cos=self.cos, kl=self.kl, tau=self.tau, kd_reduction=self.kd_reduction,
            eps=self.eps,
        )

    def combine(self, terms: Tensor) -> Tensor:
        """Weighted total ``sum_l w_l (lambda_cos c_l + lambda_kl k_l)`` of ``(L, 2)`` terms."""
        lam = terms.new_tensor([self.lambda_cos, self.lambda_kl])
        per_level = (terms * lam).sum(dim=1)
        if self.level_weights is not None:
            per_level = per_level * terms.new_tensor(self.level_weights)
        return per_level.sum()

    def forward(
        self,
        teachers: Sequence[Tensor],
        students: Sequence[Tensor],
        channel_gates: Optional[Sequence[Optional[Tensor]]] = None,
        spatial_gates: Optional[Sequence[Optional[Tensor]]] = None,
    ) -> Tensor:
        terms = self.terms(teachers, students, channel_gates, spatial_gates)
        self.last_terms = terms.detach()
        loss = self.combine(terms)
        if self.check_finite and not _compiling() and not bool(torch.isfinite(loss)):
            raise NonFiniteError(
                f"the distillation loss is not finite ({loss.item()}); per-level terms "
                f"[cos, kl]: {self.last_terms.tolist()}"
            )
        return loss


class ChannelCDLoss(DistillationLoss):
    """Channel-wise cosine distance over the pyramid (STFPM's loss, averaged); see
    :class:`DistillationLoss` for arguments other than the fixed modes."""

    def __init__(self, level_weights=None, eps: float = DEFAULT_EPS, check_finite=True):
        super().__init__("channel", "none", 1.0, 1.0, 0.0, level_weights, "sum_c", eps, check_finite)


class SpatialCDLoss(DistillationLoss):
    """Spatial cosine distance (per channel map over H*W) over the pyramid."""

    def __init__(self, level_weights=None, eps: float = DEFAULT_EPS, check_finite=True):
        super().__init__("spatial", "none", 1.0, 1.0, 0.0, level_weights, "sum_c", eps, check_finite)


class SpatialKDLoss(DistillationLoss):
    """Spatial KL distillation (DCAM's entropy distillation, Jena et al. 2024, eq. 4)."""

    def __init__(self, tau: float = 1.0, kd_reduction: str = "sum_c", level_weights=None,
                 check_finite=True):
        super().__init__("none", "spatial", tau, 0.0, 1.0, level_weights, kd_reduction, DEFAULT_EPS,
                         check_finite)


class ChannelKDLoss(DistillationLoss):
    """Channel KL distillation (softmax over channels at each location)."""

    def __init__(self, tau: float = 1.0, level_weights=None, check_finite=True):
        super().__init__("none", "channel", tau, 0.0, 1.0, level_weights, "sum_c", DEFAULT_EPS,
                         check_finite)
