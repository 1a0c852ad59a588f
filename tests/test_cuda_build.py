"""The CUDA extension (csrc/cuda/*.cu): compile and link wherever nvcc exists, so a broken .cu
fails CI without a GPU; on a GPU, parity of the 'cuda' and 'triton' backends with the reference
through the public ops (benchmarks/gpu_check.sh runs this file there).

The build is cached (``$DCAMKD_CACHE_DIR`` or ``~/.cache/dcamkd``, keyed by a hash of the
sources), so CI compiles once per source version. One architecture (``TORCH_CUDA_ARCH_LIST``,
default 9.0 without a GPU), ``-O2``.
"""

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("TRITON_INTERPRET is set in this process: GPU tests need compiled Triton",
                allow_module_level=True)

from dcamkd import reference as R  # noqa: E402
from dcamkd.kernels import cuda_ext  # noqa: E402

if not os.environ.get("CUDA_HOME") and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

needs_nvcc = pytest.mark.skipif(not cuda_ext.toolkit_available(), reason="no CUDA toolkit (nvcc)")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
FUNCS = ["level_forward", "level_backward", "channel_pool", "channel_pool_backward", "spatial_pool",
         "spatial_pool_backward", "apply_gates", "apply_gates_backward", "anomaly_map"]


@pytest.fixture(scope="module")
def ext():
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    return cuda_ext.load()


@needs_nvcc
def test_cuda_extension_compiles_and_links(ext):
    for name in FUNCS:
        assert callable(getattr(ext, name)), name
    so = list(cuda_ext.build_dir().glob("*.so"))
    assert so, f"no shared object in {cuda_ext.build_dir()}"
    # the bound functions reject CPU tensors with a message naming the argument
    t = torch.randn(1, 2, 3, 3)
    with pytest.raises(RuntimeError, match="teacher must be a CUDA tensor"):
        ext.anomaly_map(t, t, 1e-8)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        ext.channel_pool(t)


def test_build_dir_is_keyed_by_sources(monkeypatch):
    d1 = cuda_ext.build_dir()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert cuda_ext.build_dir() != d1  # another arch list, another cache folder
    assert {p.name for p in cuda_ext.sources()} >= {"pyramid_loss.cu", "attention.cu", "anomaly_map.cu", "bind.cpp"}


# ----------------------------------------------------------------------------- GPU parity
BACKENDS = ["cuda", "triton"]


def _pyr(dtype, gates, seed=0, shapes=((4, 64, 32, 32), (4, 128, 16, 16), (4, 37, 5, 7))):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ts = [torch.randn(s, generator=g, device="cuda", dtype=dtype).requires_grad_() for s in shapes]
    ss = [torch.randn(s, generator=g, device="cuda", dtype=dtype).requires_grad_() for s in shapes]
    acc = R.acc_dtype(dtype)
    cg = [torch.rand(s[0], s[1], generator=g, device="cuda", dtype=acc).requires_grad_()
          if gates in ("channel", "cbam") else None for s in shapes]
    sg = [torch.rand(s[0], s[2], s[3], generator=g, device="cuda", dtype=acc).requires_grad_()
          if gates in ("spatial", "cbam") else None for s in shapes]
    return ts, ss, cg, sg


@needs_gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cos,kl", [("channel", "spatial"), ("spatial", "channel"), ("channel", "none"),
                                    ("none", "spatial")])
@pytest.mark.parametrize("gates", ["none", "channel", "cbam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_pyramid_loss_parity(backend, cos, kl, gates, dtype):
    from dcamkd import ops

    ts, ss, cg, sg = _pyr(dtype, gates)
    out = ops.pyramid_terms(ts, ss, cg, sg, cos, kl, 0.9, "sum_c", backend=backend)
    assert ops.last_backend("pyramid_loss") == backend
    ref = R.pyramid_terms(ts, ss, cg, sg, cos, kl, 0.9, "sum_c")
    tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out, ref, **tol)
    go = torch.randn_like(ref)
    ins = [x for x in ts + ss + cg + sg if x is not None]
    g1 = torch.autograd.grad(out, ins, go, allow_unused=True)
    g2 = torch.autograd.grad(ref, ins, go, allow_unused=True)
    gtol = dict(atol=1e-9, rtol=1e-7) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-3)
    for a, b in zip(g1, g2):
        if b is None:
            continue
        torch.testing.assert_close(a.to(b.dtype), b, **gtol)


@needs_gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_bf16_channels_last_and_auto(backend):
    from dcamkd import ops

    ts, ss, cg, sg = _pyr(torch.bfloat16, "channel", seed=1)
    ts = [t.detach().to(memory_format=torch.channels_last) for t in ts]
    ss = [s.detach().to(memory_format=torch.channels_last).requires_grad_() for s in ss]
    out = ops.pyramid_terms(ts, ss, cg, sg, backend=backend)
    ref = R.pyramid_terms(ts, ss, cg, sg)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    g1 = torch.autograd.grad(out.sum(), ss)
    g2 = torch.autograd.grad(ref.sum(), ss)
    for a, b in zip(g1, g2):
        assert a.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=5e-2)
    auto = ops.pyramid_terms(ts, ss, cg, sg, backend="auto")
    assert ops.last_backend("pyramid_loss") in ("cuda", "triton")
    torch.testing.assert_close(auto, out, atol=1e-2, rtol=1e-2)


@needs_gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_attention_and_anomaly_map(backend):
    from dcamkd import ops

    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(3, 33, 9, 13, generator=g, device="cuda", dtype=torch.float64, requires_grad=True)
    a = torch.rand(3, 33, generator=g, device="cuda", dtype=torch.float64, requires_grad=True)
    m = torch.rand(3, 9, 13, generator=g, device="cuda", dtype=torch.float64, requires_grad=True)
    pairs = [(ops.channel_pool(x, backend=backend), R.channel_pool(x)),
             (ops.spatial_pool(x, a, backend=backend), R.spatial_pool(x, a)),
             ((ops.apply_gates(x, a, m, backend=backend),), (R.apply_gates(x, a, m),))]
    for got, ref in pairs:
        for u, v in zip(got, ref):
            torch.testing.assert_close(u, v)
        gos = [torch.randn_like(v) for v in ref]
        g1 = torch.autograd.grad(got, (x, a, m), gos, allow_unused=True)
        g2 = torch.autograd.grad(ref, (x, a, m), gos, allow_unused=True)
        for u, v in zip(g1, g2):
            if v is not None:
                torch.testing.assert_close(u, v)
    t = torch.randn(2, 64, 16, 16, device="cuda")
    s = torch.randn(2, 64, 16, 16, device="cuda")
    t[0, :, 0, 0] = 0
    torch.testing.assert_close(ops.anomaly_map_level(t, s, backend=backend), R.anomaly_map_level(t, s),
                               atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- device check script
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_syntax():
    import subprocess

    script = ROOT / "benchmarks" / "gpu_check.sh"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    assert "set -euo pipefail" in text and "timeout" in text and "gpu_bench.py" in text


def test_gpu_bench_dry_run_cpu(tmp_path, monkeypatch):
    """The timing script's every stage on tiny CPU shapes; the table and JSON are written."""
    import importlib.util
    import json

    monkeypatch.setenv("DCAMKD_BACKEND", "reference")
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rec = mod.main(["--device", "cpu", "--dry-run", "--out", str(tmp_path), "--providers", "eager",
                    "--budget-s", "120"])
    stages = {r["stage"] for r in rec.rows}
    assert stages == {"copy", "loss", "attention", "anomaly_map", "train", "infer"}
    copy = [r for r in rec.rows if r["stage"] == "copy"][0]
    assert copy["gbps"] > 0 and copy["median_ms"] > 0
    loss = [r for r in rec.rows if r["stage"] == "loss"]
    assert {(r["dtype"], r["mode"]) for r in loss} == {(d, m) for d in ("float32", "bfloat16")
                                                        for m in ("fwd", "fwd+bwd")}
    assert all(r["median_ms"] > 0 for r in loss)
    train = [r for r in rec.rows if r["stage"] == "train"]
    assert {r["provider"] for r in train} == {"eager", "fused"} and all(r["images_per_s"] > 0 for r in train)
    infer = [r for r in rec.rows if r["stage"] == "infer" and "ratio" in r]
    assert len(infer) == 2 and all(r["ratio"] > 0 for r in infer)
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert len(data["rows"]) == len(rec.rows) and data["meta"]["device_name"] == "cpu"
    md = (tmp_path / "gpu_bench.md").read_text()
    assert md.count("\n|") == len(rec.rows) + 2 and "| stage |" in md
