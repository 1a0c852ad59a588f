"""JIT build of the C++ CPU kernels in ``csrc/`` (ninja, cached per machine, clear errors).

:func:`load_extension` returns the compiled module: the ahead-of-time build ``dcamkd._C`` when
the package was installed with ``DCAMKD_BUILD_EXT=1``, else a build made with
``torch.utils.cpp_extension.load`` on first use. The build directory is
``$DCAMKD_CACHE_DIR`` (default ``~/.cache/dcamkd``) ``/<key>``, where ``key`` hashes the sources,
the compiler flags, the torch version, the Python version and the CPU (model and flag list), so
``-march=native`` objects are never loaded on another kind of CPU; a second process finds the
build in the cache and only loads it (ninja sees it up to date).

Environment: ``DCAMKD_CACHE_DIR``; ``DCAMKD_NATIVE=0`` drops ``-march=native``; ``CXX`` picks the
compiler; ``DCAMKD_VERBOSE_BUILD=1`` shows the compiler's output.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import platform
import shutil
import sys
from pathlib import Path

from .errors import BuildError

__all__ = ["load_extension", "csrc_dir", "sources", "cflags", "cache_dir"]


def csrc_dir() -> Path:
    """The C++ sources: ``dcamkd/csrc`` in an installed wheel, else ``<repo>/csrc``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / "ops.cpp").is_file():
            return cand
    raise BuildError(f"dcamkd C++ sources not found (looked for ops.cpp in {here / 'csrc'} and {here.parent / 'csrc'})")


def sources(root: Path | None = None) -> list[Path]:
    """``ops.cpp`` and every ``cpu/*.cpp`` under ``root`` (default :func:`csrc_dir`)."""
    root = root or csrc_dir()
    return [root / "ops.cpp"] + sorted((root / "cpu").glob("*.cpp"))


def cflags(native: bool | None = None) -> list[str]:
    """Compiler flags: ``-O3 -fopenmp -fno-trapping-math -fno-math-errno`` (+ ``-march=native``
    unless ``DCAMKD_NATIVE=0``). Without ``-fno-trapping-math`` GCC does not if-convert the
    clamps of the polynomial exp (``csrc/cpu/common.h``), and the softmax loops stay scalar."""
    if native is None:
        native = os.environ.get("DCAMKD_NATIVE", "1") != "0"
    flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    if native and platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
        flags.append("-march=native" if platform.machine().lower() in ("x86_64", "amd64") else "-mcpu=native")
    return flags


def _cpu_id() -> str:
    info = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    info += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return info


def cache_dir() -> Path:
    """``$DCAMKD_CACHE_DIR`` or ``~/.cache/dcamkd``."""
    return Path(os.environ.get("DCAMKD_CACHE_DIR") or Path.home() / ".cache" / "dcamkd")


def _key(srcs: list[Path], flags: list[str]) -> str:
    import torch

    h = hashlib.sha256()
    for p in srcs + sorted(p for p in srcs[0].parent.rglob("*.h")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(sys.prefix.encode())  # one build per environment and checkout: ninja rebuilds on path changes
    h.update(str(srcs[0].resolve().parent).encode())
    h.update(_cpu_id().encode())
    return h.hexdigest()[:16]


def load_extension():
    """The compiled CPU kernels module (built and cached on first use).

    Returns:
        A module with the kernel functions of ``csrc/ops.cpp``.

    Raises:
        BuildError: no C++ compiler on PATH, or the build failed (the message ends with the tail
            of the compiler's output).
    """
    try:  # ahead-of-time build (setup.py with DCAMKD_BUILD_EXT=1)
        return importlib.import_module("dcamkd._C")
    except ImportError:
        pass
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        raise BuildError(f"no C++ compiler found (looked for {cxx!r} and 'g++' on PATH)")
    srcs = sources()
    flags = cflags()
    key = _key(srcs, flags)
    build = cache_dir() / key
    build.mkdir(parents=True, exist_ok=True)
    from torch.utils import cpp_extension

    verbose = os.environ.get("DCAMKD_VERBOSE_BUILD", "0") == "1"
    try:
        return cpp_extension.load(
            name=f"dcamkd_cpu_{key}",
            sources=[str(p) for p in srcs],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(srcs[0].parent / "cpu")],
            build_directory=str(build),
            verbose=verbose,
        )
    except Exception as e:  # compiler errors arrive as RuntimeError/CalledProcessError
        msg = str(e)
        out = getattr(e, "output", None)
        if isinstance(out, bytes):
            msg += "\n" + out.decode(errors="replace")
        tail = "\n".join(msg.strip().splitlines()[-25:])
        raise BuildError(f"building the dcamkd C++ extension in {build} failed:\n{tail}") from e
