"""The implementations of the fused ops as pytest parameters, for the per-op test files.

``impl`` fixture: one of ``reference``, ``cpp`` (C++ CPU kernels), ``triton`` (on CUDA tensors
with a GPU, else on CPU tensors under the Triton interpreter, small shapes) and ``cuda`` (CUDA C++
kernels, skipped without a GPU and nvcc). Inside a test the setting is in force
(``dcamkd.ops.use``) with ``DCAMKD_STRICT_BUILD=1``, so a C++ build failure fails the test instead
of falling back to the reference; :attr:`Impl.device` is where the test's tensors go.

``TRITON_INTERPRET=1`` is set here, on a machine without a GPU, before any Triton kernel module
is imported (they are imported by the Triton ops on their first call).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from dataclasses import dataclass

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

import dcamkd.ops as ops  # noqa: E402
from dcamkd import _build  # noqa: E402

HAVE_CXX = shutil.which("g++") is not None or shutil.which("c++") is not None
HAVE_TRITON = importlib.util.find_spec("triton") is not None
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

IMPL_PARAMS = [
    pytest.param("reference", id="reference"),
    pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(
        not HAVE_TRITON or (not GPU and not INTERPRETER), reason="no triton, or no GPU and no interpreter")),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
        not GPU or not _build.toolkit_available(), reason="no GPU or no nvcc")),
]


@dataclass(frozen=True)
class Impl:
    """The implementation under test and where its tensors live."""

    name: str
    device: torch.device

    @property
    def fused(self) -> bool:
        return self.name != "reference"

    @property
    def interpreted(self) -> bool:
        """Triton on CPU tensors (the interpreter is slow: keep shapes small)."""
        return self.name == "triton" and self.device.type == "cpu"

    def op(self, name: str):
        """The registered op overload this implementation runs for ``name``."""
        suffix = "_triton" if self.name == "triton" else ""
        return getattr(torch.ops.dcamkd, name + suffix).default


def device_of(name: str) -> torch.device:
    return torch.device("cuda" if name == "cuda" or (name == "triton" and GPU) else "cpu")


@pytest.fixture(params=IMPL_PARAMS)
def impl(request, monkeypatch):
    monkeypatch.setenv(ops._impl.STRICT_ENV_VAR, "1")
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    with ops.use(request.param):
        kind = ops.resolve(device_of(request.param))  # builds / defines what the test needs
        assert kind == request.param, f"impl {request.param!r} resolved to {kind!r}"
        yield Impl(request.param, device_of(request.param))


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher's Python mode (below autograd)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket._qualified_op_name))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def op_log():
    """``with op_log() as names:`` the qualified names of the ops that ran (``'dcamkd::...'``, ``'aten::...'``)."""
    mode = OpLog()
    with mode:
        yield mode.names


def assert_ran(impl: Impl, names: list[str], op: str) -> None:
    """The fused op of ``impl`` ran (and only it, among the dcamkd ops); nothing fused for the reference."""
    ours = [n for n in names if n.startswith("dcamkd::")]
    if not impl.fused:
        assert ours == [], ours
        return
    want = f"dcamkd::{op}" + ("_triton" if impl.name == "triton" else "")
    assert want in ours, (want, ours)
    if impl.name == "triton":
        assert all(n.endswith("_triton") for n in ours), ours
    else:
        assert not any(n.endswith("_triton") for n in ours), ours
