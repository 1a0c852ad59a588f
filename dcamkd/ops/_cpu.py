"""Registration of the C++ CPU kernels (``csrc/``) as the ``'cpu'`` backend of every op."""

from __future__ import annotations

from . import _backend

_NAMES = (
    "pyramid_loss",
    "pyramid_loss_backward",
    "anomaly_map",
    "channel_pool",
    "channel_pool_backward",
    "spatial_pool",
    "spatial_pool_backward",
    "apply_gates",
    "apply_gates_backward",
)


def install(ext) -> None:
    """Register every kernel of the loaded extension ``ext`` under backend ``'cpu'``."""
    for name in _NAMES:
        fn = getattr(ext, name)
        if name == "pyramid_loss":
            fn = _wrap_fwd(fn)
        elif name == "pyramid_loss_backward":
            fn = _wrap_bwd(fn)
        _backend.register_kernel(name, "cpu", fn)


def _opt(gates):
    return [g if g.numel() > 0 else None for g in gates]


def _wrap_fwd(fn):
    def run(t, s, cg, sg, *rest):
        terms, stats = fn(t, s, _opt(cg), _opt(sg), *rest)
        return terms, list(stats)

    return run


def _wrap_bwd(fn):
    def run(g, t, s, cg, sg, *rest):
        return tuple(list(x) for x in fn(g, t, s, _opt(cg), _opt(sg), *rest))

    return run
