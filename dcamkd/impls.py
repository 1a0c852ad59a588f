"""Names of the implementations of the fused ops, without importing torch (the command line's
``--impl`` choices come from here). The setting itself, :func:`dcamkd.ops.use`, and what each
value runs are in :mod:`dcamkd.ops._impl`.
"""

__all__ = ["IMPLS", "DEFAULT_IMPL", "ENV_VAR", "STRICT_ENV_VAR"]

#: Allowed values of the setting: ``fused`` (the fused kernel of the tensors' device: C++ on CPU,
#: Triton on CUDA), ``reference`` (pure PyTorch), ``cpp``, ``triton``, ``cuda``.
IMPLS = ("fused", "reference", "cpp", "triton", "cuda")
DEFAULT_IMPL = "fused"
#: The environment variable read when :func:`dcamkd.ops.use` is not in force.
ENV_VAR = "DCAMKD_IMPL"
#: ``DCAMKD_STRICT_BUILD=1``: ``fused`` raises instead of falling back to the reference.
STRICT_ENV_VAR = "DCAMKD_STRICT_BUILD"
