"""The fused CPU ops (C++ extension) against the reference: gradcheck, parity, numerics,
layouts, dtypes, torch.library.opcheck, torch.compile and torch.export.

Where a C++ compiler is on PATH the extension must build and be what runs: the module fixture
sets ``DCAMKD_STRICT_BUILD=1`` and every parity test asserts ``last_backend(op) == 'cpu'``.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dcamkd.ops as ops
from dcamkd import reference as R
from dcamkd.errors import InvalidArgumentError, ShapeMismatchError
from dcamkd.ops import _backend

HAVE_CXX = shutil.which("g++") is not None or shutil.which("c++") is not None
pytestmark = pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler: the CPU extension cannot build")

MODES = [(c, k) for c in R.COS_MODES for k in R.KL_MODES if not (c == "none" and k == "none")]


@pytest.fixture(autouse=True)
def strict(monkeypatch):
    monkeypatch.setenv("DCAMKD_STRICT_BUILD", "1")
    monkeypatch.delenv("DCAMKD_BACKEND", raising=False)
    assert _backend.cpu_extension() is not None


def _pyr(shapes, dtype=torch.float64, cl=False, gates=True, grad=True, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(s, generator=g, dtype=torch.float64).mul(scale).to(dtype) for s in shapes]
    s_ = [torch.randn(s, generator=g, dtype=torch.float64).mul(scale).to(dtype) for s in shapes]
    if cl:
        t = [x.to(memory_format=torch.channels_last) for x in t]
        s_ = [x.to(memory_format=torch.channels_last) for x in s_]
    a = [torch.rand(s[0], s[1], generator=g, dtype=torch.float64) + 0.1 for s in shapes] if gates else None
    m = [torch.rand(s[0], s[2], s[3], generator=g, dtype=torch.float64) + 0.1 for s in shapes] if gates else None
    if grad:
        for x in s_ + (a or []) + (m or []):
            x.requires_grad_()
    return t, s_, a, m


def _grads(out, w, inputs):
    return torch.autograd.grad((out * w).sum(), inputs, allow_unused=True)


# ---------------------------------------------------------------- backend and build
def test_extension_is_what_runs():
    ops.reset_calls()
    t, s, _, _ = _pyr([(2, 3, 4, 4)], gates=False)
    ops.pyramid_terms(t, s).sum().backward()
    assert ops.last_backend("pyramid_loss") == "cpu"
    assert ops.CALLS[("pyramid_loss", "cpu")] == 1
    assert ops.CALLS[("pyramid_loss_backward", "cpu")] == 1
    assert ops.CALLS[("pyramid_loss", "reference")] == 0


def test_backend_resolution(monkeypatch):
    t, s, _, _ = _pyr([(2, 3, 4, 4)], gates=False, grad=False)
    monkeypatch.setenv("DCAMKD_BACKEND", "reference")
    ops.pyramid_terms(t, s)
    assert ops.last_backend("pyramid_loss") == "reference"
    ops.pyramid_terms(t, s, backend="cpu")  # argument beats the environment
    assert ops.last_backend("pyramid_loss") == "cpu"
    with pytest.raises(InvalidArgumentError, match="backend"):
        ops.pyramid_terms(t, s, backend="gpu")
    with pytest.raises(InvalidArgumentError, match="CUDA"):
        ops.pyramid_terms(t, s, backend="triton")
    with pytest.raises(ShapeMismatchError, match="level 0"):
        ops.pyramid_terms(t, [s[0][:, :2]])
    with pytest.raises(InvalidArgumentError, match="tau"):
        ops.pyramid_terms(t, s, tau=0.0)


def test_hand_computed_values():
    # t_p = (1, 0), s_p = (0, 1) at every location: channel CD = 1; s = 2 t: CD 0.
    t = torch.zeros(1, 2, 1, 3, dtype=torch.float64)
    t[:, 0] = 1.0
    s = torch.zeros_like(t)
    s[:, 1] = 1.0
    out = ops.pyramid_terms([t], [s], cos="channel", kl="none")
    assert out[0, 0].item() == pytest.approx(1.0, abs=1e-12)
    out = ops.pyramid_terms([t], [2 * t], cos="channel", kl="channel")
    assert out[0, 0].item() == pytest.approx(0.0, abs=1e-12)
    # channel KL of logits (0, 0) vs (log 3, 0) at tau 1: P = (1/2, 1/2), Q = (3/4, 1/4)
    s2 = torch.zeros_like(t)
    s2[:, 0] = torch.log(torch.tensor(3.0, dtype=torch.float64))
    out = ops.pyramid_terms([torch.zeros_like(t)], [s2], cos="none", kl="channel")
    expect = 0.5 * (math.log(0.5 / 0.75) + math.log(0.5 / 0.25))
    assert out[0, 1].item() == pytest.approx(expect, rel=1e-12)
    # one zero vector: distance 0.5; two zero vectors: 0
    z = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    assert ops.pyramid_terms([t[..., :1]], [z], kl="none")[0, 0].item() == pytest.approx(0.5)
    assert ops.pyramid_terms([z], [z], kl="none")[0, 0].item() == 0.0
    assert ops.last_backend("pyramid_loss") == "cpu"


# ---------------------------------------------------------------- gradcheck (float64)
@pytest.mark.parametrize("cos,kl", MODES)
@pytest.mark.parametrize("gates", [False, True])
def test_gradcheck_pyramid(cos, kl, gates):
    shapes = [(2, 3, 3, 2), (2, 5, 2, 2)]
    t, s, a, m = _pyr(shapes, gates=gates)
    for x in t:
        x.requires_grad_()
    n = len(shapes)

    def f(*xs):
        tt, ss = list(xs[:n]), list(xs[n:2 * n])
        aa = list(xs[2 * n:3 * n]) if gates else None
        mm = list(xs[3 * n:]) if gates else None
        return ops.pyramid_terms(tt, ss, aa, mm, cos, kl, tau=0.8, kd_reduction="sum_c", backend="cpu")

    assert torch.autograd.gradcheck(f, tuple(t + s + (a or []) + (m or [])), atol=1e-6, rtol=1e-5, fast_mode=True)
    assert ops.last_backend("pyramid_loss_backward") == "cpu"


def test_gradcheck_channels_last_and_mean_c():
    t, s, a, m = _pyr([(2, 4, 3, 3)], cl=True)

    def f(s0, a0, m0):
        return ops.pyramid_terms(t, [s0], [a0], [m0], "spatial", "spatial", 1.3, "mean_c", backend="cpu")

    assert torch.autograd.gradcheck(f, (s[0], a[0], m[0]), fast_mode=True)


@pytest.mark.parametrize("which", ["channel_pool", "spatial_pool", "spatial_pool_gated", "gates_a", "gates_m", "gates_am"])
@pytest.mark.parametrize("cl", [False, True])
def test_gradcheck_attention(which, cl):
    t, s, a, m = _pyr([(2, 3, 4, 5)], cl=cl)
    x, a0, m0 = s[0], a[0], m[0]
    if which == "channel_pool":
        f, args = (lambda x: ops.channel_pool(x, backend="cpu")), (x,)
    elif which == "spatial_pool":
        f, args = (lambda x: ops.spatial_pool(x, backend="cpu")), (x,)
    elif which == "spatial_pool_gated":
        f, args = (lambda x, a: ops.spatial_pool(x, a, backend="cpu")), (x, a0)
    elif which == "gates_a":
        f, args = (lambda x, a: ops.apply_gates(x, a, backend="cpu")), (x, a0)
    elif which == "gates_m":
        f, args = (lambda x, m: ops.apply_gates(x, None, m, backend="cpu")), (x, m0)
    else:
        f, args = (lambda x, a, m: ops.apply_gates(x, a, m, backend="cpu")), (x, a0, m0)
    assert torch.autograd.gradcheck(f, args, fast_mode=True)


# ---------------------------------------------------------------- parity with the reference
def _check_parity(t, s, a, m, cos, kl, tau, red, vtol, gtol, teacher_grad=False, seed=0):
    if teacher_grad:
        for x in t:
            x.requires_grad_()
    ins = [x for x in (t + s + (a or []) + (m or [])) if x.requires_grad]
    f = ops.pyramid_terms(t, s, a, m, cos, kl, tau, red, backend="cpu")
    assert ops.last_backend("pyramid_loss") == "cpu"
    r = R.pyramid_terms(t, s, a, m, cos, kl, tau, red)
    assert f.dtype == r.dtype and f.shape == r.shape
    torch.testing.assert_close(f, r, **vtol)
    w = torch.randn(r.shape, generator=torch.Generator().manual_seed(seed), dtype=r.dtype) * 3  # grad_output != 1
    gf, gr = _grads(f, w, ins), _grads(r, w, ins)
    for x, y, inp in zip(gf, gr, ins):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == inp.dtype and x.shape == inp.shape
            torch.testing.assert_close(x.double(), y.double(), **gtol)


F32 = dict(vtol=dict(rtol=2e-5, atol=2e-6), gtol=dict(rtol=1e-4, atol=1e-5))


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3), c=st.integers(1, 9), h=st.integers(1, 7), w=st.integers(1, 7),
    modes=st.sampled_from(MODES), gates=st.booleans(), cl=st.booleans(),
    red=st.sampled_from(R.KD_REDUCTIONS), tau=st.sampled_from([0.5, 1.0, 2.0]), seed=st.integers(0, 1000),
)
def test_parity_random_shapes(b, c, h, w, modes, gates, cl, red, tau, seed):
    t, s, a, m = _pyr([(b, c, h, w), (b, c + 2, h + 1, w)], dtype=torch.float32, cl=cl, gates=gates, seed=seed)
    # channel CD at C = 1: the gradient c s'/|s'|^2 - t/(|t||s'|) is a cancellation of two terms
    # of size 1/|s'|, so float32 rounding (reference and fused alike) grows like 1/|s'|; keep
    # |s| >= 0.05 so the float32 tolerances below measure the kernels, not that conditioning
    with torch.no_grad():
        for x in s:
            x.copy_(torch.where(x >= 0, 1.0, -1.0) * x.abs().clamp_min(0.05))
    a = [x.float().detach().requires_grad_() for x in a] if gates else None
    m = [x.float().detach().requires_grad_() for x in m] if gates else None
    _check_parity(t, s, a, m, *modes, tau, red, teacher_grad=seed % 2 == 0, seed=seed, **F32)


@pytest.mark.parametrize("shape", [(2, 7, 1, 1), (2, 1, 5, 3), (1, 1, 1, 1), (3, 13, 5, 7)])
@pytest.mark.parametrize("cos,kl", [("channel", "spatial"), ("spatial", "channel")])
def test_parity_odd_sizes(shape, cos, kl):
    t, s, a, m = _pyr([shape], dtype=torch.float32)
    a, m = [a[0].float()], [m[0].float()]
    _check_parity(t, s, a, m, cos, kl, 1.0, "sum_c", teacher_grad=True, **F32)


@pytest.mark.parametrize("cos,kl", MODES)
def test_zero_vectors_match_reference(cos, kl):
    # post-ReLU features: whole channel maps and channel vectors of zeros, in T and S
    t, s, _, _ = _pyr([(2, 4, 3, 3)], grad=False)
    t[0][:, 1] = 0
    t[0][0, :, 0, 0] = 0
    s[0][:, 2] = 0
    s[0][1, :, 1, 1] = 0
    s[0][0, :, 0, 0] = 0  # both zero at one location
    s[0].requires_grad_()
    _check_parity(t, s, None, None, cos, kl, 1.0, "mean_c", teacher_grad=True,
                  vtol=dict(rtol=1e-12, atol=1e-12), gtol=dict(rtol=1e-9, atol=1e-9))
    g = torch.autograd.grad(ops.pyramid_terms(t, s, cos=cos, kl=kl).sum(), s)[0]
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("cos,kl", [("channel", "spatial"), ("spatial", "channel")])
def test_huge_logits_finite(cos, kl):
    t, s, a, m = _pyr([(2, 6, 5, 5)], dtype=torch.float32, gates=False, scale=1e4)
    f = ops.pyramid_terms(t, s, cos=cos, kl=kl, backend="cpu")
    assert torch.isfinite(f).all()
    g = torch.autograd.grad(f.sum(), s)[0]
    assert torch.isfinite(g).all()
    # the reference in float64 is the ground truth here
    r = R.pyramid_terms([x.double() for x in t], [x.detach().double() for x in s], cos=cos, kl=kl)
    torch.testing.assert_close(f.double(), r, rtol=1e-4, atol=1e-3)


def test_non_contiguous_inputs():
    base_t = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    base_s = torch.randn(2, 3, 8, 6, dtype=torch.float64)
    t = base_t[:, :, :, ::2]  # strided
    s = base_s.transpose(2, 3)[:, :, :, ::2].requires_grad_()  # transposed + strided
    assert not t.is_contiguous() and not s.is_contiguous()
    _check_parity([t], [s], None, None, "channel", "spatial", 1.0, "sum_c",
                  vtol=dict(rtol=1e-10, atol=1e-12), gtol=dict(rtol=1e-8, atol=1e-10))


def test_channels_last_gradient_layout():
    t, s, a, m = _pyr([(2, 5, 4, 3)], cl=True)
    f = ops.pyramid_terms(t, s, a, m, backend="cpu")
    g = torch.autograd.grad(f.sum(), s)[0]
    assert g.is_contiguous(memory_format=torch.channels_last)
    _check_parity(t, s, a, m, "channel", "spatial", 1.0, "sum_c",
                  vtol=dict(rtol=1e-10, atol=1e-12), gtol=dict(rtol=1e-8, atol=1e-10))


# float16 inputs are rounded to 1e-3 relative: terms agree to 2e-3 (rtol) and gradients (in
# float16) to 1e-2; bfloat16 (8-bit mantissa) to 2e-2 and 5e-2.
@pytest.mark.parametrize("dtype,vtol,gtol", [
    (torch.float16, dict(rtol=2e-3, atol=1e-4), dict(rtol=1e-2, atol=1e-4)),
    (torch.bfloat16, dict(rtol=2e-2, atol=1e-3), dict(rtol=5e-2, atol=1e-3)),
])
def test_half_precision(dtype, vtol, gtol):
    t, s, a, m = _pyr([(2, 8, 4, 4), (2, 16, 2, 2)], dtype=dtype, gates=False)
    f = ops.pyramid_terms(t, s, backend="cpu")
    assert f.dtype == torch.float32
    assert ops.last_backend("pyramid_loss") == "cpu"
    # reference: same rounded inputs, computed in float64
    r = R.pyramid_terms([x.double() for x in t], [x.detach().double() for x in s])
    torch.testing.assert_close(f.double(), r, **vtol)
    g = torch.autograd.grad(f.sum(), s)
    s64 = [x.detach().double().requires_grad_() for x in s]
    gr = torch.autograd.grad(R.pyramid_terms([x.double() for x in t], s64).sum(), s64)
    for x, y in zip(g, gr):
        assert x.dtype == dtype
        torch.testing.assert_close(x.double(), y, **gtol)


# ---------------------------------------------------------------- attention and anomaly map
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_parity(cl, dtype):
    t, s, a, m = _pyr([(2, 6, 5, 3)], dtype=dtype, cl=cl)
    x = s[0]
    a0 = a[0].float().detach().requires_grad_()
    m0 = m[0].float().detach().requires_grad_()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for fused, ref, args in [
        (ops.channel_pool, R.channel_pool, (x,)),
        (ops.spatial_pool, R.spatial_pool, (x, a0)),
        (ops.apply_gates, R.apply_gates, (x, a0, m0)),
    ]:
        f, r = fused(*args, backend="cpu"), ref(*args)
        assert ops.last_backend(fused.__name__) == "cpu"
        f = f if isinstance(f, tuple) else (f,)
        r = r if isinstance(r, tuple) else (r,)
        gen = torch.Generator().manual_seed(7)  # fixed weights: no dependence on test order
        ws = [torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype) for y in r]
        for y, z in zip(f, r):
            assert y.dtype == z.dtype
            torch.testing.assert_close(y, z, **tol)
        gf = torch.autograd.grad(sum((y * w).sum() for y, w in zip(f, ws)), args)
        gr = torch.autograd.grad(sum((y * w).sum() for y, w in zip(r, ws)), args)
        for y, z in zip(gf, gr):
            torch.testing.assert_close(y.double(), z.double(), **tol)


def test_pool_ties_split_like_amax():
    x = torch.zeros(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)  # all tied (post-ReLU zeros)
    avg, mx = ops.channel_pool(x, backend="cpu")
    g = torch.autograd.grad(mx.sum(), x)[0]
    assert torch.equal(g, torch.full_like(x, 0.25))
    avg, mx = ops.spatial_pool(x, backend="cpu")
    g = torch.autograd.grad(mx.sum(), x)[0]
    assert torch.equal(g, torch.full_like(x, 0.5))


@pytest.mark.parametrize("cl", [False, True])
def test_anomaly_map(cl):
    t, s, _, _ = _pyr([(2, 7, 5, 3)], dtype=torch.float32, cl=cl, grad=False)
    t[0][0, :, 0, 0] = 0
    f = ops.anomaly_map_level(t[0], s[0], backend="cpu")
    assert ops.last_backend("anomaly_map") == "cpu"
    torch.testing.assert_close(f, R.anomaly_map_level(t[0], s[0]), rtol=1e-5, atol=1e-6)
    assert f[0, 0, 0].item() == pytest.approx(0.5)
    sg = s[0].clone().requires_grad_()
    ops.anomaly_map_level(t[0], sg)  # forward-only op: autograd callers get the reference
    assert ops.last_backend("anomaly_map") == "reference"


# ---------------------------------------------------------------- torch.library integration
def test_opcheck_all_ops():
    t, s, a, m = _pyr([(2, 3, 4, 5), (2, 4, 2, 3)])
    tt = [x.detach().requires_grad_() for x in t]
    e = torch.empty(0, dtype=torch.float64)
    args = (tt, s, [a[0], e], [e, m[1]], "channel", "spatial", 1.0, "sum_c", 1e-8, "cpu")
    torch.library.opcheck(torch.ops.dcamkd.pyramid_loss.default, args)
    x = s[0].detach().requires_grad_()
    a0 = a[0].detach().requires_grad_()
    m0 = m[0].detach().requires_grad_()
    torch.library.opcheck(torch.ops.dcamkd.channel_pool.default, (x, "cpu"))
    torch.library.opcheck(torch.ops.dcamkd.spatial_pool.default, (x, a0, "cpu"))
    torch.library.opcheck(torch.ops.dcamkd.apply_gates.default, (x, a0, m0, "cpu"))
    torch.library.opcheck(torch.ops.dcamkd.anomaly_map.default, (t[0], s[0].detach(), 1e-8, "cpu"))


def test_compile_fullgraph_parity():
    torch._dynamo.reset()
    t, s, a, m = _pyr([(2, 4, 4, 4), (2, 6, 2, 2)], dtype=torch.float32)
    a = [x.float().detach().requires_grad_() for x in a]

    def loss(t, s, a):
        return ops.pyramid_terms(t, s, a, None, backend="cpu").sum()

    ops.reset_calls()
    comp = torch.compile(loss, fullgraph=True, backend="aot_eager")
    lc = comp(t, s, a)
    gc = torch.autograd.grad(lc, s + a)
    le = loss(t, s, a)
    ge = torch.autograd.grad(le, s + a)
    torch.testing.assert_close(lc, le)
    for x, y in zip(gc, ge):
        torch.testing.assert_close(x, y)
    assert ops.CALLS[("pyramid_loss", "cpu")] == 2 and ops.CALLS[("pyramid_loss_backward", "cpu")] == 2


def test_export_module():
    class M(torch.nn.Module):
        def forward(self, t, s):
            return ops.pyramid_terms([t], [s], backend="cpu"), ops.anomaly_map_level(t, s, backend="cpu")

    t, s, _, _ = _pyr([(2, 3, 4, 4)], dtype=torch.float32, grad=False)
    ep = torch.export.export(M(), (t[0], s[0]))
    text = str(ep.graph)
    assert "dcamkd.pyramid_loss" in text and "dcamkd.anomaly_map" in text
    out = ep.module()(t[0], s[0])
    torch.testing.assert_close(out[0], R.pyramid_terms(t, s))
    torch.testing.assert_close(out[1], R.anomaly_map_level(t[0], s[0]))


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("cos,kl", MODES)
def test_parity_batch1_row_blocks(cos, kl, cl):
    # batch 1 and >= 2^15 elements: the kernels split the (NO, NI) slab into row blocks across
    # threads and merge the outer-axis partials (sums; log-sum-exp rescaling for the KL rows)
    torch.set_num_threads(2)
    t, s, a, m = _pyr([(1, 17, 44, 45)], dtype=torch.float64, cl=cl, seed=3, scale=3.0)
    _check_parity(t, s, a, m, cos, kl, 0.5, "sum_c", teacher_grad=True,
                  vtol=dict(rtol=1e-10, atol=1e-10), gtol=dict(rtol=1e-9, atol=1e-10))
