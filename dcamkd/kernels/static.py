"""Static GPU check: compile kernels for an explicit GPU target without a GPU, read their resources.

* **Triton** (:func:`compile_triton`): one recorded launch (:mod:`dcamkd.kernels.registry`) is
  specialised exactly as Triton's launcher would (the installed Triton's own binder, on stand-in
  arguments with the recorded dtypes, alignment and integer values) and compiled with
  ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``: the real front end,
  LLVM and ``ptxas``, which ship in the triton wheel. Registers per thread, spill stores/loads and
  stack frame come from ``ptxas -v`` (the compiler's own invocation, captured), shared memory and
  warps from the compiled kernel's metadata.
* **CUDA** (:func:`compile_cuda`): each ``csrc/cuda/*.cu`` compiled to a cubin with ``nvcc -cubin
  -Xptxas -v`` for ``sm_<arch>`` with the flags of :mod:`dcamkd._build` and torch's extension
  flags; the ``ptxas`` report gives every kernel instantiation's registers, spills and shared
  memory.

Results are cached as JSON under :func:`cache_dir` (``$DCAMKD_CACHE_DIR/static``, default
``~/.cache/dcamkd/static``), keyed by the kernel's source hash (Triton's ``cache_key``, which
covers the functions it calls), the specialisation, the options, the Triton version and the
target (CUDA: the sources, headers, flags, nvcc and torch versions).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

from .. import _build
from ..io import atomic_write_text
from .registry import Launch

__all__ = ["ARCHS", "cache_dir", "triton_available", "nvcc_path", "compile_triton", "compile_cuda",
           "parse_ptxas"]

#: Compute capabilities checked: sm_80 (A100) and sm_90 (H100/H200).
ARCHS = (80, 90)
#: CUDA kernels' threads per block, read from the launches in ``csrc/cuda``: (none: kernels
#: launched with 256 threads; the table states the launch configuration of each .cu file).


def cache_dir() -> Path:
    """``<dcamkd cache>/static`` (see :func:`dcamkd._build.cache_dir`)."""
    return _build.cache_dir() / "static"


def triton_available() -> bool:
    """True when triton with its NVIDIA backend (and its bundled ``ptxas``) imports."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        make_backend(GPUTarget("cuda", 90, 32))
    except Exception:
        return False
    return True


def nvcc_path() -> Optional[str]:
    """``nvcc`` of ``$CUDA_HOME`` (or ``/usr/local/cuda``, or PATH), or None."""
    home = _build._cuda_home()
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


_FUNC_RE = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPS_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers")
_SMEM_RE = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, dict]:
    """``ptxas -v`` output -> ``{mangled kernel name: {regs, spill_stores, spill_loads, stack,
    smem, arch}}`` (bytes; ``regs`` per thread)."""
    out: dict[str, dict] = {}
    cur = None
    for line in log.splitlines():
        m = _FUNC_RE.search(line)
        if m:
            cur = out.setdefault(m.group(1), dict(regs=0, spill_stores=0, spill_loads=0, stack=0,
                                                  smem=0, arch=m.group(2)))
            continue
        if cur is None:
            continue
        m = _PROPS_RE.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = _REGS_RE.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            s = _SMEM_RE.search(line)
            cur["smem"] = int(s.group(1)) if s else 0
    return out


# -- Triton -----------------------------------------------------------------------------------


class _Stand:
    """Stand-in for a tensor argument: Triton's binder reads ``dtype`` and ``data_ptr()``."""

    def __init__(self, dtype: str, aligned: bool):
        import torch

        self.dtype = getattr(torch, dtype)
        self._ptr = 0 if aligned else 4

    def data_ptr(self):
        return self._ptr


def _specialise(fn, backend, launch: Launch):
    """``(signature, constexprs, attrs, options)`` as Triton's launcher computes them."""
    from triton.runtime import jit as _jit

    args = {n: (_Stand(v[1], v[2]) if isinstance(v, tuple) else v) for n, v in launch.args}
    kwargs = dict(launch.constexprs)
    binder = _jit.create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(**args, **kwargs)
    if hasattr(fn, "_pack_args"):
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    else:  # older layout of JITFunction.run
        options = backend.parse_options(kwargs)
        sigkeys = [p.name for p in fn.params]
        sigvals = [s[0] for s in specialization]
        signature = dict(zip(sigkeys, sigvals))
        vals = list(bound.values())
        constexprs = {(i,): vals[i] for i, s in enumerate(sigvals) if s == "constexpr"}
        attrs = {(i,): backend.parse_attr(s[1]) for i, s in enumerate(specialization)
                 if s[0] != "constexpr" and isinstance(s[1], str)}
    return signature, constexprs, attrs, options


@contextlib.contextmanager
def _ptxas_log():
    """Capture the ``ptxas -v`` report of Triton's NVIDIA backend (it writes it to a log file
    that it deletes): wrap ``subprocess.run`` of that module for the duration."""
    import triton.backends.nvidia.compiler as nv

    logs: list[str] = []
    real = nv.subprocess

    class _Sub:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def run(cmd, *a, **kw):
            r = real.run(cmd, *a, **kw)
            err = kw.get("stderr")
            if hasattr(err, "name"):
                with open(err.name) as f:
                    logs.append(f.read())
            return r

    nv.subprocess = _Sub()
    # a private Triton cache: a kernel Triton finds in its cache skips ptxas (and its report)
    saved = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = _private_triton_cache()
    try:
        yield logs
    finally:
        nv.subprocess = real
        if saved is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved


_TRITON_CACHE: list = []


def _private_triton_cache() -> str:
    if not _TRITON_CACHE:
        import atexit
        import tempfile

        d = tempfile.mkdtemp(prefix="dcamkd-static-triton-")
        atexit.register(shutil.rmtree, d, True)
        _TRITON_CACHE.append(d)
    return _TRITON_CACHE[0]


def _cached(path: Path):
    """The cached result at ``path`` (marked ``cached``), or None when there is none."""
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    res["cached"] = True
    return res


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def compile_triton(fn, launch: Launch, arch: int, use_cache: bool = True) -> dict:
    """Compile the kernel ``fn`` (a ``JITFunction``) as ``launch`` specialises it, for
    ``sm_<arch>``.

    Returns:
        ``{ok, error, regs, spill_stores, spill_loads, stack, smem, num_warps, seconds, cached}``
        (bytes; ``regs`` per thread; ``smem`` from the kernel metadata). A compile error is
        returned (``ok`` False, ``error`` its last lines), never raised.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    signature, constexprs, attrs, options = _specialise(fn, backend, launch)
    key = _key(fn.cache_key, signature, sorted(constexprs.items()), sorted(attrs.items()),
               sorted(options.__dict__.items()), triton.__version__, arch)
    path = cache_dir() / f"triton-{key}.json"
    if use_cache and (res := _cached(path)) is not None:
        return res
    t0 = time.perf_counter()
    res = dict(ok=True, error="", regs=None, spill_stores=None, spill_loads=None, stack=None,
               smem=None, num_warps=options.num_warps)
    try:
        with _ptxas_log() as logs:
            k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                               options=options.__dict__)
        md = k.metadata
        res["smem"] = int(getattr(md, "shared", 0))
        res["num_warps"] = int(getattr(md, "num_warps", options.num_warps))
        info = parse_ptxas("\n".join(logs))
        if not info:  # Triton found the kernel in its own cache: run ptxas on the PTX
            info = _ptxas_on(k.asm["ptx"])
        r = next(iter(info.values()))
        for f in ("regs", "spill_stores", "spill_loads", "stack"):
            res[f] = r[f]
    except Exception as e:  # the compile error is the result
        res["ok"] = False
        res["error"] = "\n".join(f"{type(e).__name__}: {e}".strip().splitlines()[-12:])
    res["seconds"] = round(time.perf_counter() - t0, 3)
    if res["ok"]:  # errors are compiled again next time
        cache_dir().mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(res))
    res["cached"] = False
    return res


def _ptxas_on(ptx: str) -> dict:
    """``ptxas -v`` (Triton's bundled one) on ``ptx`` for the PTX's own ``.target`` (Triton
    emits ``sm_90a`` for capability 90); raises RuntimeError with its output on failure."""
    import tempfile

    from triton import knobs

    target = re.search(r"^\.target\s+(\w+)", ptx, re.M)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        import inspect

        import triton.backends.nvidia.compiler as nv

        extra = ["--regAllocOptLevel=2"] if "regAllocOptLevel=2" in inspect.getsource(nv) else []
        r = subprocess.run([knobs.nvidia.ptxas.path, "-v", "-lineinfo", *extra,
                            f"--gpu-name={target.group(1) if target else 'sm_90a'}", str(src), "-o",
                            str(Path(d) / "k.o")], capture_output=True, text=True)
    info = parse_ptxas(r.stderr)
    if r.returncode != 0 or not info:
        raise RuntimeError(f"ptxas -v gave no report (exit {r.returncode}): {r.stderr[-500:]}")
    return info


# -- CUDA -------------------------------------------------------------------------------------


def _nvcc_cmd(nvcc: str, src: Path, out: Path, arch: int) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    try:
        inc = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch < 2.6
        inc = cpp_extension.include_paths(cuda=True)
    std = "-std=c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 12) else "-std=c++17"
    return [nvcc, "-cubin", "-o", str(out), str(src), f"-I{src.parent}", *[f"-I{p}" for p in inc],
            std, *cpp_extension.COMMON_NVCC_FLAGS, *_build._cuda_flags(), "-Xptxas", "-v",
            "-gencode", f"arch=compute_{arch},code=sm_{arch}"]


def compile_cuda(src: Path, arch: int, use_cache: bool = True) -> dict:
    """Compile one ``csrc/cuda/*.cu`` for ``sm_<arch>`` (device code only) and parse ``ptxas -v``.

    Returns:
        ``{ok, error, kernels: {mangled name: {regs, spill_stores, spill_loads, stack, smem}},
        seconds, cached}``; ``ok`` False with the compiler's last lines in ``error``.
    """
    import torch

    nvcc = nvcc_path()
    if nvcc is None:
        return dict(ok=False, error="nvcc not found", kernels={}, seconds=0.0, cached=False)
    src = Path(src)
    h = hashlib.sha256()
    for p in sorted(src.parent.glob("*.cu*")):
        h.update(p.name.encode() + p.read_bytes())
    ver = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    cmd = _nvcc_cmd(nvcc, src, Path("x.cubin"), arch)
    key = _key(h.hexdigest(), src.name, cmd[4:], ver, torch.__version__)
    path = cache_dir() / f"cuda-{src.stem}-{key}.json"
    if use_cache and (res := _cached(path)) is not None:
        return res
    import tempfile

    t0 = time.perf_counter()
    env = dict(os.environ, CUDA_HOME=str(Path(nvcc).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(_nvcc_cmd(nvcc, src, Path(d) / "k.cubin", arch), capture_output=True,
                           text=True, env=env)
    res = dict(ok=r.returncode == 0, error="" if r.returncode == 0 else "\n".join(r.stderr.splitlines()[-15:]),
               kernels=parse_ptxas(r.stderr), seconds=round(time.perf_counter() - t0, 3))
    if res["ok"]:
        cache_dir().mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(res))
    res["cached"] = False
    return res
