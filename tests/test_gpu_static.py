"""Static GPU check: the launch registry, the ``ptxas`` report parser and the block-size rule
(fast), and the compile of every enumerated Triton kernel variant for sm_80 and sm_90 through
the real compiler, without a GPU (slow; ``benchmarks/gpu_static.py --quick``).

The registry and the compile run in fresh processes without ``TRITON_INTERPRET``: this suite sets
it (``tests/opimpls.py``), and kernels imported under the interpreter cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import opimpls  # noqa: F401  (first: sets TRITON_INTERPRET=1 before any kernel module is imported in-process)
import pytest

from dcamkd.kernels._common import fill_block

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _py(code: str, timeout: int = 600) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                       cwd=ROOT, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _triton_compiles() -> bool:
    try:
        from dcamkd.kernels.static import triton_available
    except Exception:
        return False
    return triton_available()


def test_parse_ptxas_report():
    from dcamkd.kernels.static import parse_ptxas

    log = """ptxas info    : 28 bytes gmem
ptxas info    : Compiling entry function '_k1' for 'sm_90'
ptxas info    : Function properties for _k1
    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 512 bytes smem
ptxas info    : Compiling entry function '_k2' for 'sm_80'
ptxas info    : Function properties for _k2
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers
"""
    got = parse_ptxas(log)
    assert got == {
        "_k1": dict(regs=255, spill_stores=12, spill_loads=8, stack=16, smem=512, arch="sm_90"),
        "_k2": dict(regs=32, spill_stores=0, spill_loads=0, stack=0, smem=0, arch="sm_80"),
    }


def test_fill_block_halves_until_the_gpu_is_filled():
    # interpreter / CPU: the default, capped at the next power of two
    assert fill_block(4096, 8, 128, None, 16) == 128
    assert fill_block(100, 8, 128, None, 16) == 128
    assert fill_block(20, 8, 128, None, 16) == 32
    # 132 SMs: 256 locations x 8 images: 128 -> 16 programs ... 16 -> 128 (floor reached)
    assert fill_block(256, 8, 128, 132, 16) == 16
    # batch 32: 32-location blocks give 8 * 32 = 256 programs; 64 would give 128 < 132
    assert fill_block(256, 32, 128, 132, 16) == 32
    assert fill_block(4096, 8, 128, 132, 16) == 128  # 32 * 8 = 256 programs already
    assert fill_block(64, 1, 16, 132, 1) == 1        # channel pooling of 64 rows: one row each


@pytest.mark.skipif(not _triton_compiles(), reason="triton with its NVIDIA backend is not installed")
def test_registry_enumerates_every_kernel_mode_and_backbone():
    out = _py("""
import json
from dcamkd.kernels import registry as r, pyramid_loss as pl
from dcamkd.objective import COS_MODES, KL_MODES, KD_REDUCTIONS
L = r.record(shapes={k: r.SHAPES[k] for k in list(r.SHAPES)[:1] + ['odd1']})
grid = r.mode_grid(pl.pyramid_loss)
print(json.dumps(dict(
    kernels=sorted(r.jit_kernels()), launched=sorted({l.kernel for l in L}),
    modes=grid, cos=list(COS_MODES), kl=list(KL_MODES), red=list(KD_REDUCTIONS),
    shapes=list(r.SHAPES), cases=sorted({l.case.split('/', 3)[3] for l in L}),
    phases=sorted({l.phase for l in L}),
    dtypes=sorted({l.case.split('/')[1] for l in L}), layouts=sorted({l.case.split('/')[2] for l in L}),
    units=len(r.signatures(L)))))
""")
    d = json.loads(out.strip().splitlines()[-1])
    assert d["kernels"] and d["launched"] == d["kernels"]  # every @triton.jit kernel is launched
    # every value of every mode constant appears; the only combination left out is cos=kl=none
    for name, vals in (("cos", d["cos"]), ("kl", d["kl"]), ("kd_reduction", d["red"])):
        assert {m[name] for m in d["modes"]} == set(vals)
    combos = {(m["cos"], m["kl"], m["kd_reduction"]) for m in d["modes"]}
    assert len(combos) == (len(d["cos"]) * len(d["kl"]) - 1) * len(d["red"])
    assert not any(m["cos"] == "none" and m["kl"] == "none" for m in d["modes"])
    from dcamkd.backbones import BACKBONES
    from dcamkd.objective import DCAM_VARIANTS
    for b in ("resnet18", "wide_resnet50_2", "tf_efficientnet_lite0"):
        for n in (1, 8, 32):
            assert f"{b}-b{n}" in d["shapes"]
    assert len(BACKBONES) >= 3
    for v in DCAM_VARIANTS:
        assert any(c.endswith(f"gates={v}]") and c.startswith("pyramid_loss[") for c in d["cases"]), v
    assert d["phases"] == ["backward", "backward+teacher", "forward"]
    assert d["dtypes"] == ["bfloat16", "float32"] and d["layouts"] == ["channels_last", "nchw"]


@pytest.mark.skipif(not _triton_compiles(), reason="triton with its NVIDIA backend is not installed")
def test_registry_names_an_unknown_host_argument():
    out = _py("""
from dcamkd.kernels import registry as r
def host(teachers, progress):
    pass
try:
    r._call(host, dict(teachers=[]), {})
except r.RegistryError as e:
    print('ERR', e)
""")
    assert "ERR" in out and "'progress'" in out


@pytest.mark.slow
@pytest.mark.skipif(not _triton_compiles(), reason="triton with its NVIDIA backend (ptxas) is not installed")
def test_every_triton_variant_compiles_for_sm80_and_sm90_and_hot_kernels_do_not_spill(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_static.py"), "--quick", "--no-cuda",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=_env(), cwd=ROOT,
                       timeout=1800)
    assert (tmp_path / "gpu_static.json").is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads((tmp_path / "gpu_static.json").read_text())
    assert d["errors"] == [], "\n".join(d["errors"])[:5000]
    assert r.returncode == 0, r.stderr[-3000:]
    archs = {s["arch"] for s in d["summary"]}
    assert archs == {80, 90}
    kernels = {s["kernel"] for s in d["summary"]}
    assert {"pyramid_loss._stats_kernel", "pyramid_loss._grad_kernel", "attention._cpool_fwd",
            "anomaly_map._amap_kernel"} <= kernels
    spills = [(c["kernel"], c["arch"], c["case"], c["spill_stores"]) for c in d["compiled"]
              if c["hot"] and c["spill_stores"]]
    assert spills == []
    assert all(c["regs"] and c["regs"] <= 255 for c in d["compiled"])
