"""Bad input: every bad-input case either has a documented, tested handling or raises a dcamkd
error that derives from the matching built-in exception, with a message naming the file or
argument and what was expected; the command line prints it in one line without a traceback.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcamkd import errors as E
from dcamkd.cli import main
from dcamkd.evaluate import RESULTS_FORMAT
from dcamkd.config import TrainConfig
from dcamkd.data import ImageDataset, Sample, list_categories, load_image, load_mask, scan_category
from dcamkd.losses import DistillationLoss
from dcamkd.models import backbone_spec
from dcamkd.scoring import AnomalyModel, anomaly_map
from dcamkd.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, model_from_checkpoint
from dcamkd.checkpoint import build_networks as _build_networks

REPO = Path(__file__).resolve().parents[1]


def _png_bytes(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _dataset(path: Path, size: int = 16) -> ImageDataset:
    return ImageDataset([Sample(path, "c", 0, "good")], size, (0, 0, 0), (1, 1, 1), with_masks=False)


def _pixels(path: Path, size: int = 16) -> np.ndarray:
    """The dataset's decoded uint8 RGB image at ``size x size`` (mean 0, std 1/255 undone)."""
    x = _dataset(path, size)[0]["image"]
    return np.rint(x.permute(1, 2, 0).numpy() * 255).astype(int)


# ----------------------------------------------------------------------------- images: errors


@pytest.mark.parametrize("case", ["zero-byte", "truncated", "not-an-image"])
def test_unreadable_image_files(tmp_path, case):
    path = tmp_path / f"bad {case} é.png"  # a name with spaces and non-ASCII characters
    if case == "zero-byte":
        path.write_bytes(b"")
        expect = "empty (0 bytes)"
    elif case == "truncated":
        data = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
        path.write_bytes(data[: len(data) // 2])
        expect = "truncated"
    else:
        path.write_text("this is a CSV file, not an image\n1,2,3\n")
        expect = "cannot identify image file"
    with pytest.raises(E.ImageReadError) as ei:
        load_image(path)
    assert isinstance(ei.value, OSError) and isinstance(ei.value, E.DcamkdError)
    assert str(path) in str(ei.value) and expect in str(ei.value)
    with pytest.raises(E.ImageReadError, match="empty|truncated|cannot identify"):  # also through a dataset
        _dataset(path)[0]


def test_missing_image_file(tmp_path):
    with pytest.raises(E.MissingFileError, match="does not exist") as ei:
        load_image(tmp_path / "gone.png")
    assert isinstance(ei.value, FileNotFoundError) and "gone.png" in str(ei.value)


# ----------------------------------------------------------------------------- images: handled


def test_16bit_palette_rgba_grey_cmyk_are_decoded_to_rgb(tmp_path):
    p16 = tmp_path / "sixteen.png"
    Image.fromarray(np.full((20, 20), 32768, np.uint16)).save(p16)
    assert Image.open(p16).mode.startswith("I")
    assert (_pixels(p16) == 128).all()  # round(32768 * 255 / 65535) = 128

    pal = tmp_path / "palette.png"
    im = Image.new("P", (20, 20), 1)
    im.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    im.save(pal)
    assert Image.open(pal).mode == "P"
    assert (_pixels(pal) == [10, 20, 30]).all()

    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (20, 20), (10, 20, 30, 0)).save(rgba)
    assert (_pixels(rgba) == [10, 20, 30]).all()  # alpha dropped, not composited

    grey = tmp_path / "grey.png"
    Image.new("L", (20, 20), 77).save(grey)
    assert (_pixels(grey) == 77).all()

    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(cmyk, quality=100)  # cyan 0, magenta, yellow: red
    assert Image.open(cmyk).mode == "CMYK"
    px = _pixels(cmyk)
    assert np.abs(px - [255, 0, 0]).max() <= 3


def test_exif_rotated_jpeg_and_tiny_image(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high; left half bright
    a[:, :20] = 240
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rotated.jpg"
    im.save(path, quality=95, exif=exif.tobytes())
    out = load_image(path)
    assert out.size == (20, 40)  # displayed: 20 wide, 40 high
    arr = np.asarray(out).astype(int)
    assert arr[:15].mean() > 200 and arr[25:].mean() < 40  # the bright half is now on top

    tiny = tmp_path / "tiny.bmp"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tiny)
    x = _pixels(tiny, size=32)
    assert x.shape == (32, 32, 3) and (x == [1, 2, 3]).all()


_RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from dcamkd.data import ImageDataset, Sample
    ds = ImageDataset([Sample(sys.argv[1], "c", 0, "good")], 64, (0, 0, 0), (1, 1, 1), with_masks=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    x = ds[0]["image"]
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(tuple(x.shape), round(float(x[0].mean() * 255)), round(float(x[2].mean() * 255)), (after - before) // 1024)
    """
)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_8000x8000_image_is_decoded_at_reduced_resolution(tmp_path, fmt):
    path = tmp_path / f"huge.{fmt}"
    Image.new("RGB", (8000, 8000), (200, 100, 50)).save(path, quality=90) if fmt == "jpg" else \
        Image.new("RGB", (8000, 8000), (200, 100, 50)).save(path, compress_level=1)
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path)], capture_output=True, text=True,
                       timeout=120, cwd=str(REPO), env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    shape, red, blue, mib = r.stdout.split(")")[0] + ")", *r.stdout.split(")")[1].split()
    assert shape == "(3, 64, 64)"
    assert abs(int(red) - 200) <= 2 and abs(int(blue) - 50) <= 2
    # a full RGB raster is 183 MiB; the plain path (decode, copy, convert) peaks near 490 MiB.
    # JPEG is DCT-scaled at decode (1/8: 1000 x 1000); PNG is box-reduced before any conversion.
    assert int(mib) < (40 if fmt == "jpg" else 330), mib


def test_names_with_spaces_and_non_ascii(make_tree):
    root = make_tree(categories=("café crème",), n_train=3, size=32, root_name="données 1")
    for p in (root / "café crème" / "train" / "good").iterdir():
        p.rename(p.with_name(f"ïmage {p.stem} ✓{p.suffix}"))
    train, test = scan_category(root, "café crème")
    assert len(train) == 3 and all("ïmage" in s.path.name for s in train)
    assert _dataset(train[0].path, 16)[0]["image"].shape == (3, 16, 16)


# ----------------------------------------------------------------------------- masks


def test_mask_size_differs_from_image(make_tree):
    root = make_tree(categories=("a",), size=32)
    m = root / "a" / "ground_truth" / "blob" / "000_mask.png"
    Image.open(m).resize((30, 32)).save(m)
    with pytest.raises(E.DatasetError) as ei:
        scan_category(root, "a")
    msg = str(ei.value)
    assert isinstance(ei.value, ValueError) and "000_mask.png" in msg and "30x32" in msg and "32x32" in msg


def test_non_binary_masks_are_binarised(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    blob = (yy - 30) ** 2 + (xx - 34) ** 2 <= 12 ** 2
    Image.fromarray(blob.astype(np.uint8) * 255).save(tmp_path / "m255.png")
    Image.fromarray(blob.astype(np.uint8)).save(tmp_path / "m01.png")  # 0/1 instead of 0/255
    Image.fromarray(blob.astype(np.uint8) * 255).save(tmp_path / "speckle.jpg", quality=30)
    noisy = np.asarray(Image.open(tmp_path / "speckle.jpg")).astype(int)
    assert len(np.unique(noisy)) > 2 and noisy[~blob].max() > 0  # JPEG speckle is really there
    m255, m01 = load_mask(tmp_path / "m255.png"), load_mask(tmp_path / "m01.png")
    assert m255.dtype == bool and (m255 == blob).all() and (m01 == blob).all()
    sp = load_mask(tmp_path / "speckle.jpg")
    assert (sp != blob).mean() < 0.01  # speckle below half range is background
    far = np.hypot(yy - 30, xx - 34) > 16
    assert not sp[far].any()
    del rng


def test_defective_image_without_mask_and_mask_without_image(make_tree, tmp_path):
    root = make_tree(categories=("a",), size=32, root_name="r1")
    (root / "a" / "ground_truth" / "blob" / "001_mask.png").unlink()
    with pytest.raises(E.MissingFileError) as ei:
        scan_category(root, "a")
    assert isinstance(ei.value, FileNotFoundError)
    assert "001.png" in str(ei.value) and "001_mask.png" in str(ei.value) and "has no mask" in str(ei.value)

    root2 = make_tree(categories=("a",), size=32, root_name="r2")
    (root2 / "a" / "test" / "blob" / "000.png").unlink()
    with pytest.raises(E.DatasetError, match=r"000_mask\.png.*has no image"):
        scan_category(root2, "a")


# ----------------------------------------------------------------------------- layout


def test_layout_errors_and_strays(make_tree, tmp_path):
    root = make_tree(categories=("a", "b"), size=32)
    shutil.rmtree(root / "a" / "train" / "good")
    with pytest.raises(E.DatasetError, match=r"train.good.*is missing.*category 'a'"):
        scan_category(root, "a")
    for p in (root / "b" / "test").rglob("*.png"):
        p.unlink()
    shutil.rmtree(root / "b" / "ground_truth")
    assert len(scan_category(root, "b")[1]) == 0  # test images are optional (unsupervised setting)

    empty = tmp_path / "empty_root"
    (empty / "__MACOSX").mkdir(parents=True)
    (empty / "readme.txt").write_text("x")
    with pytest.raises(E.DatasetError, match="holds no category folder") as ei:
        list_categories(empty)
    assert str(empty) in str(ei.value)

    clean = make_tree(categories=("c",), size=32, root_name="clean")
    before = [len(x) for x in scan_category(clean, "c")]
    for d in (clean, clean / "c", clean / "c" / "train" / "good", clean / "c" / "test" / "blob",
              clean / "c" / "ground_truth" / "blob"):
        (d / ".DS_Store").write_bytes(b"\0\1")
        (d / "Thumbs.db").write_bytes(b"\0")
        (d / "notes.txt").write_text("x")
        (d / "._000.png").write_bytes(b"\0")  # macOS resource fork
    (clean / "c" / "train" / "good" / "nested").mkdir()
    (clean / "c" / "train" / "good" / "nested" / "x.png").write_bytes(b"")
    (clean / "__MACOSX").mkdir()
    assert [len(x) for x in scan_category(clean, "c")] == before
    assert list_categories(clean) == ["c"]


# ----------------------------------------------------------------------------- ops and losses


def _pyr(b=2, shapes=((4, 8, 8), (6, 4, 4)), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, *s, generator=g, dtype=dtype) for s in shapes]


@pytest.mark.parametrize("case,exc,match", [
    ("shape", E.ShapeMismatchError, r"level 1: teacher shape \(2, 6, 4, 4\) != student shape \(2, 6, 4, 5\)"),
    ("levels", E.ShapeMismatchError, "teacher pyramid has 2 levels, student pyramid 1"),
    ("dtype", E.ShapeMismatchError, "level 0: teacher dtype torch.float32 != student dtype torch.float64"),
    ("device", E.ShapeMismatchError, "level 0: teacher on cpu, student on meta"),
    ("empty-batch", E.ShapeMismatchError, r"level 0: empty tensor of shape \(0, 4, 8, 8\)"),
    ("zero-level", E.ShapeMismatchError, r"level 1: empty tensor of shape \(2, 6, 0, 4\)"),
    ("nan", E.NonFiniteError, "student level 1 contains NaN or Inf"),
    ("inf", E.NonFiniteError, "teacher level 0 contains NaN or Inf"),
    ("not-a-list", E.InvalidArgumentError, "must be lists"),
])
def test_loss_and_anomaly_map_reject_bad_pyramids(case, exc, match):
    t, s = _pyr(), _pyr()
    if case == "shape":
        s[1] = torch.randn(2, 6, 4, 5)
    elif case == "levels":
        s = s[:1]
    elif case == "dtype":
        s[0] = s[0].double()
    elif case == "device":
        s[0] = torch.empty(s[0].shape, device="meta")
    elif case == "empty-batch":
        t, s = [x[:0] for x in t], [x[:0] for x in s]
    elif case == "zero-level":
        t[1], s[1] = t[1][:, :, :0], s[1][:, :, :0]
    elif case == "nan":
        s[1][0, 0, 0, 0] = float("nan")
    elif case == "inf":
        t[0][1, 2, 3, 4] = float("inf")
    elif case == "not-a-list":
        t, s = t[0], s[0]
    builtin = {E.ShapeMismatchError: ValueError, E.NonFiniteError: FloatingPointError,
               E.InvalidArgumentError: ValueError}[exc]
    with pytest.raises(exc, match=match) as ei:
        DistillationLoss()(t, s)
    assert isinstance(ei.value, builtin)
    if case in ("nan", "inf"):
        who = "student level 1" if case == "nan" else "teacher level 0"
        with pytest.raises(E.NonFiniteError, match=f"anomaly map: {who} contain NaN or Inf"):
            anomaly_map(t, s, (16, 16))
    else:
        with pytest.raises(exc, match=match):
            anomaly_map(t, s, (16, 16))


def test_anomaly_model_rejects_empty_and_misshaped_batches():
    cfg = TrainConfig(backbone="resnet18", teacher_weights=None, dcam="none")
    t, s, _ = _build_networks(cfg)
    model = AnomalyModel(t, s).eval()
    with pytest.raises(E.InvalidArgumentError, match=r"non-empty batch.*\(0, 3, 32, 32\)"):
        model(torch.zeros(0, 3, 32, 32))
    with pytest.raises(E.InvalidArgumentError, match=r"float \(B, 3, H, W\).*\(2, 1, 32, 32\)"):
        model(torch.zeros(2, 1, 32, 32))
    with pytest.raises(E.InvalidArgumentError, match="torch.uint8"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with torch.no_grad():
        maps, scores = model(torch.zeros(1, 3, 16, 16))
    assert maps.shape == (1, 16, 16) and torch.isfinite(scores).all()
    with pytest.raises(E.NonFiniteError):
        with torch.no_grad():
            model(torch.full((1, 3, 32, 32), float("nan")))


# ----------------------------------------------------------------------------- checkpoints


def _checkpoint(backbone: str = "resnet18") -> dict:
    torch.manual_seed(0)
    cfg = TrainConfig(backbone=backbone, teacher_weights=None, image_size=32, dcam="none")
    t, s, _ = _build_networks(cfg)
    spec = backbone_spec(backbone)
    return {"kind": "dcamkd-checkpoint", "format_version": CHECKPOINT_FORMAT, "config": cfg.to_dict(),
            "image_size": 32, "mean": list(spec.mean), "std": list(spec.std), "teacher": t.state_dict(),
            "student": s.state_dict(), "dcam": None, "step": 0, "epoch": 0, "best_val": 0.0}


def test_checkpoint_errors(tmp_path):
    ck = _checkpoint()
    good = tmp_path / "good.pt"
    torch.save(ck, good)
    assert load_checkpoint(good)["config"]["backbone"] == "resnet18"

    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(E.CheckpointError, match=r"trunc\.pt.*cannot be read.*truncated") as ei:
        load_checkpoint(trunc)
    assert isinstance(ei.value, ValueError)

    other = dict(ck, format_version=CHECKPOINT_FORMAT + 98)
    torch.save(other, tmp_path / "v99.pt")
    with pytest.raises(E.CheckpointError, match=rf"v99\.pt: format version {CHECKPOINT_FORMAT + 98}, "
                                                rf".* reads version 1 or {CHECKPOINT_FORMAT}"):
        load_checkpoint(tmp_path / "v99.pt")

    foreign = _checkpoint("tf_efficientnet_lite0")  # lite0 weights under a resnet18 config
    torch.save(dict(foreign, config=ck["config"]), tmp_path / "mixed.pt")
    with pytest.raises(E.CheckpointError, match="do not fit backbone 'resnet18'"):
        model_from_checkpoint(tmp_path / "mixed.pt")

    torch.save(dict(ck, config=dict(ck["config"], backbone="vit_huge")), tmp_path / "vit.pt")
    with pytest.raises(E.CheckpointError, match=r"vit\.pt: backbone must be one of .*'vit_huge'"):
        load_checkpoint(tmp_path / "vit.pt")

    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(E.CheckpointError, match="not a dcamkd checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")

    with pytest.raises(E.MissingFileError, match="no such file") as ei:
        load_checkpoint(tmp_path / "nope.pt")
    assert isinstance(ei.value, FileNotFoundError)


# ----------------------------------------------------------------------------- command line


def _one_line_error(err: str, *needles: str) -> None:
    assert err.startswith("dcamkd: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


def test_cli_prints_one_line_errors(make_tree, tmp_path, capsys):
    root = make_tree(categories=("a",), size=32)
    good = tmp_path / "good.pt"
    torch.save(_checkpoint(), good)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:1000])

    assert main(["test", "--checkpoint", str(trunc), "--data", str(root), "--out", str(tmp_path / "r.json")]) == 2
    _one_line_error(capsys.readouterr().err, "trunc.pt", "truncated")
    assert not (tmp_path / "r.json").exists()

    empty = tmp_path / "no cats"
    empty.mkdir()
    assert main(["train", "--data", str(empty), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    _one_line_error(capsys.readouterr().err, "no cats", "holds no category folder")

    bad = tmp_path / "caméra 1" / "frame 7.png"
    bad.parent.mkdir()
    bad.write_bytes(b"")
    assert main(["predict", "--checkpoint", str(good), str(bad), "--out", str(tmp_path / "p")]) == 2
    _one_line_error(capsys.readouterr().err, "holds no calibration", "dcamkd calibrate --checkpoint")
    assert main(["calibrate", "--checkpoint", str(good), "--good", str(root / "a" / "train" / "good")]) == 0
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(good), str(bad), "--out", str(tmp_path / "p")]) == 2
    _one_line_error(capsys.readouterr().err, "frame 7.png", "empty")

    # a successful run writes a versioned results file atomically
    assert main(["test", "--checkpoint", str(good), "--data", str(root), "--out", str(tmp_path / "ok.json")]) == 0
    res = json.loads((tmp_path / "ok.json").read_text())
    assert res["format_version"] == RESULTS_FORMAT == 1 and 0 <= res["mean"]["image_auroc"] <= 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    capsys.readouterr()

    m = root / "a" / "ground_truth" / "blob" / "000_mask.png"
    Image.open(m).resize((16, 16)).save(m)
    assert main(["test", "--checkpoint", str(good), "--data", str(root), "--out", str(tmp_path / "r.json")]) == 2
    _one_line_error(capsys.readouterr().err, "000_mask.png", "16x16", "32x32")


def test_cli_subprocess_exit_status_and_single_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dcamkd.cli", "test", "--checkpoint", str(tmp_path / "missing.pt"),
                        "--data", str(tmp_path), "--out", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("dcamkd: error: checkpoint: no such file:") and "missing.pt" in r.stderr
