"""Every Triton kernel launch the host functions make, enumerated without a GPU.

The static GPU check (:mod:`dcamkd.kernels.static`, ``benchmarks/gpu_static.py``,
``tests/test_gpu_static.py``) compiles each kernel variant the host functions of this package can
launch. This module finds those variants by *running the real host functions* on ``meta`` tensors
(shapes and dtypes, no storage) while :func:`dcamkd.kernels._common.launch` is replaced by a
recorder, so no kernel executes and nothing is allocated. Each launch is recorded with its kernel,
grid, constexprs, argument types and values (the integers decide Triton's specialisation:
``== 1`` becomes a constant, ``% 16 == 0`` a divisibility hint) and the bytes of its distinct
tensor arguments. :func:`signatures` dedupes them to unique compile signatures.

What is enumerated (nothing here is a hand-written list of modes):

* **shapes** (:data:`SHAPES`): the three-level pyramid of every distinct channel triple of
  :data:`dcamkd.backbones.BACKBONES` at strides :data:`dcamkd.backbones.LEVEL_STRIDES` for a
  ``TrainConfig().image_size`` input, at batch :data:`BATCHES`, plus :data:`ODD_SHAPES`;
* **modes**: every string argument ``x`` of a host function whose values are the constant
  ``X_MODES``, ``X_RULES`` or ``XS`` of :mod:`dcamkd.objective` (``cos`` -> ``COS_MODES``, ``kl`` ->
  ``KL_MODES``, ``kd_reduction`` -> ``KD_REDUCTIONS``, ``mine`` -> ``MINE_RULES``; a new mode
  argument with such a constant is picked up by name), every combination the
  :class:`~dcamkd.objective.Objective` accepts (mining only on the cosine modes it allows);
* **gates**: the gates of each DCAM variant in :data:`dcamkd.objective.DCAM_VARIANTS`;
* dtypes :data:`DTYPES`, layouts :data:`LAYOUTS` (NCHW, channels_last), forward, backward and
  backward with the teacher's gradient.

The recorder reports the device as a CUDA device with :data:`TARGET_SMS` multiprocessors
(:func:`dcamkd.kernels._common.sm_count`), so the block sizes are those a GPU run would choose.
A host-function argument the registry does not know raises :class:`RegistryError` naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import itertools
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from .. import objective as _objective
from ..backbones import BACKBONES, LEVEL_STRIDES
from ..config import TrainConfig
from ..errors import InvalidArgumentError
from . import _common

__all__ = ["TARGET_SMS", "BATCHES", "ODD_SHAPES", "DTYPES", "LAYOUTS", "SHAPES", "RegistryError",
           "Launch", "kernel_modules", "jit_kernels", "mode_values", "mode_grid", "record",
           "signatures"]

#: Multiprocessors of the target GPU: NVIDIA H200 SXM (GH100, 132 SMs; NVIDIA H200 datasheet).
TARGET_SMS = 132
#: Batch sizes of the declared pyramids (1: inference latency; 8: the default; 32: the paper's).
BATCHES = (1, 8, 32)
#: Odd pyramids (one level each, ``(B, C, H, W)``): channel and location counts that are neither
#: powers of two nor multiples of 16, a single location and a single channel. They run in the
#: first of :data:`DTYPES` and :data:`LAYOUTS` only (every mode and gate): what they add is the
#: integer specialisation (``C == 1``, ``H*W == 1``...), which the dtype and layout do not change.
ODD_SHAPES = (((3, 37, 13, 11),), ((2, 1, 7, 5),), ((1, 5, 1, 1),))
#: Input dtypes of the static check.
DTYPES = (torch.float32, torch.bfloat16)
#: Memory layouts of the maps (channels_last first: training's default, ``TrainConfig.channels_last``).
LAYOUTS = ("channels_last", "nchw")


def _image_size() -> int:
    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "image_size")


def _pyramids() -> dict[str, tuple]:
    size = _image_size()
    out: dict[str, tuple] = {}
    for name, spec in BACKBONES.items():
        for b in BATCHES:
            levels = tuple((b, c, size // st, size // st) for c, st in zip(spec.channels, LEVEL_STRIDES))
            if levels not in out.values():
                out[f"{name}-b{b}"] = levels
    for i, levels in enumerate(ODD_SHAPES):
        out[f"{_ODD}{i}"] = tuple(levels)
    return out


_ODD = "odd"


#: name -> pyramid ``((B, C, H, W), ...)``: the backbones' pyramids (image size of
#: :class:`~dcamkd.config.TrainConfig`) at :data:`BATCHES`, and :data:`ODD_SHAPES`.
SHAPES: dict[str, tuple] = _pyramids()


class RegistryError(InvalidArgumentError):
    """A host function takes an argument the registry cannot fill."""


@dataclass(frozen=True)
class Launch:
    """One recorded kernel launch.

    Attributes:
        kernel: ``module.name`` of the ``@triton.jit`` function.
        grid: the launch grid (programs per axis).
        args: ``((name, value), ...)`` of the runtime arguments: a tensor is recorded as
            ``('tensor', dtype name, 16-byte aligned)``, a Python number as itself.
        constexprs: ``((name, value), ...)`` sorted; options (``num_warps``...) included.
        case: ``pyramid/dtype/layout/op[modes,gates=variant]``: what launched it.
        nbytes: bytes of the distinct tensor arguments (each read or written once: a lower bound
            of the launch's memory traffic).
        phase: ``forward``, ``backward`` or ``backward+teacher`` (the teacher's gradient too).
    """

    kernel: str
    grid: tuple
    args: tuple
    constexprs: tuple
    case: str
    nbytes: int
    phase: str = "forward"

    @property
    def programs(self) -> int:
        """Programs per launch (product of the grid)."""
        n = 1
        for g in self.grid:
            n *= int(g)
        return n

    def signature_key(self, hints: bool = False) -> tuple:
        """What Triton compiles separately: kernel, constexprs and options, and per runtime
        argument its type and specialisation (pointer dtype and alignment; integer width and
        ``== 1``, which makes it a constant; float). ``hints``: also the ``% 16 == 0``
        divisibility hint of each integer (which changes vector widths, not the program)."""
        spec = []
        for name, v in self.args:
            if isinstance(v, tuple):
                spec.append((name,) + v)
            elif isinstance(v, bool):
                spec.append((name, "i1"))
            elif isinstance(v, int):
                width = "i64" if not -2**31 <= v < 2**31 else "i32"
                spec.append((name, width, v == 1) + ((v % 16 == 0,) if hints else ()))
            else:
                spec.append((name, "fp32"))
        return (self.kernel, tuple(spec), self.constexprs)


def kernel_modules() -> list:
    """The modules of :mod:`dcamkd.kernels` that launch kernels (they import ``launch``)."""
    pkg = importlib.import_module("dcamkd.kernels")
    mods = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.name in ("registry", "static"):
            continue
        mod = importlib.import_module(f"dcamkd.kernels.{info.name}")
        if getattr(mod, "launch", None) is _common.launch:
            mods.append(mod)
    return mods


def jit_kernels() -> dict[str, Any]:
    """``module.name -> JITFunction`` of every ``@triton.jit`` function defined in
    :func:`kernel_modules`."""
    from triton.runtime.jit import JITFunction

    out = {}
    for mod in kernel_modules():
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                out[f"{mod.__name__}.{name}"] = obj
    return out


def mode_values(name: str) -> Optional[tuple]:
    """The values of mode argument ``name``: the constant ``NAME_MODES``, ``NAME_RULES`` or
    ``NAMES`` of :mod:`dcamkd.objective`, or None when there is none."""
    for const in (f"{name.upper()}_MODES", f"{name.upper()}_RULES", f"{name.upper()}S"):
        vals = getattr(_objective, const, None)
        if isinstance(vals, tuple) and vals and all(isinstance(v, str) for v in vals):
            return vals
    return None


def mode_grid(fn: Callable) -> list[dict]:
    """Every combination of the mode arguments of host function ``fn`` (see
    :func:`mode_values`) that :class:`~dcamkd.objective.Objective` accepts."""
    names = [p for p in inspect.signature(fn).parameters if mode_values(p) is not None]
    fields = set(_objective.OBJECTIVE_FIELDS)
    out = []
    for combo in itertools.product(*(mode_values(n) for n in names)):
        modes = dict(zip(names, combo))
        try:
            _objective.Objective(**{k: v for k, v in modes.items() if k in fields})
        except InvalidArgumentError:
            continue  # unreachable (e.g. cos and kl both 'none')
        out.append(modes)
    return out


def _objective_default(name: str):
    f = next((f for f in dataclasses.fields(_objective.Objective) if f.name == name), None)
    return None if f is None else f.default


def _call(fn: Callable, known: dict, modes: dict):
    """Call host function ``fn`` with its arguments by name: ``known`` tensors and flags, the
    ``modes``, :class:`Objective` defaults (``tau``, ``eps``...), else the function's defaults."""
    kwargs = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name in known:
            kwargs[name] = known[name]
        elif name in modes:
            kwargs[name] = modes[name]
        elif _objective_default(name) is not None:
            kwargs[name] = _objective_default(name)
        elif p.default is not inspect.Parameter.empty:
            continue
        else:
            raise RegistryError(
                f"{fn.__module__}.{fn.__name__}: argument {name!r} is unknown to "
                f"dcamkd.kernels.registry (give it a value in registry._host_calls)")
    return fn(**kwargs)


def _meta(shape, dtype, layout="nchw"):
    fmt = torch.channels_last if layout == "channels_last" and len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, device="meta", dtype=dtype, memory_format=fmt)


def _gates(variant: str, levels, acc):
    has_a = variant in ("channel", "cbam")
    has_m = variant in ("spatial", "cbam")
    a = [_meta((b, c), acc) if has_a else None for b, c, h, w in levels]
    m = [_meta((b, h, w), acc) if has_m else None for b, c, h, w in levels]
    return a, m


def _host_calls(levels, dtype, layout, probe: bool = False,
                modes_list: Optional[list] = None) -> Iterator[tuple[str, Callable[[], Any]]]:
    """``(case, thunk)`` pairs: each thunk runs host functions on meta tensors of ``levels``;
    ``probe``: only the first and last mode combination and the last DCAM variant;
    ``modes_list``: these mode combinations instead of all of :func:`mode_grid`."""
    from . import anomaly_map as am
    from . import attention as at
    from . import pyramid_loss as pl

    acc = _common.acc_torch_dtype(dtype)
    T = [_meta(s, dtype, layout) for s in levels]
    S = [_meta(s, dtype, layout) for s in levels]
    grid = mode_grid(pl.pyramid_loss)
    for variant in _objective.DCAM_VARIANTS[-1:] if probe else _objective.DCAM_VARIANTS:
        A, M = _gates(variant, levels, acc)
        for modes in [grid[0], grid[-1]] if probe else (modes_list if modes_list is not None else grid):
            tag = ",".join(f"{k}={v}" for k, v in modes.items())

            def loss(A=A, M=M, modes=modes):
                known = dict(teachers=T, students=S, channel_gates=A, spatial_gates=M)
                _PHASE[0] = "forward"
                terms, stats = _call(pl.pyramid_loss, known, modes)
                # mining weights (B*H*W per level) when a mining rule is on, else empty tensors
                mined = modes.get("mine", "none") != "none"
                rw = [_meta((b * h * w,) if mined else (0,), acc) for b, c, h, w in levels]
                for tg in (False, True):
                    _PHASE[0] = "backward+teacher" if tg else "backward"
                    _call(pl.pyramid_loss_backward,
                          dict(known, grad_terms=torch.empty_like(terms), stats=stats, teacher_grad=tg,
                               row_weights=rw), modes)
            yield f"pyramid_loss[{tag},gates={variant}]", loss
        if variant == "none":
            continue

        def attention(A=A, M=M):
            for x, a, m in zip(S, A, M):
                if a is not None:
                    _PHASE[0] = "forward"
                    mean, mx = _call(at.channel_pool, dict(x=x), {})
                    _PHASE[0] = "backward"
                    _call(at.channel_pool_backward, dict(grad_avg=mean, grad_max=mean, x=x, mx=mx), {})
                if m is not None:
                    _PHASE[0] = "forward"
                    mean, mx = _call(at.spatial_pool, dict(x=x, channel_gate=a), {})
                    _PHASE[0] = "backward"
                    _call(at.spatial_pool_backward,
                          dict(grad_avg=mean, grad_max=mean, x=x, channel_gate=a, mx=mx), {})
                _PHASE[0] = "forward"
                _call(at.apply_gates, dict(s=x, channel_gate=a, spatial_gate=m), {})
                _PHASE[0] = "backward"
                _call(at.apply_gates_backward, dict(grad=x, s=x, channel_gate=a, spatial_gate=m), {})
        yield f"attention[gates={variant}]", attention

    def amap():
        _PHASE[0] = "forward"
        for t, s in zip(T, S):
            _call(am.anomaly_map, dict(t=t, s=s), {})
    yield "anomaly_map", amap


_PHASE = ["forward"]  # set by the host-call thunks: forward, backward, backward+teacher


def _describe(v):
    if isinstance(v, torch.Tensor):
        aligned = (v.storage_offset() * v.element_size()) % 16 == 0
        return ("tensor", str(v.dtype).replace("torch.", ""), aligned)
    return v


class _Recorder:
    def __init__(self, names: dict):
        self.names = names  # id(JITFunction) -> "module.name"
        self.case = ""
        self.launches: list[Launch] = []

    def launch(self, kernel):
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    names = kernel.arg_names
                    pos = dict(zip(names, args))
                    pos.update({k: v for k, v in kwargs.items() if k in names})
                    const_names = {names[i] for i in kernel.constexprs}
                    runtime = tuple((n, _describe(pos[n])) for n in names if n not in const_names)
                    consts = {n: pos[n] for n in names if n in const_names}
                    consts.update({k: v for k, v in kwargs.items() if k not in names})  # num_warps...
                    seen, nbytes = set(), 0
                    for v in pos.values():
                        if isinstance(v, torch.Tensor) and id(v) not in seen:
                            seen.add(id(v))
                            nbytes += v.numel() * v.element_size()
                    g = grid(pos) if callable(grid) else grid
                    rec.launches.append(Launch(rec.names[id(kernel)], tuple(int(x) for x in g), runtime,
                                               tuple(sorted(consts.items())), rec.case, nbytes, _PHASE[0]))
                return run
        return _Grid()


@contextlib.contextmanager
def _patched(recorder: _Recorder):
    """Replace ``launch``, ``interpreting`` (meta tensors pass the device check) and
    ``sm_count`` (a CUDA device with :data:`TARGET_SMS` SMs) in every kernel module."""
    repl = {_common.launch: recorder.launch, _common.interpreting: lambda: True}
    if hasattr(_common, "sm_count"):
        repl[_common.sm_count] = lambda device=None: TARGET_SMS
    saved = []
    for mod in [_common] + kernel_modules():
        for name, obj in list(vars(mod).items()):
            for orig, new in repl.items():
                if obj is orig:
                    saved.append((mod, name, obj))
                    setattr(mod, name, new)
    try:
        yield
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def record(shapes: Optional[dict] = None, dtypes=DTYPES, layouts=LAYOUTS,
           equivalent: Optional[dict] = None) -> list[Launch]:
    """Run the host functions over ``shapes`` (default :data:`SHAPES`) x modes x gates x
    ``dtypes`` x ``layouts`` x forward/backward on meta tensors; every launch, in order.

    Shape classes: each pyramid is first run with a *probe* (the first and last mode combination,
    every gate, every op); a pyramid whose probe launches have the same compile signatures
    (:meth:`Launch.signature_key`) as an earlier pyramid's is *equivalent* to it: its probe
    launches are kept (grids and bytes for the table) and the full mode product is run only for
    the first pyramid of each class. Mode classes: on the first pyramid of each dtype and layout
    every mode combination runs; combinations whose launches have the same compile signatures
    as an earlier one's (e.g. the KD reductions, the mining rules: host-side arithmetic only)
    are not run on the other pyramids. ``equivalent`` (a dict, if given) receives
    ``(shape, dtype, layout) -> representative shape``.

    Raises:
        RegistryError: a host function needs an argument the registry does not know.
    """
    kernels = jit_kernels()
    if not kernels:
        raise RegistryError("no @triton.jit kernel found in dcamkd.kernels (TRITON_INTERPRET=1 set "
                            "before they were imported? the static check needs compiled kernels)")
    from . import pyramid_loss as pl

    rec = _Recorder({id(k): n for n, k in kernels.items()})
    with _patched(rec):
        for dtype, layout in itertools.product(dtypes, layouts):
            dname = str(dtype).replace("torch.", "")
            classes: dict[tuple, str] = {}
            mode_reps: Optional[list] = None  # one mode combination per mode class
            op_modes: dict[str, tuple] = {}
            for sname, levels in (shapes or SHAPES).items():
                if sname.startswith(_ODD) and (dtype, layout) != (dtypes[0], layouts[0]):
                    continue
                start = len(rec.launches)
                for case, thunk in _host_calls(levels, dtype, layout, probe=True):
                    rec.case = f"{sname}/{dname}/{layout}/{case}"
                    thunk()
                key = tuple(ln.signature_key() for ln in rec.launches[start:])
                if key in classes:
                    if equivalent is not None:
                        equivalent[(sname, dname, layout)] = classes[key]
                    continue
                classes[key] = sname
                del rec.launches[start:]  # the full run below records them again
                for case, thunk in _host_calls(levels, dtype, layout, modes_list=mode_reps):
                    rec.case = f"{sname}/{dname}/{layout}/{case}"
                    start = len(rec.launches)
                    thunk()
                    op_modes[case] = tuple(ln.signature_key() for ln in rec.launches[start:])
                if mode_reps is None:  # mode classes, from the first pyramid's full run
                    mode_reps, seen = [], set()
                    for modes in mode_grid(pl.pyramid_loss):
                        tag = ",".join(f"{k}={v}" for k, v in modes.items())
                        key = tuple(op_modes[c] for c in op_modes if c.startswith(f"pyramid_loss[{tag},"))
                        if key not in seen:
                            seen.add(key)
                            mode_reps.append(modes)
    return rec.launches


def signatures(launches: list[Launch], hints: bool = False) -> dict[tuple, list[Launch]]:
    """``signature key -> the launches sharing it`` (first launch first): one compile each
    (see :meth:`Launch.signature_key`; without ``hints`` the first launch's divisibility hints
    are compiled, a backbone pyramid's, as :data:`SHAPES` lists them first)."""
    out: dict[tuple, list[Launch]] = {}
    for ln in launches:
        out.setdefault(ln.signature_key(hints), []).append(ln)
    return out


#: Constexprs that are block sizes or launch options (set from the shape, not from a mode).
BLOCK_CONSTEXPRS = ("BC", "BP", "BR", "num_warps", "num_stages")


def _flags(key: tuple) -> tuple:
    kernel, spec, consts = key
    return kernel, spec, tuple(c for c in consts if c[0] not in BLOCK_CONSTEXPRS)


def _blocks_of(key: tuple) -> tuple:
    return tuple(c for c in key[2] if c[0] in BLOCK_CONSTEXPRS)


def _tile(key: tuple) -> int:
    n = 1
    for name, v in _blocks_of(key):
        if name in ("BC", "BP", "BR"):
            n *= int(v)
    return n


def compile_set(units: dict[tuple, list[Launch]], hot: Optional[Callable[[Launch], bool]] = None,
                quick: bool = False) -> dict[tuple, list[Launch]]:
    """The units (of :func:`signatures`) that the static check compiles.

    Full set (covers every unit):

    * for every *flag class* (kernel, argument types and ``== 1`` specialisations, and every
      constexpr that is not a block size: modes, gates, needed gradients) its unit with the
      largest tile (``BC*BP*BR``, the most registers per thread);
    * for every kernel, argument dtypes and block configuration, the unit with the most
      true flags among those with that configuration (the heaviest program at that tile);
    * every unit with a ``hot`` launch.

    ``quick`` (the CI test): the flag classes of the first dtype and layout of :data:`DTYPES`,
    :data:`LAYOUTS` only (every mode, gate and gradient combination), and in the other dtypes
    and layouts the hot units and the heaviest flag class of each kernel. A unit left out then
    differs from a compiled one by a smaller tile, or by its dtype or layout alone.
    """
    hot = hot or (lambda ln: False)
    primary = (str(DTYPES[0]).replace("torch.", ""), LAYOUTS[0])

    def in_primary(lns):
        return any(tuple(ln.case.split("/")[1:3]) == primary for ln in lns)

    by_flags: dict[tuple, tuple] = {}
    by_blocks: dict[tuple, tuple] = {}
    heaviest: dict[tuple, tuple] = {}

    def weight(key):
        return (sum(1 for c in key[2] if c[1] is True), _tile(key))

    for key, lns in units.items():
        tensors = tuple(x for x in key[1] if x[1] == "tensor")
        h = (key[0], tensors)
        if h not in heaviest or weight(key) > weight(heaviest[h]):
            heaviest[h] = key
        if quick and not in_primary(lns):
            continue
        f = _flags(key)
        if f not in by_flags or _tile(key) > _tile(by_flags[f]):
            by_flags[f] = key
        b = (key[0], tensors, _blocks_of(key))
        if b not in by_blocks or weight(key) > weight(by_blocks[b]):
            by_blocks[b] = key
    chosen = set(by_flags.values()) | set(by_blocks.values()) | set(heaviest.values())
    chosen |= {k for k, lns in units.items() if any(hot(ln) for ln in lns)}
    return {k: v for k, v in units.items() if k in chosen}
