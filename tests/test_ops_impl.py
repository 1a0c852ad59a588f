"""The implementation setting of the fused ops (``dcamkd.ops.use`` / ``DCAMKD_IMPL``): precedence,
validation, what each value resolves to per device, the fallback and strict modes, the C++ kernels
registered with the dispatcher where a compiler exists, and what importing ``dcamkd.ops`` does not
do (build, import triton or torch._dynamo).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from opimpls import HAVE_CXX, HAVE_TRITON, INTERPRETER

import dcamkd.ops as ops
from dcamkd import _build
from dcamkd import reference as R
from dcamkd.errors import BuildError, InvalidArgumentError, ShapeMismatchError
from dcamkd.ops import _impl

ROOT = Path(__file__).resolve().parents[1]
OPS = ["pyramid_loss", "pyramid_loss_backward", "channel_pool", "channel_pool_backward", "spatial_pool",
       "spatial_pool_backward", "apply_gates", "apply_gates_backward", "anomaly_map"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    monkeypatch.delenv(_impl.STRICT_ENV_VAR, raising=False)


def test_precedence_use_over_environment_over_default(monkeypatch):
    assert ops.IMPLS == ("fused", "reference", "cpp", "triton", "cuda") and ops.DEFAULT_IMPL == "fused"
    assert ops.current() == "fused"
    monkeypatch.setenv(ops.ENV_VAR, "reference")
    assert ops.current() == "reference" and ops.resolve("cpu") == "reference"
    with ops.use("cpp"):
        assert ops.current() == "cpp"
        with ops.use(None):  # None leaves the setting as it is
            assert ops.current() == "cpp"
        with ops.use("triton"):
            assert ops.current() == "triton"
        assert ops.current() == "cpp"
    assert ops.current() == "reference"
    with pytest.raises(RuntimeError), ops.use("reference"):  # restored on errors too
        raise RuntimeError("boom")
    assert ops.current() == "reference"


def test_unknown_names_are_refused(monkeypatch):
    with pytest.raises(InvalidArgumentError, match="impl: expected one of"):
        with ops.use("gpu"):
            pass
    monkeypatch.setenv(ops.ENV_VAR, "auto")
    t = torch.randn(1, 2, 3, 3)
    with pytest.raises(InvalidArgumentError, match="DCAMKD_IMPL: expected one of"):
        ops.pyramid_terms([t], [t])


def test_each_value_per_device(monkeypatch):
    with ops.use("reference"):
        assert ops.resolve("cpu") == ops.resolve("cuda") == ops.resolve("meta") == "reference"
    with ops.use("cpp"), pytest.raises(InvalidArgumentError, match="impl 'cpp' runs on CPU tensors"):
        ops.resolve("cuda")
    with ops.use("cuda"), pytest.raises(InvalidArgumentError, match="impl 'cuda' runs on CUDA tensors"):
        ops.resolve("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ops.use("triton"), pytest.raises(InvalidArgumentError, match="TRITON_INTERPRET=1"):
        ops.resolve("cpu")
    with ops.use("fused"):
        assert ops.resolve("meta") == "reference"  # no kernels for other devices
    if HAVE_TRITON:
        with ops.use("fused"):
            assert ops.resolve("cuda") == "triton"  # the GPU default: Triton (no nvcc needed)


def test_fallback_and_strict_mode(monkeypatch):
    def no_compiler(kind="cpu"):
        raise BuildError("no C++ compiler found (test)")

    monkeypatch.setattr(_build, "load", no_compiler)
    monkeypatch.setattr(_impl, "_warned", set())
    with pytest.warns(RuntimeWarning, match="could not be built.*reference"):
        assert ops.resolve("cpu") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process
        assert ops.resolve("cpu") == "reference"
    t = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ops.anomaly_map_level(t, t.flip(0)), R.anomaly_map_level(t, t.flip(0)))
    with ops.use("cpp"), pytest.raises(BuildError, match="no C\\+\\+ compiler"):
        ops.resolve("cpu")
    monkeypatch.setenv(_impl.STRICT_ENV_VAR, "1")
    with pytest.raises(BuildError, match="DCAMKD_STRICT_BUILD=1"):
        ops.resolve("cpu")
    monkeypatch.setattr(_impl, "_have_triton", lambda: False)
    with ops.use("triton"), pytest.raises(BuildError, match="triton package is not installed"):
        ops.resolve("cuda")


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
def test_cpp_kernels_build_and_register_where_a_compiler_exists(monkeypatch):
    # strict: the suite fails here if the extension does not build
    monkeypatch.setenv(_impl.STRICT_ENV_VAR, "1")
    assert ops.resolve("cpu") == "cpp"
    assert _build.is_loaded("cpu")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dcamkd::{op}", "CPU"), op


def test_schemas_carry_no_implementation_selector():
    for op in OPS:
        schema = getattr(torch.ops.dcamkd, op).default._schema
        for arg in schema.arguments:
            assert arg.name not in ("backend", "impl", "implementation"), (op, str(schema))
        assert "backend" not in str(schema)


def test_wrapper_argument_errors():
    t = torch.randn(1, 2, 3, 3)
    with pytest.raises(InvalidArgumentError, match="cos"):
        ops.pyramid_terms([t], [t], cos="bad")
    with pytest.raises(InvalidArgumentError, match="kd_reduction"):
        ops.pyramid_terms([t], [t], kd_reduction="sum")
    with pytest.raises(InvalidArgumentError, match="tau"):
        ops.pyramid_terms([t], [t], tau=0.0)
    with pytest.raises(ShapeMismatchError, match="level 0"):
        ops.pyramid_terms([t], [t[:, :1]])
    with pytest.raises(ShapeMismatchError, match="channel_gates\\[0\\]"):
        ops.pyramid_terms([t], [t], [torch.ones(1, 3)])
    with pytest.raises(ShapeMismatchError, match="non-empty"):
        ops.pyramid_terms([], [])
    with pytest.raises(ShapeMismatchError, match="spatial_gate"):
        ops.apply_gates(t, None, torch.ones(1, 3, 4))
    with pytest.raises(ShapeMismatchError, match="equal"):
        ops.anomaly_map_level(t, t[..., :2])


def test_constant_result_mark_matches_torch():
    """Our mark (set without importing torch._dynamo) is the one torch.compiler's decorator sets."""

    def a():
        return 0

    def b():
        return 0

    code = ("import sys, dcamkd.ops._impl as I; assert 'torch._dynamo' not in sys.modules; "
            "print(sorted(vars(I._resolve)))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    marked_early = eval(r.stdout.strip().splitlines()[-1])
    assert set(vars(torch.compiler.assume_constant_result(a))) == set(vars(_impl.assume_constant_result(b)))
    assert set(marked_early) == set(vars(torch.compiler.assume_constant_result(a))) != set()


def test_import_builds_nothing_and_loads_no_compiler_stack(tmp_path):
    code = ("import sys, dcamkd.ops, dcamkd.losses, dcamkd.scoring, torch; "
            "print(sorted(m for m in ('triton', 'torch._dynamo', 'torch._inductor', 'dcamkd.kernels') "
            "if m in sys.modules)); print(hasattr(torch.ops.dcamkd, 'pyramid_loss_triton'))")
    env = dict(os.environ, PYTHONPATH=str(ROOT), DCAMKD_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["[]", "False"], r.stdout
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(not HAVE_TRITON or not INTERPRETER, reason="needs triton and the interpreter")
def test_triton_ops_are_defined_when_triton_is_chosen(tmp_path):
    code = ("import torch, dcamkd.ops as ops, dcamkd.reference as R\n"
            "before = hasattr(torch.ops.dcamkd, 'anomaly_map_triton')\n"
            "with ops.use('triton'):\n"
            "    t = torch.randn(2, 3, 4, 4); m = ops.anomaly_map_level(t, t.flip(0))\n"
            "torch.testing.assert_close(m, R.anomaly_map_level(t, t.flip(0)))\n"
            "print(before, hasattr(torch.ops.dcamkd, 'anomaly_map_triton'))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False True"


def test_training_config_carries_the_setting():
    from dcamkd.config import TrainConfig

    assert TrainConfig(impl="cpp").validate().impl == "cpp"
    with pytest.raises(InvalidArgumentError, match="impl"):
        TrainConfig(impl="cpu").validate()
    # configs saved before the setting existed carried 'backend' (auto | reference | cpu | ...)
    old = TrainConfig().to_dict()
    del old["impl"]
    for backend, impl in (("auto", None), (None, None), ("cpu", "cpp"), ("reference", "reference")):
        assert TrainConfig.from_dict(dict(old, backend=backend)).validate().impl == impl
