"""A small offline demo dataset in MVTec AD layout, built from three real texture photographs.

The photographs are the grey 512 x 512 textures bundled with scikit-image (``skimage.data.brick``,
``.grass``, ``.gravel``; CC0 licence, loaded offline from the installed package). Each becomes a
category:

* training images (``train/good``): random square crops from the top 60 % of the photo
  (crop side jittered by +-10 %, random horizontal/vertical flips), resized to ``image_size``;
* test images: crops of the fixed side from the bottom 40 % of the photo (so train and test are
  different crops of the same surface), resized likewise;
* defective test images get one pasted defect each, with an exact mask (the set of pixels the
  defect replaced; 0/255 PNG ``ground_truth/<type>/<stem>_mask.png``). Types, in turn:

  - ``foreign_patch``: an irregular blob (a radius modulated by low-order harmonics) filled with
    a crop of *another* category's photo, its contrast raised 1.5x and its mean shifted by
    45-65 grey levels from the host;
  - ``scratch``: a thick random polyline (3-4 vertices), dark or bright;
  - ``stain``: an irregular blob blended 75-90 % towards a dark or bright tone (texture damped,
    intensity shifted).

  Blobs span about 14-20 % of the image side, scratches are 4-5.5 % of the side thick and
  35-55 % long: clearly visible, but textured and irregular rather than flat squares.

Images are saved as 8-bit grey PNGs (the loader replicates grey to RGB). Everything is drawn from
``numpy.random.default_rng`` seeded per (seed, category): the files are identical for a seed.
A ``demo.json`` marker records the parameters; a later call with the same parameters reuses the
folder instead of rebuilding it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from .errors import InvalidArgumentError

__all__ = ["DEMO_CATEGORIES", "DEMO_DEFECT_TYPES", "make_demo_dataset"]

#: Categories of the demo dataset (the scikit-image texture photos of the same names).
DEMO_CATEGORIES = ("brick", "grass", "gravel")
#: Defect types, in the round-robin order defective images are assigned to.
DEMO_DEFECT_TYPES = ("foreign_patch", "scratch", "stain")

_FORMAT_VERSION = 1
_MARKER = "demo.json"
_README = "DEMO.md"
_TRAIN_FRACTION = 0.6   # rows of the photo used for training crops (the rest for test crops)
_CROP = 160             # crop side in photo pixels for test crops (train: +-10 %)


def _textures() -> Dict[str, np.ndarray]:
    import skimage.data

    out = {}
    for name in DEMO_CATEGORIES:
        a = np.asarray(getattr(skimage.data, name)())
        if a.ndim == 3:
            a = a[..., :3].mean(axis=2)
        out[name] = np.asarray(a, dtype=np.uint8)
    return out


def _resize(a: np.ndarray, size: int) -> np.ndarray:
    im = Image.fromarray(a, mode="L")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def _crop(photo: np.ndarray, rows: Tuple[int, int], side: int, rng: np.random.Generator,
          flip: bool = True) -> np.ndarray:
    r0, r1 = rows
    side = min(side, r1 - r0, photo.shape[1])
    y = int(rng.integers(r0, r1 - side + 1))
    x = int(rng.integers(0, photo.shape[1] - side + 1))
    c = photo[y:y + side, x:x + side]
    if flip:
        if rng.random() < 0.5:
            c = c[:, ::-1]
        if rng.random() < 0.5:
            c = c[::-1, :]
    return np.ascontiguousarray(c)


def _blob_mask(size: int, rng: np.random.Generator, frac: Tuple[float, float] = (0.14, 0.20)) -> np.ndarray:
    """An irregular blob: ``r(theta) = R (1 + sum_k a_k cos(k theta + phi_k))``, k = 2..4."""
    diam = rng.uniform(*frac) * size
    R = max(diam / 2.0, 2.0)
    amps = rng.uniform(0.0, 0.15, size=3)
    phases = rng.uniform(0.0, 2 * np.pi, size=3)
    margin = R * 1.5 + 1
    cy, cx = rng.uniform(margin, size - margin, size=2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dy, dx = yy + 0.5 - cy, xx + 0.5 - cx
    theta = np.arctan2(dy, dx)
    r = R * (1.0 + sum(a * np.cos(k * theta + p) for a, k, p in zip(amps, (2, 3, 4), phases)))
    mask = np.hypot(dy, dx) <= r
    if not mask.any():  # tiny images: at least the centre pixel
        mask[int(cy), int(cx)] = True
    return mask


def _scratch_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    length = rng.uniform(0.35, 0.55) * size
    width = max(2, int(round(rng.uniform(0.04, 0.055) * size)))
    n_seg = int(rng.integers(2, 4))
    seg = length / n_seg
    margin = 0.15 * size
    p = rng.uniform(margin, size - margin, size=2)
    ang = rng.uniform(0, 2 * np.pi)
    pts = [tuple(p)]
    for _ in range(n_seg):
        ang += rng.uniform(-0.7, 0.7)
        p = np.clip(p + seg * np.array([np.cos(ang), np.sin(ang)]), width + 1, size - 2 - width)
        pts.append(tuple(p))
    im = Image.new("L", (size, size), 0)
    ImageDraw.Draw(im).line([(float(x), float(y)) for x, y in pts], fill=255, width=width, joint="curve")
    return np.asarray(im) > 127


def _apply_defect(img: np.ndarray, kind: str, rng: np.random.Generator,
                  foreign: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Paste one defect into a grey uint8 image.

    Args:
        img: uint8 ``(S, S)`` host image.
        kind: one of :data:`DEMO_DEFECT_TYPES`.
        rng: the generator.
        foreign: uint8 ``(S, S)`` crop of another texture (used by ``foreign_patch``).

    Returns:
        ``(out, mask)``: uint8 ``(S, S)`` image and bool ``(S, S)`` mask; ``out`` equals ``img``
        outside the mask.
    """
    size = img.shape[0]
    x = img.astype(np.float64)
    if kind == "foreign_patch":
        mask = _blob_mask(size, rng)
        f = foreign.astype(np.float64)
        shift = rng.uniform(45, 65) * rng.choice([-1.0, 1.0])
        target = x[mask].mean() + shift
        if not 20 <= target <= 235:  # keep the shift inside the range
            target = x[mask].mean() - shift
        new = 1.5 * (f - f[mask].mean()) + target
    elif kind == "scratch":
        mask = _scratch_mask(size, rng)
        if rng.random() < 0.5:
            new = x * rng.uniform(0.15, 0.3)
        else:
            new = x * 0.2 + rng.uniform(195, 215)
    elif kind == "stain":
        mask = _blob_mask(size, rng)
        alpha = rng.uniform(0.75, 0.9)
        tone = rng.uniform(0, 30) if rng.random() < 0.5 else rng.uniform(225, 255)
        new = (1 - alpha) * x + alpha * tone
    else:
        raise InvalidArgumentError(f"defect kind must be one of {DEMO_DEFECT_TYPES}, got {kind!r}")
    new = np.clip(np.rint(new), 0, 255)
    out = np.where(mask, new, x).astype(np.uint8)
    return out, mask


def _save_png(a: np.ndarray, path: Path) -> None:
    Image.fromarray(a, mode="L").save(path, compress_level=1)


def _build_category(base: Path, name: str, textures: Dict[str, np.ndarray], image_size: int,
                    n_train: int, n_test_good: int, n_test_defect: int, seed: int) -> None:
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])
    photo = textures[name]
    split = int(round(photo.shape[0] * _TRAIN_FRACTION))
    others = [c for c in DEMO_CATEGORIES if c != name]
    cat = base / name
    (cat / "train" / "good").mkdir(parents=True)
    for i in range(n_train):
        side = int(round(_CROP * rng.uniform(0.9, 1.1)))
        _save_png(_resize(_crop(photo, (0, split), side, rng), image_size), cat / "train" / "good" / f"{i:03d}.png")
    if n_test_good:
        (cat / "test" / "good").mkdir(parents=True)
    for i in range(n_test_good):
        _save_png(_resize(_crop(photo, (split, photo.shape[0]), _CROP, rng), image_size),
                  cat / "test" / "good" / f"{i:03d}.png")
    counters = {k: 0 for k in DEMO_DEFECT_TYPES}
    for i in range(n_test_defect):
        kind = DEMO_DEFECT_TYPES[i % len(DEMO_DEFECT_TYPES)]
        host = _resize(_crop(photo, (split, photo.shape[0]), _CROP, rng), image_size)
        other = textures[others[int(rng.integers(len(others)))]]
        foreign = _resize(_crop(other, (0, other.shape[0]), _CROP, rng), image_size)
        out, mask = _apply_defect(host, kind, rng, foreign)
        j = counters[kind]
        counters[kind] += 1
        tdir, gdir = cat / "test" / kind, cat / "ground_truth" / kind
        tdir.mkdir(parents=True, exist_ok=True)
        gdir.mkdir(parents=True, exist_ok=True)
        _save_png(out, tdir / f"{j:03d}.png")
        _save_png(mask.astype(np.uint8) * 255, gdir / f"{j:03d}_mask.png")


def make_demo_dataset(root: Union[str, "os.PathLike[str]"], image_size: int = 128, n_train: int = 60,
                      n_test_good: int = 12, n_test_defect: int = 12, seed: int = 0) -> Path:
    """Build (or reuse) the demo dataset at ``root`` (see the module docstring).

    Per category: ``n_train`` training images, ``n_test_good`` good and ``n_test_defect``
    defective test images (types assigned in turn: foreign_patch, scratch, stain), all
    ``image_size x image_size`` grey PNGs. Runs in about a second at the defaults. The tree is
    built in a temporary sibling folder and moved into place, so an interrupted build leaves no
    half dataset at ``root``.

    Args:
        root: the dataset root to create. It may be missing, an empty folder, or a demo dataset
            made earlier by this function (reused when its parameters match, rebuilt otherwise).
        image_size: side of the images in pixels (>= 32).
        n_train: training images per category (>= 1).
        n_test_good, n_test_defect: test images per category (>= 0 each, at least one in all).
        seed: the seed.

    Returns:
        ``root`` as a ``Path``.

    Raises:
        InvalidArgumentError: bad counts or size; ``root`` is a non-empty folder that is not a demo
            dataset (nothing is deleted then), or a file.
    """
    for name, v, lo in (("image_size", image_size, 32), ("n_train", n_train, 1),
                        ("n_test_good", n_test_good, 0), ("n_test_defect", n_test_defect, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise InvalidArgumentError(f"{name} must be an int >= {lo}, got {v!r}")
    if n_test_good + n_test_defect < 1:
        raise InvalidArgumentError("n_test_good + n_test_defect must be >= 1 (a category needs test images)")
    root = Path(root)
    params = {"format_version": _FORMAT_VERSION, "image_size": int(image_size), "n_train": int(n_train),
              "n_test_good": int(n_test_good), "n_test_defect": int(n_test_defect), "seed": int(seed)}
    if root.exists():
        if not root.is_dir():
            raise InvalidArgumentError(f"demo dataset root {str(root)!r} exists and is not a folder")
        entries = {p.name for p in root.iterdir()}
        if entries:
            marker = root / _MARKER
            if not marker.is_file():
                raise InvalidArgumentError(
                    f"demo dataset root {str(root)!r} is a non-empty folder without {_MARKER}; "
                    f"give an empty or new folder")
            try:
                old = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                old = None
            if old == params:
                return root
            ours = set(DEMO_CATEGORIES) | {_MARKER, _README}
            if not entries <= ours:
                raise InvalidArgumentError(
                    f"demo dataset root {str(root)!r} holds other files ({', '.join(sorted(entries - ours))}); "
                    f"not rebuilding it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building.", dir=str(root.parent)))
    try:
        textures = _textures()
        for name in DEMO_CATEGORIES:
            _build_category(tmp, name, textures, int(image_size), int(n_train), int(n_test_good),
                            int(n_test_defect), int(seed))
        (tmp / _README).write_text(_readme(params), encoding="utf-8")
        (tmp / _MARKER).write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _readme(params: dict) -> str:
    lines: List[str] = [
        "# dcamkd demo dataset (generated)",
        "",
        "Made by `dcamkd.demo_data.make_demo_dataset` from the CC0 texture photos bundled with",
        "scikit-image (`skimage.data.brick`, `grass`, `gravel`). MVTec AD layout: train crops from the",
        "top 60 % of each photo, test crops from the bottom 40 %, defects pasted into test crops",
        "(foreign_patch, scratch, stain) with exact 0/255 masks.",
        "",
        f"Parameters: `{json.dumps(params)}`",
        "",
    ]
    return "\n".join(lines)
