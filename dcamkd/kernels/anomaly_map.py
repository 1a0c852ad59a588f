"""Triton kernel of the per-level anomaly map (inference, forward only).

Spec: :func:`dcamkd.reference.anomaly_map_level` (method.md section 5): ``d(t_p, s_p)`` at every
location, with ``d(u, v) = 0.5 |u^ - v^|^2`` and ``x^ = x / max(|x|, eps)``. A program owns
``BP`` locations of one image (coalesced over ``p``) and loops over channel chunks,
accumulating ``|t|^2, |s|^2, t.s`` (NCHW or channels_last, through strides) in float32 (float64 for float64 inputs): ``T`` and ``S``
are read once, the ``(B, H, W)`` map written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import DEFAULT_EPS
from ._common import acc_torch_dtype, check_map_pair, fill_block, launch, next_pow2, sm_count
from .pyramid_loss import GPU_BLOCK_C, GPU_MIN_BLOCK_P, pair_layout

__all__ = ["anomaly_map"]


@triton.jit
def _amap_kernel(t_ptr, s_ptr, out_ptr, C, HW, sC, sP, eps, BC: tl.constexpr, BP: tl.constexpr):
    ACC = out_ptr.dtype.element_ty  # the accumulation dtype (output)
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = (pid_p * BP + tl.arange(0, BP)).to(tl.int64)
    mask_p = offs_p < HW
    tt = tl.zeros([BP], ACC)
    ss = tl.zeros([BP], ACC)
    ts = tl.zeros([BP], ACC)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        mask = (offs_c < C)[:, None] & mask_p[None, :]
        off = b * C * HW + offs_c.to(tl.int64)[:, None] * sC + offs_p[None, :] * sP
        t = tl.load(t_ptr + off, mask=mask, other=0.0).to(ACC)
        s = tl.load(s_ptr + off, mask=mask, other=0.0).to(ACC)
        tt += tl.sum(t * t, 0)
        ss += tl.sum(s * s, 0)
        ts += tl.sum(t * s, 0)
    nt = tl.maximum(tl.sqrt(tt), eps)
    ns = tl.maximum(tl.sqrt(ss), eps)
    d = 0.5 * (tt / (nt * nt) + ss / (ns * ns)) - ts / (nt * ns)
    tl.store(out_ptr + b * HW + offs_p, d, mask=mask_p)


def anomaly_map(t: Tensor, s: Tensor, eps: float = DEFAULT_EPS,
                      block_c: int = 32, block_p: int = 128) -> Tensor:
    """Host function of op ``dcamkd::anomaly_map_triton``: ``(B, C, H, W)`` teacher and student
    -> ``(B, H, W)``, float32 (float64 for float64 inputs); values in [0, 2], NaN where an input
    vector holds NaN or Inf.

    Raises:
        ShapeMismatchError: shapes or devices differ. InvalidArgumentError: non-float or
        non-CUDA tensors (outside the interpreter).
    """
    check_map_pair(t, s)
    B, C, H, W = t.shape
    HW = H * W
    t, s, sC, sP = pair_layout(t, s)
    out = torch.empty((B, H, W), device=t.device, dtype=acc_torch_dtype(t.dtype))
    sms = sm_count(t.device)
    BP = fill_block(HW, B, block_p, sms, GPU_MIN_BLOCK_P)
    BC = min(block_c if sms is None else min(block_c, GPU_BLOCK_C), next_pow2(C))
    launch(_amap_kernel)[(triton.cdiv(HW, BP), B)](t, s, out, C, HW, sC, sP, float(eps), BC=BC, BP=BP, num_warps=4)
    return out
