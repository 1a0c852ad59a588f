"""Fused pyramid distillation loss: ops ``dcamkd::pyramid_loss``, ``dcamkd::pyramid_loss_backward``
(C++ kernels: ``csrc/cpu/pyramid_loss.cpp``, ``csrc/cuda/pyramid_loss.cu``) and their Triton twins
``dcamkd::pyramid_loss_triton``, ``dcamkd::pyramid_loss_backward_triton``
(:mod:`dcamkd.kernels.pyramid_loss`), and the wrapper :func:`pyramid_terms`.

One call computes, for every pyramid level, the cosine term (channel CD or spatial CD) and the KL
term (spatial KD or channel KD) of the DCAM-gated student ``a_c * m_p * s`` against the teacher
(method.md section 4; DCAM, Jena et al. 2024, section 3.2), without writing the gated copy.

Op contract (all implementations)
---------------------------------
``pyramid_loss(Tensor[] teachers, Tensor[] students, Tensor[] channel_gates, Tensor[] spatial_gates,
str cos, str kl, float tau, str kd_reduction, float eps, str mine, float mine_factor,
Tensor mine_level) -> (Tensor terms, Tensor[] stats)``

* Inputs as prepared by :func:`pyramid_terms`: T and S of one dtype (float16, bfloat16, float32 or
  float64), each level both NCHW-contiguous or both channels_last; gates contiguous in the
  accumulation dtype ``acc`` (float32; float64 for float64 inputs). A level without a gate passes
  an empty ``(0,)`` tensor (meaning 1): gates are ``Tensor[]``, not ``Tensor?[]``, because
  torch.library autograd treats a list holding None as one opaque leaf and would drop the gates'
  gradients. Modes: ``cos in {channel, spatial, none}``, ``kl in {spatial, channel, none}``,
  ``kd_reduction in {sum_c, mean_c}``. The forward kernels ignore the mining arguments (``mine``
  in ``{none, quantile, zscore}``, ``mine_factor``, ``mine_level`` a 0-dim tensor holding the
  current ``p`` / ``alpha``); the autograd formula uses them (see *Mining* below).
* ``terms``: ``(L, 2)`` ``acc``, [cosine term, KL term] per level (as ``reference.pyramid_terms``).
* ``stats[l]``: 1-D ``acc``, ``[cos block | kl block]``. cos block: ``(3, B, R)`` planes ``|t|,
  |s'|, t.s'`` (plain L2 norms, no eps) with ``R = H*W`` (channel CD, row = location) or ``C``
  (spatial CD, row = channel), empty for ``'none'``; ``'global'`` saves the channel-CD rows
  (``R = H*W``), and image ``b``'s global cosine is formed from them: ``|t_b|^2 = sum_p |t_p|^2``,
  ``|s'_b|^2 = sum_p |s'_p|^2``, ``t_b.s'_b = sum_p t_p.s'_p``. kl block: ``(3, B, R)`` planes ``lse_t, lse_s,
  kl`` with ``lse_x = log sum_row exp(x / tau)`` (max-subtracted), ``kl`` the row's KL(P||Q),
  ``R = C`` (spatial KD) or ``H*W`` (channel KD), empty for ``'none'`` (:func:`stats_numel`).

``pyramid_loss_backward(Tensor grad_terms, Tensor[] teachers, Tensor[] students,
Tensor[] channel_gates, Tensor[] spatial_gates, Tensor[] stats, Tensor[] row_weights, str cos,
str kl, float tau, str kd_reduction, float eps, bool teacher_grad) -> (Tensor[] grad_students, Tensor[] grad_teachers,
Tensor[] grad_channel_gates, Tensor[] grad_spatial_gates)``

* ``grad_terms`` ``(L, 2)`` contiguous ``acc``. ``grad_students`` in the dtype and layout of the
  students; ``grad_teachers`` is ``[]`` unless ``teacher_grad``; gate gradient lists have one entry
  per level, of the gate's shape in ``acc`` (an empty ``(0,)`` tensor where that level has no gate).
* Formulas, with ``r_x = max(|x|, eps)``, ``c = t.s'/(r_t r_s)``, ``g'`` = dL/ds': cosine
  ``dd/ds' = alpha s' - t/(r_t r_s)`` with ``alpha = c/r_s^2`` if ``|s'| >= eps`` else ``1/r_s^2``
  (symmetric for t); KL ``dKL/ds'_p = (Q_p - P_p)/tau``,
  ``dKL/dt_p = P_p/tau * ((t_p - s'_p)/tau - lse_t + lse_s - kl)``; gates ``ds = a m g'``,
  ``da_c = sum_p m_p s_p g'_p``, ``dm_p = sum_c a_c s_c g'_c``. ``'global'``: the cosine
  coefficients are image ``b``'s (from the summed rows), the same at every location of ``b``,
  and the term's mean is over the ``B`` images.
* ``row_weights[l]``: ``(B, H, W)`` (any contiguous ``B*H*W`` tensor) in ``acc``, or an empty
  ``(0,)`` tensor for none: the cosine part of ``g'`` at location ``p`` is multiplied by
  ``w_p`` (``cos`` channel or global only). Neither the KL part nor ``dT`` is weighted.

Mining (autograd formula, :func:`_backward`): between the forward and the backward op, for each
level, the per-location channel-CD distances ``d(t_p, s'_p)`` (gated student) are formed from the
saved rows (:func:`dcamkd.reference.cos_distance_from_norms`), the threshold is selected over the
batch's ``B*H*W`` locations on the device (op ``dcamkd::mining_weights``: a linear-time C++
selection on CPU tensors, torch ops elsewhere) and the weights
(:func:`dcamkd.reference.mining_weights`) go to the backward op as ``row_weights``. No host
synchronisation; ``mine_level`` is a tensor, so ``torch.compile`` does not recompile as it
ramps.
* NaN or Inf in T, S or a gate gives non-finite terms wherever the reference gives them.

Extending the op (a new mode, an extra input): add the argument to both schema strings below, to
the fake functions, to the C++/CUDA/Triton kernels, and give :func:`_backward` one more ``None``
per new non-differentiable input; a per-row gradient weight for the backward travels as one more
``Tensor[]`` of the backward op (empty ``(0,)`` tensors = no weight), saved by :func:`_setup`.

Gradient strategy: *one backward pass with saved row statistics* (not Liger's
gradient-in-forward, which would need one ``S``-sized buffer per term since ``grad_output`` is an
``(L, 2)`` tensor). The forward reads T and S once and saves three numbers per row and term; the
backward reads T and S once more and writes ``dS`` (and ``dT`` when the teacher requires grad),
forming the gate gradients in the same pass. Bytes moved per level of ``N`` elements of ``e``
bytes: forward ``2Ne``, backward ``3Ne`` (``4Ne`` with ``dT``); the saved stats are
``3 * B * (HW or C) * 4`` bytes per term. No softmax, log-softmax or normalised copy is kept.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import reference as _ref
from ..errors import InvalidArgumentError, ShapeMismatchError
from ..objective import MINE_COS_MODES
from . import _impl, _library

__all__ = ["SCHEMA", "BACKWARD_SCHEMA", "stats_numel", "check_scalar", "pyramid_terms"]

SCHEMA = (
    "(Tensor[] teachers, Tensor[] students, Tensor[] channel_gates, Tensor[] spatial_gates, "
    "str cos, str kl, float tau, str kd_reduction, float eps, str mine, float mine_factor, "
    "Tensor mine_level) -> (Tensor, Tensor[])"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_terms, Tensor[] teachers, Tensor[] students, Tensor[] channel_gates, "
    "Tensor[] spatial_gates, Tensor[] stats, Tensor[] row_weights, str cos, str kl, float tau, "
    "str kd_reduction, "
    "float eps, bool teacher_grad) -> (Tensor[], Tensor[], Tensor[], Tensor[])"
)


def stats_numel(shape: Sequence[int], cos: str, kl: str) -> int:
    """Length of the saved-statistics vector of one level of shape ``(B, C, H, W)``:
    ``3 * B * R_cos + 3 * B * R_kl`` with ``R = H*W`` for channel modes (and the global cosine),
    ``C`` for spatial modes, 0 for ``'none'``."""
    b, c, h, w = shape
    r = {"channel": h * w, "global": h * w, "spatial": c, "none": 0}
    return 3 * b * r[cos] + 3 * b * r[kl]


def _fake(teachers, students, channel_gates, spatial_gates, cos, kl, tau, kd_reduction, eps, mine,
          mine_factor, mine_level):
    acc = _ref.acc_dtype(students[0].dtype)
    terms = students[0].new_empty((len(students), 2), dtype=acc)
    stats = [s.new_empty((stats_numel(s.shape, cos, kl),), dtype=acc) for s in students]
    return terms, stats


def _fake_backward(grad_terms, teachers, students, channel_gates, spatial_gates, stats, row_weights, cos,
                   kl, tau, kd_reduction, eps, teacher_grad):
    gs = [torch.empty_like(s) for s in students]
    gt = [torch.empty_like(t) for t in teachers] if teacher_grad else []
    ga = [a.new_empty(a.shape) for a in channel_gates]
    gm = [m.new_empty(m.shape) for m in spatial_gates]
    return gs, gt, ga, gm


def _triton(*args):
    from ..kernels import pyramid_loss as kernel

    return kernel.pyramid_loss(*args)


def _triton_backward(*args):
    from ..kernels import pyramid_loss as kernel

    return kernel.pyramid_loss_backward(*args)


_library.define("pyramid_loss", SCHEMA, _triton, _fake)
_library.define("pyramid_loss_backward", BACKWARD_SCHEMA, _triton_backward, _fake_backward)


def _setup(ctx, inputs, output):
    teachers, students, cg, sg, cos, kl, tau, red, eps, mine, mine_factor, mine_level = inputs
    _, stats = output
    ctx.n = len(students)
    ctx.args = (cos, kl, tau, red, eps)
    ctx.mine = (mine, mine_factor)
    ctx.shapes = [tuple(s.shape) for s in students]
    ctx.teacher_grad = any(t.requires_grad for t in teachers)
    ctx.cg_mask = [a.numel() > 0 for a in cg]
    ctx.sg_mask = [m.numel() > 0 for m in sg]
    ctx.save_for_backward(*teachers, *students, *cg, *sg, *stats, mine_level)


def _make_backward(backward_op):
    def _backward(ctx, grad_terms, grad_stats):
        _impl.forbid_double_backward("pyramid_loss")
        n = ctx.n
        saved = list(ctx.saved_tensors)
        teachers, students = saved[:n], saved[n:2 * n]
        cg, sg, stats = saved[2 * n:3 * n], saved[3 * n:4 * n], saved[4 * n:5 * n]
        weights = _row_weights(stats, ctx.shapes, ctx.mine[0], ctx.mine[1], saved[5 * n], ctx.args[4])
        gs, gt, ga, gm = backward_op(grad_terms.contiguous(), teachers, students, cg, sg, stats, weights,
                                     *ctx.args, ctx.teacher_grad)
        g_teachers = list(gt) if ctx.teacher_grad else [None] * n
        g_cg = [g if has else None for g, has in zip(ga, ctx.cg_mask)]
        g_sg = [g if has else None for g, has in zip(gm, ctx.sg_mask)]
        return g_teachers, list(gs), g_cg, g_sg, None, None, None, None, None, None, None, None

    return _backward


MINING_SCHEMA = "(Tensor[] stats, int[] rows, str rule, float factor, Tensor level, float eps) -> Tensor[]"


def _mining_weights_torch(stats, rows, rule, factor, level, eps):
    """``dcamkd::mining_weights`` in torch ops (every device; the C++ CPU kernel replaces it on
    CPU tensors when the library is loaded: a linear-time selection instead of a sort)."""
    out = []
    for st, n in zip(stats, rows):
        r = st[: 3 * n].view(3, n)
        d = _ref.cos_distance_from_norms(r[0], r[1], r[2], eps)
        out.append(_ref.mining_weights(d, rule, factor, level).contiguous())
    return out


def _mining_weights_fake(stats, rows, rule, factor, level, eps):
    return [st.new_empty((n,)) for st, n in zip(stats, rows)]


torch.library.define(f"{_library.NS}::mining_weights", MINING_SCHEMA)
torch.library.impl(f"{_library.NS}::mining_weights", "CompositeExplicitAutograd")(_mining_weights_torch)
torch.library.register_fake(f"{_library.NS}::mining_weights")(_mining_weights_fake)


def _row_weights(stats, shapes, mine: str, factor: float, level: Tensor, eps: float) -> list[Tensor]:
    """Per level, the mining weights ``(B*H*W,)`` from the saved channel-CD rows ``|t_p|, |s'_p|,
    t_p.s'_p`` (selection over the level's whole batch on the device: op
    ``dcamkd::mining_weights``, spec :func:`dcamkd.reference.mining_weights`), or an empty
    ``(0,)`` tensor per level without mining."""
    if mine == "none":
        return [st.new_empty((0,)) for st in stats]
    rows = [b * h * w for b, _, h, w in shapes]
    return list(torch.ops.dcamkd.mining_weights(list(stats), rows, mine, float(factor), level, float(eps)))


_library.register_autograd("pyramid_loss", "pyramid_loss_backward", _make_backward, _setup)


def _layout(t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Both NCHW-contiguous, or both channels_last; anything else is made contiguous."""
    if t.is_contiguous() and s.is_contiguous():
        return t, s
    cl = torch.channels_last
    if t.is_contiguous(memory_format=cl) and s.is_contiguous(memory_format=cl):
        return t, s
    return t.contiguous(), s.contiguous()


def check_scalar(name: str, value) -> None:
    """Raise :class:`InvalidArgumentError` naming ``name`` unless ``value`` is a real number or a
    one-element real tensor, finite. A tensor's value is read only on the CPU outside tracing (a
    GPU tensor is not synchronised for it)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise InvalidArgumentError(f"{name}: expected a one-element real tensor, got {value.dtype} of shape "
                                       f"{tuple(value.shape)}")
        if value.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(torch.isfinite(value).all()):
            raise InvalidArgumentError(f"{name}: expected a finite number, got {value.item()!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgumentError(f"{name}: expected a finite number or a one-element tensor, got {value!r}")


def pyramid_terms(
    teachers: Sequence[Tensor],
    students: Sequence[Tensor],
    channel_gates: Optional[Sequence[Optional[Tensor]]] = None,
    spatial_gates: Optional[Sequence[Optional[Tensor]]] = None,
    cos: str = "channel",
    kl: str = "spatial",
    tau: float = 1.0,
    kd_reduction: str = "sum_c",
    eps: float = _ref.DEFAULT_EPS,
    mine: str = "none",
    mine_factor: float = 1.0,
    mine_level=None,
) -> Tensor:
    """Cosine and KL terms of every pyramid level, fused (spec: :func:`dcamkd.reference.pyramid_terms`).

    The implementation is the one of :func:`dcamkd.ops.use` / ``DCAMKD_IMPL`` (default: the fused
    kernel of the tensors' device).

    Args:
        teachers, students: lists of ``(B, C_l, H_l, W_l)`` maps (float16/bfloat16/float32/
            float64), equal shapes per level; NCHW-contiguous or channels_last (other layouts
            are made contiguous). Gradients flow to the students and, when they require grad,
            to the teachers.
        channel_gates: per level ``(B, C_l)`` DCAM channel gate ``a`` or None.
        spatial_gates: per level ``(B, H_l, W_l)`` spatial gate ``m`` or None. The student is
            gated as ``a_c * m_p * s`` inside the op; the gated copy is never written.
        cos: ``'channel' | 'spatial' | 'global' | 'none'``; kl: ``'spatial' | 'channel' | 'none'``.
        tau: softmax temperature (> 0), no ``tau**2`` factor.
        kd_reduction: ``'sum_c'`` (sum over channels, mean over batch) or ``'mean_c'``.
        eps: lower bound of the norms in the cosine distance.
        mine: hard mining of the cosine term's gradient (``'none' | 'quantile' | 'zscore'``,
            with ``cos`` channel or global; :func:`dcamkd.reference.level_terms`).
        mine_factor: gradient factor of the easy locations, in [0, 1].
        mine_level: current quantile ``p`` or z-score ``alpha``: a 0-dim tensor (or a float;
            a tensor avoids recompiles under ``torch.compile``); required with mining.

    Returns:
        ``(L, 2)`` tensor, float32 (float64 for float64 inputs): column 0 the cosine term, column
        1 the KL term of each level (method.md section 4). Non-finite where an input is.

    Raises:
        InvalidArgumentError: unknown mode or implementation, ``tau <= 0``, mining with another
            cosine term, without ``mine_level`` or with a non-finite one, ``mine_factor``
            outside [0, 1].
        ShapeMismatchError: level counts, shapes or devices that do not agree, no level, an
            empty level.
        BuildError: the implementation in force needs kernels that cannot be built.
    """
    if cos not in _ref.COS_MODES:
        raise InvalidArgumentError(f"cos must be one of {_ref.COS_MODES}, got {cos!r}")
    if kl not in _ref.KL_MODES:
        raise InvalidArgumentError(f"kl must be one of {_ref.KL_MODES}, got {kl!r}")
    if kd_reduction not in _ref.KD_REDUCTIONS:
        raise InvalidArgumentError(
            f"kd_reduction must be one of {_ref.KD_REDUCTIONS}, got {kd_reduction!r}")
    if not tau > 0:
        raise InvalidArgumentError(f"tau must be > 0, got {tau!r}")
    if mine not in _ref.MINE_RULES:
        raise InvalidArgumentError(f"mine must be one of {_ref.MINE_RULES}, got {mine!r}")
    if mine != "none":
        if cos not in MINE_COS_MODES:
            raise InvalidArgumentError(f"mine: mining needs cos in {MINE_COS_MODES}, got cos={cos!r}")
        if mine_level is None:
            raise InvalidArgumentError("mine_level: expected the current p or alpha (0-dim tensor), got None")
        check_scalar("mine_level", mine_level)
        if isinstance(mine_factor, bool) or not isinstance(mine_factor, (int, float)) \
                or not 0.0 <= mine_factor <= 1.0:
            raise InvalidArgumentError(f"mine_factor: expected a number in [0, 1], got {mine_factor!r}")
    n = len(students)
    if any(s.numel() == 0 for s in students):
        raise ShapeMismatchError(f"students: every level needs B, C, H, W >= 1, got shapes "
                                 f"{[tuple(s.shape) for s in students]}")
    if n == 0 or len(teachers) != n:
        raise ShapeMismatchError(
            f"teachers and students must be non-empty lists of equal length, got {len(teachers)} and {n}")
    cg = list(channel_gates) if channel_gates is not None else [None] * n
    sg = list(spatial_gates) if spatial_gates is not None else [None] * n
    if len(cg) != n or len(sg) != n:
        raise ShapeMismatchError(
            f"channel_gates/spatial_gates must have one entry per level ({n}), got {len(cg)}/{len(sg)}")
    for i, (t, s, a, m) in enumerate(zip(teachers, students, cg, sg)):
        if t.dim() != 4 or t.shape != s.shape:
            raise ShapeMismatchError(
                f"level {i}: teacher and student must be equal (B, C, H, W) shapes, got "
                f"{tuple(t.shape)} and {tuple(s.shape)}")
        if t.device != s.device or s.device != students[0].device:
            raise ShapeMismatchError(f"level {i}: all tensors must be on one device")
        b, c, h, w = s.shape
        if a is not None and tuple(a.shape) != (b, c):
            raise ShapeMismatchError(f"channel_gates[{i}] must be (B, C)=({b}, {c}), got {tuple(a.shape)}")
        if m is not None and tuple(m.shape) != (b, h, w):
            raise ShapeMismatchError(
                f"spatial_gates[{i}] must be (B, H, W)=({b}, {h}, {w}), got {tuple(m.shape)}")
    impl = _impl.resolve(students[0].device)
    dev = students[0].device
    level = torch.as_tensor(0.0 if mine_level is None else mine_level, dtype=torch.float64, device=dev)
    if impl == "reference":
        return _ref.pyramid_terms(teachers, students, cg, sg, cos, kl, tau, kd_reduction, eps, mine,
                                  float(mine_factor), level)
    dtype = students[0].dtype
    for t in list(teachers) + list(students):
        dtype = torch.promote_types(dtype, t.dtype)
    acc = _ref.acc_dtype(dtype)
    ts, ss = [], []
    for t, s in zip(teachers, students):
        t, s = _layout(t.to(dtype), s.to(dtype))
        ts.append(t)
        ss.append(s)
    # "no gate" travels as an empty (0,) tensor (see the op contract above)
    none = ss[0].new_empty((0,), dtype=acc)
    cg = [a.to(acc).contiguous() if a is not None else none for a in cg]
    sg = [m.to(acc).contiguous() if m is not None else none for m in sg]
    op = torch.ops.dcamkd.pyramid_loss_triton if impl == "triton" else torch.ops.dcamkd.pyramid_loss
    terms, _ = op(ts, ss, cg, sg, cos, kl, float(tau), kd_reduction, float(eps), mine, float(mine_factor),
                  level.reshape(()))
    return terms
