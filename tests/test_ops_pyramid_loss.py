"""The fused pyramid loss (``dcamkd.ops.pyramid_terms``; ops ``dcamkd::pyramid_loss`` and
``dcamkd::pyramid_loss_triton`` with their backward ops) against the reference, for every
implementation (``impl`` fixture, tests/opimpls.py): parity on random inputs (every mode and gate
combination, odd shapes, non-contiguous and channels_last inputs, float64/float32/float16/bfloat16
with stated tolerances, grad_output other than 1, the teacher requiring grad), float64 gradcheck,
the op contract (statistics, empty gates), opcheck, NaN/Inf propagation, the double-backward guard.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opimpls import assert_ran, impl, op_log  # noqa: F401  (impl is a fixture)

import dcamkd.ops as ops
from dcamkd import reference as R

MODES = [(c, k) for c in R.COS_MODES for k in R.KL_MODES if (c, k) != ("none", "none")]
GATES = ["none", "channel", "spatial", "cbam"]
SHAPES = [(2, 5, 3, 7), (2, 3, 4, 4)]  # non-powers of two, two levels

F64 = dict(vtol=dict(rtol=1e-10, atol=1e-12), gtol=dict(rtol=1e-9, atol=1e-10))
def NO_MINE(x):
    """The op's mining arguments for "no mining": rule, factor, level (0-dim tensor)."""
    return "none", 1.0, torch.zeros((), dtype=torch.float64, device=x.device)


F32 = dict(vtol=dict(rtol=2e-5, atol=2e-6), gtol=dict(rtol=1e-4, atol=1e-5))


def _pyr(shapes, dtype=torch.float64, device="cpu", gates="cbam", cl=False, seed=0, scale=1.0,
         teacher_grad=False):
    """Teacher/student pyramids and gates: student and gates require grad (teacher optionally)."""
    g = torch.Generator().manual_seed(seed)
    t = [(scale * torch.randn(s, generator=g, dtype=torch.float64)).to(device, dtype) for s in shapes]
    s_ = [(scale * torch.randn(s, generator=g, dtype=torch.float64)).to(device, dtype) for s in shapes]
    if cl:
        t = [x.to(memory_format=torch.channels_last) for x in t]
        s_ = [x.to(memory_format=torch.channels_last) for x in s_]
    acc = R.acc_dtype(dtype)
    a = [(0.2 + torch.rand(s[0], s[1], generator=g, dtype=torch.float64)).to(device, acc)
         if gates in ("channel", "cbam") else None for s in shapes]
    m = [(0.2 + torch.rand(s[0], s[2], s[3], generator=g, dtype=torch.float64)).to(device, acc)
         if gates in ("spatial", "cbam") else None for s in shapes]
    for x in s_ + [x for x in a + m if x is not None] + (t if teacher_grad else []):
        x.requires_grad_()
    return t, s_, (a if gates in ("channel", "cbam") else None), (m if gates in ("spatial", "cbam") else None)


def _inputs(t, s, a, m):
    return [x for x in t + s + (a or []) + (m or []) if x is not None and x.requires_grad]


def _check(t, s, a, m, cos, kl, tau, red, vtol, gtol, seed=0, ref_inputs=None):
    """Terms and gradients (weights != 1) of the op against the reference on the same inputs
    (or on ``ref_inputs``, e.g. float64 copies)."""
    ins = _inputs(t, s, a, m)
    out = ops.pyramid_terms(t, s, a, m, cos, kl, tau, red)
    rt, rs, ra, rm = ref_inputs if ref_inputs is not None else (t, s, a, m)
    ref = R.pyramid_terms(rt, rs, ra, rm, cos, kl, tau, red)
    assert out.shape == ref.shape and out.dtype == R.acc_dtype(s[0].dtype)
    torch.testing.assert_close(out.to(ref.dtype), ref, **vtol)
    w = (3 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(ref)
    got = torch.autograd.grad(out, ins, w.to(out.dtype), allow_unused=True)
    want = torch.autograd.grad(ref, _inputs(rt, rs, ra, rm), w, allow_unused=True)
    for x, y, inp in zip(got, want, ins):
        if y is None:  # the reference does not depend on it: ours must be zero (or None)
            assert x is None or x.abs().max().item() <= gtol["atol"]
            continue
        assert x.dtype == inp.dtype and x.shape == inp.shape
        torch.testing.assert_close(x.double(), y.double(), **gtol)


# ---------------------------------------------------------------- parity
@pytest.mark.parametrize("cos,kl", MODES)
@pytest.mark.parametrize("gates", GATES)
def test_float64_parity_every_mode_and_gate(impl, cos, kl, gates):
    red = "mean_c" if gates == "spatial" else "sum_c"
    t, s, a, m = _pyr(SHAPES, device=impl.device, gates=gates, seed=11, teacher_grad=True)
    _check(t, s, a, m, cos, kl, 0.7, red, **F64)


def test_what_runs(impl):
    t, s, a, m = _pyr(SHAPES, device=impl.device, gates="channel")
    with op_log() as names:
        out = ops.pyramid_terms(t, s, a, m)
        torch.autograd.grad(out.sum(), s)
    assert_ran(impl, names, "pyramid_loss")
    assert_ran(impl, names, "pyramid_loss_backward")
    if impl.name in ("cpp", "cuda"):
        key = "CPU" if impl.name == "cpp" else "CUDA"
        assert torch._C._dispatch_has_kernel_for_dispatch_key("dcamkd::pyramid_loss", key)
        assert torch._C._dispatch_has_kernel_for_dispatch_key("dcamkd::pyramid_loss_backward", key)


def test_hand_computed_values(impl):
    # t_p = (1, 0), s_p = (0, 1) at every location: channel CD = 1; s = 2 t: CD 0.
    dev = impl.device
    t = torch.zeros(1, 2, 1, 3, dtype=torch.float64, device=dev)
    t[:, 0] = 1.0
    s = torch.zeros_like(t)
    s[:, 1] = 1.0
    assert ops.pyramid_terms([t], [s], cos="channel", kl="none")[0, 0].item() == pytest.approx(1.0, abs=1e-12)
    assert ops.pyramid_terms([t], [2 * t], cos="channel", kl="channel")[0, 0].item() == pytest.approx(0.0, abs=1e-12)
    # channel KL of logits (0, 0) vs (log 3, 0) at tau 1: P = (1/2, 1/2), Q = (3/4, 1/4)
    s2 = torch.zeros_like(t)
    s2[:, 0] = math.log(3.0)
    out = ops.pyramid_terms([torch.zeros_like(t)], [s2], cos="none", kl="channel")
    assert out[0, 1].item() == pytest.approx(0.5 * (math.log(0.5 / 0.75) + math.log(0.5 / 0.25)), rel=1e-12)
    # spatial KL with sum_c: the sum over channels of the per-channel KL, mean over the batch;
    # channel 0 has logits (log 3, 0, 0) over the 3 locations, channel 1 is flat (KL 0)
    s3 = torch.zeros_like(t)
    s3[0, 0, 0, 0] = math.log(3.0)
    out = ops.pyramid_terms([torch.zeros_like(t)], [s3], cos="none", kl="spatial", kd_reduction="sum_c")
    p = torch.tensor([math.log(3.0), 0.0, 0.0], dtype=torch.float64).log_softmax(0)
    kl_row = (torch.full((3,), 1 / 3, dtype=torch.float64) * (math.log(1 / 3) - p)).sum().item()
    assert out[0, 1].item() == pytest.approx(kl_row, rel=1e-12)
    # one zero vector: distance 0.5; two zero vectors: 0
    z = torch.zeros(1, 2, 1, 1, dtype=torch.float64, device=dev)
    assert ops.pyramid_terms([t[..., :1]], [z], kl="none")[0, 0].item() == pytest.approx(0.5)
    assert ops.pyramid_terms([z], [z], kl="none")[0, 0].item() == 0.0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(1, 3), c=st.integers(1, 9), h=st.integers(1, 6), w=st.integers(1, 6),
    modes=st.sampled_from(MODES), gates=st.sampled_from(GATES), cl=st.booleans(),
    red=st.sampled_from(R.KD_REDUCTIONS), tau=st.sampled_from([0.5, 1.0, 2.0]), seed=st.integers(0, 10_000),
)
def test_float32_parity_random_shapes(impl, b, c, h, w, modes, gates, cl, red, tau, seed):
    t, s, a, m = _pyr([(b, c, h, w), (b, c + 2, h + 1, w)], torch.float32, impl.device, gates, cl, seed,
                      teacher_grad=seed % 2 == 0)
    # channel CD at C = 1: the gradient c s'/|s'|^2 - t/(|t||s'|) is a cancellation of two terms
    # of size 1/|s'|, so float32 rounding (reference and fused alike) grows like 1/|s'|; keep
    # |s| >= 0.05 so the float32 tolerances measure the kernels, not that conditioning
    with torch.no_grad():
        for x in s:
            x.copy_(torch.where(x >= 0, 1.0, -1.0) * x.abs().clamp_min(0.05))
    _check(t, s, a, m, *modes, tau, red, seed=seed, **F32)


@pytest.mark.parametrize("shape", [(2, 7, 1, 1), (2, 1, 5, 3), (1, 1, 1, 1), (3, 13, 5, 7)])
@pytest.mark.parametrize("cos,kl", [("channel", "spatial"), ("spatial", "channel")])
def test_odd_sizes(impl, shape, cos, kl):
    t, s, a, m = _pyr([shape], torch.float32, impl.device, "cbam", teacher_grad=True, seed=5)
    _check(t, s, a, m, cos, kl, 1.0, "sum_c", **F32)


@pytest.mark.parametrize("cos,kl", MODES)
def test_zero_vectors(impl, cos, kl):
    # post-ReLU features: whole channel maps and channel vectors of zeros, in T and S
    t, s, _, _ = _pyr([(2, 4, 3, 3)], device=impl.device, gates="none")
    with torch.no_grad():
        t[0][:, 1] = 0
        t[0][0, :, 0, 0] = 0
        s[0][:, 2] = 0
        s[0][1, :, 1, 1] = 0
        s[0][0, :, 0, 0] = 0  # both zero at one location
    t[0].requires_grad_()
    _check(t, s, None, None, cos, kl, 1.0, "mean_c", vtol=dict(rtol=1e-12, atol=1e-12),
           gtol=dict(rtol=1e-9, atol=1e-9))
    g = torch.autograd.grad(ops.pyramid_terms(t, s, cos=cos, kl=kl).sum(), s)[0]
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("cos,kl", [("channel", "spatial"), ("spatial", "channel")])
def test_huge_logits_stay_finite(impl, cos, kl):
    t, s, _, _ = _pyr([(2, 6, 5, 5)], torch.float32, impl.device, "none", scale=1e4)
    out = ops.pyramid_terms(t, s, cos=cos, kl=kl)
    assert torch.isfinite(out).all()
    assert torch.isfinite(torch.autograd.grad(out.sum(), s)[0]).all()
    ref = R.pyramid_terms([x.double() for x in t], [x.detach().double() for x in s], cos=cos, kl=kl)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-3)


def test_non_contiguous_inputs(impl):
    g = torch.Generator().manual_seed(4)
    base_t = torch.randn(2, 3, 6, 8, generator=g, dtype=torch.float64).to(impl.device)
    base_s = torch.randn(2, 3, 8, 6, generator=g, dtype=torch.float64).to(impl.device)
    t = base_t[:, :, :, ::2]  # strided
    s = base_s.transpose(2, 3)[:, :, :, ::2].requires_grad_()  # transposed + strided
    assert not t.is_contiguous() and not s.is_contiguous()
    _check([t], [s], None, None, "channel", "spatial", 1.0, "sum_c", **F64)


@pytest.mark.parametrize("cos,kl", [("channel", "spatial"), ("spatial", "channel")])
def test_channels_last(impl, cos, kl):
    t, s, a, m = _pyr([(2, 5, 4, 3), (2, 3, 2, 2)], device=impl.device, cl=True, teacher_grad=True, seed=2)
    g = torch.autograd.grad(ops.pyramid_terms(t, s, a, m, cos, kl).sum(), s)
    if impl.fused:  # the fused ops write gradients in the layout of their inputs
        assert all(x.is_contiguous(memory_format=torch.channels_last) for x in g)
    _check(t, s, a, m, cos, kl, 1.3, "mean_c", **F64)


# float16 inputs are rounded to 1e-3 relative: terms agree to 2e-3 (rtol) and gradients (in
# float16) to 1e-2; bfloat16 (8-bit mantissa) to 2e-2 and 5e-2. Reference: the same rounded
# inputs in float64.
@pytest.mark.parametrize("dtype,vtol,gtol", [
    (torch.float16, dict(rtol=2e-3, atol=1e-4), dict(rtol=1e-2, atol=1e-4)),
    (torch.bfloat16, dict(rtol=2e-2, atol=1e-3), dict(rtol=5e-2, atol=1e-3)),
])
def test_half_precision(impl, dtype, vtol, gtol):
    t, s, a, m = _pyr([(2, 8, 4, 4), (2, 16, 2, 2)], dtype, impl.device, "channel", seed=3)
    ref_in = ([x.double() for x in t], [x.detach().double().requires_grad_() for x in s],
              [x.detach().double().requires_grad_() for x in a], None)
    _check(t, s, a, m, "channel", "spatial", 1.0, "sum_c", vtol, gtol, ref_inputs=ref_in)


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("cos,kl", MODES)
def test_batch1_large_level(impl, cos, kl, cl):
    # batch 1 and >= 2^15 elements: the C++ kernels split the (NO, NI) slab into row blocks across
    # threads and merge the outer-axis partials (sums; log-sum-exp rescaling for the KL rows)
    if impl.interpreted:
        pytest.skip("too large for the Triton interpreter")
    torch.set_num_threads(2)
    t, s, a, m = _pyr([(1, 17, 44, 45)], device=impl.device, cl=cl, seed=3, scale=3.0, teacher_grad=True)
    _check(t, s, a, m, cos, kl, 0.5, "sum_c", vtol=dict(rtol=1e-10, atol=1e-10), gtol=dict(rtol=1e-9, atol=1e-10))


# ---------------------------------------------------------------- gradcheck (float64)
@pytest.mark.parametrize("cos,kl", MODES)
@pytest.mark.parametrize("gates,cl", [("none", False), ("cbam", False), ("channel", True), ("spatial", True)])
def test_gradcheck(impl, cos, kl, gates, cl):
    shapes = [(2, 3, 3, 2), (2, 4, 2, 3)]
    t, s, a, m = _pyr(shapes, device=impl.device, gates=gates, cl=cl, seed=7, teacher_grad=True)
    n = len(shapes)
    ins = _inputs(t, s, a, m)

    def f(*xs):
        tt, ss = list(xs[:n]), list(xs[n:2 * n])
        rest = list(xs[2 * n:])
        aa = [rest.pop(0) for _ in range(n)] if a is not None else None
        mm = [rest.pop(0) for _ in range(n)] if m is not None else None
        return ops.pyramid_terms(tt, ss, aa, mm, cos, kl, 0.8, "sum_c")

    assert torch.autograd.gradcheck(f, tuple(ins), atol=1e-6, rtol=1e-5, fast_mode=True)


def test_double_backward_guard(impl):
    t, s, _, _ = _pyr([(2, 3, 4, 4)], device=impl.device, gates="none")
    out = ops.pyramid_terms(t, s).sum()
    if impl.fused:
        with pytest.raises(NotImplementedError, match="second-order"):
            torch.autograd.grad(out, s, create_graph=True)
    else:
        (g,) = torch.autograd.grad(out, s, create_graph=True)
        assert g.requires_grad


# ---------------------------------------------------------------- the op contract
def test_op_contract_statistics_and_empty_gates(impl):
    if not impl.fused:
        pytest.skip("the op contract is the fused ops'")
    t, s, a, m = _pyr([(2, 3, 2, 5)], device=impl.device, gates="cbam", seed=5)
    t, s, a, m = t[0], s[0].detach(), a[0].detach(), m[0].detach()
    e = s.new_empty((0,))
    terms, stats = impl.op("pyramid_loss")([t], [s], [a], [m], "channel", "spatial", 0.5, "sum_c", 1e-8, *NO_MINE(t))
    torch.testing.assert_close(terms, R.pyramid_terms([t], [s], [a], [m], "channel", "spatial", 0.5, "sum_c"))
    g = R.apply_gates(s, a, m)
    B, HW, C = 2, 10, 3
    assert stats[0].shape == (3 * B * HW + 3 * B * C,)
    cs = stats[0][: 3 * B * HW].view(3, B, HW)
    torch.testing.assert_close(cs[0], t.flatten(2).norm(dim=1))
    torch.testing.assert_close(cs[1], g.flatten(2).norm(dim=1))
    torch.testing.assert_close(cs[2], (t * g).sum(1).flatten(1))
    ks = stats[0][3 * B * HW:].view(3, B, C)
    torch.testing.assert_close(ks[0], torch.logsumexp(t.flatten(2) / 0.5, dim=2))
    torch.testing.assert_close(ks[1], torch.logsumexp(g.flatten(2) / 0.5, dim=2))
    torch.testing.assert_close(ks[2], R._kl_rows(t.flatten(2), g.flatten(2), 2, 0.5))
    # an empty (0,) gate means "no gate"; absent gates get (0,) gradients, no teacher gradient
    # unless asked
    terms0, stats0 = impl.op("pyramid_loss")([t], [s], [a], [e], "channel", "spatial", 1.0, "sum_c", 1e-8,
                                            *NO_MINE(t))
    torch.testing.assert_close(terms0, R.pyramid_terms([t], [s], [a], None))
    go = torch.tensor([[0.5, -2.0]], dtype=torch.float64, device=impl.device)
    gs, gt, ga, gm = impl.op("pyramid_loss_backward")(go, [t], [s], [a], [e], stats0, [e], "channel", "spatial",
                                                      1.0, "sum_c", 1e-8, False)
    assert gt == [] and ga[0].shape == (2, 3) and gm[0].shape == (0,) and gs[0].shape == s.shape
    sr, ar = s.clone().requires_grad_(), a.clone().requires_grad_()
    want = torch.autograd.grad(R.pyramid_terms([t], [sr], [ar], None), (sr, ar), go)
    torch.testing.assert_close(gs[0], want[0])
    torch.testing.assert_close(ga[0], want[1])
    _, gt, _, _ = impl.op("pyramid_loss_backward")(go, [t], [s], [e], [e], stats0, [e], "channel", "spatial",
                                                   1.0, "sum_c", 1e-8, True)
    assert len(gt) == 1 and gt[0].shape == t.shape


def test_opcheck(impl):
    if not impl.fused:
        pytest.skip("opcheck tests the registered ops")
    t, s, a, m = _pyr([(2, 3, 4, 5), (2, 4, 2, 3)], device=impl.device, seed=1)
    tt = [x.detach().requires_grad_() for x in t]
    e = s[0].new_empty((0,))
    args = (tt, s, [a[0], e], [e, m[1]], "channel", "spatial", 1.0, "sum_c", 1e-8, *NO_MINE(s[0]))
    # under the interpreter the kernels cannot be traced (fake tensors have no data): the schema,
    # fake and autograd registration checks still run
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if impl.interpreted else None
    kw = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(impl.op("pyramid_loss"), args, **kw)
    _, stats = impl.op("pyramid_loss")(t, [x.detach() for x in s], [a[0].detach(), e], [e, m[1].detach()],
                                       "channel", "spatial", 1.0, "sum_c", 1e-8, *NO_MINE(s[0]))
    go = torch.randn(2, 2, dtype=torch.float64, device=impl.device)
    for teacher_grad in (False, True):
        torch.library.opcheck(impl.op("pyramid_loss_backward"),
                              (go, t, [x.detach() for x in s], [a[0].detach(), e], [e, m[1].detach()], stats,
                               [e, e], "channel", "spatial", 1.0, "sum_c", 1e-8, teacher_grad), **kw)


# ---------------------------------------------------------------- NaN and Inf
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the Triton interpreter
@pytest.mark.parametrize("where", ["teacher", "student", "channel_gate", "spatial_gate"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("cos,kl", [("channel", "spatial"), ("spatial", "channel"), ("channel", "none"),
                                    ("none", "spatial"), ("spatial", "spatial"), ("none", "channel")])
def test_non_finite_inputs_give_non_finite_terms(impl, where, value, cos, kl):
    t, s, a, m = _pyr([(2, 4, 3, 3), (2, 3, 2, 2)], torch.float32, impl.device, "cbam", seed=8)
    with torch.no_grad():
        target = {"teacher": t, "student": s, "channel_gate": a, "spatial_gate": m}[where][0]
        target.view(-1)[3] = value  # one element of level 0
    out = ops.pyramid_terms(t, s, a, m, cos, kl)
    ref = R.pyramid_terms(t, s, a, m, cos, kl)
    assert not torch.isfinite(ref).all()  # the case is meaningful
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref)), (out, ref)
