"""Distillation losses as ``nn.Module``s: the drop-in API (method.md section 4).

Every module takes lists of teacher and student maps (one ``(B, C, H, W)`` tensor per pyramid
level) and returns a 0-dim loss. The computation runs in the fused pyramid-loss op
(:func:`dcamkd.ops.pyramid_terms`): on CPU tensors the C++ kernel when it is built, on CUDA
tensors the Triton kernel, else the PyTorch reference; :func:`dcamkd.ops.use` or the environment
variable ``DCAMKD_IMPL`` chooses.

    L = sum_l w_l * (lambda_cos * cosine_term_l + lambda_kl * kl_term_l)

* cosine term: ``'channel'`` (channel CD, STFPM's loss), ``'spatial'`` (spatial CD) or
  ``'global'`` (global CD, ReContrast's and Dinomaly's loss), optionally hard-mined
  (``Objective.mine``; the ramp's progress is an argument of ``forward``, docs/mining.md);
* KL term: ``'spatial'`` (spatial KD, DCAM's) or ``'channel'`` (channel KD);
* every setting (modes, tau, lambdas, eps, level weights) comes from one
  :class:`dcamkd.objective.Objective`; presets from :data:`dcamkd.objective.PRESETS`;
* optional DCAM gates per level (channel ``(B, C)``, spatial ``(B, H, W)``) applied to the
  student inside the loss.

Gradients flow to the student, the gates and, when it requires grad, the teacher.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import ops, reference
from .errors import InvalidArgumentError, NonFiniteError, ShapeMismatchError
from .objective import Objective, get_preset

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

    ``L = sum_l w_l * (lambda_cos * cosine_term_l + lambda_kl * kl_term_l)``, with every setting
    taken from one :class:`~dcamkd.objective.Objective`.

    Construction::

        DistillationLoss()                                  # Objective(): the 'dcam' preset
        DistillationLoss(Objective(cos="spatial", kl="channel", tau=2.0))
        DistillationLoss(cos="channel", kl="spatial", kd_reduction="sum_c")   # fields as keywords
        DistillationLoss(objective, lambda_kl=0.5)          # an objective with fields replaced
        DistillationLoss.from_preset("dcam-paper")          # a preset's objective

    Defaults: the field defaults of :class:`~dcamkd.objective.Objective`, which are the ``dcam``
    preset (channel CD + spatial KD averaged over channels, tau 1, ``lambda_kl = 0.1``), the same
    objective as a bare ``TrainConfig()`` and ``dcamkd train``. Chosen over the paper's literal
    objective (``from_preset("dcam-paper")``: KL summed over channels, ``lambda_kl = 1``), which
    lost to STFPM in the ablation (README), so that the drop-in default is the objective this
    project recommends.

    Args:
        objective: an :class:`~dcamkd.objective.Objective` (default ``Objective()``).
        **fields: :class:`~dcamkd.objective.Objective` fields (``cos``, ``kl``, ``tau``,
            ``kd_reduction``, ``lambda_cos``, ``lambda_kl``, ``eps``, ``level_weights``, ``mine``,
            ``mine_start``, ``mine_final``, ``mine_factor``, ``mine_ramp_steps``) that
            replace those of ``objective``; see that class for their meaning and ranges.
        check_finite: raise :class:`NonFiniteError` on NaN/Inf inputs or a non-finite loss.

    ``forward(teachers, students, channel_gates=None, spatial_gates=None, progress=None)`` -> 0-dim
    float32
    (float64 for float64 inputs). :attr:`last_terms` holds the last call's per-level terms,
    ``(L, 2)`` detached, column 0 the cosine term and column 1 the KL term of each level, BEFORE
    ``lambda_cos``/``lambda_kl`` and the level weights are applied (for logging; :meth:`combine`
    turns them into the loss).

    Raises:
        InvalidArgumentError: at construction, a bad or unknown field (one line naming it), or
            an ``objective`` that is not an :class:`~dcamkd.objective.Objective`.
        ShapeMismatchError, NonFiniteError: see :func:`check_pyramids`.
    """

    def __init__(
        self,
        objective: Optional[Objective] = None,
        *,
        check_finite: bool = True,
        **fields,
    ):
        super().__init__()
        if objective is None:
            objective = Objective()
        elif not isinstance(objective, Objective):
            raise InvalidArgumentError(
                f"objective: expected a dcamkd.objective.Objective (or its fields as keywords, e.g. "
                f"cos='channel', kl='spatial'), got {objective!r}")
        self.objective: Objective = objective.replace(**fields) if fields else objective
        self.check_finite = check_finite
        self.last_terms: Optional[Tensor] = None

    @classmethod
    def from_preset(cls, name: str, *, check_finite: bool = True, **fields) -> "DistillationLoss":
        """The loss of preset ``name`` (``'stfpm'``, ``'dcam-paper'``, ``'dcam'``, ``'stfpm-kd'``; see
        :data:`dcamkd.objective.PRESETS`), with ``fields`` replaced. The preset's DCAM variant
        is not part of the loss: build the gates with :class:`dcamkd.dcam.DCAM`."""
        return cls(get_preset(name).objective, check_finite=check_finite, **fields)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.objective.to_dict().items())

    def terms(
        self,
        teachers: Sequence[Tensor],
        students: Sequence[Tensor],
        channel_gates: Optional[Sequence[Optional[Tensor]]] = None,
        spatial_gates: Optional[Sequence[Optional[Tensor]]] = None,
        progress=None,
    ) -> Tensor:
        """Per-level ``(L, 2)`` terms ``[cosine, KL]`` (unweighted), with autograd.

        ``progress``: the mining ramp's progress in [0, 1] (``step / ramp_steps``, clamped), a
        0-dim tensor (no recompile under ``torch.compile`` as it changes) or a float; None means
        1 (the ramp done). Ignored without mining (``Objective.mine == 'none'``)."""
        check_pyramids(teachers, students, channel_gates, spatial_gates, self.check_finite)
        o = self.objective
        if o.level_weights is not None and len(o.level_weights) != len(teachers):
            raise ShapeMismatchError(
                f"level_weights has {len(o.level_weights)} entries, the pyramids {len(teachers)} levels"
            )
        mine = o.mining()
        level, factor = None, 1.0
        if mine is not None:
            if progress is not None:
                ops.check_scalar("progress", progress)
            prog = torch.as_tensor(1.0 if progress is None else progress, dtype=torch.float64,
                                   device=students[0].device)
            level = reference.mining_level(prog, mine["start"], mine["final"])
            factor = mine["factor"]
        return ops.pyramid_terms(
            list(teachers), list(students),
            None if channel_gates is None else list(channel_gates),
            None if spatial_gates is None else list(spatial_gates),
            cos=o.cos, kl=o.kl, tau=o.tau, kd_reduction=o.kd_reduction, eps=o.eps,
            mine=o.mine, mine_factor=factor, mine_level=level,
        )

    def combine(self, terms: Tensor) -> Tensor:
        """Weighted total ``sum_l w_l (lambda_cos c_l + lambda_kl k_l)`` of ``(L, 2)`` terms
        (as :meth:`terms` returns them and :attr:`last_terms` keeps them)."""
        o = self.objective
        lam = terms.new_tensor([o.lambda_cos, o.lambda_kl])
        per_level = (terms * lam).sum(dim=1)
        if o.level_weights is not None:
            per_level = per_level * terms.new_tensor(o.level_weights)
        return per_level.sum()

    def forward(
        self,
        teachers: Sequence[Tensor],
        students: Sequence[Tensor],
        channel_gates: Optional[Sequence[Optional[Tensor]]] = None,
        spatial_gates: Optional[Sequence[Optional[Tensor]]] = None,
        progress=None,
    ) -> Tensor:
        terms = self.terms(teachers, students, channel_gates, spatial_gates, progress)
        self.last_terms = terms.detach()
        loss = self.combine(terms)
        if self.check_finite and not _compiling() and not bool(torch.isfinite(loss)):
            raise NonFiniteError(
                f"the distillation loss is not finite ({loss.item()}); per-level terms "
                f"[cos, kl]: {self.last_terms.tolist()}"
            )
        return loss


class _SingleTerm(DistillationLoss):
    """A loss with one term of weight 1; the subclass fixes the modes in ``_FIXED``."""

    _FIXED: dict = {}

    def __init__(self, *, check_finite: bool = True, **fields):
        fixed = sorted(set(fields) & set(self._FIXED))
        if fixed:
            raise InvalidArgumentError(
                f"{fixed[0]}: fixed by {type(self).__name__} ({self._FIXED}); use DistillationLoss to change it")
        super().__init__(check_finite=check_finite, **self._FIXED, **fields)


class ChannelCDLoss(_SingleTerm):
    """Channel-wise cosine distance over the pyramid alone (STFPM's loss, averaged): ``cos =
    'channel'``, ``kl = 'none'``, ``lambda_cos = 1``. Keywords: the other
    :class:`~dcamkd.objective.Objective` fields (``level_weights``, ``eps``),
    ``check_finite``."""

    _FIXED = dict(cos="channel", kl="none", lambda_cos=1.0)


class SpatialCDLoss(_SingleTerm):
    """Spatial cosine distance (per channel map over H*W) over the pyramid alone; keywords as
    :class:`ChannelCDLoss`."""

    _FIXED = dict(cos="spatial", kl="none", lambda_cos=1.0)


class SpatialKDLoss(_SingleTerm):
    """Spatial KL distillation alone (DCAM's entropy distillation, Jena et al. 2024, eq. 4):
    ``cos = 'none'``, ``kl = 'spatial'``, ``lambda_kl = 1``. Keywords: ``tau``, ``kd_reduction``,
    ``level_weights`` (defaults: :class:`~dcamkd.objective.Objective`'s),
    ``check_finite``."""

    _FIXED = dict(cos="none", kl="spatial", lambda_kl=1.0)


class ChannelKDLoss(_SingleTerm):
    """Channel KL distillation alone (softmax over channels at each location): ``cos = 'none'``,
    ``kl = 'channel'``, ``lambda_kl = 1``. Keywords: ``tau``, ``level_weights``,
    ``check_finite``."""

    _FIXED = dict(cos="none", kl="channel", lambda_kl=1.0)
