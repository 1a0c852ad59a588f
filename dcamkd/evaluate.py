"""Scoring a test set and computing the metrics (method.md section 7); ``dcamkd test``.

Per category: anomaly maps at the evaluation resolution (the model's input size, 256 x 256 by
default; masks resized bilinearly and binarised at half range by :mod:`dcamkd.data`), image
score by the checkpoint's rule (the preset's: the top-1 % mean of a sigma-4 map for stfpm, stfpm-kd and dcam, the maximum for dcam-paper); image AUROC, pixel AUROC, AUPRO@0.3, pro_dfr and F1-max through a
:class:`dcamkd.metrics.MetricAccumulator`, which keeps every map and mask at the evaluation size
and computes the exact metric functions (about 320 KiB per 256 x 256 image); then the mean over
categories. With a calibrated checkpoint, also the false-alarm rate on good test images and the
miss rate on defective ones at the calibrated threshold (:mod:`dcamkd.calibration`), and, for
comparison only, the F1-max threshold fitted on the test data.

:func:`run_test` is the one evaluation of a checkpoint that the command line (``dcamkd test``,
``dcamkd train --test``, ``dcamkd demo``) and the ablation runner call.

Under ``torchrun`` (several processes in one process group) every rank scores a contiguous shard
of each category's test set, the accumulators are gathered to rank 0 and merged in rank order,
i.e. in the order of one pass, so rank 0 computes the numbers a single process computes; every
rank returns them (:mod:`dcamkd.distributed`). All ranks must call :func:`evaluate`.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from . import distributed as D
from .errors import EmptyMaskWarning, MetricUndefinedError, NonFiniteError
from .io import atomic_write
from .metrics import MetricAccumulator, f1_max_threshold, rates_at_threshold
from .config import ScoringSettings
from .scoring import AnomalyModel

__all__ = ["METRIC_KEYS", "RESULTS_FORMAT", "evaluate_category", "evaluate", "format_table",
           "format_decisions", "run_test"]

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "pro_dfr", "image_f1max")
#: Format version of results.json.
RESULTS_FORMAT = 1


def _warn_empty_masks(category: str, n_empty: int, n_erased: int, n_def: int, hw) -> None:
    """One warning per category: defective images without a defect pixel at the evaluation size."""
    cause = (f"{n_erased} of them emptied by the resize to {hw[0]}x{hw[1]} (a defect thinner than about half an "
             f"output pixel vanishes under the > 0.5 rule)" if n_erased else "their mask files are empty")
    if 0 < n_erased < n_empty:
        cause += f", {n_empty - n_erased} with empty mask files"
    warnings.warn(
        f"{category}: {n_empty} of {n_def} defective test images have no defect pixel at the evaluation size "
        f"({cause}); they count as defective in the image metrics, and all their pixels count as defect-free in "
        f"the pixel metrics (pixel AUROC, AUPRO, pro_dfr, pixel F1-max)",
        EmptyMaskWarning, stacklevel=3)


def _non_finite(paths, indices, cause) -> None:
    """Raise :class:`NonFiniteError` naming the image(s) of a batch whose anomaly map is not
    finite (NaN or Inf in the image's features: a corrupt image file or NaN weights)."""
    names = [paths[i] for i in (indices if indices else range(len(paths)))]
    more = f" (and {len(names) - 1} more in this batch)" if len(names) > 1 else ""
    raise NonFiniteError(f"{names[0]}: the anomaly map is not finite (NaN or Inf in its features){more}; "
                         f"check the image file and the checkpoint's weights") from cause


@torch.no_grad()
def evaluate_category(
    model: AnomalyModel,
    dataset,
    device: str = "cpu",
    batch_size: int = 16,
    save_maps: Optional[str | os.PathLike] = None,
    progress: bool = False,
    category: Optional[str] = None,
    shard: bool = True,
    threshold: Optional[float] = None,
) -> dict[str, Any]:
    """Score one category's test set and compute its metrics.

    Args:
        model: inference model in eval mode on ``device``.
        dataset: a :class:`dcamkd.data.ImageDataset` with masks (items with ``image``,
            ``mask``, ``label``, ``path``; ``mask_erased`` is counted when present).
        save_maps: if set, a ``.npz`` path receiving ``maps`` (N, H, W) float32, **unblurred**
            whatever the model's blur (so :mod:`dcamkd.rescore` can try every sigma), ``masks``
            (N, H, W) bool, ``labels`` (N,), ``scores`` (N,) (the model's image scores, under
            its own settings), ``paths``, ``scoring`` (the settings of the saved maps as JSON:
            the model's with sigma 0) and ``model_scoring`` (the model's
            :class:`ScoringSettings` as JSON), written by rank 0. The metrics are those of the
            model's own (blurred) maps.
        category: the name used in warnings (default: the items' ``category``).
        shard: in a process group of several processes (``torchrun``), score this rank's
            contiguous shard (:func:`dcamkd.distributed.shard_range`) and merge on rank 0; every
            rank must then call this function. False: score everything here.
        threshold: a calibrated image threshold (raw units); adds ``at_threshold``
            (:func:`dcamkd.metrics.rates_at_threshold`: false-alarm and miss rates and counts).

    Returns:
        dict with the metric keys (None when undefined, reason under ``'undefined'``),
        ``num_images``, ``n_good``, ``n_defective`` and ``n_defective_without_mask_pixels``
        (defective images whose mask is empty at the evaluation size; when non-zero an
        :class:`~dcamkd.errors.EmptyMaskWarning` says how many and what the metrics do with
        them); ``image_f1max_threshold`` (the threshold of the image F1-max, fitted on this test
        set: for comparison only; None when undefined); ``at_threshold`` when ``threshold`` is
        given; sharded, ``images_per_rank``. The same dict on every rank.
    """
    from tqdm import tqdm

    sharded = shard and D.is_distributed()
    main = D.is_main() or not sharded
    part = Subset(dataset, D.shard_range(len(dataset), D.rank(), D.world_size())) if sharded else dataset
    acc = MetricAccumulator()
    paths: list[str] = []
    n_erased = 0
    keep_raw = save_maps is not None and model.sigma != 0.0  # maps saved for rescore are unblurred
    raw: list[np.ndarray] = []
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=0)
    for batch in tqdm(loader, disable=not (progress and main), desc="test", leave=False):
        x = batch["image"].to(device)
        try:
            if keep_raw:  # what model(x) computes, keeping the maps before the blur
                unblurred = model.unblurred_maps(x)
                raw.append(unblurred.cpu().numpy())
                maps, scores = model.score_maps(unblurred)
            else:
                maps, scores = model(x)
        except NonFiniteError as e:
            _non_finite(batch["path"], getattr(e, "batch_indices", None), e)
        finite = torch.isfinite(maps).flatten(1).all(1)
        if not bool(finite.all()):
            _non_finite(batch["path"], (~finite).nonzero().flatten().tolist(), None)
        acc.update(maps.float().cpu(), batch["mask"][:, 0] > 0.5, batch["label"], scores.float().cpu())
        paths.extend(batch["path"])
        if "mask_erased" in batch:
            n_erased += int(batch["mask_erased"].sum())
        if category is None and batch.get("category"):
            category = batch["category"][0]
    if sharded:  # rank order = dataset order: the merged state is that of one pass
        parts = D.gather_to_main((acc.state_dict(), paths, n_erased, raw))
        if parts is not None:
            acc, paths, n_erased, raw = MetricAccumulator(acc.fpr_limit, acc.num_thresholds), [], 0, []
            per_rank = [len(p) for _, p, _, _ in parts]
            for state, p, e, r in parts:
                acc.merge(MetricAccumulator.from_state_dict(state))
                paths += p
                n_erased += e
                raw += r
    res: Optional[dict[str, Any]] = None
    if main:
        res = acc.compute()
        maps, masks, labels, scores = acc.arrays()
        n_def = int(labels.sum())
        res["n_defective"] = n_def
        res["n_good"] = len(labels) - n_def
        try:
            res["image_f1max_threshold"] = f1_max_threshold(scores, labels)[1]
        except MetricUndefinedError:
            res["image_f1max_threshold"] = None
        if threshold is not None:
            res["at_threshold"] = rates_at_threshold(scores, labels, threshold)
        n_empty = acc.num_defective_without_defect_pixels()
        res["n_defective_without_mask_pixels"] = n_empty
        if sharded:
            res["images_per_rank"] = per_rank
        if n_empty:
            _warn_empty_masks(category or "test set", n_empty, n_erased, n_def, maps.shape[1:])
        if save_maps is not None:
            saved = np.concatenate(raw) if keep_raw else maps.astype(np.float32, copy=False)
            arrays = dict(maps=saved, masks=masks, labels=labels, scores=scores, paths=np.array(paths))
            if isinstance(getattr(model, "settings", None), ScoringSettings):  # read by dcamkd.rescore
                arrays["scoring"] = np.array(json.dumps({**model.settings.to_dict(), "sigma": 0.0}))
                arrays["model_scoring"] = np.array(json.dumps(model.settings.to_dict()))
            atomic_write(save_maps, lambda f: np.savez_compressed(f, **arrays))
    return D.broadcast_from_main(res) if sharded else res


def evaluate(
    model: AnomalyModel,
    test_by_category: dict,
    device: str = "cpu",
    batch_size: int = 16,
    save_maps_dir: Optional[str | os.PathLike] = None,
    progress: bool = False,
    shard: bool = True,
    thresholds: Optional[dict[str, float]] = None,
) -> dict[str, Any]:
    """Evaluate every category; returns ``{'per_category': {cat: metrics}, 'mean': {...}}``.

    ``thresholds`` maps categories to calibrated thresholds (see :func:`evaluate_category`).
    The mean of a metric (and of ``false_alarm_rate``/``miss_rate`` at the thresholds) is over
    the categories where it is defined. Under ``torchrun``
    (``WORLD_SIZE > 1``) with ``shard`` (default), this joins the process group
    (:func:`dcamkd.distributed.setup`; with ``device='cuda'`` each rank moves ``model`` to
    ``cuda:LOCAL_RANK``), every rank scores its shard of every category (see
    :func:`evaluate_category`) and every rank returns rank 0's results, which equal those of one
    process, with ``world_size`` added. Every rank must call it.
    """
    if shard:
        on, dev = D.setup(device)
        if on and dev != device:
            model.to(dev)
        device = dev
    per = {}
    thresholds = thresholds or {}
    for cat, ds in test_by_category.items():
        sm = Path(save_maps_dir) / f"{cat}.npz" if save_maps_dir is not None else None
        per[cat] = evaluate_category(model, ds, device, batch_size, sm, progress, category=cat, shard=shard,
                                     threshold=thresholds.get(cat))
    mean = {}
    for k in METRIC_KEYS + ("pixel_f1max",):
        vals = [r[k] for r in per.values() if r.get(k) is not None]
        mean[k] = float(np.mean(vals)) if vals else None
    for k in ("false_alarm_rate", "miss_rate"):
        vals = [r["at_threshold"][k] for r in per.values() if r.get("at_threshold", {}).get(k) is not None]
        if vals:
            mean[k] = float(np.mean(vals))
    out: dict[str, Any] = {"per_category": per, "mean": mean}
    if shard and D.is_distributed():
        out["world_size"] = D.world_size()
    return out


def format_table(results: dict[str, Any], keys=("image_auroc", "pixel_auroc", "aupro")) -> str:
    """A Markdown table of per-category and mean metrics (in percent, 2 decimals)."""
    def f(v):
        return "-" if v is None else f"{100 * v:.2f}"

    head = "| category | " + " | ".join(keys) + " |"
    sep = "|---|" + "---|" * len(keys)
    rows = [f"| {cat} | " + " | ".join(f(r.get(k)) for k in keys) + " |" for cat, r in results["per_category"].items()]
    rows.append("| **mean** | " + " | ".join(f(results["mean"].get(k)) for k in keys) + " |")
    return "\n".join([head, sep, *rows])


def format_decisions(results: dict[str, Any]) -> str:
    """A Markdown table of the decisions at the calibrated thresholds, per category: the
    calibration used, its threshold, false alarms among the good test images and misses among the
    defective ones (percent and counts), and the F1-max threshold fitted on the test data (for
    comparison only)."""
    head = ("| category | calibration | threshold | false alarms (good images) | misses (defective images) "
            "| F1-max threshold (fitted on test data) |")
    rows = [head, "|---|---|---|---|---|---|"]

    def rate(r, k, n_k, tot_k):
        return "-" if r[k] is None else f"{100 * r[k]:.1f} % ({r[n_k]}/{r[tot_k]})"

    for cat, r in results["per_category"].items():
        t = r.get("at_threshold")
        f1t = "-" if r.get("image_f1max_threshold") is None else f"{r['image_f1max_threshold']:.4f}"
        if t is None:
            rows.append(f"| {cat} | none | - | - | - | {f1t} |")
            continue
        rows.append(f"| {cat} | {r['calibration']['used']} | {t['threshold']:.4f} | "
                    f"{rate(t, 'false_alarm_rate', 'n_false_alarms', 'n_good')} | "
                    f"{rate(t, 'miss_rate', 'n_misses', 'n_defective')} | {f1t} |")
    return "\n".join(rows)


def _warn(msg: str) -> None:
    if D.is_main():
        print(f"dcamkd: warning: {msg}", file=sys.stderr, flush=True)


def _say(msg: str) -> None:
    if D.is_main():
        print(msg, flush=True)


def run_test(checkpoint, data, out, categories=None, save_maps=None, fusion=None, sigma=None,
             batch_size: int = 16, device: str = "cpu", impl=None, quiet: bool = False,
             image_score=None, topk_fraction=None, precision=None, compile=None) -> dict[str, Any]:
    """Evaluate a checkpoint on the test sets of an MVTec-layout root (``dcamkd test``); write
    ``out`` (JSON) atomically; print the metrics and the decisions; return the results.

    Categories: by default the checkpoint's own (those it was trained on; every category of
    ``data`` for a checkpoint that does not record them). Others only when named in
    ``categories``, with a warning: their decisions use the pooled calibration. A category
    without test images is skipped with a message. Under ``torchrun`` every rank scores a shard
    (:func:`evaluate`) and rank 0 writes and prints; every rank must call it.

    ``impl``: implementation of the fused ops (:func:`dcamkd.ops.use`; None leaves the setting
    as it is). ``precision`` (``'fp32'`` or ``'bf16'``) and ``compile``: how to score (default:
    the checkpoint's training configuration; :func:`dcamkd.checkpoint.model_from_checkpoint`);
    the results record the precision used.

    Scoring settings: the checkpoint's (its calibration's). ``fusion``, ``sigma``,
    ``image_score``, ``topk_fraction`` may override them only on an uncalibrated checkpoint
    (:func:`dcamkd.checkpoint.resolve_scoring`).

    Returns:
        The results dict: ``per_category`` (metrics; with a calibration also ``calibration``:
        the calibration used, its threshold, median, alpha, n, expected false-alarm rate and
        interval, and ``at_threshold``: false-alarm and miss rates and counts on the test set;
        ``image_f1max_threshold``: fitted on the test data, for comparison only), ``mean``,
        ``scoring`` (settings), ``calibrated``, ``categories_trained``, ``skipped`` (categories
        without test images), and run metadata.

    Raises:
        MissingFileError: the checkpoint, ``data`` or a category is missing (the checkpoint's own
            categories missing from ``data``: pass ``categories``).
        DatasetError: no category with test images.
        InvalidArgumentError: a bad device or a refused scoring override.
    """
    from ._version import __version__
    from .calibration import select_calibration
    from .checkpoint import load_checkpoint, model_from_checkpoint, resolve_scoring, trained_categories
    from .data import build_datasets, list_categories
    from .device import check_device
    from .errors import DatasetError, MissingFileError
    from .io import atomic_write_json
    from .ops import use

    check_device(device)
    ck = load_checkpoint(checkpoint)
    settings = resolve_scoring(ck, str(checkpoint), fusion=fusion, sigma=sigma, image_score=image_score,
                               topk_fraction=topk_fraction)
    trained = trained_categories(ck)
    available = list_categories(data)
    if categories is None:
        cats = trained if trained is not None else available
        missing = [c for c in cats if c not in available]
        if missing:
            raise MissingFileError(
                f"--data {data}: the checkpoint's categories {', '.join(missing)} are not there (it holds "
                f"{', '.join(available)}); pass --categories to evaluate others")
    else:
        cats = list(categories)
        if trained is not None:
            for c in cats:
                if c not in trained:
                    _warn(f"category {c!r} was not among the categories the model was trained on "
                          f"({', '.join(trained)}); it is evaluated as asked, with the pooled calibration")
    model, cfg = model_from_checkpoint(ck, device, **settings.to_dict(), precision=precision, compile=compile)
    _, _, tests, _ = build_datasets(data, cats, ck["image_size"], ck["mean"], ck["std"], cfg.val_fraction, cfg.seed)
    skipped = [c for c, ds in tests.items() if len(ds) == 0]
    for c in skipped:
        _say(f"category {c}: no test images (no {Path(data) / c / 'test'} folder with images); evaluation "
             f"skipped")
    tests = {c: ds for c, ds in tests.items() if len(ds)}
    if not tests:
        raise DatasetError(f"--data {data}: no test images for {', '.join(cats)}; nothing to evaluate "
                           f"(calibration and prediction still work)")
    cal = ck.get("calibration")
    chosen = {c: select_calibration(cal, c if trained is None or c in trained else None) for c in tests} if cal else {}
    if not cal:
        _warn(f"checkpoint {checkpoint} holds no calibration: no decisions are measured; run dcamkd calibrate "
              f"--checkpoint {checkpoint}")
    t0 = time.time()
    with use(impl):
        res = evaluate(model, tests, device, batch_size, save_maps, progress=not quiet,
                       thresholds={c: e["threshold"] for c, (_, e) in chosen.items()})
    for c, (name, e) in chosen.items():
        res["per_category"][c]["calibration"] = {
            "used": name, **{k: e[k] for k in ("threshold", "median", "alpha", "n", "k", "expected_false_alarm_rate",
                                               "interval", "interval_level", "too_small", "note")}}
    res["seconds"] = time.time() - t0
    res["checkpoint"] = str(checkpoint)
    res["checkpoint_step"] = ck.get("step")
    res["data"] = str(data)
    res["preset"] = cfg.preset
    res["scoring"] = settings.to_dict()
    res["precision"] = model.precision
    res["fusion"], res["sigma"] = model.fusion, model.sigma
    res["calibrated"] = bool(cal)
    res["false_alarm_rate_target"] = cal["alpha"] if cal else None
    res["categories_trained"] = trained
    res["skipped"] = skipped
    res["image_f1max_threshold_note"] = "fitted on the test data: for comparison only, not for decisions"
    res["dcamkd_version"] = __version__
    res["format_version"] = RESULTS_FORMAT
    if D.is_main():
        atomic_write_json(out, res)
        _say(format_table(res, METRIC_KEYS))
        if cal:
            _say(f"\ndecisions at the calibrated thresholds (target false-alarm rate {cal['alpha']:g}, "
                 f"{settings.describe()}):\n{format_decisions(res)}")
    return res
