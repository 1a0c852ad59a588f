"""Static GPU table: registers, spills, shared memory and SM fill of every kernel, without a GPU.

Compiles, for sm_80 and sm_90, every Triton kernel variant the host functions launch
(:mod:`dcamkd.kernels.registry`: the backbones' pyramids at batch 1, 8, 32 and odd shapes x every
reachable mode x gates x float32/bfloat16 x NCHW/channels_last x forward/backward/teacher
gradient; the compile set of :func:`~dcamkd.kernels.registry.compile_set`) through the real Triton
compiler and ``ptxas`` (:mod:`dcamkd.kernels.static`), and every ``csrc/cuda/*.cu`` with
``nvcc -Xptxas -v``. Prints and writes (``--out``):

* per kernel and architecture: variants compiled, compile errors, registers per thread (max and
  min), spill stores (bytes), shared memory (bytes), warps;
* per launch at the backbones' pyramids: programs per launch against the target's SMs (a launch
  with fewer programs than SMs cannot fill the GPU and is flagged);
* per op: bytes moved (each distinct tensor argument of its launches once: a floor) and the
  roofline time at the target's memory bandwidth.

Target: NVIDIA H200 SXM, 132 SMs, 4.8 TB/s HBM3e (NVIDIA H200 Tensor Core GPU datasheet).
Results are cached (``~/.cache/dcamkd/static``); a warm run only reads the cache.

    python benchmarks/gpu_static.py --out docs/gpu_static      # gpu_static.md / gpu_static.json

Exit status: 1 when a variant fails to compile (or, with ``--strict``, a hot variant spills).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("TRITON_INTERPRET", None)  # the static check compiles; it never interprets

from dcamkd import _build  # noqa: E402
from dcamkd.io import atomic_write_text  # noqa: E402
from dcamkd.objective import DEFAULT_PRESET, PRESETS, Objective  # noqa: E402

#: Memory bandwidth of the target (bytes/s): NVIDIA H200 SXM, 4.8 TB/s (NVIDIA H200 datasheet).
TARGET_BANDWIDTH = 4.8e12
TARGET_NAME = "NVIDIA H200 SXM (132 SMs, 4.8 TB/s; NVIDIA H200 datasheet)"


def _short(kernel: str) -> str:
    return kernel.replace("dcamkd.kernels.", "")


def _case_op(case: str) -> str:
    """``pyramid/dtype/layout/op[...]`` -> ``op[...]``."""
    return case.split("/", 3)[3] if case.count("/") >= 3 else case


def hot_cases(registry, pl) -> set[str]:
    """The op cases of the presets (their objective and DCAM variant) and the anomaly map: the
    kernels every training and inference run executes."""
    grid = registry.mode_grid(pl.pyramid_loss)
    names = list(grid[0]) if grid else []
    out = {"anomaly_map"}
    for p in PRESETS.values():
        modes = {n: getattr(p.objective, n) if hasattr(p.objective, n) else registry.mode_values(n)[0]
                 for n in names}
        tag = ",".join(f"{k}={v}" for k, v in modes.items())
        out.add(f"pyramid_loss[{tag},gates={p.dcam}]")
        if p.dcam != "none":
            out.add(f"attention[gates={p.dcam}]")
    return out


def _is_hot(ln, hot: set[str]) -> bool:
    return _case_op(ln.case) in hot and ln.phase != "backward+teacher"


def run_triton(args, registry, static) -> dict:
    from dcamkd.kernels import pyramid_loss as pl

    t0 = time.perf_counter()
    equivalent: dict = {}
    launches = registry.record(equivalent=equivalent)
    t_rec = time.perf_counter() - t0
    units = registry.signatures(launches)
    hot = hot_cases(registry, pl)
    chosen = registry.compile_set(units, hot=lambda ln: _is_hot(ln, hot), quick=args.quick)
    if args.hot_only:
        chosen = {k: v for k, v in chosen.items() if any(_is_hot(ln, hot) for ln in v)}
    kernels = registry.jit_kernels()
    print(f"recorded {len(launches)} launches in {t_rec:.0f}s: {len(units)} compile signatures, "
          f"{len(chosen)} compiled per architecture", flush=True)
    results = []
    n = 0
    for arch in args.archs:
        for key, lns in chosen.items():
            ln = lns[0]
            res = static.compile_triton(kernels[ln.kernel], ln, arch, use_cache=not args.no_cache)
            n += 1
            if not res["ok"]:
                print(f"COMPILE ERROR sm_{arch} {_short(ln.kernel)} {ln.case} {dict(ln.constexprs)}:\n"
                      f"{res['error']}", flush=True)
            if n % 100 == 0:
                print(f"  {n}/{len(chosen) * len(args.archs)} compiled ({time.perf_counter() - t0:.0f}s)",
                      flush=True)
            results.append(dict(kernel=_short(ln.kernel), arch=arch, case=ln.case,
                                constexprs=dict(ln.constexprs), hot=any(_is_hot(x, hot) for x in lns),
                                launches=len(lns), **{k: res[k] for k in ("ok", "error", "regs",
                                "spill_stores", "spill_loads", "stack", "smem", "num_warps", "cached")}))
    return dict(launches=launches, units=len(units), compiled=results, hot=sorted(hot),
                equivalent={"/".join(k): v for k, v in equivalent.items()},
                record_s=round(t_rec, 1), seconds=round(time.perf_counter() - t0, 1))


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def run_cuda(args, static) -> dict:
    t0 = time.perf_counter()
    rows, errors = [], []
    if static.nvcc_path() is None:
        return dict(rows=rows, errors=["nvcc not found: CUDA kernels not compiled"], seconds=0.0)
    for src in _build.sources("cuda"):
        for arch in args.archs:
            res = static.compile_cuda(src, arch, use_cache=not args.no_cache)
            print(f"nvcc {src.name} sm_{arch}: {'ok' if res['ok'] else 'FAILED'} "
                  f"({res['seconds']:.0f}s{', cached' if res['cached'] else ''})", flush=True)
            if not res["ok"]:
                errors.append(f"{src.name} sm_{arch}: {res['error']}")
            names = _demangle(list(res["kernels"]))
            for mangled, r in res["kernels"].items():
                name = re.sub(r"\(.*$", "", names[mangled]).replace("dcamkd_cuda::", "")
                name = name.replace("c10::", "").replace("void ", "")
                rows.append(dict(file=src.name, kernel=name, arch=arch, **{k: r[k] for k in (
                    "regs", "spill_stores", "spill_loads", "stack", "smem")}))
    return dict(rows=rows, errors=errors, seconds=round(time.perf_counter() - t0, 1))


def _level_tag(ln) -> str:
    return ln.case.split("/")[0]


def fill_rows(launches, registry, sms: int) -> list[dict]:
    """Per kernel and backbone pyramid (float32, NCHW, the hot cases): programs of each level's
    launch, the smallest, and whether it fills ``sms`` multiprocessors."""
    rows: dict[tuple, dict] = {}
    for ln in launches:
        shape, dtype, layout = ln.case.split("/")[:3]
        if shape.startswith("odd") or (dtype, layout) != ("float32", "nchw"):
            continue
        key = (_short(ln.kernel), shape, ln.phase)
        r = rows.setdefault(key, dict(kernel=key[0], pyramid=shape, phase=ln.phase, programs=[],
                                      blocks={}))
        g = ln.programs
        if g not in r["programs"]:
            r["programs"].append(g)
        r["blocks"] = {k: v for k, v in ln.constexprs if k in ("BC", "BP", "BR")}
    out = []
    for r in rows.values():
        r["min_programs"] = min(r["programs"])
        r["fills"] = r["min_programs"] >= sms
        out.append(r)
    return out


def roofline_rows(launches, hot: set[str]) -> list[dict]:
    """Per hot op case, backbone pyramid, dtype and phase: bytes of its launches (distinct tensor
    arguments once) and the time at :data:`TARGET_BANDWIDTH` (NCHW; channels_last moves the same)."""
    agg: dict[tuple, dict] = {}
    for ln in launches:
        shape, dtype, layout = ln.case.split("/")[:3]
        op = _case_op(ln.case)
        if shape.startswith("odd") or layout != "nchw" or op not in hot:
            continue
        key = (op, shape, dtype, ln.phase)
        r = agg.setdefault(key, dict(op=op, pyramid=shape, dtype=dtype, phase=ln.phase, bytes=0,
                                     launches=0))
        r["bytes"] += ln.nbytes
        r["launches"] += 1
    for r in agg.values():
        r["roofline_us"] = round(r["bytes"] / TARGET_BANDWIDTH * 1e6, 2)
    return list(agg.values())


def summarise(tri: dict) -> list[dict]:
    out: dict[tuple, dict] = {}
    for r in tri["compiled"]:
        k = (r["kernel"], r["arch"])
        s = out.setdefault(k, dict(kernel=r["kernel"], arch=r["arch"], compiled=0, errors=0, regs_max=0,
                                   regs_min=10**9, spill_max=0, hot_spill_max=0, smem_max=0, warps=set()))
        s["compiled"] += 1
        if not r["ok"]:
            s["errors"] += 1
            continue
        s["regs_max"] = max(s["regs_max"], r["regs"])
        s["regs_min"] = min(s["regs_min"], r["regs"])
        s["spill_max"] = max(s["spill_max"], r["spill_stores"])
        if r["hot"]:
            s["hot_spill_max"] = max(s["hot_spill_max"], r["spill_stores"])
        s["smem_max"] = max(s["smem_max"], r["smem"])
        s["warps"].add(r["num_warps"])
    for s in out.values():
        s["warps"] = sorted(s["warps"])
        if s["regs_min"] == 10**9:
            s["regs_min"] = 0
    return sorted(out.values(), key=lambda s: (s["kernel"], s["arch"]))


def markdown(meta, summary, cuda, fills, roof, errors, sms) -> str:
    L = [f"Target: {TARGET_NAME}. Triton {meta['triton']}, torch {meta['torch']}, nvcc "
         f"{meta['nvcc']}. Compiled without a GPU; registers and spills from `ptxas -v`.", "",
         f"Triton: {meta['launches']} launches recorded, {meta['units']} compile signatures, "
         f"{meta['compiled']} compiled per architecture{' (quick set)' if meta['quick'] else ''}, "
         f"{meta['errors']} compile errors. Wall time: recording {meta['record_s']}s, Triton "
         f"(recording + compile, cache {'warm' if meta['cached'] else 'cold'}) {meta['triton_s']}s, "
         f"CUDA {meta['cuda_s']}s.", "",
         "### Triton kernels", "",
         "| kernel | arch | variants | errors | regs/thread max (min) | spill stores max, all / hot (B) "
         "| smem max (B) | warps |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        L.append(f"| {s['kernel']} | sm_{s['arch']} | {s['compiled']} | {s['errors']} | {s['regs_max']} "
                 f"({s['regs_min']}) | {s['spill_max']} / {s['hot_spill_max']} | {s['smem_max']} | "
                 f"{','.join(map(str, s['warps']))} |")
    L += ["", "### CUDA kernels (`nvcc -Xptxas -v`, every template instantiation)", "",
          "| file | kernel | arch | regs/thread | spill stores (B) | stack (B) | smem (B) |",
          "|---|---|---|---|---|---|---|"]
    for r in cuda["rows"]:
        L.append(f"| {r['file']} | {r['kernel']} | sm_{r['arch']} | {r['regs']} | {r['spill_stores']} | "
                 f"{r['stack']} | {r['smem']} |")
    L += ["", f"### Programs per launch against {sms} SMs (float32, NCHW; per pyramid level)", "",
          "| kernel | pyramid | phase | blocks | programs per level | fills the GPU |",
          "|---|---|---|---|---|---|"]
    for r in sorted(fills, key=lambda r: (r["kernel"], r["pyramid"], r["phase"])):
        blocks = ",".join(f"{k}={v}" for k, v in r["blocks"].items())
        L.append(f"| {r['kernel']} | {r['pyramid']} | {r['phase']} | {blocks} | "
                 f"{', '.join(map(str, r['programs']))} | {'yes' if r['fills'] else '**no**'} |")
    L += ["", f"### Roofline at {TARGET_BANDWIDTH / 1e12:.1f} TB/s (hot ops, NCHW; bytes = each distinct "
          "tensor argument once)", "",
          "| op | pyramid | dtype | phase | launches | MB | roofline (us) |", "|---|---|---|---|---|---|---|"]
    for r in sorted(roof, key=lambda r: (r["op"], r["pyramid"], r["dtype"], r["phase"])):
        L.append(f"| {r['op']} | {r['pyramid']} | {r['dtype']} | {r['phase']} | {r['launches']} | "
                 f"{r['bytes'] / 1e6:.1f} | {r['roofline_us']} |")
    if errors:
        L += ["", "### Compile errors", ""] + [f"- {e}" for e in errors]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="folder for gpu_static.md / gpu_static.json")
    ap.add_argument("--archs", type=int, nargs="+", default=None, help="compute capabilities (80 90)")
    ap.add_argument("--no-cuda", action="store_true", help="skip the nvcc compile of csrc/cuda")
    ap.add_argument("--no-cache", action="store_true", help="compile again (and refresh the cache)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a hot variant spills")
    ap.add_argument("--quick", action="store_true",
                    help="the CI compile set: every mode in the first dtype and layout, hot and heaviest "
                         "variants in the others (registry.compile_set)")
    ap.add_argument("--hot-only", action="store_true",
                    help="compile only the variants of the presets' ops (a quick check of a Triton version)")
    args = ap.parse_args(argv)
    from dcamkd.kernels import registry, static

    args.archs = args.archs or list(static.ARCHS)
    if not static.triton_available():
        print("triton with its NVIDIA backend is not available: nothing to compile", file=sys.stderr)
        return 2
    import torch
    import triton

    t0 = time.perf_counter()
    tri = run_triton(args, registry, static)
    cuda = dict(rows=[], errors=["skipped (--no-cuda)"], seconds=0.0) if args.no_cuda else run_cuda(args, static)
    errors = [f"sm_{r['arch']} {r['kernel']} {r['case']} {r['constexprs']}: {r['error']}"
              for r in tri["compiled"] if not r["ok"]] + [e for e in cuda["errors"] if "skipped" not in e]
    nvcc = static.nvcc_path()
    nvcc_ver = (re.findall(r"release ([\d.]+)", subprocess.run([nvcc, "--version"], capture_output=True,
                text=True).stdout) or ["?"])[0] if nvcc else "none"
    summary = summarise(tri)
    fills = fill_rows(tri["launches"], registry, registry.TARGET_SMS)
    hot = set(tri["hot"])
    roof = roofline_rows(tri["launches"], hot)
    meta = dict(target=TARGET_NAME, sms=registry.TARGET_SMS, bandwidth=TARGET_BANDWIDTH,
                triton=triton.__version__, torch=torch.__version__, nvcc=nvcc_ver, archs=args.archs,
                launches=len(tri["launches"]), units=tri["units"], quick=args.quick or args.hot_only,
                compiled=len(tri["compiled"]) // max(len(args.archs), 1),
                errors=len(errors), record_s=tri["record_s"], triton_s=tri["seconds"], cuda_s=cuda["seconds"],
                seconds=round(time.perf_counter() - t0, 1), hot=sorted(hot), equivalent=tri["equivalent"],
                cached=bool(tri["compiled"]) and all(r["cached"] for r in tri["compiled"]),
                default_preset=DEFAULT_PRESET, default_objective=Objective().to_dict())
    md = markdown(meta, summary, cuda, fills, roof, errors, registry.TARGET_SMS)
    print(md)
    hot_spills = [s for s in summary if s["hot_spill_max"] > 0]
    print(f"{meta['compiled']} variants x {len(args.archs)} archs; {len(errors)} errors; "
          f"{len(hot_spills)} hot kernels spill; {sum(not r['fills'] for r in fills)} launch rows under-fill; "
          f"{meta['seconds']}s (record {meta['record_s']}s, Triton {meta['triton_s']}s, CUDA {meta['cuda_s']}s)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "gpu_static.md", md)
        atomic_write_text(out / "gpu_static.json", json.dumps(dict(
            meta=meta, summary=summary, cuda=cuda, fills=fills, roofline=roof, errors=errors,
            compiled=tri["compiled"]), indent=1, default=str))
    return 1 if errors or (args.strict and hot_spills) else 0


if __name__ == "__main__":
    sys.exit(main())
