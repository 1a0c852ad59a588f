"""Triton kernels of the fused pyramid distillation loss with optional DCAM gates.

Spec: :func:`dcamkd.reference.level_terms` / :func:`dcamkd.reference.pyramid_terms`
(method.md sections 3-4). One level is a teacher map ``T`` and a student map ``S``, both
``(B, C, H, W)``, NCHW-contiguous (other layouts are copied once by the host function), with
an optional channel gate ``a`` ``(B, C)`` and spatial gate ``m`` ``(B, H, W)``; the gated
student ``G = a_c * m_p * S`` is formed in registers and never written.

Design (two passes over the inputs, memory-bound):

* **Forward, one kernel** (:func:`_stats_kernel`), grid ``(ceil(HW / BP), B)``: a program owns
  the locations ``p`` of one image in a block of ``BP`` (contiguous in NCHW, so loads are
  coalesced over ``p``) and loops over channel chunks of ``BC``. It reads ``T`` and ``S`` once
  and writes *complete* per-location statistics (``|t_p|^2, |g_p|^2, t_p.g_p`` for the channel
  cosine; online max / sum-exp of ``t/tau`` and ``g/tau`` and ``sum exp(t/tau - max) (t-g)/tau``
  for the channel KL) and *partial* per-(b, c) statistics over its location block (the same
  quantities along ``p``, for the spatial cosine / spatial KL). A few small tensor ops combine the
  partials (log-sum-exp merge) into per-row values, the loss terms and the per-row coefficients
  the backward needs (norms -> cosine gradient coefficients; lse_t, lse_g, KL per row).
* **Backward, one kernel** (:func:`_grad_kernel`), same grid: reads ``T``, ``S`` (and gates) a
  second time with ``grad_output`` and the saved per-row coefficients, and writes ``dS`` (and
  ``dT`` when the teacher requires grad), the per-location spatial-gate gradient (complete: the
  program loops over all channels) and per-(b, c, location block) partials of the channel-gate
  gradient (summed by one small op). Gate gradients are reductions of ``dG * S * gate``; the
  gated map is never stored.

Bytes per level (``N = B*C*H*W`` elements, ``e`` bytes per element, statistics in float32):
forward reads ``2*N*e``; backward reads ``2*N*e`` and writes ``N*e`` (``dS``), plus ``N*e``
more for ``dT``. Forward+backward therefore moves ``5*N*e`` against the single-pass floor of
``3*N*e`` (teacher and student read once, student gradient written once): the inputs are read
twice because both the channel cosine (rows over ``c``) and the spatial KL (rows over ``p``)
need their row statistics before any gradient element can be formed. The statistics add
``8*B*HW + 8*B*C*ceil(HW/BP)`` floats, about 3 % of ``N`` at the paper's shapes.

Accumulation is float32 (float64 for float64 inputs); offsets are int64; max-subtracted
log-sum-exp; ``eps`` in every norm. Gradients match autograd through the reference, including
the ``|x| < eps`` branch of ``x / max(|x|, eps)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import InvalidArgumentError
from ..reference import COS_MODES, DEFAULT_EPS, KD_REDUCTIONS, KL_MODES
from ._common import (acc_torch_dtype, check_gates, check_map_pair, contig, fill_block, launch, next_pow2,
                      sm_count)

__all__ = ["level_forward", "level_backward", "pyramid_loss", "pyramid_loss_backward",
           "bytes_moved", "pair_layout", "gates_or_none"]

_NEG = tl.constexpr(-3.0e38)  # finite "minus infinity": exp(_NEG - m) == 0 and never NaN


@triton.jit
def _stats_kernel(t_ptr, s_ptr, a_ptr, m_ptr, loc_ptr, row_ptr,
                  C, HW, sC, sP, NPB, LOC_K, ROW_K, inv_tau,
                  HAS_A: tl.constexpr, HAS_M: tl.constexpr,
                  COS_CH: tl.constexpr, COS_SP: tl.constexpr,
                  KL_CH: tl.constexpr, KL_SP: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
    ACC = loc_ptr.dtype.element_ty  # the accumulation dtype (statistics buffers)
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BP + tl.arange(0, BP)
    mask_p = offs_p < HW
    offs_p64 = offs_p.to(tl.int64)
    base = b * C * HW
    if HAS_M:
        mv = tl.load(m_ptr + b * HW + offs_p64, mask=mask_p, other=0.0).to(ACC)
    tt = tl.zeros([BP], ACC)
    gg = tl.zeros([BP], ACC)
    tg = tl.zeros([BP], ACC)
    mt = tl.full([BP], _NEG, ACC)
    zt = tl.zeros([BP], ACC)
    mg = tl.full([BP], _NEG, ACC)
    zg = tl.zeros([BP], ACC)
    wt = tl.zeros([BP], ACC)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_p[None, :]
        off = base + offs_c.to(tl.int64)[:, None] * sC + offs_p64[None, :] * sP
        t = tl.load(t_ptr + off, mask=mask, other=0.0).to(ACC)
        g = tl.load(s_ptr + off, mask=mask, other=0.0).to(ACC)
        if HAS_A:
            av = tl.load(a_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC)
            g = g * av[:, None]
        if HAS_M:
            g = g * mv[None, :]
        row_off = (b * C + offs_c.to(tl.int64)) * NPB + pid_p
        if COS_CH:
            tt += tl.sum(t * t, 0)
            gg += tl.sum(g * g, 0)
            tg += tl.sum(t * g, 0)
        if COS_SP:
            tl.store(row_ptr + row_off, tl.sum(t * t, 1), mask=mask_c)
            tl.store(row_ptr + ROW_K + row_off, tl.sum(g * g, 1), mask=mask_c)
            tl.store(row_ptr + 2 * ROW_K + row_off, tl.sum(t * g, 1), mask=mask_c)
        if KL_CH or KL_SP:
            x = tl.where(mask, t * inv_tau, _NEG)
            y = tl.where(mask, g * inv_tau, _NEG)
            dxy = tl.where(mask, (t - g) * inv_tau, 0.0)
            if KL_CH:
                mt_new = tl.maximum(mt, tl.max(x, 0))
                mg_new = tl.maximum(mg, tl.max(y, 0))
                et = tl.exp(x - mt_new[None, :])
                rt = tl.exp(mt - mt_new)
                zt = zt * rt + tl.sum(et, 0)
                wt = wt * rt + tl.sum(et * dxy, 0)
                zg = zg * tl.exp(mg - mg_new) + tl.sum(tl.exp(y - mg_new[None, :]), 0)
                mt = mt_new
                mg = mg_new
            if KL_SP:
                rmt = tl.max(x, 1)
                rmg = tl.max(y, 1)
                ret = tl.exp(x - rmt[:, None])
                tl.store(row_ptr + 3 * ROW_K + row_off, rmt, mask=mask_c)
                tl.store(row_ptr + 4 * ROW_K + row_off, tl.sum(ret, 1), mask=mask_c)
                tl.store(row_ptr + 5 * ROW_K + row_off, rmg, mask=mask_c)
                tl.store(row_ptr + 6 * ROW_K + row_off,
                         tl.sum(tl.exp(y - rmg[:, None]), 1), mask=mask_c)
                tl.store(row_ptr + 7 * ROW_K + row_off, tl.sum(ret * dxy, 1), mask=mask_c)
    loc_off = b * HW + offs_p64
    if COS_CH:
        tl.store(loc_ptr + loc_off, tt, mask=mask_p)
        tl.store(loc_ptr + LOC_K + loc_off, gg, mask=mask_p)
        tl.store(loc_ptr + 2 * LOC_K + loc_off, tg, mask=mask_p)
    if KL_CH:
        tl.store(loc_ptr + 3 * LOC_K + loc_off, mt, mask=mask_p)
        tl.store(loc_ptr + 4 * LOC_K + loc_off, zt, mask=mask_p)
        tl.store(loc_ptr + 5 * LOC_K + loc_off, mg, mask=mask_p)
        tl.store(loc_ptr + 6 * LOC_K + loc_off, zg, mask=mask_p)
        tl.store(loc_ptr + 7 * LOC_K + loc_off, wt, mask=mask_p)


@triton.jit
def _grad_kernel(t_ptr, s_ptr, a_ptr, m_ptr, w_ptr, lc_ptr, rc_ptr,
                 ds_ptr, dt_ptr, dap_ptr, dm_ptr,
                 C, HW, sC, sP, NPB, LOC_K, ROW_K, inv_tau,
                 HAS_A: tl.constexpr, HAS_M: tl.constexpr,
                 COS_CH: tl.constexpr, COS_SP: tl.constexpr,
                 KL_CH: tl.constexpr, KL_SP: tl.constexpr,
                 NEED_S: tl.constexpr, NEED_T: tl.constexpr,
                 NEED_A: tl.constexpr, NEED_M: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
    ACC = w_ptr.dtype.element_ty  # the accumulation dtype (grad_output weights)
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BP + tl.arange(0, BP)
    mask_p = offs_p < HW
    offs_p64 = offs_p.to(tl.int64)
    base = b * C * HW
    loc_off = b * HW + offs_p64
    gc = tl.load(w_ptr).to(ACC)      # grad_output[cos] / count
    gk = tl.load(w_ptr + 1).to(ACC)  # grad_output[kl] / count
    if HAS_M:
        mv = tl.load(m_ptr + loc_off, mask=mask_p, other=0.0).to(ACC)
    if COS_CH:
        l_au = tl.load(lc_ptr + loc_off, mask=mask_p, other=0.0)
        l_av = tl.load(lc_ptr + LOC_K + loc_off, mask=mask_p, other=0.0)  # alpha_g * w (mining)
        l_be = tl.load(lc_ptr + 2 * LOC_K + loc_off, mask=mask_p, other=0.0)  # beta * w
        if NEED_T:
            l_bt = tl.load(lc_ptr + 6 * LOC_K + loc_off, mask=mask_p, other=0.0)  # beta (dT unmined)
    if KL_CH:
        l_lt = tl.load(lc_ptr + 3 * LOC_K + loc_off, mask=mask_p, other=0.0)
        l_lg = tl.load(lc_ptr + 4 * LOC_K + loc_off, mask=mask_p, other=0.0)
        l_kl = tl.load(lc_ptr + 5 * LOC_K + loc_off, mask=mask_p, other=0.0)
    dm_acc = tl.zeros([BP], ACC)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_p[None, :]
        off = base + offs_c.to(tl.int64)[:, None] * sC + offs_p64[None, :] * sP
        row = b * C + offs_c.to(tl.int64)
        t = tl.load(t_ptr + off, mask=mask, other=0.0).to(ACC)
        s = tl.load(s_ptr + off, mask=mask, other=0.0).to(ACC)
        g = s
        if HAS_A:
            av = tl.load(a_ptr + row, mask=mask_c, other=0.0).to(ACC)
            g = g * av[:, None]
        if HAS_M:
            g = g * mv[None, :]
        dg = tl.zeros([BC, BP], ACC)
        dt = tl.zeros([BC, BP], ACC)
        if COS_CH:
            dg += gc * (l_av[None, :] * g + l_be[None, :] * t)
            if NEED_T:
                dt += gc * (l_au[None, :] * t + l_bt[None, :] * g)
        if COS_SP:
            r_au = tl.load(rc_ptr + row, mask=mask_c, other=0.0)
            r_av = tl.load(rc_ptr + ROW_K + row, mask=mask_c, other=0.0)
            r_be = tl.load(rc_ptr + 2 * ROW_K + row, mask=mask_c, other=0.0)
            dg += gc * (r_av[:, None] * g + r_be[:, None] * t)
            if NEED_T:
                dt += gc * (r_au[:, None] * t + r_be[:, None] * g)
        if KL_CH:
            lp = tl.where(mask, t * inv_tau - l_lt[None, :], 0.0)  # masked lanes: no overflow
            lq = tl.where(mask, g * inv_tau - l_lg[None, :], 0.0)
            pp = tl.exp(lp)
            dg += (gk * inv_tau) * (tl.exp(lq) - pp)
            if NEED_T:
                dt += (gk * inv_tau) * pp * (lp - lq - l_kl[None, :])
        if KL_SP:
            r_lt = tl.load(rc_ptr + 3 * ROW_K + row, mask=mask_c, other=0.0)
            r_lg = tl.load(rc_ptr + 4 * ROW_K + row, mask=mask_c, other=0.0)
            r_kl = tl.load(rc_ptr + 5 * ROW_K + row, mask=mask_c, other=0.0)
            lp = tl.where(mask, t * inv_tau - r_lt[:, None], 0.0)
            lq = tl.where(mask, g * inv_tau - r_lg[:, None], 0.0)
            pp = tl.exp(lp)
            dg += (gk * inv_tau) * (tl.exp(lq) - pp)
            if NEED_T:
                dt += (gk * inv_tau) * pp * (lp - lq - r_kl[:, None])
        dg = tl.where(mask, dg, 0.0)
        if NEED_S:
            ds = dg
            if HAS_A:
                ds = ds * av[:, None]
            if HAS_M:
                ds = ds * mv[None, :]
            tl.store(ds_ptr + off, ds.to(ds_ptr.dtype.element_ty), mask=mask)
        if NEED_T:
            tl.store(dt_ptr + off, dt.to(dt_ptr.dtype.element_ty), mask=mask)
        if NEED_A:
            da = dg * s
            if HAS_M:
                da = da * mv[None, :]
            tl.store(dap_ptr + row * NPB + pid_p, tl.sum(da, 1), mask=mask_c)
        if NEED_M:
            dmx = dg * s
            if HAS_A:
                dmx = dmx * av[:, None]
            dm_acc += tl.sum(dmx, 0)
    if NEED_M:
        tl.store(dm_ptr + loc_off, dm_acc, mask=mask_p)


def _validate_modes(cos: str, kl: str, tau: float, kd_reduction: str) -> None:
    if cos not in COS_MODES:
        raise InvalidArgumentError(f"cos: expected one of {COS_MODES}, got {cos!r}")
    if kl not in KL_MODES:
        raise InvalidArgumentError(f"kl: expected one of {KL_MODES}, got {kl!r}")
    if kd_reduction not in KD_REDUCTIONS:
        raise InvalidArgumentError(f"kd_reduction: expected one of {KD_REDUCTIONS}, got {kd_reduction!r}")
    if not tau > 0:
        raise InvalidArgumentError(f"tau: expected a temperature > 0, got {tau!r}")


def pair_layout(t: Tensor, s: Tensor):
    """``(t, s, sC, sP)``: both NCHW-contiguous (``sC = H*W, sP = 1``) or both channels_last
    (``sC = 1, sP = C``); any other combination is made NCHW-contiguous (one copy)."""
    _, C, H, W = t.shape
    if t.is_contiguous() and s.is_contiguous():
        return t, s, H * W, 1
    cl = torch.channels_last
    if t.is_contiguous(memory_format=cl) and s.is_contiguous(memory_format=cl):
        return t, s, 1, C
    return t.contiguous(), s.contiguous(), H * W, 1


def _cos_coefs(nt_raw: Tensor, ng_raw: Tensor, tg: Tensor, eps: float):
    """Cosine distance and gradient coefficients from the plain norms ``|t|, |g|`` and ``t.g``.

    ``d = 0.5 (|t|^2/nt^2 + |g|^2/ng^2) - t.g/(nt ng)`` with ``n = max(|x|, eps)``;
    ``dd/dg = alpha_g g + beta t``, ``dd/dt = alpha_t t + beta g``, with ``beta = -1/(nt ng)``,
    ``alpha_g = t.g/(nt ng^3)`` where ``|g| >= eps``, else ``1/eps^2`` (symmetric for t): the
    gradient of autograd through ``x / clamp_min(|x|, eps)``.
    """
    nt, ng = nt_raw.clamp_min(eps), ng_raw.clamp_min(eps)
    inv = 1.0 / (nt * ng)
    d = 0.5 * ((nt_raw / nt) ** 2 + (ng_raw / ng) ** 2) - tg * inv
    flat = torch.full_like(nt, 1.0 / (eps * eps))
    alpha_t = torch.where(nt_raw >= eps, tg * inv / (nt * nt), flat)
    alpha_g = torch.where(ng_raw >= eps, tg * inv / (ng * ng), flat)
    return d, alpha_t, alpha_g, -inv


def _global_rows(cs: Tensor):
    """Per-image ``(|t_b|, |s'_b|, t_b.s'_b)``, each ``(B,)``, from the location rows ``cs``
    ``(3, B, HW)`` (plain norms and dot products): the global cosine's statistics."""
    return cs[0].square().sum(-1).sqrt(), cs[1].square().sum(-1).sqrt(), cs[2].sum(-1)


#: On a GPU: the smallest location block (16 float32 = 64 contiguous bytes of a channel row),
#: reached when a map has too few locations to give every multiprocessor a program.
GPU_MIN_BLOCK_P = 16
#: On a GPU: the channel block of the forward kernel. At ``32 x 128`` tiles and 4 warps it needs
#: up to 254 registers per thread (sm_80 and sm_90, ``benchmarks/gpu_static.py``).
GPU_BLOCK_C = 16
#: On a GPU: the channel block of the backward kernel: at 32 it needs up to 255 registers and
#: spills; at 16 ptxas still spills a few bytes in some variants (sm_90); at 8 none spills.
GPU_GRAD_BLOCK_C = 8


def _blocks(C: int, B: int, HW: int, block_c: int, block_p: int, device, grad: bool = False):
    """``(BC, BP, NPB)``; on a GPU the location block shrinks to fill the multiprocessors
    (:func:`~dcamkd.kernels._common.fill_block`) and the channel block is at most
    :data:`GPU_BLOCK_C` (:data:`GPU_GRAD_BLOCK_C` for the backward). The interpreter keeps the
    defaults."""
    sms = sm_count(device)
    BP = fill_block(HW, B, block_p, sms, GPU_MIN_BLOCK_P)
    if sms is not None:
        block_c = min(block_c, GPU_GRAD_BLOCK_C if grad else GPU_BLOCK_C)
    return min(block_c, next_pow2(C)), BP, triton.cdiv(HW, BP)


def level_forward(t: Tensor, s: Tensor, channel_gate: Optional[Tensor] = None,
                  spatial_gate: Optional[Tensor] = None, cos: str = "channel",
                  kl: str = "spatial", tau: float = 1.0, kd_reduction: str = "sum_c",
                  eps: float = DEFAULT_EPS, block_c: int = 32, block_p: int = 128):
    """Forward of one level: ``[cosine term, KL term]`` and the saved row statistics.

    Args:
        t, s: ``(B, C, H, W)`` teacher / student, float16/bfloat16/float32/float64, CUDA (or CPU
            under ``TRITON_INTERPRET=1``), NCHW-contiguous or channels_last.
        channel_gate, spatial_gate: ``(B, C)`` / ``(B, H, W)`` DCAM gates or None.
        cos, kl, tau, kd_reduction, eps: as :func:`dcamkd.reference.level_terms`.
        block_c, block_p: tile sizes (powers of two).

    Returns:
        ``(terms, stats)``: ``terms`` a ``(2,)`` tensor, float32 (float64 for float64 inputs);
        ``stats`` the 1-D statistics vector of the ``dcamkd::pyramid_loss`` contract
        (:mod:`dcamkd.ops.pyramid_loss`): ``[(3, B, R) |t|, |s'|, t.s' | (3, B, R) lse_t, lse_s, kl]``.

    Raises:
        InvalidArgumentError: bad mode, ``tau <= 0``, non-float or non-CUDA tensors.
        ShapeMismatchError: ``t``/``s``/gate shapes disagree.
    """
    _validate_modes(cos, kl, tau, kd_reduction)
    check_map_pair(t, s)
    B, C, H, W = t.shape
    check_gates(channel_gate, spatial_gate, B, C, H, W)
    HW = H * W
    acc = acc_torch_dtype(t.dtype)
    t, s, sC, sP = pair_layout(t, s)
    a, m = contig(channel_gate), contig(spatial_gate)
    BC, BP, NPB = _blocks(C, B, HW, block_c, block_p, t.device)
    dev = t.device
    cos_loc = cos in ("channel", "global")  # global: per-location rows, summed per image below
    need_loc = cos_loc or kl == "channel"
    need_row = cos == "spatial" or kl == "spatial"
    loc = torch.empty((8, B, HW) if need_loc else (8, 1, 1), device=dev, dtype=acc)
    row = torch.empty((8, B, C, NPB) if need_row else (8, 1, 1, 1), device=dev, dtype=acc)
    zero = torch.zeros((), device=dev, dtype=acc)
    if cos != "none" or kl != "none":
        launch(_stats_kernel)[(NPB, B)](
            t, s, a if a is not None else t, m if m is not None else t, loc, row,
            C, HW, sC, sP, NPB, loc[0].numel(), row[0].numel(), 1.0 / tau,
            HAS_A=a is not None, HAS_M=m is not None,
            COS_CH=cos_loc, COS_SP=cos == "spatial",
            KL_CH=kl == "channel", KL_SP=kl == "spatial",
            BC=BC, BP=BP, num_warps=4)
    blocks = []
    c_term, k_term = zero, zero
    if cos != "none":
        tt, gg, tg = (loc[0], loc[1], loc[2]) if cos_loc else row[:3].sum(dim=-1)
        cs = torch.stack([tt.sqrt(), gg.sqrt(), tg])
        if cos == "global":
            d = _cos_coefs(*_global_rows(cs), eps)[0]
        else:
            d = _cos_coefs(cs[0], cs[1], cs[2], eps)[0]
        c_term = d.sum() / d.numel()
        blocks.append(cs.reshape(-1))
    if kl != "none":
        if kl == "channel":
            mt, zt, mg, zg, wt = loc[3], loc[4], loc[5], loc[6], loc[7]
        else:  # merge the per-block partials (log-sum-exp merge)
            mt = row[3].amax(dim=-1, keepdim=True)
            mg = row[5].amax(dim=-1, keepdim=True)
            et = (row[3] - mt).exp()
            zt, wt = (row[4] * et).sum(-1), (row[7] * et).sum(-1)
            zg = (row[6] * (row[5] - mg).exp()).sum(-1)
            mt, mg = mt[..., 0], mg[..., 0]
        lse_t = mt + zt.log()
        lse_g = mg + zg.log()
        klr = wt / zt - lse_t + lse_g
        k_term = klr.sum() / (B if (kl == "spatial" and kd_reduction == "sum_c") else klr.numel())
        blocks.append(torch.stack([lse_t, lse_g, klr]).reshape(-1))
    stats = torch.cat(blocks) if blocks else torch.zeros((0,), device=dev, dtype=acc)
    return torch.stack([c_term, k_term]), stats


def level_backward(grad_terms: Tensor, t: Tensor, s: Tensor, channel_gate: Optional[Tensor],
                   spatial_gate: Optional[Tensor], stats: Tensor, cos: str = "channel",
                   kl: str = "spatial", tau: float = 1.0, kd_reduction: str = "sum_c",
                   eps: float = DEFAULT_EPS, need_t: bool = False, need_s: bool = True,
                   need_a: bool = False, need_m: bool = False,
                   block_c: int = 32, block_p: int = 128, row_weight: Optional[Tensor] = None):
    """Backward of one level: one pass over ``t, s`` writing the gradients.

    Args:
        grad_terms: ``(2,)`` gradient of the level's ``[cosine, KL]`` terms.
        t, s, channel_gate, spatial_gate, cos, kl, tau, kd_reduction, eps: as for
            :func:`level_forward`; ``stats`` its second output.
        need_t, need_s, need_a, need_m: which gradients to form.
        row_weight: ``B*H*W`` weights of the cosine part of ``dL/ds'`` per location (mining;
            ``cos`` channel or global), or None.

    Returns:
        ``(dt, ds, da, dm)``: ``dt, ds`` in the dtype and layout of ``t, s``; ``da`` ``(B, C)``
        and ``dm`` ``(B, H, W)`` in the accumulation dtype; None where not requested.
    """
    B, C, H, W = t.shape
    HW = H * W
    acc = acc_torch_dtype(t.dtype)
    t, s, sC, sP = pair_layout(t, s)
    a, m = contig(channel_gate), contig(spatial_gate)
    need_a = need_a and a is not None
    need_m = need_m and m is not None
    BC, BP, NPB = _blocks(C, B, HW, block_c, block_p, t.device, grad=True)
    dev = t.device
    cos_loc = cos in ("channel", "global")
    need_loc = cos_loc or kl == "channel"
    need_row = cos == "spatial" or kl == "spatial"
    lc = torch.zeros((7, B, HW) if need_loc else (7, 1, 1), device=dev, dtype=acc)
    rc = torch.zeros((6, B, C) if need_row else (6, 1, 1), device=dev, dtype=acc)
    k = 0
    n_cos = n_kl = 1
    if cos != "none":
        R = HW if cos_loc else C
        cs = stats[: 3 * B * R].view(3, B, R)
        k = 3 * B * R
        dst = lc if cos_loc else rc
        if cos == "global":  # the image's coefficients at each of its locations
            _, au, av, be = (x[:, None] for x in _cos_coefs(*_global_rows(cs), eps))
            n_cos = B
        else:
            _, au, av, be = _cos_coefs(cs[0], cs[1], cs[2], eps)
            n_cos = B * R
        if cos_loc:
            dst[6] = be  # dT's beta, unweighted
            if row_weight is not None and row_weight.numel():
                wv = row_weight.to(acc).reshape(B, HW)
                av, be = av * wv, be * wv
        dst[0], dst[1], dst[2] = au, av, be
    if kl != "none":
        R = HW if kl == "channel" else C
        dst = lc if kl == "channel" else rc
        dst[3:6] = stats[k: k + 3 * B * R].view(3, B, R)
        n_kl = B if (kl == "spatial" and kd_reduction == "sum_c") else B * R
    g2 = grad_terms.to(device=dev, dtype=acc).reshape(2)
    w = torch.stack([g2[0] / n_cos, g2[1] / n_kl])
    ds = torch.empty_like(s) if need_s else None
    dt = torch.empty_like(t) if need_t else None
    dap = torch.empty((B, C, NPB), device=dev, dtype=acc) if need_a else None
    dm = torch.empty((B, HW), device=dev, dtype=acc) if need_m else None
    launch(_grad_kernel)[(NPB, B)](
        t, s, a if a is not None else t, m if m is not None else t, w, lc, rc,
        ds if ds is not None else t, dt if dt is not None else t,
        dap if dap is not None else w, dm if dm is not None else w,
        C, HW, sC, sP, NPB, lc[0].numel(), rc[0].numel(), 1.0 / tau,
        HAS_A=a is not None, HAS_M=m is not None,
        COS_CH=cos_loc, COS_SP=cos == "spatial",
        KL_CH=kl == "channel", KL_SP=kl == "spatial",
        NEED_S=need_s, NEED_T=need_t, NEED_A=need_a, NEED_M=need_m,
        BC=BC, BP=BP, num_warps=4)
    return dt, ds, (dap.sum(-1) if need_a else None), (dm.view(B, H, W) if need_m else None)


def gates_or_none(gates):
    """Op-contract gates (an empty ``(0,)`` tensor = no gate) -> tensors or None."""
    return [g if g is not None and g.dim() > 1 else None for g in gates]


def pyramid_loss(teachers, students, channel_gates, spatial_gates, cos, kl, tau,
                 kd_reduction, eps, mine="none", mine_factor=1.0, mine_level=None):
    """Host function of op ``dcamkd::pyramid_loss_triton``: ``(terms (L, 2), stats)``, see
    :func:`level_forward` and the op contract in :mod:`dcamkd.ops.pyramid_loss` (a gate may be
    None or an empty ``(0,)`` tensor for "no gate"). The mining arguments are used by the
    autograd formula only."""
    channel_gates, spatial_gates = gates_or_none(channel_gates), gates_or_none(spatial_gates)
    terms, stats = [], []
    for t, s, a, m in zip(teachers, students, channel_gates, spatial_gates):
        tr, st = level_forward(t, s, a, m, cos, kl, tau, kd_reduction, eps)
        terms.append(tr)
        stats.append(st)
    return torch.stack(terms), stats


def pyramid_loss_backward(grad_terms, teachers, students, channel_gates, spatial_gates, stats,
                          row_weights, cos, kl, tau, kd_reduction, eps, teacher_grad):
    """Host function of op ``dcamkd::pyramid_loss_backward_triton``:
    ``(grad_students, grad_teachers ([] unless teacher_grad), grad_channel_gates,
    grad_spatial_gates)``; absent gates (None or ``(0,)``) give ``(0,)`` tensors."""
    channel_gates, spatial_gates = gates_or_none(channel_gates), gates_or_none(spatial_gates)
    gs, gt, ga, gm = [], [], [], []
    for i, (t, s, a, m, st, rw) in enumerate(zip(teachers, students, channel_gates, spatial_gates, stats,
                                                 row_weights)):
        dt, ds, da, dm = level_backward(grad_terms[i], t, s, a, m, st, cos, kl, tau, kd_reduction,
                                        eps, need_t=teacher_grad, need_s=True,
                                        need_a=a is not None, need_m=m is not None,
                                        row_weight=rw if rw.numel() else None)
        acc = acc_torch_dtype(s.dtype)
        gs.append(ds)
        if teacher_grad:
            gt.append(dt)
        # a fresh (0,) tensor each: outputs of an op must not alias one another
        ga.append(da if da is not None else s.new_zeros((0,), dtype=acc))
        gm.append(dm if dm is not None else s.new_zeros((0,), dtype=acc))
    return gs, gt, ga, gm


def bytes_moved(shapes, elem_bytes: int, teacher_grad: bool = False) -> dict:
    """Bytes this design moves for forward+backward over levels of ``shapes`` ``(B, C, H, W)``:
    ``{'design': 5*N*e (+N*e for dT), 'floor': 3*N*e (+N*e)}``; statistics excluded."""
    n = sum(b * c * h * w for b, c, h, w in shapes)
    extra = n * elem_bytes if teacher_grad else 0
    return {"design": 5 * n * elem_bytes + extra, "floor": 3 * n * elem_bytes + extra}
