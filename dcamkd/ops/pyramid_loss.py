"""Fused pyramid distillation loss: op ``dcamkd::pyramid_loss`` and its backward.

One call computes, for every pyramid level, the cosine term (channel CD or spatial CD) and the KL
term (spatial KD or channel KD) of the DCAM-gated student ``a_c * m_p * s`` against the teacher
(method.md section 4; DCAM, Jena et al. 2024, section 3.2), without writing the gated copy.

Gradient strategy: *one backward pass with saved row statistics* (not Liger's
gradient-in-forward, which would need one ``S``-sized buffer per term since ``grad_output`` is an
``(L, 2)`` tensor). The forward reads T and S once and saves, per row, three numbers per term
(cosine: ``|t|, |s'|, t.s'``; KL: ``lse_t, lse_s, KL`` with ``lse_x = log sum exp(x / tau)``). The
backward reads T and S once more and writes ``dS`` (and ``dT`` when the teacher requires grad),
forming the gate gradients in the same pass. Bytes moved per level of ``N`` elements of ``e``
bytes: forward ``2Ne``, backward ``3Ne`` (``4Ne`` with ``dT``); the saved stats are
``3 * B * (HW or C) * 4`` bytes per term. No softmax, log-softmax or normalised copy is kept.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import reference as _ref
from ..errors import InvalidArgumentError, ShapeMismatchError
from . import _backend

OP = "pyramid_loss"

_FWD_SCHEMA = (
    "pyramid_loss(Tensor[] teachers, Tensor[] students, Tensor[] channel_gates, "
    "Tensor[] spatial_gates, str cos, str kl, float tau, str kd_reduction, float eps, "
    "str backend) -> (Tensor, Tensor[])"
)
_BWD_SCHEMA = (
    "pyramid_loss_backward(Tensor grad_terms, Tensor[] teachers, Tensor[] students, "
    "Tensor[] channel_gates, Tensor[] spatial_gates, Tensor[] stats, str cos, str kl, "
    "float tau, str kd_reduction, float eps, bool teacher_grad, str backend) "
    "-> (Tensor[], Tensor[], Tensor[], Tensor[])"
)

torch.library.define("dcamkd::" + _FWD_SCHEMA.split("(", 1)[0], "(" + _FWD_SCHEMA.split("(", 1)[1])
torch.library.define("dcamkd::" + _BWD_SCHEMA.split("(", 1)[0], "(" + _BWD_SCHEMA.split("(", 1)[1])


def stats_numel(shape: Sequence[int], cos: str, kl: str) -> int:
    """Length of the saved-statistics vector of one level of shape ``(B, C, H, W)``:
    ``3 * B * R_cos + 3 * B * R_kl`` with ``R = H*W`` for channel modes, ``C`` for spatial modes,
    0 for ``'none'``."""
    b, c, h, w = shape
    r = {"channel": h * w, "spatial": c, "none": 0}
    rk = {"channel": h * w, "spatial": c, "none": 0}
    return 3 * b * r[cos] + 3 * b * rk[kl]


def _acc(dtype):
    return _ref.acc_dtype(dtype)


@torch.library.register_fake("dcamkd::pyramid_loss")
def _fwd_fake(teachers, students, channel_gates, spatial_gates, cos, kl, tau, kd_reduction, eps, backend):
    acc = _acc(students[0].dtype)
    terms = students[0].new_empty((len(students), 2), dtype=acc)
    stats = [s.new_empty((stats_numel(s.shape, cos, kl),), dtype=acc) for s in students]
    return terms, stats


@torch.library.register_fake("dcamkd::pyramid_loss_backward")
def _bwd_fake(grad_terms, teachers, students, channel_gates, spatial_gates, stats, cos, kl, tau,
              kd_reduction, eps, teacher_grad, backend):
    gs = [torch.empty_like(s) for s in students]
    gt = [torch.empty_like(t) for t in teachers] if teacher_grad else []
    ga = [a.new_empty(a.shape) for a in channel_gates]
    gm = [m.new_empty(m.shape) for m in spatial_gates]
    return gs, gt, ga, gm


def _impl_fwd(*args):
    return _backend.run_kernel(OP, args[-1], *args[:-1])


def _impl_bwd(*args):
    return _backend.run_kernel(OP + "_backward", args[-1], *args[:-1])


for _dev in ("cpu", "cuda"):
    torch.library.impl("dcamkd::pyramid_loss", _dev)(_impl_fwd)
    torch.library.impl("dcamkd::pyramid_loss_backward", _dev)(_impl_bwd)


def _setup(ctx, inputs, output):
    teachers, students, cg, sg, cos, kl, tau, red, eps, backend = inputs
    _, stats = output
    ctx.n = len(students)
    ctx.args = (cos, kl, tau, red, eps, backend)
    ctx.teacher_grad = any(t.requires_grad for t in teachers)
    ctx.cg_mask = [a.numel() > 0 for a in cg]
    ctx.sg_mask = [m.numel() > 0 for m in sg]
    ctx.save_for_backward(*teachers, *students, *cg, *sg, *stats)


def _backward(ctx, grad_terms, grad_stats):
    _backend.forbid_double_backward("pyramid_loss")
    n = ctx.n
    saved = list(ctx.saved_tensors)
    teachers, students = saved[:n], saved[n:2 * n]
    cg, sg, stats = saved[2 * n:3 * n], saved[3 * n:4 * n], saved[4 * n:5 * n]
    cos, kl, tau, red, eps, backend = ctx.args
    gs, gt, ga, gm = torch.ops.dcamkd.pyramid_loss_backward(
        grad_terms.contiguous(), teachers, students, cg, sg, stats, cos, kl, tau, red, eps,
        ctx.teacher_grad, backend)
    g_teachers = list(gt) if ctx.teacher_grad else [None] * n
    g_cg = [g if has else None for g, has in zip(ga, ctx.cg_mask)]
    g_sg = [g if has else None for g, has in zip(gm, ctx.sg_mask)]
    return g_teachers, list(gs), g_cg, g_sg, None, None, None, None, None, None


torch.library.register_autograd("dcamkd::pyramid_loss", _backward, setup_context=_setup)


def _layout(t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Both NCHW-contiguous, or both channels_last; anything else is made contiguous."""
    if t.is_contiguous() and s.is_contiguous():
        return t, s
    cl = torch.channels_last
    if t.is_contiguous(memory_format=cl) and s.is_contiguous(memory_format=cl):
        return t, s
    return t.contiguous(), s.contiguous()


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
    backend: Optional[str] = None,
) -> Tensor:
    """Cosine and KL terms of every pyramid level, fused (spec: :func:`dcamkd.reference.pyramid_terms`).

    Args:
        teachers, students: lists of ``(B, C_l, H_l, W_l)`` maps (float16/bfloat16/float32/
            float64), equal shapes per level; NCHW-contiguous or channels_last (other layouts
            are made contiguous). Gradients flow to the students and, when they require grad,
            to the teachers.
        channel_gates: per level ``(B, C_l)`` DCAM channel gate ``a`` or None.
        spatial_gates: per level ``(B, H_l, W_l)`` spatial gate ``m`` or None. The student is
            gated as ``a_c * m_p * s`` inside the op; the gated copy is never written.
        cos: ``'channel' | 'spatial' | 'none'``; kl: ``'spatial' | 'channel' | 'none'``.
        tau: softmax temperature (> 0), no ``tau**2`` factor.
        kd_reduction: ``'sum_c'`` (sum over channels, mean over batch) or ``'mean_c'``.
        eps: lower bound of the norms in the cosine distance.
        backend: ``'auto' | 'reference' | 'cpu' | 'triton' | 'cuda'`` (default: env
            ``DCAMKD_BACKEND``, else ``'auto'``).

    Returns:
        ``(L, 2)`` tensor, float32 (float64 for float64 inputs): column 0 the cosine term, column
        1 the KL term of each level (method.md section 4).

    Raises:
        InvalidArgumentError: unknown mode or backend, ``tau <= 0``, no level.
        ShapeMismatchError: level counts, shapes or devices that do not agree.
        BuildError: ``backend='cpu'`` (or strict mode) and the C++ extension cannot be built.
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
    n = len(students)
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
    be = _backend.resolve(OP, students[0].device, backend)
    if be == "reference":
        _backend.record(OP, "reference")
        return _ref.pyramid_terms(teachers, students, cg, sg, cos, kl, tau, kd_reduction, eps)
    dtype = students[0].dtype
    for t in list(teachers) + list(students):
        dtype = torch.promote_types(dtype, t.dtype)
    acc = _acc(dtype)
    ts, ss = [], []
    for t, s in zip(teachers, students):
        t, s = _layout(t.to(dtype), s.to(dtype))
        ts.append(t)
        ss.append(s)
    # "no gate" travels as an empty (0,) tensor: a Tensor?[] argument would hide the gates
    # from autograd (torch.library treats a list holding None as one non-tensor leaf)
    none = ss[0].new_empty((0,), dtype=acc)
    cg = [a.to(acc).contiguous() if a is not None else none for a in cg]
    sg = [m.to(acc).contiguous() if m is not None else none for m in sg]
    terms, _ = torch.ops.dcamkd.pyramid_loss(ts, ss, cg, sg, cos, kl, float(tau), kd_reduction,
                                             float(eps), be)
    return terms
