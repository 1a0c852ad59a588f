"""Tests of dcamkd.data (MVTec-layout scanning, decoding, masks, split, datasets) and
dcamkd.demo_data, on generated trees (tests/conftest.py) and, when present, the real
industrial3 dataset (read in place, never copied)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_mvtec_tree, real_industrial3
from dcamkd import data as D
from dcamkd.demo_data import DEMO_CATEGORIES, DEMO_DEFECT_TYPES, _apply_defect, make_demo_dataset
from dcamkd.errors import (DatasetError, DcamkdError, ImageReadError, InvalidArgumentError,
                           MissingFileError)

# ----------------------------------------------------------------------------- listing / scanning


def test_list_categories_sorted_and_ignores_strays(make_tree):
    root = make_tree(categories=("beta", "alpha"))
    (root / "notes.txt").write_text("x")
    (root / ".DS_Store").write_bytes(b"\0")
    (root / ".hidden" / "train").mkdir(parents=True)
    (root / "not_a_category").mkdir()
    (root / "only_test" / "test").mkdir(parents=True)
    assert D.list_categories(root) == ["alpha", "beta", "only_test"]


def test_list_categories_missing_root_and_no_category(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(MissingFileError, match="nowhere"):
        D.list_categories(missing)
    with pytest.raises(FileNotFoundError):  # the built-in it also derives from
        D.list_categories(missing)
    empty = tmp_path / "empty_root"
    (empty / "some_folder").mkdir(parents=True)
    with pytest.raises(DatasetError, match="empty_root"):
        D.list_categories(empty)


def test_scan_category_counts_labels_and_mask_pairing(make_tree):
    root = make_tree(categories=("alpha",), n_train=5, n_test_good=3, n_defect=2, defects=("hole", "crack"))
    train, test = D.scan_category(root, "alpha")
    assert [s.path.name for s in train] == [f"{i:03d}.png" for i in range(5)]
    assert all(s.label == 0 and s.defect == "good" and s.mask_path is None and s.category == "alpha"
               for s in train)
    # good first, then defect folders in name order (crack < hole)
    assert [(s.defect, s.label, s.path.name) for s in test] == (
        [("good", 0, f"{i:03d}.png") for i in range(3)]
        + [("crack", 1, f"{i:03d}.png") for i in range(2)]
        + [("hole", 1, f"{i:03d}.png") for i in range(2)])
    for s in test[3:]:
        assert s.mask_path == root / "alpha" / "ground_truth" / s.defect / f"{s.path.stem}_mask.png"


def test_mask_pairing_plain_stem_and_other_extension(make_tree):
    root = make_tree(categories=("a",), n_defect=2, mask_suffix="")
    _, test = D.scan_category(root, "a")
    assert [s.mask_path.name for s in test if s.label] == ["000.png", "001.png"]
    # <stem>_mask with another (upper-case) extension
    gt = root / "a" / "ground_truth" / "blob"
    Image.open(gt / "000.png").save(gt / "000_mask.BMP")
    (gt / "000.png").unlink()
    _, test = D.scan_category(root, "a")
    assert [s.mask_path.name for s in test if s.label] == ["000_mask.BMP", "001.png"]


def test_two_candidate_masks_is_an_error(make_tree):
    root = make_tree(categories=("a",), n_defect=1)
    gt = root / "a" / "ground_truth" / "blob"
    Image.open(gt / "000_mask.png").save(gt / "000_mask.bmp")
    with pytest.raises(DatasetError, match="000_mask"):
        D.scan_category(root, "a")


def test_stray_files_are_ignored(make_tree):
    root = make_tree(categories=("a",), n_train=3, n_test_good=2, n_defect=2)
    cat = root / "a"
    for folder in (cat / "train" / "good", cat / "test" / "good", cat / "test" / "blob",
                   cat / "ground_truth" / "blob", cat / "test", cat):
        (folder / ".DS_Store").write_bytes(b"\0\1")
        (folder / "Thumbs.db").write_bytes(b"\0\1")
        (folder / "readme.txt").write_text("hello")
    (cat / "train" / "good" / "._000.png").write_bytes(b"\0" * 10)  # macOS resource fork
    (cat / "ground_truth" / "blob" / "._000_mask.png").write_bytes(b"\0" * 10)
    (cat / "train" / "good" / "nested").mkdir()
    Image.new("RGB", (32, 32)).save(cat / "train" / "good" / "nested" / "x.png")
    (cat / "test" / ".ipynb_checkpoints").mkdir()
    train, test = D.scan_category(root, "a")
    assert len(train) == 3 and len(test) == 4
    assert {s.defect for s in test} == {"good", "blob"}


def test_uppercase_extensions_are_images(make_tree):
    root = make_tree(categories=("a",), n_train=2, ext=".PNG")
    train, _ = D.scan_category(root, "a")
    assert [p.path.name for p in train] == ["000.PNG", "001.PNG"]
    assert set(D.IMAGE_EXTENSIONS) == {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def test_missing_mask_names_image_and_expected_path(make_tree):
    root = make_tree(categories=("a",), n_defect=2)
    (root / "a" / "ground_truth" / "blob" / "001_mask.png").unlink()
    with pytest.raises(MissingFileError) as ei:
        D.scan_category(root, "a")
    msg = str(ei.value)
    assert str(root / "a" / "test" / "blob" / "001.png") in msg
    assert str(root / "a" / "ground_truth" / "blob" / "001_mask.png") in msg


def test_mask_without_image_is_an_error(make_tree):
    root = make_tree(categories=("a",), n_defect=2)
    (root / "a" / "test" / "blob" / "001.png").unlink()
    with pytest.raises(DatasetError, match=re.escape(str(root / "a" / "ground_truth" / "blob" / "001_mask.png"))):
        D.scan_category(root, "a")


def test_mask_folder_without_test_folder_is_an_error(make_tree):
    root = make_tree(categories=("a",), n_defect=1)
    orphan = root / "a" / "ground_truth" / "ghost"
    orphan.mkdir()
    Image.new("L", (32, 32)).save(orphan / "000_mask.png")
    with pytest.raises(DatasetError, match="ghost"):
        D.scan_category(root, "a")


def test_missing_or_empty_train_good(make_tree):
    root = make_tree(categories=("a", "b"), n_train=0)
    with pytest.raises(DatasetError, match=re.escape(str(root / "a" / "train" / "good"))):
        D.scan_category(root, "a")
    (root / "b" / "train" / "good").rmdir()
    with pytest.raises(DatasetError, match=re.escape(str(root / "b" / "train" / "good"))):
        D.scan_category(root, "b")


def test_missing_category_names_it_and_lists_available(make_tree):
    root = make_tree(categories=("alpha", "beta"))
    with pytest.raises(MissingFileError) as ei:
        D.scan_category(root, "gamma")
    assert "gamma" in str(ei.value) and "alpha, beta" in str(ei.value)
    with pytest.raises(MissingFileError, match="nowhere"):
        D.scan_category(root / "nowhere", "alpha")


def test_test_folder_missing_or_empty_is_an_empty_test_set(make_tree):
    # the unsupervised situation: only train/good exists; evaluation skips such a category
    root = make_tree(categories=("a",), n_test_good=0, n_defect=0)
    train, test = D.scan_category(root, "a")
    assert len(train) == 4 and test == []
    shutil.rmtree(root / "a" / "test")
    shutil.rmtree(root / "a" / "ground_truth")
    train, test = D.scan_category(root, "a")
    assert len(train) == 4 and test == []
    # but a mask whose test folder is missing still means a broken dataset
    (root / "a" / "ground_truth" / "blob").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "a" / "ground_truth" / "blob" / "000_mask.png")
    with pytest.raises(DatasetError, match="has no image"):
        D.scan_category(root, "a")


def test_mask_size_mismatch(make_tree):
    root = make_tree(categories=("a",), n_defect=2, size=32)
    bad = root / "a" / "ground_truth" / "blob" / "001_mask.png"
    Image.new("L", (30, 32), 255).save(bad)
    img = root / "a" / "test" / "blob" / "001.png"
    with pytest.raises(DatasetError) as ei:
        D.check_mask_size(img, bad)
    msg = str(ei.value)
    assert str(bad) in msg and str(img) in msg and "30x32" in msg and "32x32" in msg
    with pytest.raises(DatasetError, match="30x32"):
        D.scan_category(root, "a")
    D.check_mask_size(img, root / "a" / "ground_truth" / "blob" / "000_mask.png")  # equal sizes pass


def _exif_jpeg(arr: np.ndarray, path: Path, orientation: int) -> None:
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, exif=exif.tobytes(), quality=95)


def test_mask_size_check_uses_exif_orientation(make_tree):
    root = make_tree(categories=("a",), n_defect=1, size=32)
    img_path = root / "a" / "test" / "blob" / "000.png"
    img_path.unlink()
    jpg = img_path.with_suffix(".jpg")
    _exif_jpeg(np.zeros((16, 32, 3), np.uint8), jpg, 6)  # stored 32x16, displayed 16x32
    mask = root / "a" / "ground_truth" / "blob" / "000_mask.png"
    Image.new("L", (16, 32), 255).save(mask)  # mask in displayed orientation: accepted
    _, test = D.scan_category(root, "a")
    assert test[-1].path == jpg
    Image.new("L", (32, 16), 255).save(mask)  # stored orientation: refused
    with pytest.raises(DatasetError, match="32x16"):
        D.scan_category(root, "a")


# ----------------------------------------------------------------------------- image decoding


def _rgb_gradient(h=12, w=20):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 12, yy * 20, (xx + yy) * 7], axis=-1).astype(np.uint8)


def test_load_image_modes(tmp_path):
    rgb = _rgb_gradient()
    grey = rgb[..., 0]
    cases = {}
    Image.fromarray(rgb).save(tmp_path / "rgb.png"); cases["rgb"] = rgb
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png"); cases["grey"] = np.repeat(grey[..., None], 3, 2)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png"); cases["rgba"] = rgb  # alpha dropped, not composited
    la = np.stack([grey, np.zeros_like(grey)], axis=-1)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png"); cases["la"] = np.repeat(grey[..., None], 3, 2)
    pal = Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    pal.save(tmp_path / "pal.png"); cases["pal"] = np.asarray(pal.convert("RGB"))
    pal_t = pal.copy(); pal_t.info["transparency"] = 0
    pal_t.save(tmp_path / "pal_t.png", transparency=0); cases["pal_t"] = np.asarray(pal.convert("RGB"))
    bw = (grey > 100)
    Image.fromarray(bw).save(tmp_path / "bw.png"); cases["bw"] = np.repeat(bw[..., None] * np.uint8(255), 3, 2)
    Image.fromarray(rgb).save(tmp_path / "rgb.bmp"); cases["bmp"] = rgb
    Image.fromarray(rgb).save(tmp_path / "rgb.tif"); cases["tif"] = rgb
    files = {"rgb": "rgb.png", "grey": "grey.png", "rgba": "rgba.png", "la": "la.png", "pal": "pal.png",
             "pal_t": "pal_t.png", "bw": "bw.png", "bmp": "rgb.bmp", "tif": "rgb.tif"}
    for key, name in files.items():
        im = D.load_image(tmp_path / name)
        assert im.mode == "RGB", key
        assert im.size == (20, 12), key
        np.testing.assert_array_equal(np.asarray(im), cases[key], err_msg=key)


def test_load_image_16bit(tmp_path):
    k = np.arange(256, dtype=np.uint16).reshape(16, 16)
    a16 = k * 257  # exact 16-bit images of the 8-bit values
    Image.fromarray(a16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = np.asarray(D.load_image(tmp_path / "g16.png"))
    np.testing.assert_array_equal(out, np.repeat(k.astype(np.uint8)[..., None], 3, 2))
    # rounding: v * 255 / 65535 to nearest; 128 -> 0.498 -> 0, 129 -> 0.502 -> 1, 65535 -> 255
    b = np.array([[0, 128, 129, 65535]], dtype=np.uint16)
    Image.fromarray(b).save(tmp_path / "r16.png")
    np.testing.assert_array_equal(np.asarray(D.load_image(tmp_path / "r16.png"))[..., 0], [[0, 0, 1, 255]])
    # 32-bit int mode "I" is read as 16-bit data (older Pillow opens 16-bit PNGs so)
    Image.fromarray(a16.astype(np.int32), mode="I").save(tmp_path / "i32.tif")
    np.testing.assert_array_equal(np.asarray(D.load_image(tmp_path / "i32.tif"))[..., 1], k.astype(np.uint8))


def test_load_image_cmyk_jpeg(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:8] = (200, 40, 40)
    rgb[8:] = (30, 160, 220)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "c.jpg", quality=100)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = np.asarray(D.load_image(tmp_path / "c.jpg")).astype(int)
    assert out.shape == (16, 16, 3)
    np.testing.assert_allclose(out[2:6, 2:14].mean(axis=(0, 1)), (200, 40, 40), atol=6)
    np.testing.assert_allclose(out[10:14, 2:14].mean(axis=(0, 1)), (30, 160, 220), atol=6)


@pytest.mark.parametrize("orientation,expect", [
    (1, lambda a: a),
    (3, lambda a: np.rot90(a, 2)),
    (6, lambda a: np.rot90(a, -1)),   # displayed = stored turned 90 degrees clockwise
    (8, lambda a: np.rot90(a, 1)),
    (2, lambda a: a[:, ::-1]),
])
def test_load_image_applies_exif_orientation(tmp_path, orientation, expect):
    a = np.zeros((16, 32, 3), np.uint8)  # an asymmetric picture in 8x8 blocks
    a[:8, :8] = 255
    a[8:, 24:] = (0, 255, 0)
    a[:8, 16:24] = (0, 0, 255)
    path = tmp_path / f"o{orientation}.jpg"
    _exif_jpeg(a, path, orientation)
    out = np.asarray(D.load_image(path)).astype(int)
    want = expect(a).astype(int)
    assert out.shape == want.shape
    assert np.abs(out - want).mean() < 4  # JPEG loss only; a wrong rotation gives ~60


def test_load_image_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("this is not a picture\n" * 20)
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for f in (empty, text, trunc):
        for fn in (D.load_image, D.load_mask):
            with pytest.raises(ImageReadError) as ei:
                fn(f)
            assert str(f) in str(ei.value)
            assert isinstance(ei.value, OSError) and isinstance(ei.value, DcamkdError)
    assert "empty" in str(pytest.raises(ImageReadError, D.load_image, empty).value)
    with pytest.raises(MissingFileError, match="absent.png"):
        D.load_image(tmp_path / "absent.png")
    with pytest.raises(ImageReadError, match="text.png"):
        D.check_mask_size(good, text)


def test_dataset_reports_unreadable_image(make_tree):
    root = make_tree(categories=("a",), n_train=2)
    bad = root / "a" / "train" / "good" / "001.png"
    bad.write_bytes(b"")
    train, _ = D.scan_category(root, "a")  # scanning does not decode training images
    ds = D.ImageDataset(train, 16, (0.5,) * 3, (0.5,) * 3, with_masks=False)
    ds[0]
    with pytest.raises(ImageReadError, match="001.png"):
        ds[1]


# ----------------------------------------------------------------------------- masks


def test_load_mask_encodings_agree(tmp_path):
    m = np.zeros((10, 12), bool)
    m[2:7, 3:9] = True
    Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / "m255.png")
    Image.fromarray(m.astype(np.uint8)).save(tmp_path / "m01.png")
    Image.fromarray(m).save(tmp_path / "m1bit.png")
    Image.fromarray(m.astype(np.uint16) * 65535).save(tmp_path / "m16.png")
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[m] = (255, 0, 0)  # a red-on-black colour mask
    Image.fromarray(rgb).save(tmp_path / "mred.png")
    for name in ("m255.png", "m01.png", "m1bit.png", "m16.png", "mred.png"):
        out = D.load_mask(tmp_path / name)
        assert out.dtype == np.bool_ and out.shape == (10, 12), name
        np.testing.assert_array_equal(out, m, err_msg=name)
        np.testing.assert_array_equal(D.load_mask(tmp_path / name, size=(5, 6)), D.load_mask(tmp_path / "m255.png", size=(5, 6)))


def test_load_mask_half_range_threshold(tmp_path):
    Image.fromarray(np.array([[0, 127, 128, 255]], np.uint8)).save(tmp_path / "t.png")
    np.testing.assert_array_equal(D.load_mask(tmp_path / "t.png"), [[False, False, True, True]])
    # a faint mask (max 3 on a 0..255 scale, e.g. JPEG noise) is empty, not "half its maximum"
    Image.fromarray(np.array([[0, 2, 3, 3]], np.uint8)).save(tmp_path / "faint.png")
    assert not D.load_mask(tmp_path / "faint.png").any()
    Image.new("L", (4, 4), 0).save(tmp_path / "zero.png")
    assert not D.load_mask(tmp_path / "zero.png", size=2).any()


def test_load_mask_resize_rule_hand_computed(tmp_path):
    # Shrinking 4 -> 2 with PIL's antialiased bilinear (triangle of half-width 2 source pixels):
    # output 0 weights source columns 0, 1, 2 by 0.75, 0.75, 0.25 (/1.75); output 1 weights
    # columns 1, 2, 3 by 0.25, 0.75, 0.75 (/1.75).
    def cols(on):
        a = np.zeros((4, 4), np.uint8)
        a[:, on] = 255
        return a
    cases = {
        (0,): [False, False],      # 0.75/1.75 = 0.43 | 0
        (0, 1): [True, False],     # 1.5/1.75 = 0.86  | 0.25/1.75 = 0.14
        (1, 2): [True, True],      # 1.0/1.75 = 0.57  | 1.0/1.75 = 0.57
        (3,): [False, False],      # 0                | 0.43
    }
    for on, want in cases.items():
        Image.fromarray(cols(list(on))).save(tmp_path / "c.png")
        out = D.load_mask(tmp_path / "c.png", size=2)
        np.testing.assert_array_equal(out, np.array([want, want]), err_msg=str(on))
    # Enlarging 2 -> 4 is plain bilinear (align_corners=False, edge-clamped): the 1-D profile of
    # [1, 0] is [1, .75, .25, 0]; 2-D products > 0.5 are the top-left 2x2 block (0.75^2 = 0.5625).
    Image.fromarray(np.array([[255, 0], [0, 0]], np.uint8)).save(tmp_path / "u.png")
    out = D.load_mask(tmp_path / "u.png", size=(4, 4))
    want = np.zeros((4, 4), bool)
    want[:2, :2] = True
    np.testing.assert_array_equal(out, want)
    ref = torch.nn.functional.interpolate(torch.tensor([[[[1.0, 0], [0, 0]]]]), size=(4, 4), mode="bilinear",
                                          align_corners=False)[0, 0].numpy() > 0.5
    np.testing.assert_array_equal(out, ref)
    # non-square size is (height, width)
    assert D.load_mask(tmp_path / "u.png", size=(3, 5)).shape == (3, 5)
    with pytest.raises(InvalidArgumentError, match="size"):
        D.load_mask(tmp_path / "u.png", size=0)


# ----------------------------------------------------------------------------- split


def _fake_samples(counts):
    return [D.Sample(Path(f"/d/{c}/train/good/{i:03d}.png"), c, 0, "good", None)
            for c, n in counts.items() for i in range(n)]


def test_split_stratified_counts_and_disjoint():
    samples = _fake_samples({"a": 10, "b": 5, "c": 1, "d": 2, "e": 7})
    train, val = D.train_val_split(samples, 0.2, seed=3)
    n_val = {c: sum(s.category == c for s in val) for c in "abcde"}
    assert n_val == {"a": 2, "b": 1, "c": 0, "d": 1, "e": 1}  # round(1.4) = 1; at least 1 when n >= 2
    assert sorted(map(str, (s.path for s in train + val))) == sorted(str(s.path) for s in samples)
    assert not {s.path for s in train} & {s.path for s in val}
    assert D.train_val_split(samples, 0.5, 0)[1].__len__() == 5 + 2 + 0 + 1 + 4  # round(2.5)=2, round(3.5)=4
    assert len(D.train_val_split(samples, 0.0, 0)[1]) == 0
    # a category always keeps a training image
    assert {s.category for s in D.train_val_split(samples, 0.95, 0)[0]} == set("abcde")


def test_split_deterministic_order_free_and_per_category():
    samples = _fake_samples({"a": 20, "b": 20})
    t1, v1 = D.train_val_split(samples, 0.2, seed=7)
    t2, v2 = D.train_val_split(list(reversed(samples)), 0.2, seed=7)
    assert {s.path for s in v1} == {s.path for s in v2}
    assert [s.path for s in D.train_val_split(samples, 0.2, seed=7)[1]] == [s.path for s in v1]
    seeds = {frozenset(s.path for s in D.train_val_split(samples, 0.2, seed=k)[1]) for k in range(5)}
    assert len(seeds) == 5  # different seeds, different splits
    # a category's split does not depend on the other categories present
    only_a = D.train_val_split([s for s in samples if s.category == "a"], 0.2, seed=7)[1]
    assert {s.path for s in only_a} == {s.path for s in v1 if s.category == "a"}


def test_split_rejects_bad_fraction():
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(InvalidArgumentError, match="val_fraction"):
            D.train_val_split(_fake_samples({"a": 3}), bad)


# ----------------------------------------------------------------------------- dataset


def test_dataset_values_hand_checked(tmp_path):
    Image.new("RGB", (20, 10), (51, 102, 153)).save(tmp_path / "const.png")  # 0.2, 0.4, 0.6
    s = D.Sample(tmp_path / "const.png", "c", 0, "good", None)
    ds = D.ImageDataset([s], 8, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.2), with_masks=True)
    item = ds[0]
    assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
    want = torch.tensor([(0.2 - 0.1) / 0.5, (0.4 - 0.2) / 0.25, (0.6 - 0.3) / 0.2])  # 0.2, 0.8, 1.5
    torch.testing.assert_close(item["image"], want.view(3, 1, 1).expand(3, 8, 8), atol=1e-6, rtol=0)
    assert item["label"].dtype == torch.int64 and item["label"].item() == 0
    assert item["mask"].shape == (1, 8, 8) and item["mask"].dtype == torch.float32
    assert item["mask"].sum().item() == 0
    assert item["category"] == "c" and item["path"] == str(tmp_path / "const.png") and item["index"] == 0
    assert ds[-1]["index"] == 0
    with pytest.raises(IndexError):
        ds[1]


def test_dataset_masks_align_and_cache(make_tree):
    root = make_tree(categories=("a",), n_test_good=1, n_defect=3, size=32)
    _, test = D.scan_category(root, "a")
    ds = D.ImageDataset(test, 16, D.IMAGENET_MEAN, D.IMAGENET_STD, with_masks=True)
    assert len(ds) == 4 and list(ds.labels) == [0, 1, 1, 1]
    for i in range(1, 4):
        it = ds[i]
        want = D.load_mask(test[i].mask_path, size=16)
        np.testing.assert_array_equal(it["mask"][0].numpy() > 0.5, want)
        assert set(np.unique(it["mask"].numpy())) <= {0.0, 1.0} and want.any()
    # cached: the file is no longer read
    first = ds[1]["image"].clone()
    test[1].path.unlink()
    torch.testing.assert_close(ds[1]["image"], first, rtol=0, atol=0)
    nocache = D.ImageDataset(test, 16, D.IMAGENET_MEAN, D.IMAGENET_STD, with_masks=True, cache=False)
    with pytest.raises(MissingFileError, match="001.png|000.png"):
        nocache[1]
    # default_collate works on items
    batch = torch.utils.data.default_collate([ds[0], ds[2]])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["mask"].shape == (2, 1, 16, 16)
    assert batch["label"].tolist() == [0, 1]


def test_dataset_preload_and_resize_matches_pil(make_tree):
    root = make_tree(categories=("a",), n_train=4, size=40)
    train, _ = D.scan_category(root, "a")
    ds = D.ImageDataset(train, 24, (0.0,) * 3, (1.0,) * 3, with_masks=False).preload(num_threads=2)
    assert all(a is not None for a in ds._images)
    for i, s in enumerate(train):
        ref = np.asarray(Image.open(s.path).convert("RGB").resize((24, 24), Image.BILINEAR), np.float32) / 255
        torch.testing.assert_close(ds[i]["image"], torch.from_numpy(ref).permute(2, 0, 1), atol=1e-6, rtol=0)
        assert "mask" not in ds[i]


def test_dataset_argument_errors():
    with pytest.raises(InvalidArgumentError, match="image_size"):
        D.ImageDataset([], 0, (0.5,) * 3, (0.5,) * 3, with_masks=False)
    with pytest.raises(InvalidArgumentError, match="std"):
        D.ImageDataset([], 8, (0.5,) * 3, (0.5, 0.0, 0.5), with_masks=False)
    with pytest.raises(InvalidArgumentError, match="mean"):
        D.ImageDataset([], 8, (0.5, 0.5), (0.5,) * 3, with_masks=False)
    with pytest.raises(InvalidArgumentError, match="label"):
        D.Sample(Path("x.png"), "c", 2, "good")


def test_dataset_defective_without_mask_and_late_size_mismatch(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    Image.new("L", (6, 8), 255).save(tmp_path / "m.png")
    ds = D.ImageDataset([D.Sample(tmp_path / "i.png", "c", 1, "x", None)], 8, (0.5,) * 3, (0.5,) * 3, True)
    with pytest.raises(DatasetError, match="i.png"):
        ds[0]
    ds = D.ImageDataset([D.Sample(tmp_path / "i.png", "c", 1, "x", tmp_path / "m.png")], 8, (0.5,) * 3, (0.5,) * 3, True)
    with pytest.raises(DatasetError, match="m.png"):
        ds[0]


# ----------------------------------------------------------------------------- build_datasets


def test_build_datasets_pools_and_splits(make_tree, tmp_path):
    root = make_tree(categories=("alpha", "beta", "gamma"), n_train=6, n_test_good=2, n_defect=1)
    tr, va, tests, split = D.build_datasets(root, ["beta", "alpha", "beta"], image_size=16, seed=1)
    assert list(tests) == ["beta", "alpha"]
    assert len(tr) + len(va) == 12 and len(va) == 2  # round(6 * 0.2) = 1 per category
    assert {s.category for s in tr.samples} == {"alpha", "beta"} == {s.category for s in va.samples}
    assert not tr.with_masks and not va.with_masks and all(t.with_masks for t in tests.values())
    assert len(tests["alpha"]) == 3 and tests["alpha"].labels.tolist() == [0, 0, 1]
    assert split["categories"] == ["beta", "alpha"] and split["seed"] == 1
    assert split["val"] == [s.path.relative_to(root).as_posix() for s in va.samples]
    assert all(p.startswith(("alpha/train/good/", "beta/train/good/")) for p in split["train"])
    assert split["counts"]["alpha"] == {"train": 5, "val": 1, "test_good": 2, "test_defective": 1}
    assert tr.mean == D.IMAGENET_MEAN
    again = D.build_datasets(root, ["beta", "alpha"], image_size=16, seed=1)[3]
    assert again["train"] == split["train"] and again["val"] == split["val"]
    _, _, tests_all, split_all = D.build_datasets(root, image_size=16)
    assert list(tests_all) == ["alpha", "beta", "gamma"]

    out = tmp_path / "run" / "split.json"
    assert D.write_split(split, out) == out
    assert json.loads(out.read_text()) == split
    D.write_split(split_all, out)  # replaces
    assert json.loads(out.read_text())["categories"] == ["alpha", "beta", "gamma"]
    assert os.listdir(out.parent) == ["split.json"]  # no temporary file left


def test_build_datasets_unknown_categories(make_tree):
    root = make_tree(categories=("alpha", "beta"))
    with pytest.raises(MissingFileError) as ei:
        D.build_datasets(root, ["alpha", "zeta", "eta"])
    msg = str(ei.value)
    assert "zeta" in msg and "eta" in msg and "available: alpha, beta" in msg
    with pytest.raises(InvalidArgumentError, match="categories"):
        D.build_datasets(root, [])
    tr, va, tests, _ = D.build_datasets(root, "beta", image_size=8)
    assert list(tests) == ["beta"]


def test_write_split_failure_leaves_no_temp(tmp_path):
    with pytest.raises(TypeError):
        D.write_split({"bad": object()}, tmp_path / "s.json")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- demo dataset


def test_demo_dataset_structure_masks_and_determinism(tmp_path):
    t0 = time.perf_counter()
    root = make_demo_dataset(tmp_path / "demo", image_size=64, n_train=5, n_test_good=3, n_test_defect=4, seed=3)
    elapsed = time.perf_counter() - t0
    assert elapsed < 20  # ~0.1 s here; generous for a loaded machine
    assert D.list_categories(root) == list(DEMO_CATEGORIES)
    for cat in DEMO_CATEGORIES:
        train, test = D.scan_category(root, cat)
        assert len(train) == 5
        assert [s.defect for s in test] == ["good"] * 3 + ["foreign_patch"] * 2 + ["scratch", "stain"]
        for s in train + test:
            im = Image.open(s.path)
            assert im.size == (64, 64) and im.mode == "L"
        for s in test[3:]:
            raw = np.asarray(Image.open(s.mask_path))
            assert set(np.unique(raw)) == {0, 255}
            m = raw > 0
            frac = m.mean()
            assert 0.003 < frac < 0.1, (s.mask_path, frac)
            # inside the image: no mask pixel on the outer border row/column
            assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
    # deterministic per seed, different for another seed
    again = make_demo_dataset(tmp_path / "demo2", image_size=64, n_train=5, n_test_good=3, n_test_defect=4, seed=3)
    other = make_demo_dataset(tmp_path / "demo3", image_size=64, n_train=5, n_test_good=3, n_test_defect=4, seed=4)
    rel = ["grass/train/good/004.png", "gravel/test/scratch/000.png", "brick/ground_truth/stain/000_mask.png"]
    for r in rel:
        np.testing.assert_array_equal(np.asarray(Image.open(root / r)), np.asarray(Image.open(again / r)))
    assert not np.array_equal(np.asarray(Image.open(root / rel[1])), np.asarray(Image.open(other / rel[1])))


def test_demo_train_and_test_are_different_crops(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", image_size=32, n_train=20, n_test_good=6, n_test_defect=0)
    for cat in DEMO_CATEGORIES:
        train = [np.asarray(Image.open(p), np.float64) for p in sorted((root / cat / "train" / "good").iterdir())]
        test = [np.asarray(Image.open(p), np.float64) for p in sorted((root / cat / "test" / "good").iterdir())]
        # no test crop equals a training crop
        assert min(np.abs(a - b).mean() for a in test for b in train) > 1.0
        assert not (root / cat / "ground_truth").exists()


def test_demo_defects_change_exactly_the_masked_pixels():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96]
    host = (100 + 40 * np.sin(xx / 3.0) * np.cos(yy / 4.0)).astype(np.uint8)
    foreign = (128 + 60 * np.sign(np.sin(xx / 2.0 + yy / 5.0))).astype(np.uint8)
    for kind in DEMO_DEFECT_TYPES:
        for _ in range(5):
            out, mask = _apply_defect(host, kind, rng, foreign)
            assert out.dtype == np.uint8 and mask.dtype == np.bool_ and mask.shape == host.shape
            changed = out != host
            assert mask.any()
            assert not changed[~mask].any(), kind            # nothing outside the mask changes
            assert changed[mask].mean() > 0.95, kind         # (almost) every masked pixel changes
            diff = np.abs(out.astype(int) - host.astype(int))[mask].mean()
            assert diff > 25, (kind, diff)                   # clearly visible
    with pytest.raises(InvalidArgumentError, match="kind"):
        _apply_defect(host, "dent", rng, foreign)


def test_demo_reuse_rebuild_and_refuse(tmp_path):
    root = tmp_path / "demo"
    make_demo_dataset(root, image_size=32, n_train=2, n_test_good=1, n_test_defect=1)
    stamp = (root / "brick" / "train" / "good" / "000.png").stat().st_mtime_ns
    make_demo_dataset(root, image_size=32, n_train=2, n_test_good=1, n_test_defect=1)  # reused
    assert (root / "brick" / "train" / "good" / "000.png").stat().st_mtime_ns == stamp
    make_demo_dataset(root, image_size=32, n_train=3, n_test_good=1, n_test_defect=1)  # rebuilt
    assert len(list((root / "brick" / "train" / "good").iterdir())) == 3
    assert json.loads((root / "demo.json").read_text())["n_train"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name != "demo"]  # no temporary folder left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    with pytest.raises(InvalidArgumentError, match="mine"):
        make_demo_dataset(foreign, image_size=32)
    assert (foreign / "precious.txt").read_text() == "keep"
    for bad in (dict(image_size=8), dict(n_train=0), dict(n_test_good=0, n_test_defect=0), dict(n_test_good=-1)):
        with pytest.raises(InvalidArgumentError):
            make_demo_dataset(tmp_path / "x", **bad)


# ----------------------------------------------------------------------------- real data


def _industrial3() -> Path:
    root = real_industrial3()
    if root is None:
        pytest.skip("industrial3 dataset not found (set DCAMKD_DATA to its folder)")
    return root


def _sources_table(text: str) -> dict:
    """Rows of the SOURCES.md table: category -> (train, test good, test defective, {defect: n})."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 6 or not cells[2].isdigit():
            continue
        m = re.match(r"(\d+)\s*(?:\((.*)\))?", cells[4])
        per = {k: int(v) for k, v in re.findall(r"(\w+)\s+(\d+)", m.group(2) or "")}
        rows[cells[0]] = (int(cells[2]), int(cells[3]), int(m.group(1)), per)
    return rows


def test_real_industrial3_counts_match_sources():
    root = _industrial3()
    table = _sources_table((root / "SOURCES.md").read_text(encoding="utf-8"))
    assert set(table) == {"bottle", "metal_plate", "magnetic_tile"}
    assert D.list_categories(root) == sorted(table)
    for cat, (n_train, n_good, n_def, per) in table.items():
        train, test = D.scan_category(root, cat)
        assert len(train) == n_train, cat
        assert sum(s.label == 0 for s in test) == n_good, cat
        assert sum(s.label == 1 for s in test) == n_def, cat
        types = {}
        for s in test:
            if s.label:
                types[s.defect] = types.get(s.defect, 0) + 1
                assert s.mask_path is not None and s.mask_path.name == f"{s.path.stem}_mask.png"
        assert types == (per or {"defect": n_def}), cat
        # one defective image per category through the whole decode path
        s = next(s for s in test if s.label)
        img = D.load_image(s.path)
        mask = D.load_mask(s.mask_path)
        assert img.mode == "RGB" and mask.shape == (img.size[1], img.size[0]) and mask.any()
        if cat == "magnetic_tile":  # grayscale JPEG replicated to 3 equal channels
            a = np.asarray(img)
            assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])


def test_grey_jpeg_tree_gives_three_equal_channels(tmp_path):
    root = make_mvtec_tree(tmp_path, categories=("g",), n_train=2, n_test_good=1, n_defect=1,
                           size=24, mode="L", ext=".jpg")
    train, test = D.scan_category(root, "g")
    assert [s.path.suffix for s in train + test] == [".jpg"] * 4
    ds = D.ImageDataset(test, 24, (0.5,) * 3, (0.5,) * 3, with_masks=True)
    x = ds[1]["image"]
    torch.testing.assert_close(x[0], x[1], rtol=0, atol=0)
    torch.testing.assert_close(x[1], x[2], rtol=0, atol=0)
    assert ds[1]["mask"].sum() > 0 and ds[0]["mask"].sum() == 0
