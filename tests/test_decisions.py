"""From scores to decisions: the calibrated threshold and its guarantee, the normalised score,
calibration at the end of training and ``dcamkd calibrate``, ``dcamkd test``'s categories and
error rates, ``dcamkd predict``'s tree and heatmaps, the Detector API, optional test folders,
``--device`` checks, and the application layer's import graph."""

from __future__ import annotations

import ast
import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_mvtec_tree, random_texture
from dcamkd.calibration import (POOLED, build_calibration, infer_category, is_defective, normalise,
                                select_calibration, threshold_entry)
from dcamkd.checkpoint import load_checkpoint, save_checkpoint, scoring_settings
from dcamkd.cli import main
from dcamkd.config import preset_config
from dcamkd.errors import CheckpointError, InvalidArgumentError
from dcamkd.metrics import f1_max, f1_max_threshold, rates_at_threshold
from dcamkd.objective import get_preset
from dcamkd.scoring import IMAGE_SCORES, ScoringSettings, image_scores, topk_count
from dcamkd.train import train

REPO = Path(__file__).resolve().parents[1]
S = 64  # model input size; the tree's images are 80 x 80, so maps are resized to the input's size


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny stfpm model trained on categories alpha and gamma (gamma has no test folder);
    beta exists in the data but was not trained on. False-alarm rate 0.3: with 6 held-out
    images per category the threshold is the 5th smallest (k = ceil(7 * 0.7))."""
    base = tmp_path_factory.mktemp("decisions")
    root = make_mvtec_tree(base, categories=("alpha", "beta", "gamma"), n_train=30, n_test_good=6, n_defect=6,
                           size=80)
    shutil.rmtree(root / "gamma" / "test")
    shutil.rmtree(root / "gamma" / "ground_truth")
    cfg = preset_config("stfpm", data=str(root), categories=["alpha", "gamma"], image_size=S, steps=4, batch_size=8,
                        lr=0.05, teacher_weights=None, seed=0, false_alarm_rate=0.3)
    log = train(cfg, base / "run", progress=False)
    return {"root": root, "run": base / "run", "ckpt": base / "run" / "best.pt", "log": log}


def _one_line(err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("dcamkd: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ----------------------------------------------------------------------------- the threshold


def test_threshold_is_the_order_statistic_hand_computed():
    from scipy.stats import beta

    scores = np.arange(20, 0, -1, dtype=float)  # 1..20, given in reverse order
    e = threshold_entry(scores, 0.05)  # k = ceil(21 * 0.95) = 20: the maximum
    assert (e["n"], e["k"], e["threshold"], e["median"]) == (20, 20, 20.0, 10.5)
    assert e["expected_false_alarm_rate"] == pytest.approx(1 / 21) and not e["too_small"]
    assert e["interval"] == pytest.approx(list(beta.ppf([0.05, 0.95], 1, 20)))
    assert e["scores"] == sorted(scores.tolist())
    e = threshold_entry(scores, 0.2)  # k = ceil(21 * 0.8) = ceil(16.8) = 17
    assert (e["k"], e["threshold"]) == (17, 17.0)
    assert e["expected_false_alarm_rate"] == pytest.approx(4 / 21) and 4 / 21 <= 0.2
    assert e["interval"] == pytest.approx(list(beta.ppf([0.05, 0.95], 4, 17)))
    e = threshold_entry(np.arange(1.0, 20.0), 0.05)  # n = 19: exactly enough, k = ceil(19.0) = 19
    assert (e["k"], e["too_small"]) == (19, False)


def test_too_few_images_is_said_plainly():
    e = threshold_entry(np.arange(1.0, 12.0), 0.05)  # n = 11, n + 1 < 20
    assert e["too_small"] and e["k"] == 11 and e["threshold"] == 11.0
    assert e["expected_false_alarm_rate"] == pytest.approx(1 / 12)
    assert "too few" in e["note"] and "n >= 19" in e["note"] and "1/(n + 1) = 0.083" in e["note"]
    one = threshold_entry([3.0], 0.05)
    assert one["threshold"] is None and "at least 2" in one["note"]
    tied = threshold_entry([2.0, 2.0, 2.0], 0.05)
    assert tied["threshold"] is None and "tied" in tied["note"]
    with pytest.raises(InvalidArgumentError, match="alpha"):
        threshold_entry([1.0, 2.0], 1.5)
    with pytest.raises(InvalidArgumentError, match="NaN"):
        threshold_entry([1.0, float("nan")], 0.1)


@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_realised_false_alarm_rate_of_skewed_scores_stays_at_alpha(alpha):
    """Many calibration sets of n = 20 good scores from a lognormal (skewed) distribution: the
    realised false-alarm rate of each threshold (exact, from the CDF) averages at most alpha,
    close to (n + 1 - k) / (n + 1), and falls inside the reported 90 % interval about 90 % of the
    time."""
    from scipy.stats import lognorm

    rng = np.random.default_rng(1234)
    dist = lognorm(s=1.0, scale=np.exp(0.5))
    n, sets = 20, 5000
    draws = dist.rvs(size=(sets, n), random_state=rng)
    rates, inside = [], 0
    for row in draws:
        e = threshold_entry(row, alpha)
        r = float(dist.sf(e["threshold"]))  # P(a fresh good score >= threshold)
        rates.append(r)
        inside += e["interval"][0] <= r <= e["interval"][1]
    rates = np.asarray(rates)
    expected = e["expected_false_alarm_rate"]  # (n + 1 - k) / (n + 1): 1/21 or 2/21
    assert rates.mean() <= alpha
    assert abs(rates.mean() - expected) < 0.003  # and not absurdly below it
    assert abs(inside / sets - 0.90) < 0.02  # 4 binomial standard deviations
    # fresh draws agree with the CDF
    fresh = dist.rvs(size=(2000, 50), random_state=rng)
    thr = np.array([threshold_entry(r, alpha)["threshold"] for r in draws[:2000]])
    assert abs((fresh >= thr[:, None]).mean() - rates[:2000].mean()) < 0.005


def test_normalised_score_and_tie_rule():
    e = threshold_entry([1.0, 2.0, 3.0, 4.0, 5.0], 0.2)  # k = ceil(6 * 0.8) = 5 -> 5.0, median 3.0
    assert normalise(3.0, e) == 0.0 and normalise(5.0, e) == 1.0 and normalise(4.0, e) == 0.5
    assert is_defective(5.0, e) and not is_defective(np.nextafter(5.0, 0), e)  # ties are defective
    np.testing.assert_allclose(normalise(np.array([1.0, 7.0]), e), [-1.0, 2.0])


def test_calibration_per_category_pooled_and_fallback():
    settings = ScoringSettings()
    cal = build_calibration([1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 5.0], ["a", "a", "a", "b", "b", "b", None], 0.25,
                            settings, {"kind": "good-dir", "images": []}, ["a", "b", "c"])
    assert cal["per_category"]["a"]["threshold"] == 3.0 and cal["per_category"]["b"]["threshold"] == 30.0
    assert cal["per_category"]["c"]["n"] == 0 and cal["pooled"]["n"] == 7  # the unknown image counts in pooled
    assert select_calibration(cal, "a")[0] == "a"
    assert select_calibration(cal, "c")[0] == POOLED  # no usable calibration of its own
    assert select_calibration(cal, None)[0] == POOLED
    assert cal["settings"] == settings.to_dict() and "tie_rule" in cal
    with pytest.raises(InvalidArgumentError, match="at least 2"):
        build_calibration([1.0], ["a"], 0.1, settings, {})


def test_infer_category_takes_the_nearest_category_folder():
    cats = ["bottle", "tile"]
    assert infer_category("/d/bottle/test/broken/000.png", cats) == "bottle"
    assert infer_category("/d/tile/x/bottle/a.png", cats) == "bottle"
    assert infer_category("/d/other/a.png", cats) is None


# ----------------------------------------------------------------------------- scoring rules


def test_image_score_rules_hand_computed():
    maps = torch.arange(16.0).view(1, 4, 4)
    assert image_scores(maps, "max").item() == 15.0
    assert topk_count(16, 0.25) == 4 and image_scores(maps, "topk", 0.25).item() == 13.5  # mean(12..15)
    assert topk_count(16, 0.1) == 2 and image_scores(maps, "topk", 0.1).item() == 14.5  # ceil(1.6) = 2
    assert topk_count(16, 1e-6) == 1 and image_scores(maps, "topk", 1.0).item() == 7.5
    assert IMAGE_SCORES == ("max", "topk")
    with pytest.raises(InvalidArgumentError, match="image_score"):
        ScoringSettings(image_score="mean")
    with pytest.raises(InvalidArgumentError, match="topk_fraction"):
        ScoringSettings(topk_fraction=0.0)
    with pytest.raises(InvalidArgumentError, match="image_score"):
        preset_config("stfpm", image_score="median")


def test_resize_map_keeps_the_maximum():
    from dcamkd.detector import resize_map

    g = torch.Generator().manual_seed(0)
    for size in [(80, 80), (50, 90), (64, 64), (13, 200)]:
        m = torch.rand(64, 64, generator=g)
        out = resize_map(m, size)
        assert out.shape == size and out.dtype == np.float32
        assert out.max() == m.max().item()  # exactly: the score of the 'max' rule
        assert out.min() >= m.min().item() - 1e-6


def test_f1_threshold_and_rates_hand_computed():
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.9])
    y = np.array([0, 0, 1, 1, 1])
    f1, t = f1_max_threshold(s, y)
    assert t == 0.35 and f1 == pytest.approx(2 * 0.75 * 1.0 / 1.75) and f1 == pytest.approx(f1_max(s, y))
    r = rates_at_threshold(s, y, 0.4)  # flagged: 0.4 (good: a false alarm), 0.8, 0.9; missed: 0.35
    assert (r["n_false_alarms"], r["n_good"], r["n_misses"], r["n_defective"]) == (1, 2, 1, 3)
    assert r["false_alarm_rate"] == 0.5 and r["miss_rate"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- training and calibrate


def test_training_records_split_and_calibrates_both_checkpoints(trained):
    from dcamkd import Detector

    for name in ("best.pt", "last.pt"):
        ck = load_checkpoint(trained["run"] / name)
        assert ck["split"]["categories"] == ["alpha", "gamma"]
        cal = ck["calibration"]
        assert cal["source"]["kind"] == "validation" and cal["source"]["images"] == ck["split"]["val"]
        assert all("/train/good/" in p for p in cal["source"]["images"])  # never a test image
        assert cal["alpha"] == 0.3 and cal["settings"] == get_preset("stfpm").scoring.to_dict()
        assert [cal["per_category"][c]["n"] for c in ("alpha", "gamma")] == [6, 6]
        assert cal["per_category"]["alpha"]["k"] == 5 and cal["pooled"]["n"] == 12
    assert trained["log"]["calibration"]["pooled"]["threshold"] == \
        load_checkpoint(trained["ckpt"])["calibration"]["pooled"]["threshold"]
    # the detector scores the calibration images exactly as calibration did
    ck = load_checkpoint(trained["ckpt"])
    det = Detector.from_checkpoint(trained["ckpt"])
    paths = [str(trained["root"] / rel) for rel in ck["split"]["val"] if rel.startswith("alpha/")]
    got = sorted(p.score for p in det.predict(paths))
    np.testing.assert_allclose(got, ck["calibration"]["per_category"]["alpha"]["scores"], rtol=1e-6)


def test_calibrate_command(trained, tmp_path, capsys):
    ckpt = tmp_path / "c.pt"
    shutil.copy(trained["ckpt"], ckpt)
    before = load_checkpoint(ckpt)["calibration"]
    # the recorded held-out list reproduces the training-time calibration
    assert main(["calibrate", "--checkpoint", str(ckpt)]) == 0
    after = load_checkpoint(ckpt)["calibration"]
    np.testing.assert_allclose(after["pooled"]["scores"], before["pooled"]["scores"], rtol=1e-6)
    assert "k-th smallest" in capsys.readouterr().out
    # another target rate: 6 images cannot reach 0.05, and the output says so
    assert main(["calibrate", "--checkpoint", str(ckpt), "--false-alarm-rate", "0.05", "--out",
                 str(tmp_path / "c05.pt")]) == 0
    assert "too few" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "c05.pt")["calibration"]["per_category"]["alpha"]["too_small"]
    # test images and training images are refused
    root = trained["root"]
    assert main(["calibrate", "--checkpoint", str(ckpt), "--good", str(root / "alpha" / "test" / "good")]) == 2
    _one_line(capsys.readouterr().err, "test folder")
    train_rel = load_checkpoint(ckpt)["split"]["train"][0]
    assert main(["calibrate", "--checkpoint", str(ckpt), "--good", str(root / train_rel)]) == 2
    _one_line(capsys.readouterr().err, "trained on")
    assert main(["calibrate", "--checkpoint", str(ckpt), "--category", "alpha"]) == 2
    _one_line(capsys.readouterr().err, "--category")
    # declared-unseen good images: the category comes from the folder name
    extra = tmp_path / "extra" / "alpha"
    extra.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(4):
        Image.fromarray(random_texture(rng, 80, 5.0)).save(extra / f"{i}.png")
    assert main(["calibrate", "--checkpoint", str(ckpt), "--good", str(tmp_path / "extra"), "--sigma", "2",
                 "--image-score", "topk", "--topk-fraction", "0.05"]) == 0
    cal = load_checkpoint(ckpt)["calibration"]
    assert cal["source"]["kind"] == "good-dir" and cal["per_category"]["alpha"]["n"] == 4
    assert cal["per_category"]["gamma"]["n"] == 0  # gamma falls back to the pooled calibration
    assert cal["settings"] == {"fusion": "sum", "sigma": 2.0, "image_score": "topk", "topk_fraction": 0.05}
    assert scoring_settings(load_checkpoint(ckpt)) == ScoringSettings("sum", 2.0, "topk", 0.05)
    capsys.readouterr()
    # test and export use those settings and refuse others with the command that makes them valid
    assert main(["test", "--checkpoint", str(ckpt), "--data", str(root), "--out", str(tmp_path / "r.json"),
                 "--sigma", "2"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["scoring"]["image_score"] == "topk"
    assert json.loads((tmp_path / "r.json").read_text())["scoring"]["topk_fraction"] == 0.05  # not the preset's
    capsys.readouterr()
    assert main(["test", "--checkpoint", str(ckpt), "--data", str(root), "--out", str(tmp_path / "r.json"),
                 "--sigma", "3"]) == 2
    _one_line(capsys.readouterr().err, "calibrated with fusion sum, sigma 2", f"dcamkd calibrate --checkpoint {ckpt} "
                                                                              "--sigma 3")
    assert main(["test", "--checkpoint", str(ckpt), "--data", str(root), "--out", str(tmp_path / "r.json"),
                 "--image-score", "max"]) == 2
    _one_line(capsys.readouterr().err, "--image-score max")


def test_test_evaluates_the_checkpoints_own_categories(trained, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["test", "--checkpoint", str(trained["ckpt"]), "--data", str(trained["root"]), "--out", str(out),
                 "--save-maps", str(tmp_path / "maps")]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert list(res["per_category"]) == ["alpha"]  # beta was not trained on; gamma has no test images
    assert res["skipped"] == ["gamma"] and "category gamma: no test images" in printed
    assert res["categories_trained"] == ["alpha", "gamma"]
    r = res["per_category"]["alpha"]
    ck = load_checkpoint(trained["ckpt"])
    thr = ck["calibration"]["per_category"]["alpha"]["threshold"]
    assert r["calibration"]["used"] == "alpha" and r["calibration"]["threshold"] == thr
    npz = np.load(tmp_path / "maps" / "alpha.npz")
    expect = rates_at_threshold(npz["scores"], npz["labels"], thr)
    assert r["at_threshold"] == pytest.approx(expect)
    assert (expect["n_good"], expect["n_defective"]) == (6, 6)
    assert r["image_f1max_threshold"] == pytest.approx(f1_max_threshold(npz["scores"], npz["labels"])[1])
    assert "fitted on the test data" in res["image_f1max_threshold_note"]
    assert "false alarms (good images)" in printed and "F1-max threshold (fitted on test data)" in printed
    # another category only when named, with a warning; it uses the pooled calibration
    assert main(["test", "--checkpoint", str(trained["ckpt"]), "--data", str(trained["root"]), "--out", str(out),
                 "--categories", "alpha,beta"]) == 0
    err = capsys.readouterr().err
    assert "warning: category 'beta' was not among" in err and "pooled" in err
    res = json.loads(out.read_text())
    assert res["per_category"]["beta"]["calibration"]["used"] == "pooled"


def test_unsupervised_category_trains_and_calibrates(make_tree, tmp_path, capsys):
    root = make_tree(categories=("a", "b"), n_train=10, size=48)
    for c in ("a", "b"):
        shutil.rmtree(root / c / "test")
        shutil.rmtree(root / c / "ground_truth")
    rc = main(["train", "--data", str(root), "--preset", "stfpm", "--steps", "2", "--batch-size", "4",
               "--image-size", "32", "--out", str(tmp_path / "run"), "--quiet", "--test"])
    out = capsys.readouterr().out
    assert rc == 0 and "evaluation skipped" in out and "calibration of" in out
    assert load_checkpoint(tmp_path / "run" / "best.pt")["calibration"]["pooled"]["n"] == 4
    assert main(["calibrate", "--checkpoint", str(tmp_path / "run" / "best.pt")]) == 0
    capsys.readouterr()
    assert main(["test", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--data", str(root), "--out",
                 str(tmp_path / "r.json")]) == 2
    _one_line(capsys.readouterr().err, "no test images", "nothing to evaluate")


def test_too_few_held_out_images_train_without_calibration(make_tree, tmp_path, capsys):
    root = make_tree(categories=("a",), n_train=5, size=48)  # one held-out image
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--preset", "stfpm", "--steps", "1", "--batch-size", "4",
                 "--image-size", "32", "--out", str(run), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: calibration: 1 calibration image(s)" in err and "dcamkd calibrate" in err
    assert load_checkpoint(run / "best.pt").get("calibration") is None
    assert "skipped" in json.loads((run / "log.json").read_text())["calibration"]
    assert main(["predict", "--checkpoint", str(run / "best.pt"), str(root), "--out", str(tmp_path / "p")]) == 2
    _one_line(capsys.readouterr().err, "holds no calibration")


# ----------------------------------------------------------------------------- predict and Detector


def test_share_of_good_images_at_the_threshold_colour_is_the_false_alarm_rate(trained, tmp_path):
    """With the 'max' image score the pixel threshold is the image threshold: the good test
    images whose heatmap reaches the threshold colour (normalised 1) are exactly the false
    alarms that ``dcamkd test`` counts, although the 64 x 64 maps are resized to 80 x 80."""
    from dcamkd import Detector
    from dcamkd.evaluate import run_test

    ck = load_checkpoint(trained["ckpt"])
    # score with the 'max' rule and no blur, whatever the preset's scoring (the calibration is
    # replaced below)
    ck["config"].update(sigma=0.0, image_score="max")
    ck["calibration"]["settings"] = ScoringSettings(sigma=0.0, image_score="max").to_dict()
    good = sorted((trained["root"] / "alpha" / "test" / "good").iterdir())
    # a calibration that splits the good test images (so both outcomes occur): a fixture, not a
    # product path (test images never enter calibration in dcamkd itself)
    det = Detector(ck)
    scores = [p.score for p in det.predict([str(p) for p in good])]
    ck["calibration"] = build_calibration(scores, ["alpha"] * len(scores), 0.5, scoring_settings(ck),
                                          {"kind": "fixture"}, ["alpha"])
    path = tmp_path / "split.pt"
    save_checkpoint(ck, path)
    res = run_test(path, trained["root"], tmp_path / "r.json", quiet=True)
    far = res["per_category"]["alpha"]["at_threshold"]
    assert 0 < far["n_false_alarms"] < far["n_good"]
    preds = Detector.from_checkpoint(path).predict([str(p) for p in good])
    assert all(p.anomaly_map.shape == (80, 80) for p in preds)
    hot = [bool((p.normalised_map >= 1.0).any()) for p in preds]
    assert hot == [p.is_defective for p in preds]
    assert sum(hot) / len(hot) == far["false_alarm_rate"]
    # the same through the command line: decisions in the CSV, one picture per image
    assert main(["predict", "--checkpoint", str(path), str(good[0].parent), "--out", str(tmp_path / "p")]) == 0
    rows = list(csv.DictReader((tmp_path / "p" / "predictions.csv").open()))
    assert [r["decision"] == "defective" for r in rows] == hot
    assert {r["calibration"] for r in rows} == {"alpha"} and {r["category"] for r in rows} == {"alpha"}
    assert all((tmp_path / "p" / r["heatmap"]).is_file() for r in rows)


def test_predict_mirrors_the_tree_and_finds_masks(trained, tmp_path):
    from dcamkd.predict import PREDICTIONS_CSV, find_mask, output_paths

    root = trained["root"]
    out = tmp_path / "p"
    assert main(["predict", "--checkpoint", str(trained["ckpt"]), str(root / "alpha" / "test"),
                 str(root / "beta" / "test"), "--out", str(out), "--no-heatmaps"]) == 0
    rows = list(csv.DictReader((out / PREDICTIONS_CSV).open()))
    assert len(rows) == 24 and not list(out.rglob("*.png"))
    assert set(rows[0]) == {"path", "category", "calibration", "score", "normalised_score", "decision", "threshold",
                            "heatmap"}
    beta = [r for r in rows if "/beta/" in r["path"]]
    assert {r["calibration"] for r in beta} == {POOLED} and {r["category"] for r in beta} == {""}
    # several inputs: relative to their common parent, so each keeps its own subfolder
    files = [root / "alpha/test/good/000.png", root / "beta/test/blob/001.png"]
    assert output_paths(files, [root / "alpha/test", root / "beta/test"]) == \
        [Path("alpha/test/good/000.png"), Path("beta/test/blob/001.png")]
    assert output_paths(files[:1], [root / "alpha/test"]) == [Path("good/000.png")]
    d = tmp_path / "same"
    d.mkdir()
    for ext in ("png", "bmp"):
        Image.new("RGB", (8, 8)).save(d / f"x.{ext}")
    assert output_paths([d / "x.bmp", d / "x.png"], [d]) == [Path("x.png"), Path("x.png.png")]
    link = tmp_path / "linked"
    link.mkdir()
    (link / "y.png").symlink_to(d / "x.png")  # a linked file stays where it was named
    assert output_paths([link / "y.png"], [link]) == [Path("y.png")]
    img = root / "alpha/test/blob/002.png"
    assert find_mask(img, Path("blob/002.png"), "auto") == root / "alpha/ground_truth/blob/002_mask.png"
    assert find_mask(root / "alpha/test/good/000.png", Path("good/000.png"), "auto") is None
    assert find_mask(img, Path("blob/002.png"), "none") is None
    assert find_mask(img, Path("002.png"), str(root / "alpha/ground_truth/blob")) == \
        root / "alpha/ground_truth/blob/002_mask.png"


def test_heatmap_picture_is_drawn_on_one_fixed_scale(trained, tmp_path):
    from matplotlib import colormaps

    from dcamkd import Detector
    from dcamkd.predict import HEATMAP_CMAP, HEATMAP_RANGE, render_heatmap

    det = Detector.from_checkpoint(trained["ckpt"])
    p = det.predict(str(trained["root"] / "alpha/test/blob/000.png"))
    img = np.asarray(Image.open(trained["root"] / "alpha/test/blob/000.png").convert("RGB"))
    png = render_heatmap(img, p, np.zeros((80, 80), bool), title="x")
    pic = Image.open(__import__("io").BytesIO(png))
    assert pic.format == "PNG" and pic.size[0] > 2 * 80  # two panels and a colour bar
    lo, hi = HEATMAP_RANGE
    assert (lo, hi) == (0.0, 2.0)  # the threshold (1) is the middle of a diverging map, in every picture
    mid = colormaps[HEATMAP_CMAP](0.5)
    assert abs(mid[0] - mid[2]) < 0.3  # pale (neither red nor blue) at the threshold


def test_detector_accepts_paths_pil_arrays_and_tensors(trained, tmp_path):
    from dcamkd import Detector, Prediction

    det = Detector.from_checkpoint(trained["ckpt"], device="cpu")
    path = trained["root"] / "alpha" / "test" / "blob" / "001.png"
    rgb = np.array(Image.open(path).convert("RGB"))
    ref = det.predict(str(path))
    assert isinstance(ref, Prediction) and ref.category == "alpha" and ref.calibration == "alpha"
    assert ref.decision in ("good", "defective") and ref.anomaly_map.shape == (80, 80)
    thr = ref.threshold
    assert ref.normalised_score == pytest.approx(normalise(ref.score, select_calibration(det.calibration, "alpha")[1]))
    variants = [Image.open(path), rgb, rgb.astype(np.float32) / 255.0, torch.from_numpy(rgb).permute(2, 0, 1),
                torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0,
                np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])]  # RGBA: alpha dropped
    preds = det.predict(variants, category="alpha", batch_size=4)
    assert len(preds) == len(variants)
    for p in preds:
        assert p.score == pytest.approx(ref.score, rel=1e-5) and p.calibration == "alpha" and p.threshold == thr
        np.testing.assert_allclose(p.anomaly_map, ref.anomaly_map, rtol=1e-5, atol=1e-6)
    # without a category an in-memory image uses the pooled calibration
    assert det.predict(rgb).calibration == POOLED
    # batches: a (B, C, H, W) tensor gives a list; batch size does not change scores
    batch = torch.from_numpy(np.stack([rgb, rgb[::-1].copy()])).permute(0, 3, 1, 2)
    a = det.predict(batch, batch_size=1)
    b = det.predict(batch, batch_size=2)
    assert len(a) == 2 and [x.score for x in a] == pytest.approx([x.score for x in b], rel=1e-5)
    # grey, any size: (H, W) and (1, H, W); maps come back at the input's resolution
    grey = np.array(Image.fromarray(rgb).convert("L").resize((90, 50)))
    g1, g2, g3 = det.predict([grey, grey[..., None], torch.from_numpy(grey)[None]])
    assert g1.anomaly_map.shape == (50, 90) and g1.score == pytest.approx(g2.score) == pytest.approx(g3.score)
    assert g1.score == pytest.approx(det.predict(np.repeat(grey[..., None], 3, axis=2)).score)
    # errors name the input
    with pytest.raises(InvalidArgumentError, match=r"inputs\[1\].*\[0, 1\]"):
        det.predict([rgb, rgb.astype(np.float32)])
    with pytest.raises(InvalidArgumentError, match="dtype"):
        det.predict(rgb.astype(np.int32))
    with pytest.raises(InvalidArgumentError, match="shape"):
        det.predict(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(InvalidArgumentError, match="'beta' has no calibration"):
        det.predict(rgb, category="beta")
    with pytest.raises(InvalidArgumentError, match="file path, a PIL image"):
        det.predict(3.5)


def test_detector_refuses_an_uncalibrated_checkpoint(trained, tmp_path):
    from dcamkd import Detector

    ck = load_checkpoint(trained["ckpt"])
    del ck["calibration"]
    save_checkpoint(ck, tmp_path / "u.pt")
    with pytest.raises(CheckpointError, match="no calibration.*dcamkd calibrate"):
        Detector.from_checkpoint(tmp_path / "u.pt")


def test_readme_python_snippet_runs(trained, tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    snippet = next(b for b in blocks if "Detector.from_checkpoint" in b)
    ckpt = re.search(r'from_checkpoint\("([^"]+)"', snippet).group(1)
    (tmp_path / ckpt).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(trained["ckpt"], tmp_path / ckpt)
    for name in re.findall(r'"([^"/]+\.png)"', snippet):
        shutil.copy(trained["root"] / "alpha" / "test" / "blob" / "000.png", tmp_path / name)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102 - the documented snippet itself
    assert scope  # it ran and defined names


def test_readme_loss_snippet_runs():
    from dcamkd.losses import DistillationLoss

    if not hasattr(DistillationLoss, "from_preset"):
        pytest.skip("DistillationLoss.from_preset is not in this tree")
    text = (REPO / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "from_preset" in b)
    exec(compile(snippet, "README.md", "exec"), {})  # noqa: S102


# ----------------------------------------------------------------------------- devices, version, layering


def _device_cases():
    cases = ["gpu", "cuda:x"]
    if not torch.cuda.is_available():
        cases.append("cuda")
    return cases


@pytest.mark.parametrize("device", _device_cases())
@pytest.mark.parametrize("command", ["train", "test", "predict", "calibrate", "ablate"])
def test_bad_device_is_one_line_and_status_2_before_anything_heavy(command, device, tmp_path, capsys):
    missing = str(tmp_path / "missing")  # the device is checked first: no file is looked at
    argv = {
        "train": ["train", "--data", missing, "--out", str(tmp_path / "o")],
        "test": ["test", "--checkpoint", missing, "--data", missing, "--out", str(tmp_path / "r.json")],
        "predict": ["predict", missing, "--checkpoint", missing, "--out", str(tmp_path / "p")],
        "calibrate": ["calibrate", "--checkpoint", missing],
        "ablate": ["ablate", "--grid", missing, "--data", missing, "--out", str(tmp_path / "a")],
    }[command] + ["--device", device]
    assert main(argv) == 2
    _one_line(capsys.readouterr().err, "--device", device)
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()


def test_detector_checks_its_device(trained):
    from dcamkd import Detector

    with pytest.raises(InvalidArgumentError, match="device"):
        Detector.from_checkpoint(trained["ckpt"], device="gpu")


def test_version(capsys):
    from dcamkd import __version__

    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0 and capsys.readouterr().out.strip() == f"dcamkd {__version__}"


def test_usage_errors_are_one_line(capsys):
    for argv, match in ((["train", "--data", "x", "--preset", "stfpm_kd"], "dcamkd: error: train: argument --preset: invalid choice"),
                        (["bogus"], "dcamkd: error: argument COMMAND: invalid choice"),
                        (["test", "--data", "x"], "dcamkd: error: test: the following arguments are required: --checkpoint")):
        with pytest.raises(SystemExit) as ei:
            main(argv)
        err = capsys.readouterr().err
        assert ei.value.code == 2 and err.count("\n") == 1 and err.startswith(match), err


def test_import_dcamkd_is_light_and_exports_the_detector():
    code = ("import sys, dcamkd; assert 'torch' not in sys.modules, 'torch imported'; "
            "from dcamkd import Detector; assert Detector.__module__ == 'dcamkd.detector'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=300)
    assert r.returncode == 0, r.stderr


def _imports(module: str) -> set[str]:
    """dcamkd modules a module imports anywhere in its body (module level or inside functions)."""
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = REPO / module.replace(".", "/") / "__init__.py"
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            out |= {n for n in names if n.startswith("dcamkd")}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("dcamkd")}
    known = {".".join(p.relative_to(REPO).with_suffix("").parts) for p in (REPO / "dcamkd").rglob("*.py")}
    known = {k[:-len(".__init__")] if k.endswith(".__init__") else k for k in known}
    return {n for n in out if n in known and n != module}


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        for n in _imports(m):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


@pytest.mark.parametrize("module", ["dcamkd.checkpoint", "dcamkd.calibration", "dcamkd.evaluate", "dcamkd.detector",
                                    "dcamkd.predict", "dcamkd.export"])
def test_inference_never_imports_the_trainer_or_the_cli(module):
    reached = _closure(module)
    assert "dcamkd.checkpoint" in reached or module == "dcamkd.checkpoint"
    assert not reached & {"dcamkd.train", "dcamkd.cli", "dcamkd.ablate"}, sorted(reached)


def test_ablation_runner_and_cli_do_not_import_each_other():
    assert "dcamkd.cli" not in _closure("dcamkd.ablate")
    assert "dcamkd.evaluate" in _closure("dcamkd.ablate")


def test_checkpoint_without_recorded_image_score_keeps_the_maximum(trained, tmp_path):
    # written before the image-score rule was recorded: it scored with the maximum, whatever the
    # presets' scoring is now
    ck = load_checkpoint(trained["ckpt"])
    for key in ("image_score", "topk_fraction"):
        ck["config"].pop(key)
    ck["config"]["sigma"] = 0.0
    ck.pop("calibration", None)
    save_checkpoint(ck, tmp_path / "old.pt")
    cfg = load_checkpoint(tmp_path / "old.pt")["config"]
    assert cfg["image_score"] == "max" and cfg["sigma"] == 0.0
