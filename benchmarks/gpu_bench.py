"""GPU timings of the fused ops at the paper's shapes (called by benchmarks/gpu_check.sh).

Stages (each appends rows to the JSON/markdown outputs as soon as it finishes, so a timeout
keeps what was measured):

1. ``copy``: device-to-device copy bandwidth (``y.copy_(x)``, 512 MiB, bytes read + written).
2. ``loss``: the pyramid loss (channel CD + spatial KD with channel DCAM gates, the paper's best
   configuration) on the ResNet-18 pyramid at 256x256, batch 32 - (64,64,64), (128,32,32),
   (256,16,16) - in float32 and bfloat16, forward and forward+backward, for ``eager``
   (dcamkd.reference), ``compile`` (``torch.compile`` of the reference), ``triton`` and ``cuda``.
   For the fused providers the row carries the bytes of the design (Triton: T, S read twice,
   dS written once, 5 N e; CUDA: the forward reads T, S once per row direction, 7 N e), the
   single-pass floor 3 N e, the achieved bandwidth on the design's count and its fraction of the
   measured copy bandwidth, and the time relative to the floor at copy bandwidth.
3. ``attention`` / ``anomaly_map``: DCAM pooling+gating forward+backward and the anomaly map.
4. ``train``: training-step throughput (images/s) of a ResNet-18 teacher (random weights: no
   network on the GPU machine) and student truncated after layer3, channel DCAM gates, SGD, with
   the reference loss vs the fused loss (the default implementation, ``fused``: Triton on CUDA).
5. ``infer``: inference latency at batch 1 and 32: plain teacher+student forward vs the same plus
   anomaly maps (fused) upsampled and summed (DCAM is dropped at inference).

``--device cpu --dry-run`` runs every stage on tiny shapes on the CPU (reference/compile only),
as a unit test of this script. Usage::

    python benchmarks/gpu_bench.py --device cuda --out $OUT [--budget-s 240]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcamkd import ops  # noqa: E402
from dcamkd import reference as R  # noqa: E402

PAPER_SHAPES = [(64, 64, 64), (128, 32, 32), (256, 16, 16)]


class Recorder:
    """Collects result rows and rewrites ``gpu_bench.json`` and ``gpu_bench.md`` after each."""

    def __init__(self, out: Path | None, meta: dict):
        self.out, self.meta, self.rows = out, meta, []

    def add(self, **row):
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.flush()

    def flush(self):
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_bench.json").write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))
        (self.out / "gpu_bench.md").write_text(to_markdown(self.meta, self.rows))


def to_markdown(meta: dict, rows: list) -> str:
    lines = [f"# dcamkd device check: {meta.get('device_name')} ({meta.get('date')})", "",
             f"torch {meta.get('torch')}, triton {meta.get('triton')}, command: `{meta.get('command')}`", ""]
    keys = ["stage", "op", "dtype", "mode", "provider", "median_ms", "gbps", "frac_copy_bw",
            "x_floor", "speedup_vs_compile", "images_per_s", "ratio", "note"]
    used = [k for k in keys if any(k in r for r in rows)]
    lines.append("| " + " | ".join(used) + " |")
    lines.append("|" + "---|" * len(used))
    for r in rows:
        cells = []
        for k in used:
            v = r.get(k, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def timer(device: str, default_warmup: int = 2):
    def run(fn, reps: int, warmup: int = default_warmup) -> float:
        for _ in range(warmup):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
            ts = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b))
            return statistics.median(ts)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    return run


def stage_copy(rec, dev, dry, run):
    n = (1 << 16) if dry else (512 << 20) // 4
    x = torch.randn(n, device=dev)
    y = torch.empty_like(x)
    ms = run(lambda: y.copy_(x), 3 if dry else 20)
    gbps = 2 * x.numel() * 4 / (ms * 1e-3) / 1e9
    rec.add(stage="copy", op="d2d_copy", dtype="float32", mode="copy", provider="torch", median_ms=ms,
            gbps=gbps, note=f"{2 * x.numel() * 4 / 2**20:.0f} MiB moved")
    return gbps


def pyramid(batch, shapes, dtype, dev, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    ts = [torch.randn((batch,) + s, generator=g, device=dev, dtype=dtype) for s in shapes]
    ss = [torch.randn((batch,) + s, generator=g, device=dev, dtype=dtype).requires_grad_() for s in shapes]
    cg = [torch.rand(batch, s[0], generator=g, device=dev).requires_grad_() for s in shapes]
    return ts, ss, cg


def stage_loss(rec, dev, dry, run, copy_gbps, providers, batch, shapes, deadline):
    reps = 3 if dry else 20
    for dtype in (torch.float32, torch.bfloat16):
        ts, ss, cg = pyramid(batch, shapes, dtype, dev)
        n = sum(t.numel() for t in ts)
        e = ts[0].element_size()
        design = {"triton": 5 * n * e, "cuda": 7 * n * e}
        floor = 3 * n * e
        ref_fn = lambda t, s, a: R.pyramid_terms(t, s, a, None, "channel", "spatial")  # noqa: E731
        compiled = torch.compile(ref_fn) if "compile" in providers else None
        fns = {"eager": ref_fn, "compile": compiled}
        for be in ("triton", "cuda"):
            def fused(t, s, a, be_=be):
                with ops.use(be_):
                    return ops.pyramid_terms(t, s, a, None, "channel", "spatial")
            fns[be] = fused
        compile_ms = {}
        for prov in providers:
            if time.time() > deadline:
                rec.add(stage="loss", op="pyramid_loss", provider=prov, note="skipped: time budget")
                continue
            fn = fns[prov]
            for mode in ("fwd", "fwd+bwd"):
                def step():
                    out = fn(ts, ss, cg)
                    if mode == "fwd+bwd":
                        torch.autograd.grad(out.sum(), ss + cg)
                try:
                    if mode == "fwd":
                        with torch.no_grad():
                            ms = run(step, reps)
                    else:
                        ms = run(step, reps)
                except Exception as ex:  # one provider failing must not stop the others
                    rec.add(stage="loss", op="pyramid_loss", dtype=str(dtype).split(".")[-1], mode=mode,
                            provider=prov, note=f"failed: {type(ex).__name__}: {str(ex)[:200]}")
                    continue
                row = dict(stage="loss", op="pyramid_loss", dtype=str(dtype).split(".")[-1], mode=mode,
                           provider=prov, median_ms=ms, config=f"resnet18 b{batch} {shapes}")
                if prov == "compile":
                    compile_ms[mode] = ms
                if prov in design:
                    byts = design[prov] if mode == "fwd+bwd" else (2 if prov == "triton" else 4) * n * e
                    row["bytes_design"] = byts
                    row["bytes_floor"] = floor if mode == "fwd+bwd" else 2 * n * e
                    row["gbps"] = byts / (ms * 1e-3) / 1e9
                    if copy_gbps:
                        row["frac_copy_bw"] = row["gbps"] / copy_gbps
                        row["x_floor"] = ms / (row["bytes_floor"] / (copy_gbps * 1e9) * 1e3)
                    if mode in compile_ms:
                        row["speedup_vs_compile"] = compile_ms[mode] / ms
                    with ops.use(prov):
                        row["ran"] = ops.resolve(dev)
                rec.add(**row)


def stage_attention(rec, dev, dry, run, providers, batch, deadline):
    reps = 3 if dry else 20
    shape = (batch, 64, 8, 8) if dry else (batch, 64, 64, 64)
    x = torch.randn(shape, device=dev, requires_grad=True)
    t = torch.randn(shape, device=dev)
    for prov in [p for p in providers if p != "compile"]:
        if time.time() > deadline:
            break
        be = "reference" if prov == "eager" else prov

        def att():
            with ops.use(be):
                avg, mx = ops.channel_pool(x)
                a = torch.sigmoid(avg + mx)
                savg, smx = ops.spatial_pool(x, a)
                m = torch.sigmoid(savg + smx)
                y = ops.apply_gates(x, a, m)
            torch.autograd.grad(y.float().square().mean(), x)

        def amap():
            with ops.use(be):
                return ops.anomaly_map_level(t, x)

        try:
            rec.add(stage="attention", op="dcam_cbam", dtype="float32", mode="fwd+bwd", provider=prov,
                    median_ms=run(att, reps), config=str(shape))
            with torch.no_grad():
                rec.add(stage="anomaly_map", op="anomaly_map", dtype="float32", mode="fwd", provider=prov,
                        median_ms=run(amap, reps), config=str(shape))
        except Exception as ex:
            rec.add(stage="attention", op="dcam_cbam", provider=prov, note=f"failed: {type(ex).__name__}: {str(ex)[:200]}")


class Block(nn.Module):
    """ResNet basic block (He et al. 2016)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18Pyramid(nn.Module):
    """ResNet-18 up to layer3, returning layer1-3 (strides 4, 8, 16); random weights."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.l1 = nn.Sequential(Block(64, 64, 1), Block(64, 64, 1))
        self.l2 = nn.Sequential(Block(64, 128, 2), Block(128, 128, 1))
        self.l3 = nn.Sequential(Block(128, 256, 2), Block(256, 256, 1))

    def forward(self, x):
        f1 = self.l1(self.stem(x))
        f2 = self.l2(f1)
        return [f1, f2, self.l3(f2)]


class ChannelGate(nn.Module):
    """DCAM channel attention gate (method.md section 3): sigmoid(MLP(avg) + MLP(max))."""

    def __init__(self, c, r=8):
        super().__init__()
        h = max(1, c // r)
        self.mlp = nn.Sequential(nn.Linear(c, h, bias=False), nn.ReLU(), nn.Linear(h, c, bias=False))

    def forward(self, avg, mx):
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx))


def stage_train(rec, dev, dry, batch, deadline):
    res = 32 if dry else 256
    steps = 1 if dry else 15
    teacher = ResNet18Pyramid().to(dev).eval()
    student = ResNet18Pyramid().to(dev).train()
    gates = nn.ModuleList([ChannelGate(c) for c, _, _ in PAPER_SHAPES]).to(dev)
    opt = torch.optim.SGD(list(student.parameters()) + list(gates.parameters()), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, res, res, device=dev)
    for prov in ("eager", "fused"):
        if time.time() > deadline:
            rec.add(stage="train", provider=prov, note="skipped: time budget")
            continue
        be = "reference" if prov == "eager" else None

        def step():
            with torch.no_grad():
                tf = teacher(x)
            sf = student(x)
            cg = []
            with ops.use(be):
                for g, s in zip(gates, sf):
                    avg, mx = ops.channel_pool(s)
                    cg.append(g(avg, mx))
                loss = ops.pyramid_terms(tf, sf, cg, None, "channel", "spatial").sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(1 if dry else 2):
            step()
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if dev == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rec.add(stage="train", op="train_step", dtype="float32", mode=f"b{batch} {res}px", provider=prov,
                median_ms=dt / steps * 1e3, images_per_s=batch * steps / dt,
                note="resnet18 teacher with random weights (no network), channel DCAM, SGD")


def stage_infer(rec, dev, dry, run, deadline):
    res = 32 if dry else 256
    teacher = ResNet18Pyramid().to(dev).eval()
    student = ResNet18Pyramid().to(dev).eval()
    for b in ((1, 2) if dry else (1, 32)):
        if time.time() > deadline:
            break
        x = torch.randn(b, 3, res, res, device=dev)

        def plain():
            teacher(x)
            student(x)

        def scored():
            tf, sf = teacher(x), student(x)
            maps = [ops.anomaly_map_level(t, s) for t, s in zip(tf, sf)]
            up = sum(F.interpolate(m[:, None], size=(res, res), mode="bilinear", align_corners=False) for m in maps)
            return up.amax(dim=(1, 2, 3))

        with torch.no_grad():
            p = run(plain, 2 if dry else 30)
            s = run(scored, 2 if dry else 30)
        rec.add(stage="infer", op="latency", dtype="float32", mode=f"batch {b}", provider="teacher+student",
                median_ms=p)
        rec.add(stage="infer", op="latency", dtype="float32", mode=f"batch {b}", provider="+anomaly maps (fused)",
                median_ms=s, ratio=s / p, note="DCAM dropped at inference")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, few repetitions")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_bench.json/.md")
    ap.add_argument("--budget-s", type=float, default=240.0, help="skip remaining work after this")
    ap.add_argument("--stages", default="copy,loss,attention,train,infer")
    ap.add_argument("--providers", default=None,
                    help="comma list of eager,compile,triton,cuda (default: all for the device)")
    args = ap.parse_args(argv)
    dev, dry = args.device, args.dry_run
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: --device cuda but torch.cuda.is_available() is False")
    deadline = time.time() + args.budget_s
    import importlib.util

    has_triton = importlib.util.find_spec("triton") is not None
    meta = {"device_name": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "triton": __import__("triton").__version__ if has_triton else None,
            "command": "bash benchmarks/gpu_check.sh" if dev == "cuda" else " ".join(sys.argv)}
    rec = Recorder(Path(args.out) if args.out else None, meta)
    run = timer(dev, 1 if dry else 2)
    stages = args.stages.split(",")
    providers = ["eager", "compile"] + (["triton", "cuda"] if dev == "cuda" else [])
    if args.providers:
        providers = args.providers.split(",")
    batch = 2 if dry else 32
    shapes = [(8, 8, 8), (16, 4, 4), (32, 2, 2)] if dry else PAPER_SHAPES
    copy_gbps = stage_copy(rec, dev, dry, run) if "copy" in stages else None
    if "loss" in stages:
        stage_loss(rec, dev, dry, run, copy_gbps, providers, batch, shapes, deadline)
    if "attention" in stages:
        stage_attention(rec, dev, dry, run, [p for p in providers if p != "compile"], batch, deadline)
    if "train" in stages:
        stage_train(rec, dev, dry, batch, deadline)
    if "infer" in stages:
        stage_infer(rec, dev, dry, run, deadline)
    rec.flush()
    return rec


if __name__ == "__main__":
    main()
