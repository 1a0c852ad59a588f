"""Shared test helpers: tiny generated MVTec AD trees.

Use the fixtures (preferred)::

    def test_x(mvtec_tree):                # a default tree: categories "alpha", "beta"
        ...
    def test_y(make_tree):                 # a factory bound to the test's tmp_path
        root = make_tree(categories=("a",), n_train=6, size=48, root_name="other")

or import the plain function (``tests/`` is on ``sys.path`` under pytest's default rootdir
import mode)::

    from conftest import make_mvtec_tree

Everything is deterministic for a seed, small (default 32 x 32 pixels) and fast (~ms per image).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

# Without a GPU the Triton kernels run under the interpreter, which must be chosen before any
# kernel module is imported (by any test module, at collection): set it here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from PIL import Image

__all__ = ["make_mvtec_tree", "random_texture", "blob_mask"]


def random_texture(rng: np.random.Generator, size: int, period: float = 8.0,
                   channels: int = 3) -> np.ndarray:
    """A random texture: oriented stripes of the given period plus smooth and fine noise.

    Returns:
        uint8 ``(size, size, channels)`` (``(size, size)`` when ``channels == 1``), values
        roughly 40..215.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    ang = rng.uniform(0, np.pi)
    stripes = np.sin(2 * np.pi * (xx * np.cos(ang) + yy * np.sin(ang)) / period + rng.uniform(0, 6.3))
    coarse = rng.normal(size=(max(2, size // 8), max(2, size // 8)))
    coarse = np.asarray(Image.fromarray(coarse.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
    base = 128 + 35 * stripes + 20 * coarse
    out = []
    for _ in range(channels):
        out.append(base + rng.normal(scale=8.0, size=(size, size)) + rng.uniform(-10, 10))
    a = np.clip(np.rint(np.stack(out, axis=-1)), 0, 255).astype(np.uint8)
    return a[..., 0] if channels == 1 else a


def blob_mask(rng: np.random.Generator, size: int, frac: tuple = (0.15, 0.3)) -> np.ndarray:
    """An ellipse-like blob inside the image, diameter ``frac`` of the side; bool ``(size, size)``,
    never empty."""
    ry, rx = rng.uniform(*frac, size=2) * size / 2
    ry, rx = max(ry, 1.0), max(rx, 1.0)
    cy = rng.uniform(ry, size - ry)
    cx = rng.uniform(rx, size - rx)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    if not m.any():
        m[int(cy), int(cx)] = True
    return m


def _save(a: np.ndarray, path: Path, mode: str) -> None:
    im = Image.fromarray(a)
    if mode == "L" and im.mode != "L":
        im = im.convert("L")
    elif mode != im.mode:
        im = im.convert(mode)
    im.save(path)


def make_mvtec_tree(
    tmp_path: Path,
    categories: Sequence[str] = ("alpha", "beta"),
    n_train: int = 4,
    n_test_good: int = 2,
    n_defect: int = 2,
    size: int = 32,
    defects: Sequence[str] = ("blob",),
    mode: str = "RGB",
    ext: str = ".png",
    mask_suffix: str = "_mask",
    root_name: str = "mvtec",
    seed: int = 0,
) -> Path:
    """Write a tiny MVTec AD tree of random-texture images with blob defects.

    Layout under ``root = tmp_path / root_name``::

        <cat>/train/good/000<ext> ...                 n_train images
        <cat>/test/good/000<ext> ...                  n_test_good images
        <cat>/test/<defect>/000<ext> ...              n_defect images per defect type
        <cat>/ground_truth/<defect>/000<mask_suffix>.png   0/255 grey PNG masks

    Each category has its own stripe period (so categories differ). A defective image is a fresh
    texture with one blob (15-30 % of the side) shifted by +-70 grey levels; its mask is exactly
    that blob. Files are numbered from 000 within each folder.

    Args:
        tmp_path: parent folder (pytest's ``tmp_path``).
        categories: category names.
        n_train, n_test_good: images per category in train/good and test/good (0 allowed, in
            which case the folder is still created, empty).
        n_defect: defective images per defect type per category.
        size: image side in pixels.
        defects: defect-type folder names.
        mode: PIL mode the images are saved in (``RGB`` or ``L``; others via ``convert``).
        ext: image extension (``.png``, ``.bmp``, ``.tif``; ``.jpg`` works but is lossy).
        mask_suffix: mask name suffix (``""`` gives ``<stem>.png`` masks).
        root_name: name of the root folder, to make several trees in one ``tmp_path``.
        seed: seed of every random draw.

    Returns:
        The root ``Path``.
    """
    root = Path(tmp_path) / root_name
    rng = np.random.default_rng(seed)
    for ci, cat in enumerate(categories):
        period = 5.0 + 3.0 * ci
        tg = root / cat / "train" / "good"
        sg = root / cat / "test" / "good"
        tg.mkdir(parents=True, exist_ok=True)
        sg.mkdir(parents=True, exist_ok=True)
        for i in range(n_train):
            _save(random_texture(rng, size, period), tg / f"{i:03d}{ext}", mode)
        for i in range(n_test_good):
            _save(random_texture(rng, size, period), sg / f"{i:03d}{ext}", mode)
        for d in defects:
            dd = root / cat / "test" / d
            gd = root / cat / "ground_truth" / d
            dd.mkdir(parents=True, exist_ok=True)
            gd.mkdir(parents=True, exist_ok=True)
            for i in range(n_defect):
                img = random_texture(rng, size, period).astype(np.int16)
                m = blob_mask(rng, size)
                shift = 70 if rng.random() < 0.5 else -70
                img[m] += shift
                img = np.clip(img, 0, 255).astype(np.uint8)
                _save(img, dd / f"{i:03d}{ext}", mode)
                Image.fromarray(m.astype(np.uint8) * 255, mode="L").save(gd / f"{i:03d}{mask_suffix}.png")
    return root


@pytest.fixture
def make_tree(tmp_path):
    """Factory fixture: ``make_tree(**kwargs)`` = ``make_mvtec_tree(tmp_path, **kwargs)``."""

    def _make(**kwargs) -> Path:
        return make_mvtec_tree(tmp_path, **kwargs)

    return _make


@pytest.fixture
def mvtec_tree(tmp_path) -> Path:
    """A default tree: categories alpha and beta, 4 train, 2 test good, 2 blob defects, 32 px RGB."""
    return make_mvtec_tree(tmp_path)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A module-wide training tree: alpha and beta, 6 train, 3 test good, 3 defects, 64 px (enough
    images for a batch of 4 and a validation split)."""
    return make_mvtec_tree(tmp_path_factory.mktemp("data"), categories=("alpha", "beta"), n_train=6,
                           n_test_good=3, n_defect=3, size=64)


def tiny_cfg(root, preset: str = "dcam", **kw):
    """A validated TrainConfig of ``preset`` for a tiny run on ``root``: 64 px, 3 steps of batch 4,
    lr 0.05, a random teacher (no weights), seed 0; ``kw`` override."""
    from dcamkd.config import preset_config

    base = dict(data=str(root), image_size=64, steps=3, batch_size=4, lr=0.05, teacher_weights=None, seed=0)
    base.update(kw)
    return preset_config(preset, **base)


def real_industrial3() -> "Path | None":
    """The real industrial3 dataset (MVTec AD layout, with its SOURCES.md), or None: the folder
    named by ``$DCAMKD_DATA`` (the dataset itself or its parent), else
    ``../shared/datasets/industrial3`` relative to the repository root."""
    env = os.environ.get("DCAMKD_DATA")
    candidates = ([Path(env), Path(env) / "industrial3"] if env else []) + [
        Path(__file__).resolve().parents[2] / "shared" / "datasets" / "industrial3"]
    for c in candidates:
        if (c / "SOURCES.md").is_file():
            return c
    return None
