"""The measured ``'auto'`` choice between the CUDA and the Triton kernel on CUDA tensors.

With both backends registered for an op, ``backend='auto'`` on CUDA tensors resolves to
:data:`AUTO_GPU` (see :func:`dcamkd.ops._backend.resolve`); its kernel, :func:`choose`, times
both backends on the first call of each *shape class* (op, dtypes, shapes, layouts and the
non-tensor arguments such as the loss modes), keeps the faster one and runs it from then on.
Timing: one warm-up call per backend (which also JIT-compiles the CUDA extension or the Triton
kernel), then the median of :data:`REPEATS` synchronised calls. A backend that fails to build
or run is dropped from the race (the error is kept in :data:`FAILED`). The choice is visible in
:data:`CHOICES` and recorded with :func:`dcamkd.ops._backend.record`, so
:func:`dcamkd.ops.last_backend` names the backend that really ran.

``DCAMKD_AUTO_GPU=cuda|triton`` fixes the choice without timing. Measure outside CUDA-graph
capture (call each shape once before capturing).
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import torch

__all__ = ["AUTO_GPU", "CHOICES", "FAILED", "REPEATS", "shape_class", "choose", "install"]

AUTO_GPU = "auto_gpu"
REPEATS = 5
#: shape class -> chosen backend ('cuda' or 'triton'), with the timings in TIMINGS.
CHOICES: dict = {}
TIMINGS: dict = {}
#: backend -> the exception that removed it from the race.
FAILED: dict = {}
_LOCK = threading.Lock()


def _describe(x):
    if isinstance(x, torch.Tensor):
        return ("T", x.dtype, tuple(x.shape), tuple(x.stride()))
    if isinstance(x, (list, tuple)):
        return tuple(_describe(v) for v in x)
    return x


def shape_class(op: str, args) -> tuple:
    """Key of the cached choice: the op and a description of every argument (tensor dtypes,
    shapes and strides; other values as they are)."""
    return (op,) + tuple(_describe(a) for a in args)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, args) -> float:
    times = []
    for _ in range(REPEATS):
        _sync()
        t0 = time.perf_counter()
        fn(*args)
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def choose(op: str, args) -> str:
    """Backend (``'cuda'`` or ``'triton'``) for this call of ``op``: measured once per shape
    class, then cached."""
    from ..ops import _backend

    fixed = os.environ.get("DCAMKD_AUTO_GPU")
    if fixed in ("cuda", "triton"):
        return fixed
    key = shape_class(op, args)
    got = CHOICES.get(key)
    if got is not None:
        return got
    with _LOCK:
        if key in CHOICES:
            return CHOICES[key]
        best, best_t, timings = None, float("inf"), {}
        for be in ("cuda", "triton"):
            fn = _backend.KERNELS.get((op, be))
            if fn is None or be in FAILED:
                continue
            try:
                fn(*args)  # warm-up: builds / compiles
                t = _time(fn, args)
            except Exception as e:  # a backend that cannot run leaves the race
                FAILED[be] = e
                continue
            timings[be] = t
            if t < best_t:
                best, best_t = be, t
        if best is None:
            raise RuntimeError(f"dcamkd: neither the CUDA nor the Triton kernel of {op!r} could run: {FAILED}")
        CHOICES[key] = best
        TIMINGS[key] = timings
        return best


def _auto_kernel(op: str):
    def run(*args):
        from ..ops import _backend

        be = choose(op, args)
        _backend.record(op, be)
        return _backend.KERNELS[(op, be)](*args)

    run.__name__ = f"auto_gpu_{op}"
    return run


def install() -> None:
    """Register :data:`AUTO_GPU` kernels for every op that has both a CUDA and a Triton kernel
    (written straight into :data:`dcamkd.ops._backend.KERNELS`: ``register_kernel`` accepts only
    real backend names)."""
    from ..ops import _backend
    from . import OPS

    for op in OPS:
        if (op, "cuda") in _backend.KERNELS and (op, "triton") in _backend.KERNELS:
            _backend.KERNELS[(op, AUTO_GPU)] = _auto_kernel(op)
