"""Scoring a test set and computing the metrics (method.md section 7).

Per category: anomaly maps at the evaluation resolution (the model's input size, 256 x 256 by
default; masks resized bilinearly and binarised at half range by :mod:`dcamkd.data`), image
score = map maximum; image AUROC, pixel AUROC, AUPRO@0.3, pro_dfr and F1-max through a
streaming :class:`dcamkd.metrics.MetricAccumulator` (memory bounded by its histograms, not by
the pixel count); then the mean over categories.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from .io import atomic_write
from .metrics import MetricAccumulator
from .scoring import AnomalyModel

__all__ = ["METRIC_KEYS", "RESULTS_FORMAT", "evaluate_category", "evaluate", "format_table", "run_test"]

#: Format version of results.json (``dcamkd test``); checkpoints carry ``train.CHECKPOINT_FORMAT``.
RESULTS_FORMAT = 1

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "pro_dfr", "image_f1max")


def _score_range(model: AnomalyModel, n_levels: int = 3) -> tuple[float, float]:
    return (0.0, 2.0 * n_levels) if model.fusion == "sum" else (0.0, 2.0**n_levels)


@torch.no_grad()
def evaluate_category(
    model: AnomalyModel,
    dataset,
    device: str = "cpu",
    batch_size: int = 16,
    save_maps: Optional[str | os.PathLike] = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score one category's test set and compute its metrics.

    Args:
        model: inference model in eval mode on ``device``.
        dataset: a :class:`dcamkd.data.ImageDataset` with masks.
        save_maps: if set, a ``.npz`` path receiving ``maps`` (N, H, W) float32,
            ``masks`` (N, H, W) bool, ``labels`` (N,), ``scores`` (N,) and ``paths``.

    Returns:
        dict with the metric keys (None when undefined, reason under ``'undefined'``) and
        ``n_good``, ``n_defective``.
    """
    from tqdm import tqdm

    acc = MetricAccumulator(score_range=_score_range(model))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    keep_maps, keep_masks, keep_labels, keep_scores, keep_paths = [], [], [], [], []
    for batch in tqdm(loader, disable=not progress, desc="test", leave=False):
        x = batch["image"].to(device)
        maps, scores = model(x)
        maps, scores = maps.float().cpu(), scores.float().cpu()
        masks = batch["mask"][:, 0] > 0.5
        labels = batch["label"]
        acc.update(maps, masks, labels, scores)
        if save_maps is not None:
            keep_maps.append(maps.numpy().astype(np.float32))
            keep_masks.append(masks.numpy())
            keep_labels.append(labels.numpy())
            keep_scores.append(scores.numpy())
            keep_paths.extend(batch["path"])
    res = acc.compute()
    if save_maps is not None:
        arrays = dict(maps=np.concatenate(keep_maps), masks=np.concatenate(keep_masks),
                      labels=np.concatenate(keep_labels), scores=np.concatenate(keep_scores), paths=np.array(keep_paths))
        atomic_write(save_maps, lambda f: np.savez_compressed(f, **arrays))
    n_def = int(np.asarray(dataset.labels).sum())
    res["n_defective"] = n_def
    res["n_good"] = len(dataset) - n_def
    return res


def evaluate(
    model: AnomalyModel,
    test_by_category: dict,
    device: str = "cpu",
    batch_size: int = 16,
    save_maps_dir: Optional[str | os.PathLike] = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate every category; returns ``{'per_category': {cat: metrics}, 'mean': {...}}``.

    The mean of a metric is over the categories where it is defined.
    """
    per = {}
    for cat, ds in test_by_category.items():
        sm = Path(save_maps_dir) / f"{cat}.npz" if save_maps_dir is not None else None
        per[cat] = evaluate_category(model, ds, device, batch_size, sm, progress)
    mean = {}
    for k in METRIC_KEYS + ("pixel_f1max",):
        vals = [r[k] for r in per.values() if r.get(k) is not None]
        mean[k] = float(np.mean(vals)) if vals else None
    return {"per_category": per, "mean": mean}


def format_table(results: dict[str, Any], keys=("image_auroc", "pixel_auroc", "aupro")) -> str:
    """A Markdown table of per-category and mean metrics (in percent, 2 decimals)."""
    def f(v):
        return "-" if v is None else f"{100 * v:.2f}"

    head = "| category | " + " | ".join(keys) + " |"
    sep = "|---|" + "---|" * len(keys)
    rows = [f"| {cat} | " + " | ".join(f(r.get(k)) for k in keys) + " |" for cat, r in results["per_category"].items()]
    rows.append("| **mean** | " + " | ".join(f(results["mean"].get(k)) for k in keys) + " |")
    return "\n".join([head, sep, *rows])


def _test_sets(data: str, categories, ckpt: dict):
    from .data import build_datasets

    cfg = ckpt["config"]
    _, _, tests, _ = build_datasets(data, categories, ckpt["image_size"], ckpt["mean"], ckpt["std"],
                                    cfg["val_fraction"], cfg["seed"])
    return tests


def run_test(checkpoint, data, out, categories=None, save_maps=None, fusion=None, sigma=None,
             batch_size=16, device="cpu", impl=None, quiet=False) -> dict:
    """Evaluate ``checkpoint`` on ``data`` (``dcamkd test``); write ``out`` (JSON) atomically;
    return the results. ``impl``: implementation of the fused ops (:func:`dcamkd.ops.use`; None
    leaves the setting as it is)."""
    from . import __version__
    from .io import atomic_write_json
    from .ops import use
    from .train import load_checkpoint, model_from_checkpoint

    ck = load_checkpoint(checkpoint)
    model, cfg = model_from_checkpoint(ck, device, fusion, sigma)
    tests = _test_sets(data, categories, ck)
    t0 = time.time()
    with use(impl):
        res = evaluate(model, tests, device, batch_size, save_maps, progress=not quiet)
    res["seconds"] = time.time() - t0
    res["checkpoint"] = str(checkpoint)
    res["checkpoint_step"] = ck.get("step")
    res["data"] = str(data)
    res["preset"] = cfg.preset
    res["fusion"], res["sigma"] = model.fusion, model.sigma
    res["dcamkd_version"] = __version__
    res["format_version"] = RESULTS_FORMAT
    atomic_write_json(out, res)
    print(format_table(res, ("image_auroc", "pixel_auroc", "aupro", "pro_dfr", "image_f1max")))
    return res
