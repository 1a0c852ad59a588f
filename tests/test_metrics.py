"""Tests of dcamkd.metrics: parity with scikit-learn and brute-force definitions, hand cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import roc_auc_score

from dcamkd import metrics as M
from dcamkd.errors import (
    DcamkdError,
    InvalidArgumentError,
    MetricUndefinedError,
    ShapeMismatchError,
)

# --------------------------------------------------------------------------------------------
# brute-force references (written from the definitions, one threshold at a time)
# --------------------------------------------------------------------------------------------


def _regions(masks: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(image index, bool region mask) for every 8-connected region of every image."""
    out = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3), dtype=int))
        out += [(i, lab == r) for r in range(1, n + 1)]
    return out


def _pro_fpr(maps, masks, regions, pred):
    pro = np.mean([pred[i][r].mean() for i, r in regions])
    fpr = np.logical_and(pred, ~masks).sum() / (~masks).sum()
    return pro, fpr


def brute_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    masks = masks.astype(bool)
    regions = _regions(masks)
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pro, fpr = _pro_fpr(maps, masks, regions, maps >= t)
        xs.append(fpr)
        ys.append(pro)
    area = 0.0
    for k in range(1, len(xs)):
        x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def brute_pro_dfr(maps, masks, num_th=4000, limit=0.3):
    """The DFR loop: thred = max - step * delta, binarise score > thred."""
    masks = masks.astype(bool)
    regions = _regions(masks)
    hi, lo = float(maps.max()), float(maps.min())
    delta = (hi - lo) / num_th
    fprs, pros = [], []
    for step in range(num_th):
        thred = hi - step * delta
        pro, fpr = _pro_fpr(maps, masks, regions, maps > thred)
        fprs.append(fpr)
        pros.append(pro)
    fprs, pros = np.array(fprs), np.array(pros)
    idx = fprs <= limit
    f, p = fprs[idx], pros[idx]
    f = (f - f.min()) / (f.max() - f.min())
    p = (p - p.min()) / (p.max() - p.min())
    return sk_auc(f, p)


def brute_f1max(scores, labels):
    scores, labels = np.ravel(scores), np.ravel(labels).astype(bool)
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & labels)
        fp = np.sum(pred & ~labels)
        fn = np.sum(~pred & labels)
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def random_case(seed: int, n=4, h=12, w=12, levels=None):
    """Small maps with several blob regions per image (some images good); ``levels`` quantises
    the scores to create many ties."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        if i % 3 == 2:
            continue  # a good image
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
            masks[i, y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
    maps = rng.random((n, h, w)) + 0.6 * masks * rng.random((n, h, w))
    if levels is not None:
        maps = np.round(maps * levels) / levels
    return maps, masks


def realistic_case(seed: int, n=24, h=64, w=64):
    """Maps like sums of 3 cosine distances: smooth background, brighter blobs on defects."""
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.random((n, h, w)), (0, 2, 2))
    maps = 3.0 * 0.15 * (base - base.min()) / (base.max() - base.min()) + 0.1
    masks = np.zeros((n, h, w), dtype=bool)
    labels = np.zeros(n, dtype=np.int64)
    yy, xx = np.mgrid[:h, :w]
    for i in range(n // 3, n):
        labels[i] = 1
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.integers(5, h - 5), rng.integers(5, w - 5), rng.integers(2, 9)
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            masks[i] |= blob
            maps[i] += blob * rng.uniform(0.0, 0.5) * (1 + 0.5 * rng.random((h, w)))
    maps += 0.05 * rng.standard_normal((n, h, w)) ** 2
    return maps.astype(np.float32), masks, labels


# --------------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    scores = np.round(rng.random(40) + 0.4 * labels, 1)  # ties included
    assert M.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    t = M.image_auroc(torch.tensor(scores, dtype=torch.float32), torch.tensor(labels))
    assert t == pytest.approx(roc_auc_score(labels, scores.astype(np.float32)), abs=1e-12)


def test_image_auroc_hand_value():
    # pairs (neg, pos): (0.1,0.4) win, (0.1,0.35) win, (0.8,0.4) loss, (0.8,0.35) loss -> 0.5
    assert M.image_auroc([0.1, 0.4, 0.35, 0.8], [0, 1, 1, 0]) == 0.5
    assert M.image_auroc([0.1, 0.4, 0.4, 0.2], [0, 1, 0, 1]) == 0.625  # tie counts one half


def test_image_auroc_errors():
    with pytest.raises(MetricUndefinedError, match="one class"):
        M.image_auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ShapeMismatchError):
        M.image_auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(InvalidArgumentError, match="NaN"):
        M.image_auroc([0.1, np.nan], [0, 1])
    with pytest.raises(InvalidArgumentError, match="0/1"):
        M.image_auroc([0.1, 0.2], [0, 2])
    # every error is both a dcamkd error and a ValueError
    with pytest.raises(ValueError):
        M.image_auroc([0.1, 0.2], [0, 0])
    with pytest.raises(DcamkdError):
        M.image_auroc([0.1, 0.2], [0, 0])


@pytest.mark.parametrize("levels", [None, 4])
def test_pixel_auroc_matches_sklearn(levels):
    maps, masks = random_case(3, levels=levels)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert M.pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert M.pixel_auroc(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_errors():
    maps = np.zeros((2, 3, 3))
    with pytest.raises(MetricUndefinedError, match="no defect pixel"):
        M.pixel_auroc(maps, np.zeros((2, 3, 3), bool))
    with pytest.raises(MetricUndefinedError, match="no defect-free pixel"):
        M.pixel_auroc(maps, np.ones((2, 3, 3), bool))
    with pytest.raises(ShapeMismatchError):
        M.pixel_auroc(maps, np.zeros((2, 3, 4), bool))
    with pytest.raises(InvalidArgumentError, match="0/1"):
        M.pixel_auroc(maps, np.full((2, 3, 3), 0.5))
    with pytest.raises(InvalidArgumentError, match="NaN or Inf"):
        M.pixel_auroc(np.full((2, 3, 3), np.inf), np.eye(3, dtype=bool)[None].repeat(2, 0))


# --------------------------------------------------------------------------------------------
# AUPRO
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,levels", [(0, None), (1, None), (2, 5), (3, 3), (4, 10), (5, 2)])
def test_aupro_matches_brute_force(seed, levels):
    maps, masks = random_case(seed, levels=levels)
    assert M.aupro(maps, masks) == pytest.approx(brute_aupro(maps, masks), abs=1e-12)


@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_aupro_other_limits_match_brute_force(limit):
    maps, masks = random_case(7, levels=6)
    assert M.aupro(maps, masks, fpr_limit=limit) == pytest.approx(brute_aupro(maps, masks, limit), abs=1e-12)


def test_aupro_perfect_map_is_one():
    maps, masks = random_case(8)
    assert M.aupro(masks.astype(np.float32), masks) == 1.0
    assert M.aupro(masks * 5.0 + 1.0, masks) == 1.0


def test_aupro_constant_map():
    # a single threshold step from (0, 0) to (1, 1): PRO = FPR on [0, 0.3] -> area 0.045 / 0.3
    _, masks = random_case(9)
    assert M.aupro(np.full(masks.shape, 0.7), masks) == pytest.approx(0.15, abs=1e-15)
    assert M.aupro(np.full(masks.shape, 0.7), masks, fpr_limit=0.5) == pytest.approx(0.25, abs=1e-15)


def test_aupro_never_reaches_limit_before_last_step():
    # 10x10 image, 2x2 region: two pixels at 1.0 and two at 0.0; 96 defect-free pixels: 12 at
    # 0.5, 84 at 0.0. Curve (0,0) -> (0,0.5) -> (0.125,0.5) -> (1,1). PRO at 0.3 on the last
    # segment: 0.5 + 0.5 * 0.175 / 0.875 = 0.6. Area 0.125*0.5 + 0.175*(0.5+0.6)/2 = 0.15875.
    maps = np.zeros((1, 10, 10))
    masks = np.zeros((1, 10, 10), bool)
    masks[0, 4:6, 4:6] = True
    maps[0, 4, 4:6] = 1.0
    maps[0, 0, :10] = 0.5
    maps[0, 1, :2] = 0.5
    assert M.aupro(maps, masks) == pytest.approx(0.15875 / 0.3, abs=1e-12)


def test_aupro_counts_good_images_in_fpr():
    # image 1: perfect 2x2 defect at 1, 12 defect-free pixels at 0; image 2 (good): 4 pixels at 2.
    # FPR = 4/28 = 1/7 before any defect pixel is found, then PRO = 1: AUPRO = (0.3 - 1/7) / 0.3.
    maps = np.zeros((2, 4, 4))
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 1:3, 1:3] = True
    maps[0][masks[0]] = 1.0
    maps[1, 0, :] = 2.0
    assert M.aupro(maps, masks) == pytest.approx(11 / 21, abs=1e-12)
    assert M.aupro(maps[:1], masks[:1]) == 1.0  # without the good image: perfect


def test_aupro_eight_connectivity():
    # pixels (0,0), (0,1) and (1,2): one 8-connected region of 3 (two 4-connected regions).
    # Only (1,2) scores 1: PRO jumps to 1/3 at FPR 0, then linearly to 1 at FPR 1:
    # PRO(0.3) = 1/3 + 0.2, AUPRO = (1/3 + 1/3 + 0.2) / 2 = 13/30 (4-connectivity would give 0.575).
    maps = np.zeros((1, 5, 5))
    masks = np.zeros((1, 5, 5), bool)
    masks[0, 0, 0] = masks[0, 0, 1] = masks[0, 1, 2] = True
    maps[0, 1, 2] = 1.0
    assert M.aupro(maps, masks) == pytest.approx(13 / 30, abs=1e-12)
    # two diagonal pixels are one region: hitting one of them gives PRO 1/2 (not 1 of 2 regions
    # plus another region); with a second single-pixel region missed, PRO = (1/2 + 0) / 2 = 1/4.
    masks2 = np.zeros((1, 5, 5), bool)
    masks2[0, 0, 0] = masks2[0, 1, 1] = masks2[0, 4, 4] = True
    maps2 = np.zeros((1, 5, 5))
    maps2[0, 0, 0] = 1.0
    # (0, 1/4) -> (1, 1): PRO(0.3) = 0.25 + 0.75 * 0.3 = 0.475; AUPRO = (0.25 + 0.475) / 2
    assert M.aupro(maps2, masks2) == pytest.approx((0.25 + 0.475) / 2, abs=1e-12)


def test_aupro_regions_do_not_span_images():
    # same pixel position in two images: two regions (sizes 1 and 2), not one region of 3.
    maps = np.zeros((2, 4, 4))
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 0, 0] = True
    masks[1, 0, 0] = masks[1, 0, 1] = True
    maps[0, 0, 0] = 1.0
    # (0, 1/2) -> (1, 1): PRO(0.3) = 0.65, AUPRO = (0.5 + 0.65) / 2
    assert M.aupro(maps, masks) == pytest.approx(0.575, abs=1e-12)


def test_aupro_torch_and_float16_inputs():
    maps, masks = random_case(11, levels=7)
    expected = brute_aupro(maps.astype(np.float16).astype(np.float64), masks)
    assert M.aupro(torch.tensor(maps, dtype=torch.float16), torch.tensor(masks)) == pytest.approx(expected, abs=1e-12)
    assert M.aupro(torch.tensor(maps, dtype=torch.bfloat16), torch.tensor(masks, dtype=torch.uint8)) >= 0.0


def test_aupro_undefined_and_invalid():
    with pytest.raises(MetricUndefinedError, match="no defect region"):
        M.aupro(np.random.default_rng(0).random((3, 4, 4)), np.zeros((3, 4, 4), bool))
    with pytest.raises(MetricUndefinedError, match="no defect-free pixel"):
        M.aupro(np.zeros((1, 2, 2)), np.ones((1, 2, 2), bool))
    maps, masks = random_case(0)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(InvalidArgumentError, match="fpr_limit"):
            M.aupro(maps, masks, fpr_limit=bad)
    with pytest.raises(ShapeMismatchError, match=r"\(N, H, W\)"):
        M.aupro(maps[0], masks[0])
    with pytest.raises(InvalidArgumentError, match="NaN"):
        M.aupro(np.where(masks, np.nan, maps), masks)


# --------------------------------------------------------------------------------------------
# pro_dfr
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,levels", [(0, None), (2, 5)])
def test_pro_dfr_matches_brute_force(seed, levels):
    maps, masks = random_case(seed, n=3, h=10, w=10, levels=levels)
    assert M.pro_dfr(maps, masks) == pytest.approx(brute_pro_dfr(maps, masks), abs=1e-12)


def test_pro_dfr_reads_higher_than_aupro_and_other_grids():
    maps, masks = random_case(1, n=3, h=10, w=10)
    assert M.pro_dfr(maps, masks) > M.aupro(maps, masks)
    assert M.pro_dfr(maps, masks, num_thresholds=50, fpr_limit=0.5) == pytest.approx(
        brute_pro_dfr(maps, masks, 50, 0.5), abs=1e-12
    )


def test_pro_dfr_undefined():
    _, masks = random_case(0, n=3, h=10, w=10)
    # perfect map: every kept threshold has FPR 0 -> cannot rescale FPR
    with pytest.raises(MetricUndefinedError, match="FPR is constant"):
        M.pro_dfr(masks.astype(float), masks)
    # constant map: thresholds all equal the max, nothing above: a single repeated point (0, 0)
    with pytest.raises(MetricUndefinedError, match="constant"):
        M.pro_dfr(np.ones(masks.shape), masks)
    with pytest.raises(MetricUndefinedError, match="fewer than two"):
        M.pro_dfr(np.random.default_rng(0).random(masks.shape), masks, num_thresholds=1)
    with pytest.raises(MetricUndefinedError, match="no defect region"):
        M.pro_dfr(np.random.default_rng(0).random(masks.shape), np.zeros_like(masks))
    with pytest.raises(InvalidArgumentError, match="num_thresholds"):
        M.pro_dfr(np.random.default_rng(0).random(masks.shape), masks, num_thresholds=0)


# --------------------------------------------------------------------------------------------
# F1-max
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_f1_max_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.random(60) + 0.5 * labels, 1)
    assert M.f1_max(scores, labels) == pytest.approx(brute_f1max(scores, labels), abs=1e-12)
    maps, masks = random_case(seed, levels=8)
    assert M.f1_max(maps, masks) == pytest.approx(brute_f1max(maps, masks), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_max_matches_sklearn_curve(seed):
    from sklearn.metrics import precision_recall_curve

    rng = np.random.default_rng(seed)
    for scores, labels in ((rng.random(5000).astype(np.float32), rng.random(5000) < 0.1),
                           (np.round(rng.random(3000), 2), rng.random(3000) < 0.5)):  # many ties
        scores = scores + 0.3 * labels
        p, r, _ = precision_recall_curve(labels, scores)
        f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
        assert M.f1_max(scores, labels) == pytest.approx(float(f1.max()), abs=1e-12)


def test_f1_max_hand_values():
    # threshold 0.5: tp 2, fp 1, fn 0 -> F1 0.8; threshold 0.9: tp 1, fn 1 -> 2/3
    assert M.f1_max([0.1, 0.5, 0.9, 0.6], [0, 1, 1, 0]) == pytest.approx(0.8)
    assert M.f1_max([0.1, 0.5, 0.9], [0, 1, 1]) == 1.0
    with pytest.raises(MetricUndefinedError, match="no positive"):
        M.f1_max([0.1, 0.5], [0, 0])


# --------------------------------------------------------------------------------------------
# MetricAccumulator
# --------------------------------------------------------------------------------------------


def exact_all(maps, masks, labels):
    scores = maps.reshape(len(maps), -1).max(1)
    return {
        "image_auroc": M.image_auroc(scores, labels),
        "pixel_auroc": M.pixel_auroc(maps, masks),
        "aupro": M.aupro(maps, masks),
        "pro_dfr": M.pro_dfr(maps, masks),
        "image_f1max": M.f1_max(scores, labels),
        "pixel_f1max": M.f1_max(maps, masks),
    }


@pytest.mark.parametrize("seed", [0, 1])
def test_accumulator_matches_exact(seed):
    maps, masks, labels = realistic_case(seed)
    exact = exact_all(maps, masks, labels)
    acc = M.MetricAccumulator()
    perm = np.random.default_rng(seed).permutation(len(maps))
    for i in range(0, len(maps), 5):  # uneven batches, shuffled order, tensors
        b = perm[i : i + 5]
        acc.update(torch.from_numpy(maps[b]), torch.from_numpy(masks[b]), torch.from_numpy(labels[b]))
    got = acc.compute()
    assert got["undefined"] == {}
    assert got["num_images"] == len(maps) == acc.num_images
    for key, value in exact.items():  # the same numbers, up to the order of float64 sums
        assert got[key] == pytest.approx(value, abs=1e-12), key


def _product_maps(seed, n=12, h=40, w=40, scale=1.0):
    """Anomaly maps as the product of three levels' cosine distances of a well-trained model:
    tiny everywhere (~1e-9 on good pixels, at most ~1e-7 on defects)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=bool)
    labels = np.zeros(n, dtype=np.int64)
    for i in range(n // 2, n):
        labels[i] = 1
        y, x = rng.integers(2, h - 8, size=2)
        masks[i, y : y + rng.integers(2, 7), x : x + rng.integers(2, 7)] = True
    levels = [ndimage.gaussian_filter(rng.random((n, h, w)), (0, 1, 1)) * 2e-3 for _ in range(3)]
    for lv in levels:
        lv += masks * 4e-3 * rng.random((n, h, w))
    return (scale * levels[0] * levels[1] * levels[2]).astype(np.float32), masks, labels


@pytest.mark.parametrize("fusion_like, scale, offset", [("product", 1.0, 0.0), ("product", 1e-6, 0.0),
                                                         ("product", 1e6, 0.0), ("sum", 1.0, 0.0), ("sum", 1e3, 0.0),
                                                         ("sum", 1.0, 5.0)])
def test_accumulator_is_exact_at_any_scale(fusion_like, scale, offset):
    # a fixed histogram range once collapsed small product maps into one bin: pixel AUROC 0.50
    # and AUPRO 0.15 where the exact values are 1.00
    maps, masks, labels = _product_maps(7)
    if fusion_like == "sum":
        maps = np.cbrt(maps)  # a sum of three levels of this scale
    maps = (maps * np.float32(scale) + np.float32(offset)).astype(np.float32)
    exact = exact_all(maps, masks, labels)
    if fusion_like == "product" and scale == 1.0:
        assert float(maps.max()) < 1e-6 and exact["pixel_auroc"] > 0.99 and exact["aupro"] > 0.9
    acc = M.MetricAccumulator()
    for i in range(0, len(maps), 5):
        acc.update(maps[i : i + 5], masks[i : i + 5], labels[i : i + 5])
    got = acc.compute()
    for key, value in exact.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def _feed(acc, maps, masks, labels, bounds):
    for a, b in zip(bounds[:-1], bounds[1:]):
        for i in range(a, b, 3):  # batches of 3 inside each shard
            j = min(i + 3, b)
            acc.update(maps[i:j], masks[i:j], labels[i:j])
    return acc


@pytest.mark.parametrize("seed", [0, 5])
def test_merge_of_uneven_shards_equals_one_pass(seed):
    import pickle

    rng = np.random.default_rng(seed)
    maps, masks, labels = realistic_case(seed, n=23, h=24, w=40)
    maps = maps * np.float32(10.0 ** rng.uniform(-4, 2))
    one = _feed(M.MetricAccumulator(), maps, masks, labels, [0, 23]).compute()
    exact = exact_all(maps, masks, labels)
    cuts = sorted(rng.choice(np.arange(1, 23), size=3, replace=False).tolist())
    bounds = [0, *cuts, 23]
    shards = [_feed(M.MetricAccumulator(), maps, masks, labels, [a, b]) for a, b in zip(bounds[:-1], bounds[1:])]
    shards.insert(2, M.MetricAccumulator())  # an empty shard (more ranks than images)
    # in order: exactly one pass (same arrays in the same order)
    merged = M.MetricAccumulator()
    for sh in shards:
        merged.merge(sh)
    assert merged.compute() == one
    np.testing.assert_array_equal(merged.arrays()[0], maps)
    # in other orders, through state dicts (pickled, as torch.distributed sends them): the
    # metrics of the whole set, to float64 rounding
    for order in (rng.permutation(len(shards)), np.arange(len(shards))[::-1]):
        merged = M.MetricAccumulator()
        for k in order:
            state = pickle.loads(pickle.dumps(shards[k].state_dict()))
            merged.merge(M.MetricAccumulator.from_state_dict(state))
        got = merged.compute()
        assert got["num_images"] == 23 and got["undefined"] == {}
        for key, value in exact.items():
            assert got[key] == pytest.approx(value, abs=1e-12), key
            assert got[key] == pytest.approx(one[key], abs=1e-12), key
    # merging leaves the other accumulator as it was
    assert shards[0].num_images == bounds[1]


def test_state_dict_round_trip_and_savez(tmp_path):
    maps, masks, labels = realistic_case(2, n=7, h=16, w=16)
    acc = M.MetricAccumulator(fpr_limit=0.2, num_thresholds=500)
    scores = maps.reshape(7, -1).mean(1)
    acc.update(maps, masks, labels, scores=scores)
    np.savez(tmp_path / "s.npz", **acc.state_dict())
    with np.load(tmp_path / "s.npz") as f:
        back = M.MetricAccumulator.from_state_dict(dict(f))
    assert (back.fpr_limit, back.num_thresholds) == (0.2, 500)
    assert back.compute() == acc.compute()
    assert acc.compute()["aupro"] == M.aupro(maps, masks, 0.2)
    assert acc.compute()["pro_dfr"] == M.pro_dfr(maps, masks, 500, 0.2)
    assert acc.compute()["image_auroc"] == M.image_auroc(scores, labels)
    with pytest.raises(InvalidArgumentError, match="state"):
        M.MetricAccumulator.from_state_dict({"version": 99})


def test_merge_errors():
    a = M.MetricAccumulator()
    a.update(np.random.default_rng(0).random((2, 4, 4)), np.zeros((2, 4, 4), bool), [0, 0])
    b = M.MetricAccumulator()
    b.update(np.random.default_rng(1).random((1, 4, 5)), np.zeros((1, 4, 5), bool), [0])
    with pytest.raises(ShapeMismatchError, match="4x5 pixels, but earlier ones are 4x4"):
        a.merge(b)
    with pytest.raises(InvalidArgumentError, match="fpr_limit: cannot merge"):
        a.merge(M.MetricAccumulator(fpr_limit=0.1))
    with pytest.raises(InvalidArgumentError, match="expected a MetricAccumulator"):
        a.merge({"maps": 1})
    assert a.num_images == 2  # a failed merge adds nothing


def test_accumulator_counts_defective_images_without_defect_pixels():
    maps, masks, labels = realistic_case(4, n=9, h=16, w=16)
    masks[labels == 1][0] = False
    first_defective = int(np.flatnonzero(labels == 1)[0])
    masks[first_defective] = False
    acc = M.MetricAccumulator()
    acc.update(maps, masks, labels)
    assert acc.num_defective_without_defect_pixels() == 1
    # it stays a defective image for the image metrics; its pixels are defect-free pixels
    got = acc.compute()
    assert got["image_auroc"] == M.image_auroc(maps.reshape(9, -1).max(1), labels)
    assert got["pixel_auroc"] == M.pixel_auroc(maps, masks)


def test_accumulator_undefined_entries():
    rng = np.random.default_rng(0)
    acc = M.MetricAccumulator()
    empty = acc.compute()
    assert empty["aupro"] is None and "never called" in empty["undefined"]["aupro"]
    acc.update(rng.random((3, 8, 8)), np.zeros((3, 8, 8), bool), np.zeros(3, int))
    got = acc.compute()
    for key in ("image_auroc", "pixel_auroc", "aupro", "pro_dfr", "image_f1max", "pixel_f1max"):
        assert got[key] is None
        assert isinstance(got["undefined"][key], str)
    assert "no defect region" in got["undefined"]["aupro"]
    assert "one class" in got["undefined"]["image_auroc"]


def test_accumulator_rejects_bad_batches():
    acc = M.MetricAccumulator()
    maps = np.random.default_rng(0).random((2, 4, 4))
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 1, 1] = True
    with pytest.raises(InvalidArgumentError, match="labelled good"):
        acc.update(maps, masks, [0, 0])
    with pytest.raises(ShapeMismatchError):
        acc.update(maps, masks, [1, 0, 0])
    with pytest.raises(InvalidArgumentError, match="NaN"):
        acc.update(np.full((2, 4, 4), np.nan), masks, [1, 0])
    assert acc.num_images == 0
    with pytest.raises(InvalidArgumentError, match="fpr_limit"):
        M.MetricAccumulator(fpr_limit=0.0)
    with pytest.raises(InvalidArgumentError, match="num_thresholds"):
        M.MetricAccumulator(num_thresholds=0)
    # the arrays are copied: the caller may reuse its buffers
    buf = torch.rand(2, 4, 4)
    acc.update(buf, masks, [1, 0])
    before = acc.compute()
    buf.fill_(0.5)
    assert acc.compute() == before
