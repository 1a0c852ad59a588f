"""Anomaly maps and anomaly scores (method.md section 5).

Per pyramid level the map is the channel cosine distance ``d(t_p, s_p)`` between teacher and
(raw) student; levels are upsampled bilinearly (``align_corners=False``) to the level-1 size,
then to the output size, and fused by ``sum`` (DCAM's code) or ``product`` (STFPM); an optional
Gaussian blur follows; the image's anomaly score is the maximum of its map (``'max'``, method.md
section 5) or the mean of its top-k fraction of pixels (``'topk'``).

The scoring settings (fusion, blur sigma, image-score rule and its top-k fraction) travel
together as :class:`ScoringSettings`; a calibrated threshold is only valid for the settings it
was made with (:mod:`dcamkd.calibration`).
"""

from __future__ import annotations

import math

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .config import DEFAULT_FALSE_ALARM_RATE  # re-exported
from .objective import (DEFAULT_TOPK_FRACTION, FUSIONS, IMAGE_SCORES, ScoringSettings,  # re-exported
                        check_fraction, check_sigma)
from .errors import InvalidArgumentError, NonFiniteError
from .precision import DEFAULT_PRECISION, autocast, check_precision, to_precision

__all__ = [
    "FUSIONS", "IMAGE_SCORES", "DEFAULT_TOPK_FRACTION", "DEFAULT_FALSE_ALARM_RATE", "ScoringSettings",
    "gaussian_kernel_size", "gaussian_blur", "fuse_levels", "anomaly_map", "topk_count", "image_scores",
    "AnomalyModel",
]

_check_sigma = check_sigma


def gaussian_kernel_size(sigma: float) -> int:
    """``2 * round(4 * sigma) + 1`` (the field's usual truncation at 4 sigma)."""
    sigma = _check_sigma(sigma)
    return 2 * int(round(4 * sigma)) + 1


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(B, H, W)`` maps, reflect padding; ``sigma`` in pixels.

    Pure tensor ops (exportable to ONNX); ``sigma == 0`` returns the input. Raises
    :class:`InvalidArgumentError` for a negative or non-finite ``sigma``, or one larger than the
    map's side.
    """
    if _check_sigma(sigma) == 0:
        return maps
    if sigma > max(maps.shape[-2:]):
        raise InvalidArgumentError(f"sigma: {sigma:g} pixels is larger than the {maps.shape[-2]} x {maps.shape[-1]} map")
    k = gaussian_kernel_size(sigma)
    x = torch.arange(k, dtype=maps.dtype, device=maps.device) - (k - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    h = maps[:, None]
    pad = k // 2
    # reflect padding needs pad < size; fall back to replicate for tiny maps
    mode = "reflect" if pad < min(h.shape[-2:]) else "replicate"
    h = F.pad(h, (pad, pad, 0, 0), mode=mode)
    h = F.conv2d(h, g.view(1, 1, 1, k))
    h = F.pad(h, (0, 0, pad, pad), mode=mode)
    h = F.conv2d(h, g.view(1, 1, k, 1))
    return h[:, 0]


def fuse_levels(level_maps: Sequence[Tensor], out_size: tuple[int, int], fusion: str = "sum") -> Tensor:
    """Fuse per-level maps ``(B, H_l, W_l)`` into ``(B, *out_size)``.

    Each level is upsampled bilinearly to the first level's size, then all to ``out_size``
    (the reference's two-step resize), and they are summed or multiplied.
    """
    if fusion not in FUSIONS:
        raise InvalidArgumentError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    size1 = tuple(level_maps[0].shape[-2:])
    out = None
    for m in level_maps:
        m = m[:, None]
        if tuple(m.shape[-2:]) != size1:
            m = F.interpolate(m, size=size1, mode="bilinear", align_corners=False)
        if tuple(m.shape[-2:]) != tuple(out_size):
            m = F.interpolate(m, size=tuple(out_size), mode="bilinear", align_corners=False)
        m = m[:, 0]
        out = m if out is None else (out + m if fusion == "sum" else out * m)
    return out


def anomaly_map(
    teachers: Sequence[Tensor],
    students: Sequence[Tensor],
    out_size: tuple[int, int],
    fusion: str = "sum",
    sigma: float = 0.0,
) -> Tensor:
    """Anomaly map from teacher/student pyramids (method.md section 5).

    Args:
        teachers, students: lists of ``(B, C_l, H_l, W_l)`` maps.
        out_size: ``(H, W)`` of the output map, in pixels.
        fusion: ``'sum'`` or ``'product'``.
        sigma: Gaussian blur sigma in output pixels (0: off).

    Returns:
        ``(B, H, W)`` float32 map; per pixel in ``[0, 2L]`` for ``sum``, ``[0, 2^L]`` for
        ``product``.

    Raises:
        ShapeMismatchError: level counts, shapes, dtypes or devices differ; an empty batch or a
            zero-size level.
        InvalidArgumentError: an input is not a 4-D floating-point tensor.
        NonFiniteError: a teacher or student map holds NaN or Inf (from the images or the
            weights); its ``batch_indices`` lists the images concerned. Not checked while
            tracing, exporting or compiling, where the map is NaN at the pixels those features
            reach instead.
    """
    from .losses import check_pyramids

    check_pyramids(teachers, students, check_finite=False)
    levels = [ops.anomaly_map_level(t, s).float() for t, s in zip(teachers, students)]
    # a NaN or Inf in a feature makes its pixel's distance NaN (every implementation propagates
    # it), so the small (B, H_l, W_l) level maps are checked first, in one device sync, and the
    # features only when one is not finite, to name them; traced code gets NaN maps instead
    if not _tracing() and not bool(torch.stack([torch.isfinite(m).flatten(1).all(1) for m in levels]).all()):
        ok = torch.stack([torch.isfinite(x).flatten(1).all(1) for x in (*teachers, *students)])  # (2L, B)
        if not bool(ok.all()):
            bad = [f"{'teacher' if i < len(teachers) else 'student'} level {i % len(teachers)}"
                   for i, row in enumerate(ok.all(1).tolist()) if not row]
            images = [i for i, good in enumerate(ok.all(0).tolist()) if not good]
            err = NonFiniteError(
                f"anomaly map: {', '.join(bad)} contain NaN or Inf for batch images {images} (NaN/Inf in "
                f"the input images or the weights)")
            err.batch_indices = images
            raise err
    return gaussian_blur(fuse_levels(levels, out_size, fusion), sigma)


def topk_count(num_pixels: int, fraction: float) -> int:
    """Pixels averaged by the ``'topk'`` rule: ``max(1, ceil(fraction * num_pixels))``."""
    return max(1, math.ceil(check_fraction(fraction, "topk_fraction") * int(num_pixels)))


def image_scores(maps: Tensor, rule: str = "max", topk_fraction: float = DEFAULT_TOPK_FRACTION) -> Tensor:
    """Image scores of anomaly maps.

    Args:
        maps: ``(B, H, W)`` float anomaly maps.
        rule: ``'max'``: the map's maximum (method.md section 5); ``'topk'``: the mean of its
            :func:`topk_count` largest pixels (less sensitive to a single noisy pixel).
        topk_fraction: fraction of pixels for ``'topk'``, in (0, 1].

    Returns:
        ``(B,)`` scores, same dtype as ``maps``.

    Raises:
        InvalidArgumentError: unknown ``rule`` or a fraction outside (0, 1].
    """
    if rule not in IMAGE_SCORES:
        raise InvalidArgumentError(f"image_score: expected one of {IMAGE_SCORES}, got {rule!r}")
    flat = maps.flatten(1)
    if rule == "max":
        return flat.amax(dim=1)
    k = topk_count(flat.shape[1], topk_fraction)
    return flat.topk(k, dim=1).values.mean(dim=1)


def _tracing() -> bool:
    """True under ``torch.jit.trace``, ONNX export or ``torch.compile`` (no data-dependent checks)."""
    if torch.jit.is_tracing():
        return True
    try:
        if torch.onnx.is_in_onnx_export():
            return True
    except AttributeError:  # pragma: no cover
        pass
    comp = getattr(torch, "compiler", None)
    return bool(comp is not None and hasattr(comp, "is_compiling") and comp.is_compiling())


class AnomalyModel(nn.Module):
    """The inference model: teacher, student (and DCAM only for ``dcam_at_inference='keep'``),
    anomaly map and image score.

    ``forward(images)``: ``(B, 3, H, W)`` float images normalised with the backbone's
    statistics -> ``(maps (B, H, W) float32, scores (B,) float32)``; maps at the input's size
    unless ``out_size`` is set; scores by :func:`image_scores` with ``image_score`` and
    ``topk_fraction``. The cost is exactly STFPM's when DCAM is dropped.

    ``precision`` (:data:`dcamkd.config.PRECISIONS`): ``'bf16'`` runs teacher, student (and
    DCAM) under bfloat16 autocast and hands bfloat16 pyramids to the anomaly map, which
    accumulates in float32; maps and scores are float32 in both precisions
    (:mod:`dcamkd.precision`). The weights are not cast. The attribute may be changed at any time.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        fusion: str = "sum",
        sigma: float = 0.0,
        dcam: Optional[nn.Module] = None,
        out_size: Optional[tuple[int, int]] = None,
        image_score: str = "max",
        topk_fraction: float = DEFAULT_TOPK_FRACTION,
        precision: str = DEFAULT_PRECISION,
    ):
        super().__init__()
        self.precision = check_precision(precision)
        if fusion not in FUSIONS:
            raise InvalidArgumentError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        settings = ScoringSettings(fusion, sigma, image_score, topk_fraction)
        self.teacher, self.student, self.dcam = teacher, student, dcam
        self.fusion, self.sigma, self.out_size = fusion, settings.sigma, out_size
        self.image_score, self.topk_fraction = settings.image_score, settings.topk_fraction

    @property
    def settings(self) -> ScoringSettings:
        """The model's :class:`ScoringSettings`."""
        return ScoringSettings(self.fusion, self.sigma, self.image_score, self.topk_fraction)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.score_maps(self.unblurred_maps(images))

    def unblurred_maps(self, images: Tensor) -> Tensor:
        """The ``(B, H, W)`` float32 anomaly maps of float ``(B, 3, H, W)`` images before the
        blur (:func:`anomaly_map` with sigma 0). Raises :class:`InvalidArgumentError` for
        images of another shape or dtype, or an empty batch."""
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3 \
                or not images.is_floating_point():
            raise InvalidArgumentError(
                "images: expected a float (B, 3, H, W) tensor, got "
                + (f"{images.dtype} of shape {tuple(images.shape)}" if isinstance(images, Tensor)
                   else type(images).__name__))
        if images.numel() == 0:
            raise InvalidArgumentError(
                f"images: expected a non-empty batch of non-empty images, got shape {tuple(images.shape)}")
        with autocast(self.precision, images.device):
            t = self.teacher(images)
            s = self.student(images)
            if self.dcam is not None:
                s = self.dcam.attend(s)
        t, s = to_precision(t, self.precision), to_precision(s, self.precision)
        size = self.out_size or tuple(images.shape[-2:])
        return anomaly_map(t, s, size, self.fusion)

    def score_maps(self, unblurred: Tensor) -> tuple[Tensor, Tensor]:
        """``(maps, scores)`` from :meth:`unblurred_maps`: the ``(B, H, W)`` maps blurred with
        this model's sigma and their ``(B,)`` image scores by its rule (what :meth:`forward`
        returns)."""
        maps = gaussian_blur(unblurred, self.sigma)
        return maps, image_scores(maps, self.image_score, self.topk_fraction)
