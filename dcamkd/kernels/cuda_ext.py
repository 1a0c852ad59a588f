"""The CUDA extension of dcamkd (``csrc/cuda/*.cu``): JIT build on first use and host wrappers.

Built with :func:`torch.utils.cpp_extension.load` (ninja) into a cache directory
(``$DCAMKD_CACHE_DIR`` or ``~/.cache/dcamkd``), in a folder keyed by the torch version, the
CUDA version and a hash of the sources, so it compiles once per machine and source version. It is
a separate extension from the CPU one (``dcamkd._build``). One architecture is compiled: the
current GPU's, or ``$TORCH_CUDA_ARCH_LIST`` when set (``9.0`` when neither exists, e.g. the
build-only test on a machine without a GPU).

The wrappers follow the op contract of the ``dcamkd.ops`` docstring, with the same arguments as
the ops minus ``backend``; they are registered as the ``'cuda'`` kernels by
:func:`dcamkd.kernels.register_all` when a CUDA toolkit is found.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

import torch

from ..errors import BuildError

__all__ = ["SOURCES_DIR", "sources", "toolkit_available", "build_dir", "load", "kernel", "MODE"]

SOURCES_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
_LOCK = threading.Lock()
_EXT = None
_ERR = None

#: mode string -> integer code of the CUDA kernels.
MODE = {"none": 0, "channel": 1, "spatial": 2}


def sources() -> list[Path]:
    """The ``.cu``/``.cpp`` sources of the extension (``.cuh`` headers count for the hash)."""
    return sorted(p for p in SOURCES_DIR.iterdir() if p.suffix in (".cu", ".cpp"))


def _cuda_home():
    """``$CUDA_HOME``, else ``/usr/local/cuda`` when it holds nvcc, else torch's guess."""
    env = os.environ.get("CUDA_HOME")
    if env:
        return env
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


def toolkit_available() -> bool:
    """True when torch is a CUDA build and ``nvcc`` is found (``$CUDA_HOME/bin/nvcc`` or PATH)."""
    if torch.version.cuda is None:
        return False
    home = _cuda_home()
    if home and (Path(home) / "bin" / "nvcc").exists():
        return True
    return shutil.which("nvcc") is not None


def _arch_list() -> str:
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "9.0"


def build_dir() -> Path:
    """Cache folder of the build, keyed by torch/CUDA versions, the arch list and the sources."""
    h = hashlib.sha256()
    for p in sorted(SOURCES_DIR.iterdir()):
        if p.suffix in (".cu", ".cuh", ".cpp", ".h"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    h.update(_arch_list().encode())
    root = Path(os.environ.get("DCAMKD_CACHE_DIR", Path.home() / ".cache" / "dcamkd"))
    tag = f"cuda_ext-torch{torch.__version__}-cu{torch.version.cuda}-{h.hexdigest()[:12]}"
    return root / tag.replace("+", "_")


def load(verbose: bool = False):
    """Build (once) and import the extension module.

    Raises:
        BuildError: no CUDA toolkit, or the compile/link failed (the message carries the
            compiler's output).
    """
    global _EXT, _ERR
    with _LOCK:
        if _EXT is not None:
            return _EXT
        if _ERR is not None:
            raise _ERR
        if not toolkit_available():
            _ERR = BuildError("dcamkd CUDA extension: no CUDA toolkit (nvcc) found; set CUDA_HOME")
            raise _ERR
        from torch.utils import cpp_extension

        # torch reads CUDA_HOME once at import; make the include/lib paths follow ours
        home = _cuda_home()
        os.environ["CUDA_HOME"] = home
        cpp_extension.CUDA_HOME = home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _arch_list())
        d = build_dir()
        d.mkdir(parents=True, exist_ok=True)
        try:
            _EXT = cpp_extension.load(
                name="dcamkd_cuda_ext",
                sources=[str(p) for p in sources()],
                extra_cflags=["-O2"],
                extra_cuda_cflags=["-O2", "-lineinfo"],
                extra_include_paths=[str(SOURCES_DIR)],
                build_directory=str(d),
                with_cuda=True,
                verbose=verbose,
            )
        except Exception as e:  # compiler errors arrive as RuntimeError/CalledProcessError
            _ERR = BuildError(f"dcamkd CUDA extension: build in {d} failed: {e}")
            raise _ERR from e
        return _EXT


def _gates(gates):
    """Op-contract gates (an empty ``(0,)`` tensor = no gate) -> tensors or None."""
    return [g if g is not None and g.dim() > 1 else None for g in gates]


def _pyramid_loss(teachers, students, channel_gates, spatial_gates, cos, kl, tau, kd_reduction, eps):
    ext = load()
    channel_gates, spatial_gates = _gates(channel_gates), _gates(spatial_gates)
    terms, stats = [], []
    for t, s, a, m in zip(teachers, students, channel_gates, spatial_gates):
        tr, st = ext.level_forward(t, s, a, m, MODE[cos], MODE[kl], float(tau),
                                   kd_reduction == "sum_c", float(eps))
        terms.append(tr)
        stats.append(st)
    return torch.stack(terms), stats


def _pyramid_loss_backward(grad_terms, teachers, students, channel_gates, spatial_gates, stats, cos,
                           kl, tau, kd_reduction, eps, teacher_grad):
    ext = load()
    channel_gates, spatial_gates = _gates(channel_gates), _gates(spatial_gates)
    gs, gt, ga, gm = [], [], [], []
    for i, (t, s, a, m, st) in enumerate(zip(teachers, students, channel_gates, spatial_gates, stats)):
        ds, dt, da, dm = ext.level_backward(grad_terms[i], t, s, a, m, st, MODE[cos], MODE[kl],
                                            float(tau), kd_reduction == "sum_c", float(eps),
                                            bool(teacher_grad))
        gs.append(ds)
        if teacher_grad:
            gt.append(dt)
        ga.append(da)
        gm.append(dm)
    return gs, gt, ga, gm


def _simple(name):
    def run(*args):
        return getattr(load(), name)(*args)

    run.__name__ = f"cuda_{name}"
    return run


_KERNELS = {
    "pyramid_loss": _pyramid_loss,
    "pyramid_loss_backward": _pyramid_loss_backward,
    "channel_pool": lambda x: tuple(load().channel_pool(x)),
    "channel_pool_backward": _simple("channel_pool_backward"),
    "spatial_pool": lambda x, a: tuple(load().spatial_pool(x, a)),
    "spatial_pool_backward": lambda ga, gm, x, a, mx: tuple(load().spatial_pool_backward(ga, gm, x, a, mx)),
    "apply_gates": _simple("apply_gates"),
    "apply_gates_backward": lambda g, s, a, m: tuple(load().apply_gates_backward(g, s, a, m)),
    "anomaly_map": lambda t, s, eps: load().anomaly_map(t, s, float(eps)),
}


def kernel(op: str):
    """The CUDA host function of op ``dcamkd::<op>`` (arguments of the op minus ``backend``)."""
    return _KERNELS[op]
