"""Fused ops of dcamkd: the pyramid distillation loss, the DCAM attention pieces, the anomaly map.

Public API (the signatures of :mod:`dcamkd.reference`, which is their specification):

* :func:`pyramid_terms` - cosine and KL terms of every pyramid level, optional DCAM gates.
* :func:`channel_pool`, :func:`spatial_pool`, :func:`apply_gates` - DCAM attention pieces.
* :func:`anomaly_map_level` - per-level channel cosine distance for inference (forward only).
* :func:`use` / ``DCAMKD_IMPL`` - which implementation runs (:data:`IMPLS`: ``'fused'`` (default),
  ``'reference'``, ``'cpp'``, ``'triton'``, ``'cuda'``); :func:`current` and :func:`resolve` tell
  the setting and what it gives for a device (see :mod:`dcamkd.ops._impl`).

How a call reaches its kernel (``docs/adding-an-op.md``): the wrapper (e.g.
:func:`pyramid_terms`) validates its arguments, asks :func:`resolve` once, then either calls the
reference directly or calls one registered op: ``torch.ops.dcamkd.<op>`` (the dispatcher runs the
C++ kernel registered for the tensors' device, ``csrc/cpu/<op>.cpp`` or ``csrc/cuda/<op>.cu``) or
``torch.ops.dcamkd.<op>_triton`` (:mod:`dcamkd.kernels.<op>`). The schemas carry no
implementation selector, so compiled and exported graphs hold the op that ran and nothing else.
Schemas, fake implementations and autograd formulas are written once per op, in
``dcamkd/ops/<op>.py``, and registered for both op names (:mod:`dcamkd.ops._library`); each module
documents its op contract (layouts, dtypes, statistics, gradient formulas, bytes moved).

On CUDA tensors ``'fused'`` runs the Triton kernels; the CUDA C++ kernels run when chosen
(``'cuda'``). There is no measured CUDA-vs-Triton chooser: timing both inside the first call hid
state from ``torch.compile`` and CUDA graphs and made runs depend on a race, and no GPU
measurement favours the CUDA kernels (Triton needs no nvcc and is visible to ``torch.compile``).
"""

from __future__ import annotations

from ._impl import DEFAULT_IMPL, ENV_VAR, IMPLS, current, resolve, use
from .anomaly_map import anomaly_map_level
from .attention import apply_gates, channel_pool, spatial_pool
from .pyramid_loss import check_scalar, pyramid_terms

__all__ = [
    "pyramid_terms",
    "check_scalar",
    "channel_pool",
    "spatial_pool",
    "apply_gates",
    "anomaly_map_level",
    "use",
    "current",
    "resolve",
    "IMPLS",
    "DEFAULT_IMPL",
    "ENV_VAR",
]
