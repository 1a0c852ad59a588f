"""Hard mining of the pyramid loss's cosine gradient and the global cosine term, for every
implementation (``impl`` fixture, tests/opimpls.py): the mined forward value equals the unmined
one; the fused backward equals autograd through the surrogate ``f * G + (1 - f) * G.detach()``
(``G`` the gated student, ``f`` the mask of the rule) in float64, on odd shapes, NCHW,
channels_last and non-contiguous inputs, with and without gates; a hand-computed case; the
threshold rule (ties, ``p = 0``, ``N (1 - p) < 1``, z-score); float64 gradcheck (factor 1, and
the global cosine without mining); no recompiles under ``torch.compile`` as the ramp's progress
changes; a resumed run continues the ramp.
"""

from __future__ import annotations

import math

import pytest
import torch

from opimpls import impl  # noqa: F401  (impl is a fixture)

import dcamkd.ops as ops
from dcamkd import reference as R
from dcamkd.errors import InvalidArgumentError
from dcamkd.losses import DistillationLoss
from dcamkd.objective import MINE_DEFAULTS, Objective

SHAPES = [(2, 5, 3, 7), (2, 4, 2, 3)]  # odd sizes, two levels
RULES = [("quantile", 0.1, 0.6), ("zscore", 0.0, 0.3), ("zscore", 0.25, -0.5)]
GTOL = dict(rtol=1e-9, atol=1e-11)


def _pyr(shapes, device, gates="cbam", layout="nchw", seed=0, teacher_grad=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(s):
        x = torch.randn(s, generator=g, dtype=torch.float64)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        elif layout == "noncontig":  # a strided view: every other column of a wider map
            b, c, h, w = s
            wide = torch.randn(b, c, h, 2 * w, generator=g, dtype=torch.float64)
            x = wide[..., ::2]
            assert not x.is_contiguous()
        return x.to(device)

    t = [rnd(s) for s in shapes]
    s_ = [rnd(s).requires_grad_() for s in shapes]
    a = [(0.2 + torch.rand(s[0], s[1], generator=g, dtype=torch.float64)).to(device).requires_grad_()
         for s in shapes] if gates in ("channel", "cbam") else None
    m = [(0.2 + torch.rand(s[0], s[2], s[3], generator=g, dtype=torch.float64)).to(device).requires_grad_()
         for s in shapes] if gates in ("spatial", "cbam") else None
    if teacher_grad:
        for x in t:
            x.requires_grad_()
    return t, s_, a, m


def _ins(t, s, a, m):
    return [x for x in t + s + (a or []) + (m or []) if x.requires_grad]


def _surrogate(t, s, a, m, cos, kl, tau, red, rule, factor, level, eps=R.DEFAULT_EPS):
    """The spec of mining written as a surrogate: per level, the mask ``f`` (1 or ``factor`` per
    location, from the gated student's channel-CD distances) injected as
    ``f * G + (1 - f) * G.detach()`` into the cosine term; the KL term sees ``G``."""
    rows = []
    for i, (tl_, sl) in enumerate(zip(t, s)):
        g = R.apply_gates(sl, a[i] if a else None, m[i] if m else None)
        f = R.mining_weights(R.cosine_distance(tl_, g, dim=1, eps=eps), rule, factor, level)[:, None]
        sur = f * g + (1 - f) * g.detach()
        c = R.global_cd(tl_, sur, eps) if cos == "global" else R.channel_cd(tl_, sur, eps)
        k = R.level_terms(tl_, g, None, None, "none", kl, tau, red, eps)[1] if kl != "none" else c * 0
        rows.append(torch.stack([c, k]))
    return torch.stack(rows)


# ---------------------------------------------------------------- (a) forward value unchanged
@pytest.mark.parametrize("cos", ["global", "channel"])
@pytest.mark.parametrize("rule,factor,level", RULES)
def test_mined_forward_equals_unmined(impl, cos, rule, factor, level):
    t, s, a, m = _pyr(SHAPES, impl.device, seed=3)
    lv = torch.tensor(level, dtype=torch.float64)
    plain = ops.pyramid_terms(t, s, a, m, cos, "spatial", 0.7, "mean_c")
    mined = ops.pyramid_terms(t, s, a, m, cos, "spatial", 0.7, "mean_c", mine=rule, mine_factor=factor,
                              mine_level=lv)
    assert torch.equal(plain, mined)


# ---------------------------------------------------------------- (b) backward == surrogate
@pytest.mark.parametrize("cos,kl", [("global", "spatial"), ("global", "none"), ("channel", "spatial"),
                                    ("channel", "channel"), ("global", "channel")])
@pytest.mark.parametrize("gates", ["none", "cbam", "spatial"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
def test_backward_matches_surrogate_float64(impl, cos, kl, gates, layout):
    seed = hash((cos, kl, gates, layout)) % 1000
    t, s, a, m = _pyr(SHAPES, impl.device, gates, layout, seed=seed, teacher_grad=True)
    for rule, factor, level in RULES:
        lv = torch.tensor(level, dtype=torch.float64)
        out = ops.pyramid_terms(t, s, a, m, cos, kl, 0.7, "sum_c", mine=rule, mine_factor=factor, mine_level=lv)
        want = _surrogate(t, s, a, m, cos, kl, 0.7, "sum_c", rule, factor, lv)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
        w = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        got = torch.autograd.grad(out, _ins(t, s, a, m), w.to(out.device))
        ref = torch.autograd.grad(want, _ins(t, s, a, m), w.to(out.device))
        for x, y in zip(got, ref):
            torch.testing.assert_close(x, y, **GTOL)


def test_mining_changes_the_gradient(impl):
    # the surrogate parity above would also pass if neither side mined: the mask is not all ones here
    t, s, a, m = _pyr(SHAPES, impl.device, seed=5)
    lv = torch.tensor(0.6, dtype=torch.float64)
    g0 = torch.autograd.grad(ops.pyramid_terms(t, s, a, m, "global", "none").sum(), s)
    g1 = torch.autograd.grad(ops.pyramid_terms(t, s, a, m, "global", "none", mine="quantile", mine_factor=0.1,
                                               mine_level=lv).sum(), s)
    assert all((x - y).abs().max() > 1e-3 for x, y in zip(g0, g1))


# ---------------------------------------------------------------- (c) hand-computed case
@pytest.mark.parametrize("cos", ["channel", "global"])
def test_hand_computed_mined_gradient(impl, cos):
    # one image, C = 2, four locations; t_p = (1, 0), s_p = (cos th_p, sin th_p): the channel
    # distances are 1 - cos th_p, increasing with th. p = 0.5, N = 4: k = 2, the threshold is the
    # 2nd largest distance (th = 1.0), so the locations th = 0.1, 0.5 are easy (strictly below).
    th = torch.tensor([0.1, 0.5, 1.0, 1.5], dtype=torch.float64)
    t = torch.zeros(1, 2, 1, 4, dtype=torch.float64)
    t[0, 0] = 1.0
    s = torch.stack([th.cos(), th.sin()])[None, :, None, :].clone()
    t, s = t.to(impl.device), s.to(impl.device).requires_grad_()
    factor = 0.1
    lv = torch.tensor(0.5, dtype=torch.float64)
    g_mined = torch.autograd.grad(ops.pyramid_terms([t], [s], cos=cos, kl="none", mine="quantile",
                                                    mine_factor=factor, mine_level=lv)[0, 0], s)[0]
    g_plain = torch.autograd.grad(ops.pyramid_terms([t], [s], cos=cos, kl="none")[0, 0], s)[0]
    if cos == "channel":
        # d/ds_p of mean_p (1 - cos th_p) at unit s_p: (cos th s_p - t_p) / 4 = (-sin^2 th, cos th sin th) / 4
        want = torch.stack([-th.sin() ** 2, th.cos() * th.sin()])[None, :, None, :] / 4
    else:
        # global: |t| = 2, |s| = 2, <t, s> = sum cos th; dd/ds = c s / |s|^2 - t / (|t| |s|)
        c = th.cos().sum() / 4
        want = (c * s.detach().cpu() / 4 - t.cpu() / 4)
    torch.testing.assert_close(g_plain.cpu(), want, rtol=1e-12, atol=1e-14)
    mask = torch.tensor([factor, factor, 1.0, 1.0], dtype=torch.float64)[None, None, None, :]
    torch.testing.assert_close(g_mined.cpu(), want * mask, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- (d) the threshold rule
def test_quantile_threshold_ties_p0_and_small_n():
    d = torch.tensor([0.1, 0.2, 0.2, 0.2, 0.5], dtype=torch.float64)
    w = lambda p: R.mining_weights(d, "quantile", 0.1, torch.tensor(p, dtype=torch.float64))  # noqa: E731
    # p = 0.5: k = floor(2.5) = 2, threshold = the 2nd largest = 0.2; ties at 0.2 keep their gradient
    assert w(0.5).tolist() == [0.1, 1, 1, 1, 1]
    assert w(0.0).tolist() == [1] * 5  # k = N: the threshold is the minimum, nothing is below
    assert w(0.9).tolist() == [0.1] * 5  # N (1 - p) = 0.5 < 1: k = 0, every location is easy
    assert w(1.0).tolist() == [0.1] * 5
    assert w(0.8).tolist() == [0.1, 0.1, 0.1, 0.1, 1]  # k = 1: the hardest location keeps its gradient
    ten = torch.arange(10, dtype=torch.float64)
    # N = 10, p = 0.9: 10 * (1 - 0.9) = 0.99999... in float64; the guard gives k = 1 (Dinomaly's
    # intent: keep the hardest location), threshold 9, everything below it mined
    assert R.mining_weights(ten, "quantile", 0.0, 0.9).tolist() == [0.0] * 9 + [1.0]


def test_zscore_threshold():
    d = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)  # mean 2, unbiased std sqrt(2.5)
    sd = math.sqrt(2.5)
    for alpha, easy in [(0.0, [1, 1, 0, 0, 0]), (-1.0, [1, 0, 0, 0, 0]), (1.0, [1, 1, 1, 1, 0]),
                        (-3.0, [0] * 5), (0.9 / sd, [1, 1, 1, 0, 0])]:
        w = R.mining_weights(d, "zscore", 0.25, alpha)
        assert w.tolist() == [0.25 if e else 1.0 for e in easy], alpha
    # N = 1: std 0, the threshold is the distance itself: nothing is strictly below it
    assert R.mining_weights(torch.tensor([0.3]), "zscore", 0.0, 1.0).tolist() == [1.0]
    with pytest.raises(InvalidArgumentError, match="mine"):
        R.mining_weights(d, "median", 0.1, 0.5)


def test_fused_selection_with_ties_matches_reference(impl):
    # several locations with identical (t_p, s_p): bit-identical distances in every implementation
    g = torch.Generator().manual_seed(7)
    t = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64)
    s = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64)
    s[:, :, 1, :] = s[0, :, 0, 0][None, :, None]
    t[:, :, 1, :] = t[0, :, 0, 0][None, :, None]
    t, s = t.to(impl.device), s.to(impl.device).requires_grad_()
    for p in (0.0, 0.3, 0.5, 0.95, 1.0):
        lv = torch.tensor(p, dtype=torch.float64)
        got = torch.autograd.grad(ops.pyramid_terms([t], [s], cos="channel", kl="none", mine="quantile",
                                                    mine_factor=0.0, mine_level=lv).sum(), s)[0]
        with ops.use("reference"):
            want = torch.autograd.grad(ops.pyramid_terms([t], [s], cos="channel", kl="none", mine="quantile",
                                                         mine_factor=0.0, mine_level=lv).sum(), s)[0]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
        zero = (want.abs().sum(1) == 0).sum().item()
        n_easy = {0.0: 0, 0.3: None, 0.5: None, 0.95: 12, 1.0: 12}[p]
        if n_easy is not None:
            assert zero == n_easy


# ---------------------------------------------------------------- (e) gradcheck
@pytest.mark.parametrize("cos,mine", [("global", "none"), ("global", "quantile"), ("channel", "zscore")])
def test_gradcheck_float64(impl, cos, mine):
    t, s, a, m = _pyr([(2, 3, 2, 3), (2, 2, 1, 2)], impl.device, "cbam", seed=9, teacher_grad=True)
    lv = torch.tensor(0.5, dtype=torch.float64)
    ins = _ins(t, s, a, m)
    n = len(t)

    def f(*xs):
        tt, ss, aa, mm = xs[:n], xs[n:2 * n], xs[2 * n:3 * n], xs[3 * n:]
        return ops.pyramid_terms(list(tt), list(ss), list(aa), list(mm), cos, "spatial", 0.7, "sum_c",
                                 mine=mine, mine_factor=1.0, mine_level=lv)

    assert torch.autograd.gradcheck(f, tuple(ins), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------- (f) no recompiles as p ramps
def test_no_recompile_as_progress_changes(impl):
    if impl.name not in ("reference", "cpp"):
        pytest.skip("compile on CPU tensors: reference and C++ kernels (Triton needs a GPU there)")
    import torch._dynamo

    torch._dynamo.reset()
    loss = DistillationLoss(Objective(cos="global", kl="spatial", mine="quantile"), check_finite=False)
    t, s, a, _ = _pyr([(2, 3, 4, 5)], impl.device, "channel", seed=2)
    s = [x.detach().float().requires_grad_() for x in s]
    t = [x.float() for x in t]
    a = [x.detach().float() for x in a]

    def step(progress):
        out = loss(t, s, a, None, progress)
        out.backward()
        return out

    cstep = torch.compile(step, backend="aot_eager", fullgraph=False)
    grads = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for p in (0.0, 0.3, 0.7, 1.0):
            s[0].grad = None
            cstep(torch.tensor(p, dtype=torch.float64))
            grads.append(s[0].grad.clone())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    # and the ramp reached the backward: p = 0 mines nothing, p = 0.7 does
    ref0 = torch.autograd.grad(DistillationLoss(loss.objective.replace(mine="none"), check_finite=False)(
        t, s, a, None), s[0])[0]
    torch.testing.assert_close(grads[0], ref0, rtol=1e-5, atol=1e-7)
    assert (grads[2] - ref0).abs().max() > 1e-4


# ---------------------------------------------------------------- the loss and its ramp
def test_loss_ramp_and_defaults():
    o = Objective(cos="global", kl="none", mine="quantile")
    assert o.mining() == {"rule": "quantile", **MINE_DEFAULTS["quantile"]}
    assert o.mining_progress(0) == 0.0 and o.mining_progress(500) == 0.5 and o.mining_progress(5000) == 1.0
    assert R.mining_level(torch.tensor(0.5, dtype=torch.float64), 0.0, 0.9).item() == pytest.approx(0.45)
    z = Objective(cos="channel", mine="zscore", mine_ramp_steps=10)
    assert z.mining()["start"] == -3.0 and z.mining_progress(5) == 0.5
    assert R.mining_level(0.5, -3.0, 1.0).item() == -1.0
    assert Objective(cos="global", kl="none", mine="quantile", mine_ramp_steps=0).mining_progress(0) == 1.0
    # objectives that differ only in ignored mining fields give the same loss
    # a setting equal to the rule's default is the same loss; mining settings without mining are refused
    assert Objective(cos="global", mine="quantile", mine_final=MINE_DEFAULTS["quantile"]["final"]).same_loss(
        Objective(cos="global", mine="quantile"))
    with pytest.raises(InvalidArgumentError, match="mine_final: has no effect with mine 'none'"):
        Objective(mine_final=0.5)
    assert not o.same_loss(o.replace(mine_factor=0.2))


@pytest.mark.parametrize("bad,match", [
    (dict(cos="spatial", mine="quantile"), "mine"),
    (dict(mine="topk"), "mine"),
    (dict(cos="global", mine="quantile", mine_final=1.5), "mine_final"),
    (dict(cos="global", mine="quantile", mine_factor=2.0), "mine_factor"),
    (dict(cos="global", mine="quantile", mine_factor=-0.1), "mine_factor"),
    (dict(cos="global", mine="zscore", mine_start=float("nan")), "mine_start"),
    (dict(cos="global", mine="quantile", mine_ramp_steps=-1), "mine_ramp_steps"),
    (dict(cos="global", mine="quantile", mine_ramp_steps=2.5), "mine_ramp_steps"),
])
def test_objective_rejects_bad_mining(bad, match):
    with pytest.raises(InvalidArgumentError, match=match):
        Objective(**bad)


def test_wrapper_rejects_mining_without_level_or_with_spatial_cos():
    t = [torch.randn(1, 2, 2, 2)]
    with pytest.raises(InvalidArgumentError, match="mine_level"):
        ops.pyramid_terms(t, t, cos="global", mine="quantile")
    with pytest.raises(InvalidArgumentError, match="mining needs"):
        ops.pyramid_terms(t, t, cos="spatial", mine="quantile", mine_level=0.5)


# ---------------------------------------------------------------- the selection op
def test_selection_op_matches_the_reference_rule(impl):
    # dcamkd::mining_weights (C++ on CPU tensors when the library is loaded, torch ops elsewhere)
    # against reference.mining_weights on the distances of the same rows, bit for bit
    from dcamkd.ops.pyramid_loss import _mining_weights_torch

    g = torch.Generator().manual_seed(4)
    for n in (1, 5, 10, 37, 600):
        st = torch.rand(3 * n + 6, generator=g, dtype=torch.float64).to(impl.device)
        st[: n // 3] = 0.0  # some zero teacher norms (distance 0.5 or 0 by the eps convention)
        st[n: n + 2] = st[2 * n: 2 * n + 2] = 0.0
        for rule, lv in [("quantile", 0.0), ("quantile", 0.5), ("quantile", 0.9), ("quantile", 1.0),
                         ("zscore", -1.0), ("zscore", 0.3), ("none", 0.0)]:
            level = torch.tensor(lv, dtype=torch.float64)
            got = torch.ops.dcamkd.mining_weights([st], [n], rule, 0.1, level, 1e-8)[0]
            want = _mining_weights_torch([st], [n], rule, 0.1, level, 1e-8)[0]
            assert got.shape == (n,) and torch.equal(got, want), (n, rule, lv)


def test_selection_op_opcheck(impl):
    if impl.name != "cpp":
        pytest.skip("the C++ selection kernel")
    st = [torch.rand(3 * 12 + 4, dtype=torch.float64), torch.rand(3 * 5, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.dcamkd.mining_weights.default,
                          (st, [12, 5], "quantile", 0.1, torch.tensor(0.5, dtype=torch.float64), 1e-8))


def test_cli_flags_reach_the_objective():
    from dcamkd.cli import _train_config, build_parser

    a = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--preset", "stfpm", "--cos", "global", "--mine",
                                   "zscore", "--mine-final", "0.5", "--mine-ramp-steps", "100"])
    o = _train_config(a).objective
    assert (o.cos, o.mine, o.mine_final, o.mine_ramp_steps) == ("global", "zscore", 0.5, 100)
    assert o.mining() == {"rule": "zscore", "start": -3.0, "final": 0.5, "factor": 0.0, "ramp_steps": 100}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d", "--out", "o", "--mine", "topk"])
