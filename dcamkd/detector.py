"""The Python inference API: :class:`Detector` turns images into calibrated decisions and
anomaly maps.

.. code-block:: python

    from dcamkd import Detector

    det = Detector.from_checkpoint("runs/m/best.pt", device="cpu")
    for p in det.predict(["part1.png", "part2.png"]):
        print(p.decision, p.normalised_score, p.calibration)   # 'good' | 'defective', 0 = median good, 1 = threshold
        p.anomaly_map                                          # (H, W) float32 at the input's resolution

Every input goes through the pipeline that training, calibration and ``dcamkd test`` use (RGB,
resized to the checkpoint's S x S with PIL's bilinear filter, normalised with the backbone's
statistics), then through the checkpoint's scoring settings, and the decision through its
calibration (:mod:`dcamkd.calibration`), so a file scores here exactly as in ``dcamkd test``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .calibration import infer_category, is_defective, normalise, select_calibration
from .checkpoint import load_checkpoint, model_from_checkpoint, scoring_settings, trained_categories
from .data import image_to_tensor, load_image_reduced, to_rgb
from .device import check_device
from .errors import CheckpointError, InvalidArgumentError
from .scoring import ScoringSettings

__all__ = ["Detector", "Prediction", "resize_map"]

ImageInput = Union[str, os.PathLike, "Image.Image", np.ndarray, torch.Tensor]  # noqa: F821


@dataclass
class Prediction:
    """The result for one image.

    Attributes:
        score: raw anomaly score (the checkpoint's image-score rule on its S x S map).
        normalised_score: ``(score - median) / (threshold - median)`` of the calibration used:
            0 = the median good calibration image, 1 = the threshold.
        is_defective: ``score >= threshold`` (the tie rule of :mod:`dcamkd.calibration`).
        decision: ``'defective'`` or ``'good'``.
        category: the category the image was taken to be (given, or found in its path), or None.
        calibration: the calibration used: the category's name, or ``'pooled'``.
        threshold: that calibration's threshold (raw units).
        anomaly_map: float32 ``(H, W)``, raw units, at the input's resolution (bilinear resize of
            the S x S map that keeps its maximum: :func:`resize_map`).
        normalised_map: float32 ``(H, W)``, ``anomaly_map`` in normalised units.
        path: the input file, when the input was a path.
    """

    score: float
    normalised_score: float
    is_defective: bool
    decision: str
    category: Optional[str]
    calibration: str
    threshold: float
    anomaly_map: np.ndarray
    normalised_map: np.ndarray
    path: Optional[str] = None


def resize_map(amap: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Resize an ``(h, w)`` anomaly map to ``size`` = ``(H, W)``, keeping its maximum.

    Bilinear interpolation (``align_corners=False``; antialiased when shrinking) gives convex
    combinations of the map's values, which can only lower the peak; the pixel nearest to the
    peak's position is then set to the peak value, so the resized map's maximum equals the
    map's (with the ``'max'`` image score: the score). Returns float32 ``(H, W)``.
    """
    h, w = amap.shape
    H, W = int(size[0]), int(size[1])
    m = amap.float()
    if (H, W) == (h, w):
        return m.numpy().copy()
    out = F.interpolate(m[None, None], size=(H, W), mode="bilinear", align_corners=False,
                        antialias=H < h or W < w)[0, 0]
    idx = int(torch.argmax(m))
    py, px = divmod(idx, w)
    ty = min(H - 1, max(0, int(round((py + 0.5) * H / h - 0.5))))
    tx = min(W - 1, max(0, int(round((px + 0.5) * W / w - 0.5))))
    out[ty, tx] = torch.maximum(out[ty, tx], m[py, px])
    return out.numpy()


def _array_to_uint8_rgb(a: np.ndarray, what: str) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 uint8 or float in [0, 1] -> uint8 HxWx3 (alpha dropped)."""
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise InvalidArgumentError(f"{what}: expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
                                   f"got {tuple(a.shape)}")
    if a.dtype == np.uint8:
        pass
    elif a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1:
            raise InvalidArgumentError(f"{what}: a float image must hold finite values in [0, 1], got range "
                                       f"[{np.nanmin(a):.4g}, {np.nanmax(a):.4g}]")
        a = np.rint(a.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise InvalidArgumentError(f"{what}: expected dtype uint8 (0..255) or float (0..1), got {a.dtype}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def _tensor_images(t: torch.Tensor, what: str) -> list[np.ndarray]:
    """CHW / BCHW (or HW) tensor -> list of HWC numpy arrays."""
    t = t.detach().cpu()
    if t.dim() == 2:
        return [t.numpy()]
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4 or t.shape[1] not in (1, 3, 4):
        raise InvalidArgumentError(f"{what}: expected a tensor of shape (C, H, W) or (B, C, H, W) with C in 1, 3, 4, "
                                   f"got {tuple(t.shape)}")
    return [x.permute(1, 2, 0).numpy() for x in t]


class Detector:
    """Calibrated anomaly detection with a trained checkpoint.

    Build it with :meth:`from_checkpoint`; call :meth:`predict`. Attributes: ``categories``
    (trained on), ``settings`` (:class:`~dcamkd.scoring.ScoringSettings`), ``calibration`` (the
    checkpoint's calibration dict), ``image_size``, ``device``, ``model`` (the
    :class:`~dcamkd.scoring.AnomalyModel`).
    """

    def __init__(self, checkpoint: dict[str, Any], device: str = "cpu", source: str = "checkpoint",
                 precision: Optional[str] = None, compile: Optional[bool] = None):
        check_device(device, "device")
        if not checkpoint.get("calibration"):
            raise CheckpointError(
                f"checkpoint {source} holds no calibration, so it cannot decide; run: dcamkd calibrate "
                f"--checkpoint {source} [--good DIR]")
        self.source = source
        self.device = device
        self.calibration = checkpoint["calibration"]
        self.settings: ScoringSettings = scoring_settings(checkpoint)
        self.categories = trained_categories(checkpoint) or list(self.calibration["per_category"])
        self.image_size = int(checkpoint["image_size"])
        self.model, self.config = model_from_checkpoint(checkpoint, device, **self.settings.to_dict(),
                                                        precision=precision, compile=compile)
        self._mean = torch.tensor(checkpoint["mean"], dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(checkpoint["std"], dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu", precision: Optional[str] = None,
                        compile: Optional[bool] = None) -> "Detector":
        """Load a calibrated checkpoint (``best.pt`` / ``last.pt``) onto ``device``.

        ``precision`` (``'fp32'`` or ``'bf16'``: bfloat16 autocast of the backbones, maps and
        scores in float32; :mod:`dcamkd.precision`) and ``compile`` (``torch.compile`` of teacher
        and student; the first call compiles) default to the checkpoint's training configuration.

        Raises:
            InvalidArgumentError: a bad or absent device (``'cuda'`` without CUDA), an unknown
                precision.
            MissingFileError, CheckpointError: as :func:`dcamkd.checkpoint.load_checkpoint`;
                a checkpoint without calibration (the message names the command that adds one).
        """
        check_device(device, "device")
        return cls(load_checkpoint(path), device, str(path), precision, compile)

    # ------------------------------------------------------------------ inputs
    def _prepare(self, item: Any, what: str) -> tuple[torch.Tensor, tuple[int, int], Optional[str]]:
        """One input -> (normalised (3, S, S) tensor, (H, W) of the input, path or None)."""
        from PIL import Image

        S = self.image_size
        path = None
        if isinstance(item, (str, os.PathLike)):
            path = str(item)
            im, (w, h) = load_image_reduced(Path(item), S)
        elif isinstance(item, Image.Image):
            im = to_rgb(item)
            w, h = im.size
        elif isinstance(item, np.ndarray):
            a = _array_to_uint8_rgb(item, what)
            im = Image.fromarray(a, mode="RGB")
            w, h = im.size
        else:
            raise InvalidArgumentError(f"{what}: expected a file path, a PIL image, a numpy array or a tensor, "
                                       f"got {type(item).__name__}")
        if im.size != (S, S):
            im = im.resize((S, S), Image.BILINEAR)
        return image_to_tensor(np.array(im, dtype=np.uint8), self._mean, self._std), (h, w), path

    def _flatten(self, inputs: Any) -> tuple[list[Any], bool]:
        """The list of single images, and whether a list is returned."""
        if isinstance(inputs, torch.Tensor):
            arrs = _tensor_images(inputs, "inputs")
            return arrs, inputs.dim() == 4
        if isinstance(inputs, (list, tuple)):
            out: list[Any] = []
            for i, x in enumerate(inputs):
                if isinstance(x, torch.Tensor):
                    if x.dim() == 4:
                        raise InvalidArgumentError(f"inputs[{i}]: a batch (B, C, H, W) inside a list; pass it alone")
                    out.extend(_tensor_images(x, f"inputs[{i}]"))
                else:
                    out.append(x)
            return out, True
        return [inputs], False

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict(self, inputs: Union[ImageInput, Sequence[ImageInput]], category: Optional[str] = None,
                batch_size: int = 8) -> Union[Prediction, list[Prediction]]:
        """Score images and decide good / defective.

        Args:
            inputs: one image or a list of them: file paths; PIL images (any mode); numpy arrays
                ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` (alpha dropped), uint8 or
                float in [0, 1]; tensors ``(C, H, W)`` or a batch ``(B, C, H, W)`` (C = 1, 3 or 4),
                uint8 or float in [0, 1]. Any size; grey is replicated to RGB.
            category: the category of every input (must be one the checkpoint is calibrated
                for); default: found in each file path (:func:`dcamkd.calibration.infer_category`),
                else the pooled calibration.
            batch_size: images per forward pass.

        Returns:
            A :class:`Prediction`, or a list of them for a list or a batch tensor.

        Raises:
            InvalidArgumentError: an unsupported input, ``category`` without calibration,
                ``batch_size < 1``.
            MissingFileError, ImageReadError: an unreadable file (the message names it).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        if category is not None:
            entry = self.calibration["per_category"].get(category)
            if entry is None or entry.get("threshold") is None:
                usable = [c for c, e in self.calibration["per_category"].items() if e.get("threshold") is not None]
                raise InvalidArgumentError(
                    f"category {category!r} has no calibration in {self.source} (calibrated: "
                    f"{', '.join(usable) or 'none'}); leave the category out to use the pooled calibration")
        items, as_list = self._flatten(inputs)
        preds: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            prepared = [self._prepare(x, f"inputs[{start + i}]" if as_list else "inputs") for i, x in enumerate(chunk)]
            x = torch.stack([p[0] for p in prepared]).to(self.device)
            maps, scores = self.model(x)
            for (_, size, path), m, sc in zip(prepared, maps.float().cpu(), scores.double().cpu()):
                cat = category if category is not None else (
                    infer_category(path, self.categories) if path is not None else None)
                used, entry = select_calibration(self.calibration, cat)
                raw = float(sc)
                full = resize_map(m, size)
                defective = is_defective(raw, entry)
                preds.append(Prediction(
                    score=raw, normalised_score=float(normalise(raw, entry)), is_defective=defective,
                    decision="defective" if defective else "good", category=cat, calibration=used,
                    threshold=float(entry["threshold"]), anomaly_map=full,
                    normalised_map=normalise(full, entry).astype(np.float32), path=path))
        return preds if as_list else preds[0]
