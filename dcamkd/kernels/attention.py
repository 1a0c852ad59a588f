"""Triton kernels of the DCAM attention pieces: pooling (forward/backward) and gating.

Spec: :func:`dcamkd.reference.channel_pool`, :func:`dcamkd.reference.spatial_pool` and
:func:`dcamkd.reference.apply_gates` (method.md section 3; CBAM, Woo et al. 2018, eqs. 2-3).
Host functions of the ops ``dcamkd::channel_pool(_backward)_triton``,
``spatial_pool(_backward)_triton`` and ``apply_gates(_backward)_triton``, following the op contract
in :mod:`dcamkd.ops.attention`. A NaN in a pooled row gives a NaN mean and max.

* Channel pooling: a program owns ``BR`` rows ``(b, c)`` and loops over locations in chunks of
  ``BP``; one read of ``x`` gives the mean and the max.
* Spatial pooling (optionally of ``a_c * x`` for cbam): a program owns ``BP`` locations of one
  image and loops over channels.
* The max's gradient is shared equally among tied maxima, like autograd through ``amax``. The
  op contract saves only the max, so the backward kernels count the ties in a first loop over
  the row and write the gradient in a second (``x`` read twice in the pooling backward).
* Gating ``a_c * m_p * s``: one pass for the output; one pass for ``ds`` with the gate
  gradients as reductions (``da`` per (b, c), ``dm`` per (b, p)).

Inputs may be NCHW-contiguous or channels_last (addressed through the channel and location
strides; anything else is copied to NCHW once). Accumulation in float32 (float64 for float64
inputs), int64 offsets. Outputs of the pools and gate gradients are in the accumulation dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import ShapeMismatchError
from ._common import acc_torch_dtype, check_device, check_gates, contig, fill_block, launch, next_pow2, sm_count
from .pyramid_loss import GPU_MIN_BLOCK_P

#: On a GPU: the location block of the channel pooling kernels. ``16 x 256`` tiles of the
#: backward spill at 4 warps (float32, channels_last, sm_80; ``benchmarks/gpu_static.py``).
GPU_POOL_BLOCK_P = 128

__all__ = ["channel_pool", "channel_pool_backward", "spatial_pool", "spatial_pool_backward",
           "apply_gates", "apply_gates_backward", "map_layout"]

_NEG = tl.constexpr(-3.0e38)


@triton.jit
def _cpool_fwd(x_ptr, mean_ptr, max_ptr, R, C, HW, sC, sP, BR: tl.constexpr, BP: tl.constexpr):
    ACC = mean_ptr.dtype.element_ty  # the accumulation dtype (outputs)
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    mask_r = rows < R
    rbase = (rows // C) * C * HW + (rows % C) * sC
    # (BR, BP) accumulators reduced once after the loop: Triton's OptimizeThreadLocality pass
    # (GPU compile, sm_80/sm_90) fails on this kernel's loop-carried row reductions
    sm2 = tl.zeros([BR, BP], ACC)
    mx2 = tl.full([BR, BP], _NEG, ACC)
    for p0 in range(0, HW, BP):
        offs_p = (p0 + tl.arange(0, BP)).to(tl.int64)
        mask = mask_r[:, None] & (offs_p < HW)[None, :]
        x = tl.load(x_ptr + rbase[:, None] + offs_p[None, :] * sP, mask=mask, other=0.0).to(ACC)
        sm2 += x
        mx2 = tl.maximum(mx2, tl.where(mask, x, _NEG))
    sm = tl.sum(sm2, 1)
    mx = tl.max(mx2, 1)
    mx = tl.where(sm == sm, mx, sm)  # a NaN in the row makes the max NaN (as torch.amax)
    tl.store(mean_ptr + rows, sm / HW, mask=mask_r)
    tl.store(max_ptr + rows, mx, mask=mask_r)


@triton.jit
def _cpool_bwd(x_ptr, gmean_ptr, gmax_ptr, max_ptr, dx_ptr, R, C, HW, sC, sP, BR: tl.constexpr, BP: tl.constexpr):
    ACC = max_ptr.dtype.element_ty  # the accumulation dtype (saved max)
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    mask_r = rows < R
    rbase = (rows // C) * C * HW + (rows % C) * sC
    gm = tl.load(gmean_ptr + rows, mask=mask_r, other=0.0).to(ACC) / HW
    gx = tl.load(gmax_ptr + rows, mask=mask_r, other=0.0).to(ACC)
    mx = tl.load(max_ptr + rows, mask=mask_r, other=0.0).to(ACC)
    cnt = tl.zeros([BR], ACC)
    for p0 in range(0, HW, BP):
        offs_p = (p0 + tl.arange(0, BP)).to(tl.int64)
        mask = mask_r[:, None] & (offs_p < HW)[None, :]
        x = tl.load(x_ptr + rbase[:, None] + offs_p[None, :] * sP, mask=mask, other=0.0).to(ACC)
        cnt += tl.sum(tl.where(mask & (x == mx[:, None]), 1.0, 0.0), 1).to(ACC)
    gx = gx / tl.maximum(cnt, 1.0)
    for p0 in range(0, HW, BP):
        offs_p = (p0 + tl.arange(0, BP)).to(tl.int64)
        mask = mask_r[:, None] & (offs_p < HW)[None, :]
        off = rbase[:, None] + offs_p[None, :] * sP
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        dx = gm[:, None] + tl.where(x == mx[:, None], gx[:, None], 0.0)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _spool_fwd(x_ptr, a_ptr, mean_ptr, max_ptr, C, HW, sC, sP,
               HAS_A: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
    ACC = mean_ptr.dtype.element_ty  # the accumulation dtype (outputs)
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = (pid_p * BP + tl.arange(0, BP)).to(tl.int64)
    mask_p = offs_p < HW
    sm = tl.zeros([BP], ACC)
    mx = tl.full([BP], _NEG, ACC)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_p[None, :]
        x = tl.load(x_ptr + b * C * HW + offs_c.to(tl.int64)[:, None] * sC + offs_p[None, :] * sP,
                    mask=mask, other=0.0).to(ACC)
        if HAS_A:
            x = x * tl.load(a_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC)[:, None]
        sm += tl.sum(x, 0)
        mx = tl.maximum(mx, tl.max(tl.where(mask, x, _NEG), 0))
    o = b * HW + offs_p
    mx = tl.where(sm == sm, mx, sm)  # a NaN in the row makes the max NaN (as torch.amax)
    tl.store(mean_ptr + o, sm / C, mask=mask_p)
    tl.store(max_ptr + o, mx, mask=mask_p)


@triton.jit
def _spool_bwd(x_ptr, a_ptr, gmean_ptr, gmax_ptr, max_ptr, dx_ptr, dap_ptr,
               C, HW, sC, sP, NPB, HAS_A: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
    ACC = max_ptr.dtype.element_ty  # the accumulation dtype (saved max)
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = (pid_p * BP + tl.arange(0, BP)).to(tl.int64)
    mask_p = offs_p < HW
    o = b * HW + offs_p
    gm = tl.load(gmean_ptr + o, mask=mask_p, other=0.0).to(ACC) / C
    gx = tl.load(gmax_ptr + o, mask=mask_p, other=0.0).to(ACC)
    mx = tl.load(max_ptr + o, mask=mask_p, other=0.0).to(ACC)
    cnt = tl.zeros([BP], ACC)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_p[None, :]
        x = tl.load(x_ptr + b * C * HW + offs_c.to(tl.int64)[:, None] * sC + offs_p[None, :] * sP,
                    mask=mask, other=0.0).to(ACC)
        if HAS_A:
            x = x * tl.load(a_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC)[:, None]
        cnt += tl.sum(tl.where(mask & (x == mx[None, :]), 1.0, 0.0), 0).to(ACC)
    gx = gx / tl.maximum(cnt, 1.0)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_p[None, :]
        off = b * C * HW + offs_c.to(tl.int64)[:, None] * sC + offs_p[None, :] * sP
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        xa = x
        if HAS_A:
            av = tl.load(a_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC)
            xa = x * av[:, None]
        gxa = tl.where(mask, gm[None, :] + tl.where(xa == mx[None, :], gx[None, :], 0.0), 0.0)
        dx = gxa
        if HAS_A:
            dx = dx * av[:, None]
            tl.store(dap_ptr + (b * C + offs_c) * NPB + pid_p, tl.sum(gxa * x, 1), mask=mask_c)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_fwd(s_ptr, a_ptr, m_ptr, out_ptr, C, HW, sC, sP,
              HAS_A: tl.constexpr, HAS_M: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
    if HAS_A:  # the accumulation dtype: the gates'
        ACC = a_ptr.dtype.element_ty
    elif HAS_M:
        ACC = m_ptr.dtype.element_ty
    else:
        ACC = s_ptr.dtype.element_ty
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
        off = b * C * HW + offs_c.to(tl.int64)[:, None] * sC + offs_p[None, :] * sP
        x = tl.load(s_ptr + off, mask=mask, other=0.0).to(ACC)
        if HAS_A:
            x = x * tl.load(a_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC)[:, None]
        if HAS_M:
            x = x * mv[None, :]
        tl.store(out_ptr + off, x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd(go_ptr, s_ptr, a_ptr, m_ptr, ds_ptr, dap_ptr, dm_ptr, C, HW, sC, sP, NPB,
              HAS_A: tl.constexpr, HAS_M: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
    ACC = dap_ptr.dtype.element_ty  # the accumulation dtype (gate-gradient partials)
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
        off = b * C * HW + offs_c.to(tl.int64)[:, None] * sC + offs_p[None, :] * sP
        go = tl.load(go_ptr + off, mask=mask, other=0.0).to(ACC)
        ds = go
        if HAS_A:
            av = tl.load(a_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC)
            ds = ds * av[:, None]
        if HAS_M:
            ds = ds * mv[None, :]
        tl.store(ds_ptr + off, ds.to(ds_ptr.dtype.element_ty), mask=mask)
        if HAS_A or HAS_M:
            gs = go * tl.load(s_ptr + off, mask=mask, other=0.0).to(ACC)
            if HAS_A:
                ga = gs
                if HAS_M:
                    ga = ga * mv[None, :]
                tl.store(dap_ptr + (b * C + offs_c) * NPB + pid_p, tl.sum(ga, 1), mask=mask_c)
            if HAS_M:
                gm = gs
                if HAS_A:
                    gm = gm * av[:, None]
                dm += tl.sum(gm, 0)
    if HAS_M:
        tl.store(dm_ptr + b * HW + offs_p, dm, mask=mask_p)


def map_layout(x: Tensor):
    """``(x, sC, sP)``: ``x`` NCHW-contiguous (``sC = H*W, sP = 1``) or channels_last
    (``sC = 1, sP = C``); other layouts are copied to NCHW once."""
    _, C, H, W = x.shape
    if x.is_contiguous():
        return x, H * W, 1
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, 1, C
    return x.contiguous(), H * W, 1


def _check_map(name: str, x: Tensor) -> None:
    check_device(name, x)
    if x.dim() != 4:
        raise ShapeMismatchError(f"{name}: expected a (B, C, H, W) map, got shape {tuple(x.shape)}")


def channel_pool(x: Tensor, block_r: int = 16, block_p: int = 256):
    """Mean and max over ``H*W`` of each ``(b, c)``: ``(B, C, H, W)`` -> two ``(B, C)`` tensors in
    the accumulation dtype (kernel of ``dcamkd::channel_pool``)."""
    _check_map("x", x)
    B, C, H, W = x.shape
    HW, R = H * W, B * C
    x, sC, sP = map_layout(x)
    acc = acc_torch_dtype(x.dtype)
    mean = torch.empty((B, C), device=x.device, dtype=acc)
    mx = torch.empty((B, C), device=x.device, dtype=acc)
    sms = sm_count(x.device)
    BR = fill_block(R, 1, block_r, sms, 1)
    BP = min(block_p if sms is None else min(block_p, GPU_POOL_BLOCK_P), next_pow2(HW))
    launch(_cpool_fwd)[(triton.cdiv(R, BR),)](x, mean, mx, R, C, HW, sC, sP, BR=BR, BP=BP, num_warps=4)
    return mean, mx


def channel_pool_backward(grad_avg: Tensor, grad_max: Tensor, x: Tensor, mx: Tensor,
                          block_r: int = 16, block_p: int = 256) -> Tensor:
    """Gradient of :func:`channel_pool` with respect to ``x`` (dtype and layout of ``x``); the
    max's gradient is split evenly between ties (kernel of ``dcamkd::channel_pool_backward``)."""
    B, C, H, W = x.shape
    HW, R = H * W, B * C
    x, sC, sP = map_layout(x)
    dx = torch.empty_like(x)
    sms = sm_count(x.device)
    BR = fill_block(R, 1, block_r, sms, 1)
    BP = min(block_p if sms is None else min(block_p, GPU_POOL_BLOCK_P), next_pow2(HW))
    launch(_cpool_bwd)[(triton.cdiv(R, BR),)](x, contig(grad_avg), contig(grad_max), contig(mx), dx, R, C,
                                      HW, sC, sP, BR=BR, BP=BP, num_warps=4)
    return dx


def spatial_pool(x: Tensor, channel_gate: Optional[Tensor] = None,
                 block_c: int = 32, block_p: int = 128):
    """Mean and max over channels of ``a_c * x`` at each location: ``(B, C, H, W)`` (and optional
    ``(B, C)`` gate) -> two ``(B, H, W)`` tensors, accumulation dtype (``dcamkd::spatial_pool``)."""
    _check_map("x", x)
    B, C, H, W = x.shape
    check_gates(channel_gate, None, B, C, H, W)
    HW = H * W
    x, sC, sP = map_layout(x)
    a = contig(channel_gate)
    acc = acc_torch_dtype(x.dtype)
    mean = torch.empty((B, H, W), device=x.device, dtype=acc)
    mx = torch.empty((B, H, W), device=x.device, dtype=acc)
    BP = fill_block(HW, B, block_p, sm_count(x.device), GPU_MIN_BLOCK_P)
    launch(_spool_fwd)[(triton.cdiv(HW, BP), B)](x, a if a is not None else x, mean, mx, C, HW, sC, sP,
                                         HAS_A=a is not None, BC=min(block_c, next_pow2(C)), BP=BP, num_warps=4)
    return mean, mx


def spatial_pool_backward(grad_avg: Tensor, grad_max: Tensor, x: Tensor,
                          channel_gate: Optional[Tensor], mx: Tensor,
                          block_c: int = 32, block_p: int = 128):
    """Gradients of :func:`spatial_pool`: ``(dx, dgate)``, ``dx`` in the dtype and layout of
    ``x``, ``dgate`` ``(B, C)`` in the accumulation dtype or a ``(0,)`` tensor without a gate."""
    B, C, H, W = x.shape
    HW = H * W
    x, sC, sP = map_layout(x)
    a = contig(channel_gate)
    acc = acc_torch_dtype(x.dtype)
    BP = fill_block(HW, B, block_p, sm_count(x.device), GPU_MIN_BLOCK_P)
    NPB = triton.cdiv(HW, BP)
    dx = torch.empty_like(x)
    dap = torch.empty((B, C, NPB) if a is not None else (1,), device=x.device, dtype=acc)
    launch(_spool_bwd)[(NPB, B)](x, a if a is not None else x, contig(grad_avg), contig(grad_max),
                         contig(mx), dx, dap, C, HW, sC, sP, NPB, HAS_A=a is not None,
                         BC=min(block_c, next_pow2(C)), BP=BP, num_warps=4)
    return dx, (dap.sum(-1) if a is not None else dap.new_zeros((0,)))


def apply_gates(s: Tensor, channel_gate: Optional[Tensor] = None,
                spatial_gate: Optional[Tensor] = None, block_c: int = 32, block_p: int = 128) -> Tensor:
    """``a_c * m_p * s`` in the dtype and layout of ``s`` (product formed in the accumulation
    dtype, rounded once): ``(B, C, H, W)``, gates ``(B, C)`` / ``(B, H, W)`` or None
    (kernel of ``dcamkd::apply_gates``)."""
    _check_map("s", s)
    B, C, H, W = s.shape
    check_gates(channel_gate, spatial_gate, B, C, H, W)
    HW = H * W
    s, sC, sP = map_layout(s)
    a, m = contig(channel_gate), contig(spatial_gate)
    out = torch.empty_like(s)
    BP = fill_block(HW, B, block_p, sm_count(s.device), GPU_MIN_BLOCK_P)
    launch(_gate_fwd)[(triton.cdiv(HW, BP), B)](s, a if a is not None else s, m if m is not None else s,
                                        out, C, HW, sC, sP, HAS_A=a is not None,
                                        HAS_M=m is not None, BC=min(block_c, next_pow2(C)), BP=BP, num_warps=4)
    return out


def apply_gates_backward(grad: Tensor, s: Tensor, channel_gate: Optional[Tensor],
                         spatial_gate: Optional[Tensor], block_c: int = 32, block_p: int = 128):
    """Gradients of :func:`apply_gates`: ``(ds, da, dm)``; ``ds`` in the dtype/layout of ``s``,
    ``da`` ``(B, C)`` and ``dm`` ``(B, H, W)`` in the accumulation dtype, ``(0,)`` tensors for
    absent gates (kernel of ``dcamkd::apply_gates_backward``)."""
    B, C, H, W = s.shape
    HW = H * W
    s, sC, sP = map_layout(s)
    go = grad if grad.stride() == s.stride() else grad.contiguous(
        memory_format=torch.contiguous_format if sP == 1 else torch.channels_last)
    a, m = contig(channel_gate), contig(spatial_gate)
    acc = acc_torch_dtype(s.dtype)
    BP = fill_block(HW, B, block_p, sm_count(s.device), GPU_MIN_BLOCK_P)
    NPB = triton.cdiv(HW, BP)
    ds = torch.empty_like(s)
    dap = torch.empty((B, C, NPB) if a is not None else (1,), device=s.device, dtype=acc)
    dm = torch.empty((B, H, W) if m is not None else (0,), device=s.device, dtype=acc)
    launch(_gate_bwd)[(NPB, B)](go, s, a if a is not None else s, m if m is not None else s, ds, dap,
                        dm if m is not None else dap, C, HW, sC, sP, NPB,
                        HAS_A=a is not None, HAS_M=m is not None, BC=min(block_c, next_pow2(C)), BP=BP, num_warps=4)
    return ds, (dap.sum(-1) if a is not None else dap.new_zeros((0,))), dm
