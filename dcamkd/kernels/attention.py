"""Triton kernels of the DCAM attention pieces: pooling (forward/backward) and gating.

Spec: :func:`dcamkd.reference.channel_pool`, :func:`dcamkd.reference.spatial_pool` and
:func:`dcamkd.reference.apply_gates` (method.md section 3; CBAM, Woo et al. 2018, eqs. 2-3).

* Channel pooling: rows ``(b, c)`` are contiguous over ``H*W``; a program owns ``BR`` rows and
  loops over locations in chunks of ``BP``, one read of ``x`` for both the mean and the max.
* Spatial pooling (optionally of ``a_c * x`` for cbam): a program owns ``BP`` locations of one
  image (coalesced over ``p``) and loops over channels.
* The max's gradient is shared equally among tied maxima, like autograd through ``amax``: the
  forward also returns the tie count.
* Gating ``a_c * m_p * s``: one pass for the output; one pass for ``ds`` with the gate
  gradients as reductions (``da`` per (b, c), ``dm`` per (b, p)).

Accumulation in float32 (float64 for float64 inputs), int64 offsets. Inputs are made
NCHW-contiguous by the host functions.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import ShapeMismatchError
from ._common import acc_torch_dtype, check_device, check_gates, contig, next_pow2

__all__ = ["channel_pool_forward", "channel_pool_backward", "spatial_pool_forward",
           "spatial_pool_backward", "gate_forward", "gate_backward", "channel_pool",
           "spatial_pool", "apply_gates"]

_NEG = -3.0e38


def _acc_tl(dtype):
    return tl.float64 if acc_torch_dtype(dtype) == torch.float64 else tl.float32


@triton.jit
def _cpool_fwd(x_ptr, mean_ptr, max_ptr, cnt_ptr, R, HW,
               ACC: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    mask_r = rows < R
    rows64 = rows.to(tl.int64)
    sm = tl.zeros([BR], ACC)
    mx = tl.full([BR], _NEG, ACC)
    cnt = tl.zeros([BR], ACC)
    for p0 in range(0, HW, BP):
        offs_p = p0 + tl.arange(0, BP)
        mask = mask_r[:, None] & (offs_p < HW)[None, :]
        x = tl.load(x_ptr + rows64[:, None] * HW + offs_p[None, :], mask=mask, other=0.0).to(ACC)
        sm += tl.sum(x, 1)
        xm = tl.where(mask, x, _NEG)
        cm = tl.max(xm, 1)
        cc = tl.sum(tl.where(xm == cm[:, None], 1.0, 0.0), 1).to(ACC)
        cnt = tl.where(cm > mx, cc, tl.where(cm == mx, cnt + cc, cnt))
        mx = tl.maximum(mx, cm)
    tl.store(mean_ptr + rows64, sm / HW, mask=mask_r)
    tl.store(max_ptr + rows64, mx, mask=mask_r)
    tl.store(cnt_ptr + rows64, cnt, mask=mask_r)


@triton.jit
def _cpool_bwd(x_ptr, gmean_ptr, gmax_ptr, max_ptr, cnt_ptr, dx_ptr, R, HW,
               ACC: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    mask_r = rows < R
    rows64 = rows.to(tl.int64)
    gm = tl.load(gmean_ptr + rows64, mask=mask_r, other=0.0).to(ACC) / HW
    gx = tl.load(gmax_ptr + rows64, mask=mask_r, other=0.0).to(ACC)
    mx = tl.load(max_ptr + rows64, mask=mask_r, other=0.0)
    cnt = tl.load(cnt_ptr + rows64, mask=mask_r, other=1.0)
    gx = gx / cnt
    for p0 in range(0, HW, BP):
        offs_p = p0 + tl.arange(0, BP)
        mask = mask_r[:, None] & (offs_p < HW)[None, :]
        off = rows64[:, None] * HW + offs_p[None, :]
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        dx = gm[:, None] + tl.where(x == mx[:, None], gx[:, None], 0.0)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _spool_fwd(x_ptr, a_ptr, mean_ptr, max_ptr, cnt_ptr, C, HW,
               HAS_A: tl.constexpr, ACC: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = (pid_p * BP + tl.arange(0, BP)).to(tl.int64)
    mask_p = offs_p < HW
    sm = tl.zeros([BP], ACC)
    mx = tl.full([BP], _NEG, ACC)
    cnt = tl.zeros([BP], ACC)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_p[None, :]
        x = tl.load(x_ptr + b * C * HW + offs_c.to(tl.int64)[:, None] * HW + offs_p[None, :],
                    mask=mask, other=0.0).to(ACC)
        if HAS_A:
            x = x * tl.load(a_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC)[:, None]
        sm += tl.sum(x, 0)
        xm = tl.where(mask, x, _NEG)
        cm = tl.max(xm, 0)
        cc = tl.sum(tl.where(xm == cm[None, :], 1.0, 0.0), 0).to(ACC)
        cnt = tl.where(cm > mx, cc, tl.where(cm == mx, cnt + cc, cnt))
        mx = tl.maximum(mx, cm)
    o = b * HW + offs_p
    tl.store(mean_ptr + o, sm / C, mask=mask_p)
    tl.store(max_ptr + o, mx, mask=mask_p)
    tl.store(cnt_ptr + o, cnt, mask=mask_p)


@triton.jit
def _spool_bwd(x_ptr, a_ptr, gmean_ptr, gmax_ptr, max_ptr, cnt_ptr, dx_ptr, dap_ptr,
               C, HW, NPB, HAS_A: tl.constexpr, NEED_X: tl.constexpr, NEED_A: tl.constexpr,
               ACC: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = (pid_p * BP + tl.arange(0, BP)).to(tl.int64)
    mask_p = offs_p < HW
    o = b * HW + offs_p
    gm = tl.load(gmean_ptr + o, mask=mask_p, other=0.0).to(ACC) / C
    gx = tl.load(gmax_ptr + o, mask=mask_p, other=0.0).to(ACC)
    mx = tl.load(max_ptr + o, mask=mask_p, other=0.0)
    cnt = tl.load(cnt_ptr + o, mask=mask_p, other=1.0)
    gx = gx / cnt
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_p[None, :]
        off = b * C * HW + offs_c.to(tl.int64)[:, None] * HW + offs_p[None, :]
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        xa = x
        if HAS_A:
            av = tl.load(a_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC)
            xa = x * av[:, None]
        gxa = tl.where(mask, gm[None, :] + tl.where(xa == mx[None, :], gx[None, :], 0.0), 0.0)
        if NEED_X:
            dx = gxa
            if HAS_A:
                dx = dx * av[:, None]
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_A:
            tl.store(dap_ptr + (b * C + offs_c) * NPB + pid_p, tl.sum(gxa * x, 1), mask=mask_c)


@triton.jit
def _gate_fwd(s_ptr, a_ptr, m_ptr, out_ptr, C, HW,
              HAS_A: tl.constexpr, HAS_M: tl.constexpr,
              ACC: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = (pid_p * BP + tl.arange(0, BP)).to(tl.int64)
    mask_p = offs_p < HW
    if HAS_M:
        mv = tl.load(m_ptr + b * HW + offs_p, mask=mask_p, other=0.0).to(ACC)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_p[None, :]
        off = b * C * HW + offs_c.to(tl.int64)[:, None] * HW + offs_p[None, :]
        x = tl.load(s_ptr + off, mask=mask, other=0.0).to(ACC)
        if HAS_A:
            x = x * tl.load(a_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC)[:, None]
        if HAS_M:
            x = x * mv[None, :]
        tl.store(out_ptr + off, x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd(go_ptr, s_ptr, a_ptr, m_ptr, ds_ptr, dap_ptr, dm_ptr, C, HW, NPB,
              HAS_A: tl.constexpr, HAS_M: tl.constexpr, NEED_S: tl.constexpr,
              NEED_A: tl.constexpr, NEED_M: tl.constexpr,
              ACC: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = (pid_p * BP + tl.arange(0, BP)).to(tl.int64)
    mask_p = offs_p < HW
    if HAS_M:
        mv = tl.load(m_ptr + b * HW + offs_p, mask=mask_p, other=0.0).to(ACC)
    dm = tl.zeros([BP], ACC)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_p[None, :]
        off = b * C * HW + offs_c.to(tl.int64)[:, None] * HW + offs_p[None, :]
        go = tl.load(go_ptr + off, mask=mask, other=0.0).to(ACC)
        if HAS_A:
            av = tl.load(a_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC)
        if NEED_S:
            ds = go
            if HAS_A:
                ds = ds * av[:, None]
            if HAS_M:
                ds = ds * mv[None, :]
            tl.store(ds_ptr + off, ds.to(ds_ptr.dtype.element_ty), mask=mask)
        if NEED_A or NEED_M:
            s = tl.load(s_ptr + off, mask=mask, other=0.0).to(ACC)
            gs = go * s
            if NEED_A:
                ga = gs
                if HAS_M:
                    ga = ga * mv[None, :]
                tl.store(dap_ptr + (b * C + offs_c) * NPB + pid_p, tl.sum(ga, 1), mask=mask_c)
            if NEED_M:
                gm = gs
                if HAS_A:
                    gm = gm * av[:, None]
                dm += tl.sum(gm, 0)
    if NEED_M:
        tl.store(dm_ptr + b * HW + offs_p, dm, mask=mask_p)


def _check_map(name: str, x: Tensor) -> None:
    check_device(name, x)
    if x.dim() != 4:
        raise ShapeMismatchError(f"{name}: expected a (B, C, H, W) map, got shape {tuple(x.shape)}")


def channel_pool_forward(x: Tensor, block_r: int = 16, block_p: int = 256):
    """Mean and max over ``H*W`` of each ``(b, c)``: ``(B, C, H, W)`` -> ``mean, max, count``,
    each ``(B, C)`` in the accumulation dtype (``count``: number of tied maxima, for backward)."""
    _check_map("x", x)
    B, C, H, W = x.shape
    HW, R = H * W, B * C
    x = contig(x)
    acc = acc_torch_dtype(x.dtype)
    mean, mx, cnt = (torch.empty((B, C), device=x.device, dtype=acc) for _ in range(3))
    BR = min(block_r, next_pow2(R))
    _cpool_fwd[(triton.cdiv(R, BR),)](x, mean, mx, cnt, R, HW, ACC=_acc_tl(x.dtype), BR=BR,
                                      BP=min(block_p, next_pow2(HW)), num_warps=4)
    return mean, mx, cnt


def channel_pool_backward(x: Tensor, grad_mean: Optional[Tensor], grad_max: Optional[Tensor],
                          mx: Tensor, cnt: Tensor, block_r: int = 16, block_p: int = 256) -> Tensor:
    """Gradient of :func:`channel_pool_forward` with respect to ``x`` (dtype of ``x``)."""
    B, C, H, W = x.shape
    HW, R = H * W, B * C
    x = contig(x)
    z = torch.zeros_like(mx)
    gm = contig(grad_mean) if grad_mean is not None else z
    gx = contig(grad_max) if grad_max is not None else z
    dx = torch.empty_like(x)
    BR = min(block_r, next_pow2(R))
    _cpool_bwd[(triton.cdiv(R, BR),)](x, gm, gx, mx, cnt, dx, R, HW, ACC=_acc_tl(x.dtype), BR=BR,
                                      BP=min(block_p, next_pow2(HW)), num_warps=4)
    return dx


def spatial_pool_forward(x: Tensor, channel_gate: Optional[Tensor] = None,
                         block_c: int = 32, block_p: int = 128):
    """Mean and max over channels of ``a_c * x`` at each location: ``(B, C, H, W)`` (and
    optional ``(B, C)`` gate) -> ``mean, max, count``, each ``(B, H, W)``, accumulation dtype."""
    _check_map("x", x)
    B, C, H, W = x.shape
    check_gates(channel_gate, None, B, C, H, W)
    HW = H * W
    x, a = contig(x), contig(channel_gate)
    acc = acc_torch_dtype(x.dtype)
    mean, mx, cnt = (torch.empty((B, H, W), device=x.device, dtype=acc) for _ in range(3))
    BP = min(block_p, next_pow2(HW))
    _spool_fwd[(triton.cdiv(HW, BP), B)](x, a if a is not None else x, mean, mx, cnt, C, HW,
                                         HAS_A=a is not None, ACC=_acc_tl(x.dtype),
                                         BC=min(block_c, next_pow2(C)), BP=BP, num_warps=4)
    return mean, mx, cnt


def spatial_pool_backward(x: Tensor, channel_gate: Optional[Tensor], grad_mean: Optional[Tensor],
                          grad_max: Optional[Tensor], mx: Tensor, cnt: Tensor,
                          need_x: bool = True, need_a: bool = True,
                          block_c: int = 32, block_p: int = 128):
    """Gradients of :func:`spatial_pool_forward`: ``(dx, da)`` in the dtypes of ``x`` and the
    gate (``da`` None without a gate or when not requested)."""
    B, C, H, W = x.shape
    HW = H * W
    x, a = contig(x), contig(channel_gate)
    need_a = need_a and a is not None
    acc = acc_torch_dtype(x.dtype)
    z = torch.zeros_like(mx)
    gm = contig(grad_mean) if grad_mean is not None else z
    gx = contig(grad_max) if grad_max is not None else z
    BP = min(block_p, next_pow2(HW))
    NPB = triton.cdiv(HW, BP)
    dx = torch.empty_like(x) if need_x else None
    dap = torch.empty((B, C, NPB), device=x.device, dtype=acc) if need_a else None
    _spool_bwd[(NPB, B)](x, a if a is not None else x, gm, gx, mx, cnt,
                         dx if dx is not None else x, dap if dap is not None else mx,
                         C, HW, NPB, HAS_A=a is not None, NEED_X=need_x, NEED_A=need_a,
                         ACC=_acc_tl(x.dtype), BC=min(block_c, next_pow2(C)), BP=BP, num_warps=4)
    return dx, (dap.sum(-1).to(channel_gate.dtype) if need_a else None)


def gate_forward(s: Tensor, channel_gate: Optional[Tensor] = None,
                 spatial_gate: Optional[Tensor] = None, block_c: int = 32, block_p: int = 128) -> Tensor:
    """``a_c * m_p * s`` in the dtype of ``s`` (products formed in the accumulation dtype, one
    rounding): ``(B, C, H, W)``, gates ``(B, C)`` / ``(B, H, W)`` or None."""
    _check_map("s", s)
    B, C, H, W = s.shape
    check_gates(channel_gate, spatial_gate, B, C, H, W)
    HW = H * W
    s, a, m = contig(s), contig(channel_gate), contig(spatial_gate)
    out = torch.empty_like(s)
    BP = min(block_p, next_pow2(HW))
    _gate_fwd[(triton.cdiv(HW, BP), B)](s, a if a is not None else s, m if m is not None else s,
                                        out, C, HW, HAS_A=a is not None, HAS_M=m is not None,
                                        ACC=_acc_tl(s.dtype), BC=min(block_c, next_pow2(C)),
                                        BP=BP, num_warps=4)
    return out


def gate_backward(grad_out: Tensor, s: Tensor, channel_gate: Optional[Tensor],
                  spatial_gate: Optional[Tensor], need_s: bool = True, need_a: bool = True,
                  need_m: bool = True, block_c: int = 32, block_p: int = 128):
    """Gradients of :func:`gate_forward`: ``(ds, da, dm)`` (None where not requested or absent)."""
    B, C, H, W = s.shape
    HW = H * W
    go, s, a, m = contig(grad_out), contig(s), contig(channel_gate), contig(spatial_gate)
    need_a = need_a and a is not None
    need_m = need_m and m is not None
    acc = acc_torch_dtype(s.dtype)
    BP = min(block_p, next_pow2(HW))
    NPB = triton.cdiv(HW, BP)
    ds = torch.empty_like(s) if need_s else None
    dap = torch.empty((B, C, NPB), device=s.device, dtype=acc) if need_a else None
    dm = torch.empty((B, H, W), device=s.device, dtype=acc) if need_m else None
    _gate_bwd[(NPB, B)](go, s, a if a is not None else s, m if m is not None else s,
                        ds if ds is not None else s, dap if dap is not None else s,
                        dm if dm is not None else s, C, HW, NPB,
                        HAS_A=a is not None, HAS_M=m is not None, NEED_S=need_s,
                        NEED_A=need_a, NEED_M=need_m, ACC=_acc_tl(s.dtype),
                        BC=min(block_c, next_pow2(C)), BP=BP, num_warps=4)
    da = dap.sum(-1).to(channel_gate.dtype) if need_a else None
    return ds, da, (dm.to(spatial_gate.dtype) if need_m else None)


class _ChannelPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        mean, mx, cnt = channel_pool_forward(x)
        ctx.save_for_backward(x, mx, cnt)
        ctx.mark_non_differentiable(cnt)
        return mean, mx

    @staticmethod
    def backward(ctx, gmean, gmax):
        x, mx, cnt = ctx.saved_tensors
        return channel_pool_backward(x, gmean, gmax, mx, cnt)


class _SpatialPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a):
        mean, mx, cnt = spatial_pool_forward(x, a)
        ctx.save_for_backward(x, a, mx, cnt)
        return mean, mx

    @staticmethod
    def backward(ctx, gmean, gmax):
        x, a, mx, cnt = ctx.saved_tensors
        return spatial_pool_backward(x, a, gmean, gmax, mx, cnt,
                                     need_x=ctx.needs_input_grad[0], need_a=ctx.needs_input_grad[1])


class _Gates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, a, m):
        ctx.save_for_backward(s, a, m)
        return gate_forward(s, a, m)

    @staticmethod
    def backward(ctx, go):
        s, a, m = ctx.saved_tensors
        n = ctx.needs_input_grad
        return gate_backward(go, s, a, m, n[0], n[1], n[2])


def channel_pool(x: Tensor):
    """Autograd version of :func:`channel_pool_forward`; same contract as
    :func:`dcamkd.reference.channel_pool` (returns ``mean, max``)."""
    return _ChannelPool.apply(x)


def spatial_pool(x: Tensor, channel_gate: Optional[Tensor] = None):
    """Autograd version; same contract as :func:`dcamkd.reference.spatial_pool`."""
    return _SpatialPool.apply(x, channel_gate)


def apply_gates(s: Tensor, channel_gate: Optional[Tensor] = None,
                spatial_gate: Optional[Tensor] = None) -> Tensor:
    """Autograd version; same contract as :func:`dcamkd.reference.apply_gates`."""
    return _Gates.apply(s, channel_gate, spatial_gate)
