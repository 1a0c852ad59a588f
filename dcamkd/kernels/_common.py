"""Shared helpers of the Triton kernels: kernel launch, input checks, block sizes, dtype choices.

The Triton modules of this package import ``triton`` at import time, so set
``TRITON_INTERPRET=1`` *before* importing them to run them on CPU tensors (the test suite
does). Under the interpreter every tensor is a CPU tensor; on a GPU they are CUDA tensors.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from ..errors import InvalidArgumentError, ShapeMismatchError

__all__ = ["interpreting", "launch", "check_device", "acc_torch_dtype", "next_pow2", "contig", "sm_count",
           "fill_block"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def interpreting() -> bool:
    """True when Triton runs in interpreter mode (``TRITON_INTERPRET=1``): CPU tensors allowed."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch(kernel):
    """The launcher of a ``@triton.jit`` kernel: ``torch.library.wrap_triton(kernel)``, so that
    ``torch.compile`` traces the launch into its graph (in eager mode, inside the op, it is the
    kernel itself); under the interpreter the kernel itself (``wrap_triton`` does not take
    interpreted kernels on every torch version, and tracing them is not supported)."""
    if interpreting():
        return kernel
    return torch.library.wrap_triton(kernel)


def check_device(name: str, x: Tensor) -> None:
    """Raise :class:`InvalidArgumentError` unless ``x`` is a float tensor the Triton kernels
    can read: a CUDA tensor, or any tensor when interpreting."""
    if x.dtype not in FLOAT_DTYPES:
        raise InvalidArgumentError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {x.dtype}")
    if not x.is_cuda and not interpreting():
        raise InvalidArgumentError(
            f"{name}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got device {x.device}")


def check_map_pair(t: Tensor, s: Tensor) -> None:
    """``t`` and ``s`` must be 4-D maps of equal shape on one device."""
    if t.dim() != 4:
        raise ShapeMismatchError(f"teacher: expected a (B, C, H, W) map, got shape {tuple(t.shape)}")
    if t.shape != s.shape:
        raise ShapeMismatchError(
            f"student: expected the teacher's shape {tuple(t.shape)}, got {tuple(s.shape)}")
    if t.device != s.device:
        raise ShapeMismatchError(f"student: expected device {t.device}, got {s.device}")
    check_device("teacher", t)
    check_device("student", s)


def check_gates(a, m, B: int, C: int, H: int, W: int) -> None:
    """Gate shapes: channel gate ``(B, C)``, spatial gate ``(B, H, W)``."""
    if a is not None and tuple(a.shape) != (B, C):
        raise ShapeMismatchError(f"channel_gate: expected shape {(B, C)}, got {tuple(a.shape)}")
    if m is not None and tuple(m.shape) != (B, H, W):
        raise ShapeMismatchError(f"spatial_gate: expected shape {(B, H, W)}, got {tuple(m.shape)}")


def acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (the reference's accumulation rule)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def contig(x):
    """``x.contiguous()`` (NCHW order: the kernels index ``b*C*HW + c*HW + p``); None stays None.
    channels_last and other strided inputs are copied once here."""
    return None if x is None else x.contiguous()


@functools.lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def sm_count(device: torch.device) -> Optional[int]:
    """Streaming multiprocessors of a CUDA ``device``; None for any other device (the
    interpreter), where the block sizes stay the defaults."""
    if device.type != "cuda":
        return None
    return _sms(device.index if device.index is not None else torch.cuda.current_device())


def fill_block(n: int, rows: int, block: int, sms: Optional[int], minimum: int) -> int:
    """Block size along an axis of ``n`` items, a launch having ``ceil(n / b) * rows`` programs:
    ``min(block, next_pow2(n))``; on a GPU with ``sms`` multiprocessors it is halved (not below
    ``minimum``) while the launch has fewer programs than multiprocessors, so that small maps
    (low-resolution levels, batch 1) still occupy every SM. Powers of two in, power of two out."""
    b = min(block, next_pow2(n))
    if sms is None:
        return b
    while b > minimum and -(-n // b) * rows < sms:
        b //= 2
    return b
