"""GPU kernels of dcamkd: Triton (one module per op) and the CUDA extension.

Modules:

* :mod:`dcamkd.kernels.pyramid_loss` - fused pyramid loss with optional DCAM gates (Triton).
* :mod:`dcamkd.kernels.attention` - DCAM channel/spatial pooling (fwd/bwd) and gating (Triton).
* :mod:`dcamkd.kernels.anomaly_map` - per-level anomaly map, inference (Triton).
* :mod:`dcamkd.kernels.cuda_ext` - JIT build of ``csrc/cuda/*.cu`` and its host wrappers.
* :mod:`dcamkd.kernels.dispatch` - the measured ``'auto'`` choice between the two on CUDA.

Importing this package registers the ``'triton'`` kernels of every ``dcamkd`` op with
:func:`dcamkd.ops._backend.register_kernel` (and the ``'cuda'`` kernels when a CUDA toolkit is
found), through thin adapters that import ``triton`` only when first called, so that
``TRITON_INTERPRET=1`` may still be set after this import and before the first call.
"""

from __future__ import annotations

import importlib

__all__ = ["OPS", "triton_kernel", "register_all"]

#: op name -> (module, function) of the Triton kernel implementing it.
OPS = {
    "pyramid_loss": ("pyramid_loss", "pyramid_loss"),
    "pyramid_loss_backward": ("pyramid_loss", "pyramid_loss_backward"),
    "channel_pool": ("attention", "channel_pool"),
    "channel_pool_backward": ("attention", "channel_pool_backward"),
    "spatial_pool": ("attention", "spatial_pool"),
    "spatial_pool_backward": ("attention", "spatial_pool_backward"),
    "apply_gates": ("attention", "apply_gates"),
    "apply_gates_backward": ("attention", "apply_gates_backward"),
    "anomaly_map": ("anomaly_map", "anomaly_map_level"),
}


def triton_kernel(op: str):
    """The Triton host function of ``op`` (imports its module, hence ``triton``)."""
    mod, fn = OPS[op]
    return getattr(importlib.import_module(f"{__name__}.{mod}"), fn)


def _adapter(op: str):
    def run(*args):
        return triton_kernel(op)(*args)

    run.__name__ = f"triton_{op}"
    run.__doc__ = f"Triton kernel of dcamkd::{op} (see dcamkd.kernels.{OPS[op][0]})."
    return run


def register_all() -> None:
    """Register the Triton kernels (and the CUDA ones when a toolkit exists) and the measured
    ``'auto'`` chooser with the op registry of :mod:`dcamkd.ops._backend`."""
    from ..ops import _backend
    from . import cuda_ext, dispatch

    for op in OPS:
        _backend.register_kernel(op, "triton", _adapter(op))
    if cuda_ext.toolkit_available():
        for op in OPS:
            _backend.register_kernel(op, "cuda", cuda_ext.kernel(op))
    dispatch.install()


register_all()
