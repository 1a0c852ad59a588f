"""Anomaly map of one pyramid level as a fused op: ``dcamkd::anomaly_map`` (C++ kernels:
``csrc/cpu/anomaly_map.cpp``, ``csrc/cuda/anomaly_map.cu``), its Triton twin
``dcamkd::anomaly_map_triton`` (:mod:`dcamkd.kernels.anomaly_map`), and the wrapper
:func:`anomaly_map_level`. Forward only (inference).

``M(b, p) = d(t_p, s_p)``, the channel cosine distance at every location (method.md section 5),
in one read of T and S: per-location sums ``|t|^2, |s|^2, t.s`` accumulated over channels.

Op contract: ``anomaly_map(Tensor t, Tensor s, float eps) -> Tensor``: ``t, s`` ``(B, C, H, W)``
of one dtype, both NCHW-contiguous or both channels_last; returns ``(B, H, W)`` in ``acc``
(float32; float64 for float64 inputs), values in [0, 2], NaN where a channel of ``t_p`` or
``s_p`` is NaN or Inf (as the reference). Bytes: reads ``2Ne``, writes ``B*H*W*4``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference as _ref
from ..errors import ShapeMismatchError
from . import _impl, _library

__all__ = ["SCHEMA", "anomaly_map_level"]

SCHEMA = "(Tensor t, Tensor s, float eps) -> Tensor"


def _fake(t, s, eps):
    b, _, h, w = s.shape
    return s.new_empty((b, h, w), dtype=_ref.acc_dtype(s.dtype))


def _triton(t, s, eps):
    from ..kernels import anomaly_map as kernel

    return kernel.anomaly_map(t, s, eps)


_library.define("anomaly_map", SCHEMA, _triton, _fake)


def anomaly_map_level(t: Tensor, s: Tensor, eps: float = _ref.DEFAULT_EPS) -> Tensor:
    """Anomaly map of one level, fused (spec :func:`dcamkd.reference.anomaly_map_level`). The
    implementation is the one of :func:`dcamkd.ops.use` / ``DCAMKD_IMPL``.

    Args:
        t, s: ``(B, C, H, W)`` teacher and raw student maps, equal shapes, any float dtype,
            NCHW or channels_last.
        eps: lower bound of the norms.

    Returns:
        ``(B, H, W)`` distances in [0, 2], float32 (float64 for float64 inputs); NaN where an
        input vector holds NaN or Inf.

    Forward only: when an input requires grad under autograd, the reference runs.

    Raises:
        ShapeMismatchError: shapes differ or are not 4-D. InvalidArgumentError, BuildError: see
        :func:`dcamkd.ops.resolve`.
    """
    if t.dim() != 4 or t.shape != s.shape:
        raise ShapeMismatchError(
            f"t and s must be equal (B, C, H, W) shapes, got {tuple(t.shape)} and {tuple(s.shape)}")
    impl = _impl.resolve(s.device)
    if impl == "reference" or (torch.is_grad_enabled() and (t.requires_grad or s.requires_grad)):
        return _ref.anomaly_map_level(t, s, eps)
    dtype = torch.promote_types(t.dtype, s.dtype)
    t, s = t.to(dtype), s.to(dtype)
    if not (t.is_contiguous() and s.is_contiguous()):
        cl = torch.channels_last
        if not (t.is_contiguous(memory_format=cl) and s.is_contiguous(memory_format=cl)):
            t, s = t.contiguous(), s.contiguous()
    op = torch.ops.dcamkd.anomaly_map_triton if impl == "triton" else torch.ops.dcamkd.anomaly_map
    return op(t, s, float(eps))
