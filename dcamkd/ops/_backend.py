"""Backend choice and the kernel registry of the fused ops.

Every fused op is a ``torch.library`` op in the ``dcamkd`` namespace whose last argument is a
``str backend``. Its CPU and CUDA implementations are thin trampolines that look the kernel up in
:data:`KERNELS` by ``(op name, backend)`` and call it, so a new backend (Triton, CUDA) plugs in by
one call of :func:`register_kernel`, with nothing else to touch: the schema, the fake (meta)
implementation and the autograd formula are shared by all backends.

Backend resolution (:func:`resolve`): the ``backend=`` argument, else the environment variable
``DCAMKD_BACKEND``, else ``'auto'``. ``'auto'`` picks, for CPU tensors, ``'cpu'`` (the C++
extension) when it builds, else ``'reference'`` with one warning; for CUDA tensors the first of
``'cuda'``, ``'triton'`` registered for the op (with both registered, the faster as measured
by :mod:`dcamkd.kernels.dispatch`), else ``'reference'`` with one warning. With
``DCAMKD_STRICT_BUILD=1`` a failed build raises :class:`dcamkd.errors.BuildError` instead of
falling back (the test suite sets it where a compiler exists).

What actually ran is recorded: :func:`last_backend` gives the backend of the last call of an op
and :data:`CALLS` counts calls per ``(op, backend)``; the kernels record themselves when they
run, so the record is true under ``torch.compile`` too.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from collections import Counter
from typing import Callable, Optional

import torch

from ..errors import BuildError, InvalidArgumentError

__all__ = [
    "BACKENDS",
    "KERNELS",
    "CALLS",
    "register_kernel",
    "resolve",
    "record",
    "last_backend",
    "reset_calls",
    "cpu_extension",
]

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

#: ``(op name, backend) -> callable``: the kernels of every backend. The callable takes the op's
#: arguments without the trailing ``backend`` string and returns what the op's schema says.
KERNELS: dict[tuple[str, str], Callable] = {}

#: ``(op name, backend) -> number of calls that ran`` (``'reference'`` counted by the wrappers).
CALLS: Counter = Counter()

_LAST: dict[str, str] = {}
_LOCK = threading.Lock()
_WARNED: set = set()
_GPU_LOADED = False


def register_kernel(op: str, backend: str, fn: Callable) -> None:
    """Plug a kernel in: ``fn`` runs op ``dcamkd::<op>`` when the resolved backend is ``backend``.

    Args:
        op: op name without namespace, e.g. ``'pyramid_loss'`` (see ``dcamkd.ops`` docstring).
        backend: ``'cpu'``, ``'triton'`` or ``'cuda'``.
        fn: callable with the op's arguments minus ``backend``.

    Raises:
        InvalidArgumentError: unknown backend name.
    """
    if backend not in ("cpu", "triton", "cuda"):
        raise InvalidArgumentError(f"backend must be 'cpu', 'triton' or 'cuda', got {backend!r}")
    KERNELS[(op, backend)] = fn


def record(op: str, backend: str) -> None:
    """Note that ``op`` ran on ``backend`` (called by kernels and by the reference path)."""
    with _LOCK:
        _LAST[op] = backend
        CALLS[(op, backend)] += 1


def last_backend(op: str) -> Optional[str]:
    """The backend that ran the last call of ``op`` (``'pyramid_loss'``...), or None."""
    return _LAST.get(op)


def reset_calls() -> None:
    """Clear :data:`CALLS` and the last-backend record."""
    with _LOCK:
        CALLS.clear()
        _LAST.clear()


def _strict() -> bool:
    return os.environ.get("DCAMKD_STRICT_BUILD", "0") not in ("", "0", "false", "False")


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


_EXT = None
_EXT_ERR: Optional[BaseException] = None


def cpu_extension(required: bool = False):
    """The loaded C++ extension (built on first use), or None when it cannot be built.

    Raises:
        BuildError: when it cannot be built and ``required`` or ``DCAMKD_STRICT_BUILD=1``.
    """
    global _EXT, _EXT_ERR
    if _EXT is None and _EXT_ERR is None:
        from .. import _build

        try:
            _EXT = _build.load_extension()
        except BuildError as e:  # remembered: one build attempt per process
            _EXT_ERR = e
    if _EXT is None and (required or _strict()):
        raise _EXT_ERR if _EXT_ERR is not None else BuildError("dcamkd C++ extension unavailable")
    return _EXT


def _load_gpu_kernels() -> None:
    """Import the GPU kernel modules once; they call :func:`register_kernel` on import."""
    global _GPU_LOADED
    if _GPU_LOADED:
        return
    _GPU_LOADED = True
    for mod in ("dcamkd.kernels", "dcamkd.ops._cuda"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


def resolve(op: str, device: torch.device, backend: Optional[str] = None) -> str:
    """Pick the backend for one call of ``op`` on tensors on ``device``.

    Order: ``backend`` argument > ``DCAMKD_BACKEND`` > ``'auto'``.

    Returns:
        ``'reference'``, ``'cpu'``, ``'triton'`` or ``'cuda'``.

    Raises:
        InvalidArgumentError: an unknown name, or a backend that does not exist for the device.
        BuildError: ``'cpu'`` asked for (or strict mode) and the extension cannot be built.
    """
    name = backend if backend is not None else os.environ.get("DCAMKD_BACKEND", "auto") or "auto"
    if name not in BACKENDS:
        raise InvalidArgumentError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "reference":
        return name
    dev = device.type
    if dev == "cuda":
        _load_gpu_kernels()
    if name == "auto":
        if dev == "cpu":
            if cpu_extension() is not None:
                return "cpu"
            _warn_once(
                "cpu",
                "dcamkd: the C++ extension could not be built "
                f"({_EXT_ERR}); the fused ops run the pure-PyTorch reference (slower).",
            )
            return "reference"
        # dcamkd.kernels.dispatch registers a measured chooser under "auto_gpu" for ops that
        # have both a CUDA and a Triton kernel (the faster one per shape class runs).
        if dev == "cuda" and (op, "auto_gpu") in KERNELS:
            return "auto_gpu"
        for cand in ("cuda", "triton"):
            if (op, cand) in KERNELS:
                return cand
        _warn_once(f"{dev}:{op}", f"dcamkd: no fused {dev} kernel for {op!r}; running the reference.")
        return "reference"
    if name == "cpu":
        if dev != "cpu":
            raise InvalidArgumentError(f"backend='cpu' needs CPU tensors, got device {device}")
        cpu_extension(required=True)
        return "cpu"
    if dev != "cuda":
        raise InvalidArgumentError(f"backend={name!r} needs CUDA tensors, got device {device}")
    if (op, name) not in KERNELS:
        raise InvalidArgumentError(f"backend={name!r} has no kernel for op {op!r} (not built or not installed)")
    return name


def run_kernel(op: str, backend: str, *args):
    """Trampoline used by the registered CPU/CUDA implementations of every op."""
    fn = KERNELS.get((op, backend))
    if fn is None:
        if backend == "cpu":
            _install_cpu_kernels()
            fn = KERNELS.get((op, backend))
        if fn is None:
            raise InvalidArgumentError(f"no kernel registered for op {op!r}, backend {backend!r}")
    record(op, backend)
    return fn(*args)


def _install_cpu_kernels() -> None:
    ext = cpu_extension(required=True)
    from . import _cpu

    _cpu.install(ext)


def forbid_double_backward(op: str) -> None:
    """Raise when a fused op's backward runs under ``create_graph=True``.

    The backward ops have no autograd formula of their own, so second-order gradients through
    them would silently be zero; the reference (``backend='reference'``) supports them.
    """
    if torch.is_grad_enabled():
        raise NotImplementedError(
            f"dcamkd::{op}: second-order gradients (create_graph=True) are not implemented by the fused "
            f"kernels; use backend='reference' (or DCAMKD_BACKEND=reference) for double backward"
        )
