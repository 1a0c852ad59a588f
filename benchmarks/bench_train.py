"""Training-step and inference throughput (images/s): fused CPU ops against the reference.

    python benchmarks/bench_train.py [--quick] [--full] [--train-batches 8 32] [--json PATH] [--reps N] [--threads N]
        [--backbones lite0 lite1 lite2 resnet18] [--presets stfpm dcam]
        [--providers reference fused fused_cl bf16 compile bf16_compile] [--infer-batches 1 8]

Training step: exactly :meth:`dcamkd.train.Trainer.train_step` (student forward, DCAM gates,
:class:`dcamkd.losses.DistillationLoss` terms and weighted sum, finiteness check, backward, SGD
step), called on a stand-in trainer object that holds the networks, the loss and the optimiser
the way :class:`~dcamkd.train.Trainer` builds them from a preset (no dataset needed). Teacher
maps are computed once per batch beforehand, as the trainer caches them (``cache_teacher``), so
the step does not run the teacher; the ``teacher`` rows time that forward (``torch.no_grad``,
the step's batch, NCHW ``nchw`` or channels-last ``cl`` weights), and the last summary adds it
to the step (the cost of a step without the cache). Backbones: ``tf_efficientnet_lite0``,
``-lite1``, ``-lite2`` (ImageNet teachers from the offline packages when they load, else
random) and ``resnet18`` (random teacher weights: offline); presets ``stfpm`` (channel CD, no
DCAM) and ``dcam`` (channel CD + spatial KD, channel DCAM); 256x256 images, batch 8 (and 32
with ``--full``).

Inference: :class:`dcamkd.scoring.AnomalyModel` forward (teacher + student + anomaly map +
image score, DCAM dropped), ``torch.no_grad``, batch 1 and 8.

Providers: ``reference`` (``dcamkd.ops.use('reference')``: the pure-PyTorch ops) and ``fused``
(``use('cpp')``: the C++ kernels; the row records what ``dcamkd.ops.resolve`` ran), both with
the backbones in NCHW layout, and ``fused_cl``: the fused ops with channels-last backbones (the
trainer's default, ``TrainConfig.channels_last``). On top of ``fused_cl`` (:mod:`dcamkd.precision`):
``bf16`` (``precision='bf16'``: bfloat16 autocast of the forwards, teacher maps cached in
bfloat16), ``compile`` (``nn.Module.compile`` of the student in training, of teacher and student
in inference) and ``bf16_compile`` (both). A compiled provider's first (warm-up) call compiles:
its row records ``compile_s``, that call's time minus the median of the timed ones. The repetitions of all backbones and
providers of one batch size are interleaved (lite0 reference, lite0 fused, ..., lite1
reference, ..., then again) so that load from other processes on the machine falls on all
alike; each row gives the median and the interquartile range of its repetitions. JSON rows:
``{"op", "config", "mode", "provider", "median_ms", "iqr_ms", "images_per_s", "impl"}`` (the
row style of ``bench_ops.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dcamkd.ops as ops  # noqa: E402
from dcamkd.config import preset_config  # noqa: E402
from dcamkd.losses import DistillationLoss  # noqa: E402
from dcamkd.models import build_student, build_teacher, backbone_spec  # noqa: E402
from dcamkd.dcam import DCAM  # noqa: E402
from dcamkd.precision import autocast, compile_module, to_precision  # noqa: E402
from dcamkd.scoring import AnomalyModel  # noqa: E402
from dcamkd.train import Trainer, _Distilled  # noqa: E402

BACKBONES = {"lite0": "tf_efficientnet_lite0", "lite1": "tf_efficientnet_lite1",
             "lite2": "tf_efficientnet_lite2", "resnet18": "resnet18"}
#: provider -> (implementation of the fused ops, backbone layout, precision, compile)
SETTINGS = {"reference": ("reference", "nchw", "fp32", False), "fused": ("cpp", "nchw", "fp32", False),
            "fused_cl": ("cpp", "cl", "fp32", False), "bf16": ("cpp", "cl", "bf16", False),
            "compile": ("cpp", "cl", "fp32", True), "bf16_compile": ("cpp", "cl", "bf16", True)}
PROVIDERS = {k: v[0] for k, v in SETTINGS.items()}
#: teacher rows: one per layout and precision
LAYOUT = {k: v[1] + ("" if v[2] == "fp32" else f"_{v[2]}") for k, v in SETTINGS.items()}
#: the default providers: the trainer's default (fused_cl) and what it is compared with
DEFAULT_PROVIDERS = ("reference", "fused", "fused_cl", "bf16")


def _teacher(backbone: str):
    """ImageNet teacher where the weights ship in a package (random if it is missing), else
    random weights (offline): the weights do not change the timing."""
    if backbone_spec(backbone).package is not None:
        try:
            return build_teacher(backbone, weights="imagenet")
        except Exception as e:  # noqa: BLE001 - weights are irrelevant to the timing
            warnings.warn(f"{backbone} ImageNet weights unavailable ({e}); random teacher", RuntimeWarning)
    return build_teacher(backbone, weights=None)


def _stand_in(cfg, teacher, student, dcam, impl):
    """The attributes :meth:`Trainer.train_step` reads, built as ``Trainer.__init__`` does."""
    params = list(student.parameters()) + (list(dcam.parameters()) if dcam is not None else [])
    cfg = copy.copy(cfg)
    cfg.impl = impl
    st = SimpleNamespace(
        cfg=cfg,
        net=_Distilled(student, dcam),
        loss_fn=DistillationLoss(cfg.objective),
        optimizer=torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
        distributed=False, step=0, rank=0, device=torch.device("cpu"),
    )
    st.mining_progress = lambda: Trainer.mining_progress(st)
    return st


def _interleaved(fns: dict, reps: int, warmup: int, first: dict = None) -> dict:
    """Times in ms per key (``reps`` interleaved rounds after ``warmup`` calls each); the first
    warm-up call's time of each key goes into ``first`` (seconds) when given."""
    for k, f in fns.items():
        for i in range(warmup):
            t0 = time.perf_counter()
            f()
            if i == 0 and first is not None:
                first[k] = time.perf_counter() - t0
    ts = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append((time.perf_counter() - t0) * 1e3)
    return ts


def _row(op, config, mode, prov, times, images, impl, first_s=None):
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), med, max(times)]
    row = {"op": op, "config": config, "mode": mode, "provider": prov, "median_ms": round(med, 2),
           "iqr_ms": [round(q[0], 2), round(q[2], 2)], "images_per_s": round(images / med * 1e3, 2),
           "impl": impl}
    extra = ""
    if first_s is not None:  # a compiled provider: the first call compiled
        row["compile_s"] = round(first_s - med / 1e3, 2)
        extra = f"  compile {row['compile_s']:.1f} s"
    print(f"{op:11s} {config:24s} {mode:6s} {prov:12s} {med:9.1f} ms  (IQR {q[0]:.1f}-{q[2]:.1f})  "
          f"{row['images_per_s']:7.2f} img/s  [{impl}]{extra}", flush=True)
    return row


def bench_train(backbone_keys: list[str], presets: list[str], batch: int, reps: int, size: int = 256,
                providers: tuple[str, ...] = DEFAULT_PROVIDERS) -> list[dict]:
    """Training steps (cached teacher maps) of all ``backbone_keys`` x ``presets`` x
    ``providers`` and the teacher forwards of each backbone, layout and precision, all
    interleaved."""
    fns = {}
    for bk, preset in ((bk, preset) for bk in backbone_keys for preset in presets):
        backbone = BACKBONES[bk]
        cfg = preset_config(preset, backbone=backbone, batch_size=batch, image_size=size)
        spec = backbone_spec(backbone)
        torch.manual_seed(0)
        teacher = _teacher(backbone).eval()
        student0 = build_student(backbone)
        dcam0 = DCAM(spec.channels, cfg.dcam, cfg.dcam_reduction, cfg.dcam_kernel) if cfg.dcam != "none" else None
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 3, size, size, generator=g)
        with torch.no_grad():  # the trainer's cached teacher maps
            t = [f.detach() for f in teacher(x)]
        for prov in providers:
            be, layout, precision, compiled = SETTINGS[prov]
            student = copy.deepcopy(student0)
            tp = t
            if layout == "cl":
                student.to(memory_format=torch.channels_last)
                tp = [f.contiguous(memory_format=torch.channels_last) for f in t]
            tp = to_precision(tp, precision)  # the trainer caches the teacher maps in this dtype
            st = _stand_in(cfg, teacher, student, copy.deepcopy(dcam0), be)
            st.cfg.precision = precision
            if compiled:
                compile_module(student)
            st.net.train()
            key = ("train_step", f"{bk}_{preset}_b{batch}", prov)

            def step(st=st, tp=tp, x=x, be=be):
                with ops.use(be):
                    Trainer.train_step(st, x, tp)
            fns[key] = step
            lay = LAYOUT[prov]
            tkey = ("teacher", f"{bk}_b{batch}", lay)
            if tkey not in fns:  # the teacher forward the trainer runs once per image (cache_teacher)
                t_ = copy.deepcopy(teacher)
                if layout == "cl":
                    t_.to(memory_format=torch.channels_last)

                def fwd(t_=t_, x=x, precision=precision):
                    with torch.no_grad(), autocast(precision, "cpu"):
                        t_(x)
                fns[tkey] = fwd
    first: dict = {}
    ts = _interleaved(fns, reps, warmup=2 if any(SETTINGS[p][3] for p in providers) else 1, first=first)
    rows = []
    for key, fn in fns.items():
        op, cfgname, prov = key
        if op == "train_step":
            with ops.use(PROVIDERS[prov]):
                ran = ops.resolve("cpu")
            rows.append(_row(op, cfgname, "train", prov, ts[key], batch, ran,
                             first[key] if SETTINGS[prov][3] else None))
        else:
            rows.append(_row(op, cfgname, "infer", prov, ts[key], batch, "torch"))
    return rows


def bench_infer(backbone_keys: list[str], batch: int, reps: int, size: int = 256,
                providers: tuple[str, ...] = DEFAULT_PROVIDERS) -> list[dict]:
    """:class:`AnomalyModel` forwards of all ``backbone_keys`` x ``providers``, interleaved."""
    fns = {}
    for bk in backbone_keys:
        backbone = BACKBONES[bk]
        cfg = preset_config("dcam", backbone=backbone, image_size=size)
        torch.manual_seed(0)
        teacher = _teacher(backbone).eval()
        student = build_student(backbone).eval()
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
        for prov in providers:
            be, layout, precision, compiled = SETTINGS[prov]
            t_, s_ = copy.deepcopy(teacher), copy.deepcopy(student)
            if layout == "cl":
                t_.to(memory_format=torch.channels_last)
                s_.to(memory_format=torch.channels_last)
            if compiled:
                compile_module(t_)
                compile_module(s_)
            model = AnomalyModel(t_, s_, cfg.fusion, cfg.sigma, None, image_score=cfg.image_score,
                                 topk_fraction=cfg.topk_fraction, precision=precision).eval()

            def go(model=model, x=x, be=be):
                with torch.no_grad(), ops.use(be):
                    model(x)
            fns[(f"{bk}_b{batch}", prov)] = go
    first: dict = {}
    ts = _interleaved(fns, reps, warmup=2 if any(SETTINGS[p][3] for p in providers) else 1, first=first)
    rows = []
    for (cfgname, prov), fn in fns.items():
        with ops.use(PROVIDERS[prov]):
            ran = ops.resolve("cpu")
        rows.append(_row("inference", cfgname, "infer", prov, ts[(cfgname, prov)], batch, ran,
                         first[(cfgname, prov)] if SETTINGS[prov][3] else None))
    return rows


def summarize(rows: list[dict]) -> None:
    by = {(r["op"], r["config"], r["provider"]): r for r in rows}
    for new, base in (("fused", "reference"), ("fused_cl", "fused"), ("fused_cl", "reference"),
                      ("bf16", "fused_cl"), ("compile", "fused_cl"), ("bf16_compile", "fused_cl"),
                      ("bf16_compile", "bf16")):
        lines = []
        for (op, cfgname, prov), r in by.items():
            if prov != new:
                continue
            ref = by.get((op, cfgname, base))
            if ref:
                lines.append(f"  {op:11s} {cfgname:24s} {r['images_per_s'] / ref['images_per_s']:.2f}x "
                             f"({ref['images_per_s']:.2f} -> {r['images_per_s']:.2f} img/s)")
        if lines:
            print(f"\n{new} vs {base} (images/s ratio, medians):")
            print("\n".join(lines))


def summarize_backbones(rows: list[dict]) -> None:
    """Per backbone and batch: teacher forward + training step (what one step costs without the
    teacher cache, ``--no-cache-teacher``), for each provider (teacher in the provider's layout)."""
    teach = {(r["config"], r["provider"]): r for r in rows if r["op"] == "teacher"}
    lines = []
    for r in rows:
        if r["op"] != "train_step":
            continue
        bk, preset, b = r["config"].rsplit("_", 2)
        t = teach.get((f"{bk}_{b}", LAYOUT[r["provider"]]))
        if t:
            tot = t["median_ms"] + r["median_ms"]
            n = int(b[1:])
            lines.append(f"  {bk:9s} {preset:6s} {b:4s} {r['provider']:9s} teacher {t['median_ms']:8.1f} ms + "
                         f"step {r['median_ms']:8.1f} ms = {tot:8.1f} ms  ({n / tot * 1e3:.2f} img/s)")
    if lines:
        print("\nteacher forward + training step (medians):")
        print("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--full", action="store_true", help="also batch 32 training steps (--train-batches 8 32)")
    p.add_argument("--train-batches", nargs="*", type=int, help="training-step batch sizes (default 8)")
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    p.add_argument("--reps", type=int, default=None, help="repetitions per provider")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--backbones", nargs="*", choices=sorted(BACKBONES), default=["lite0", "resnet18"])
    p.add_argument("--presets", nargs="*", choices=["stfpm", "dcam"], default=["stfpm", "dcam"])
    p.add_argument("--providers", nargs="*", choices=list(PROVIDERS), default=list(DEFAULT_PROVIDERS),
                   help=f"which providers to time (default {' '.join(DEFAULT_PROVIDERS)}; fused_cl is the "
                        f"trainer's default; the compiled ones pay a compilation per configuration)")
    p.add_argument("--infer-batches", nargs="*", type=int, default=[1, 8], help="inference batch sizes")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (5 if args.quick else 11)
    batches = args.train_batches if args.train_batches is not None else ([8, 32] if args.full else [8])
    rows = []
    providers = tuple(args.providers)
    for b in batches:
        rows += bench_train(args.backbones, args.presets, b, reps, providers=providers)
    for b in args.infer_batches:
        rows += bench_infer(args.backbones, b, reps, providers=providers)
    summarize(rows)
    summarize_backbones(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "reps": reps, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
