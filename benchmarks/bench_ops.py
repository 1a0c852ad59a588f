"""Benchmark of the fused CPU ops against the reference (eager and torch.compile).

    python benchmarks/bench_ops.py [--quick] [--json PATH] [--configs NAME ...] [--ops OP ...]
        [--layouts nchw channels_last]

Providers: ``eager`` (dcamkd.reference), ``compile`` (torch.compile(reference), inductor; the
compile time is excluded by warm-up calls), ``fused`` (dcamkd.ops under the setting in force,
``DCAMKD_IMPL`` or the default ``fused``; what it resolved to is recorded). Ops: ``pyramid_loss`` (the paper's best: channel CD + spatial KD, channel DCAM gate
inside the loss), ``dcam_attention`` (channel attention: avg+max pooling, sigmoid, gating
multiply), ``dcam_cbam`` (channel pooling, then spatial pooling of the channel-gated map, both
gates applied; the MLP and the convolution of the attention blocks are left out, sigmoids of the
pooled sums stand for them), ``anomaly_map`` (all levels, forward only). Modes ``fwd`` and ``fwd+bwd``. Layouts
``nchw`` (default) and ``channels_last`` (the trainer's default; ``--layouts``). The providers of
one row are timed interleaved (each repetition runs every provider once, in turn), so a load
change on a shared machine hits them alike.

Peak memory (CPU): the process's peak resident set (``VmHWM``) is reset through
``/proc/self/clear_refs`` before each measured call, and ``peak_mem_mb`` is the peak minus the
resident set just before the call: the memory the call itself needed (inputs excluded). It
is measured with ``--fresh-pages`` only: the run is re-executed with every allocation of 64 KiB or
more served by ``mmap`` and returned to the OS on free, so the resident set tracks live tensors,
and each large output is then a fresh mapping whose first-touch page faults are in the time.
Without ``--fresh-pages`` the timings run under glibc's default settings, where a large block
freed by one step is reused by the next, as in a training loop, and no peak memory is reported
(freed blocks stay resident there).

The machine bounds are measured too: copy bandwidth (``torch.Tensor.copy_`` of 256 MiB, read +
write bytes) and the vectorised exp rate (``torch.exp`` on 16 M float32), and the report states
the fused loss's minimum time from its bytes moved (forward 2N, backward 3N elements of 4 bytes)
and its exp count (4 per element of the spatial KD: 2 forward, 2 backward).
For ``pyramid_loss fwd+bwd`` two floors are also *timed* beside the providers, on the same
tensors: ``floor_bytes`` moves the loss's bytes with plain torch kernels into preallocated
outputs (per level: a sum over T and over S, the forward's 2N reads, then ``torch.add(T, S,
out=D)``, the backward's 2N reads + N writes) and ``floor_exp`` evaluates ``torch.exp`` on 4N
elements (4 exps per element of the spatial KD) into a preallocated buffer; the summary gives the
fused loss against the larger of the two.
``--threads N`` sets torch's (and the kernels') thread count.

Page faults: glibc serves a block of 32 MiB or more (a batch-32 level of the ResNet-18 pyramid) by
a fresh ``mmap`` every time, and the first touch of its 4 KiB pages can cost more than the
kernel that writes it (a fresh 33.5 MB product took 25 ms against 2.7 ms into an existing
buffer). ``THP_MEM_ALLOC_ENABLE=1`` (read by PyTorch's CPU allocator: blocks of 2 MiB or more are
2 MiB-aligned and advised as transparent huge pages) cut that to 4.2 ms; the run records whether
it was set.

``--mining``: instead, the hard-mined pyramid loss against the unmined one (fused, fwd+bwd,
``cos`` global and channel with the spatial KD and a channel gate, quantile rule at p = 0.9,
factor 0.1), timed interleaved (mined and unmined calls alternate, medians of each) so that
the load of a shared machine hits both alike; the ratio mined / unmined is the cost of the
selection (distances from the saved rows, a sort of the B*H*W distances per level) and of the
weights in the backward.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dcamkd.ops as ops  # noqa: E402
from dcamkd import reference as R  # noqa: E402

CONFIGS = {
    "resnet18_b8": (8, [(64, 64, 64), (128, 32, 32), (256, 16, 16)]),
    "resnet18_b32": (32, [(64, 64, 64), (128, 32, 32), (256, 16, 16)]),
    "lite0_b8": (8, [(24, 64, 64), (40, 32, 32), (112, 16, 16)]),
    "lite0_b32": (32, [(24, 64, 64), (40, 32, 32), (112, 16, 16)]),
}
QUICK = ["resnet18_b8", "lite0_b8"]
OPS = ("pyramid_loss", "dcam_attention", "dcam_cbam", "anomaly_map")
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _rss_now() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _hwm() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mem_mb(fn) -> float | None:
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_now()
        fn()
        return max(0.0, _hwm() - base)
    except OSError:
        return None


def time_ms(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def machine_bounds() -> dict:
    src = torch.empty(64 * 2**20, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), 5)
    bw = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    x = torch.randn(16 * 2**20)
    y = torch.empty_like(x)
    ms_e = time_ms(lambda: torch.exp(x, out=y), 5)
    return {"copy_GBps": bw, "exp_Gps": x.numel() / (ms_e * 1e-3) / 1e9, "threads": torch.get_num_threads()}


def make_inputs(cfg: str, seed: int = 0, layout: str = "nchw"):
    b, levels = CONFIGS[cfg]
    g = torch.Generator().manual_seed(seed)
    fmt = LAYOUTS[layout]
    t = [torch.randn(b, c, h, w, generator=g).relu_().contiguous(memory_format=fmt) for c, h, w in levels]
    s = [torch.randn(b, c, h, w, generator=g).relu_().contiguous(memory_format=fmt).requires_grad_()
         for c, h, w in levels]
    a = [torch.rand(b, c, generator=g).requires_grad_() for c, h, w in levels]
    return t, s, a


def loss_ref(t, s, a):
    return R.pyramid_terms(t, s, a, None, "channel", "spatial")


def loss_fused(t, s, a):
    return ops.pyramid_terms(t, s, a, None, "channel", "spatial")


def floor_fns(t, s):
    """The byte floor and the exp floor of the fused loss's forward + backward on these tensors
    (see the module docstring); outputs preallocated, so no allocation is timed."""
    sd = [x.detach() for x in s]
    outs = [torch.empty_like(x) for x in sd]
    n = sum(x.numel() for x in sd)
    src = torch.randn(n).clamp_(max=0)
    dst = torch.empty_like(src)

    def bytes_():
        for x, y, d in zip(t, sd, outs):
            x.sum(), y.sum()
            torch.add(x, y, out=d)

    def exp_():
        for _ in range(4):
            torch.exp(src, out=dst)

    return bytes_, exp_


def _attn(P, s):
    """Channel attention of each level through ``P`` (the reference module or the fused ops)."""
    outs = []
    for x in s:
        avg, mx = P.channel_pool(x)
        outs.append(P.apply_gates(x, torch.sigmoid(avg + mx)))
    return outs


def _cbam(P, s):
    """CBAM (channel, then spatial attention of the channel-gated map) through ``P``."""
    outs = []
    for x in s:
        avg, mx = P.channel_pool(x)
        a = torch.sigmoid(avg + mx)
        savg, smx = P.spatial_pool(x, a)
        outs.append(P.apply_gates(x, a, torch.sigmoid(savg + smx)))
    return outs


attn_ref, attn_fused = functools.partial(_attn, R), functools.partial(_attn, ops)
cbam_ref, cbam_fused = functools.partial(_cbam, R), functools.partial(_cbam, ops)


def amap_ref(t, s):
    return [R.anomaly_map_level(x, y) for x, y in zip(t, s)]


def amap_fused(t, s):
    return [ops.anomaly_map_level(x, y) for x, y in zip(t, s)]


def time_interleaved(fns: dict, reps: int, warmup: dict) -> dict:
    """Median ms of each callable, the repetitions interleaved (one call of each per round)."""
    for name, fn in fns.items():
        for _ in range(warmup.get(name, 1)):
            fn()
    ts = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in ts.items()}


def run(configs, reps, compile_ok=True, ops_=OPS, layouts=("nchw",)):
    """Time every row, then (``--fresh-pages``) measure every row's peak memory."""
    rows, fns = [], []
    for layout in layouts:
        for cfg in configs:
            r, f = _run_config(cfg, layout, reps, compile_ok, ops_)
            rows += r
            fns += f
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):  # --fresh-pages: the resident set tracks live tensors
        for row, fn in zip(rows, fns):
            pk = peak_mem_mb(fn)
            row["peak_mem_mb"] = None if pk is None else round(pk, 1)
    return rows


def _run_config(cfg, layout, reps, compile_ok, ops_):
    rows, callables = [], []
    t, s, a = make_inputs(cfg, layout=layout)
    sd = [x.detach() for x in s]
    gouts = [torch.randn_like(x) for x in s]
    for op in ops_:
        if op == "pyramid_loss":
            impls = {"eager": loss_ref, "fused": loss_fused}
            fwd = lambda f: (lambda: f(t, sd, [x.detach() for x in a]))  # noqa: E731

            def fb(f):
                def go():
                    f(t, s, a).sum().backward()
                    for x in s + a:
                        x.grad = None
                return go
        elif op in ("dcam_attention", "dcam_cbam"):
            impls = ({"eager": attn_ref, "fused": attn_fused} if op == "dcam_attention"
                     else {"eager": cbam_ref, "fused": cbam_fused})
            fwd = lambda f: (lambda: f(sd))  # noqa: E731

            def fb(f):
                def go():
                    outs = f(s)
                    torch.autograd.backward(outs, gouts)
                    for x in s:
                        x.grad = None
                return go
        else:
            impls = {"eager": amap_ref, "fused": amap_fused}
            fwd = lambda f: (lambda: f(t, sd))  # noqa: E731
            fb = None
        if compile_ok:
            impls["compile"] = torch.compile(impls["eager"])
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd+bwd" and fb is None:
                continue
            fns = {}
            for prov in ("eager", "compile", "fused"):
                if prov in impls:
                    fn = fwd(impls[prov]) if mode == "fwd" else fb(impls[prov])
                    fns[prov] = _nograd(fn) if mode == "fwd" else fn
            if op == "pyramid_loss" and mode == "fwd+bwd":
                fns["floor_bytes"], fns["floor_exp"] = floor_fns(t, s)
            med = time_interleaved(fns, reps, {"compile": 2})
            for prov, fn in fns.items():
                ms = med[prov]
                impl = ops.resolve("cpu") if prov == "fused" else "reference"
                row = {"op": op, "config": cfg, "layout": layout, "mode": mode, "provider": prov,
                       "median_ms": round(ms, 3), "peak_mem_mb": None, "impl": impl}
                rows.append(row)
                callables.append(fn)
                print(f"{op:15s} {cfg:13s} {layout:13s} {mode:8s} {prov:11s} {ms:10.2f} ms  [{impl}]", flush=True)
    return rows, callables


def run_mining(configs, reps):
    """Rows ``pyramid_loss_mining``: fused fwd+bwd, mined against unmined, interleaved."""
    rows = []
    level = torch.tensor(0.9, dtype=torch.float64)
    for cfg in configs:
        t, s, a = make_inputs(cfg)
        for cos in ("global", "channel"):
            def go(mine):
                def f():
                    out = ops.pyramid_terms(t, s, a, None, cos, "spatial", mine=mine, mine_factor=0.1,
                                            mine_level=level)
                    out.sum().backward()
                    for x in s + a:
                        x.grad = None
                return f
            plain, mined = go("none"), go("quantile")
            for f in (plain, mined):
                f()
            tp, tm = [], []
            for _ in range(reps):
                for f, acc in ((plain, tp), (mined, tm)):
                    t0 = time.perf_counter()
                    f()
                    acc.append((time.perf_counter() - t0) * 1e3)
            mp, mm = statistics.median(tp), statistics.median(tm)
            row = {"op": "pyramid_loss_mining", "config": cfg, "cos": cos, "mode": "fwd+bwd",
                   "unmined_ms": round(mp, 3), "mined_ms": round(mm, 3), "ratio": round(mm / mp, 3),
                   "impl": ops.resolve("cpu"), "threads": torch.get_num_threads()}
            rows.append(row)
            print(f"pyramid_loss    {cfg:13s} cos={cos:8s} fwd+bwd unmined {mp:8.2f} ms  mined {mm:8.2f} ms  "
                  f"ratio {mm / mp:.3f}  [{row['impl']}]", flush=True)
    return rows


def _nograd(f):
    def go():
        with torch.no_grad():
            return f()
    return go


def summarize(rows, bounds):
    print("\nmachine: copy bandwidth %.1f GB/s, torch.exp %.2f G/s, %d threads%s"
          % (bounds["copy_GBps"], bounds["exp_Gps"], bounds["threads"],
             (", fresh pages" if bounds.get("fresh_pages") else "")
             + (", THP_MEM_ALLOC_ENABLE=1" if bounds.get("thp_mem_alloc") else "")))
    by = {(r["op"], r["config"], r["layout"], r["mode"], r["provider"]): r for r in rows}
    for (op, cfg, layout, mode, prov), r in by.items():
        if prov != "fused":
            continue
        e = by.get((op, cfg, layout, mode, "eager"))
        c = by.get((op, cfg, layout, mode, "compile"))
        line = f"{op:15s} {cfg:13s} {layout:13s} {mode:8s} fused {r['median_ms']:.1f} ms:"
        if e:
            line += f" {e['median_ms'] / r['median_ms']:.2f}x eager"
            if e["peak_mem_mb"] and r["peak_mem_mb"] is not None:  # --fresh-pages
                line += f", peak mem {r['peak_mem_mb'] / e['peak_mem_mb']:.2f} of eager"
        if c:
            line += f", {c['median_ms'] / r['median_ms']:.2f}x compile"
        if op == "pyramid_loss" and mode == "fwd+bwd":
            b, levels = CONFIGS[cfg]
            n = sum(b * c_ * h * w for c_, h, w in levels)
            t_bw = 5 * n * 4 / (bounds["copy_GBps"] * 1e9) * 1e3
            t_exp = 4 * n / (bounds["exp_Gps"] * 1e9) * 1e3
            line += f" | bound: bytes {t_bw:.1f} ms, exp {t_exp:.1f} ms (N={n / 1e6:.1f}M)"
            fb_ = by.get((op, cfg, layout, mode, "floor_bytes"))
            fe_ = by.get((op, cfg, layout, mode, "floor_exp"))
            if fb_ and fe_:
                fl = max(fb_["median_ms"], fe_["median_ms"])
                line += (f" | timed floors: bytes {fb_['median_ms']:.1f} ms, exp {fe_['median_ms']:.1f} ms;"
                         f" fused = {r['median_ms'] / fl:.2f}x the larger")
        print(line)


def main(argv=None):
    # --fresh-pages: re-run once with every allocation >= 64 KiB served by mmap (returned to the
    # OS on free), so each large output is a fresh mapping with first-touch page faults.
    if ("--fresh-pages" in sys.argv and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None
            and sys.platform.startswith("linux")):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batch-8 configs only, fewer repetitions")
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    p.add_argument("--configs", nargs="*", choices=sorted(CONFIGS), help="configs to run")
    p.add_argument("--ops", nargs="*", choices=OPS, help="ops to run (default: all)")
    p.add_argument("--layouts", nargs="*", choices=sorted(LAYOUTS), default=["nchw"],
                   help="memory layouts of the feature maps (default: nchw)")
    p.add_argument("--fresh-pages", action="store_true",
                   help="time with every allocation >= 64 KiB a fresh mmap (page faults timed)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--mining", action="store_true",
                   help="hard-mined against unmined fused loss (fwd+bwd, interleaved) instead")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's); on a loaded machine 1 avoids "
                        "OpenMP barriers waiting for a descheduled thread")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = args.configs or (QUICK if args.quick else list(CONFIGS))
    reps = args.reps or (3 if args.quick else 7)
    if args.mining:
        rows = run_mining(configs, reps)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"rows": rows}, indent=1))
        return 0
    bounds = machine_bounds()
    bounds["fresh_pages"] = args.fresh_pages
    bounds["thp_mem_alloc"] = os.environ.get("THP_MEM_ALLOC_ENABLE", "") not in ("", "0")
    rows = run(configs, reps, compile_ok=not args.no_compile, ops_=tuple(args.ops or OPS),
               layouts=tuple(args.layouts))
    summarize(rows, bounds)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bounds": bounds, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
