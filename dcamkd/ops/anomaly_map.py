"""Anomaly map of one pyramid level as a fused op: ``dcamkd::anomaly_map`` (forward only).

``M(b, p) = d(t_p, s_p)``, the channel cosine distance at every location (method.md section 5),
in one read of T and S: per-location sums ``|t|^2, |s|^2, t.s`` accumulated over channels.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference as _ref
from ..errors import ShapeMismatchError
from . import _backend

OP = "anomaly_map"

torch.library.define("dcamkd::anomaly_map", "(Tensor t, Tensor s, float eps, str backend) -> Tensor")


@torch.library.register_fake("dcamkd::anomaly_map")
def _fake(t, s, eps, backend):
    b, _, h, w = s.shape
    return s.new_empty((b, h, w), dtype=_ref.acc_dtype(s.dtype))


def _tramp(t, s, eps, backend):
    return _backend.run_kernel(OP, backend, t, s, eps)


for _dev in ("cpu", "cuda"):
    torch.library.impl("dcamkd::anomaly_map", _dev)(_tramp)


def anomaly_map_level(t: Tensor, s: Tensor, eps: float = _ref.DEFAULT_EPS,
                      backend: Optional[str] = None) -> Tensor:
    """Anomaly map of one level, fused (spec :func:`dcamkd.reference.anomaly_map_level`).

    Args:
        t, s: ``(B, C, H, W)`` teacher and raw student maps, equal shapes, any float dtype,
            NCHW or channels_last.
        eps: lower bound of the norms.
        backend: see :func:`dcamkd.ops.pyramid_terms`.

    Returns:
        ``(B, H, W)`` distances in [0, 2], float32 (float64 for float64 inputs).

    Forward only: when an input requires grad under autograd, the reference runs (and is
    recorded as the backend that ran).

    Raises:
        ShapeMismatchError: shapes differ or are not 4-D. InvalidArgumentError: bad backend.
    """
    if t.dim() != 4 or t.shape != s.shape:
        raise ShapeMismatchError(
            f"t and s must be equal (B, C, H, W) shapes, got {tuple(t.shape)} and {tuple(s.shape)}")
    be = _backend.resolve(OP, s.device, backend)
    if be == "reference" or (torch.is_grad_enabled() and (t.requires_grad or s.requires_grad)):
        _backend.record(OP, "reference")
        return _ref.anomaly_map_level(t, s, eps)
    dtype = torch.promote_types(t.dtype, s.dtype)
    t, s = t.to(dtype), s.to(dtype)
    if not (t.is_contiguous() and s.is_contiguous()):
        cl = torch.channels_last
        if not (t.is_contiguous(memory_format=cl) and s.is_contiguous(memory_format=cl)):
            t, s = t.contiguous(), s.contiguous()
    return torch.ops.dcamkd.anomaly_map(t, s, float(eps), be)
