"""Scoring a test set and computing the metrics (method.md section 7).

Per category: anomaly maps at the evaluation resolution (the model's input size, 256 x 256 by
default; masks resized bilinearly and binarised at half range by :mod:`dcamkd.data`), image
score = map maximum; image AUROC, pixel AUROC, AUPRO@0.3, pro_dfr and F1-max through a
:class:`dcamkd.metrics.MetricAccumulator`, which keeps every map and mask at the evaluation size
and computes the exact metric functions (about 320 KiB per 256 x 256 image); then the mean over
categories.

Under ``torchrun`` (several processes in one process group) every rank scores a contiguous shard
of each category's test set, the accumulators are gathered to rank 0 and merged in rank order,
i.e. in the order of one pass, so rank 0 computes the numbers a single process computes; every
rank returns them (:mod:`dcamkd.distributed`). All ranks must call :func:`evaluate`.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from . import distributed as D
from .errors import EmptyMaskWarning
from .io import atomic_write
from .metrics import MetricAccumulator
from .scoring import AnomalyModel

__all__ = ["METRIC_KEYS", "evaluate_category", "evaluate", "format_table", "RESULTS_FORMAT", "run_test"]

#: Format version of results.json (``dcamkd test``); checkpoints carry ``train.CHECKPOINT_FORMAT``.
RESULTS_FORMAT = 1

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "pro_dfr", "image_f1max")


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
) -> dict[str, Any]:
    """Score one category's test set and compute its metrics.

    Args:
        model: inference model in eval mode on ``device``.
        dataset: a :class:`dcamkd.data.ImageDataset` with masks (items with ``image``,
            ``mask``, ``label``, ``path``; ``mask_erased`` is counted when present).
        save_maps: if set, a ``.npz`` path receiving ``maps`` (N, H, W) float32,
            ``masks`` (N, H, W) bool, ``labels`` (N,), ``scores`` (N,) and ``paths``
            (written by rank 0).
        category: the name used in warnings (default: the items' ``category``).
        shard: in a process group of several processes (``torchrun``), score this rank's
            contiguous shard (:func:`dcamkd.distributed.shard_range`) and merge on rank 0; every
            rank must then call this function. False: score everything here.

    Returns:
        dict with the metric keys (None when undefined, reason under ``'undefined'``),
        ``num_images``, ``n_good``, ``n_defective`` and ``n_defective_without_mask_pixels``
        (defective images whose mask is empty at the evaluation size; when non-zero an
        :class:`~dcamkd.errors.EmptyMaskWarning` says how many and what the metrics do with
        them); sharded, ``images_per_rank``. The same dict on every rank.
    """
    from tqdm import tqdm

    sharded = shard and D.is_distributed()
    main = D.is_main() or not sharded
    part = Subset(dataset, D.shard_range(len(dataset), D.rank(), D.world_size())) if sharded else dataset
    acc = MetricAccumulator()
    paths: list[str] = []
    n_erased = 0
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=0)
    for batch in tqdm(loader, disable=not (progress and main), desc="test", leave=False):
        x = batch["image"].to(device)
        maps, scores = model(x)
        acc.update(maps.float().cpu(), batch["mask"][:, 0] > 0.5, batch["label"], scores.float().cpu())
        paths.extend(batch["path"])
        if "mask_erased" in batch:
            n_erased += int(batch["mask_erased"].sum())
        if category is None and batch.get("category"):
            category = batch["category"][0]
    if sharded:  # rank order = dataset order: the merged state is that of one pass
        parts = D.gather_to_main((acc.state_dict(), paths, n_erased))
        if parts is not None:
            acc, paths, n_erased = MetricAccumulator(acc.fpr_limit, acc.num_thresholds), [], 0
            per_rank = [len(p) for _, p, _ in parts]
            for state, p, e in parts:
                acc.merge(MetricAccumulator.from_state_dict(state))
                paths += p
                n_erased += e
    res: Optional[dict[str, Any]] = None
    if main:
        res = acc.compute()
        maps, masks, labels, scores = acc.arrays()
        n_def = int(labels.sum())
        res["n_defective"] = n_def
        res["n_good"] = len(labels) - n_def
        n_empty = acc.num_defective_without_defect_pixels()
        res["n_defective_without_mask_pixels"] = n_empty
        if sharded:
            res["images_per_rank"] = per_rank
        if n_empty:
            _warn_empty_masks(category or "test set", n_empty, n_erased, n_def, maps.shape[1:])
        if save_maps is not None:
            arrays = dict(maps=maps.astype(np.float32, copy=False), masks=masks, labels=labels, scores=scores,
                          paths=np.array(paths))
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
) -> dict[str, Any]:
    """Evaluate every category; returns ``{'per_category': {cat: metrics}, 'mean': {...}}``.

    The mean of a metric is over the categories where it is defined. Under ``torchrun``
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
    for cat, ds in test_by_category.items():
        sm = Path(save_maps_dir) / f"{cat}.npz" if save_maps_dir is not None else None
        per[cat] = evaluate_category(model, ds, device, batch_size, sm, progress, category=cat, shard=shard)
    mean = {}
    for k in METRIC_KEYS + ("pixel_f1max",):
        vals = [r[k] for r in per.values() if r.get(k) is not None]
        mean[k] = float(np.mean(vals)) if vals else None
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


def _test_sets(data: str, categories, ckpt: dict):
    from .data import build_datasets

    cfg = ckpt["config"]
    _, _, tests, _ = build_datasets(data, categories, ckpt["image_size"], ckpt["mean"], ckpt["std"],
                                    cfg["val_fraction"], cfg["seed"])
    return tests


def run_test(checkpoint, data, out, categories=None, save_maps=None, fusion=None, sigma=None,
             batch_size=16, device="cpu", impl=None, quiet=False) -> dict:
    """Evaluate ``checkpoint`` on ``data`` (``dcamkd test``); write ``out`` (JSON) atomically;
    return the results. Under ``torchrun`` every rank scores a shard and rank 0 writes (see
    :func:`evaluate`). ``impl``: implementation of the fused ops (:func:`dcamkd.ops.use`; None
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
    if D.is_main():
        atomic_write_json(out, res)
        print(format_table(res, ("image_auroc", "pixel_auroc", "aupro", "pro_dfr", "image_f1max")))
    return res
