"""Registration helpers shared by the op modules: each op exists twice, with one schema.

``dcamkd::<name>``
    Defined in Python (``torch.library.define``) when :mod:`dcamkd.ops` is imported, so that it
    exists without a C++ compiler. Its kernels are C++: ``csrc/cpu/<op>.cpp`` registers the CPU
    kernel and ``csrc/cuda/<op>.cu`` the CUDA kernel (``TORCH_LIBRARY_IMPL(dcamkd, CPU|CUDA, m)``)
    when :mod:`dcamkd._build` loads the extension; the dispatcher picks by the tensors' device.
``dcamkd::<name>_triton``
    The Triton implementation as its own op (:func:`torch.library.triton_op`), whose kernels
    :func:`torch.compile` sees (``torch.library.wrap_triton``). Its host function lives in
    :mod:`dcamkd.kernels` and is imported on the first call, so ``TRITON_INTERPRET=1`` may be set
    any time before that. These ops are defined by :func:`register_triton_ops`, which
    :func:`dcamkd.ops.resolve` calls the first time it chooses Triton: defining a Triton op loads
    ``triton`` and ``torch._inductor`` (seconds), which a CPU-only user never needs.

Both share one fake (meta) implementation and one autograd formula, registered for both names by
:func:`define` and :func:`register_autograd`.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

__all__ = ["NS", "TRITON_SUFFIX", "define", "register_autograd", "register_triton_ops", "op"]

NS = "dcamkd"
TRITON_SUFFIX = "_triton"

_pending: list[Callable[[], None]] = []  # the Triton registrations, in definition order
_lock = threading.Lock()


def define(name: str, schema: str, triton_impl: Callable, fake: Callable) -> None:
    """Define ``dcamkd::<name>`` now and ``dcamkd::<name>_triton`` (by :func:`register_triton_ops`)
    with ``schema`` (the part after the name, e.g. ``"(Tensor x) -> Tensor"``), the Triton host
    function ``triton_impl`` (called with the op's arguments) and the shared ``fake``."""
    torch.library.define(f"{NS}::{name}", schema)
    torch.library.register_fake(f"{NS}::{name}")(fake)

    def later():
        torch.library.triton_op(f"{NS}::{name}{TRITON_SUFFIX}", triton_impl, mutates_args=(), schema=schema)
        torch.library.register_fake(f"{NS}::{name}{TRITON_SUFFIX}")(fake)

    _pending.append(later)


def op(name: str, triton: bool = False):
    """The op overload ``torch.ops.dcamkd.<name>[_triton].default``."""
    return getattr(getattr(torch.ops, NS), name + (TRITON_SUFFIX if triton else "")).default


def register_autograd(name: str, backward_name: str, make_backward: Callable, setup_context: Callable) -> None:
    """Register one autograd formula for ``dcamkd::<name>`` and ``dcamkd::<name>_triton``.

    ``make_backward(bwd_op)`` returns the backward function that calls ``bwd_op``: the op
    ``dcamkd::<backward_name>`` for the first, ``dcamkd::<backward_name>_triton`` for the second.
    """
    torch.library.register_autograd(f"{NS}::{name}", make_backward(op(backward_name)), setup_context=setup_context)

    def later():
        torch.library.register_autograd(f"{NS}::{name}{TRITON_SUFFIX}", make_backward(op(backward_name, True)),
                                        setup_context=setup_context)

    _pending.append(later)


def register_triton_ops() -> None:
    """Define every ``dcamkd::<op>_triton`` op with its fake and autograd (once per process)."""
    with _lock:
        while _pending:
            _pending.pop(0)()
