"""The accuracy study's tools: DCAM gate floor, scoring as part of a preset, rescoring saved maps
(choose blur and image score without retraining) and the Welch comparison of ablation cells."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dcamkd.ablate import compare_cells, compare_md
from dcamkd.cli import main
from dcamkd.config import TrainConfig, preset_config
from dcamkd.dcam import DCAM, ChannelAttention, SpatialAttention
from dcamkd.errors import InvalidArgumentError, MissingFileError
from dcamkd.metrics import aupro, image_auroc, pixel_auroc
from dcamkd.objective import PRESETS, Preset, ScoringSettings, get_preset
from dcamkd.rescore import choose_scoring, parse_rules, rescore, rescore_runs
from dcamkd.scoring import gaussian_blur, image_scores


# --- gate floor ---------------------------------------------------------------------------------

@pytest.mark.parametrize("floor", [0.0, 0.25, 0.9])
@torch.no_grad()
def test_gate_floor_bounds_every_gate_and_is_affine_in_the_sigmoid(floor):
    torch.manual_seed(7)
    s = [torch.randn(3, 6, 5, 7) * 50, torch.randn(3, 10, 4, 3) * 50]  # large logits: plain gates hit 0 and 1
    for variant in ("channel", "spatial", "cbam"):
        d0 = DCAM((6, 10), variant, reduction=2, kernel_size=3)
        d = DCAM((6, 10), variant, reduction=2, kernel_size=3, gate_floor=floor)
        d.load_state_dict(d0.state_dict())  # same weights: the floor adds no parameter
        gates0, gates = [g for gs in d0(s) for g in gs if g is not None], [g for gs in d(s) for g in gs if g is not None]
        assert len(gates) == (4 if variant == "cbam" else 2)
        for g0, g in zip(gates0, gates):
            assert float(g.min()) >= np.float32(floor) and float(g.max()) <= 1.0  # floor in float32
            if variant != "cbam":  # cbam's spatial gate pools the channel-gated map: other input
                torch.testing.assert_close(g, floor + (1 - floor) * g0, rtol=1e-6, atol=1e-6)
            if floor == 0.0:
                torch.testing.assert_close(g, g0, rtol=0, atol=0)


def test_gate_floor_keeps_gradient_flowing_through_closed_gates():
    ca = ChannelAttention(4, reduction=1, gate_floor=0.2)
    with torch.no_grad():
        for p in ca.parameters():
            p.fill_(-1.0)  # relu(-(-400)) then -sum: a hugely negative logit
    s = torch.full((1, 4, 3, 3), -100.0, requires_grad=True)  # sigmoid(-big) = 0: a closed plain gate
    a = ca(s)
    torch.testing.assert_close(a, torch.full_like(a, 0.2))
    (a[:, :, None, None] * s).sum().backward()
    assert float(s.grad.abs().min()) == pytest.approx(0.2)  # the gated map still passes 20 % of the gradient


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, True, "0.1", float("nan")])
def test_gate_floor_rejects_bad_values(bad):
    with pytest.raises(InvalidArgumentError, match="dcam_gate_floor"):
        TrainConfig(dcam_gate_floor=bad).validate()
    with pytest.raises(InvalidArgumentError, match="dcam_gate_floor"):
        SpatialAttention(3, gate_floor=bad)


def test_gate_floor_from_the_command_line_reaches_the_model():
    from dcamkd.checkpoint import build_networks
    from dcamkd.cli import _train_config, build_parser

    a = build_parser().parse_args(["train", "--data", "x", "--out", "y", "--dcam-gate-floor", "0.3"])
    cfg = _train_config(a)
    assert cfg.dcam_gate_floor == 0.3 and TrainConfig.from_dict(cfg.to_dict()).dcam_gate_floor == 0.3
    cfg.teacher_weights = None
    _, _, dcam = build_networks(cfg)
    assert all(b.channel.gate_floor == 0.3 for b in dcam.blocks)
    assert main(["train", "--data", "x", "--out", "y", "--dcam-gate-floor", "1"]) == 2


# --- scoring in the preset ----------------------------------------------------------------------

def test_presets_carry_scoring_and_configs_take_it():
    for name, p in PRESETS.items():
        assert isinstance(p.scoring, ScoringSettings)
        cfg = preset_config(name)
        assert cfg.scoring_settings() == p.scoring
    assert TrainConfig().scoring_settings() == get_preset("dcam").scoring
    cfg = preset_config("stfpm", sigma=4.0, image_score="topk", topk_fraction=0.05)
    assert cfg.scoring_settings() == ScoringSettings("sum", 4.0, "topk", 0.05) and cfg.preset == "stfpm"
    with pytest.raises(InvalidArgumentError, match="scoring"):
        Preset(PRESETS["stfpm"].objective, "none", scoring={"sigma": 4})


def test_study_scoring_is_in_both_recommended_presets_and_the_paper_keeps_its_own():
    """stfpm and dcam score as the study chose (sigma 4, top 1 % mean); dcam-paper as method.md
    section 5 (no blur, maximum); the demo and a bare config follow the preset."""
    from dcamkd.cli import build_parser
    from dcamkd.objective import STUDY_SCORING

    assert STUDY_SCORING == ScoringSettings("sum", 4.0, "topk", 0.01)
    assert PRESETS["stfpm"].scoring == PRESETS["dcam"].scoring == PRESETS["stfpm-kd"].scoring == STUDY_SCORING
    assert PRESETS["dcam-paper"].scoring == ScoringSettings("sum", 0.0, "max")
    assert TrainConfig().scoring_settings() == STUDY_SCORING
    sub = build_parser()._subparsers._group_actions[0].choices
    demo = next(a for a in sub["demo"]._actions if a.dest == "sigma")
    assert demo.default is None  # the preset's sigma
    train = {a.dest: a for a in sub["train"]._actions}
    assert train["sigma"].default is None and "4 for stfpm, dcam, stfpm-kd; 0 for dcam-paper" in train["sigma"].help
    assert "topk for stfpm, dcam, stfpm-kd; max for dcam-paper" in train["image_score"].help


# --- rescoring saved maps -----------------------------------------------------------------------

def _saved_maps(path, scoring=None, seed=0):
    """Six good and six defective 16x16 maps: good maps have one hot pixel (3.0), defective ones a
    4x4 region of 2.0 inside their mask; max ranks the goods first, a top-k mean does not."""
    rng = np.random.default_rng(seed)
    n, h = 12, 16
    maps = rng.uniform(0, 0.5, (n, h, h)).astype(np.float32)
    masks = np.zeros((n, h, h), bool)
    labels = np.array([0] * 6 + [1] * 6)
    for i in range(6):
        maps[i, rng.integers(h), rng.integers(h)] = 3.0
    for i in range(6, 12):
        r, c = rng.integers(0, h - 4, 2)
        maps[i, r:r + 4, c:c + 4] = 2.0
        masks[i, r:r + 4, c:c + 4] = True
    arrays = dict(maps=maps, masks=masks, labels=labels, scores=maps.reshape(n, -1).max(1))
    if scoring is not None:
        arrays["scoring"] = np.array(json.dumps(scoring))
    np.savez_compressed(path, **arrays)
    return maps, masks, labels


def test_rescore_matches_the_metric_functions_and_separates_rules(tmp_path):
    maps, masks, labels = _saved_maps(tmp_path / "a.npz", ScoringSettings().to_dict())
    maps_b, masks_b, labels_b = _saved_maps(tmp_path / "b.npz", seed=1)
    rules = parse_rules("max,topk:0.05")
    res = rescore(tmp_path, [0, 1.5], rules)
    assert res["categories"] == ["a", "b"] and res["rules"] == ["max", "topk:0.05"]
    a0 = res["per_category"]["a"]["sigma=0"]
    assert a0["image_auroc"]["max"] == 0.0  # every good image has the highest max
    assert a0["image_auroc"]["topk:0.05"] == 1.0  # 13 pixels: the region wins, the lone pixel does not
    assert a0["pixel_auroc"] == pytest.approx(pixel_auroc(maps, masks))
    assert a0["aupro"] == pytest.approx(aupro(maps, masks))
    blurred = gaussian_blur(torch.from_numpy(maps_b), 1.5)
    b1 = res["per_category"]["b"]["sigma=1.5"]
    assert b1["aupro"] == pytest.approx(aupro(blurred.numpy(), masks_b))
    assert b1["image_auroc"]["topk:0.05"] == pytest.approx(
        image_auroc(image_scores(blurred, "topk", 0.05).numpy(), labels_b))
    m = res["mean"]["sigma=1.5"]
    assert m["pixel_auroc"] == pytest.approx((res["per_category"]["a"]["sigma=1.5"]["pixel_auroc"]
                                              + b1["pixel_auroc"]) / 2)


def test_rescore_refuses_blurred_maps_and_bad_arguments(tmp_path):
    _saved_maps(tmp_path / "c.npz", ScoringSettings(sigma=4.0).to_dict())
    with pytest.raises(InvalidArgumentError, match=r"c\.npz: maps were saved blurred \(sigma 4, by an older dcamkd"):
        rescore(tmp_path, [0], parse_rules("max"))
    with pytest.raises(MissingFileError, match="--maps"):
        rescore(tmp_path / "nope", [0], parse_rules("max"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingFileError, match="no <category>.npz"):
        rescore(empty, [0], parse_rules("max"))
    for bad in ("", "mean", "topk", "max:0.1", "topk:0", "topk:1.5", "topk:x"):
        with pytest.raises(InvalidArgumentError, match="--rules"):
            parse_rules(bad)
    _saved_maps(tmp_path / "d.npz")
    with pytest.raises(InvalidArgumentError, match="sigma"):
        rescore(tmp_path, [-1], parse_rules("max"), categories=["d"])


def test_rescore_command_line(tmp_path, capsys):
    _saved_maps(tmp_path / "a.npz")
    out = tmp_path / "r.json"
    assert main(["rescore", "--maps", str(tmp_path), "--sigmas", "0,2", "--rules", "max,topk:0.05",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 0 |" in printed and "image AUROC topk:0.05" in printed
    assert json.loads(out.read_text())["sigmas"] == [0.0, 2.0]
    assert main(["rescore", "--maps", str(tmp_path), "--sigmas", "a"]) == 2


def test_rescore_runs_averages_runs_and_chooses_the_best_mean_of_image_auroc_and_aupro(tmp_path, capsys):
    runs = []
    for k in range(3):
        d = tmp_path / f"seed{k}"
        d.mkdir()
        _saved_maps(d / "a.npz", seed=10 + k)
        _saved_maps(d / "b.npz", seed=20 + k)
        runs.append(d)
    rules = parse_rules("max,topk:0.05")
    res = rescore_runs(runs, [0, 1.5], rules)
    singles = [rescore(d, [0, 1.5], rules) for d in runs]
    for key in ("sigma=0", "sigma=1.5"):
        assert res["mean"][key]["aupro"] == pytest.approx(np.mean([r["mean"][key]["aupro"] for r in singles]))
        for rule in ("max", "topk:0.05"):
            assert res["mean"][key]["image_auroc"][rule] == pytest.approx(
                np.mean([r["mean"][key]["image_auroc"][rule] for r in singles]))
    # the choice, by hand: every (sigma, rule) scored by (image AUROC + AUPRO) / 2
    cand = [((res["mean"][k]["image_auroc"][r] + res["mean"][k]["aupro"]) / 2, k, r)
            for k in ("sigma=0", "sigma=1.5") for r in ("max", "topk:0.05")]
    best = max(cand, key=lambda c: c[0])
    c = res["choice"]
    assert (f"sigma={c['sigma']:g}", c["rule"]) == (best[1], best[2]) and c["value"] == pytest.approx(best[0])
    # ties keep the first (smaller sigma, earlier rule)
    tie = {"sigma=0": {"aupro": 0.5, "image_auroc": {"max": 0.7, "topk:0.01": 0.7}},
           "sigma=2": {"aupro": 0.6, "image_auroc": {"max": 0.6, "topk:0.01": 0.5}}}
    assert (choose_scoring(tie)["sigma"], choose_scoring(tie)["rule"]) == (0.0, "max")
    assert main(["rescore", "--maps", *map(str, runs), "--sigmas", "0,1.5", "--rules", "max,topk:0.05"]) == 0
    printed = capsys.readouterr().out
    assert "and 3 runs" in printed and f"sigma {c['sigma']:g}, {c['rule']}" in printed


def test_rescore_runs_refuses_mismatched_or_repeated_runs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _saved_maps(a / "x.npz")
    _saved_maps(b / "y.npz")
    with pytest.raises(InvalidArgumentError, match="categories"):
        rescore_runs([a, b], [0], parse_rules("max"))
    with pytest.raises(InvalidArgumentError, match="twice"):
        rescore_runs([a, a], [0], parse_rules("max"))
    with pytest.raises(InvalidArgumentError, match="twice"):
        rescore_runs([a, f"{a}/", tmp_path / "." / "a"], [0], parse_rules("max"))
    with pytest.raises(InvalidArgumentError, match="at least one"):
        rescore_runs([], [0], parse_rules("max"))
    assert rescore_runs(str(a), [0], parse_rules("max"))["runs"] == [str(a)]  # one path is one run
    assert rescore_runs(a, [0], parse_rules("max"))["runs"] == [str(a)]
    for bad, match in (({}, "at least one"), ({"s4": {}}, "sigma=S"),
                       ({"sigma=0": {"aupro": float("nan"), "image_auroc": {"max": 0.5}}}, "finite")):
        with pytest.raises(InvalidArgumentError, match=match):
            choose_scoring(bad)


def test_rescore_maps_flag_repeated_adds_runs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _saved_maps(a / "x.npz", seed=1)
    _saved_maps(b / "x.npz", seed=2)
    out = tmp_path / "r.json"
    assert main(["rescore", "--maps", str(a), "--maps", str(b), "--sigmas", "0", "--rules", "max",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["runs"] == [str(a), str(b)]


# --- Welch comparison ---------------------------------------------------------------------------

def _welch(a, b):
    a, b = np.asarray(a), np.asarray(b)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (b.mean() - a.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return t, df


def test_compare_cells_is_a_one_sided_welch_test(tmp_path):
    from scipy import stats

    a = [0.90, 0.91, 0.92, 0.905, 0.915]
    b = [0.93, 0.95, 0.94, 0.96, 0.935]
    table = {"rows": {"A": {"seed_image_auroc": a, "seed_aupro": a, "last_seed_aupro": b},
                      "C": {"seed_image_auroc": b, "seed_aupro": a[:1], "last_seed_aupro": a}}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    cmp = compare_cells(path, "A", "C")
    rows = {(r["checkpoint"], r["metric"]): r for r in cmp["rows"]}
    t, df = _welch(a, b)
    r = rows[("best", "image_auroc")]
    assert r["t"] == pytest.approx(t) and r["p"] == pytest.approx(stats.t.sf(t, df))
    assert r["p"] < 0.05 and r["diff"] == pytest.approx(np.mean(b) - np.mean(a))
    assert rows[("best", "aupro")]["p"] is None  # one seed on a side: no test
    assert rows[("last", "aupro")]["p"] > 0.95  # C is worse at last.pt: the one-sided p is near 1
    assert ("last", "image_auroc") not in rows
    assert "| best | image_auroc | 5/5 |" in compare_md(cmp)
    with pytest.raises(InvalidArgumentError, match="'B' is not in the table"):
        compare_cells(table, "A", "B")


def test_compare_warns_when_cells_were_scored_differently(tmp_path):
    from dcamkd.ablate import _row_scoring

    blur = {"fusion": "sum", "sigma": 4.0, "image_score": "topk", "topk_fraction": 0.01}
    raw = dict(blur, sigma=0.0, image_score="max")
    # a cell whose runs were made before and after a preset's scoring changed
    mixed = _row_scoring({"seed0": {"config": dict(raw, lr=0.1)}, "seed1": {"config": dict(blur, lr=0.1)},
                          "seed2": {"config": dict(blur, lr=0.1)}})
    assert mixed == [dict(raw, topk_fraction=None), blur]
    raw = dict(raw, topk_fraction=None)
    # the fraction is not part of a scoring by the maximum
    assert _row_scoring({"s0": {"config": dict(raw, topk_fraction=0.01)},
                         "s1": {"config": dict(raw, topk_fraction=0.05)}}) == [raw]
    x = [0.9, 0.91, 0.92]
    table = {"rows": {"A": {"seed_aupro": x, "scoring": [blur]}, "B": {"seed_aupro": x, "scoring": mixed},
                      "C": {"seed_aupro": x, "scoring": [raw]}, "D": {"seed_aupro": x, "scoring": [blur]}}}
    (w,) = compare_cells(table, "A", "B")["warnings"]
    assert "'B' holds runs tested with different scorings" in w
    (w,) = compare_cells(table, "A", "C")["warnings"]
    assert "different scorings" in w and "'sigma': 4.0" in w and "'sigma': 0.0" in w
    assert "Warning: cells 'A' and 'C'" in compare_md(compare_cells(table, "A", "C"))
    assert compare_cells(table, "A", "D")["warnings"] == []
    assert "Warning" not in compare_md(compare_cells(table, "A", "D"))


# --- bad input found by review --------------------------------------------------------------------

def test_mining_level_progress_and_factor_are_checked():
    from dcamkd import ops
    from dcamkd.losses import DistillationLoss
    from dcamkd.objective import Objective

    t, s = [torch.randn(2, 4, 3, 3)], [torch.randn(2, 4, 3, 3, requires_grad=True)]
    loss = DistillationLoss(Objective(cos="global", kl="none", mine="quantile"))
    for bad in (float("nan"), torch.tensor(float("inf")), "abc", torch.tensor([0.5, 0.7]), True):
        with pytest.raises(InvalidArgumentError, match="progress"):
            loss(t, s, progress=bad)
    assert torch.isfinite(loss(t, s, progress=torch.tensor(0.5)))
    for f in (float("nan"), 2.0, -1.0):
        with pytest.raises(InvalidArgumentError, match="mine_factor"):
            ops.pyramid_terms(t, s, cos="global", kl="none", mine="quantile", mine_factor=f,
                              mine_level=torch.tensor(0.5))
    with pytest.raises(InvalidArgumentError, match="mine_level"):
        ops.pyramid_terms(t, s, cos="global", kl="none", mine="quantile", mine_level=float("nan"))
    from dcamkd.errors import ShapeMismatchError
    with pytest.raises(ShapeMismatchError, match="B, C, H, W >= 1"):
        ops.pyramid_terms([torch.randn(0, 4, 3, 3)], [torch.randn(0, 4, 3, 3)])


def test_grid_warns_once_per_cell_naming_it_about_inert_settings(tmp_path):
    import warnings

    from dcamkd.ablate import expand_grid, load_grid

    grid = tmp_path / "g.yaml"
    grid.write_text("common: {tau: 2.0}\nseeds: [0, 1]\ncells:\n  - {name: a, preset: stfpm}\n"
                    "  - {name: b, preset: dcam}\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = load_grid(grid)  # validating the grid warns about nothing
        assert caught == []
        expand_grid(g, "x")
    assert [str(w.message) for w in caught] == ["grid cell 'a': tau: has no effect with kl 'none' (ignored)"]


def test_grid_reads_exponent_notation_as_numbers(tmp_path):
    from dcamkd.ablate import expand_grid, load_grid

    grid = tmp_path / "g.yaml"
    grid.write_text("common: {lr: 1e-3, weight_decay: 5E-5}\ncells:\n  - {name: a, preset: stfpm}\n")
    cfg = expand_grid(load_grid(grid), "x")[0][2]
    assert cfg.lr == 1e-3 and cfg.weight_decay == 5e-5


def test_compare_refuses_bad_tables_and_does_not_test_without_spread(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidArgumentError, match="not JSON"):
        compare_cells(bad, "A", "B")
    bad.write_text("[1, 2]")
    with pytest.raises(InvalidArgumentError, match="rows"):
        compare_cells(bad, "A", "B")
    table = {"rows": {"A": {"seed_aupro": [0.8, 0.8]}, "B": {"seed_aupro": [0.9, 0.9]}}}
    (r,) = compare_cells(table, "A", "B")["rows"]
    assert r["p"] is None and r["t"] is None and r["diff"] == pytest.approx(0.1)


def test_rescore_refuses_empty_repeated_and_oversized_sigmas(tmp_path):
    _saved_maps(tmp_path / "a.npz")
    for sigmas, match in (([], "at least one"), ([0.1, 0.10000001], "repeats"), ([1e9], "larger than the 16 x 16")):
        with pytest.raises(InvalidArgumentError, match=match):
            rescore(tmp_path, sigmas, parse_rules("max"))


def test_cli_warnings_are_one_line(tmp_path, capsys):
    import warnings as w

    from dcamkd.cli import _format_warning

    assert _format_warning(UserWarning("a\n  b"), UserWarning, "f.py", 3) == "dcamkd: warning: a b\n"
    before = w.formatwarning
    main(["rescore", "--maps", str(tmp_path / "none")])
    assert w.formatwarning is before  # restored after the command
