"""DCAM attention pieces as fused ops: ``dcamkd::channel_pool``, ``dcamkd::spatial_pool``,
``dcamkd::apply_gates`` and their backward ops (method.md section 3; CBAM, Woo et al. 2018,
eqs. 2-3).

Pooling computes the average and the max in one read of the map. Max gradients follow
``torch.amax``: the gradient is split evenly between tied maxima (the backward counts ties, then
writes). ``apply_gates`` multiplies ``a_c * m_p * s`` in one pass; its backward forms ``ds`` and
both gate gradients in one pass.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference as _ref
from ..errors import ShapeMismatchError
from . import _backend

_SCHEMAS = {
    "channel_pool": "(Tensor x, str backend) -> (Tensor, Tensor)",
    "channel_pool_backward": "(Tensor grad_avg, Tensor grad_max, Tensor x, Tensor max, str backend) -> Tensor",
    "spatial_pool": "(Tensor x, Tensor? channel_gate, str backend) -> (Tensor, Tensor)",
    "spatial_pool_backward": (
        "(Tensor grad_avg, Tensor grad_max, Tensor x, Tensor? channel_gate, Tensor max, "
        "str backend) -> (Tensor, Tensor)"),
    "apply_gates": "(Tensor s, Tensor? channel_gate, Tensor? spatial_gate, str backend) -> Tensor",
    "apply_gates_backward": (
        "(Tensor grad, Tensor s, Tensor? channel_gate, Tensor? spatial_gate, str backend) "
        "-> (Tensor, Tensor, Tensor)"),
}

for _name, _schema in _SCHEMAS.items():
    torch.library.define("dcamkd::" + _name, _schema)

    def _tramp(*args, _op=_name):
        return _backend.run_kernel(_op, args[-1], *args[:-1])

    for _dev in ("cpu", "cuda"):
        torch.library.impl("dcamkd::" + _name, _dev)(_tramp)


def _acc(dtype):
    return _ref.acc_dtype(dtype)


@torch.library.register_fake("dcamkd::channel_pool")
def _cp_fake(x, backend):
    b, c = x.shape[:2]
    acc = _acc(x.dtype)
    return x.new_empty((b, c), dtype=acc), x.new_empty((b, c), dtype=acc)


@torch.library.register_fake("dcamkd::channel_pool_backward")
def _cpb_fake(grad_avg, grad_max, x, mx, backend):
    return torch.empty_like(x)


@torch.library.register_fake("dcamkd::spatial_pool")
def _sp_fake(x, channel_gate, backend):
    b, _, h, w = x.shape
    acc = _acc(x.dtype)
    return x.new_empty((b, h, w), dtype=acc), x.new_empty((b, h, w), dtype=acc)


@torch.library.register_fake("dcamkd::spatial_pool_backward")
def _spb_fake(grad_avg, grad_max, x, channel_gate, mx, backend):
    ga = (channel_gate.new_empty(channel_gate.shape) if channel_gate is not None
          else x.new_empty((0,), dtype=_acc(x.dtype)))
    return torch.empty_like(x), ga


@torch.library.register_fake("dcamkd::apply_gates")
def _ag_fake(s, channel_gate, spatial_gate, backend):
    return torch.empty_like(s)


@torch.library.register_fake("dcamkd::apply_gates_backward")
def _agb_fake(grad, s, channel_gate, spatial_gate, backend):
    acc = _acc(s.dtype)
    ga = channel_gate.new_empty(channel_gate.shape) if channel_gate is not None else s.new_empty((0,), dtype=acc)
    gm = spatial_gate.new_empty(spatial_gate.shape) if spatial_gate is not None else s.new_empty((0,), dtype=acc)
    return torch.empty_like(s), ga, gm


def _cp_setup(ctx, inputs, output):
    x, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(x, output[1])


def _cp_backward(ctx, g_avg, g_max):
    _backend.forbid_double_backward("channel_pool")
    x, mx = ctx.saved_tensors
    acc = _acc(x.dtype)
    g_avg = torch.zeros_like(mx) if g_avg is None else g_avg.to(acc).contiguous()
    g_max = torch.zeros_like(mx) if g_max is None else g_max.to(acc).contiguous()
    return torch.ops.dcamkd.channel_pool_backward(g_avg, g_max, x, mx, ctx.backend), None


torch.library.register_autograd("dcamkd::channel_pool", _cp_backward, setup_context=_cp_setup)


def _sp_setup(ctx, inputs, output):
    x, a, backend = inputs
    ctx.backend = backend
    ctx.has_gate = a is not None
    ctx.save_for_backward(x, a, output[1])


def _sp_backward(ctx, g_avg, g_max):
    _backend.forbid_double_backward("spatial_pool")
    x, a, mx = ctx.saved_tensors
    acc = _acc(x.dtype)
    g_avg = torch.zeros_like(mx) if g_avg is None else g_avg.to(acc).contiguous()
    g_max = torch.zeros_like(mx) if g_max is None else g_max.to(acc).contiguous()
    gx, ga = torch.ops.dcamkd.spatial_pool_backward(g_avg, g_max, x, a, mx, ctx.backend)
    return gx, (ga if ctx.has_gate else None), None


torch.library.register_autograd("dcamkd::spatial_pool", _sp_backward, setup_context=_sp_setup)


def _ag_setup(ctx, inputs, output):
    s, a, m, backend = inputs
    ctx.backend = backend
    ctx.has = (a is not None, m is not None)
    ctx.save_for_backward(s, a, m)


def _ag_backward(ctx, grad):
    _backend.forbid_double_backward("apply_gates")
    s, a, m = ctx.saved_tensors
    gs, ga, gm = torch.ops.dcamkd.apply_gates_backward(grad.contiguous(memory_format=_fmt(s)), s, a, m,
                                                       ctx.backend)
    return gs, (ga if ctx.has[0] else None), (gm if ctx.has[1] else None), None


torch.library.register_autograd("dcamkd::apply_gates", _ag_backward, setup_context=_ag_setup)


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


def channel_pool(x: Tensor, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Average and max over ``H*W`` of each channel in one read (CBAM channel attention input,
    Woo et al. 2018, eq. 2; spec :func:`dcamkd.reference.channel_pool`).

    Args:
        x: ``(B, C, H, W)``, any float dtype, NCHW or channels_last.
        backend: see :func:`dcamkd.ops.pyramid_terms`.

    Returns:
        ``(avg, max)``, two ``(B, C)`` tensors, float32 (float64 for float64 input).

    Raises:
        ShapeMismatchError: ``x`` is not 4-D. InvalidArgumentError: bad backend.
    """
    x = _prep(x, "x")
    be = _backend.resolve("channel_pool", x.device, backend)
    if be == "reference":
        _backend.record("channel_pool", "reference")
        return _ref.channel_pool(x)
    return tuple(torch.ops.dcamkd.channel_pool(x, be))


def spatial_pool(x: Tensor, channel_gate: Optional[Tensor] = None,
                 backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Mean and max over channels at each location of ``a_c * x`` in one read (CBAM spatial
    attention input, Woo et al. 2018, eq. 3; for cbam the channel gate ``a`` goes in, so the
    channel-gated map is never written; spec :func:`dcamkd.reference.spatial_pool`).

    Args:
        x: ``(B, C, H, W)``. channel_gate: ``(B, C)`` or None. backend: as for pyramid_terms.

    Returns:
        ``(avg, max)``, two ``(B, H, W)`` tensors, float32 (float64 for float64 input).

    Raises:
        ShapeMismatchError: wrong shapes. InvalidArgumentError: bad backend.
    """
    x = _prep(x, "x")
    if channel_gate is not None and tuple(channel_gate.shape) != tuple(x.shape[:2]):
        raise ShapeMismatchError(
            f"channel_gate must be (B, C)={tuple(x.shape[:2])}, got {tuple(channel_gate.shape)}")
    be = _backend.resolve("spatial_pool", x.device, backend)
    if be == "reference":
        _backend.record("spatial_pool", "reference")
        return _ref.spatial_pool(x, channel_gate)
    a = channel_gate.to(_acc(x.dtype)).contiguous() if channel_gate is not None else None
    return tuple(torch.ops.dcamkd.spatial_pool(x, a, be))


def apply_gates(s: Tensor, channel_gate: Optional[Tensor] = None, spatial_gate: Optional[Tensor] = None,
                backend: Optional[str] = None) -> Tensor:
    """DCAM gating ``a_c * m_p * s`` in one pass (method.md section 3; spec
    :func:`dcamkd.reference.apply_gates`), for callers that need the attended map itself.

    Args:
        s: ``(B, C, H, W)``. channel_gate: ``(B, C)`` or None. spatial_gate: ``(B, H, W)`` or None.

    Returns:
        ``(B, C, H, W)`` in the dtype and layout of ``s`` (the product is formed in float32, or
        float64 for float64 input, and rounded once).

    Raises:
        ShapeMismatchError: wrong shapes. InvalidArgumentError: bad backend.
    """
    s = _prep(s, "s")
    b, c, h, w = s.shape
    if channel_gate is not None and tuple(channel_gate.shape) != (b, c):
        raise ShapeMismatchError(f"channel_gate must be (B, C)=({b}, {c}), got {tuple(channel_gate.shape)}")
    if spatial_gate is not None and tuple(spatial_gate.shape) != (b, h, w):
        raise ShapeMismatchError(
            f"spatial_gate must be (B, H, W)=({b}, {h}, {w}), got {tuple(spatial_gate.shape)}")
    be = _backend.resolve("apply_gates", s.device, backend)
    if be == "reference":
        _backend.record("apply_gates", "reference")
        return _ref.apply_gates(s, channel_gate, spatial_gate)
    acc = _acc(s.dtype)
    a = channel_gate.to(acc).contiguous() if channel_gate is not None else None
    m = spatial_gate.to(acc).contiguous() if spatial_gate is not None else None
    return torch.ops.dcamkd.apply_gates(s, a, m, be)
