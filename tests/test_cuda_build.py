"""The CUDA kernels (csrc/cuda/*.cu): compile and link wherever nvcc exists, so that a broken .cu
fails CI without a GPU; loading the library registers every kernel with the dispatcher
(``TORCH_LIBRARY_IMPL(dcamkd, CUDA, m)``), which also checks each C++ signature against the op's
schema. The GPU parity of the CUDA kernels runs in the per-op test files (``cuda`` parameter).

The build is cached (``$DCAMKD_CACHE_DIR`` or ``~/.cache/dcamkd``, keyed by a hash of the
sources), so CI compiles once per source version. One architecture (``TORCH_CUDA_ARCH_LIST``,
default 9.0 without a GPU), ``-O2``. Run with ``CUDA_HOME=/usr/local/cuda``.
"""

import os
from pathlib import Path

import pytest
import torch

import dcamkd.ops  # noqa: F401  (defines the op schemas the library registers kernels for)
from dcamkd import _build

if not os.environ.get("CUDA_HOME") and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

needs_nvcc = pytest.mark.skipif(not _build.toolkit_available(), reason="no CUDA toolkit (nvcc)")
OPS = ["pyramid_loss", "pyramid_loss_backward", "channel_pool", "channel_pool_backward", "spatial_pool",
       "spatial_pool_backward", "apply_gates", "apply_gates_backward", "anomaly_map"]


@pytest.mark.slow
@needs_nvcc
def test_cuda_kernels_compile_link_and_register(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    path = _build.load("cuda")
    assert Path(path).is_file() and Path(path).parent == _build.build_dir("cuda")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dcamkd::{op}", "CUDA"), op
    # the CPU kernels of the other extension are not these
    assert not _build.build_dir("cuda") == _build.build_dir("cpu")


def test_build_dir_is_keyed_by_sources_and_arch(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    d1 = _build.build_dir("cuda")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert _build.build_dir("cuda") != d1  # another arch list, another cache folder
    assert {p.name for p in _build.sources("cuda")} == {"pyramid_loss.cu", "attention.cu", "anomaly_map.cu"}
