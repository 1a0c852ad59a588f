"""The fused DCAM attention ops (``dcamkd.ops.channel_pool``, ``spatial_pool``, ``apply_gates``;
ops ``dcamkd::<op>`` / ``dcamkd::<op>_triton`` and their backward ops) against the reference, for
every implementation (``impl`` fixture, tests/opimpls.py): parity with grad_output other than 1
(float64, float32, float16, bfloat16 with stated tolerances; NCHW, channels_last, non-contiguous,
odd shapes), float64 gradcheck, the max's gradient split between ties as ``torch.amax``, opcheck,
NaN/Inf propagation.
"""

from __future__ import annotations

import pytest
import torch

from opimpls import assert_ran, impl, op_log  # noqa: F401  (impl is a fixture)

import dcamkd.ops as ops
from dcamkd import reference as R

PIECES = ["channel_pool", "spatial_pool", "spatial_pool_gated", "gates_a", "gates_m", "gates_am"]
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-13),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    # inputs rounded to 1e-3 (float16) / 4e-3 (bfloat16) relative; sums in float32
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}


def _data(shape, dtype, device, cl=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    acc = R.acc_dtype(dtype)
    a = (0.1 + torch.rand(b, c, generator=g, dtype=torch.float64)).to(device, acc)
    m = (0.1 + torch.rand(b, h, w, generator=g, dtype=torch.float64)).to(device, acc)
    return x.requires_grad_(), a.requires_grad_(), m.requires_grad_()


def _call(which, x, a, m, mod):
    if which == "channel_pool":
        return mod.channel_pool(x), (x,)
    if which == "spatial_pool":
        return mod.spatial_pool(x), (x,)
    if which == "spatial_pool_gated":
        return mod.spatial_pool(x, a), (x, a)
    if which == "gates_a":
        return (mod.apply_gates(x, a, None),), (x, a)
    if which == "gates_m":
        return (mod.apply_gates(x, None, m),), (x, m)
    return (mod.apply_gates(x, a, m),), (x, a, m)


def _parity(which, x, a, m, tol, seed=7):
    got, ins = _call(which, x, a, m, ops)
    ref, _ = _call(which, x, a, m, R)
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y) for y in ref]  # grad_output != 1
    for y, z in zip(got, ref):
        assert y.dtype == z.dtype and y.shape == z.shape
        torch.testing.assert_close(y, z, **tol)
    gg = torch.autograd.grad(sum((y * w).sum() for y, w in zip(got, ws)), ins)
    gr = torch.autograd.grad(sum((y * w).sum() for y, w in zip(ref, ws)), ins)
    for y, z, inp in zip(gg, gr, ins):
        assert y.dtype == inp.dtype and y.shape == inp.shape
        torch.testing.assert_close(y.double(), z.double(), **tol)
    return got


@pytest.mark.parametrize("which", PIECES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cl", [False, True])
def test_parity(impl, which, dtype, cl):
    x, a, m = _data((2, 6, 5, 3), dtype, impl.device, cl, seed=3)
    got = _parity(which, x, a, m, TOL[dtype])
    if which.startswith("gates"):  # the gated map keeps the dtype and layout of s
        assert got[0].dtype == dtype
        if impl.fused:
            assert got[0].is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 13, 5, 7), (2, 40, 9, 11), (1, 3, 1, 17)])
def test_odd_shapes_and_non_contiguous(impl, shape):
    x, a, m = _data(shape, torch.float32, impl.device, seed=sum(shape))
    for which in PIECES:
        _parity(which, x, a, m, TOL[torch.float32])
    base = torch.randn(2, 5, 8, 6, dtype=torch.float64, device=impl.device)
    y = base.transpose(2, 3)[:, :, ::2].requires_grad_()  # neither NCHW nor channels_last
    assert not y.is_contiguous() and not y.is_contiguous(memory_format=torch.channels_last)
    a2 = torch.rand(2, 5, dtype=torch.float64, device=impl.device).requires_grad_()
    m2 = torch.rand(2, 3, 8, dtype=torch.float64, device=impl.device).requires_grad_()
    for which in PIECES:
        _parity(which, y, a2, m2, TOL[torch.float64])


def test_what_runs(impl):
    x, a, m = _data((2, 3, 4, 5), torch.float32, impl.device)
    with op_log() as names:
        avg, mx = ops.channel_pool(x)
        savg, smx = ops.spatial_pool(x, a)
        y = ops.apply_gates(x, a, m)
        torch.autograd.grad((avg.sum() + mx.sum() + savg.sum() + smx.sum() + y.sum()), (x, a, m))
    for op in ("channel_pool", "spatial_pool", "apply_gates", "channel_pool_backward", "spatial_pool_backward",
               "apply_gates_backward"):
        assert_ran(impl, names, op)


@pytest.mark.parametrize("which", PIECES)
@pytest.mark.parametrize("cl", [False, True])
def test_gradcheck(impl, which, cl):
    x, a, m = _data((2, 3, 4, 5), torch.float64, impl.device, cl, seed=1)
    _, ins = _call(which, x, a, m, ops)

    names = [n for n, v in (("x", x), ("a", a), ("m", m)) if any(v is i for i in ins)]

    def g(*args):
        d = dict(zip(names, args))
        out, _ = _call(which, d["x"], d.get("a", a), d.get("m", m), ops)
        return out

    assert torch.autograd.gradcheck(g, ins, fast_mode=True)


def test_max_gradient_split_between_ties(impl):
    # post-ReLU zeros: every value ties; a row with a repeated maximum
    x = torch.zeros(1, 2, 2, 2, dtype=torch.float64, device=impl.device, requires_grad=True)
    _, mx = ops.channel_pool(x)
    assert torch.equal(torch.autograd.grad(mx.sum(), x)[0], torch.full_like(x, 0.25))
    _, mx = ops.spatial_pool(x)
    assert torch.equal(torch.autograd.grad(mx.sum(), x)[0], torch.full_like(x, 0.5))
    y = torch.tensor([[[[1.0, 3.0], [3.0, 2.0]], [[-1.0, -1.0], [-1.0, -1.0]]]], dtype=torch.float64,
                     device=impl.device, requires_grad=True)
    avg, mx = ops.channel_pool(y)
    assert mx.tolist() == [[3.0, -1.0]] and avg.tolist() == [[2.25, -1.0]]
    (dy,) = torch.autograd.grad(mx.sum(), y)
    assert dy[0, 0].tolist() == [[0.0, 0.5], [0.5, 0.0]] and dy[0, 1].tolist() == [[0.25, 0.25], [0.25, 0.25]]


def test_opcheck(impl):
    if not impl.fused:
        pytest.skip("opcheck tests the registered ops")
    x, a, m = _data((2, 3, 4, 5), torch.float64, impl.device, seed=2)
    kw = {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor")} if impl.interpreted else {}
    xd = x.detach()
    torch.library.opcheck(impl.op("channel_pool"), (x,), **kw)
    torch.library.opcheck(impl.op("spatial_pool"), (x, a), **kw)
    torch.library.opcheck(impl.op("spatial_pool"), (x, None), **kw)
    torch.library.opcheck(impl.op("apply_gates"), (x, a, m), **kw)
    torch.library.opcheck(impl.op("apply_gates"), (x, None, m), **kw)
    avg, mx = impl.op("channel_pool")(xd)
    torch.library.opcheck(impl.op("channel_pool_backward"), (torch.ones_like(avg), torch.ones_like(mx), xd, mx), **kw)
    savg, smx = impl.op("spatial_pool")(xd, a.detach())
    torch.library.opcheck(impl.op("spatial_pool_backward"),
                          (torch.ones_like(savg), torch.ones_like(smx), xd, a.detach(), smx), **kw)
    gx = torch.randn_like(xd)
    torch.library.opcheck(impl.op("apply_gates_backward"), (gx, xd, a.detach(), None), **kw)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the Triton interpreter
@pytest.mark.parametrize("where", ["x", "gate"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs(impl, where, value):
    x, a, m = _data((2, 4, 3, 5), torch.float32, impl.device, seed=6)
    with torch.no_grad():
        (x if where == "x" else a).view(-1)[7] = value
    for which in ("channel_pool", "spatial_pool_gated", "gates_am"):
        got, _ = _call(which, x, a, m, ops)
        ref, _ = _call(which, x, a, m, R)
        for y, z in zip(got, ref):
            assert torch.equal(torch.isfinite(y), torch.isfinite(z)), (which, y, z)


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("shape", [(2, 9, 5, 7), (1, 6, 4, 4)])
def test_ties_in_long_rows(impl, cl, shape):
    # post-ReLU maps: whole channels and whole locations at zero (every element of the pooled
    # row ties), plus repeated positive maxima, in rows long enough for the kernels' multi-row
    # sweeps and the tie corrections; float64 parity of every piece's values and gradients
    g = torch.Generator().manual_seed(11)
    b, c, h, w = shape
    x = torch.randn(shape, generator=g, dtype=torch.float64).relu_()
    x[:, 1] = 0.0  # a dead channel
    x[:, :, 0, 0] = 0.0  # a location dead in every channel
    x[0, 2, 1, :] = 2.5  # a repeated channel maximum
    x[0, :, 2, 1] = 3.0  # a repeated location maximum
    x = x.to(impl.device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    a = torch.ones(b, c, dtype=torch.float64, device=impl.device).requires_grad_()  # keeps the ties
    m = (0.1 + torch.rand(b, h, w, generator=g, dtype=torch.float64)).to(impl.device).requires_grad_()
    for which in PIECES:
        _parity(which, x, a, m, TOL[torch.float64])


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("shape", [(1, 5, 37, 29), (2, 1030, 2, 3), (1, 7, 1, 1)])
def test_rows_longer_than_a_block(impl, cl, shape):
    # the outer-axis reductions work on blocks of 1024 inner elements: HW > 1024 (NCHW spatial
    # pool) and C > 1024 (channels_last channel pool) cross a block boundary; a 1x1 map has
    # rows of one element (float64: float32 sums over 1030 channels differ from the reference's
    # order by more than the float32 tolerance)
    if impl.interpreted and shape[1] > 100:
        pytest.skip("large shape under the Triton interpreter")
    x, a, m = _data(shape, torch.float64, impl.device, cl, seed=sum(shape))
    for which in PIECES:
        _parity(which, x, a, m, TOL[torch.float64])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the Triton interpreter
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_channels_last(impl, value):
    # channels_last channel pooling runs groups of rows with per-copy running statistics that are
    # folded at the end: a NaN or Inf in any row of a group must reach the channel's statistics
    x, a, m = _data((2, 5, 7, 6), torch.float32, impl.device, cl=True, seed=8)
    with torch.no_grad():
        x[1, 3, 4, 2] = value
    for which in ("channel_pool", "spatial_pool_gated", "gates_am"):
        got, _ = _call(which, x, a, m, ops)
        ref, _ = _call(which, x, a, m, R)
        for y, z in zip(got, ref):
            assert torch.equal(torch.isfinite(y), torch.isfinite(z)), (which, y, z)
            if value == value:  # +-Inf: the finite entries agree too
                fin = torch.isfinite(z)
                torch.testing.assert_close(y[fin], z[fin], **TOL[torch.float32])
