"""Which implementation of the fused ops runs: one setting, resolved once per call, outside the ops.

The setting: :func:`use` (a context manager) over the environment variable ``DCAMKD_IMPL`` over
:data:`DEFAULT_IMPL`. Its values, :data:`IMPLS` (names defined in :mod:`dcamkd.impls`):

* ``'fused'`` (default): the fused kernel of the tensors' device: the C++ kernels on CPU
  tensors, the Triton kernels on CUDA tensors. When they cannot be built (no C++ compiler, no
  ``triton``) the reference runs, with one warning; ``DCAMKD_STRICT_BUILD=1`` makes that a
  :class:`~dcamkd.errors.BuildError` instead (the test suite sets it where a compiler exists).
* ``'reference'``: the pure-PyTorch reference (:mod:`dcamkd.reference`), called directly.
* ``'cpp'``: the C++ CPU kernels (CPU tensors; a build failure raises).
* ``'triton'``: the Triton kernels, as their own ops ``dcamkd::<op>_triton`` (CUDA tensors, or
  CPU tensors under ``TRITON_INTERPRET=1``).
* ``'cuda'``: the CUDA C++ kernels (CUDA tensors; needs ``nvcc``; a build failure raises).

:func:`resolve` turns the setting and a device into what runs: ``'reference'``, ``'cpp'``,
``'cuda'`` (both: the op ``dcamkd::<op>``, whose CPU or CUDA kernel the dispatcher picks) or
``'triton'`` (the op ``dcamkd::<op>_triton``). It loads (and, the first time, builds) the C++
extension the answer needs, or defines the Triton ops, so the op and its kernel are registered
before the op is called. Under
``torch.compile`` the resolution runs once while tracing (:func:`torch.compiler.assume_constant_result`):
the graph holds the chosen op and no implementation name, building never happens inside traced
code, and a change of :func:`use` is a guard failure that recompiles.

:func:`use` sets a process-wide value (not thread-local); enter it outside compiled code.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import warnings
from typing import Iterator, Optional

import torch

from .. import _build
from ..errors import BuildError, InvalidArgumentError
from ..impls import DEFAULT_IMPL, ENV_VAR, IMPLS, STRICT_ENV_VAR
from . import _library

__all__ = ["IMPLS", "DEFAULT_IMPL", "ENV_VAR", "STRICT_ENV_VAR", "use", "current", "resolve",
           "check_impl", "forbid_double_backward"]

# Set by use(); read by resolve() in traced code, so torch.compile guards on its value.
_override: Optional[str] = None
_warned: set = set()


def check_impl(impl: str, source: str = "impl") -> str:
    """Return ``impl`` when it is one of :data:`IMPLS`.

    Raises:
        InvalidArgumentError: naming ``source`` (the argument or the environment variable).
    """
    if impl not in IMPLS:
        raise InvalidArgumentError(f"{source}: expected one of {IMPLS}, got {impl!r}")
    return impl


@contextlib.contextmanager
def use(impl: Optional[str]) -> Iterator[None]:
    """Run the fused ops with ``impl`` inside the block (``None``: leave the setting as it is).

    Example::

        with dcamkd.ops.use("reference"):
            loss = criterion(teachers, students)

    Args:
        impl: one of :data:`IMPLS`, or None.

    Raises:
        InvalidArgumentError: an unknown name.
    """
    global _override
    if impl is not None:
        check_impl(impl)
    prev = _override
    if impl is not None:
        _override = impl
    try:
        yield
    finally:
        _override = prev


def current() -> str:
    """The setting in force: the innermost :func:`use`, else ``$DCAMKD_IMPL``, else ``'fused'``.

    Raises:
        InvalidArgumentError: ``DCAMKD_IMPL`` holds an unknown name.
    """
    if _override is not None:
        return _override
    return check_impl(os.environ.get(ENV_VAR) or DEFAULT_IMPL, ENV_VAR)


def _strict() -> bool:
    return os.environ.get(STRICT_ENV_VAR, "0") not in ("", "0", "false", "False")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _fallback(key: str, why: str) -> str:
    if _strict():
        raise BuildError(f"{why} ({STRICT_ENV_VAR}=1: no fallback to the reference)")
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"dcamkd: {why}; the fused ops run the pure-PyTorch reference (slower)",
                      RuntimeWarning, stacklevel=3)
    return "reference"


def resolve(device: torch.device | str) -> str:
    """What runs for tensors on ``device`` under the current setting.

    Returns:
        ``'reference'``, ``'cpp'``, ``'cuda'`` or ``'triton'``; for ``'cpp'``/``'cuda'`` the
        extension is loaded (built on first use) before this returns.

    Raises:
        InvalidArgumentError: an unknown setting, or one that does not exist for the device
            (``'cpp'`` on CUDA tensors, ``'cuda'`` on CPU tensors, ``'triton'`` on CPU tensors
            without ``TRITON_INTERPRET=1``).
        BuildError: ``'cpp'``/``'cuda'`` (or ``'fused'`` in strict mode) and the kernels cannot
            be built; ``'triton'`` without the ``triton`` package.
    """
    return _resolve(_override, torch.device(device).type)


def assume_constant_result(fn):
    """:func:`torch.compiler.assume_constant_result`, without importing ``torch._dynamo`` (about
    2 s) when it is not loaded yet: the decorator only marks ``fn`` (the mark that
    ``torch._dynamo.assume_constant_result`` sets; a test holds the two equal)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@assume_constant_result
def _resolve(override: Optional[str], device_type: str) -> str:
    # Runs eagerly even while torch.compile traces (its result becomes a constant of the graph):
    # the environment is read and the extension built/loaded here, never inside traced code.
    impl = override if override is not None else current()
    if impl == "reference":
        return "reference"
    if device_type not in ("cpu", "cuda"):
        if impl == "fused":
            return "reference"
        raise InvalidArgumentError(f"impl {impl!r}: no such kernels for device type {device_type!r}")
    if impl == "cpp" or (impl == "fused" and device_type == "cpu"):
        if device_type != "cpu":
            raise InvalidArgumentError(f"impl 'cpp' runs on CPU tensors, got device type {device_type!r}")
        try:
            _build.load("cpu")
        except BuildError as e:
            if impl == "cpp":
                raise
            return _fallback("cpu", f"the C++ CPU kernels could not be built ({e})")
        return "cpp"
    if impl == "cuda":
        if device_type != "cuda":
            raise InvalidArgumentError(f"impl 'cuda' runs on CUDA tensors, got device type {device_type!r}")
        _build.load("cuda")
        return "cuda"
    # 'triton', or 'fused' on CUDA tensors
    if device_type == "cpu" and not _interpreting():
        raise InvalidArgumentError("impl 'triton' runs on CUDA tensors (or on CPU tensors under "
                                   "TRITON_INTERPRET=1), got device type 'cpu'")
    if not _have_triton():
        if impl == "triton":
            raise BuildError("impl 'triton': the triton package is not installed")
        return _fallback("triton", "the triton package is not installed")
    _library.register_triton_ops()
    return "triton"


def forbid_double_backward(op: str) -> None:
    """Raise when a fused op's backward runs under ``create_graph=True``.

    The backward ops have no autograd formula of their own, so second-order gradients through
    them would silently be zero; the reference supports them.

    Raises:
        NotImplementedError: naming the op and the way out.
    """
    if torch.is_grad_enabled():
        raise NotImplementedError(
            f"dcamkd::{op}: second-order gradients (create_graph=True) are not implemented by the fused "
            f"kernels; run the reference for double backward (dcamkd.ops.use('reference') or "
            f"{ENV_VAR}=reference)")
