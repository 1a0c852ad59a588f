"""Triton kernels (dcamkd.kernels) under the Triton interpreter, on CPU tensors.

TRITON_INTERPRET=1 is set before the kernel modules are imported (and they are reloaded if an
earlier test imported them without it). Parity with dcamkd.reference in float64 (forward and
gradients, tolerance 1e-10) and float32/bfloat16 (stated tolerances), float64 gradcheck
(``tl.float64`` works in the interpreter), the op-contract statistics, layouts, edge cases, and
the measured GPU-backend choice with stand-in kernels.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from dcamkd import reference as R  # noqa: E402
from dcamkd.errors import InvalidArgumentError, ShapeMismatchError  # noqa: E402

for _m in ("dcamkd.kernels.pyramid_loss", "dcamkd.kernels.attention", "dcamkd.kernels.anomaly_map"):
    if _m in sys.modules:
        importlib.reload(sys.modules[_m])
from dcamkd.kernels import anomaly_map as KA  # noqa: E402
from dcamkd.kernels import attention as KT  # noqa: E402
from dcamkd.kernels import dispatch  # noqa: E402
from dcamkd.kernels import pyramid_loss as KP  # noqa: E402

SHAPES = [(2, 5, 3, 7), (2, 3, 4, 4)]  # non-powers of two, two levels
MODES = [(c, k) for c in R.COS_MODES for k in R.KL_MODES if (c, k) != ("none", "none")]
GATES = ["none", "channel", "spatial", "cbam"]


def _inputs(shapes, dtype, gates, seed=0, scale=1.0, teacher_grad=True):
    g = torch.Generator().manual_seed(seed)
    ts = [(scale * torch.randn(s, generator=g, dtype=dtype)).requires_grad_(teacher_grad) for s in shapes]
    ss = [(scale * torch.randn(s, generator=g, dtype=dtype)).requires_grad_() for s in shapes]
    acc = R.acc_dtype(dtype)
    cg = [(0.2 + torch.rand(s[0], s[1], generator=g, dtype=acc)).requires_grad_()
          if gates in ("channel", "cbam") else None for s in shapes]
    sg = [(0.2 + torch.rand(s[0], s[2], s[3], generator=g, dtype=acc)).requires_grad_()
          if gates in ("spatial", "cbam") else None for s in shapes]
    return ts, ss, cg, sg


def _grads(out, ins, go):
    return torch.autograd.grad(out, ins, go, allow_unused=True)


def _assert_grads(g1, g2, atol, rtol):
    for a, b in zip(g1, g2):
        if b is None:  # the reference does not depend on it: ours must be ~0 (or None)
            assert a is None or a.abs().max().item() < atol
            continue
        torch.testing.assert_close(a.to(b.dtype), b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("cos,kl", MODES)
@pytest.mark.parametrize("gates", GATES)
def test_pyramid_loss_float64_parity(cos, kl, gates):
    red = "mean_c" if gates == "spatial" else "sum_c"
    ts, ss, cg, sg = _inputs(SHAPES, torch.float64, gates)
    out = KP.pyramid_terms(ts, ss, cg, sg, cos, kl, 0.7, red)
    ref = R.pyramid_terms(ts, ss, cg, sg, cos, kl, 0.7, red)
    assert out.shape == (2, 2) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    go = torch.tensor([[0.3, -1.7], [2.0, 0.5]], dtype=torch.float64)  # grad_output != 1
    ins = [x for x in ts + ss + cg + sg if x is not None]
    _assert_grads(_grads(out, ins, go), _grads(ref, ins, go), 1e-10, 1e-9)


@pytest.mark.parametrize("cos,kl,gates", [("channel", "spatial", "cbam"), ("spatial", "channel", "channel")])
def test_pyramid_loss_gradcheck(cos, kl, gates):
    ts, ss, cg, sg = _inputs([(1, 3, 2, 3)], torch.float64, gates, seed=3)

    def f(t, s, a):
        return KP.pyramid_terms([t], [s], [a], sg, cos, kl, 1.3, "sum_c")

    assert torch.autograd.gradcheck(f, (ts[0], ss[0], cg[0]), eps=1e-6, atol=1e-7)


def test_pyramid_loss_float32_bf16_channels_last():
    ts, ss, cg, sg = _inputs(SHAPES, torch.float32, "cbam", seed=1, scale=3.0)
    ref = R.pyramid_terms(ts, ss, cg, sg)
    go = torch.ones_like(ref)
    ins = ts + ss + cg + sg
    g_ref = _grads(ref, ins, go)
    cl = [x.detach().to(memory_format=torch.channels_last).requires_grad_() for x in ts + ss]
    out = KP.pyramid_terms(cl[:2], cl[2:], cg, sg)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = _grads(out, cl + cg + sg, go)
    assert g[2].is_contiguous(memory_format=torch.channels_last)  # dS keeps the layout
    _assert_grads(g, g_ref, 1e-5, 1e-4)
    # bfloat16 inputs, float32 accumulation: compare with the reference on the same bf16 values
    tb = [t.detach().bfloat16() for t in ts]
    sb = [s.detach().bfloat16().requires_grad_() for s in ss]
    out_b = KP.pyramid_terms(tb, sb, cg, sg)
    ref_b = R.pyramid_terms(tb, sb, cg, sg)
    assert out_b.dtype == torch.float32
    torch.testing.assert_close(out_b, ref_b, atol=2e-2, rtol=2e-2)
    gb = _grads(out_b, sb, torch.ones_like(ref_b))
    gr = _grads(ref_b, sb, torch.ones_like(ref_b))
    for a, b in zip(gb, gr):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=5e-2)


def test_pyramid_loss_edge_cases():
    # H*W = 1, C = 1, zero vectors (both zero / one zero), logits of magnitude 1e4
    t = torch.zeros(2, 4, 3, 3, dtype=torch.float64)
    s = torch.zeros_like(t)
    s[1] = 1.0
    t[0, :, 0, 0] = 1.0
    big_t = 1e4 * torch.randn(2, 3, 4, 5, dtype=torch.float64)
    big_s = 1e4 * torch.randn(2, 3, 4, 5, dtype=torch.float64)
    for tt, sv in [(t, s), (big_t, big_s), (torch.randn(2, 3, 1, 1, dtype=torch.float64),) * 2,
                   (torch.randn(2, 1, 3, 5, dtype=torch.float64), torch.randn(2, 1, 3, 5, dtype=torch.float64))]:
        for cos, kl in [("channel", "spatial"), ("spatial", "channel")]:
            sr = sv.clone().requires_grad_()
            out = KP.pyramid_terms([tt], [sr], cos=cos, kl=kl)
            ref = R.pyramid_terms([tt], [sr], cos=cos, kl=kl)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
            g1, = torch.autograd.grad(out.sum(), sr)
            g2, = torch.autograd.grad(ref.sum(), sr)
            assert torch.isfinite(g1).all()
            torch.testing.assert_close(g1, g2, atol=1e-9, rtol=1e-7)
    # hand value: one zero vector against a non-zero one is 0.5, two zero vectors 0
    z = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    o = z.clone()
    o[0, :, 0, 0] = 1.0
    terms = KP.pyramid_terms([z], [o], cos="channel", kl="none")
    assert terms[0, 0].item() == pytest.approx(0.25, abs=1e-15)  # mean of (0.5, 0)


def test_op_contract_statistics():
    """The stats vector of the registered kernel: [|t|, |s'|, t.s' | lse_t, lse_s, kl]."""
    ts, ss, cg, sg = _inputs([(2, 3, 2, 5)], torch.float64, "cbam", seed=5)
    t, s, a, m = ts[0].detach(), ss[0].detach(), cg[0].detach(), sg[0].detach()
    terms, stats = KP.pyramid_loss([t], [s], [a], [m], "channel", "spatial", 0.5, "sum_c", 1e-8)
    g = R.apply_gates(s, a, m)
    B, HW, C = 2, 10, 3
    cs = stats[0][: 3 * B * HW].view(3, B, HW)
    torch.testing.assert_close(cs[0], t.flatten(2).norm(dim=1))
    torch.testing.assert_close(cs[1], g.flatten(2).norm(dim=1))
    torch.testing.assert_close(cs[2], (t * g).sum(1).flatten(1))
    ks = stats[0][3 * B * HW:].view(3, B, C)
    torch.testing.assert_close(ks[0], torch.logsumexp(t.flatten(2) / 0.5, dim=2))
    torch.testing.assert_close(ks[1], torch.logsumexp(g.flatten(2) / 0.5, dim=2))
    torch.testing.assert_close(ks[2], R._kl_rows(t.flatten(2), g.flatten(2), 2, 0.5))
    # backward contract: gradients of absent gates are (0,) tensors, grad_teachers [] unless asked
    gs, gt, ga, gm = KP.pyramid_loss_backward(torch.ones(1, 2, dtype=torch.float64), [t], [s], [None],
                                              [None], [KP.pyramid_loss([t], [s], [None], [None], "channel",
                                                                       "spatial", 0.5, "sum_c", 1e-8)[1][0]],
                                              "channel", "spatial", 0.5, "sum_c", 1e-8, False)
    assert gt == [] and ga[0].shape == (0,) and gm[0].shape == (0,) and gs[0].shape == s.shape


def test_attention_parity_and_gradcheck():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    a = (0.1 + torch.rand(2, 5, generator=g, dtype=torch.float64)).requires_grad_()
    m = (0.1 + torch.rand(2, 3, 7, generator=g, dtype=torch.float64)).requires_grad_()

    def cpool(x):
        avg, mx = KT.channel_pool(x)
        return avg, mx

    # forward parity
    for got, ref in [(KT.channel_pool(x), R.channel_pool(x)), (KT.spatial_pool(x, a), R.spatial_pool(x, a)),
                     (KT.spatial_pool(x), R.spatial_pool(x)), ((KT.apply_gates(x, a, m),), (R.apply_gates(x, a, m),))]:
        for u, v in zip(got, ref):
            torch.testing.assert_close(u, v, atol=1e-13, rtol=1e-12)
    # backward kernels against autograd of the reference
    ga = torch.randn(2, 5, generator=g, dtype=torch.float64)
    gm = torch.randn(2, 5, generator=g, dtype=torch.float64)
    avg, mx = R.channel_pool(x)
    dx_ref, = torch.autograd.grad((avg, mx), x, (ga, gm))
    torch.testing.assert_close(KT.channel_pool_backward(ga, gm, x.detach(), mx.detach()), dx_ref)
    sa, sm = R.spatial_pool(x, a)
    ga2 = torch.randn_like(sa)
    gm2 = torch.randn_like(sm)
    dx_ref, da_ref = torch.autograd.grad((sa, sm), (x, a), (ga2, gm2))
    dx, da = KT.spatial_pool_backward(ga2, gm2, x.detach(), a.detach(), sm.detach())
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(da, da_ref)
    out = R.apply_gates(x, a, m)
    go = torch.randn_like(out)
    refs = torch.autograd.grad(out, (x, a, m), go)
    for u, v in zip(KT.apply_gates_backward(go, x.detach(), a.detach(), m.detach()), refs):
        torch.testing.assert_close(u, v)
    ds, da0, dm0 = KT.apply_gates_backward(go, x.detach(), None, m.detach())
    assert da0.shape == (0,) and dm0.shape == (2, 3, 7)


def test_attention_ties_and_channels_last():
    # ties: the max's gradient is split evenly, as autograd of amax does
    x = torch.tensor([[[[1.0, 3.0], [3.0, 2.0]], [[-1.0, -1.0], [-1.0, -1.0]]]], dtype=torch.float64)
    avg, mx = KT.channel_pool(x)
    assert mx.tolist() == [[3.0, -1.0]] and avg.tolist() == [[2.25, -1.0]]
    dx = KT.channel_pool_backward(torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64),
                                  x, mx)
    assert dx[0, 0].tolist() == [[0.0, 0.5], [0.5, 0.0]] and dx[0, 1].tolist() == [[0.25, 0.25], [0.25, 0.25]]
    xs = x.clone().requires_grad_()
    sa, sm = R.spatial_pool(xs)
    ref_dx, = torch.autograd.grad(sm.sum(), xs)
    dxs, _ = KT.spatial_pool_backward(torch.zeros_like(sm), torch.ones_like(sm), x, None, KT.spatial_pool(x)[1])
    torch.testing.assert_close(dxs, ref_dx)
    # channels_last in, channels_last out
    y = torch.randn(2, 6, 3, 5).to(memory_format=torch.channels_last)
    a = torch.rand(2, 6)
    for u, v in zip(KT.channel_pool(y), R.channel_pool(y)):
        torch.testing.assert_close(u, v)
    for u, v in zip(KT.spatial_pool(y, a), R.spatial_pool(y, a)):
        torch.testing.assert_close(u, v)
    out = KT.apply_gates(y, a, None)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, R.apply_gates(y, a, None))


def test_anomaly_map_parity():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(2, 7, 5, 3, generator=g)
    s = torch.randn(2, 7, 5, 3, generator=g)
    t[0, :, 0, 0] = 0.0  # one zero vector -> 0.5
    s[0, :, 0, 0] = 0.0  # ... and both zero -> 0
    s[1, :, 1, 1] = 0.0
    got = KA.anomaly_map_level(t, s)
    torch.testing.assert_close(got, R.anomaly_map_level(t, s), atol=1e-6, rtol=1e-5)
    assert got[0, 0, 0].item() == 0.0 and got[1, 1, 1].item() == pytest.approx(0.5)
    cl = KA.anomaly_map_level(t.to(memory_format=torch.channels_last), s.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, got)
    t64, s64 = t.double(), s.double()
    torch.testing.assert_close(KA.anomaly_map_level(t64, s64), R.anomaly_map_level(t64, s64))
    assert KA.anomaly_map_level(t.bfloat16(), s.bfloat16()).dtype == torch.float32


def test_errors(monkeypatch):
    t = torch.randn(1, 2, 3, 3)
    with pytest.raises(InvalidArgumentError, match="cos"):
        KP.level_forward(t, t, cos="bad")
    with pytest.raises(InvalidArgumentError, match="tau"):
        KP.level_forward(t, t, tau=0.0)
    with pytest.raises(ShapeMismatchError, match="student"):
        KP.level_forward(t, torch.randn(1, 2, 3, 4))
    with pytest.raises(ShapeMismatchError, match="channel_gate"):
        KP.level_forward(t, t, torch.ones(1, 3))
    with pytest.raises(InvalidArgumentError, match="float"):
        KA.anomaly_map_level(t.long(), t.long())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(InvalidArgumentError, match="CUDA"):
        KA.anomaly_map_level(t, t)


def test_registration_and_measured_choice(monkeypatch):
    from dcamkd.ops import _backend

    for op in ("pyramid_loss", "pyramid_loss_backward", "channel_pool", "spatial_pool_backward",
               "apply_gates_backward", "anomaly_map"):
        assert (op, "triton") in _backend.KERNELS
    # the registered adapter runs the Triton kernel (interpreted here) and matches the reference
    t, s = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(_backend.KERNELS[("anomaly_map", "triton")](t, s, 1e-8),
                               R.anomaly_map_level(t, s))
    # measured choice with stand-in kernels: the faster one wins, per shape class, cached
    calls = {"cuda": 0, "triton": 0}

    def slow(x):
        calls["cuda"] += 1
        time.sleep(0.004)
        return x

    def fast(x):
        calls["triton"] += 1
        return x

    monkeypatch.setitem(_backend.KERNELS, ("fake_op", "cuda"), slow)
    monkeypatch.setitem(_backend.KERNELS, ("fake_op", "triton"), fast)
    monkeypatch.delenv("DCAMKD_AUTO_GPU", raising=False)
    x = torch.zeros(3)
    assert dispatch.choose("fake_op", (x,)) == "triton"
    assert calls == {"cuda": 1 + dispatch.REPEATS, "triton": 1 + dispatch.REPEATS}
    assert dispatch.choose("fake_op", (x,)) == "triton" and calls["cuda"] == 1 + dispatch.REPEATS  # cached
    key = dispatch.shape_class("fake_op", (x,))
    assert dispatch.CHOICES[key] == "triton" and set(dispatch.TIMINGS[key]) == {"cuda", "triton"}
    assert dispatch.shape_class("fake_op", (torch.zeros(4),)) != key
    monkeypatch.setenv("DCAMKD_AUTO_GPU", "cuda")
    assert dispatch.choose("fake_op", (torch.zeros(5),)) == "cuda"
    # a backend that fails leaves the race
    monkeypatch.delenv("DCAMKD_AUTO_GPU")

    def broken(x):
        raise RuntimeError("no build")

    monkeypatch.setitem(_backend.KERNELS, ("fake_op2", "cuda"), broken)
    monkeypatch.setitem(_backend.KERNELS, ("fake_op2", "triton"), fast)
    monkeypatch.setattr(dispatch, "FAILED", {})
    assert dispatch.choose("fake_op2", (x,)) == "triton" and "cuda" in dispatch.FAILED
    # 'triton' asked for CPU tensors: a clear error from the resolver
    with pytest.raises(InvalidArgumentError, match="CUDA"):
        _backend.resolve("pyramid_loss", torch.device("cpu"), "triton")


def test_contract_empty_gate_means_no_gate():
    """The op passes "no gate" as an empty (0,) tensor (Tensor[] schema); same result as None."""
    ts, ss, cg, sg = _inputs([(2, 3, 2, 5)], torch.float64, "channel", seed=9)
    t, s, a = ts[0].detach(), ss[0].detach(), cg[0].detach()
    empty = torch.zeros((0,), dtype=torch.float64)
    terms1, st1 = KP.pyramid_loss([t], [s], [a], [empty], "channel", "spatial", 1.0, "sum_c", 1e-8)
    terms2, st2 = KP.pyramid_loss([t], [s], [a], [None], "channel", "spatial", 1.0, "sum_c", 1e-8)
    torch.testing.assert_close(terms1, terms2)
    torch.testing.assert_close(terms1, R.pyramid_terms([t], [s], [a], None))
    gs, gt, ga, gm = KP.pyramid_loss_backward(torch.ones(1, 2, dtype=torch.float64), [t], [s], [a], [empty],
                                              st1, "channel", "spatial", 1.0, "sum_c", 1e-8, True)
    assert ga[0].shape == (2, 3) and gm[0].shape == (0,) and gt[0].shape == t.shape
