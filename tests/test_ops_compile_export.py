"""``torch.compile`` and ``torch.export`` of the loss and of the scoring, each in a FRESH process
where the compiled (or exported) call is the first dcamkd call, on every path: the reference, the
C++ kernels, Triton (export under the interpreter; compile needs a GPU: interpreted kernels cannot
be traced) and CUDA (with a GPU). Checked: the result and the gradients equal the eager
reference's; NaN and Inf in the inputs give non-finite results where the reference does; the
exported graph holds the chosen op and no implementation name.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from opimpls import GPU, HAVE_CXX, HAVE_TRITON, INTERPRETER

import dcamkd.ops as ops
from dcamkd import _build

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import sys
import torch

impl, kind, target = sys.argv[1:4]
import dcamkd.ops as ops
from dcamkd import reference as R
from dcamkd.losses import DistillationLoss
from dcamkd.scoring import anomaly_map

IMPLS = ops.IMPLS
dev = "cuda" if impl == "cuda" or (impl == "triton" and torch.cuda.is_available()) else "cpu"
g = torch.Generator().manual_seed(0)
t = [torch.randn(2, 8, 6, 6, generator=g).to(dev), torch.randn(2, 16, 3, 3, generator=g).to(dev)]
s = [(x.cpu() + 0.3 * torch.randn(x.shape, generator=g)).to(dev) for x in t]
a = [torch.rand(2, 8, generator=g).to(dev), torch.rand(2, 16, generator=g).to(dev)]


class Scoring(torch.nn.Module):
    def forward(self, t, s):
        return anomaly_map(t, s, (24, 24), "sum", 1.0)


class Loss(torch.nn.Module):  # the trainer's objective: channel CD + spatial KD, DCAM channel gates
    def __init__(self):
        super().__init__()
        self.loss = DistillationLoss(cos="channel", kl="spatial", lambda_kl=0.1, check_finite=False)

    def forward(self, t, s, a):
        return self.loss(t, s, a)


def reference(args):
    if target == "scoring":  # anomaly_map without its eager NaN check (it raises on NaN features)
        from dcamkd.scoring import fuse_levels, gaussian_blur

        levels = [R.anomaly_map_level(x, y).float() for x, y in zip(*args)]
        return gaussian_blur(fuse_levels(levels, (24, 24), "sum"), 1.0)
    with ops.use("reference"):
        return model(*args)


def with_value(xs, value):
    out = [x.detach().clone() for x in xs]
    out[0][1, 2, 0, 3] = value
    return out


model = Loss() if target == "loss" else Scoring()
args = (t, [x.requires_grad_() for x in s], a) if target == "loss" else (t, s)
with ops.use(impl):
    if kind == "compile":
        run = torch.compile(model, fullgraph=True)
        out = run(*args)  # the first dcamkd call of this process
        if target == "loss":
            grads = torch.autograd.grad(out, args[1])
    else:
        ep = torch.export.export(model, args)
        nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
        names = {str(n.target) for n in nodes}
        flat = []
        for n in nodes:
            torch.fx.node.map_aggregate((n.args, n.kwargs), flat.append)
        strings = {x for x in flat if isinstance(x, str)}
        assert not strings & set(IMPLS) and "backend" not in strings, strings
        op = "pyramid_loss" if target == "loss" else "anomaly_map"
        ours = {x for x in names if x.startswith("dcamkd.")}
        want = {"reference": set(), "triton": {f"dcamkd.{op}_triton.default"}}.get(impl, {f"dcamkd.{op}.default"})
        assert ours == want, (ours, want)
        run = ep.module()
        out = run(*args)
        if target == "loss":
            grads = torch.autograd.grad(out, args[1])
ref = reference(args)
torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
if target == "loss":
    want = torch.autograd.grad(ref, args[1])
    for x, y in zip(grads, want):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
for value in (float("nan"), float("inf")):
    for which in (0, 1):  # teacher, student
        bad = list(args)
        bad[which] = with_value(args[which], value)
        with ops.use(impl):
            got = run(*bad)
        want = reference(bad)
        assert not torch.isfinite(want).all()
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), (value, which, got, want)
print("OK", impl, kind, target)
'''


def _params():
    skip_cxx = pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
    skip_gpu = pytest.mark.skipif(not GPU, reason="no GPU")
    skip_triton = pytest.mark.skipif(not HAVE_TRITON or (not GPU and not INTERPRETER), reason="no triton")
    skip_cuda = pytest.mark.skipif(not GPU or not _build.toolkit_available(), reason="no GPU or nvcc")
    out = []
    for target in ("loss", "scoring"):
        for kind in ("compile", "export"):
            out.append(pytest.param("reference", kind, target, id=f"reference-{kind}-{target}"))
            out.append(pytest.param("cpp", kind, target, id=f"cpp-{kind}-{target}", marks=skip_cxx))
            marks = [skip_triton] + ([skip_gpu] if kind == "compile" else [])
            out.append(pytest.param("triton", kind, target, id=f"triton-{kind}-{target}", marks=marks))
            out.append(pytest.param("cuda", kind, target, id=f"cuda-{kind}-{target}", marks=skip_cuda))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("impl,kind,target", _params())
def test_fresh_process(impl, kind, target):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env[ops._impl.STRICT_ENV_VAR] = "1"
    env.pop(ops.ENV_VAR, None)
    r = subprocess.run([sys.executable, "-c", SCRIPT, impl, kind, target], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert f"OK {impl} {kind} {target}" in r.stdout
