"""Triton kernels of dcamkd, one module per op: the ``@triton.jit`` kernels and their host
functions (block sizes, grids, the small tensor ops around them).

* :mod:`dcamkd.kernels.pyramid_loss` - fused pyramid loss with optional DCAM gates.
* :mod:`dcamkd.kernels.attention` - DCAM channel/spatial pooling (fwd/bwd) and gating.
* :mod:`dcamkd.kernels.anomaly_map` - per-level anomaly map, inference.

The host functions have the arguments of the ops ``dcamkd::<op>_triton`` that :mod:`dcamkd.ops`
registers with :func:`torch.library.triton_op`; they launch kernels through
:func:`dcamkd.kernels._common.launch` (``torch.library.wrap_triton``, so that ``torch.compile``
sees the kernels). This package imports nothing from :mod:`dcamkd.ops` and registers nothing;
the modules import ``triton`` when first imported (by the op, on its first call), so
``TRITON_INTERPRET=1`` (run on CPU tensors, for tests) may be set any time before that.
"""
