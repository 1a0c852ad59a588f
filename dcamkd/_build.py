"""Build and load the C++ kernels of ``csrc/``: one builder for the CPU and the CUDA extension.

:func:`load` (``kind`` = ``'cpu'`` or ``'cuda'``) compiles the sources of ``csrc/<kind>/`` with
:func:`torch.utils.cpp_extension.load` (ninja) into a cache folder and loads the shared library
into the process (``torch.ops.load_library``). Loading *is* the registration: every source file
registers its kernels with the dispatcher (``TORCH_LIBRARY_IMPL(dcamkd, CPU, m)`` or
``(dcamkd, CUDA, m)``) for the op schemas that :mod:`dcamkd.ops` defines. There is no Python
module, binding table or adapter.

Sources: ``dcamkd/csrc`` in an installed (non-editable) package, where ``setup.py`` copies them,
else ``<repo>/csrc`` (editable install or source checkout).

Cache: ``$DCAMKD_CACHE_DIR`` (default ``~/.cache/dcamkd``) ``/<kind>-<key>``, where ``key`` hashes
the sources and headers, the compiler flags, the torch and Python versions, the environment and
source paths, the CPU (model and flag list, so ``-march=native`` objects never load on another
kind of CPU) and, for CUDA, the CUDA version and the architecture list. A second process finds
the build in the cache and only loads it. The first build prints one line on stderr (it takes
minutes); :func:`load` is memoised per process (one build attempt; a failure is remembered).

Ahead of time: ``DCAMKD_BUILD_EXT=1 pip install --no-build-isolation .`` builds the CPU kernels
as ``dcamkd/_C*.so`` (``setup.py``), which :func:`load` then loads instead of building.

Environment: ``DCAMKD_CACHE_DIR``; ``DCAMKD_NATIVE=0`` drops ``-march=native``; ``CXX`` picks the
compiler; ``CUDA_HOME`` the CUDA toolkit; ``TORCH_CUDA_ARCH_LIST`` the GPU architectures (default:
the current GPU's, else ``9.0``); ``DCAMKD_VERBOSE_BUILD=1`` shows the compiler's output.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

from .errors import BuildError

__all__ = ["KINDS", "csrc_dir", "sources", "cflags", "cache_dir", "build_dir", "toolkit_available",
           "load", "is_loaded"]

#: The two extensions: the C++ CPU kernels and the CUDA kernels.
KINDS = ("cpu", "cuda")
#: Rough first-build time on a 2-core machine, for the notice (minutes).
_MINUTES = {"cpu": 3, "cuda": 5}
_NAMES = {"cpu": "C++ CPU", "cuda": "CUDA"}

_LOCK = threading.Lock()
_LOADED: dict[str, str] = {}
_FAILED: dict[str, BuildError] = {}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def csrc_dir() -> Path:
    """The C++ sources: ``dcamkd/csrc`` in an installed package, else ``<repo>/csrc``.

    Raises:
        BuildError: neither folder holds ``cpu/`` sources.
    """
    here = Path(__file__).resolve().parent
    cands = (here / "csrc", here.parent / "csrc")
    for cand in cands:
        if any((cand / "cpu").glob("*.cpp")):
            return cand
    raise BuildError(f"dcamkd C++ sources not found (looked for cpu/*.cpp in {cands[0]} and {cands[1]})")


def sources(kind: str = "cpu", root: Path | None = None) -> list[Path]:
    """The translation units of one extension: ``csrc/cpu/*.cpp`` or ``csrc/cuda/*.cu``."""
    _check_kind(kind)
    root = root or csrc_dir()
    return sorted((root / kind).glob("*.cpp" if kind == "cpu" else "*.cu"))


def _headers(kind: str, root: Path) -> list[Path]:
    return sorted((root / kind).glob("*.h" if kind == "cpu" else "*.cuh"))


def cflags(kind: str = "cpu", native: bool | None = None) -> list[str]:
    """Host compiler flags: ``-O3 -fopenmp -fno-trapping-math -fno-math-errno`` (+
    ``-march=native`` unless ``DCAMKD_NATIVE=0``) for the CPU kernels, ``-O2`` for the CUDA host
    code. Without ``-fno-trapping-math`` GCC does not if-convert the clamps of the polynomial
    exp (``csrc/cpu/common.h``), and the softmax loops stay scalar."""
    _check_kind(kind)
    if kind == "cuda":
        return ["-O2"]
    if native is None:
        native = os.environ.get("DCAMKD_NATIVE", "1") != "0"
    flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    mach = platform.machine().lower()
    if native and mach in ("x86_64", "amd64", "aarch64", "arm64"):
        flags.append("-march=native" if mach in ("x86_64", "amd64") else "-mcpu=native")
    return flags


def _cuda_flags() -> list[str]:
    return ["-O2", "-lineinfo"]


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


def _cuda_home() -> str | None:
    """``$CUDA_HOME``, else ``/usr/local/cuda`` when it holds nvcc, else the folder of nvcc on PATH."""
    env = os.environ.get("CUDA_HOME")
    if env:
        return env
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parents[1]) if nvcc else None


def toolkit_available() -> bool:
    """True when torch is a CUDA build and ``nvcc`` is found (``$CUDA_HOME/bin/nvcc`` or PATH)."""
    import torch

    if torch.version.cuda is None:
        return False
    home = _cuda_home()
    return bool(home and (Path(home) / "bin" / "nvcc").exists())


def _arch_list() -> str:
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "9.0"


def build_dir(kind: str = "cpu") -> Path:
    """Cache folder of one extension's build (see the module docstring for what the key holds)."""
    _check_kind(kind)
    import torch

    root = csrc_dir()
    h = hashlib.sha256()
    for p in sources(kind, root) + _headers(kind, root):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(" ".join(cflags(kind)).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(sys.prefix.encode())  # one build per environment and checkout: ninja files hold paths
    h.update(str(root).encode())
    h.update(_cpu_id().encode())
    if kind == "cuda":
        h.update(" ".join(_cuda_flags()).encode())
        h.update(str(torch.version.cuda).encode())
        h.update(_arch_list().encode())
    return cache_dir() / f"{kind}-{h.hexdigest()[:16]}"


def _aot_library(kind: str) -> str | None:
    """Path of the ahead-of-time build ``dcamkd/_C*.so`` (CPU kernels), or None."""
    if kind != "cpu":
        return None
    try:
        spec = importlib.util.find_spec("dcamkd._C")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin else None


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without its 'no CUDA runtime' log line."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _build(kind: str) -> str:
    if kind == "cpu":
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None and shutil.which("g++") is None:
            raise BuildError(f"dcamkd C++ CPU kernels: no C++ compiler found (looked for {cxx!r} and "
                             "'g++' on PATH); install one, or run the reference with DCAMKD_IMPL=reference")
    elif not toolkit_available():
        raise BuildError("dcamkd CUDA kernels: no CUDA toolkit found (nvcc in $CUDA_HOME/bin, /usr/local/cuda "
                         "or on PATH, and a CUDA build of torch); set CUDA_HOME, or use DCAMKD_IMPL=triton")
    root = csrc_dir()
    srcs = sources(kind, root)
    if not srcs:
        raise BuildError(f"dcamkd {_NAMES[kind]} kernels: no sources in {root / kind}")
    d = build_dir(kind)
    d.mkdir(parents=True, exist_ok=True)
    name = f"dcamkd_{kind}_{d.name.split('-')[-1]}"
    lib = d / f"{name}.so"
    if not lib.is_file():
        print(f"dcamkd: building the {_NAMES[kind]} kernels (first use, about {_MINUTES[kind]} minutes; "
              f"cached in {d})", file=sys.stderr, flush=True)
    cpp_extension = _cpp_extension()
    kwargs = {}
    if kind == "cuda":
        # torch reads CUDA_HOME once at import; make its include/lib paths follow ours
        home = _cuda_home()
        os.environ["CUDA_HOME"] = home
        cpp_extension.CUDA_HOME = home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _arch_list())
        kwargs = dict(extra_cuda_cflags=_cuda_flags(), with_cuda=True)
    else:
        kwargs = dict(extra_ldflags=["-fopenmp"])
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(p) for p in srcs],
            extra_cflags=cflags(kind),
            extra_include_paths=[str(root / kind)],
            build_directory=str(d),
            verbose=os.environ.get("DCAMKD_VERBOSE_BUILD", "0") == "1",
            is_python_module=False,
            **kwargs,
        )
    except Exception as e:  # compiler errors arrive as RuntimeError/CalledProcessError
        msg = str(e)
        out = getattr(e, "output", None)
        if isinstance(out, bytes):
            msg += "\n" + out.decode(errors="replace")
        tail = "\n".join(msg.strip().splitlines()[-25:])
        raise BuildError(f"building the dcamkd {_NAMES[kind]} kernels in {d} failed:\n{tail}") from e


def load(kind: str = "cpu") -> str:
    """Build (first use) and load one extension; its kernels register with the dispatcher.

    Args:
        kind: ``'cpu'`` (``csrc/cpu/*.cpp``) or ``'cuda'`` (``csrc/cuda/*.cu``).

    Returns:
        The path of the loaded shared library.

    Raises:
        BuildError: no compiler / CUDA toolkit, or the build failed (the message ends with the
            tail of the compiler's output). Remembered: later calls raise it again at once.
    """
    _check_kind(kind)
    with _LOCK:
        if kind in _LOADED:
            return _LOADED[kind]
        if kind in _FAILED:
            raise _FAILED[kind]
        try:
            path = _aot_library(kind)
            if path is not None:
                import torch

                torch.ops.load_library(path)
            else:
                path = _build(kind)
        except BuildError as e:
            _FAILED[kind] = e
            raise
        _LOADED[kind] = path
        return path


def is_loaded(kind: str = "cpu") -> bool:
    """True when :func:`load` has loaded this extension in this process."""
    return kind in _LOADED
