"""Fused ops of dcamkd, with backend choice (``auto | reference | cpu | triton | cuda``).

Public API (the same signatures as :mod:`dcamkd.reference`, plus ``backend=``):

* :func:`pyramid_terms` - cosine and KL terms of every pyramid level, optional DCAM gates.
* :func:`channel_pool`, :func:`spatial_pool`, :func:`apply_gates` - DCAM attention pieces.
* :func:`anomaly_map_level` - per-level channel cosine distance for inference.

PLACEHOLDER: until the fused kernels land, every backend runs the reference.
"""

from __future__ import annotations

from .. import reference as _ref

__all__ = ["pyramid_terms", "channel_pool", "spatial_pool", "apply_gates", "anomaly_map_level"]


def pyramid_terms(teachers, students, channel_gates=None, spatial_gates=None, cos="channel",
                  kl="spatial", tau=1.0, kd_reduction="sum_c", eps=_ref.DEFAULT_EPS, backend=None):
    return _ref.pyramid_terms(teachers, students, channel_gates, spatial_gates, cos, kl, tau,
                              kd_reduction, eps)


def channel_pool(x, backend=None):
    return _ref.channel_pool(x)


def spatial_pool(x, channel_gate=None, backend=None):
    return _ref.spatial_pool(x, channel_gate)


def apply_gates(s, channel_gate=None, spatial_gate=None, backend=None):
    return _ref.apply_gates(s, channel_gate, spatial_gate)


def anomaly_map_level(t, s, eps=_ref.DEFAULT_EPS, backend=None):
    return _ref.anomaly_map_level(t, s, eps)
