"""The fused anomaly map (``dcamkd.ops.anomaly_map_level``; ops ``dcamkd::anomaly_map`` and
``dcamkd::anomaly_map_triton``, forward only) against the reference, for every implementation
(``impl`` fixture, tests/opimpls.py): parity (float64, float32, float16, bfloat16 with stated
tolerances; NCHW, channels_last, non-contiguous, odd shapes), hand-computed zero vectors,
the reference taking over under autograd, opcheck, NaN/Inf propagation.
"""

from __future__ import annotations

import pytest
import torch

from opimpls import assert_ran, impl, op_log  # noqa: F401  (impl is a fixture)

import dcamkd.ops as ops
from dcamkd import reference as R

TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-13),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-5, atol=1e-6),  # against the reference on the same rounded inputs
    torch.bfloat16: dict(rtol=1e-5, atol=1e-6),
}


def _pair(shape, dtype, device, cl=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    s = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    if cl:
        t, s = t.to(memory_format=torch.channels_last), s.to(memory_format=torch.channels_last)
    return t, s


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("shape", [(2, 7, 5, 3), (1, 1, 1, 1), (3, 40, 9, 11)])
def test_parity(impl, dtype, cl, shape):
    t, s = _pair(shape, dtype, impl.device, cl, seed=sum(shape))
    got = ops.anomaly_map_level(t, s)
    assert got.dtype == R.acc_dtype(dtype) and got.shape == (shape[0], shape[2], shape[3])
    torch.testing.assert_close(got, R.anomaly_map_level(t, s), **TOL[dtype])


def test_zero_vectors_and_non_contiguous(impl):
    t, s = _pair((2, 7, 5, 3), torch.float32, impl.device, seed=2)
    t[0, :, 0, 0] = 0.0  # both zero: 0
    s[0, :, 0, 0] = 0.0
    s[1, :, 1, 1] = 0.0  # one zero: 0.5
    got = ops.anomaly_map_level(t, s)
    assert got[0, 0, 0].item() == 0.0 and got[1, 1, 1].item() == pytest.approx(0.5)
    torch.testing.assert_close(got, R.anomaly_map_level(t, s), **TOL[torch.float32])
    tn, sn = t.transpose(2, 3), s.transpose(2, 3)  # neither NCHW nor channels_last
    torch.testing.assert_close(ops.anomaly_map_level(tn, sn), R.anomaly_map_level(tn, sn), **TOL[torch.float32])


def test_what_runs_and_autograd_falls_back_to_the_reference(impl):
    t, s = _pair((2, 3, 4, 4), torch.float32, impl.device)
    with op_log() as names:
        ops.anomaly_map_level(t, s)
    assert_ran(impl, names, "anomaly_map")
    sg = s.clone().requires_grad_()
    with op_log() as names:
        out = ops.anomaly_map_level(t, sg)  # forward-only op: autograd callers get the reference
    assert not any(n.startswith("dcamkd::") for n in names)
    (g,) = torch.autograd.grad(out.sum(), sg)
    assert torch.isfinite(g).all()


def test_opcheck(impl):
    if not impl.fused:
        pytest.skip("opcheck tests the registered ops")
    t, s = _pair((2, 3, 4, 5), torch.float64, impl.device, seed=3)
    kw = {"test_utils": ("test_schema", "test_faketensor")} if impl.interpreted else {}
    torch.library.opcheck(impl.op("anomaly_map"), (t, s, 1e-8), **kw)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the Triton interpreter
@pytest.mark.parametrize("where", ["teacher", "student"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("cl", [False, True])
def test_non_finite_pixels(impl, where, value, cl):
    t, s = _pair((2, 5, 3, 4), torch.float32, impl.device, cl, seed=4)
    (t if where == "teacher" else s)[1, 2, 0, 3] = value
    got = ops.anomaly_map_level(t, s)
    ref = R.anomaly_map_level(t, s)
    assert not torch.isfinite(ref[1, 0, 3])  # the pixel is not "perfectly normal"
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref))
    torch.testing.assert_close(got[torch.isfinite(ref)], ref[torch.isfinite(ref)], **TOL[torch.float32])
