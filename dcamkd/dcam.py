"""DCAM attention blocks: distributed convolutional attention on the student (method.md
section 3; Jena et al. 2024, section 3.1; the channel/spatial modules of CBAM, Woo et al. 2018,
eqs. 2-3).

One block per pyramid level, a side branch of the student used only in training: a block maps
the student map ``S`` (``(B, C, H, W)``) to *gates*, and the loss compares the teacher with the
gated student ``a_c * m_p * S`` (the gating is fused into the loss op, so the gated copy of
``S`` is never written). At inference the blocks are dropped (``dcam_at_inference='drop'``) or
kept (``'keep'``, then :meth:`DCAMBlock.attend` gives the gated map).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import ops
from .errors import InvalidArgumentError, ShapeMismatchError
from .objective import DCAM_VARIANTS, check_gate_floor  # DCAM_VARIANTS re-exported

__all__ = ["DCAM_VARIANTS", "ChannelAttention", "SpatialAttention", "DCAMBlock", "DCAM"]


def _gate(z: Tensor, floor: float) -> Tensor:
    """``floor + (1 - floor) * sigmoid(z)``: a gate in ``(floor, 1)`` (``sigmoid(z)`` for floor 0)."""
    g = torch.sigmoid(z)
    return g if floor == 0.0 else floor + (1.0 - floor) * g


class ChannelAttention(nn.Module):
    """Channel gate ``a = f + (1 - f) sigmoid(MLP(avgpool S) + MLP(maxpool S))`` in ``(f, 1)^C``.

    The MLP is shared, bias-free: ``C -> max(1, C // reduction) -> C`` with a ReLU between.
    ``gate_floor`` ``f`` in [0, 1) (0: the paper's gate, CBAM eq. 2) keeps gates from closing:
    a closed gate hides its channel from the loss and stops the student's gradient there.
    ``forward(s)``: ``s`` ``(B, C, H, W)`` -> gate ``(B, C)`` in the accumulation dtype
    (float32, float64 for float64 input).
    """

    def __init__(self, channels: int, reduction: int = 8, gate_floor: float = 0.0):
        super().__init__()
        if channels < 1 or reduction < 1:
            raise InvalidArgumentError(
                f"ChannelAttention needs channels >= 1 and reduction >= 1, got {channels}, {reduction}"
            )
        self.gate_floor = check_gate_floor(gate_floor)
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden, bias=False), nn.ReLU(inplace=True), nn.Linear(hidden, channels, bias=False)
        )

    def forward(self, s: Tensor) -> Tensor:
        avg, mx = ops.channel_pool(s)
        w = self.mlp[0].weight
        avg, mx = avg.to(w.dtype), mx.to(w.dtype)
        return _gate(self.mlp(avg) + self.mlp(mx), self.gate_floor)


class SpatialAttention(nn.Module):
    """Spatial gate ``m = f + (1 - f) sigmoid(conv_kxk([mean_c S; max_c S]))`` in ``(f, 1)^(H x W)``.

    Bias-free 2 -> 1 convolution, ``kernel_size`` odd (default 7, padding 3); ``gate_floor`` ``f``
    as in :class:`ChannelAttention` (CBAM eq. 3 for f = 0).
    ``forward(s, channel_gate=None)``: pools ``a_c * s`` when a channel gate ``(B, C)`` is
    given (cbam); returns ``(B, H, W)``.
    """

    def __init__(self, kernel_size: int = 7, gate_floor: float = 0.0):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise InvalidArgumentError(f"SpatialAttention kernel_size must be odd and >= 1, got {kernel_size}")
        self.gate_floor = check_gate_floor(gate_floor)
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, s: Tensor, channel_gate: Optional[Tensor] = None) -> Tensor:
        mean, mx = ops.spatial_pool(s, channel_gate)
        x = torch.stack([mean, mx], dim=1).to(self.conv.weight.dtype)
        return _gate(self.conv(x), self.gate_floor)[:, 0]


class DCAMBlock(nn.Module):
    """The attention block of one pyramid level.

    ``forward(s)`` returns ``(channel_gate, spatial_gate)``: ``(B, C)`` or None and
    ``(B, H, W)`` or None, by ``variant``: ``none`` (both None), ``channel``, ``spatial`` or
    ``cbam`` (channel, then spatial attention pooled from the channel-gated map). Every gate is
    at least ``gate_floor`` (:class:`ChannelAttention`).
    """

    def __init__(self, channels: int, variant: str = "channel", reduction: int = 8, kernel_size: int = 7,
                 gate_floor: float = 0.0):
        super().__init__()
        if variant not in DCAM_VARIANTS:
            raise InvalidArgumentError(f"dcam must be one of {DCAM_VARIANTS}, got {variant!r}")
        self.variant = variant
        self.channels = channels
        self.channel = ChannelAttention(channels, reduction, gate_floor) if variant in ("channel", "cbam") else None
        self.spatial = SpatialAttention(kernel_size, gate_floor) if variant in ("spatial", "cbam") else None

    def forward(self, s: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
        if s.dim() != 4 or s.shape[1] != self.channels:
            raise ShapeMismatchError(
                f"DCAM block of {self.channels} channels got a map of shape {tuple(s.shape)}: expected (B, {self.channels}, H, W)"
            )
        a = self.channel(s) if self.channel is not None else None
        m = self.spatial(s, a) if self.spatial is not None else None
        return a, m

    def attend(self, s: Tensor) -> Tensor:
        """The gated map ``a_c * m_p * s``, ``(B, C, H, W)`` in the dtype of ``s``."""
        a, m = self(s)
        if a is None and m is None:
            return s
        return ops.apply_gates(s, a, m)


class DCAM(nn.Module):
    """One :class:`DCAMBlock` per pyramid level.

    ``forward(students)``: list of ``(B, C_l, H_l, W_l)`` -> (list of channel gates, list of
    spatial gates), entries None where the variant has no such gate. ``gate_floor``: see
    :class:`ChannelAttention`.
    """

    def __init__(self, channels: tuple[int, ...], variant: str = "channel", reduction: int = 8, kernel_size: int = 7,
                 gate_floor: float = 0.0):
        super().__init__()
        self.variant = variant
        self.blocks = nn.ModuleList(DCAMBlock(c, variant, reduction, kernel_size, gate_floor) for c in channels)

    def forward(self, students: list[Tensor]):
        if len(students) != len(self.blocks):
            raise InvalidArgumentError(
                f"DCAM has {len(self.blocks)} levels, got {len(students)} student maps"
            )
        gates = [blk(s) for blk, s in zip(self.blocks, students)]
        return [g[0] for g in gates], [g[1] for g in gates]

    def attend(self, students: list[Tensor]) -> list[Tensor]:
        """Gated student maps, one per level (for ``dcam_at_inference='keep'``)."""
        return [blk.attend(s) for blk, s in zip(self.blocks, students)]
