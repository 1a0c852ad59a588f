"""GPU kernels of dcamkd: Triton (one module per op) and the CUDA extension loader.

Modules (import them explicitly; this package imports nothing heavy at import time so that
``TRITON_INTERPRET=1`` can be set before ``triton`` is first imported):

* :mod:`dcamkd.kernels.pyramid_loss` - fused pyramid loss with optional DCAM gates.
* :mod:`dcamkd.kernels.attention` - DCAM channel/spatial pooling (fwd/bwd) and gating.
* :mod:`dcamkd.kernels.anomaly_map` - per-level anomaly map (inference).
* :mod:`dcamkd.kernels.cuda_ext` - JIT build of ``csrc/cuda/*.cu`` and its host wrappers.
* :mod:`dcamkd.kernels.dispatch` - GPU backend choice (``triton | cuda | auto``).
"""
