"""ONNX export of the inference model (method.md section 5): teacher, student, anomaly map with
its level fusion and optional Gaussian blur, image score.

The exported graph takes ``images``: float32 ``(B, 3, S, S)`` normalised with the backbone's
statistics (``(x / 255 - mean) / std``, RGB; ``S``, ``mean`` and ``std`` are in the file's
metadata) and returns ``maps``: float32 ``(B, S, S)`` and ``scores``: float32 ``(B,)`` (the
checkpoint's image-score rule: the map maximum, or the mean of its top-k fraction). The
metadata also holds the scoring settings and, for a calibrated checkpoint, ``calibration``: per
category and pooled the ``threshold`` and ``median`` (raw units) with ``alpha``, so a deployment
can decide (``score >= threshold``) and normalise (``(score - median) / (threshold - median)``)
as :class:`dcamkd.Detector` does. The fused custom ops (``dcamkd::anomaly_map``, DCAM gates) are not ONNX operators, so
the export runs under ``dcamkd.ops.use('reference')``: they export through their pure-PyTorch
decomposition (:mod:`dcamkd.reference`), which is the op's specification.

Command line::

    dcamkd export --checkpoint CKPT --format onnx --out model.onnx [--dynamic-batch]
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .errors import InvalidArgumentError

from .config import EXPORT_FORMATS  # re-exported

__all__ = ["EXPORT_FORMATS", "export_onnx"]


class _Exportable(nn.Module):
    """Wraps :class:`~dcamkd.scoring.AnomalyModel` with a fixed output size and named outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        maps, scores = self.model(images)
        return maps, scores


def export_onnx(
    checkpoint,
    out: str | os.PathLike,
    dynamic_batch: bool = False,
    batch_size: int = 1,
    fusion: Optional[str] = None,
    sigma: Optional[float] = None,
    opset: int = 17,
    image_score: Optional[str] = None,
    topk_fraction: Optional[float] = None,
) -> Path:
    """Export a checkpoint's inference model to ONNX, written atomically to ``out``.

    Args:
        checkpoint: a checkpoint path, or a dict from :func:`dcamkd.checkpoint.load_checkpoint`.
        out: the ``.onnx`` file to write (parent folders are created).
        dynamic_batch: make the batch axis of ``images``, ``maps`` and ``scores`` dynamic
            (``"batch"``); otherwise the batch size is fixed to ``batch_size``.
        batch_size: the batch size of a static export (and of the tracing example), >= 1.
        fusion, sigma, image_score, topk_fraction: override the checkpoint's scoring settings
            (level fusion ``'sum'``/``'product'``; Gaussian sigma in pixels of the map, 0 = no blur;
            image score ``'max'``/``'topk'`` and its fraction); refused for a calibrated checkpoint
            (:func:`dcamkd.checkpoint.resolve_scoring`).
        opset: ONNX opset version (>= 13).

    Returns:
        ``out`` as a Path. The model's metadata props hold ``image_size``, ``mean``, ``std``,
        ``fusion``, ``sigma``, ``image_score``, ``topk_fraction``, ``backbone``,
        ``dcamkd_version`` and, when calibrated, ``calibration`` (JSON) (when the ``onnx``
        package is installed).

    Raises:
        MissingFileError, CheckpointError: as :func:`dcamkd.checkpoint.load_checkpoint`.
        InvalidArgumentError: ``batch_size < 1``, ``opset < 13``, bad or refused scoring settings.
    """
    from ._version import __version__
    from .checkpoint import load_checkpoint, model_from_checkpoint, resolve_scoring
    from .io import atomic_write_bytes
    from .ops import use

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if not isinstance(opset, int) or opset < 13:
        raise InvalidArgumentError(f"opset: expected an int >= 13, got {opset!r}")
    if sigma is not None and not (sigma >= 0):
        raise InvalidArgumentError(f"sigma: expected a number >= 0 (pixels), got {sigma!r}")
    ck = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    settings = resolve_scoring(ck, str(checkpoint) if not isinstance(checkpoint, dict) else "CKPT", fusion=fusion,
                               sigma=sigma, image_score=image_score, topk_fraction=topk_fraction)
    model, cfg = model_from_checkpoint(ck, "cpu", **settings.to_dict(), precision="fp32", compile=False)
    size = int(ck["image_size"])
    model.out_size = (size, size)
    net = _Exportable(model).eval()
    example = torch.zeros(batch_size, 3, size, size)
    kwargs = dict(input_names=["images"], output_names=["maps", "scores"], opset_version=opset,
                  do_constant_folding=True)
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"images": {0: "batch"}, "maps": {0: "batch"}, "scores": {0: "batch"}}
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(), use("reference"):
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        try:
            torch.onnx.export(net, (example,), buf, dynamo=False, **kwargs)
        except TypeError:  # a torch without the ``dynamo`` switch: the legacy exporter is the default
            torch.onnx.export(net, (example,), buf, **kwargs)
    data = buf.getvalue()
    meta = {
        "image_size": str(size),
        "mean": json.dumps(list(ck["mean"])),
        "std": json.dumps(list(ck["std"])),
        "fusion": model.fusion,
        "sigma": repr(model.sigma),
        "image_score": model.image_score,
        "topk_fraction": repr(model.topk_fraction),
        "backbone": cfg.backbone,
        "dcamkd_version": __version__,
        "inputs": "images: float32 (B, 3, S, S), RGB, (x/255 - mean)/std",
        "outputs": "maps: float32 (B, S, S) anomaly map; scores: float32 (B,) image score "
                   + ("(map maximum)" if model.image_score == "max" else
                      f"(mean of the top {model.topk_fraction:g} fraction of map pixels)"),
    }
    cal = ck.get("calibration")
    if cal:
        keep = ("threshold", "median", "n")
        meta["calibration"] = json.dumps({
            "alpha": cal["alpha"], "tie_rule": cal["tie_rule"],
            "per_category": {c: {k: e[k] for k in keep} for c, e in cal["per_category"].items()
                             if e["threshold"] is not None},
            "pooled": {k: cal["pooled"][k] for k in keep}})
    try:
        import onnx

        proto = onnx.load_model_from_string(data)
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        data = proto.SerializeToString()
    except ImportError:  # metadata is a convenience; the graph is complete without it
        pass
    return atomic_write_bytes(out, data)
