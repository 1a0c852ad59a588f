"""Scoring test sets (dcamkd.evaluate): exact metrics for maps of any scale, masks emptied by the
resize, and `dcamkd test` sharded over torchrun processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcamkd import metrics as M
from dcamkd.data import build_datasets, load_mask
from dcamkd.distributed import shard_range
from dcamkd.errors import EmptyMaskWarning, InvalidArgumentError
from dcamkd.evaluate import evaluate, evaluate_category

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
REPO = Path(__file__).resolve().parents[1]


class _Maps(torch.nn.Module):
    """A stand-in inference model: ``(B, 3, S, S)`` -> maps ``(B, S, S)`` (squared distance of each
    pixel to the image's mean colour, times ``scale``, cubed for ``product``) and their maxima."""

    def __init__(self, fusion: str, scale: float):
        super().__init__()
        self.fusion, self.scale = fusion, scale

    def forward(self, x):
        d = (x - x.mean(dim=(2, 3), keepdim=True)).pow(2).mean(dim=1) * 0.05
        maps = d.pow(3) if self.fusion == "product" else d
        maps = maps * self.scale
        return maps, maps.flatten(1).amax(dim=1)


def _exact(model, ds):
    xs = torch.stack([ds[i]["image"] for i in range(len(ds))])
    maps, scores = model(xs)
    masks = np.stack([ds[i]["mask"][0].numpy() > 0.5 for i in range(len(ds))])
    labels = np.asarray(ds.labels)
    maps = maps.numpy()
    return {"image_auroc": M.image_auroc(scores.numpy(), labels), "pixel_auroc": M.pixel_auroc(maps, masks),
            "aupro": M.aupro(maps, masks), "pro_dfr": M.pro_dfr(maps, masks),
            "image_f1max": M.f1_max(scores.numpy(), labels), "pixel_f1max": M.f1_max(maps, masks)}


@pytest.mark.parametrize("fusion, scale", [("product", 1.0), ("product", 1e-4), ("sum", 1.0), ("sum", 50.0)])
def test_evaluate_category_is_exact_for_maps_of_any_scale(make_tree, fusion, scale):
    root = make_tree(categories=("alpha",), n_train=2, n_test_good=3, n_defect=4, size=48)
    _, _, tests, _ = build_datasets(root, None, 48, MEAN, STD, 0.5, 0)
    ds = tests["alpha"]
    model = _Maps(fusion, scale).eval()
    exact = _exact(model, ds)
    if fusion == "product" and scale == 1e-4:  # a small product map: a fixed histogram range collapsed it
        assert float(model(torch.stack([ds[0]["image"]]))[0].max()) < 1e-5
    res = evaluate_category(model, ds, batch_size=3)
    assert res["undefined"] == {} and res["num_images"] == len(ds) == 7
    for key, value in exact.items():
        assert abs(res[key] - value) <= 1e-9, (key, res[key], value)
    assert (res["n_good"], res["n_defective"], res["n_defective_without_mask_pixels"]) == (3, 4, 0)


def test_shard_range_hand_values():
    assert [list(shard_range(5, r, 2)) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [len(shard_range(10, r, 4)) for r in range(4)] == [3, 3, 2, 2]
    assert [list(shard_range(1, r, 3)) for r in range(3)] == [[0], [], []]
    assert sum((list(shard_range(17, r, 5)) for r in range(5)), []) == list(range(17))
    with pytest.raises(InvalidArgumentError, match="shard_range"):
        shard_range(3, 2, 2)


def _write_mask(path: Path, size: int, pixels) -> None:
    m = np.zeros((size, size), np.uint8)
    for y, x in pixels:
        m[y, x] = 255
    Image.fromarray(m, mode="L").save(path)


def test_two_pixel_defect_of_a_1024_mask_is_erased_at_256(make_tree):
    root = make_tree(categories=("alpha",), n_train=1, n_test_good=1, n_defect=2, size=1024)
    gt = root / "alpha" / "ground_truth" / "blob"
    _write_mask(gt / "000_mask.png", 1024, [(500, 600), (500, 601)])  # 2 pixels of 1024 x 1024
    assert load_mask(gt / "000_mask.png").sum() == 2 and not load_mask(gt / "000_mask.png", 256).any()
    _, _, tests, _ = build_datasets(root, None, 256, MEAN, STD, 0.5, 0)
    ds = tests["alpha"]
    flags = {Path(ds[i]["path"]).as_posix().split("/alpha/")[1]: bool(ds[i]["mask_erased"]) for i in range(len(ds))}
    assert flags == {"test/blob/000.png": True, "test/blob/001.png": False, "test/good/000.png": False}


def test_masks_emptied_by_the_resize_are_counted_and_warned_once_per_category(make_tree):
    root = make_tree(categories=("alpha", "beta", "gamma"), n_train=2, n_test_good=2, n_defect=3, size=64)
    for cat, emptied, blank in (("alpha", ["000"], ["001"]), ("beta", ["000", "002"], [])):
        gt = root / cat / "ground_truth" / "blob"
        for stem in emptied:  # a 1 x 2 defect at 64 x 64 is gone at 32 x 32 (> 0.5 rule)
            _write_mask(gt / f"{stem}_mask.png", 64, [(20, 30), (20, 31)])
        for stem in blank:  # an empty mask file
            _write_mask(gt / f"{stem}_mask.png", 64, [])
    _, _, tests, _ = build_datasets(root, None, 32, MEAN, STD, 0.5, 0)
    model = _Maps("sum", 1.0).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = evaluate(model, tests, batch_size=4)
    msgs = [str(w.message) for w in caught if issubclass(w.category, EmptyMaskWarning)]
    assert len(msgs) == 2, msgs
    alpha, beta = msgs
    assert alpha.startswith("alpha: 2 of 3 defective test images have no defect pixel at the evaluation size")
    assert "1 of them emptied by the resize to 32x32" in alpha and "1 with empty mask files" in alpha
    assert beta.startswith("beta: 2 of 3 defective test images") and "2 of them emptied by the resize" in beta
    assert "count as defective in the image metrics" in beta and "defect-free in the pixel metrics" in beta
    per = res["per_category"]
    assert [per[c]["n_defective_without_mask_pixels"] for c in ("alpha", "beta", "gamma")] == [2, 2, 0]
    # what the message says the metrics do: exactly the exact functions on these masks and labels
    exact = _exact(model, tests["beta"])
    for key, value in exact.items():
        assert abs(per["beta"][key] - value) <= 1e-9, key


def _cli(args, env, cwd, nproc=None):
    cmd = [sys.executable, "-m", "dcamkd.cli", *args]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "dcamkd.cli", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_dcamkd_test_under_torchrun_matches_one_process(make_tree, tmp_path):
    from dcamkd.config import preset_config
    from dcamkd.train import train

    # uneven shards: 5 test images per category over 2 ranks (3 + 2)
    root = make_tree(categories=("alpha", "beta"), n_train=4, n_test_good=2, n_defect=3, size=48)
    # the scoring settings are the checkpoint's (a calibrated checkpoint refuses overrides)
    cfg = preset_config("dcam", data=str(root), image_size=48, steps=1, batch_size=4, seed=0, fusion="product")
    train(cfg, tmp_path / "run", progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    common = ["test", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--data", str(root),
              "--batch-size", "1"]
    _cli([*common, "--out", str(tmp_path / "one.json"), "--save-maps", str(tmp_path / "m1")], env, REPO)
    two = _cli([*common, "--out", str(tmp_path / "two.json"), "--save-maps", str(tmp_path / "m2")], env, REPO, nproc=2)
    assert two.stdout.count("| **mean** |") == 1  # rank 0 alone prints and writes
    r1 = json.loads((tmp_path / "one.json").read_text())
    r2 = json.loads((tmp_path / "two.json").read_text())
    assert "world_size" not in r1 and r2["world_size"] == 2
    assert r1["scoring"]["fusion"] == "product" and r1["calibrated"]
    for cat in ("alpha", "beta"):
        a, b = r1["per_category"][cat], r2["per_category"][cat]
        assert b["images_per_rank"] == [3, 2] and "images_per_rank" not in a
        assert a["num_images"] == b["num_images"] == 5
        for key in ("image_auroc", "pixel_auroc", "aupro", "pro_dfr", "image_f1max", "pixel_f1max"):
            assert a[key] is not None and abs(a[key] - b[key]) <= 1e-9, (cat, key, a[key], b[key])
        assert a["at_threshold"] == b["at_threshold"] and a["calibration"] == b["calibration"]
        n1, n2 = np.load(tmp_path / "m1" / f"{cat}.npz"), np.load(tmp_path / "m2" / f"{cat}.npz")
        assert list(n1["paths"]) == list(n2["paths"])  # the one-pass order
        np.testing.assert_array_equal(n1["masks"], n2["masks"])
        np.testing.assert_array_equal(n1["maps"], n2["maps"])  # one image per batch, one thread: bitwise
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert abs(r1["mean"][key] - r2["mean"][key]) <= 1e-9


class _Pyramid(torch.nn.Module):
    """A one-level feature pyramid: ``(B, 3, S, S)`` -> ``[(B, 4, S/2, S/2)]``."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward(self, x):
        return [self.conv(x)]


class _WithNaN(torch.utils.data.Dataset):
    """``ds`` with a NaN pixel in image ``k`` (a corrupt input)."""

    def __init__(self, ds, k):
        self.ds, self.k = ds, k

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = dict(self.ds[i])
        if i == self.k:
            item["image"] = item["image"].clone()
            item["image"][0, 5, 5] = float("nan")
        return item


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_a_non_finite_map_names_its_image(make_tree, impl):
    from dcamkd import ops
    from dcamkd.errors import NonFiniteError
    from dcamkd.scoring import AnomalyModel

    root = make_tree(categories=("alpha",), n_train=2, n_test_good=3, n_defect=2, size=32)
    _, _, tests, _ = build_datasets(root, None, 32, MEAN, STD, 0.5, 0)
    ds = tests["alpha"]
    model = AnomalyModel(_Pyramid(0), _Pyramid(1)).eval()
    with ops.use(impl):
        assert evaluate_category(model, ds, batch_size=2)["num_images"] == len(ds)
        with pytest.raises(NonFiniteError, match="anomaly map is not finite") as e:
            evaluate_category(model, _WithNaN(ds, 3), batch_size=2)
    assert str(e.value).startswith(f"{ds[3]['path']}: ")
    # the eager check of the scoring names the batch image; traced code gets a NaN map instead
    x = torch.stack([ds[i]["image"] for i in range(3)])
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"batch images \[1\]") as e:
        model(x)
    assert e.value.batch_indices == [1]
