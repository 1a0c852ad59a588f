"""Loss modules and reference ops: hand-computed values and the identities of method.md
section 3. The modules run through ``dcamkd.ops`` (fused where built); values are compared with
closed forms, so both paths are held to the same numbers."""

import math

import pytest
import torch

from dcamkd import ops
from dcamkd import reference as R
from dcamkd.dcam import DCAM, DCAMBlock
from dcamkd.errors import InvalidArgumentError, NonFiniteError, ShapeMismatchError
from dcamkd.losses import ChannelCDLoss, ChannelKDLoss, DistillationLoss, SpatialCDLoss, SpatialKDLoss


def _pyr(seed, shapes=((2, 3, 4, 5), (2, 6, 2, 3)), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


# ----------------------------------------------------------------------------- cosine distance
def test_cosine_distance_hand_values():
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    v = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [4.0, 3.0]])
    d = R.cosine_distance(u, v, dim=1)
    expected = torch.tensor([1.0, 0.0, 0.0, 0.5, 2.0, 1.0 - 24.0 / 25.0])
    torch.testing.assert_close(d, expected, rtol=0, atol=1e-7)


def test_cosine_distance_zero_vectors_have_finite_gradients():
    u = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    R.cosine_distance(u, v, dim=1).sum().backward()
    assert torch.isfinite(u.grad).all() and torch.isfinite(v.grad).all()


def test_channel_cd_hand_value():
    # one location with orthogonal vectors (d=1), one with equal vectors (d=0)
    t = torch.tensor([[1.0, 2.0], [0.0, 0.0]]).view(1, 2, 1, 2)
    s = torch.tensor([[0.0, 2.0], [1.0, 0.0]]).view(1, 2, 1, 2)
    loss = ChannelCDLoss(check_finite=True)([t], [s])
    assert loss.item() == pytest.approx(0.5, abs=1e-6)


def test_spatial_cd_hand_value():
    # channel 0 maps identical (0), channel 1 opposite (2): mean 1
    t = torch.tensor([[1.0, 2.0], [1.0, -1.0]]).view(1, 2, 1, 2)
    s = torch.tensor([[2.0, 4.0], [-1.0, 1.0]]).view(1, 2, 1, 2)
    assert SpatialCDLoss()([t], [s]).item() == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------- KL terms
def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def test_spatial_kd_hand_value_and_reductions():
    # row (b=0, c=0): P = softmax([0, ln 3]) = [1/4, 3/4], Q = [1/2, 1/2]; row c=1 identical (0)
    t = torch.tensor([[0.0, math.log(3.0)], [1.0, 2.0]]).view(1, 2, 1, 2)
    s = torch.tensor([[0.0, 0.0], [1.0, 2.0]]).view(1, 2, 1, 2)
    kl0 = _kl([0.25, 0.75], [0.5, 0.5])
    assert SpatialKDLoss(kd_reduction="sum_c")([t], [s]).item() == pytest.approx(kl0, abs=1e-6)
    assert SpatialKDLoss(kd_reduction="mean_c")([t], [s]).item() == pytest.approx(kl0 / 2, abs=1e-6)


def test_spatial_kd_temperature_hand_value():
    t = torch.tensor([0.0, 2.0 * math.log(3.0)]).view(1, 1, 1, 2)
    s = torch.zeros(1, 1, 1, 2)
    # tau = 2: P = softmax([0, ln 3])
    assert SpatialKDLoss(tau=2.0)([t], [s]).item() == pytest.approx(_kl([0.25, 0.75], [0.5, 0.5]), abs=1e-6)


def test_channel_kd_hand_value():
    # location 0: P over channels softmax([0, ln 3]), Q uniform; location 1: identical
    t = torch.tensor([[0.0, 5.0], [math.log(3.0), 5.0]]).view(1, 2, 1, 2)
    s = torch.tensor([[0.0, 5.0], [0.0, 5.0]]).view(1, 2, 1, 2)
    expected = _kl([0.25, 0.75], [0.5, 0.5]) / 2  # mean over the 2 locations
    assert ChannelKDLoss()([t], [s]).item() == pytest.approx(expected, abs=1e-6)


def test_sum_c_is_c_times_mean_c():
    t, s = _pyr(1, ((3, 7, 5, 4),)), _pyr(2, ((3, 7, 5, 4),))
    a = R.spatial_kd(t[0], s[0], 1.0, "sum_c")
    b = R.spatial_kd(t[0], s[0], 1.0, "mean_c")
    torch.testing.assert_close(a, 7 * b)


def test_kl_large_logits_finite():
    t = torch.randn(2, 3, 4, 4) * 1e4
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = DistillationLoss(cos="channel", kl="spatial")([t], [s * 1e4])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


# ----------------------------------------------------------------------------- identities (method.md 3)
def test_spatial_gate_does_not_change_channel_cosine():
    t, s = _pyr(3, ((2, 5, 3, 4),)), _pyr(4, ((2, 5, 3, 4),))
    m = torch.rand(2, 3, 4, dtype=torch.float64) * 0.9 + 0.05
    a = R.level_terms(t[0], s[0], None, m, cos="channel", kl="none")
    b = R.level_terms(t[0], s[0], None, None, cos="channel", kl="none")
    torch.testing.assert_close(a, b)


def test_channel_gate_does_not_change_spatial_cosine():
    t, s = _pyr(5, ((2, 5, 3, 4),)), _pyr(6, ((2, 5, 3, 4),))
    a_gate = torch.rand(2, 5, dtype=torch.float64) * 0.9 + 0.05
    a = R.level_terms(t[0], s[0], a_gate, None, cos="spatial", kl="none")
    b = R.level_terms(t[0], s[0], None, None, cos="spatial", kl="none")
    torch.testing.assert_close(a, b)


def test_channel_gate_acts_as_temperature_in_spatial_kl():
    t, s = _pyr(7, ((1, 1, 3, 3),))[0], _pyr(8, ((1, 1, 3, 3),))[0]
    a, tau = 0.37, 1.5
    gated = R.level_terms(t, s, torch.tensor([[a]], dtype=torch.float64), None, cos="none", kl="spatial", tau=tau)[1]
    p = torch.softmax(t.flatten() / tau, 0)
    logq = torch.log_softmax(s.flatten() / (tau / a), 0)
    expected = (p * (p.log() - logq)).sum()
    torch.testing.assert_close(gated, expected)


def test_spatial_dcam_with_channel_cd_gives_gate_no_gradient():
    torch.manual_seed(0)
    t = torch.randn(2, 8, 6, 6)
    s = torch.randn(2, 8, 6, 6, requires_grad=True)
    blk = DCAMBlock(8, "spatial")
    _, m = blk(s)
    loss = DistillationLoss(cos="channel", kl="none")([t], [s], None, [m])
    loss.backward()
    assert blk.spatial.conv.weight.grad.abs().max().item() < 1e-6
    # and the student gradient equals the ungated one (trains exactly like STFPM)
    s2 = s.detach().clone().requires_grad_(True)
    DistillationLoss(cos="channel", kl="none")([t], [s2]).backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- the module API
def test_combine_lambdas_and_level_weights():
    t, s = _pyr(9), _pyr(10)
    terms = R.pyramid_terms(t, s, cos="channel", kl="spatial", kd_reduction="mean_c")
    fn = DistillationLoss(cos="channel", kl="spatial", lambda_cos=0.5, lambda_kl=2.0, level_weights=[1.0, 3.0],
                          kd_reduction="mean_c")
    expected = (0.5 * terms[0, 0] + 2 * terms[0, 1]) + 3 * (0.5 * terms[1, 0] + 2 * terms[1, 1])
    torch.testing.assert_close(fn(t, s), expected.to(torch.float64))
    torch.testing.assert_close(fn.last_terms, terms)


def test_gradients_reach_teacher_when_it_requires_grad():
    t = [x.requires_grad_(True) for x in _pyr(11)]
    s = [x.requires_grad_(True) for x in _pyr(12)]
    DistillationLoss(cos="channel", kl="spatial")(t, s).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in t + s)


def test_dcam_gates_receive_gradients_through_the_loss():
    torch.manual_seed(1)
    t = [torch.randn(2, 16, 8, 8), torch.randn(2, 24, 4, 4)]
    s = [torch.randn(2, 16, 8, 8), torch.randn(2, 24, 4, 4)]
    dcam = DCAM((16, 24), "cbam")
    cg, sg = dcam(s)
    DistillationLoss(cos="channel", kl="spatial")(t, s, cg, sg).backward()
    for p in dcam.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_matches_reference_with_gates(dtype):
    t, s = _pyr(13, dtype=dtype), _pyr(14, dtype=dtype)
    cg = [torch.rand(2, 3, dtype=dtype), None]
    sg = [None, torch.rand(2, 2, 3, dtype=dtype)]
    fn = DistillationLoss(cos="spatial", kl="channel", tau=2.0, lambda_kl=1.0)
    expected = R.pyramid_terms(t, s, cg, sg, "spatial", "channel", 2.0).sum()
    torch.testing.assert_close(fn(t, s, cg, sg), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cos="cosine"), "cos: expected one of"),
        (dict(kl="kld"), "kl: expected one of"),
        (dict(cos="none", kl="none"), "no loss at all"),
        (dict(tau=0.0), "tau: expected"),
        (dict(lambda_kl=-1.0), "lambda_kl: expected"),
        (dict(kd_reduction="sum"), "kd_reduction: expected one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        DistillationLoss(**kwargs)


def test_bad_inputs():
    fn = DistillationLoss()
    t, s = _pyr(15), _pyr(16)
    with pytest.raises(ShapeMismatchError, match="2 levels, student pyramid 1"):
        fn(t, s[:1])
    with pytest.raises(ShapeMismatchError, match="teacher shape"):
        fn(t, [s[0], s[1][:, :3]])
    with pytest.raises(ShapeMismatchError, match="dtype"):
        fn(t, [x.float() for x in s])
    bad = s[0].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="student level 0"):
        fn(t, [bad, s[1]])
    with pytest.raises(ShapeMismatchError, match="empty"):
        fn([x[:0] for x in t], [x[:0] for x in s])
    with pytest.raises(ShapeMismatchError, match="channel gate must be"):
        fn(t, s, [torch.rand(2, 4, dtype=torch.float64), None])
    with pytest.raises(InvalidArgumentError, match="lists of"):
        fn(t[0], s[0])


def test_reference_gradcheck_float64():
    t = [x.requires_grad_(True) for x in _pyr(17, ((1, 3, 2, 3), (1, 2, 2, 2)))]
    s = [x.requires_grad_(True) for x in _pyr(18, ((1, 3, 2, 3), (1, 2, 2, 2)))]
    cg = [torch.rand(1, 3, dtype=torch.float64, requires_grad=True), None]
    sg = [None, torch.rand(1, 2, 2, dtype=torch.float64, requires_grad=True)]

    def f(*xs):
        return R.pyramid_terms(list(xs[0:2]), list(xs[2:4]), [xs[4], None], [None, xs[5]], "channel", "spatial", 1.3)

    assert torch.autograd.gradcheck(f, (*t, *s, cg[0], sg[1]))


def test_module_compiles_fullgraph_with_default_checks():
    t, s = _pyr(19, dtype=torch.float32), _pyr(20, dtype=torch.float32)
    fn = DistillationLoss(cos="channel", kl="spatial", kd_reduction="mean_c")
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(t, s), fn(t, s), rtol=1e-5, atol=1e-6)


def test_double_backward_is_refused_by_fused_kernels_and_works_on_reference():
    t = _pyr(21, ((1, 3, 4, 4),), dtype=torch.float64)
    s = [x.requires_grad_(True) for x in _pyr(22, ((1, 3, 4, 4),), dtype=torch.float64)]
    with ops.use("reference"):
        ref = DistillationLoss()(t, s)
    (g,) = torch.autograd.grad(ref, s, create_graph=True)
    (g2,) = torch.autograd.grad(g.pow(2).sum(), s)
    assert g2.abs().sum() > 0
    with ops.use("cpp"):
        fused = DistillationLoss()(t, s)
    with pytest.raises(NotImplementedError, match="second-order gradients"):
        torch.autograd.grad(fused, s, create_graph=True)


def test_bad_argument_types_and_gates():
    with pytest.raises(InvalidArgumentError, match="lambda_cos: expected a finite number"):
        DistillationLoss(lambda_cos="a")
    t, s = _pyr(23), _pyr(24)
    with pytest.raises(InvalidArgumentError, match="channel gate must be a floating-point"):
        DistillationLoss()(t, s, [torch.ones(2, 3, dtype=torch.long), None])
    bad = torch.rand(2, 3, dtype=torch.float64)
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="channel gate level 0"):
        DistillationLoss()(t, s, [bad, None])


def test_dcam_block_checks_channels():
    with pytest.raises(ShapeMismatchError, match="DCAM block of 8 channels"):
        DCAMBlock(8, "channel")(torch.randn(2, 9, 4, 4))
