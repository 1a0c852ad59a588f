"""The builder of the C++ kernels (dcamkd/_build.py): sources found in a non-editable install, the
one-line notice of the first build (and silence once cached), the cache key, clear BuildErrors.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dcamkd import _build
from dcamkd.errors import BuildError

ROOT = Path(__file__).resolve().parents[1]
HAVE_CXX = shutil.which("g++") is not None or shutil.which("c++") is not None
NOTICE = "dcamkd: building the C++ CPU kernels (first use, about"

def _source_copy(tmp_path: Path) -> Path:
    """A copy of the checkout to install from (pip's build writes build/ and *.egg-info there)."""
    dst = tmp_path / "src"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                             "results", ".pytest_cache", ".hypothesis"))
    return dst


RUN_ONE_OP = r"""
import sys, torch
import dcamkd, dcamkd.ops as ops
from dcamkd import _build, reference as R
print("FILE", dcamkd.__file__)
print("CSRC", _build.csrc_dir())
t, s = torch.randn(2, 5, 4, 3), torch.randn(2, 5, 4, 3)
with ops.use("cpp"):
    got = ops.anomaly_map_level(t, s)
torch.testing.assert_close(got, R.anomaly_map_level(t, s))
assert torch._C._dispatch_has_kernel_for_dispatch_key("dcamkd::anomaly_map", "CPU")
print("OK")
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
def test_non_editable_install_builds_from_its_own_sources(tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                        "--target", str(target), str(_source_copy(tmp_path))], capture_output=True, text=True,
                       timeout=900, env=dict(os.environ, DCAMKD_BUILD_EXT="0"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert (target / "dcamkd" / "csrc" / "cpu" / "pyramid_loss.cpp").is_file()
    assert (target / "dcamkd" / "csrc" / "cuda" / "pyramid_loss.cu").is_file()
    work = tmp_path / "elsewhere"  # not the checkout: the installed copy must be the one imported
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), DCAMKD_CACHE_DIR=str(tmp_path / "cache"))
    runs = [subprocess.run([sys.executable, "-c", RUN_ONE_OP], cwd=work, env=env, capture_output=True, text=True,
                           timeout=1800) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
        assert f"FILE {target / 'dcamkd' / '__init__.py'}" in r.stdout
        assert f"CSRC {target / 'dcamkd' / 'csrc'}" in r.stdout
    # one line on the first build, naming the cache; nothing once cached
    first = [line for line in runs[0].stderr.splitlines() if line.startswith(NOTICE)]
    assert len(first) == 1 and str(tmp_path / "cache") in first[0], runs[0].stderr[-2000:]
    assert NOTICE not in runs[1].stderr


def test_sources_and_cache_key(monkeypatch):
    assert {p.name for p in _build.sources("cpu")} >= {"pyramid_loss.cpp", "attention.cpp", "anomaly_map.cpp"}
    assert all(p.suffix == ".cu" for p in _build.sources("cuda"))
    d = _build.build_dir("cpu")
    assert d.parent == _build.cache_dir() and d.name.startswith("cpu-")
    monkeypatch.setenv("DCAMKD_NATIVE", "0")
    assert "-march=native" not in _build.cflags("cpu")
    assert _build.build_dir("cpu") != d  # other flags, other folder
    monkeypatch.setenv("DCAMKD_CACHE_DIR", "/tmp/elsewhere")
    assert _build.build_dir("cpu").parent == Path("/tmp/elsewhere")
    with pytest.raises(ValueError, match="kind"):
        _build.sources("gpu")


def _fresh(monkeypatch, tmp_path):
    monkeypatch.setattr(_build, "_LOADED", {})
    monkeypatch.setattr(_build, "_FAILED", {})
    monkeypatch.setattr(_build, "_aot_library", lambda kind: None)
    monkeypatch.setenv("DCAMKD_CACHE_DIR", str(tmp_path / "cache"))


def test_no_compiler_is_a_clear_error_remembered(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(_build.shutil, "which", lambda name: None)
    with pytest.raises(BuildError, match="no C\\+\\+ compiler found.*DCAMKD_IMPL=reference"):
        _build.load("cpu")
    monkeypatch.setattr(_build.shutil, "which", shutil.which)
    with pytest.raises(BuildError, match="no C\\+\\+ compiler"):  # one attempt per process
        _build.load("cpu")


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
def test_compile_error_names_the_file(monkeypatch, tmp_path, capsys):
    _fresh(monkeypatch, tmp_path)
    src = tmp_path / "csrc"
    (src / "cpu").mkdir(parents=True)
    (src / "cpu" / "broken.cpp").write_text("int main( { return 0; }\n")
    monkeypatch.setattr(_build, "csrc_dir", lambda: src)
    with pytest.raises(BuildError) as e:
        _build.load("cpu")
    msg = str(e.value)
    assert msg.startswith("building the dcamkd C++ CPU kernels in") and "broken.cpp" in msg
    assert NOTICE in capsys.readouterr().err


def test_no_cuda_toolkit_is_a_clear_error(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    monkeypatch.setattr(_build, "toolkit_available", lambda: False)
    with pytest.raises(BuildError, match="no CUDA toolkit.*DCAMKD_IMPL=triton"):
        _build.load("cuda")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
def test_ahead_of_time_build_is_loaded_without_a_jit_build(tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                        "--target", str(target), str(_source_copy(tmp_path))], capture_output=True, text=True,
                       timeout=1800, env=dict(os.environ, DCAMKD_BUILD_EXT="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert list((target / "dcamkd").glob("_C*.so"))
    work = tmp_path / "elsewhere"
    work.mkdir()
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(target), DCAMKD_CACHE_DIR=str(cache))
    r = subprocess.run([sys.executable, "-c", RUN_ONE_OP + "print('LIB', _build.load('cpu'))"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
    assert f"LIB {target / 'dcamkd'}" in r.stdout and NOTICE not in r.stderr
    assert not cache.exists()  # nothing was built
