"""Decisions and heatmaps for image files (``dcamkd predict``).

Every image goes through :class:`dcamkd.Detector` (the pipeline of ``dcamkd test``) and gets its
raw score, its normalised score (0 = the median good calibration image, 1 = the threshold), a
decision and the calibration used.

**Output tree.** The inputs are mirrored under ``--out`` relative to the deepest folder that
holds them all (for a single folder input: that folder itself; for several inputs: their
common parent, so each input keeps its own subfolder): the heatmap of ``IN/good/000.png`` is
``OUT/good/000.png``. A heatmap is a PNG named after its image (``000.jpg`` -> ``000.png``); if
two images of a folder share a stem, the later ones keep their extension (``000.jpg.png``).
``OUT/predictions.csv`` lists every image with ``path, category, calibration, score,
normalised_score, decision, threshold, heatmap``.

**Heatmaps.** The original and the overlay side by side, a colour bar and a title with the
decision, the normalised and raw scores and the calibration used. The overlay is coloured in
normalised units on one fixed scale, :data:`HEATMAP_RANGE` = 0 .. 2, with a diverging colour map
whose middle (pale yellow) is the threshold, in every picture: blue at and below the median good
image (0), red at twice the median-to-threshold distance and beyond; the threshold is outlined
on the overlay and marked on the colour bar. With the ``'max'`` image score a pixel reaches the threshold colour exactly in
the images decided defective (:func:`dcamkd.detector.resize_map` keeps the map's maximum). A
ground-truth mask, when found, is outlined on both panels: ``--masks auto`` looks for the MVTec
mask ``<category>/ground_truth/<defect>/<stem>_mask.*`` (or ``<stem>.*``) of an image in
``<category>/test/<defect>/``; ``--masks DIR`` looks in a tree that mirrors the inputs.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .config import MASK_MODES  # re-exported
from .data import IMAGE_EXTENSIONS, find_images, load_image, load_mask
from .detector import Detector, Prediction
from .errors import InvalidArgumentError
from .io import atomic_write_bytes, atomic_write_text

__all__ = ["HEATMAP_RANGE", "HEATMAP_CMAP", "PREDICTIONS_CSV", "CSV_COLUMNS", "MASK_MODES", "output_paths",
           "find_mask", "render_heatmap", "predict"]

#: Normalised-score range of the heatmap colours (0 = median good image, 1 = threshold).
HEATMAP_RANGE = (0.0, 2.0)
#: Diverging colour map centred on the threshold.
HEATMAP_CMAP = "RdYlBu_r"
PREDICTIONS_CSV = "predictions.csv"
CSV_COLUMNS = ("path", "category", "calibration", "score", "normalised_score", "decision", "threshold", "heatmap")


def output_paths(files: Sequence[Path], inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The heatmap path of each file, relative to ``--out`` (the rule of the module docstring)."""
    absolute = [Path(os.path.abspath(i)) for i in inputs]  # symbolic links are kept, not followed
    roots = [a if a.is_dir() else a.parent for a in absolute]
    base = Path(os.path.commonpath([str(r) for r in roots])) if roots else Path(".")
    out, taken = [], set()
    for f in files:
        rel = Path(os.path.abspath(f)).relative_to(base)
        cand = rel.with_suffix(".png")
        if cand in taken:
            cand = rel.with_name(rel.name + ".png")
        taken.add(cand)
        out.append(cand)
    return out


def _mask_in(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem + "_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            for e in (ext, ext.upper()):
                p = folder / f"{name}{e}"
                if p.is_file():
                    return p
    return None


def find_mask(image: Path, rel: Path, masks: str) -> Optional[Path]:
    """The ground-truth mask of ``image`` by the ``--masks`` rule, or None."""
    if masks == "none":
        return None
    if masks == "auto":
        defect, split = image.parent, image.parent.parent
        if split.name != "test" or defect.name == "good":
            return None
        return _mask_in(split.parent / "ground_truth" / defect.name, image.stem)
    return _mask_in(Path(masks) / rel.parent, image.stem)


def render_heatmap(image: np.ndarray, pred: Prediction, mask: Optional[np.ndarray] = None, title: str = "") -> bytes:
    """The picture of one prediction as PNG bytes: original and overlay side by side, colour bar
    in normalised units (:data:`HEATMAP_RANGE`, threshold marked), decision and scores.

    Args:
        image: uint8 ``(H, W, 3)`` RGB at the resolution of ``pred.normalised_map``.
        pred: the prediction.
        mask: optional bool ``(H, W)`` ground truth, outlined on both panels.
        title: the left panel's title (e.g. the file name).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    lo, hi = HEATMAP_RANGE
    norm = Normalize(vmin=lo, vmax=hi, clip=True)
    cmap = colormaps[HEATMAP_CMAP]
    h, w = image.shape[:2]
    fig = Figure(figsize=(8.6, 3.6 * h / max(w, 1) + 0.9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax0, ax1, cax = fig.subplots(1, 3, width_ratios=[1, 1, 0.05])
    ax0.imshow(image)
    ax0.set_title(title or "original", fontsize=9)
    ax1.imshow(image)
    im = ax1.imshow(pred.normalised_map, cmap=cmap, norm=norm, alpha=0.5)
    ax1.set_title("anomaly, normalised (threshold outlined)", fontsize=9)
    if float(pred.normalised_map.max()) >= 1.0:
        ax1.contour(pred.normalised_map, levels=[1.0], colors="black", linewidths=0.8)
    if mask is not None and mask.any():
        for ax in (ax0, ax1):
            ax.contour(mask.astype(np.float32), levels=[0.5], colors="lime", linewidths=1.0)
    colour = "#b2182b" if pred.is_defective else "#2166ac"
    fig.suptitle(f"{pred.decision.upper()}   normalised score {pred.normalised_score:.2f}   (raw {pred.score:.4g}, "
                 f"threshold {pred.threshold:.4g}, calibration: {pred.calibration})"
                 + ("   ground truth in green" if mask is not None and mask.any() else ""),
                 fontsize=10, color=colour)
    for ax in (ax0, ax1):
        ax.set_axis_off()
    cb = fig.colorbar(im, cax=cax)
    cb.set_ticks([0.0, 0.5, 1.0, 1.5, 2.0])
    cb.set_ticklabels(["0 good", "0.5", "1 threshold", "1.5", "2+"])
    cb.ax.axhline(1.0, color="black", linewidth=1.5)
    cb.ax.tick_params(labelsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def predict(checkpoint, inputs, out_dir, batch_size: int = 8, device: str = "cpu", category: Optional[str] = None,
            masks: str = "auto", heatmaps: bool = True, precision: Optional[str] = None,
            compile: Optional[bool] = None) -> list[dict]:
    """Decide every image of ``inputs`` (files, or folders searched recursively) with a
    calibrated checkpoint; write ``OUT/predictions.csv`` and, with ``heatmaps``, one picture
    per image in a tree mirroring the inputs (see the module docstring).

    Args:
        checkpoint: a calibrated checkpoint.
        inputs: image files and folders.
        out_dir: output folder.
        category: the category of every image (default: from each path, else pooled).
        masks: ``'auto'``, ``'none'`` or a folder (see the module docstring).
        heatmaps: write the pictures.
        precision, compile: how to score (:meth:`dcamkd.Detector.from_checkpoint`; default: the
            checkpoint's training configuration).

    Returns:
        The CSV rows as dicts (keys :data:`CSV_COLUMNS`).

    Raises:
        MissingFileError, ImageReadError: a missing input or an unreadable image.
        CheckpointError: an unreadable or uncalibrated checkpoint.
        InvalidArgumentError: a bad device, category or ``masks`` folder.
    """
    if masks not in MASK_MODES and not Path(masks).is_dir():
        raise InvalidArgumentError(f"--masks: expected 'auto', 'none' or a folder, got {masks!r} (no such folder)")
    det = Detector.from_checkpoint(checkpoint, device, precision, compile)
    files = find_images(inputs)
    rels = output_paths(files, inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        preds = det.predict([str(f) for f in chunk], category=category, batch_size=batch_size)
        for f, rel, p in zip(chunk, rels[start:start + batch_size], preds):
            if heatmaps:
                img = np.asarray(load_image(f), dtype=np.uint8)
                mpath = find_mask(f, rel, masks)
                mask = load_mask(mpath, img.shape[:2]) if mpath is not None else None
                atomic_write_bytes(out / rel, render_heatmap(img, p, mask, title=str(rel)))
            rows.append({"path": str(f), "category": p.category or "", "calibration": p.calibration,
                         "score": f"{p.score:.6f}", "normalised_score": f"{p.normalised_score:.4f}",
                         "decision": p.decision, "threshold": f"{p.threshold:.6f}",
                         "heatmap": rel.as_posix() if heatmaps else ""})
    sio = io.StringIO()
    wr = csv.DictWriter(sio, fieldnames=CSV_COLUMNS)
    wr.writeheader()
    wr.writerows(rows)
    atomic_write_text(out / PREDICTIONS_CSV, sio.getvalue())
    return rows
