"""Heatmaps and scores for arbitrary images (``dcamkd predict``).

Each image is scored at the model's input size; its anomaly map is resized bilinearly to the
image's own resolution and drawn over it with matplotlib's ``jet`` colour map (alpha 0.5).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MissingFileError
from .io import atomic_write_bytes, atomic_write_text

__all__ = ["collect_images", "overlay_heatmap", "predict"]


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files of ``inputs`` (files, or folders searched recursively), sorted per input.

    Raises :class:`MissingFileError` for a path that does not exist or a folder holding no
    image file.
    """
    from .data import IMAGE_EXTENSIONS

    exts = {e.lower().lstrip(".") for e in IMAGE_EXTENSIONS}
    out: list[Path] = []
    for inp in inputs:
        p = Path(inp)
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower().lstrip(".") in exts
                           and not q.name.startswith("."))
            if not found:
                raise MissingFileError(f"{p}: folder holds no image file ({', '.join(sorted(exts))})")
            out.extend(found)
        else:
            raise MissingFileError(f"{p}: no such file or folder")
    return out


def overlay_heatmap(image: np.ndarray, amap: np.ndarray, vmax: Optional[float] = None, alpha: float = 0.5) -> np.ndarray:
    """Blend an anomaly map over an RGB image.

    Args:
        image: ``(H, W, 3)`` uint8.
        amap: ``(H, W)`` float anomaly map at the image's resolution.
        vmax: value drawn in the hottest colour (default the map's max); 0 is the coldest.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    from matplotlib import colormaps

    top = float(vmax) if vmax is not None else float(amap.max())
    norm = np.clip(amap / top, 0, 1) if top > 0 else np.zeros_like(amap)
    heat = colormaps["jet"](norm)[..., :3]
    return (255 * ((1 - alpha) * image / 255.0 + alpha * heat)).clip(0, 255).astype(np.uint8)


@torch.no_grad()
def predict(checkpoint, inputs, out_dir, batch_size: int = 8, device: str = "cpu",
            vmax: Optional[float] = None) -> list[tuple[str, float, str]]:
    """Score images with a checkpoint; write ``OUT/<stem>_heatmap.png`` per image and
    ``OUT/scores.csv`` (columns ``path, anomaly_score, heatmap``). Returns the rows
    ``(path, score, heatmap file name)``."""
    from PIL import Image

    from .data import ImageDataset, Sample, load_image
    from .train import load_checkpoint, model_from_checkpoint

    ck = load_checkpoint(checkpoint)
    model, _ = model_from_checkpoint(ck, device)
    paths = collect_images(inputs)
    samples = [Sample(path=p, category="", label=0, defect="", mask_path=None) for p in paths]
    ds = ImageDataset(samples, ck["image_size"], ck["mean"], ck["std"], with_masks=False, cache=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, float, str]] = []
    used: set[str] = set()
    for start in range(0, len(ds), batch_size):
        items = [ds[i] for i in range(start, min(len(ds), start + batch_size))]
        x = torch.stack([it["image"] for it in items]).to(device)
        maps, scores = model(x)
        for it, m, sc in zip(items, maps.float().cpu(), scores.float().cpu()):
            img = np.asarray(load_image(it["path"]), dtype=np.uint8)
            h, w = img.shape[:2]
            full = F.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
            name = Path(it["path"]).stem
            k, base = 1, name
            while name in used:  # same stem in two folders
                k += 1
                name = f"{base}_{k}"
            used.add(name)
            buf = io.BytesIO()
            Image.fromarray(overlay_heatmap(img, full, vmax)).save(buf, format="PNG")
            atomic_write_bytes(out / f"{name}_heatmap.png", buf.getvalue())
            rows.append((str(it["path"]), float(sc), f"{name}_heatmap.png"))
    sio = io.StringIO()
    wr = csv.writer(sio)
    wr.writerow(["path", "anomaly_score", "heatmap"])
    wr.writerows((p, f"{s:.6f}", h) for p, s, h in rows)
    atomic_write_text(out / "scores.csv", sio.getvalue())
    return rows
