"""Pure-PyTorch reference of every op in dcamkd.

This module is the specification that every fused kernel (C++, Triton, CUDA) is held
against: tests compare the fused ops with these functions and benchmarks time them as the
"eager" provider. Everything here is written for clarity, with ordinary autograd; nothing is
fused.

Conventions (``docs``: ``shared/docs/method.md`` sections 3-5):

* Feature maps are ``(B, C, H, W)`` tensors. A *pyramid* is a list of such maps, one per
  pyramid level; teacher and student pyramids have equal shapes level by level.
* Reductions are computed in float32 for float16/bfloat16 inputs and in the input precision
  for float32/float64 inputs. Results are float32, or float64 for float64 inputs.
* Cosine distance is ``d(u, v) = 0.5 * |u^ - v^|^2`` with ``x^ = x / max(|x|, eps)``: equal to
  ``1 - cos(u, v)`` for non-zero vectors, 0 for two zero vectors and 0.5 for one zero vector
  (method.md section 4).
* KL terms use the teacher as the target, ``KL(P || Q)`` with ``P = softmax(t / tau)`` and
  ``log Q = log_softmax(s / tau)``, computed with max-subtracted log-softmax, without a
  ``tau**2`` factor.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .objective import COS_MODES, DEFAULT_EPS, KD_REDUCTIONS, KL_MODES, MINE_COS_MODES, MINE_RULES, check_choice

__all__ = [
    "COS_MODES",
    "KL_MODES",
    "KD_REDUCTIONS",
    "DEFAULT_EPS",
    "acc_dtype",
    "normalize",
    "cosine_distance",
    "channel_cd",
    "spatial_cd",
    "global_cd",
    "MINE_RULES",
    "mining_level",
    "cos_distance_from_norms",
    "mining_weights",
    "scale_grad",
    "spatial_kd",
    "channel_kd",
    "apply_gates",
    "channel_pool",
    "spatial_pool",
    "level_terms",
    "pyramid_terms",
    "anomaly_map_level",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for an input dtype: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(x: Tensor) -> Tensor:
    return x.to(acc_dtype(x.dtype))


def normalize(x: Tensor, dim: int, eps: float = DEFAULT_EPS) -> Tensor:
    """``x / max(|x|_2, eps)`` along ``dim``, in the accumulation dtype.

    The norm's gradient at an exact zero vector is taken as 0 (``torch.linalg.vector_norm``'s
    subgradient), so zero vectors give finite gradients.
    """
    x = _acc(x)
    n = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    return x / n.clamp_min(eps)


def cosine_distance(u: Tensor, v: Tensor, dim: int, eps: float = DEFAULT_EPS) -> Tensor:
    """Cosine distance ``0.5 * |u^ - v^|^2`` along ``dim`` (method.md section 4).

    Args:
        u, v: tensors of equal shape, any float dtype.
        dim: the dimension holding the vectors.
        eps: lower bound of the norm used for normalisation.

    Returns:
        ``u.shape`` without ``dim``, float32 (float64 for float64 inputs). In [0, 2].
    """
    du = normalize(u, dim, eps)
    dv = normalize(v, dim, eps)
    return 0.5 * (du - dv).pow(2).sum(dim=dim)


def channel_cd(t: Tensor, s: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Channel-wise cosine distance: mean over batch and locations of ``d(t_p, s_p)``.

    The STFPM loss of one level (Wang et al. 2021, eq. 2), averaged instead of summed.
    ``t, s``: ``(B, C, H, W)``. Returns a 0-dim tensor.
    """
    return cosine_distance(t, s, dim=1, eps=eps).mean()


def spatial_cd(t: Tensor, s: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Spatial cosine distance: mean over batch and channels of ``d(t_c, s_c)`` with
    ``t_c, s_c`` the flattened ``H*W`` maps of channel ``c``. ``(B, C, H, W)`` -> 0-dim."""
    return cosine_distance(t.flatten(2), s.flatten(2), dim=2, eps=eps).mean()


def global_cd(t: Tensor, s: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Global cosine distance: mean over the batch of ``d(t_b, s_b)`` with ``t_b, s_b`` the whole
    flattened ``C*H*W`` map of image ``b`` (ReContrast, Guo et al. 2023, eq. 3; Dinomaly, Guo et
    al. 2024, section 3.4). ``1 - <t_b, s_b> / (|t_b| |s_b|)`` for non-zero maps; norms below
    ``eps`` follow the cosine-distance convention of this module. ``(B, C, H, W)`` -> 0-dim."""
    return cosine_distance(t.flatten(1), s.flatten(1), dim=1, eps=eps).mean()


def mining_level(progress, start: float, final: float) -> Tensor:
    """Selection level of the mining ramp: ``start + (final - start) * clamp(progress, 0, 1)``.

    ``progress`` is a 0-dim tensor (``step / ramp_steps``; a tensor so that ``torch.compile``
    does not recompile as it changes) or a float. Returns a 0-dim float64 tensor (on
    ``progress``'s device).
    """
    p = torch.as_tensor(progress, dtype=torch.float64)
    return start + (final - start) * p.clamp(0.0, 1.0)


def cos_distance_from_norms(nt: Tensor, ns: Tensor, ts: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Cosine distance from plain norms ``|t|, |s|`` and the dot product ``t.s`` (elementwise):
    ``0.5 (|t|^2/r_t^2 + |s|^2/r_s^2) - t.s/(r_t r_s)``, ``r_x = max(|x|, eps)``: equal to
    :func:`cosine_distance` (the fused ops select mined locations from their saved statistics
    with it)."""
    rt, rs = nt.clamp_min(eps), ns.clamp_min(eps)
    return 0.5 * ((nt / rt) ** 2 + (ns / rs) ** 2) - ts / (rt * rs)


_K_GUARD = 1e-9  # rounding guard of k = floor(N (1 - p)) in mining_weights


def mining_weights(dist: Tensor, rule: str, factor: float, level) -> Tensor:
    """Per-location gradient weights of hard mining: ``factor`` at the easy locations, 1 elsewhere.

    The threshold is selected over all of ``dist`` (every location of the batch at one level),
    on ``dist``'s device with torch ops (no host synchronisation):

    * ``'quantile'`` (Dinomaly's ``topk`` rule): with ``N = dist.numel()`` and
      ``k = floor(N (1 - p) + 1e-9)`` (``p = level``, float64; the guard keeps ``N = 10,
      p = 0.9`` at ``k = 1`` despite rounding), the threshold is the
      ``k``-th largest distance and a location is easy when its distance is strictly below it.
      So ``p = 0`` mines nothing (``k = N``: the threshold is the minimum), ties at the threshold
      keep their gradient, and ``N (1 - p) < 1`` (``k = 0``) mines every location.
    * ``'zscore'`` (ReContrast): easy when ``dist < mean + alpha * std`` (``alpha = level``,
      unbiased std; std 0 when ``N = 1``).
    * ``'none'``: all ones.

    Args:
        dist: per-location distances, any shape (``(B, H, W)``), detached inside.
        rule: one of :data:`MINE_RULES`.
        factor: gradient factor of the easy locations (0 removes their gradient).
        level: ``p`` or ``alpha``, a 0-dim tensor or a float.

    Returns:
        weights of ``dist``'s shape and dtype.

    Raises:
        InvalidArgumentError: unknown rule.
    """
    check_choice("mine", rule, MINE_RULES)
    d = dist.detach()
    if rule == "none":
        return torch.ones_like(d)
    flat = d.reshape(-1)
    n = flat.numel()
    lv = torch.as_tensor(level, dtype=torch.float64, device=d.device)
    if rule == "quantile":
        k = torch.floor(n * (1.0 - lv) + _K_GUARD).clamp(0, n).to(torch.int64)
        desc = torch.sort(flat, descending=True).values
        kth = desc.gather(0, (k - 1).clamp_min(0).reshape(1)).reshape(())
        thresh = torch.where(k >= 1, kth, torch.full_like(kth, float("inf")))
    else:
        mean = flat.mean()
        std = flat.std() if n > 1 else torch.zeros_like(mean)
        thresh = mean + lv.to(flat.dtype) * std
    easy = d < thresh
    return torch.where(easy, torch.full_like(d, float(factor)), torch.ones_like(d))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``w`` (broadcast)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(w)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return g * w.to(g.dtype), None


def scale_grad(x: Tensor, w: Tensor) -> Tensor:
    """``x`` unchanged in the forward, its gradient multiplied by ``w`` (broadcast to ``x``):
    the gradient of the surrogate ``w * x + (1 - w) * x.detach()`` with an exact forward."""
    return _ScaleGrad.apply(x, w)


def _kl_rows(t: Tensor, s: Tensor, dim: int, tau: float) -> Tensor:
    """``KL(softmax(t/tau) || softmax(s/tau))`` along ``dim`` (teacher as target)."""
    lp = torch.log_softmax(_acc(t) / tau, dim=dim)
    lq = torch.log_softmax(_acc(s) / tau, dim=dim)
    return (lp.exp() * (lp - lq)).sum(dim=dim)


def spatial_kd(t: Tensor, s: Tensor, tau: float = 1.0, reduction: str = "sum_c") -> Tensor:
    """Spatial KL distillation (DCAM, Jena et al. 2024, section 3.2).

    For each (b, c): ``KL(P || Q)`` with softmaxes over the ``H*W`` locations.
    ``reduction='sum_c'``: sum over channels, mean over the batch (the reference code);
    ``'mean_c'``: mean over batch and channels. ``(B, C, H, W)`` -> 0-dim.
    """
    kl = _kl_rows(t.flatten(2), s.flatten(2), dim=2, tau=tau)  # (B, C)
    if check_choice("kd_reduction", reduction, KD_REDUCTIONS) == "sum_c":
        return kl.sum(dim=1).mean()
    return kl.mean()


def channel_kd(t: Tensor, s: Tensor, tau: float = 1.0) -> Tensor:
    """Channel KL distillation: ``KL(P || Q)`` with softmaxes over channels at each location,
    mean over batch and locations. ``(B, C, H, W)`` -> 0-dim."""
    return _kl_rows(t, s, dim=1, tau=tau).mean()


def apply_gates(
    s: Tensor, channel_gate: Optional[Tensor] = None, spatial_gate: Optional[Tensor] = None
) -> Tensor:
    """DCAM gating ``a_c * m_p * s`` (method.md section 3).

    Args:
        s: ``(B, C, H, W)`` student map.
        channel_gate: ``(B, C)`` gate ``a`` or None.
        spatial_gate: ``(B, H, W)`` gate ``m`` or None.

    Returns:
        ``(B, C, H, W)`` in the dtype of ``s``.
    """
    out = s
    if channel_gate is not None:
        out = out * channel_gate[:, :, None, None].to(s.dtype)
    if spatial_gate is not None:
        out = out * spatial_gate[:, None, :, :].to(s.dtype)
    return out


def channel_pool(x: Tensor) -> tuple[Tensor, Tensor]:
    """Average and max over ``H*W`` of each channel: ``(B, C, H, W)`` -> two ``(B, C)`` tensors
    in the accumulation dtype (CBAM channel attention input, Woo et al. 2018, eq. 2)."""
    xf = _acc(x).flatten(2)
    return xf.mean(dim=2), xf.amax(dim=2)


def spatial_pool(x: Tensor, channel_gate: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Mean and max over channels at each location of ``a_c * x`` (``a`` = ``channel_gate``,
    ``(B, C)``, optional, for cbam): ``(B, C, H, W)`` -> two ``(B, H, W)`` tensors in the
    accumulation dtype (CBAM spatial attention input, Woo et al. 2018, eq. 3)."""
    xa = _acc(x)
    if channel_gate is not None:
        xa = xa * _acc(channel_gate)[:, :, None, None]
    return xa.mean(dim=1), xa.amax(dim=1)


def level_terms(
    t: Tensor,
    s: Tensor,
    channel_gate: Optional[Tensor] = None,
    spatial_gate: Optional[Tensor] = None,
    cos: str = "channel",
    kl: str = "spatial",
    tau: float = 1.0,
    kd_reduction: str = "sum_c",
    eps: float = DEFAULT_EPS,
    mine: str = "none",
    mine_factor: float = 1.0,
    mine_level=0.0,
) -> Tensor:
    """Cosine and KL terms of one pyramid level, the student gated first.

    Hard mining (``mine`` in :data:`MINE_RULES`, ``cos`` in ``('channel', 'global')``;
    docs/mining.md): the per-location distance ``d_p = d(t_p, s'_p)`` over channels of the
    teacher and the *gated* student ``s' = a_c m_p s`` (the channel-CD distance, detached)
    selects the easy locations of this level over the whole batch (:func:`mining_weights` with
    ``mine_factor`` and ``mine_level``, a 0-dim tensor); the gradient ``dL_cos/ds'`` there is
    multiplied by ``mine_factor`` (:func:`scale_grad`). Hence the student's and the gates'
    gradients from the cosine term are mined; the teacher's (frozen in training) is not, nor is
    the KL term. The forward value is unchanged.

    Returns a ``(2,)`` tensor ``[cosine term, KL term]`` (0 for a mode ``'none'``), float32 or
    float64 for float64 inputs.
    """
    check_choice("cos", cos, COS_MODES)
    check_choice("kl", kl, KL_MODES)
    check_choice("mine", mine, MINE_RULES)
    sg = apply_gates(s, channel_gate, spatial_gate)
    zero = torch.zeros((), dtype=acc_dtype(t.dtype), device=t.device)
    sc = sg
    if mine != "none":
        check_choice("cos (with mining)", cos, MINE_COS_MODES)
        w = mining_weights(cosine_distance(t, sg, dim=1, eps=eps).detach(), mine, mine_factor, mine_level)
        sc = scale_grad(sg, w[:, None])
    if cos == "channel":
        c = channel_cd(t, sc, eps)
    elif cos == "spatial":
        c = spatial_cd(t, sc, eps)
    elif cos == "global":
        c = global_cd(t, sc, eps)
    else:
        c = zero
    if kl == "spatial":
        k = spatial_kd(t, sg, tau, kd_reduction)
    elif kl == "channel":
        k = channel_kd(t, sg, tau)
    else:
        k = zero
    return torch.stack([c, k])


def pyramid_terms(
    teachers: Sequence[Tensor],
    students: Sequence[Tensor],
    channel_gates: Optional[Sequence[Optional[Tensor]]] = None,
    spatial_gates: Optional[Sequence[Optional[Tensor]]] = None,
    cos: str = "channel",
    kl: str = "spatial",
    tau: float = 1.0,
    kd_reduction: str = "sum_c",
    eps: float = DEFAULT_EPS,
    mine: str = "none",
    mine_factor: float = 1.0,
    mine_level=0.0,
) -> Tensor:
    """Cosine and KL terms of every pyramid level: the reference of the fused pyramid loss.

    Args:
        teachers, students: lists of ``(B, C_l, H_l, W_l)`` maps, equal shapes per level.
        channel_gates: per level ``(B, C_l)`` gate or None (or None for all levels).
        spatial_gates: per level ``(B, H_l, W_l)`` gate or None.
        cos: ``'channel'`` (channel CD), ``'spatial'`` (spatial CD), ``'global'`` (global CD:
            per image, the whole flattened map) or ``'none'``.
        kl: ``'spatial'`` (spatial KD), ``'channel'`` (channel KD) or ``'none'``.
        tau: softmax temperature (> 0).
        kd_reduction: ``'sum_c'`` or ``'mean_c'`` for the spatial KD.
        eps: lower bound of norms in the cosine distance.
        mine, mine_factor, mine_level: hard mining of the cosine term's gradient, per level
            (see :func:`level_terms`); ``mine_level`` the current ``p`` / ``alpha``.

    Returns:
        ``(L, 2)`` tensor: column 0 the cosine term, column 1 the KL term of each level.
    """
    n = len(teachers)
    cg = list(channel_gates) if channel_gates is not None else [None] * n
    sg = list(spatial_gates) if spatial_gates is not None else [None] * n
    rows = [
        level_terms(t, s, a, m, cos, kl, tau, kd_reduction, eps, mine, mine_factor, mine_level)
        for t, s, a, m in zip(teachers, students, cg, sg)
    ]
    return torch.stack(rows)


def anomaly_map_level(t: Tensor, s: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Anomaly map of one level: ``d(t_p, s_p)`` at every location (method.md section 5).

    ``(B, C, H, W)`` teacher and student -> ``(B, H, W)``, float32 (float64 for float64).
    """
    return cosine_distance(t, s, dim=1, eps=eps)
