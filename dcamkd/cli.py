"""The ``dcamkd`` command line: train, calibrate, test, predict, demo, ablate, compact-data, export.

Every dcamkd error (bad input, missing file, corrupt checkpoint, a ``--device`` that does not
exist here...) is printed in one line as ``dcamkd: error: ...`` without a traceback, and the
command exits with status 2 (``DCAMKD_TRACEBACK=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

from .backbones import BACKBONES
from .errors import DcamkdError, InvalidArgumentError

__all__ = ["main", "build_parser"]


def _categories(s: Optional[str]):
    if s is None:
        return None
    cats = [c.strip() for c in s.split(",") if c.strip()]
    if not cats:
        raise InvalidArgumentError(f"--categories: expected a comma-separated list of names, got {s!r}")
    return cats


def _add_objective_args(p: argparse.ArgumentParser) -> None:
    from .config import DCAM_AT_INFERENCE
    from .objective import COS_MODES, DCAM_VARIANTS, KD_REDUCTIONS, KL_MODES, MINE_COS_MODES, MINE_DEFAULTS, MINE_RULES

    g = p.add_argument_group("objective (override the preset)")
    g.add_argument("--dcam", choices=DCAM_VARIANTS, help="DCAM attention variant")
    g.add_argument("--cos", choices=COS_MODES,
                   help="cosine term: channel CD, spatial CD or global CD (whole map per image)")
    g.add_argument("--kl", choices=KL_MODES, help="KL term: spatial KD or channel KD")
    g.add_argument("--tau", type=float, help="softmax temperature of the KL term")
    g.add_argument("--lambda-cos", type=float, help="weight of the cosine term")
    g.add_argument("--lambda-kl", type=float, help="weight of the KL term")
    g.add_argument("--kd-reduction", choices=KD_REDUCTIONS, help="spatial KD: sum or mean over channels")
    g.add_argument("--level-weights", type=lambda s: [float(x) for x in s.split(",")],
                   help="comma-separated weight per pyramid level, e.g. 1,1,1")
    dq, dz = MINE_DEFAULTS["quantile"], MINE_DEFAULTS["zscore"]
    g.add_argument("--mine", choices=MINE_RULES,
                   help=f"hard mining of the cosine gradient (cos {' or '.join(MINE_COS_MODES)}): quantile "
                        f"(Dinomaly) or zscore (ReContrast); see docs/mining.md")
    g.add_argument("--mine-start", type=float,
                   help=f"mining level at step 0, p or alpha (default {dq['start']} / {dz['start']}; needs --mine)")
    g.add_argument("--mine-final", type=float,
                   help=f"mining level after the ramp, p or alpha (default {dq['final']} / {dz['final']}; needs --mine)")
    g.add_argument("--mine-factor", type=float,
                   help=f"gradient factor of the easy locations (default {dq['factor']} / {dz['factor']}; needs --mine)")
    g.add_argument("--mine-ramp-steps", type=int,
                   help=f"steps of the linear ramp of the level (default {dq['ramp_steps']}; needs --mine)")
    g.add_argument("--dcam-at-inference", choices=DCAM_AT_INFERENCE,
                   help=f"{' or '.join(DCAM_AT_INFERENCE)} DCAM when scoring (default {DCAM_AT_INFERENCE[0]}; keep needs a DCAM variant)")
    g.add_argument("--dcam-gate-floor", type=float,
                   help="lower bound f in [0, 1) of every DCAM gate: f + (1 - f) * sigmoid (default 0; needs a DCAM variant)")


def _add_scoring_args(p: argparse.ArgumentParser, what: str, presets=None) -> None:
    """The four scoring flags; ``presets`` (name -> Preset) names each flag's default per preset,
    else every help ends with ``what``."""
    from .config import FUSIONS, IMAGE_SCORES

    def w(field: str) -> str:
        if presets is None:
            return what
        values: dict[str, list[str]] = {}
        for name, preset in presets.items():
            v = getattr(preset.scoring, field)
            values.setdefault(f"{v:g}" if isinstance(v, float) else str(v), []).append(name)
        if len(values) == 1:
            return f"default {next(iter(values))}"
        return "default: the preset's, " + "; ".join(f"{v} for {', '.join(n)}" for v, n in values.items())

    p.add_argument("--fusion", choices=FUSIONS, help=f"level fusion of the anomaly map ({w('fusion')})")
    p.add_argument("--sigma", type=float, help=f"Gaussian blur sigma of the anomaly map in pixels ({w('sigma')})")
    p.add_argument("--image-score", choices=IMAGE_SCORES,
                   help=f"image score: the map's max, or the mean of its top-k fraction of pixels ({w('image_score')})")
    p.add_argument("--topk-fraction", type=float,
                   help=f"fraction of pixels of --image-score topk ({w('topk_fraction')})")


def _add_alpha_arg(p: argparse.ArgumentParser, default_text: str) -> None:
    p.add_argument("--false-alarm-rate", type=float,
                   help=f"target false-alarm rate on good images of the calibrated threshold ({default_text})")


def _add_execution_args(p: argparse.ArgumentParser, training: bool) -> None:
    """``--precision`` and ``--compile`` (:mod:`dcamkd.precision`)."""
    from .config import DEFAULT_PRECISION, PRECISIONS

    if training:
        p.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                       help=f"compute precision of teacher, student and DCAM forwards: bf16 = bfloat16 autocast, "
                            f"loss and maps accumulated in float32, weights and checkpoints float32 "
                            f"(default {DEFAULT_PRECISION})")
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the student (the first steps pay the compilation; logged)")
    else:
        p.add_argument("--precision", choices=PRECISIONS,
                       help="compute precision of the teacher and student forwards: bf16 = bfloat16 autocast, maps and "
                            "scores in float32 (default: the checkpoint's)")
        p.add_argument("--compile", action="store_true", default=None,
                       help="torch.compile teacher and student (the first batch pays the compilation; default: the "
                            "checkpoint's setting)")


class _OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other error of the
    command (``dcamkd: error: <command>: <message>``, exit status 2); ``--help`` shows the usage."""

    def error(self, message: str):  # type: ignore[override]
        where = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, f"dcamkd: error: {where}{message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dcamkd`` command. Choices and defaults come from the
    modules that define them (:mod:`dcamkd.objective`, :mod:`dcamkd.config`,
    :mod:`dcamkd.backbones`, :mod:`dcamkd.device`, :mod:`dcamkd.impls`), none of which imports
    torch."""
    from ._version import __version__
    from .config import EXPORT_FORMATS, MASK_MODES, TrainConfig
    from .device import DEVICE_HELP
    from .impls import IMPLS
    from .objective import DEFAULT_PRESET, PRESETS

    cfg0 = TrainConfig()  # the defaults of a training run
    p = _OneLineParser(
        prog="dcamkd",
        description="Multi-class unsupervised anomaly detection by attention-aware knowledge distillation "
                    "(DCAM, arXiv 2405.06467) on a teacher/student feature pyramid.",
    )
    p.add_argument("--version", action="version", version=f"dcamkd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train one multi-class model on the good images of MVTec-layout categories",
                       description="Train one teacher/student model on the pooled train/good images of the given "
                                   "categories (MVTec AD layout; test folders are optional). Writes best.pt, last.pt, "
                                   "log.json and split.json into --out; at the end both checkpoints are calibrated on "
                                   "the held-out good validation images (a seeded 20 % per category).")
    t.add_argument("--data", required=True, help="dataset root in MVTec AD layout")
    t.add_argument("--categories", help="comma-separated categories (default: all under --data)")
    t.add_argument("--preset", default=DEFAULT_PRESET, choices=PRESETS,
                   help=f"preset: objective, DCAM variant and scoring (default {DEFAULT_PRESET})")
    t.add_argument("--backbone", default=cfg0.backbone, choices=BACKBONES,
                   help=f"teacher/student architecture (default {cfg0.backbone}; the "
                        f"tf_efficientnet_lite* weights work offline)")
    t.add_argument("--teacher-weights", help="local state dict for the teacher (default: ImageNet weights)")
    t.add_argument("--image-size", type=int, default=cfg0.image_size,
                   help=f"input and evaluation size in pixels (default {cfg0.image_size})")
    t.add_argument("--epochs", type=int, help=f"passes over the training split (default {cfg0.epochs})")
    t.add_argument("--steps", type=int, help="optimiser-step budget (overrides --epochs)")
    t.add_argument("--batch-size", type=int, help=f"batch size (default {cfg0.batch_size})")
    t.add_argument("--lr", type=float, help=f"SGD learning rate (default {cfg0.lr})")
    t.add_argument("--momentum", type=float, help=f"SGD momentum (default {cfg0.momentum})")
    t.add_argument("--weight-decay", type=float, help=f"SGD weight decay (default {cfg0.weight_decay})")
    t.add_argument("--grad-clip", type=float, help="clip the gradient norm (default off)")
    t.add_argument("--seed", type=int, default=cfg0.seed, help=f"random seed (default {cfg0.seed})")
    _add_scoring_args(t, "", PRESETS)
    _add_alpha_arg(t, f"default {cfg0.false_alarm_rate:g}")
    t.add_argument("--device", default=cfg0.device, help=DEVICE_HELP)
    t.add_argument("--impl", choices=IMPLS,
                   help="implementation of the fused ops (default: $DCAMKD_IMPL, else fused)")
    t.add_argument("--no-cache-teacher", action="store_true",
                   help="recompute teacher features every step instead of caching them once")
    t.add_argument("--deterministic", action="store_true", help="torch deterministic algorithms")
    t.add_argument("--no-channels-last", action="store_true",
                   help="keep the backbones in NCHW layout (default: channels-last, about 1.5x faster on CPU)")
    _add_execution_args(t, training=True)
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--test", action="store_true", help="evaluate best.pt on the test sets afterwards "
                                                        "(writes OUT/results.json; skipped without test images)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_objective_args(t)

    c = sub.add_parser("calibrate", help="recalibrate a checkpoint's decision thresholds on good images",
                       description="Score good images the model never trained on and store, per category and "
                                   "pooled, the threshold for a target false-alarm rate (the k-th smallest score, "
                                   "k = ceil((n + 1)(1 - alpha))), the median, and the scoring settings used. Default "
                                   "images: the held-out validation images recorded at training; --good replaces "
                                   "them (and the whole calibration). Rewrites the checkpoint atomically (or --out).")
    c.add_argument("--checkpoint", required=True, help="checkpoint to calibrate (best.pt or last.pt)")
    c.add_argument("--good", action="append", metavar="DIR",
                   help="good images the model never trained on (file or folder; repeatable); category of each "
                        "image: --category, else the nearest enclosing folder named like a trained category, else "
                        "pooled only. Test and training images are refused")
    c.add_argument("--category", help="category of all --good images")
    c.add_argument("--data", help="dataset root of the recorded held-out images, if it moved")
    _add_alpha_arg(c, "default: the checkpoint's current one")
    _add_scoring_args(c, "default: the checkpoint's current setting")
    c.add_argument("--out", help="write the calibrated checkpoint here instead of over --checkpoint")
    c.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    c.add_argument("--device", default="cpu", help=DEVICE_HELP)
    _add_execution_args(c, training=False)

    e = sub.add_parser("test", help="evaluate a checkpoint on MVTec-layout test sets",
                       description="Score every test image of the checkpoint's own categories (others only with "
                                   "--categories, with a warning); print per category AUROCs, AUPRO, and the "
                                   "false-alarm and miss rates at the calibrated threshold; write JSON. The F1-max "
                                   "threshold is fitted on the test data and given for comparison only.")
    e.add_argument("--checkpoint", required=True, help="checkpoint (best.pt or last.pt)")
    e.add_argument("--data", required=True, help="dataset root in MVTec AD layout")
    e.add_argument("--categories", help="comma-separated categories (default: those the checkpoint was trained on)")
    e.add_argument("--out", required=True, help="results JSON path")
    e.add_argument("--save-maps", help="folder receiving CATEGORY.npz with the unblurred maps, masks, labels and scores "
                                        "(for 'dcamkd rescore')")
    _add_scoring_args(e, "default: the checkpoint's; a calibrated checkpoint refuses other values: recalibrate")
    e.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    e.add_argument("--device", default="cpu", help=DEVICE_HELP)
    e.add_argument("--impl", choices=IMPLS,
                   help="implementation of the fused ops (default: $DCAMKD_IMPL, else fused)")
    _add_execution_args(e, training=False)

    r = sub.add_parser("predict", help="decisions, scores and heatmaps for images",
                       description="Decide good/defective for every image with the checkpoint's calibration and "
                                   "write OUT/predictions.csv (path, category, calibration, score, normalised score, "
                                   "decision, threshold, heatmap) and one heatmap PNG per image (original and "
                                   "overlay side by side, colours in normalised units: 0 = median good image, "
                                   "1 = threshold) in a tree that mirrors the inputs relative to their deepest "
                                   "common folder.")
    r.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    r.add_argument("--checkpoint", required=True, help="calibrated checkpoint (best.pt or last.pt)")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--category", help="category of every image (default: the nearest enclosing folder named like "
                                      "a trained category, else the pooled calibration)")
    r.add_argument("--masks", default="auto",
                   help=f"outline ground-truth masks: {MASK_MODES[0]} (MVTec ground_truth next to test/, the "
                        f"default), {MASK_MODES[1]}, or a folder mirroring the inputs")
    r.add_argument("--no-heatmaps", action="store_true", help="write the CSV only")
    r.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    r.add_argument("--device", default="cpu", help=DEVICE_HELP)
    _add_execution_args(r, training=False)

    d = sub.add_parser("demo", help="offline end-to-end demo on bundled texture photos",
                       description="Build a small MVTec-layout dataset from the brick, grass and gravel photos "
                                   "bundled with scikit-image (with pasted defects and exact masks), train a "
                                   "multi-class model, evaluate it, write heatmaps and print the metrics. Needs no "
                                   "network and no data.")
    d.add_argument("--out", default="dcamkd-demo", help="output folder (default ./dcamkd-demo)")
    d.add_argument("--preset", default="stfpm", choices=PRESETS, help="preset: objective, DCAM variant and scoring (default stfpm)")
    d.add_argument("--steps", type=int, default=300, help="optimiser steps (default 300)")
    d.add_argument("--image-size", type=int, default=128, help="image size in pixels (default 128)")
    d.add_argument("--sigma", type=float,
                   help="Gaussian blur sigma of the anomaly map in pixels (default: the preset's)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    ab = sub.add_parser("ablate", help="run an ablation grid (train + test per cell), resumable",
                        description="Run every unfinished cell of a YAML grid: each cell is a full train + test "
                                    "with the grid's shared data, seed, batch size, learning rate and step budget. "
                                    "Writes OUT/table.md and OUT/table.json after every run; finished cells are "
                                    "skipped, interrupted ones resume.")
    ab.add_argument("--grid", required=True, help="grid YAML file (see results/ablation/grid.yaml)")
    ab.add_argument("--data", required=True, help="dataset root in MVTec AD layout")
    ab.add_argument("--out", required=True, help="output folder")
    ab.add_argument("--device", help="override the grid's device: cpu, cuda or cuda:N")
    ab.add_argument("--only", help="comma-separated cell names to run, in this order")
    ab.add_argument("--max-runs", type=int, help="stop after this many runs (resume later)")
    ab.add_argument("--seeds", help="comma-separated seeds to run (default: the grid's); runs held by another "
                                    "runner on the same --out are skipped, so several runners can share it")
    ab.add_argument("--save-maps", action="store_true",
                    help="also keep each run's test maps of best.pt under RUN/maps/ (for 'dcamkd rescore')")
    ab.add_argument("--quiet", action="store_true", help="no progress bars")

    rs = sub.add_parser("rescore", help="metrics of saved maps under other blurs and image-score rules",
                        description="Read the CATEGORY.npz files of 'dcamkd test --save-maps DIR' and "
                                    "print image AUROC per blur sigma and image-score rule, pixel AUROC and AUPRO "
                                    "per sigma, without retraining. Choose on runs other than those you report.")
    rs.add_argument("--maps", required=True, nargs="+", action="extend",
                    help="one or more folders of CATEGORY.npz saved maps (unblurred), e.g. one per seed; "
                         "several are averaged and the best (sigma, rule) is named")
    rs.add_argument("--sigmas", default="0,2,4,8", help="comma-separated blur sigmas in pixels (default 0,2,4,8)")
    rs.add_argument("--rules", default="max,topk:0.001,topk:0.01,topk:0.05",
                    help="comma-separated image-score rules: max or topk:FRACTION (default max,topk:0.001,topk:0.01,"
                         "topk:0.05)")
    rs.add_argument("--categories", help="comma-separated categories (default: every file)")
    rs.add_argument("--out", help="also write the full result as JSON here")

    cp = sub.add_parser("compare", help="one-sided Welch test between two cells of an ablation table",
                        description="Is cell B better than cell A? One-sided Welch t-test over seeds on the mean "
                                    "image AUROC and the mean AUPRO of OUT/table.json (best.pt, and last.pt where "
                                    "tested).")
    cp.add_argument("--table", required=True, help="table.json of 'dcamkd ablate'")
    cp.add_argument("a", help="baseline cell")
    cp.add_argument("b", help="cell claimed better")

    x = sub.add_parser("export", help="export the inference model of a checkpoint (ONNX)",
                       description="Export teacher, student, anomaly map (its fusion and optional blur) and image "
                                   "score to ONNX. Input 'images' float32 (B, 3, S, S) normalised with the "
                                   "checkpoint's mean/std; outputs 'maps' (B, S, S) and 'scores' (B,). The fused "
                                   "ops export through their reference decomposition.")
    x.add_argument("--checkpoint", required=True, help="checkpoint (best.pt or last.pt)")
    x.add_argument("--format", default=EXPORT_FORMATS[0], choices=EXPORT_FORMATS,
                   help=f"export format (default {EXPORT_FORMATS[0]})")
    x.add_argument("--out", required=True, help="output file, e.g. model.onnx")
    x.add_argument("--dynamic-batch", action="store_true", help="dynamic batch axis (default: static batch)")
    x.add_argument("--batch-size", type=int, default=1, help="batch size of a static export (default 1)")
    _add_scoring_args(x, "default: the checkpoint's; a calibrated checkpoint refuses other values: recalibrate")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")

    cd = sub.add_parser("compact-data", help="a small copy of an MVTec-layout dataset for carrying to a GPU machine",
                        description="Copy a dataset with images resized to SIZE x SIZE as high-quality JPEG and masks "
                                    "resized (bilinear, binarised at half range) as PNG. Keep the copy out of git.")
    cd.add_argument("--data", required=True, help="source root in MVTec AD layout")
    cd.add_argument("--out", required=True, help="destination root")
    cd.add_argument("--size", type=int, default=256, help="side in pixels (default 256)")
    cd.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    return p


def _cmd_ablate(a) -> int:
    from .ablate import run_grid
    from .device import check_device

    if a.device is not None:
        check_device(a.device)

    only = _categories(a.only) if a.only else None
    seeds = None
    if a.seeds:
        try:
            seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
        except ValueError:
            raise InvalidArgumentError(f"--seeds: expected comma-separated integers, got {a.seeds!r}") from None
    run_grid(a.grid, a.data, a.out, a.device, only, progress=not a.quiet, max_runs=a.max_runs, seeds=seeds,
             save_maps=a.save_maps)
    print((Path(a.out) / "table.md").read_text())
    return 0


def _cmd_rescore(a) -> int:
    from .io import atomic_write_json
    from .rescore import parse_rules, rescore_runs, rescore_table_md

    try:
        sigmas = [float(x) for x in a.sigmas.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgumentError(f"--sigmas: expected comma-separated numbers, got {a.sigmas!r}") from None
    res = rescore_runs(a.maps, sigmas, parse_rules(a.rules), _categories(a.categories) if a.categories else None)
    if a.out:
        atomic_write_json(a.out, res)
    print(rescore_table_md(res), end="")
    return 0


def _cmd_compare(a) -> int:
    from .ablate import compare_cells, compare_md

    print(compare_md(compare_cells(a.table, a.a, a.b)), end="")
    return 0


def _cmd_compact(a) -> int:
    from .ablate import make_compact_copy

    n, nbytes = make_compact_copy(a.data, a.out, a.size, a.quality)
    print(f"wrote {n} files, {nbytes / 2**20:.1f} MiB, to {a.out}")
    return 0


def _train_config(a: argparse.Namespace):
    from .config import preset_config

    return preset_config(
        a.preset, data=a.data, categories=_categories(a.categories), backbone=a.backbone,
        teacher_weights=a.teacher_weights, image_size=a.image_size, epochs=a.epochs, steps=a.steps,
        batch_size=a.batch_size, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
        grad_clip=a.grad_clip, seed=a.seed, fusion=a.fusion, sigma=a.sigma, image_score=a.image_score,
        topk_fraction=a.topk_fraction, false_alarm_rate=a.false_alarm_rate, device=a.device,
        impl=a.impl,
        cache_teacher=not a.no_cache_teacher, deterministic=a.deterministic or None,
        channels_last=False if a.no_channels_last else None, precision=a.precision, compile=a.compile or None,
        dcam=a.dcam, cos=a.cos, kl=a.kl, tau=a.tau, lambda_cos=a.lambda_cos, lambda_kl=a.lambda_kl,
        kd_reduction=a.kd_reduction, level_weights=a.level_weights, dcam_at_inference=a.dcam_at_inference,
        dcam_gate_floor=a.dcam_gate_floor,
        mine=a.mine, mine_start=a.mine_start, mine_final=a.mine_final, mine_factor=a.mine_factor,
        mine_ramp_steps=a.mine_ramp_steps,
    )


def _print_calibration(log: dict, best: Path) -> None:
    from .calibration import describe_calibration
    from .checkpoint import load_checkpoint

    if "skipped" in log["calibration"]:
        print(f"dcamkd: warning: {log['calibration']['skipped']}", file=sys.stderr)
    else:
        print(describe_calibration(load_checkpoint(best)["calibration"], title=f"calibration of {best}"))


def _cmd_train(a) -> int:
    from .checkpoint import load_checkpoint
    from .device import check_device
    from .evaluate import run_test
    from .train import train

    check_device(a.device)
    cfg = _train_config(a)
    t0 = time.time()
    log = train(cfg, a.out, resume=a.resume, progress=not a.quiet)
    from . import distributed

    best = Path(a.out) / "best.pt"
    if distributed.is_main():  # torchrun: rank 0 reports; every rank tests its shard
        last = log["epochs"][-1] if log["epochs"] else {}
        print(f"trained {log['total_steps']} steps in {time.time() - t0:.0f} s; last loss {last.get('loss')}, "
              f"best validation score {min((e['val_score'] for e in log['epochs']), default=None)}; "
              f"checkpoints in {a.out}")
        _print_calibration(log, best)
    if a.test:
        counts = load_checkpoint(best)["split"]["counts"].values()
        if not any(v["test_good"] + v["test_defective"] for v in counts):
            if distributed.is_main():
                print(f"no test images under {a.data} (test folders are optional): evaluation skipped")
        else:
            run_test(best, a.data, Path(a.out) / "results.json", device=a.device, impl=cfg.impl,
                     quiet=a.quiet, precision=cfg.precision, compile=cfg.compile)
    return 0


def _cmd_calibrate(a) -> int:
    from .calibration import calibrate_checkpoint, describe_calibration

    cal = calibrate_checkpoint(a.checkpoint, a.good, a.data, a.category, a.false_alarm_rate, a.fusion, a.sigma,
                               a.image_score, a.topk_fraction, a.device, a.batch_size, a.out,
                               precision=a.precision, compile=a.compile)
    print(describe_calibration(cal, title=f"calibration of {a.out or a.checkpoint}"))
    return 0


def _cmd_test(a) -> int:
    from .evaluate import run_test

    run_test(a.checkpoint, a.data, a.out, _categories(a.categories), a.save_maps, a.fusion, a.sigma,
             a.batch_size, a.device, a.impl,
             image_score=a.image_score, topk_fraction=a.topk_fraction, precision=a.precision,
             compile=a.compile)
    return 0


def _cmd_predict(a) -> int:
    from collections import Counter

    from .device import check_device
    from .predict import PREDICTIONS_CSV, predict

    check_device(a.device)
    rows = predict(a.checkpoint, a.inputs, a.out, a.batch_size, a.device, a.category, a.masks,
                   heatmaps=not a.no_heatmaps, precision=a.precision, compile=a.compile)
    counts = Counter(r["decision"] for r in rows)
    used = Counter(r["calibration"] for r in rows)
    print(f"{len(rows)} images: {counts.get('defective', 0)} defective, {counts.get('good', 0)} good "
          f"(calibration used: {', '.join(f'{k} {v}' for k, v in sorted(used.items()))}); "
          f"{Path(a.out) / PREDICTIONS_CSV}" + ("" if a.no_heatmaps else f" and heatmaps under {a.out}"))
    return 0


def _cmd_demo(a) -> int:
    from .config import preset_config
    from .demo_data import make_demo_dataset
    from .evaluate import run_test
    from .predict import predict
    from .train import train

    out = Path(a.out)
    data = make_demo_dataset(out / "data", image_size=a.image_size, seed=a.seed)
    cfg = preset_config(a.preset, data=str(data), image_size=a.image_size, steps=a.steps, batch_size=8,
                        lr=0.1, seed=a.seed, sigma=a.sigma)
    t0 = time.time()
    if (out / "model" / "last.pt").is_file():  # a previous demo run: the demo starts afresh
        import shutil

        shutil.rmtree(out / "model")
    log = train(cfg, out / "model", progress=not a.quiet)
    best = out / "model" / "best.pt"
    _print_calibration(log, best)
    res = run_test(best, str(data), out / "results.json", quiet=a.quiet)
    test_dirs = sorted((data).glob("*/test/*"))
    picks = [str(p) for d in test_dirs for p in sorted(d.iterdir())[:2]]
    predict(out / "model" / "best.pt", picks, out / "heatmaps")
    print(f"demo finished in {time.time() - t0:.0f} s: mean image AUROC {res['mean']['image_auroc']:.3f}, "
          f"pixel AUROC {res['mean']['pixel_auroc']:.3f}, AUPRO {res['mean']['aupro']:.3f}; "
          f"results in {out / 'results.json'}, heatmaps in {out / 'heatmaps'}")
    return 0


def _cmd_export(a) -> int:
    from .export import export_onnx

    path = export_onnx(a.checkpoint, a.out, a.dynamic_batch, a.batch_size, a.fusion, a.sigma, a.opset,
                       image_score=a.image_score, topk_fraction=a.topk_fraction)
    print(f"wrote {path} ({'dynamic' if a.dynamic_batch else f'static batch {a.batch_size}'} batch, "
          f"{path.stat().st_size / 2**20:.1f} MiB)")
    return 0


_COMMANDS = {"train": _cmd_train, "calibrate": _cmd_calibrate, "test": _cmd_test, "predict": _cmd_predict, "demo": _cmd_demo,
             "ablate": _cmd_ablate, "compact-data": _cmd_compact, "export": _cmd_export,
             "rescore": _cmd_rescore, "compare": _cmd_compare}


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"dcamkd: warning: {' '.join(str(message).split())}\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``dcamkd`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    shown = warnings.formatwarning
    warnings.formatwarning = _format_warning  # one line, like the errors
    finished = False
    try:
        status = _COMMANDS[args.command](args)
        finished = True
        return status
    except DcamkdError as e:
        if os.environ.get("DCAMKD_TRACEBACK"):
            raise
        msg = " ".join(str(e).split())
        print(f"dcamkd: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable --out, a file where a folder is expected, a full disk...
        if os.environ.get("DCAMKD_TRACEBACK"):
            raise
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"dcamkd: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dcamkd: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = shown
        if "dcamkd.distributed" in sys.modules:  # leave a process group that training joined
            sys.modules["dcamkd.distributed"].teardown(sync=finished)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
