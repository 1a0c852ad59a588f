"""DCAM attention pieces as fused ops: ``dcamkd::channel_pool``, ``dcamkd::spatial_pool``,
``dcamkd::apply_gates`` and their backward ops (C++ kernels: ``csrc/cpu/attention.cpp``,
``csrc/cuda/attention.cu``), their Triton twins ``dcamkd::<op>_triton``
(:mod:`dcamkd.kernels.attention`), and the wrappers :func:`channel_pool`, :func:`spatial_pool`,
:func:`apply_gates` (method.md section 3; CBAM, Woo et al. 2018, eqs. 2-3).

Op contract (all implementations; ``acc`` = float32, float64 for float64 inputs; ``x``/``s``
NCHW-contiguous or channels_last, gates contiguous in ``acc``)
---------------------------------------------------------------------------------------------
``channel_pool(Tensor x) -> (Tensor avg, Tensor max)``: ``(B, C)`` each, ``acc``; one read of x.
``channel_pool_backward(Tensor grad_avg, Tensor grad_max, Tensor x, Tensor max) -> Tensor``: grad
of x (dtype/layout of x): ``grad_avg / HW + grad_max * [x == max] / ties``: the max gradient is
split evenly between tied maxima, as autograd through ``torch.amax`` (one pass: the CPU kernel
writes the gradient of a single maximum while counting ties, and revisits only the rows with
several maxima).
``spatial_pool(Tensor x, Tensor? channel_gate) -> (Tensor avg, Tensor max)``: ``(B, H, W)``
each, ``acc``, over the channels of ``a_c * x`` (cbam: the channel-gated map is never written).
``spatial_pool_backward(Tensor grad_avg, Tensor grad_max, Tensor x, Tensor? channel_gate,
Tensor max) -> (Tensor grad_x, Tensor grad_gate)``: ``grad_gate`` ``(B, C)`` or ``(0,)``.
``apply_gates(Tensor s, Tensor? channel_gate, Tensor? spatial_gate) -> Tensor``: ``a_c * m_p * s``
in the dtype and layout of ``s`` (product in ``acc``, rounded once).
``apply_gates_backward(Tensor grad, Tensor s, Tensor? channel_gate, Tensor? spatial_gate)
-> (Tensor grad_s, Tensor grad_channel_gate, Tensor grad_spatial_gate)``: ``ds = a m g``,
``da_c = sum_p m_p s_p g_p``, ``dm_p = sum_c a_c s_c g_c``, in one pass; absent gates give ``(0,)``
tensors; ``grad`` has the layout of ``s``.

Bytes per call for ``N`` elements of ``e`` bytes: pooling forward ``Ne``, backward ``2Ne`` (plus
the rows with tied maxima);
gating forward ``2Ne``, backward ``3Ne``. A NaN in a pooled row gives a NaN average and max.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference as _ref
from ..errors import ShapeMismatchError
from . import _impl, _library

__all__ = ["SCHEMAS", "channel_pool", "spatial_pool", "apply_gates"]

SCHEMAS = {
    "channel_pool": "(Tensor x) -> (Tensor, Tensor)",
    "channel_pool_backward": "(Tensor grad_avg, Tensor grad_max, Tensor x, Tensor max) -> Tensor",
    "spatial_pool": "(Tensor x, Tensor? channel_gate) -> (Tensor, Tensor)",
    "spatial_pool_backward": (
        "(Tensor grad_avg, Tensor grad_max, Tensor x, Tensor? channel_gate, Tensor max) -> (Tensor, Tensor)"),
    "apply_gates": "(Tensor s, Tensor? channel_gate, Tensor? spatial_gate) -> Tensor",
    "apply_gates_backward": (
        "(Tensor grad, Tensor s, Tensor? channel_gate, Tensor? spatial_gate) -> (Tensor, Tensor, Tensor)"),
}


def _acc(dtype):
    return _ref.acc_dtype(dtype)


def _cp_fake(x):
    b, c = x.shape[:2]
    acc = _acc(x.dtype)
    return x.new_empty((b, c), dtype=acc), x.new_empty((b, c), dtype=acc)


def _cpb_fake(grad_avg, grad_max, x, mx):
    return torch.empty_like(x)


def _sp_fake(x, channel_gate):
    b, _, h, w = x.shape
    acc = _acc(x.dtype)
    return x.new_empty((b, h, w), dtype=acc), x.new_empty((b, h, w), dtype=acc)


def _spb_fake(grad_avg, grad_max, x, channel_gate, mx):
    ga = (channel_gate.new_empty(channel_gate.shape) if channel_gate is not None
          else x.new_empty((0,), dtype=_acc(x.dtype)))
    return torch.empty_like(x), ga


def _ag_fake(s, channel_gate, spatial_gate):
    return torch.empty_like(s)


def _agb_fake(grad, s, channel_gate, spatial_gate):
    acc = _acc(s.dtype)
    ga = channel_gate.new_empty(channel_gate.shape) if channel_gate is not None else s.new_empty((0,), dtype=acc)
    gm = spatial_gate.new_empty(spatial_gate.shape) if spatial_gate is not None else s.new_empty((0,), dtype=acc)
    return torch.empty_like(s), ga, gm


_FAKES = {
    "channel_pool": _cp_fake, "channel_pool_backward": _cpb_fake,
    "spatial_pool": _sp_fake, "spatial_pool_backward": _spb_fake,
    "apply_gates": _ag_fake, "apply_gates_backward": _agb_fake,
}


def _triton(name: str):
    def run(*args):
        from ..kernels import attention as kernel

        return getattr(kernel, name)(*args)

    run.__name__ = f"{name}_triton"
    return run


for _name, _schema in SCHEMAS.items():
    _library.define(_name, _schema, _triton(_name), _FAKES[_name])


def _cp_setup(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x, output[1])


def _make_cp_backward(backward_op):
    def _backward(ctx, g_avg, g_max):
        _impl.forbid_double_backward("channel_pool")
        x, mx = ctx.saved_tensors
        acc = _acc(x.dtype)
        g_avg = torch.zeros_like(mx) if g_avg is None else g_avg.to(acc).contiguous()
        g_max = torch.zeros_like(mx) if g_max is None else g_max.to(acc).contiguous()
        return backward_op(g_avg, g_max, x, mx)

    return _backward


def _sp_setup(ctx, inputs, output):
    x, a = inputs
    ctx.has_gate = a is not None
    ctx.save_for_backward(x, a, output[1])


def _make_sp_backward(backward_op):
    def _backward(ctx, g_avg, g_max):
        _impl.forbid_double_backward("spatial_pool")
        x, a, mx = ctx.saved_tensors
        acc = _acc(x.dtype)
        g_avg = torch.zeros_like(mx) if g_avg is None else g_avg.to(acc).contiguous()
        g_max = torch.zeros_like(mx) if g_max is None else g_max.to(acc).contiguous()
        gx, ga = backward_op(g_avg, g_max, x, a, mx)
        return gx, (ga if ctx.has_gate else None)

    return _backward


def _ag_setup(ctx, inputs, output):
    s, a, m = inputs
    ctx.has = (a is not None, m is not None)
    ctx.save_for_backward(s, a, m)


def _make_ag_backward(backward_op):
    def _backward(ctx, grad):
        _impl.forbid_double_backward("apply_gates")
        s, a, m = ctx.saved_tensors
        gs, ga, gm = backward_op(grad.contiguous(memory_format=_fmt(s)), s, a, m)
        return gs, (ga if ctx.has[0] else None), (gm if ctx.has[1] else None)

    return _backward


_library.register_autograd("channel_pool", "channel_pool_backward", _make_cp_backward, _cp_setup)
_library.register_autograd("spatial_pool", "spatial_pool_backward", _make_sp_backward, _sp_setup)
_library.register_autograd("apply_gates", "apply_gates_backward", _make_ag_backward, _ag_setup)


def _fmt(x: Tensor):
    if x.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last


def _prep(x: Tensor, name: str) -> Tensor:
    if x.dim() != 4:
        raise ShapeMismatchError(f"{name} must be a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def channel_pool(x: Tensor) -> tuple[Tensor, Tensor]:
    """Average and max over ``H*W`` of each channel in one read (CBAM channel attention input,
    Woo et al. 2018, eq. 2; spec :func:`dcamkd.reference.channel_pool`). The implementation is
    the one of :func:`dcamkd.ops.use` / ``DCAMKD_IMPL``.

    Args:
        x: ``(B, C, H, W)``, any float dtype, NCHW or channels_last.

    Returns:
        ``(avg, max)``, two ``(B, C)`` tensors, float32 (float64 for float64 input).

    Raises:
        ShapeMismatchError: ``x`` is not 4-D. InvalidArgumentError, BuildError: see
        :func:`dcamkd.ops.resolve`.
    """
    x = _prep(x, "x")
    impl = _impl.resolve(x.device)
    if impl == "reference":
        return _ref.channel_pool(x)
    op = torch.ops.dcamkd.channel_pool_triton if impl == "triton" else torch.ops.dcamkd.channel_pool
    return tuple(op(x))


def spatial_pool(x: Tensor, channel_gate: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Mean and max over channels at each location of ``a_c * x`` in one read (CBAM spatial
    attention input, Woo et al. 2018, eq. 3; for cbam the channel gate ``a`` goes in, so the
    channel-gated map is never written; spec :func:`dcamkd.reference.spatial_pool`).

    Args:
        x: ``(B, C, H, W)``. channel_gate: ``(B, C)`` or None.

    Returns:
        ``(avg, max)``, two ``(B, H, W)`` tensors, float32 (float64 for float64 input).

    Raises:
        ShapeMismatchError: wrong shapes. InvalidArgumentError, BuildError: see
        :func:`dcamkd.ops.resolve`.
    """
    x = _prep(x, "x")
    if channel_gate is not None and tuple(channel_gate.shape) != tuple(x.shape[:2]):
        raise ShapeMismatchError(
            f"channel_gate must be (B, C)={tuple(x.shape[:2])}, got {tuple(channel_gate.shape)}")
    impl = _impl.resolve(x.device)
    if impl == "reference":
        return _ref.spatial_pool(x, channel_gate)
    a = channel_gate.to(_acc(x.dtype)).contiguous() if channel_gate is not None else None
    op = torch.ops.dcamkd.spatial_pool_triton if impl == "triton" else torch.ops.dcamkd.spatial_pool
    return tuple(op(x, a))


def apply_gates(s: Tensor, channel_gate: Optional[Tensor] = None, spatial_gate: Optional[Tensor] = None) -> Tensor:
    """DCAM gating ``a_c * m_p * s`` in one pass (method.md section 3; spec
    :func:`dcamkd.reference.apply_gates`), for callers that need the attended map itself.

    Args:
        s: ``(B, C, H, W)``. channel_gate: ``(B, C)`` or None. spatial_gate: ``(B, H, W)`` or None.

    Returns:
        ``(B, C, H, W)`` in the dtype and layout of ``s`` (the product is formed in float32, or
        float64 for float64 input, and rounded once).

    Raises:
        ShapeMismatchError: wrong shapes. InvalidArgumentError, BuildError: see
        :func:`dcamkd.ops.resolve`.
    """
    s = _prep(s, "s")
    b, c, h, w = s.shape
    if channel_gate is not None and tuple(channel_gate.shape) != (b, c):
        raise ShapeMismatchError(f"channel_gate must be (B, C)=({b}, {c}), got {tuple(channel_gate.shape)}")
    if spatial_gate is not None and tuple(spatial_gate.shape) != (b, h, w):
        raise ShapeMismatchError(
            f"spatial_gate must be (B, H, W)=({b}, {h}, {w}), got {tuple(spatial_gate.shape)}")
    impl = _impl.resolve(s.device)
    if impl == "reference":
        return _ref.apply_gates(s, channel_gate, spatial_gate)
    acc = _acc(s.dtype)
    a = channel_gate.to(acc).contiguous() if channel_gate is not None else None
    m = spatial_gate.to(acc).contiguous() if spatial_gate is not None else None
    op = torch.ops.dcamkd.apply_gates_triton if impl == "triton" else torch.ops.dcamkd.apply_gates
    return op(s, a, m)
