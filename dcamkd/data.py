"""MVTec-AD-layout datasets: scanning, image and mask decoding, the train/val split, tensors.

Layout (Bergmann et al., "MVTec AD", CVPR 2019) of one category folder::

    <root>/<category>/train/good/*                       defect-free training images
    <root>/<category>/test/good/*                        defect-free test images
    <root>/<category>/test/<defect>/*                    defective test images, one folder per type
    <root>/<category>/ground_truth/<defect>/<stem>_mask.<ext>   its mask (``<stem>.<ext>`` also accepted)

Training pools the ``train/good`` images of every category (multi-class training, method.md
section 1); a seeded, per-category 20 % of them is held out for validation (method.md section 6).
Images are decoded once to RGB uint8, resized once to ``S x S`` (PIL bilinear, antialiased when
shrinking) and kept in memory, so epochs do not decode files again (method.md section 2).

Masks are binarised by the rule of method.md section 7 ("bilinear + half of the range"), see
:func:`load_mask`.

Only files whose extension is in :data:`IMAGE_EXTENSIONS` (any case) are read; hidden files and
folders (``.DS_Store``, macOS ``._*`` forks), ``Thumbs.db``, other extensions and nested folders
inside image folders are ignored.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from .backbones import IMAGENET_MEAN, IMAGENET_STD  # re-exported
from .errors import DatasetError, DcamkdError, ImageReadError, InvalidArgumentError, MissingFileError

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Sample",
    "list_categories",
    "scan_category",
    "load_image",
    "load_image_reduced",
    "LARGE_IMAGE_PIXELS",
    "load_mask",
    "check_mask_size",
    "train_val_split",
    "ImageDataset",
    "build_datasets",
    "write_split",
    "find_images",
    "image_to_tensor",
    "to_rgb",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Image file extensions that are read (compared case-insensitively, with the dot).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


_GOOD = "good"
_MASK_SUFFIX = "_mask"
_EXIF_ORIENTATION = 0x0112
# Decoding failures PIL reports through several exception types.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError,
                  Image.DecompressionBombError)


# ----------------------------------------------------------------------------- files


def _is_image_file(path: Path) -> bool:
    return (not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
            and path.is_file())


def _image_files(folder: Path) -> List[Path]:
    """Image files directly inside ``folder``, sorted by name; stray files are skipped."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _is_image_file(p)), key=lambda p: p.name)


def _subdirs(folder: Path) -> List[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def list_categories(root: PathLike) -> List[str]:
    """Category folders of an MVTec-layout dataset root.

    A category is a non-hidden sub-folder of ``root`` holding a ``train/`` or a ``test/`` folder;
    other folders and files are ignored.

    Args:
        root: the dataset root.

    Returns:
        The category names, sorted.

    Raises:
        MissingFileError: ``root`` does not exist or is not a folder.
        DatasetError: ``root`` holds no category folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"dataset root {str(root)!r} does not exist or is not a folder")
    cats = [d.name for d in _subdirs(root) if (d / "train").is_dir() or (d / "test").is_dir()]
    if not cats:
        raise DatasetError(
            f"dataset root {str(root)!r} holds no category folder: expected "
            f"<root>/<category>/train/good and <root>/<category>/test/<type> (MVTec AD layout)")
    return cats


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    Attributes:
        path: the image file.
        category: its category folder name.
        label: 0 for a defect-free ("good") image, 1 for a defective one.
        defect: the defect-type folder name (``"good"`` for good images).
        mask_path: the ground-truth mask of a defective image; None for good images.
    """

    path: Path
    category: str
    label: int
    defect: str
    mask_path: Optional[Path] = None

    def __post_init__(self) -> None:
        if self.label not in (0, 1):
            raise InvalidArgumentError(f"Sample.label must be 0 or 1, got {self.label!r} for {self.path}")


# ----------------------------------------------------------------------------- decoding


def _open_error(path: Path, exc: BaseException) -> ImageReadError:
    return ImageReadError(f"cannot read image file {str(path)!r}: {exc.__class__.__name__}: {exc}")


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise MissingFileError(f"image file {str(path)!r} does not exist")
    if not path.is_file():
        raise ImageReadError(f"image path {str(path)!r} is not a file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"cannot read image file {str(path)!r}: the file is empty (0 bytes)")


def _exif_transpose(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a malformed EXIF block is ignored."""
    try:
        out = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - malformed EXIF must not make a readable image unreadable
        return im
    return im if out is None else out


def _decode(path: PathLike) -> Image.Image:
    """Open, fully decode and orient an image file (any mode). Errors as :func:`load_image`."""
    path = Path(path)
    _check_readable(path)
    try:
        with Image.open(path) as im:
            im.load()
            out = _exif_transpose(im)
            if out is im:
                out = im.copy()
            return out
    except DcamkdError:
        raise
    except _DECODE_ERRORS as exc:
        raise _open_error(path, exc) from exc


def _sixteen_bit_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Values 0..65535 -> 0..255, rounded to nearest (v * 255 / 65535)."""
    a = np.clip(arr.astype(np.int64), 0, 65535)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey (PNG/TIFF). Mode "I" (32-bit int) is read as 16-bit data too: that is how
        # older Pillow versions open 16-bit PNGs. Values are clipped to 0..65535.
        return Image.fromarray(_sixteen_bit_to_uint8(np.asarray(im)), mode="L").convert("RGB")
    if mode == "F":
        # Float images: [0, 1] data is scaled by 255, anything else clipped to 0..255.
        a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        return im.convert("RGBA").convert("RGB")
    if mode == "PA":
        return im.convert("RGBA").convert("RGB")
    # L, 1, LA, RGBA, RGBX, CMYK, YCbCr, ...: Pillow drops alpha without compositing.
    return im.convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """An in-memory PIL image in RGB by the conversions of :func:`load_image` (no EXIF step).

    Raises:
        ImageReadError: a mode that cannot be converted.
    """
    try:
        return _to_rgb(im)
    except _DECODE_ERRORS as exc:
        raise ImageReadError(f"cannot convert a PIL image of mode {im.mode} to RGB: {exc}") from exc


def load_image(path: PathLike) -> Image.Image:
    """Decode an image file to an RGB PIL image.

    Conversions: grey (``L``, ``1``) is replicated to 3 channels; the alpha channel of ``RGBA``,
    ``LA`` and ``PA`` is dropped (not composited); palettes are expanded; 16-bit grey (``I;16*``,
    or ``I`` read as 16-bit) is scaled to 8 bits as ``round(v * 255 / 65535)``; ``CMYK`` and
    ``YCbCr`` are converted by Pillow; the EXIF orientation tag is applied
    (``PIL.ImageOps.exif_transpose``; a malformed EXIF block is ignored).

    Args:
        path: the image file.

    Returns:
        A fully loaded ``PIL.Image`` in mode ``RGB`` (size in displayed orientation).

    Raises:
        MissingFileError: the file does not exist.
        ImageReadError: the file is empty, truncated, not an image, or of an unsupported mode;
            the message names the file.
    """
    path = Path(path)
    im = _decode(path)
    try:
        return _to_rgb(im)
    except _DECODE_ERRORS as exc:
        raise ImageReadError(f"cannot convert image file {str(path)!r} (mode {im.mode}) to RGB: {exc}") from exc


#: Images with more pixels than this (as stored) are decoded for training/testing at reduced
#: resolution: see :func:`load_image_reduced`.
LARGE_IMAGE_PIXELS = 4096 * 4096
_REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "RGBX", "I", "F", "CMYK")


def load_image_reduced(path: PathLike, size: int) -> Tuple[Image.Image, Tuple[int, int]]:
    """Decode an image to RGB for resizing to ``size x size``, bounding memory for huge files.

    Images of at most :data:`LARGE_IMAGE_PIXELS` pixels are decoded as by :func:`load_image`.
    Larger ones (e.g. 8000 x 8000 camera frames, 192 MB as RGB) are reduced while decoding, by
    an integer factor that keeps at least ``2 * size`` pixels per side: JPEG through libjpeg's
    DCT scaling (``Image.draft``: 1/2, 1/4, 1/8, so the full-size raster is never allocated),
    other formats by a box filter (``Image.reduce``) right after decoding, before any mode
    conversion. The caller's final antialiased resize to ``size`` then sees an image of a few
    hundred pixels. Pillow's decompression-bomb guard still applies (images above
    ``2 * Image.MAX_IMAGE_PIXELS``, about 179 Mpx, raise :class:`ImageReadError`).

    Args:
        path: the image file.
        size: the target side in pixels (>= 1).

    Returns:
        ``(image, native)``: the RGB image (possibly reduced) and the file's ``(width, height)``
        as displayed (EXIF orientation applied), for checking masks.

    Raises:
        As :func:`load_image`.
    """
    path = Path(path)
    native = _oriented_size(path)
    if native[0] * native[1] <= LARGE_IMAGE_PIXELS:
        return load_image(path), native
    target = 2 * int(size)
    try:
        with Image.open(path) as im:
            if im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
                im.draft(im.mode, (target, target))  # scale >= target per side
            im.load()
            factor = min(im.size) // target
            out = im.reduce(factor) if factor >= 2 and im.mode in _REDUCIBLE_MODES else im.copy()
            if out.mode == "RGBX":
                out = out.convert("RGB")
            out.info = dict(im.info)
            try:
                out.getexif().update(im.getexif())
            except Exception:  # noqa: BLE001 - malformed EXIF is ignored, as in load_image
                pass
        out = _exif_transpose(out)
        return _to_rgb(out), native
    except DcamkdError:
        raise
    except _DECODE_ERRORS as exc:
        raise _open_error(path, exc) from exc


def _mask_values(path: Path) -> np.ndarray:
    """A mask file as float32 (H, W) in [0, 1] by the range rule of :func:`load_mask`."""
    im = _decode(path)
    try:
        mode = im.mode
        if mode == "1":
            a = np.asarray(im, dtype=np.float32)
        elif mode in ("L", "I", "F") or mode.startswith("I;16"):
            a = np.asarray(im, dtype=np.float32)
        elif mode in ("LA", "La"):
            a = np.asarray(im.getchannel(0), dtype=np.float32)
        else:  # colour / palette: a pixel counts by its brightest colour channel
            a = np.asarray(_to_rgb(im), dtype=np.float32).max(axis=2)
    except _DECODE_ERRORS as exc:
        raise ImageReadError(f"cannot convert mask file {str(path)!r} (mode {im.mode}): {exc}") from exc
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    vmax = float(a.max()) if a.size else 0.0
    if vmax <= 1.0:
        rng = 1.0
    elif vmax <= 255.0:
        rng = 255.0
    elif vmax <= 65535.0:
        rng = 65535.0
    else:
        rng = vmax
    return (a / rng).astype(np.float32)


def _size_hw(size: Union[int, Sequence[int]], name: str = "size") -> Tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        h = w = int(size)
    else:
        try:
            h, w = (int(s) for s in size)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise InvalidArgumentError(
                f"{name} must be an int or a (height, width) pair, got {size!r}") from None
    if h < 1 or w < 1:
        raise InvalidArgumentError(f"{name} must be positive, got {size!r}")
    return h, w


def _resize_float(a: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    if a.shape == hw:
        return a
    im = Image.fromarray(a.astype(np.float32), mode="F")
    return np.asarray(im.resize((hw[1], hw[0]), Image.BILINEAR), dtype=np.float32)


def load_mask(path: PathLike, size: Union[int, Sequence[int], None] = None) -> np.ndarray:
    """Decode a ground-truth mask to a boolean array (method.md section 7).

    Rule: the mask's values (grey; for colour masks the brightest channel; alpha ignored) are
    divided by their range, taken as the smallest of 1, 255 and 65535 that holds the mask's
    maximum value; so 0/1, 0/255 and 0/65535 masks all map to 0/1, whatever the file's mode.
    Without ``size`` a pixel is defective where that value is > 0.5. With ``size`` the [0, 1]
    mask is first resized with PIL's bilinear filter (the same filter as the images: plain
    bilinear when enlarging, antialiased triangle filter when shrinking), then binarised at > 0.5.
    A faint mask (e.g. JPEG noise of value 3 on a 0..255 scale) is therefore empty, and a defect
    thinner than about half an output pixel vanishes when shrinking. The EXIF orientation tag is
    applied, as for images.

    Args:
        path: the mask file.
        size: None (native size), an int ``S`` (``S x S``) or a ``(height, width)`` pair.

    Returns:
        ``np.ndarray`` of dtype bool, shape ``(H, W)``.

    Raises:
        MissingFileError: the file does not exist.
        ImageReadError: the file is empty, truncated or not an image.
        InvalidArgumentError: ``size`` is not positive.
    """
    hw = None if size is None else _size_hw(size)
    a = _mask_values(Path(path))
    if hw is not None:
        a = _resize_float(a, hw)
    return a > 0.5


def _oriented_size(path: Path) -> Tuple[int, int]:
    """(width, height) of an image as displayed (EXIF orientation applied), from its header."""
    _check_readable(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = 1
            try:
                if im.format == "PNG":
                    # PngImageFile.getexif() decodes the whole image when eXIf is not in the
                    # header; only a header eXIf chunk is honoured here.
                    raw = im.info.get("exif")
                    if raw:
                        exif = Image.Exif()
                        exif.load(raw)
                        orientation = exif.get(_EXIF_ORIENTATION, 1)
                else:
                    orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            except Exception:  # noqa: BLE001 - malformed EXIF is ignored, as in load_image
                orientation = 1
    except DcamkdError:
        raise
    except _DECODE_ERRORS as exc:
        raise _open_error(path, exc) from exc
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def check_mask_size(image_path: PathLike, mask_path: PathLike) -> None:
    """Check that a mask has its image's size (reads the file headers only).

    Sizes are compared as displayed, i.e. after the EXIF orientation of either file.

    Raises:
        DatasetError: the sizes differ; the message names both files and both sizes.
        MissingFileError: a file does not exist.
        ImageReadError: a file's header cannot be read.
    """
    image_path, mask_path = Path(image_path), Path(mask_path)
    isz = _oriented_size(image_path)
    msz = _oriented_size(mask_path)
    if isz != msz:
        raise DatasetError(
            f"mask {str(mask_path)!r} is {msz[0]}x{msz[1]} (width x height) but its image "
            f"{str(image_path)!r} is {isz[0]}x{isz[1]}; a mask must have its image's size")


# ----------------------------------------------------------------------------- scanning


def _mask_for(image: Path, masks_by_stem: Dict[str, List[Path]], gt_dir: Path) -> Path:
    stem = image.stem
    found = masks_by_stem.get(stem + _MASK_SUFFIX) or masks_by_stem.get(stem) or []
    if len(found) > 1:
        raise DatasetError(
            f"image {str(image)!r} has several candidate masks: {', '.join(str(p) for p in found)}; "
            f"keep exactly one")
    if not found:
        raise MissingFileError(
            f"defective image {str(image)!r} has no mask: expected "
            f"{str(gt_dir / (stem + _MASK_SUFFIX + '.png'))!r} (any image extension; "
            f"'{stem}.<ext>' is also accepted)")
    return found[0]


def scan_category(root: PathLike, category: str) -> Tuple[List[Sample], List[Sample]]:
    """List the training and test images of one category, pairing masks with images.

    Masks of ``test/<defect>/<stem>.<ext>`` are looked up in ``ground_truth/<defect>/`` as
    ``<stem>_mask.<any image ext>``, else ``<stem>.<any image ext>``; each mask's size is checked
    against its image's (headers only). A ``ground_truth/good`` folder is ignored; image files
    directly inside ``test/`` (not in a type folder) are ignored, as are stray files.

    The test set is optional (the unsupervised situation: only ``train/good`` exists): a missing
    or empty ``test/`` folder gives an empty test list; evaluation then skips the category.

    Args:
        root: the dataset root.
        category: the category folder name.

    Returns:
        ``(train, test)``: the ``train/good`` samples (label 0), then the test samples
        (``test/good`` first, then the defect folders in name order; files sorted by name;
        empty without test images).

    Raises:
        MissingFileError: ``root`` or the category folder does not exist; a defective image has
            no mask (the message names the image and the expected mask path).
        DatasetError: ``train/good`` is missing or holds no image; a mask has no image (a broken
            dataset); an image has two candidate masks; a mask's size differs from its image's.
        ImageReadError: an image or mask header cannot be read.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"dataset root {str(root)!r} does not exist or is not a folder")
    cat_dir = root / category
    if not cat_dir.is_dir():
        try:
            avail = ", ".join(list_categories(root))
        except DcamkdError:
            avail = "none"
        raise MissingFileError(
            f"category folder {str(cat_dir)!r} does not exist; categories under {str(root)!r}: {avail}")

    train_dir = cat_dir / "train" / _GOOD
    if not train_dir.is_dir():
        raise DatasetError(f"training folder {str(train_dir)!r} is missing (category {category!r}); "
                           f"expected defect-free training images there")
    train_files = _image_files(train_dir)
    if not train_files:
        raise DatasetError(f"training folder {str(train_dir)!r} holds no image "
                           f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
    train = [Sample(p, category, 0, _GOOD, None) for p in train_files]

    test_dir = cat_dir / "test"
    gt_root = cat_dir / "ground_truth"
    test: List[Sample] = [Sample(p, category, 0, _GOOD, None) for p in _image_files(test_dir / _GOOD)]
    defect_dirs = [d for d in _subdirs(test_dir) if d.name != _GOOD]
    for ddir in defect_dirs:
        gt_dir = gt_root / ddir.name
        masks_by_stem: Dict[str, List[Path]] = {}
        for m in _image_files(gt_dir):
            masks_by_stem.setdefault(m.stem, []).append(m)
        used = set()
        for img in _image_files(ddir):
            mask = _mask_for(img, masks_by_stem, gt_dir)
            check_mask_size(img, mask)
            used.add(mask)
            test.append(Sample(img, category, 1, ddir.name, mask))
        orphans = [m for ms in masks_by_stem.values() for m in ms if m not in used]
        if orphans:
            orphans.sort()
            raise DatasetError(
                f"mask {str(orphans[0])!r} has no image in {str(ddir)!r}"
                + (f" (and {len(orphans) - 1} more masks without image)" if len(orphans) > 1 else "")
                + "; a mask without its image means a broken dataset")
    defect_names = {d.name for d in defect_dirs}
    for gdir in _subdirs(gt_root):
        if gdir.name == _GOOD or gdir.name in defect_names:
            continue
        stray = _image_files(gdir)
        if stray:
            raise DatasetError(
                f"mask {str(stray[0])!r} has no image: test folder {str(test_dir / gdir.name)!r} "
                f"does not exist; a mask without its image means a broken dataset")
    return train, test


def find_images(inputs: Sequence[PathLike]) -> List[Path]:
    """The image files of ``inputs``: files as given, folders searched recursively (files whose
    extension is in :data:`IMAGE_EXTENSIONS`, hidden ones skipped), sorted per input; a file
    named twice is kept once.

    Raises:
        MissingFileError: a path that does not exist, or a folder holding no image file.
    """
    out: List[Path] = []
    seen = set()
    for inp in inputs:
        p = Path(inp)
        if p.is_file():
            found = [p]
        elif p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS
                           and not q.name.startswith("."))
            if not found:
                raise MissingFileError(f"{p}: folder holds no image file "
                                       f"({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)})")
        else:
            raise MissingFileError(f"{p}: no such file or folder")
        for q in found:
            key = q.resolve()
            if key not in seen:
                seen.add(key)
                out.append(q)
    return out


# ----------------------------------------------------------------------------- split


def train_val_split(samples: Iterable[Sample], val_fraction: float = 0.2,
                    seed: int = 0) -> Tuple[List[Sample], List[Sample]]:
    """Seeded hold-out of validation images, stratified per category (method.md section 6).

    Per category with ``n`` images: ``n_val = round(n * val_fraction)``, at least 1 when
    ``n >= 2`` and ``val_fraction > 0``, and at most ``n - 1`` (a category always keeps a training
    image; a category of one image has no validation image). The images of a category are sorted
    by path and permuted by a generator seeded with ``(seed, crc32(category))``, so the result
    depends neither on the input order nor on which other categories are present.

    Args:
        samples: the training samples (any categories).
        val_fraction: the fraction held out, in [0, 1).
        seed: the seed.

    Returns:
        ``(train, val)``: lists of samples, each sorted by (category order of first appearance,
        path).

    Raises:
        InvalidArgumentError: ``val_fraction`` outside [0, 1).
    """
    vf = float(val_fraction)
    if not (0.0 <= vf < 1.0):
        raise InvalidArgumentError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    groups: Dict[str, List[Sample]] = {}
    for s in samples:
        groups.setdefault(s.category, []).append(s)
    train: List[Sample] = []
    val: List[Sample] = []
    for cat, group in groups.items():
        group = sorted(group, key=lambda s: str(s.path))
        n = len(group)
        n_val = int(round(n * vf))
        if vf > 0 and n >= 2:
            n_val = max(1, n_val)
        n_val = min(n_val, n - 1) if n >= 1 else 0
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(cat.encode("utf-8"))])
        val_idx = set(rng.permutation(n)[:n_val].tolist())
        for i, s in enumerate(group):
            (val if i in val_idx else train).append(s)
    return train, val


# ----------------------------------------------------------------------------- dataset


def _stats(values, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if a.size == 1:
        a = np.repeat(a, 3)
    if a.size != 3 or not np.all(np.isfinite(a)):
        raise InvalidArgumentError(f"{name} must be 3 finite numbers (R, G, B), got {values!r}")
    return a


def image_to_tensor(img: np.ndarray, mean_t: torch.Tensor, std_t: torch.Tensor) -> torch.Tensor:
    """uint8 ``(S, S, 3)`` RGB -> float32 ``(3, S, S)``, ``(x / 255 - mean) / std``; ``mean_t``,
    ``std_t`` float32 ``(3, 1, 1)``. The one normalisation of every model input (datasets,
    :class:`dcamkd.Detector`)."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).to(torch.float32).div_(255.0)
    return ((x - mean_t) / std_t).contiguous()


class ImageDataset(torch.utils.data.Dataset):
    """Images (and masks) of a list of samples as normalised tensors.

    Each image is decoded with :func:`load_image`, resized once to ``S x S`` (PIL bilinear,
    antialiased when shrinking; aspect ratio not kept) and, with ``cache=True``, kept in memory as
    uint8 (``3 * S * S`` bytes per image), so later epochs do not decode again. Masks are read
    with :func:`load_mask` at ``S x S``. With a multi-process ``DataLoader`` each worker has its
    own cache; call :meth:`preload` first so forked workers share it.

    Items are dicts:

    * ``image``: float32 ``(3, S, S)``, ``(x / 255 - mean) / std`` per channel;
    * ``label``: int64 scalar tensor, 0 good, 1 defective;
    * ``mask`` (only when ``with_masks``): float32 ``(1, S, S)`` of 0/1, zeros for a good image
      without mask;
    * ``mask_erased`` (only when ``with_masks``): bool scalar tensor, True when the mask has
      defect pixels at its own size but none at ``S x S`` (the resize rule of :func:`load_mask`
      erases defects thinner than about half an output pixel); the evaluation counts and warns;
    * ``category``: str; ``path``: str (the image file); ``index``: int (the item's index).

    Args:
        samples: the samples.
        image_size: ``S``, pixels.
        mean, std: per-channel normalisation for values in [0, 1] (3 numbers, or 1 for all).
        with_masks: also return masks.
        cache: keep decoded images and masks in memory.

    Raises:
        InvalidArgumentError: ``image_size`` < 1, bad ``mean``/``std``.
        On item access: MissingFileError / ImageReadError (unreadable file), DatasetError
        (a mask whose size differs from its image's, or a defective sample without mask when
        ``with_masks``).
    """

    def __init__(self, samples: Sequence[Sample], image_size: int, mean: Sequence[float],
                 std: Sequence[float], with_masks: bool, cache: bool = True) -> None:
        self.samples: List[Sample] = list(samples)
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
            raise InvalidArgumentError(f"image_size must be a positive int, got {image_size!r}")
        self.image_size = int(image_size)
        m, s = _stats(mean, "mean"), _stats(std, "std")
        if np.any(s <= 0):
            raise InvalidArgumentError(f"std must be positive, got {std!r}")
        self.mean = tuple(float(v) for v in m)
        self.std = tuple(float(v) for v in s)
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        self.with_masks = bool(with_masks)
        self.cache = bool(cache)
        self._images: List[Optional[np.ndarray]] = [None] * len(self.samples)
        self._masks: List[Optional[np.ndarray]] = [None] * len(self.samples)
        self._erased: List[bool] = [False] * len(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        cats = sorted({s.category for s in self.samples})
        return (f"ImageDataset({len(self)} images, categories={cats}, image_size={self.image_size}, "
                f"with_masks={self.with_masks}, cache={self.cache})")

    @property
    def labels(self) -> np.ndarray:
        """int64 ``(N,)``: the labels of the samples."""
        return np.asarray([s.label for s in self.samples], dtype=np.int64)

    @property
    def categories(self) -> List[str]:
        """The distinct categories, in order of first appearance."""
        return list(dict.fromkeys(s.category for s in self.samples))

    def _decode(self, i: int) -> Tuple[np.ndarray, Optional[np.ndarray], bool]:
        s = self.samples[i]
        S = self.image_size
        im, native = load_image_reduced(s.path, S)
        if im.size != (S, S):
            im = im.resize((S, S), Image.BILINEAR)
        img = np.array(im, dtype=np.uint8)  # a writable copy (torch.from_numpy needs one)
        mask, erased = None, False
        if self.with_masks:
            if s.mask_path is not None:
                vals = _mask_values(Path(s.mask_path))
                if (vals.shape[1], vals.shape[0]) != native:
                    raise DatasetError(
                        f"mask {str(s.mask_path)!r} is {vals.shape[1]}x{vals.shape[0]} (width x height) "
                        f"but its image {str(s.path)!r} is {native[0]}x{native[1]}")
                mask = _resize_float(vals, (S, S)) > 0.5
                erased = not mask.any() and bool((vals > 0.5).any())
            elif s.label == 1:
                raise DatasetError(f"defective image {str(s.path)!r} has no mask (mask_path is None)")
            else:
                mask = np.zeros((S, S), dtype=bool)
        return img, mask, erased

    def _get(self, i: int) -> Tuple[np.ndarray, Optional[np.ndarray], bool]:
        img = self._images[i]
        if img is not None and (not self.with_masks or self._masks[i] is not None):
            return img, self._masks[i], self._erased[i]
        img, mask, erased = self._decode(i)
        if self.cache:
            self._images[i] = img
            self._masks[i] = mask
            self._erased[i] = erased
        return img, mask, erased

    def preload(self, num_threads: Optional[int] = None) -> "ImageDataset":
        """Decode every image not yet cached, with a thread pool (PIL decodes without the GIL).

        Args:
            num_threads: threads; default ``min(8, os.cpu_count())``.

        Returns:
            self. Does nothing when ``cache`` is False.
        """
        if not self.cache:
            return self
        todo = [i for i in range(len(self)) if self._images[i] is None
                or (self.with_masks and self._masks[i] is None)]
        if not todo:
            return self
        n = num_threads or min(8, os.cpu_count() or 1)
        if n <= 1 or len(todo) == 1:
            for i in todo:
                self._get(i)
        else:
            with ThreadPoolExecutor(max_workers=n) as ex:
                list(ex.map(self._get, todo))
        return self

    def __getitem__(self, index: int) -> Dict[str, object]:
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        img, mask, erased = self._get(i)
        x = image_to_tensor(img, self._mean_t, self._std_t)
        s = self.samples[i]
        item: Dict[str, object] = {
            "image": x,
            "label": torch.tensor(s.label, dtype=torch.int64),
            "category": s.category,
            "path": str(s.path),
            "index": i,
        }
        if self.with_masks:
            item["mask"] = torch.from_numpy(mask.astype(np.float32))[None]
            item["mask_erased"] = torch.tensor(erased)
        return item


# ----------------------------------------------------------------------------- building


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def build_datasets(root: PathLike, categories: Union[str, Sequence[str], None] = None,
                   image_size: int = 256, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD, val_fraction: float = 0.2, seed: int = 0,
                   cache: bool = True
                   ) -> Tuple[ImageDataset, ImageDataset, Dict[str, ImageDataset], dict]:
    """The multi-class training, validation and per-category test datasets of a root.

    The ``train/good`` images of all chosen categories are pooled (method.md section 1) and split
    by :func:`train_val_split`. Train and validation datasets have no masks; test datasets have.

    Args:
        root: the dataset root (MVTec AD layout).
        categories: category names (a str for one); None for every category of ``root``.
        image_size: ``S``, the side in pixels images are resized to.
        mean, std: normalisation (the backbone's; ImageNet's by default).
        val_fraction, seed: see :func:`train_val_split`.
        cache: keep decoded images in memory (see :class:`ImageDataset`).

    Returns:
        ``(train_ds, val_ds, test_by_category, split)``: ``test_by_category`` maps each category
        (in the given order) to its test :class:`ImageDataset`; ``split`` is a JSON-ready dict with
        ``root`` (absolute), ``categories``, ``val_fraction``, ``seed``, ``train`` and ``val`` (image
        paths relative to ``root``, POSIX form) and ``counts`` (per category: train, val, test_good,
        test_defective).

    Raises:
        MissingFileError: ``root`` is missing; some requested categories do not exist (the
            message names them and lists the available ones).
        InvalidArgumentError: ``categories`` is empty.
        DatasetError, ImageReadError: as :func:`scan_category`.
    """
    root = Path(root)
    available = list_categories(root)
    if categories is None:
        cats = available
    else:
        if isinstance(categories, str):
            categories = [categories]
        cats = list(dict.fromkeys(str(c) for c in categories))
        if not cats:
            raise InvalidArgumentError("categories is empty; give at least one category or None for all")
        missing = [c for c in cats if c not in available]
        if missing:
            raise MissingFileError(
                f"categories not found under {str(root)!r}: {', '.join(missing)}; "
                f"available: {', '.join(available)}")
    pooled: List[Sample] = []
    tests: Dict[str, List[Sample]] = {}
    for c in cats:
        tr, te = scan_category(root, c)
        pooled.extend(tr)
        tests[c] = te
    train, val = train_val_split(pooled, val_fraction=val_fraction, seed=seed)
    train_ds = ImageDataset(train, image_size, mean, std, with_masks=False, cache=cache)
    val_ds = ImageDataset(val, image_size, mean, std, with_masks=False, cache=cache)
    test_by_category = {c: ImageDataset(tests[c], image_size, mean, std, with_masks=True, cache=cache)
                        for c in cats}
    counts = {c: {"train": sum(s.category == c for s in train),
                  "val": sum(s.category == c for s in val),
                  "test_good": sum(s.label == 0 for s in tests[c]),
                  "test_defective": sum(s.label == 1 for s in tests[c])} for c in cats}
    split = {
        "root": str(root.resolve()),
        "categories": cats,
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "train": [_rel(s.path, root) for s in train],
        "val": [_rel(s.path, root) for s in val],
        "counts": counts,
    }
    return train_ds, val_ds, test_by_category, split


def write_split(split: dict, path: PathLike) -> Path:
    """Write a split dict as JSON, atomically (a temporary file in the same folder, then
    ``os.replace``), creating parent folders.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(split, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
