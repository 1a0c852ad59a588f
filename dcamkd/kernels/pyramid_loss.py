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

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import InvalidArgumentError, ShapeMismatchError
from ..reference import COS_MODES, DEFAULT_EPS, KD_REDUCTIONS, KL_MODES
from ._common import acc_torch_dtype, check_gates, check_map_pair, contig, next_pow2

__all__ = ["level_forward", "level_backward", "pyramid_terms", "LevelSaved", "bytes_moved"]

_NEG = -3.0e38  # finite "minus infinity": exp(_NEG - m) == 0 and never NaN


@triton.jit
def _stats_kernel(t_ptr, s_ptr, a_ptr, m_ptr, loc_ptr, row_ptr,
                  C, HW, NPB, LOC_K, ROW_K, inv_tau,
                  HAS_A: tl.constexpr, HAS_M: tl.constexpr,
                  COS_CH: tl.constexpr, COS_SP: tl.constexpr,
                  KL_CH: tl.constexpr, KL_SP: tl.constexpr,
                  ACC: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
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
        off = base + offs_c.to(tl.int64)[:, None] * HW + offs_p64[None, :]
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
                 C, HW, NPB, LOC_K, ROW_K, inv_tau,
                 HAS_A: tl.constexpr, HAS_M: tl.constexpr,
                 COS_CH: tl.constexpr, COS_SP: tl.constexpr,
                 KL_CH: tl.constexpr, KL_SP: tl.constexpr,
                 NEED_S: tl.constexpr, NEED_T: tl.constexpr,
                 NEED_A: tl.constexpr, NEED_M: tl.constexpr,
                 ACC: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
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
        l_av = tl.load(lc_ptr + LOC_K + loc_off, mask=mask_p, other=0.0)
        l_be = tl.load(lc_ptr + 2 * LOC_K + loc_off, mask=mask_p, other=0.0)
    if KL_CH:
        l_lt = tl.load(lc_ptr + 3 * LOC_K + loc_off, mask=mask_p, other=0.0)
        l_lg = tl.load(lc_ptr + 4 * LOC_K + loc_off, mask=mask_p, other=0.0)
        l_kl = tl.load(lc_ptr + 5 * LOC_K + loc_off, mask=mask_p, other=0.0)
    dm_acc = tl.zeros([BP], ACC)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_p[None, :]
        off = base + offs_c.to(tl.int64)[:, None] * HW + offs_p64[None, :]
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
                dt += gc * (l_au[None, :] * t + l_be[None, :] * g)
        if COS_SP:
            r_au = tl.load(rc_ptr + row, mask=mask_c, other=0.0)
            r_av = tl.load(rc_ptr + ROW_K + row, mask=mask_c, other=0.0)
            r_be = tl.load(rc_ptr + 2 * ROW_K + row, mask=mask_c, other=0.0)
            dg += gc * (r_av[:, None] * g + r_be[:, None] * t)
            if NEED_T:
                dt += gc * (r_au[:, None] * t + r_be[:, None] * g)
        if KL_CH:
            lp = t * inv_tau - l_lt[None, :]
            lq = g * inv_tau - l_lg[None, :]
            pp = tl.exp(lp)
            dg += (gk * inv_tau) * (tl.exp(lq) - pp)
            if NEED_T:
                dt += (gk * inv_tau) * pp * (lp - lq - l_kl[None, :])
        if KL_SP:
            r_lt = tl.load(rc_ptr + 3 * ROW_K + row, mask=mask_c, other=0.0)
            r_lg = tl.load(rc_ptr + 4 * ROW_K + row, mask=mask_c, other=0.0)
            r_kl = tl.load(rc_ptr + 5 * ROW_K + row, mask=mask_c, other=0.0)
            lp = t * inv_tau - r_lt[:, None]
            lq = g * inv_tau - r_lg[:, None]
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


class LevelSaved:
    """What the backward of one level needs besides the inputs: per-location coefficients
    ``(6, B, HW)`` and per-(b, c) coefficients ``(6, B, C)`` (rows 0-2: cosine gradient
    coefficients ``alpha_t, alpha_s, beta``; rows 3-5: ``lse_t, lse_g, KL`` of the row), float32
    (float64 for float64 inputs)."""

    __slots__ = ("loc", "row")

    def __init__(self, loc: Tensor, row: Tensor):
        self.loc = loc
        self.row = row


def _validate_modes(cos: str, kl: str, tau: float, kd_reduction: str) -> None:
    if cos not in COS_MODES:
        raise InvalidArgumentError(f"cos: expected one of {COS_MODES}, got {cos!r}")
    if kl not in KL_MODES:
        raise InvalidArgumentError(f"kl: expected one of {KL_MODES}, got {kl!r}")
    if kd_reduction not in KD_REDUCTIONS:
        raise InvalidArgumentError(f"kd_reduction: expected one of {KD_REDUCTIONS}, got {kd_reduction!r}")
    if not tau > 0:
        raise InvalidArgumentError(f"tau: expected a temperature > 0, got {tau!r}")


def _cos_coefs(tt: Tensor, gg: Tensor, tg: Tensor, eps: float):
    """Cosine distance and its gradient coefficients from ``|t|^2, |g|^2, t.g``.

    ``d = 0.5 (|t|^2/nt^2 + |g|^2/ng^2) - t.g/(nt ng)`` with ``n = max(|x|, eps)``;
    ``dd/dg = alpha_g g + beta t``, ``dd/dt = alpha_t t + beta g``, with ``beta = -1/(nt ng)``,
    ``alpha_g = t.g/(nt ng^3)`` where ``|g| >= eps``, else ``1/eps^2`` (and symmetric for t).
    """
    at_, ag_ = tt.sqrt(), gg.sqrt()
    nt, ng = at_.clamp_min(eps), ag_.clamp_min(eps)
    inv = 1.0 / (nt * ng)
    d = 0.5 * (tt / (nt * nt) + gg / (ng * ng)) - tg * inv
    flat = 1.0 / (eps * eps)
    alpha_t = torch.where(at_ >= eps, tg * inv / (nt * nt), torch.full_like(tt, flat))
    alpha_g = torch.where(ag_ >= eps, tg * inv / (ng * ng), torch.full_like(tt, flat))
    return d, alpha_t, alpha_g, -inv


def _kl_rows(mt, zt, mg, zg, wt):
    lse_t = mt + zt.log()
    lse_g = mg + zg.log()
    return lse_t, lse_g, wt / zt - lse_t + lse_g


def level_forward(t: Tensor, s: Tensor, channel_gate: Optional[Tensor] = None,
                  spatial_gate: Optional[Tensor] = None, cos: str = "channel",
                  kl: str = "spatial", tau: float = 1.0, kd_reduction: str = "sum_c",
                  eps: float = DEFAULT_EPS, block_c: int = 32, block_p: int = 128):
    """Forward of one level: ``[cosine term, KL term]`` and what the backward needs.

    Args:
        t, s: ``(B, C, H, W)`` teacher / student, float16/bfloat16/float32/float64, CUDA (or CPU
            under ``TRITON_INTERPRET=1``).
        channel_gate, spatial_gate: ``(B, C)`` / ``(B, H, W)`` DCAM gates or None.
        cos, kl, tau, kd_reduction, eps: as :func:`dcamkd.reference.level_terms`.
        block_c, block_p: tile sizes (powers of two).

    Returns:
        ``(terms, saved)``: ``terms`` a ``(2,)`` tensor, float32 (float64 for float64 inputs);
        ``saved`` a :class:`LevelSaved` for :func:`level_backward`.

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
    t, s, a, m = contig(t), contig(s), contig(channel_gate), contig(spatial_gate)
    BP = min(block_p, next_pow2(HW))
    BC = min(block_c, next_pow2(C))
    NPB = triton.cdiv(HW, BP)
    dev = t.device
    need_loc = cos == "channel" or kl == "channel"
    need_row = cos == "spatial" or kl == "spatial"
    loc = torch.empty((8, B, HW) if need_loc else (8, 1, 1), device=dev, dtype=acc)
    row = torch.empty((8, B, C, NPB) if need_row else (8, 1, 1, 1), device=dev, dtype=acc)
    zero = torch.zeros((), device=dev, dtype=acc)
    if cos != "none" or kl != "none":
        _stats_kernel[(NPB, B)](
            t, s, a if a is not None else t, m if m is not None else t, loc, row,
            C, HW, NPB, loc[0].numel(), row[0].numel(), 1.0 / tau,
            HAS_A=a is not None, HAS_M=m is not None,
            COS_CH=cos == "channel", COS_SP=cos == "spatial",
            KL_CH=kl == "channel", KL_SP=kl == "spatial",
            ACC=tl.float64 if acc == torch.float64 else tl.float32, BC=BC, BP=BP, num_warps=4)
    lc = torch.zeros((6, B, HW) if need_loc else (6, 1, 1), device=dev, dtype=acc)
    rc = torch.zeros((6, B, C) if need_row else (6, 1, 1), device=dev, dtype=acc)
    c_term, k_term = zero, zero
    if cos == "channel":
        d, lc[0], lc[1], lc[2] = _cos_coefs(loc[0], loc[1], loc[2], eps)
        c_term = d.sum() / (B * HW)
    elif cos == "spatial":
        sums = row[:3].sum(dim=-1)
        d, rc[0], rc[1], rc[2] = _cos_coefs(sums[0], sums[1], sums[2], eps)
        c_term = d.sum() / (B * C)
    if kl == "channel":
        lc[3], lc[4], lc[5] = _kl_rows(loc[3], loc[4], loc[5], loc[6], loc[7])
        k_term = lc[5].sum() / (B * HW)
    elif kl == "spatial":
        mt = row[3].amax(dim=-1, keepdim=True)
        mg = row[5].amax(dim=-1, keepdim=True)
        et = (row[3] - mt).exp()
        zt = (row[4] * et).sum(-1)
        wt = (row[7] * et).sum(-1)
        zg = (row[6] * (row[5] - mg).exp()).sum(-1)
        rc[3], rc[4], rc[5] = _kl_rows(mt[..., 0], zt, mg[..., 0], zg, wt)
        k_term = rc[5].sum() / (B if kd_reduction == "sum_c" else B * C)
    return torch.stack([c_term, k_term]), LevelSaved(lc, rc)


def level_backward(grad_terms: Tensor, t: Tensor, s: Tensor, channel_gate: Optional[Tensor],
                   spatial_gate: Optional[Tensor], saved: LevelSaved, cos: str = "channel",
                   kl: str = "spatial", tau: float = 1.0, kd_reduction: str = "sum_c",
                   need_t: bool = False, need_s: bool = True, need_a: bool = False,
                   need_m: bool = False, block_c: int = 32, block_p: int = 128):
    """Backward of one level: one pass over ``t, s`` writing the gradients.

    Args:
        grad_terms: ``(2,)`` gradient of the level's ``[cosine, KL]`` terms.
        t, s, channel_gate, spatial_gate, cos, kl, tau, kd_reduction: as for
            :func:`level_forward`; ``saved`` its second output.
        need_t, need_s, need_a, need_m: which gradients to form.

    Returns:
        ``(dt, ds, da, dm)`` in the dtypes of ``t, s, channel_gate, spatial_gate`` (None where not
        requested).
    """
    B, C, H, W = t.shape
    HW = H * W
    acc = acc_torch_dtype(t.dtype)
    t, s, a, m = contig(t), contig(s), contig(channel_gate), contig(spatial_gate)
    need_a = need_a and a is not None
    need_m = need_m and m is not None
    BP = min(block_p, next_pow2(HW))
    BC = min(block_c, next_pow2(C))
    NPB = triton.cdiv(HW, BP)
    n_cos = {"channel": B * HW, "spatial": B * C, "none": 1}[cos]
    n_kl = {"channel": B * HW, "spatial": B if kd_reduction == "sum_c" else B * C, "none": 1}[kl]
    g2 = grad_terms.to(device=t.device, dtype=acc).reshape(2)
    w = torch.stack([g2[0] / n_cos, g2[1] / n_kl])
    ds = torch.empty_like(s) if need_s else None
    dt = torch.empty_like(t) if need_t else None
    dap = torch.empty((B, C, NPB), device=t.device, dtype=acc) if need_a else None
    dm = torch.empty((B, HW), device=t.device, dtype=acc) if need_m else None
    dummy = t
    _grad_kernel[(NPB, B)](
        t, s, a if a is not None else dummy, m if m is not None else dummy, w,
        saved.loc, saved.row,
        ds if ds is not None else dummy, dt if dt is not None else dummy,
        dap if dap is not None else w, dm if dm is not None else w,
        C, HW, NPB, saved.loc[0].numel(), saved.row[0].numel(), 1.0 / tau,
        HAS_A=a is not None, HAS_M=m is not None,
        COS_CH=cos == "channel", COS_SP=cos == "spatial",
        KL_CH=kl == "channel", KL_SP=kl == "spatial",
        NEED_S=need_s, NEED_T=need_t, NEED_A=need_a, NEED_M=need_m,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, BC=BC, BP=BP, num_warps=4)
    da = dap.sum(-1).to(channel_gate.dtype) if need_a else None
    dmv = dm.view(B, H, W).to(spatial_gate.dtype) if need_m else None
    return dt, ds, da, dmv


class _PyramidTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, n, *flat):
        ts, ss, cgs, sgs = flat[:n], flat[n:2 * n], flat[2 * n:3 * n], flat[3 * n:]
        out, saved = [], []
        for t, s, a, m in zip(ts, ss, cgs, sgs):
            terms, sv = level_forward(t, s, a, m, *cfg)
            out.append(terms)
            saved.append(sv)
        ctx.cfg, ctx.n, ctx.level_saved = cfg, n, saved
        ctx.save_for_backward(*flat)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad):
        flat = ctx.saved_tensors
        n = ctx.n
        cos, kl, tau, red, _eps = ctx.cfg
        need = ctx.needs_input_grad[2:]
        grads = [None] * (4 * n)
        for i in range(n):
            t, s, a, m = flat[i], flat[n + i], flat[2 * n + i], flat[3 * n + i]
            if not (need[i] or need[n + i] or need[2 * n + i] or need[3 * n + i]):
                continue
            dt, ds, da, dm = level_backward(
                grad[i], t, s, a, m, ctx.level_saved[i], cos, kl, tau, red,
                need_t=need[i], need_s=need[n + i], need_a=need[2 * n + i], need_m=need[3 * n + i])
            grads[i], grads[n + i], grads[2 * n + i], grads[3 * n + i] = dt, ds, da, dm
        return (None, None, *grads)


def pyramid_terms(teachers: Sequence[Tensor], students: Sequence[Tensor],
                  channel_gates: Optional[Sequence[Optional[Tensor]]] = None,
                  spatial_gates: Optional[Sequence[Optional[Tensor]]] = None,
                  cos: str = "channel", kl: str = "spatial", tau: float = 1.0,
                  kd_reduction: str = "sum_c", eps: float = DEFAULT_EPS) -> Tensor:
    """Triton fused pyramid loss with autograd: same contract as
    :func:`dcamkd.reference.pyramid_terms` (returns ``(L, 2)``: cosine and KL term per level).

    Raises:
        ShapeMismatchError: level counts or shapes disagree. InvalidArgumentError: bad modes.
    """
    n = len(teachers)
    if len(students) != n:
        raise ShapeMismatchError(f"students: expected {n} levels like teachers, got {len(students)}")
    cg = list(channel_gates) if channel_gates is not None else [None] * n
    sg = list(spatial_gates) if spatial_gates is not None else [None] * n
    if len(cg) != n or len(sg) != n:
        raise ShapeMismatchError(f"channel_gates/spatial_gates: expected {n} entries")
    return _PyramidTerms.apply((cos, kl, tau, kd_reduction, eps), n, *teachers, *students, *cg, *sg)


def bytes_moved(shapes, elem_bytes: int, teacher_grad: bool = False) -> dict:
    """Bytes this design moves for forward+backward over levels of ``shapes`` ``(B, C, H, W)``:
    ``{'design': 5*N*e (+N*e for dT), 'floor': 3*N*e (+N*e)}``; statistics excluded."""
    n = sum(b * c * h * w for b, c, h, w in shapes)
    extra = n * elem_bytes if teacher_grad else 0
    return {"design": 5 * n * elem_bytes + extra, "floor": 3 * n * elem_bytes + extra}
