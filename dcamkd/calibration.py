"""From anomaly scores to decisions: thresholds calibrated on good images the model never
trained on, normalised scores, and the ``dcamkd calibrate`` command (method.md section 5: "a
decision threshold is a separate, fitted step that uses good images only").

**Threshold.** For a target false-alarm rate ``alpha`` on good images and ``n`` calibration
scores, the threshold is the ``k``-th smallest score with ``k = ceil((n + 1)(1 - alpha))``. If the
calibration images and a new good image are exchangeable (drawn alike; nothing else is assumed
about the score distribution), the new image scores at or above it with probability
``(n + 1 - k) / (n + 1) <= alpha`` (the split-conformal argument; Vovk et al. 2005, Angelopoulos
& Bates 2021, section 1). That is an average over calibration sets: the false-alarm rate of the
threshold actually chosen is ``Beta(n + 1 - k, k)``-distributed, and its central 90 % interval is
reported beside it. When ``n + 1 < 1 / alpha`` no order statistic reaches ``alpha``; the
threshold is then the largest calibration score, whose expected false-alarm rate is
``1 / (n + 1)``, and the calibration says so in its ``note``.

**Decision (the tie rule).** An image is *defective* when its raw score is >= the threshold,
else *good*.

**Normalised score.** ``(raw - median) / (threshold - median)``, with the median of the
calibration scores: 0 is a typical good image, 1 the threshold, on one scale for every category
(raw scores of a multi-class model differ in scale between categories). Anomaly maps are
normalised the same way, so with the ``'max'`` image score a pixel reaches 1 exactly in the
images that are flagged.

**Which calibration.** One per category (from that category's images) and one pooled over all
calibration images. An image whose category is known (given, or found in its path by
:func:`infer_category`) uses its category's; otherwise the pooled one, whose false-alarm
guarantee holds for good images drawn in the calibration set's category proportions.

**What is stored** (``checkpoint['calibration']``): ``format_version``, ``alpha``, ``settings``
(the :class:`~dcamkd.scoring.ScoringSettings` the scores were made with: ``test`` and
``predict`` refuse other settings), ``source`` (``kind`` ``'validation'``: the held-out 20 % of
``train/good`` recorded in the checkpoint's split; ``'good-dir'``: images the user declared
unseen), ``images`` (their paths), ``categories``, ``per_category`` and ``pooled`` entries
(:func:`threshold_entry`), ``tie_rule``, ``dcamkd_version``, ``created``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ._version import __version__
from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint, scoring_settings, trained_categories
from .data import ImageDataset, Sample, find_images
from .device import check_device
from .errors import CheckpointError, InvalidArgumentError, MissingFileError
from .scoring import DEFAULT_FALSE_ALARM_RATE, AnomalyModel, ScoringSettings

__all__ = [
    "CALIBRATION_FORMAT",
    "POOLED",
    "INTERVAL_LEVEL",
    "MIN_CALIBRATION_IMAGES",
    "TIE_RULE",
    "check_false_alarm_rate",
    "threshold_entry",
    "build_calibration",
    "score_images",
    "select_calibration",
    "normalise",
    "is_defective",
    "infer_category",
    "describe_calibration",
    "calibrate_checkpoint",
]

CALIBRATION_FORMAT = 1
#: Name of the calibration over all categories' images.
POOLED = "pooled"
#: Probability mass of the reported interval of the realised false-alarm rate.
INTERVAL_LEVEL = 0.90
#: Fewest images a calibration is made from (two give a median below the threshold).
MIN_CALIBRATION_IMAGES = 2
TIE_RULE = "defective when raw score >= threshold (normalised score >= 1)"


def check_false_alarm_rate(alpha, name: str = "--false-alarm-rate") -> float:
    """``alpha`` as a float in (0, 1); raises :class:`InvalidArgumentError` naming ``name``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise InvalidArgumentError(f"{name}: expected a rate in (0, 1), e.g. 0.05, got {alpha!r}")
    return float(alpha)


def threshold_entry(scores: Sequence[float], alpha: float) -> dict[str, Any]:
    """The distribution-free threshold of ``scores`` (good calibration images) for a target
    false-alarm rate ``alpha``.

    Args:
        scores: ``n`` finite raw image scores, any order.
        alpha: target false-alarm rate in (0, 1).

    Returns:
        A JSON-ready dict: ``n``; ``scores`` (sorted ascending); ``median``; ``k`` (1-based rank of
        the threshold among the sorted scores); ``threshold``; ``alpha``;
        ``expected_false_alarm_rate`` = ``(n + 1 - k) / (n + 1)``; ``interval`` (the central
        :data:`INTERVAL_LEVEL` interval of ``Beta(n + 1 - k, k)``, the distribution of the realised
        false-alarm rate) and ``interval_level``; ``too_small`` (``n + 1 < 1 / alpha``) and
        ``note`` (what was done then, else ''). With fewer than :data:`MIN_CALIBRATION_IMAGES`
        scores, or a threshold equal to the median (all scores tied), ``threshold`` is None and
        ``note`` says why: the entry cannot be used.

    Raises:
        InvalidArgumentError: ``alpha`` outside (0, 1); a non-finite score.
    """
    from scipy.stats import beta as beta_dist

    alpha = check_false_alarm_rate(alpha, "alpha")
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if not np.all(np.isfinite(s)):
        raise InvalidArgumentError("calibration scores: NaN or Inf among the scores")
    n = int(s.size)
    entry: dict[str, Any] = {"n": n, "scores": s.tolist(), "alpha": alpha,
                             "median": float(np.median(s)) if n else None, "k": None, "threshold": None,
                             "expected_false_alarm_rate": None, "interval": None,
                             "interval_level": INTERVAL_LEVEL, "too_small": False, "note": ""}
    if n < MIN_CALIBRATION_IMAGES:
        entry["note"] = (f"{n} calibration image(s): at least {MIN_CALIBRATION_IMAGES} are needed; "
                         f"this calibration cannot be used")
        return entry
    k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    if k > n:  # n + 1 < 1 / alpha: no order statistic reaches alpha
        k = n
        entry["too_small"] = True
        need = math.ceil(1 / alpha - 1e-9) - 1
        entry["note"] = (f"n = {n} good images are too few for a false-alarm rate of {alpha:g} (that needs "
                         f"n >= {need}); the threshold is the largest calibration score, which guarantees "
                         f"an expected false-alarm rate of 1/(n + 1) = {1 / (n + 1):.3f} instead")
    lo, hi = beta_dist.ppf([(1 - INTERVAL_LEVEL) / 2, (1 + INTERVAL_LEVEL) / 2], n + 1 - k, k)
    entry.update(k=k, threshold=float(s[k - 1]), expected_false_alarm_rate=(n + 1 - k) / (n + 1),
                 interval=[float(lo), float(hi)])
    if not entry["threshold"] > entry["median"]:
        entry["note"] = (f"the threshold equals the median of the {n} calibration scores (tied scores); "
                         f"this calibration cannot normalise scores and cannot be used")
        entry["threshold"] = None
    return entry


def build_calibration(
    scores: Sequence[float],
    categories: Sequence[Optional[str]],
    alpha: float,
    settings: ScoringSettings,
    source: dict[str, Any],
    categories_trained: Optional[Sequence[str]] = None,
    precision: Optional[str] = None,
) -> dict[str, Any]:
    """A calibration from the raw scores of good images the model did not train on.

    Args:
        scores: ``(n,)`` raw image scores.
        categories: the category of each score (None: unknown; it counts for the pooled
            calibration only).
        alpha: target false-alarm rate.
        settings: the scoring settings the scores were made with.
        source: ``{'kind': 'validation' | 'good-dir', ...}`` and the image paths
            (``images``), stored as they are.
        categories_trained: the categories to list (default: those seen in ``categories``).
        precision: the precision the scores were made in (:data:`dcamkd.config.PRECISIONS`);
            inference defaults to it (:func:`dcamkd.checkpoint.model_from_checkpoint`).

    Returns:
        The calibration dict (see the module docstring).

    Raises:
        InvalidArgumentError: ``len(scores) != len(categories)``; the pooled calibration cannot
            be made (fewer than :data:`MIN_CALIBRATION_IMAGES` images or all scores tied).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    cats = list(categories)
    if s.size != len(cats):
        raise InvalidArgumentError(f"calibration: {s.size} scores but {len(cats)} categories")
    names = list(categories_trained) if categories_trained is not None else \
        list(dict.fromkeys(c for c in cats if c is not None))
    per = {c: threshold_entry(s[[ci == c for ci in cats]], alpha) for c in names}
    extra = sorted({c for c in cats if c is not None and c not in per})
    for c in extra:
        per[c] = threshold_entry(s[[ci == c for ci in cats]], alpha)
    pooled = threshold_entry(s, alpha)
    if pooled["threshold"] is None:
        raise InvalidArgumentError(f"calibration: {pooled['note']}")
    return {
        "format_version": CALIBRATION_FORMAT,
        "alpha": float(alpha),
        "settings": settings.to_dict(),
        "precision": precision,
        "source": dict(source),
        "categories": names + extra,
        "per_category": per,
        "pooled": pooled,
        "tie_rule": TIE_RULE,
        "dcamkd_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@torch.no_grad()
def score_images(model: AnomalyModel, dataset: ImageDataset, device: str = "cpu", batch_size: int = 16) -> np.ndarray:
    """Raw image scores of a dataset, in its order: float64 ``(N,)``."""
    out = []
    for start in range(0, len(dataset), batch_size):
        x = torch.stack([dataset[i]["image"] for i in range(start, min(len(dataset), start + batch_size))])
        out.append(model(x.to(device))[1].double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def select_calibration(calibration: dict[str, Any], category: Optional[str]) -> tuple[str, dict[str, Any]]:
    """``(name, entry)``: the category's calibration when it has a usable one, else
    ``(POOLED, pooled entry)``."""
    entry = calibration["per_category"].get(category) if category is not None else None
    if entry is not None and entry.get("threshold") is not None:
        return category, entry
    return POOLED, calibration["pooled"]


def normalise(raw, entry: dict[str, Any]):
    """``(raw - median) / (threshold - median)`` of an entry; ``raw`` a float or an array
    (returned in kind: float64 for arrays and floats)."""
    med, thr = entry["median"], entry["threshold"]
    return (np.asarray(raw, dtype=np.float64) - med) / (thr - med) if not np.isscalar(raw) \
        else (float(raw) - med) / (thr - med)


def is_defective(raw: float, entry: dict[str, Any]) -> bool:
    """The decision: ``raw >= threshold`` (:data:`TIE_RULE`)."""
    return bool(float(raw) >= entry["threshold"])


def infer_category(path: str | os.PathLike, categories: Sequence[str]) -> Optional[str]:
    """The category of an image file from its path: the nearest enclosing folder whose name is
    one of ``categories`` (``ROOT/bottle/test/broken/000.png`` -> ``'bottle'``); None when no
    folder matches."""
    names = set(categories)
    for parent in Path(path).parents:
        if parent.name in names:
            return parent.name
    return None


def describe_calibration(cal: dict[str, Any], title: str = "calibration") -> str:
    """A Markdown summary: settings, then per calibration n, median, threshold, the rank used,
    the expected false-alarm rate and its interval, and the notes."""
    src = cal["source"]
    lines = [f"{title}: target false-alarm rate {cal['alpha']:g} on good images, "
             f"{ScoringSettings.from_dict(cal['settings']).describe()}; "
             f"{cal['pooled']['n']} {'held-out validation' if src.get('kind') == 'validation' else 'declared-unseen'} "
             f"good images",
             "",
             f"| calibration | n | median | threshold | k-th smallest | expected false-alarm rate | "
             f"{100 * INTERVAL_LEVEL:.0f} % interval |",
             "|---|---|---|---|---|---|---|"]
    notes = []
    for name, e in [*cal["per_category"].items(), (POOLED, cal["pooled"])]:
        if e["threshold"] is None:
            lines.append(f"| {name} | {e['n']} | - | - | - | - | - |")
        else:
            lines.append(f"| {name} | {e['n']} | {e['median']:.4f} | {e['threshold']:.4f} | {e['k']} of {e['n']} | "
                         f"{e['expected_false_alarm_rate']:.3f} | [{e['interval'][0]:.3f}, {e['interval'][1]:.3f}] |")
        if e["note"]:
            notes.append(f"- {name}: {e['note']}")
    return "\n".join(lines + ([""] + notes if notes else []))


def _split_paths(ckpt: dict[str, Any], root: Path, key: str) -> list[Path]:
    return [root / rel for rel in ckpt["split"][key]]


def calibrate_checkpoint(
    checkpoint: str | os.PathLike,
    good: Optional[Sequence[str | os.PathLike]] = None,
    data: Optional[str | os.PathLike] = None,
    category: Optional[str] = None,
    alpha: Optional[float] = None,
    fusion: Optional[str] = None,
    sigma: Optional[float] = None,
    image_score: Optional[str] = None,
    topk_fraction: Optional[float] = None,
    device: str = "cpu",
    batch_size: int = 16,
    out: Optional[str | os.PathLike] = None,
    precision: Optional[str] = None,
    compile: Optional[bool] = None,
) -> dict[str, Any]:
    """Recalibrate a checkpoint and write it back (``dcamkd calibrate``).

    Images: the held-out good validation images recorded in the checkpoint's split (read under
    ``data`` when given, else under the recorded root), or the files of ``good`` (folders are
    searched recursively), which the caller declares the model never trained on. Their category
    is ``category`` when given, else :func:`infer_category` over the checkpoint's categories
    (unknown: the image counts for the pooled calibration only). Test images never enter: a
    ``good`` image inside a ``<category>/test/`` folder, or one of the recorded training images,
    is refused.

    Args:
        checkpoint: the checkpoint file; rewritten atomically unless ``out`` is given.
        alpha: target false-alarm rate; default the previous calibration's, else the training
            configuration's.
        fusion, sigma, image_score, topk_fraction: new scoring settings (default: the
            checkpoint's current ones); the calibration records them.
        device, batch_size: where and how many images at a time to score.
        precision, compile: how to score (:func:`dcamkd.checkpoint.model_from_checkpoint`;
            default: the checkpoint's training configuration).
        out: write the calibrated checkpoint there instead.

    Returns:
        The new calibration dict.

    Raises:
        MissingFileError: the checkpoint, a ``good`` path or a recorded image is missing.
        CheckpointError: no recorded held-out images (a format-1 checkpoint) and no ``good``.
        InvalidArgumentError: a bad setting, an unknown ``category``, a test or training image
            among ``good``, too few images.
    """
    check_device(device)
    path = Path(checkpoint)
    ck = load_checkpoint(path)
    cats = trained_categories(ck) or []
    prev = ck.get("calibration")
    if alpha is None:
        alpha = prev["alpha"] if prev else ck["config"].get("false_alarm_rate", DEFAULT_FALSE_ALARM_RATE)
    alpha = check_false_alarm_rate(alpha)
    given = dict(fusion=fusion, sigma=sigma, image_score=image_score, topk_fraction=topk_fraction)
    settings = ScoringSettings.from_dict({**scoring_settings(ck).to_dict(),
                                          **{k: v for k, v in given.items() if v is not None}})
    if category is not None and not good:
        raise InvalidArgumentError("--category: only with --good (it names the category of those images)")
    if category is not None and cats and category not in cats:
        raise InvalidArgumentError(f"--category {category!r}: the checkpoint was trained on {', '.join(cats)}")
    if good:
        files = find_images(good)
        if ck.get("split"):
            trained = {p.resolve() for p in _split_paths(ck, Path(ck["split"]["root"]), "train")}
            used = [f for f in files if f.resolve() in trained]
            if used:
                raise InvalidArgumentError(
                    f"--good: {used[0]} is one of the images the model was trained on"
                    + (f" (and {len(used) - 1} more)" if len(used) > 1 else "")
                    + "; calibrate on good images it never saw")
        for f in files:
            for parent in f.resolve().parents:
                if parent.name == "test" and (parent.parent.name in cats or (parent.parent / "train").is_dir()):
                    raise InvalidArgumentError(
                        f"--good: {f} lies in a test folder; test images measure the threshold and never "
                        f"enter calibration")
        img_cats = [category if category is not None else infer_category(f, cats) for f in files]
        source = {"kind": "good-dir", "images": [str(f.resolve()) for f in files]}
    else:
        if not ck.get("split"):
            raise CheckpointError(
                f"checkpoint {path} records no held-out images (made by an older dcamkd); pass --good DIR "
                f"with good images the model never trained on")
        root = Path(data) if data is not None else Path(ck["split"]["root"])
        files = _split_paths(ck, root, "val")
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise MissingFileError(
                f"held-out image {missing[0]} not found ({len(missing)} of {len(files)} missing); pass --data ROOT "
                f"if the dataset moved, or --good DIR")
        img_cats = [Path(rel).parts[0] for rel in ck["split"]["val"]]
        source = {"kind": "validation", "root": str(root.resolve()), "images": list(ck["split"]["val"])}
    if not files:
        raise InvalidArgumentError("calibration: no image to calibrate on")
    model, _ = model_from_checkpoint({**ck, "calibration": None}, device, **settings.to_dict(), precision=precision,
                                     compile=compile)  # the old calibration's precision does not matter here
    samples = [Sample(path=f, category=c or "", label=0, defect="good") for f, c in zip(files, img_cats)]
    ds = ImageDataset(samples, ck["image_size"], ck["mean"], ck["std"], with_masks=False, cache=False)
    scores = score_images(model, ds, device, batch_size)
    cal = build_calibration(scores, img_cats, alpha, settings, source, cats or None, model.precision)
    ck["calibration"] = cal
    save_checkpoint(ck, out if out is not None else path)
    return cal
