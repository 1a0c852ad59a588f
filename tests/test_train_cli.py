"""The trainer, checkpoints, the command line end to end, the ablation runner, and the
real-data and demo smoke runs."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import real_industrial3, tiny_cfg
from dcamkd.cli import main
from dcamkd.config import PRESETS, TrainConfig, preset_config
from dcamkd.errors import CheckpointError, InvalidArgumentError, MissingFileError
from dcamkd.io import _umask
from dcamkd.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, model_from_checkpoint
from dcamkd.train import Trainer, train

REAL_DATA = real_industrial3()


def test_presets():
    from dcamkd.objective import DEFAULT_PRESET, Objective

    assert PRESETS["stfpm"].dcam == "none" and PRESETS["stfpm"].objective.kl == "none"
    p = preset_config("dcam-paper")
    o = p.objective
    assert (p.dcam, o.cos, o.kl, o.kd_reduction, o.tau, o.lambda_cos, o.lambda_kl) == (
        "channel", "channel", "spatial", "sum_c", 1.0, 1.0, 1.0)
    # the ablation's choice, which the dataclass defaults follow
    d = preset_config("dcam")
    o = d.objective
    assert (d.dcam, o.cos, o.kl, o.kd_reduction, o.tau, o.lambda_cos, o.lambda_kl) == (
        "channel", "channel", "spatial", "mean_c", 1.0, 1.0, 0.1)
    c = TrainConfig()
    assert DEFAULT_PRESET == c.preset == "dcam" and c.dcam == "channel"
    assert c.objective == d.objective == Objective() == PRESETS["dcam"].objective
    # method.md section 6 recipe
    assert (c.lr, c.momentum, c.weight_decay, c.batch_size, c.epochs) == (0.1, 0.9, 1e-4, 32, 400)
    with pytest.raises(InvalidArgumentError, match="preset"):
        preset_config("nope")
    with pytest.raises(InvalidArgumentError, match="image_size"):
        preset_config("dcam", image_size=100)
    with pytest.raises(InvalidArgumentError, match="unknown config keys"):
        TrainConfig.from_dict({"learning_rate": 1})


def test_train_writes_checkpoints_and_log(tree, tmp_path):
    cfg = tiny_cfg(tree, "dcam", steps=5)
    log = train(cfg, tmp_path / "run", progress=False)
    assert log["total_steps"] == 5
    # 12 pooled train images, round(0.2 * 6) = 1 per category held out; batch 4 -> 3 steps per epoch
    assert log["n_train"] == 10 and log["n_val"] == 2 and log["steps_per_epoch"] == 3
    assert [e["step"] for e in log["epochs"]] == [3, 5]
    assert all(np.isfinite(e["loss"]) and len(e["kl_terms"]) == 3 for e in log["epochs"])
    diag = log["epochs"][-1]["diagnostics"]
    assert 0 <= diag["grad_share_kl"] <= 1 and len(diag["channel_gate"]) == 3
    assert "val_raw" in log["epochs"][-1] and "val_gated" in log["epochs"][-1]
    best_epoch = min(log["epochs"], key=lambda e: e["val_score"])
    ck = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ck["format_version"] == CHECKPOINT_FORMAT and ck["step"] == best_epoch["step"]
    assert ck["config"]["backbone"] == "tf_efficientnet_lite0" and ck["image_size"] == 64
    assert ck["mean"] == [0.5, 0.5, 0.5]
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["step"] == 5 and "optimizer" in last and "rng" in last
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split  # file lists saved
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_resume_continues_to_the_same_weights(tree, tmp_path):
    cfg = tiny_cfg(tree, "stfpm", steps=4, deterministic=False)
    train(cfg, tmp_path / "full", progress=False)
    cfg2 = tiny_cfg(tree, "stfpm", steps=2)
    train(cfg2, tmp_path / "part", progress=False)
    train(tiny_cfg(tree, "stfpm", steps=4), tmp_path / "part", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "full" / "last.pt")["student"]
    b = load_checkpoint(tmp_path / "part" / "last.pt")["student"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def _rel_diff(run_a, run_b, part="student"):
    """||a - b|| / ||a|| over all float tensors of the ``part`` state dicts of two runs' last.pt."""
    a, b = load_checkpoint(run_a / "last.pt")[part], load_checkpoint(run_b / "last.pt")[part]
    ks = [k for k in a if a[k].is_floating_point()]
    va = torch.cat([a[k].double().flatten() for k in ks])
    vb = torch.cat([b[k].double().flatten() for k in ks])
    return ((va - vb).norm() / va.norm()).item()


def test_spatial_dcam_with_channel_cd_trains_the_stfpm_student(tree, tmp_path):
    # the ablation's free correctness check: a positive per-location gate leaves every channel cosine
    # unchanged, so DCAM spatial + channel CD takes exactly the STFPM step (one step: later steps
    # amplify float rounding through batch norm)
    runs = {"stfpm": {}, "sp": dict(dcam="spatial"), "ch": dict(dcam="channel")}
    for name, kw in runs.items():
        train(tiny_cfg(tree, "stfpm", steps=1, **kw), tmp_path / name, progress=False)
    assert load_checkpoint(tmp_path / "sp" / "last.pt")["dcam"] is not None
    assert _rel_diff(tmp_path / "stfpm", tmp_path / "sp") < 1e-7
    assert _rel_diff(tmp_path / "stfpm", tmp_path / "ch") > 1e-4  # a channel gate does change the step


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_channels_last_is_a_layout_not_a_model_change(impl):
    # float64, so that any difference beyond rounding would show: the student, DCAM and the
    # paper's loss give the same loss and gradients in NCHW and channels-last layouts
    import copy

    from dcamkd import ops
    from dcamkd.dcam import DCAM
    from dcamkd.losses import DistillationLoss
    from dcamkd.models import build_student

    torch.manual_seed(0)
    teacher = build_student("tf_efficientnet_lite0").double().eval()
    student = build_student("tf_efficientnet_lite0").double().train()
    dcam = DCAM((24, 40, 112), "channel").double()
    x = torch.randn(3, 3, 48, 80, dtype=torch.double)
    results = []
    for cl in (False, True):
        t_, s_, d_ = copy.deepcopy(teacher), copy.deepcopy(student), copy.deepcopy(dcam)
        if cl:
            t_.to(memory_format=torch.channels_last)
            s_.to(memory_format=torch.channels_last)
        with torch.no_grad():
            t = t_(x)
        s = s_(x)
        assert all(f.is_contiguous(memory_format=torch.channels_last) == cl for f in s)
        with ops.use(impl):
            cg, sg = d_(s)
            loss = DistillationLoss(cos="channel", kl="spatial", kd_reduction="sum_c")(t, s, cg, sg)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in list(s_.parameters()) + list(d_.parameters())])
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
    assert ((results[0][1] - results[1][1]).norm() / results[0][1].norm()).item() < 1e-12


def test_trainer_records_the_layout(tree, tmp_path):
    for cl in (True, False):
        train(tiny_cfg(tree, "stfpm", steps=1, channels_last=cl), tmp_path / f"cl{cl}", progress=False)
        assert load_checkpoint(tmp_path / f"cl{cl}" / "last.pt")["config"]["channels_last"] is cl
    # float rounding only (measured 5e-6 after one step; a change of objective gives 4e-4)
    assert _rel_diff(tmp_path / "clTrue", tmp_path / "clFalse") < 5e-5


def test_resume_refuses_another_config(tree, tmp_path):
    train(tiny_cfg(tree, "stfpm", steps=2), tmp_path / "r", progress=False)
    with pytest.raises(CheckpointError, match="another configuration") as e:
        train(tiny_cfg(tree, "stfpm", steps=4, lr=0.2), tmp_path / "r", resume=True, progress=False)
    assert "to continue it as it was made, pass --lr " in str(e.value)


def test_resume_after_a_scoring_change_names_the_options_that_continue_it(tree, tmp_path):
    """A run started under one scoring, resumed after the presets' scoring changed: the error
    names the options that give the resumed run the checkpoint's scoring, and they work."""
    train(tiny_cfg(tree, "stfpm", steps=2, sigma=0.0, image_score="max"), tmp_path / "r", progress=False)
    with pytest.raises(CheckpointError) as e:
        train(tiny_cfg(tree, "stfpm", steps=4, sigma=4.0, image_score="topk"), tmp_path / "r",
              resume=True, progress=False)
    msg = str(e.value)
    assert "--sigma 0.0" in msg and "--image-score max" in msg and "'sigma': (4.0, 0.0)" in msg
    log = train(tiny_cfg(tree, "stfpm", steps=4, sigma=0.0, image_score="max"), tmp_path / "r",
                resume=True, progress=False)
    assert log["epochs"][-1]["step"] == 4


def test_resume_hint_names_objective_fields_and_settings_no_option_sets(tree, tmp_path):
    from dcamkd.train import _resume_diff, _resume_hint

    train(tiny_cfg(tree, "dcam", steps=1, lambda_kl=0.5), tmp_path / "d", progress=False)
    with pytest.raises(CheckpointError) as e:  # the objective, field by field; never '--preset custom'
        train(tiny_cfg(tree, "dcam", steps=2), tmp_path / "d", resume=True, progress=False)
    assert "pass --lambda-kl 0.5 (in a grid" in str(e.value) and "--preset" not in str(e.value)
    assert train(tiny_cfg(tree, "dcam", steps=2, lambda_kl=0.5), tmp_path / "d", resume=True,
                 progress=False)["epochs"][-1]["step"] == 2
    train(tiny_cfg(tree, "stfpm-kd", steps=1), tmp_path / "p", progress=False)
    with pytest.raises(CheckpointError, match=r"pass --preset stfpm-kd --dcam none"):  # made with a preset: named first
        train(tiny_cfg(tree, "dcam", steps=2), tmp_path / "p", resume=True, progress=False)
    # a setting the loss ignores (tau without a KL term) does not block a resume
    train(tiny_cfg(tree, "stfpm", steps=1), tmp_path / "s", progress=False)
    with pytest.warns(UserWarning, match="tau: has no effect"):
        cfg = tiny_cfg(tree, "stfpm", steps=2, tau=2.0)
    assert train(cfg, tmp_path / "s", resume=True, progress=False)["epochs"][-1]["step"] == 2
    # lists, flags and settings without an option
    a = tiny_cfg(tree, "stfpm").to_dict()
    b = {**a, "categories": ["alpha", "beta"], "deterministic": True, "val_fraction": 0.3, "grad_clip": None}
    a = {**a, "grad_clip": 1.0}
    hint = _resume_hint(_resume_diff(a, b))
    assert "--categories alpha,beta" in hint and "--deterministic" in hint
    assert "it was also made with" in hint and "val_fraction=0.3" in hint and "grad_clip=None" in hint
    assert _resume_hint(_resume_diff(a, a)) == ""


def test_resume_accepts_the_same_data_by_another_path_and_refuses_another_folder(tree, tmp_path, monkeypatch):
    import shutil

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    shutil.copytree(tree, here / "d")
    shutil.copytree(tree, elsewhere / "d")  # the same relative name, another folder
    monkeypatch.chdir(here)
    train(tiny_cfg("d", "stfpm", steps=2), tmp_path / "r", progress=False)  # trained as a relative path
    monkeypatch.chdir(elsewhere)
    with pytest.raises(CheckpointError, match="another configuration.*'data'"):
        train(tiny_cfg(elsewhere / "d", "stfpm", steps=4), tmp_path / "r", resume=True, progress=False)
    log = train(tiny_cfg(here / "d", "stfpm", steps=4), tmp_path / "r", resume=True, progress=False)
    assert log["epochs"][-1]["step"] == 4  # the folder it was trained on, spelled absolutely: resumed
    monkeypatch.chdir(here)
    log = train(tiny_cfg(Path("."), "stfpm", steps=6, data=Path("d")), tmp_path / "r", resume=True, progress=False)
    assert log["epochs"][-1]["step"] == 6  # and as a Path, stored as text
    assert load_checkpoint(tmp_path / "r" / "last.pt")["config"]["data"] == "d"


def test_checkpoints_with_settings_that_had_no_effect_still_load(tree, tmp_path):
    from dcamkd.checkpoint import model_from_checkpoint, save_checkpoint

    train(tiny_cfg(tree, "stfpm", steps=1), tmp_path / "r", progress=False)
    ck = load_checkpoint(tmp_path / "r" / "last.pt")
    ck["config"]["objective"]["mine_factor"] = 0.1  # written before such settings were refused
    ck["config"]["dcam"], ck["config"]["dcam_gate_floor"], ck["config"]["dcam_at_inference"] = "none", 0.2, "keep"
    save_checkpoint(ck, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded["config"]["objective"]["mine_factor"] is None
    assert (loaded["config"]["dcam_gate_floor"], loaded["config"]["dcam_at_inference"]) == (0.0, "drop")
    model_from_checkpoint(loaded)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(MissingFileError, match="no such file"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="truncated or not a torch file"):
        load_checkpoint(tmp_path / "trunc.pt")
    torch.save({"kind": "dcamkd-checkpoint", "format_version": 999, "config": {}}, tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match="format version 999"):
        load_checkpoint(tmp_path / "v.pt")


def test_cli_end_to_end(tree, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["train", "--data", str(tree), "--preset", "dcam", "--steps", "3", "--batch-size", "4",
               "--image-size", "64", "--out", str(out), "--quiet", "--teacher-weights", "none-random"])
    assert rc == 2  # not a file: clear error, no traceback
    err = capsys.readouterr().err
    assert err.startswith("dcamkd: error: --teacher-weights") and "Traceback" not in err

    cfg = tiny_cfg(tree, "dcam", steps=3)
    train(cfg, out, progress=False)
    res_path = tmp_path / "results.json"
    maps_dir = tmp_path / "maps"
    assert main(["test", "--checkpoint", str(out / "best.pt"), "--data", str(tree), "--out", str(res_path),
                 "--save-maps", str(maps_dir)]) == 0
    printed = capsys.readouterr().out
    assert "| alpha |" in printed and "**mean**" in printed
    res = json.loads(res_path.read_text())
    for k in ("image_auroc", "pixel_auroc", "aupro", "pro_dfr", "image_f1max"):
        assert k in res["mean"] and k in res["per_category"]["alpha"]
    npz = np.load(maps_dir / "alpha.npz")
    assert npz["maps"].shape == (6, 64, 64) and npz["masks"].dtype == bool
    assert npz["labels"].tolist().count(1) == 3
    # the maps are saved unblurred (for rescore); blurred and scored with the model's settings
    # they reproduce the scores and the reported metrics
    from dcamkd.metrics import image_auroc, pixel_auroc
    from dcamkd.scoring import gaussian_blur, image_scores

    model_scoring = json.loads(str(npz["model_scoring"]))
    assert model_scoring["sigma"] == cfg.sigma == 4.0 and model_scoring["image_score"] == "topk"
    assert json.loads(str(npz["scoring"])) == {**model_scoring, "sigma": 0.0}
    blurred = gaussian_blur(torch.from_numpy(npz["maps"]), model_scoring["sigma"])
    assert not np.allclose(blurred.numpy(), npz["maps"])  # the blur does something here
    np.testing.assert_allclose(image_scores(blurred, "topk", model_scoring["topk_fraction"]).numpy(), npz["scores"],
                               rtol=1e-6, atol=1e-7)
    assert image_auroc(npz["scores"], npz["labels"]) == pytest.approx(res["per_category"]["alpha"]["image_auroc"])
    assert pixel_auroc(blurred.numpy(), npz["masks"]) == pytest.approx(res["per_category"]["alpha"]["pixel_auroc"],
                                                                      abs=1e-9)
    from dcamkd.rescore import rescore

    again = rescore(maps_dir, [0.0, 4.0], [("topk", 0.01)])  # the files are accepted as unblurred
    assert again["per_category"]["alpha"]["sigma=4"]["pixel_auroc"] == pytest.approx(
        res["per_category"]["alpha"]["pixel_auroc"], abs=1e-9)

    pred = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(out / "best.pt"), str(tree / "alpha" / "test"), "--out", str(pred)]) == 0
    rows = list(csv.DictReader((pred / "predictions.csv").open()))
    assert len(rows) == 6 and all(float(r["score"]) >= 0 for r in rows)
    assert all((pred / r["heatmap"]).is_file() for r in rows)
    # the input tree is mirrored: test/good/000.png -> pred/good/000.png
    assert sorted(r["heatmap"] for r in rows) == [f"{d}/{i:03d}.png" for d in ("blob", "good") for i in range(3)]
    # result files get the usual permissions (not mkstemp's 0600)
    assert (res_path.stat().st_mode & 0o777) == 0o666 & ~_umask()
    # an existing run is not overwritten without --resume
    assert main(["train", "--data", str(tree), "--steps", "3", "--batch-size", "4", "--image-size", "64",
                 "--out", str(out), "--quiet"]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    # an unwritable --out is one line, exit 2
    (tmp_path / "afile").write_text("x")
    assert main(["test", "--checkpoint", str(out / "best.pt"), "--data", str(tree), "--out",
                 str(tmp_path / "afile" / "r.json")]) == 2
    err = capsys.readouterr().err  # (after the progress bar of the evaluation)
    assert err.strip().splitlines()[-1].startswith("dcamkd: error:") and "Traceback" not in err
    from PIL import Image

    pngs = sorted(pred.rglob("*.png"))
    assert len(pngs) == 6 and Image.open(pngs[0]).format == "PNG"
    assert main(["predict", "--checkpoint", str(out / "best.pt"), str(tmp_path / "nothing"), "--out", str(pred)]) == 2


def test_model_from_checkpoint_scores_like_training_model(tree, tmp_path):
    cfg = tiny_cfg(tree, "dcam", steps=2)
    tr = Trainer(cfg, tmp_path / "m", progress=False)
    tr.run()
    model, _ = model_from_checkpoint(tmp_path / "m" / "last.pt")
    x = torch.stack([tr.val_ds[0]["image"]])
    tr.student.eval()
    with torch.no_grad():
        maps, scores = model(x)
        from dcamkd.scoring import anomaly_map

        expected = anomaly_map(tr.teacher(x), tr.student(x), (64, 64), cfg.fusion, cfg.sigma)
    torch.testing.assert_close(maps, expected)


def test_ablation_runner_resumes_and_tabulates(tree, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "common: {image_size: 64, steps: 2, batch_size: 4, lr: 0.05, teacher_weights: null, kd_reduction: mean_c}\n"
        "seeds: [0]\n"
        "cells:\n"
        "  - {name: stfpm, preset: stfpm}\n"
        "  - {name: ch-ccd-skd, dcam: channel, cos: channel, kl: spatial, seeds: [0, 1]}\n"
    )
    out = tmp_path / "abl"
    assert main(["ablate", "--grid", str(grid), "--data", str(tree), "--out", str(out), "--quiet", "--max-runs", "2"]) == 0
    table = json.loads((out / "table.json").read_text())
    assert set(table["rows"]) == {"stfpm", "ch-ccd-skd"} and table["rows"]["ch-ccd-skd"]["seeds"] == ["seed0"]
    first = (out / "cells" / "stfpm" / "seed0" / "results.json").stat().st_mtime_ns
    assert main(["ablate", "--grid", str(grid), "--data", str(tree), "--out", str(out), "--quiet"]) == 0
    assert (out / "cells" / "stfpm" / "seed0" / "results.json").stat().st_mtime_ns == first  # skipped
    table = json.loads((out / "table.json").read_text())
    row = table["rows"]["ch-ccd-skd"]
    assert row["seeds"] == ["seed0", "seed1"] and row["std_image_auroc"] is not None
    vals = [json.loads((out / "cells" / "ch-ccd-skd" / f"seed{s}" / "results.json").read_text())["mean"]["aupro"]
            for s in (0, 1)]
    assert row["mean_aupro"] == pytest.approx(np.mean(vals))
    res = json.loads((out / "cells" / "ch-ccd-skd" / "seed1" / "results.json").read_text())
    assert res["config"]["objective"]["kd_reduction"] == "mean_c" and res["config"]["preset"] == "custom"
    # best.pt at the top level, last.pt under 'last' (same metrics, its own step), both tabulated
    assert res["last"]["checkpoint_step"] == 2 and set(res["last"]["mean"]) >= {"image_auroc", "aupro"}
    lasts_aupro = [json.loads((out / "cells" / "ch-ccd-skd" / f"seed{s}" / "results.json").read_text())
                   ["last"]["mean"]["aupro"] for s in (0, 1)]
    assert row["last_mean_aupro"] == pytest.approx(np.mean(lasts_aupro)) and row["last_seed_aupro"] == lasts_aupro
    assert row["seed_aupro"] == vals
    # each row records the scoring its runs were tested with (the presets' own here)
    from dcamkd.objective import PRESETS
    sc = PRESETS["stfpm"].scoring
    assert table["rows"]["stfpm"]["scoring"] == [{"fusion": sc.fusion, "sigma": sc.sigma,
                                                 "image_score": sc.image_score, "topk_fraction": sc.topk_fraction}]
    md = (out / "table.md").read_text()
    assert "| stfpm | 1 |" in md and "±" in md and "**last.pt**" in md
    # diagnostics: averaged over the seeds from results.json and log.json
    diag = row["diagnostics"]
    shares = [json.loads((out / "cells" / "ch-ccd-skd" / f"seed{s}" / "results.json").read_text())
              ["final_diagnostics"]["grad_share_kl"] for s in (0, 1)]
    assert diag["grad_share_kl"] == pytest.approx(np.mean(shares)) and 0 < diag["grad_share_kl"] < 1
    lasts = [json.loads((out / "cells" / "ch-ccd-skd" / f"seed{s}" / "log.json").read_text())["epochs"][-1]
             for s in (0, 1)]
    assert diag["val_gated"] == pytest.approx(np.mean([e["val_gated"] for e in lasts]))
    assert diag["cos_l3"] == pytest.approx(np.mean([e["cos_terms"][2] for e in lasts]))
    assert 0 <= diag["channel_gate_lt_0.05_l1"] <= 1 and "spatial_gate_lt_0.05_l1" not in diag
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "KL share of grad" in md and table["rows"]["stfpm"]["diagnostics"]["grad_share_kl"] in (None, 0.0)


def test_ablation_seeds_filter_and_lock(tree, tmp_path):
    import fcntl

    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "common: {image_size: 64, steps: 1, batch_size: 4, lr: 0.05, teacher_weights: null}\n"
        "seeds: [0, 1, 2]\n"
        "cells:\n"
        "  - {name: stfpm, preset: stfpm}\n"
    )
    out = tmp_path / "abl"
    # seed 1 is held by another runner: skipped, not trained twice
    held = out / "cells" / "stfpm" / "seed1"
    held.mkdir(parents=True)
    with open(held / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        assert main(["ablate", "--grid", str(grid), "--data", str(tree), "--out", str(out), "--quiet",
                     "--seeds", "1,2"]) == 0
    assert sorted(p.parent.name for p in out.glob("cells/stfpm/*/results.json")) == ["seed2"]
    assert main(["ablate", "--grid", str(grid), "--data", str(tree), "--out", str(out), "--quiet",
                 "--seeds", "x"]) == 2


def test_ablation_grid_errors(tmp_path):
    from dcamkd.ablate import load_grid

    with pytest.raises(MissingFileError):
        load_grid(tmp_path / "none.yaml")
    p = tmp_path / "g.yaml"
    p.write_text("cells:\n  - {name: a, dcam: attention}\n")
    with pytest.raises(InvalidArgumentError, match="grid cell 'a'.*dcam"):
        load_grid(p)
    p.write_text("cells:\n  - {name: a}\n  - {name: a}\n")
    with pytest.raises(InvalidArgumentError, match="used twice"):
        load_grid(p)


def test_compact_copy_keeps_evaluation_masks(tree, tmp_path):
    from dcamkd.ablate import make_compact_copy
    from dcamkd.data import load_mask, scan_category

    n, nbytes = make_compact_copy(tree, tmp_path / "c", size=32, quality=95)
    assert n == 2 * (6 + 3 + 3 + 3) and nbytes > 0
    _, test = scan_category(tmp_path / "c", "alpha")
    _, test0 = scan_category(tree, "alpha")
    m_new = [load_mask(s.mask_path) for s in test if s.mask_path]
    m_old = [load_mask(s.mask_path, 32) for s in test0 if s.mask_path]
    assert all(np.array_equal(a, b) for a, b in zip(m_new, m_old))


@pytest.mark.slow
@pytest.mark.skipif(REAL_DATA is None, reason="industrial3 not found (set DCAMKD_DATA to its folder)")
def test_real_data_smoke(tmp_path):
    """One short epoch on a few industrial3 images (subset copied as links), then scoring."""
    from dcamkd.data import list_categories

    root = tmp_path / "sub"
    for cat in list_categories(REAL_DATA):
        for sub in ("train/good", "test/good"):
            files = sorted((REAL_DATA / cat / sub).iterdir())[:4]
            (root / cat / sub).mkdir(parents=True)
            for f in files:
                (root / cat / sub / f.name).symlink_to(f)
        defect = sorted(d for d in (REAL_DATA / cat / "test").iterdir() if d.name != "good")[0]
        (root / cat / "test" / defect.name).mkdir(parents=True)
        (root / cat / "ground_truth" / defect.name).mkdir(parents=True)
        for f in sorted(defect.iterdir())[:2]:
            (root / cat / "test" / defect.name / f.name).symlink_to(f)
            m = REAL_DATA / cat / "ground_truth" / defect.name / f"{f.stem}_mask.png"
            (root / cat / "ground_truth" / defect.name / m.name).symlink_to(m)
    cfg = preset_config("dcam", data=str(root), image_size=128, steps=2, batch_size=4)
    log = train(cfg, tmp_path / "run", progress=False)
    assert np.isfinite(log["epochs"][-1]["loss"])
    assert main(["test", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--data", str(root),
                 "--out", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res["per_category"]) == {"bottle", "magnetic_tile", "metal_plate"}
    assert all(0 <= r["image_auroc"] <= 1 for r in res["per_category"].values())


@pytest.mark.slow
def test_demo_short_run(tmp_path, capsys):
    """A shortened `dcamkd demo`: offline, bundled photos, reaches image AUROC >= 0.9."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "100", "--quiet"]) == 0
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert res["mean"]["image_auroc"] >= 0.9, res["mean"]
    assert len(list((tmp_path / "demo" / "heatmaps").rglob("*.png"))) >= 3


@pytest.mark.parametrize("grid_name,cells", [("grid.yaml", "cells"), ("seeds.yaml", "seeds/cells")])
def test_committed_grids_reproduce_the_configurations_that_ran(grid_name, cells):
    # a grid file must keep its meaning when presets or defaults move (the ablation's results)
    from dcamkd.ablate import expand_grid, load_grid
    from dcamkd.objective import DEFAULT_EPS, OBJECTIVE_FIELDS, Objective, ScoringSettings

    res_dir = Path(__file__).resolve().parents[1] / "results" / "ablation"
    runs = expand_grid(load_grid(res_dir / grid_name), "DATA")
    checked = 0
    for name, seed, cfg in runs:
        path = res_dir / cells / name / f"seed{seed}" / "results.json"
        if not path.is_file():
            continue
        ran = json.loads(path.read_text())["config"]  # written before the objective was nested
        now = cfg.to_dict()
        now.update(now.pop("objective"))
        ran.setdefault("eps", DEFAULT_EPS)  # not a configuration key then: always the default
        # keys added after a run (scoring and decision settings) must hold the values that
        # reproduce what ran then: the defaults, and for the scoring the method's (no blur, maximum;
        # the presets' scoring moved later)
        then = {**TrainConfig().to_dict(), **ScoringSettings().to_dict()}
        added = {k for k in now if k not in ran and k in TrainConfig.__dataclass_fields__
                 and now[k] == then[k]}
        added |= {k for k in now if k not in ran and k in OBJECTIVE_FIELDS  # e.g. the mining fields
                  and now[k] == getattr(Objective(), k)}
        diff = {k: (ran.get(k), now[k]) for k in now
                if k not in ("data", "channels_last", "diagnostics") and k not in added and ran.get(k) != now[k]}
        assert not diff, f"{name} seed {seed}: {diff}"
        checked += 1
    assert checked == len(runs)


def test_resume_mid_ramp_continues_the_mining_ramp(tree, tmp_path, monkeypatch):
    # hard mining with a 4-step ramp: a run stopped after 2 steps and resumed selects, at steps 3
    # and 4, the same locations with the same ramp level as the uninterrupted run
    import dcamkd.ops.pyramid_loss as P
    import dcamkd.train as T

    seen, orig_w, orig_p = [], P._row_weights, T.Trainer.mining_progress

    def weights(*args):
        ws = orig_w(*args)
        seen[-1][1].extend(w.clone() for w in ws)
        return ws

    def progress(self):
        p = orig_p(self)
        seen.append((float(p), []))
        return p

    monkeypatch.setattr(P, "_row_weights", weights)
    monkeypatch.setattr(T.Trainer, "mining_progress", progress)
    kw = dict(cos="global", kl="none", mine="quantile", mine_final=0.5, mine_ramp_steps=4, diagnostics=False)
    train(tiny_cfg(tree, "stfpm", steps=4, **kw), tmp_path / "full", progress=False)
    full, seen[:] = list(seen), []
    train(tiny_cfg(tree, "stfpm", steps=2, **kw), tmp_path / "part", progress=False)
    assert load_checkpoint(tmp_path / "part" / "last.pt")["mine_progress"] == 0.5
    train(tiny_cfg(tree, "stfpm", steps=4, **kw), tmp_path / "part", resume=True, progress=False)
    assert [p for p, _ in full] == [0.0, 0.25, 0.5, 0.75]
    assert [p for p, _ in seen] == [0.0, 0.25, 0.5, 0.75]
    for (_, wa), (_, wb) in zip(full, seen):
        assert len(wa) == len(wb) == 3  # one selection per level and step
        for x, y in zip(wa, wb):
            assert torch.equal(x, y)
    assert any((w < 1).any() for _, ws in full[2:] for w in ws)  # the ramp mined something
    a = load_checkpoint(tmp_path / "full" / "last.pt")["student"]
    b = load_checkpoint(tmp_path / "part" / "last.pt")["student"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
