"""The objective settings object (dcamkd.objective): one validation, one set of presets and
defaults, shared by the losses, the training configuration, the trainer and the command line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from dcamkd import reference as R
from dcamkd.config import DCAM_AT_INFERENCE, TrainConfig, preset_config
from dcamkd.dcam import DCAM_VARIANTS
from dcamkd.errors import InvalidArgumentError
from dcamkd.losses import ChannelCDLoss, ChannelKDLoss, DistillationLoss, SpatialCDLoss, SpatialKDLoss
from dcamkd.objective import (
    COS_MODES,
    DEFAULT_EPS,
    DEFAULT_PRESET,
    KD_REDUCTIONS,
    KL_MODES,
    OBJECTIVE_FIELDS,
    PRESETS,
    Objective,
    Preset,
    get_preset,
)

RESULTS = Path(__file__).resolve().parents[1] / "results" / "ablation"


def _pyr(seed, shapes=((2, 3, 4, 5), (2, 4, 3, 3)), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype) for s in shapes]


def test_one_default_everywhere():
    o = Objective()
    assert o == PRESETS[DEFAULT_PRESET].objective == TrainConfig().objective
    assert DistillationLoss().objective == o
    assert TrainConfig().dcam == PRESETS[DEFAULT_PRESET].dcam and TrainConfig().preset == DEFAULT_PRESET
    # the recommended objective (README ablation), not the paper's literal one
    assert (o.cos, o.kl, o.tau, o.kd_reduction, o.lambda_cos, o.lambda_kl, o.eps, o.level_weights) == (
        "channel", "spatial", 1.0, "mean_c", 1.0, 0.1, 1e-8, None)
    # the reference spec uses the same allowed values and eps (imported, not copied)
    assert (R.COS_MODES, R.KL_MODES, R.KD_REDUCTIONS, R.DEFAULT_EPS) == (COS_MODES, KL_MODES, KD_REDUCTIONS, DEFAULT_EPS)
    assert R.COS_MODES is COS_MODES and R.KD_REDUCTIONS is KD_REDUCTIONS


def test_presets_values_and_variants():
    assert list(PRESETS) == ["stfpm", "dcam-paper", "dcam", "stfpm-kd"]
    assert PRESETS["stfpm-kd"].objective == PRESETS["dcam"].objective and PRESETS["stfpm-kd"].dcam == "none"
    assert PRESETS["stfpm"].dcam == "none"
    assert (PRESETS["stfpm"].objective.cos, PRESETS["stfpm"].objective.kl) == ("channel", "none")
    paper = PRESETS["dcam-paper"]
    assert paper.dcam == "channel" and paper.objective == Objective(
        cos="channel", kl="spatial", tau=1.0, kd_reduction="sum_c", lambda_cos=1.0, lambda_kl=1.0)
    assert all(p.dcam in DCAM_VARIANTS for p in PRESETS.values())
    with pytest.raises(InvalidArgumentError, match=r"^dcam: expected one of \['none', 'channel', 'spatial', 'cbam'\]"):
        Preset(Objective(), dcam="attention")
    with pytest.raises(TypeError):
        PRESETS["mine"] = PRESETS["dcam"]  # read-only
    with pytest.raises(InvalidArgumentError, match=r"^preset: expected one of \['stfpm', 'dcam-paper', 'dcam', 'stfpm-kd'\], got 'stpfm'$"):
        get_preset("stpfm")


@pytest.mark.parametrize("field, value, match", [
    ("cos", "cosine", r"^cos: expected one of \['channel', 'spatial', 'global', 'none'\], got 'cosine'$"),
    ("kl", "kld", r"^kl: expected one of"),
    ("kd_reduction", "sum", r"^kd_reduction: expected one of \['sum_c', 'mean_c'\]"),
    ("tau", 0.0, r"^tau: expected a finite number > 0, got 0.0$"),
    ("tau", float("inf"), r"^tau: expected a finite number > 0"),
    ("tau", "1", r"^tau: expected a finite number > 0, got '1'$"),
    ("tau", True, r"^tau: expected"),
    ("lambda_cos", -1, r"^lambda_cos: expected a finite number >= 0"),
    ("lambda_kl", float("nan"), r"^lambda_kl: expected a finite number >= 0, got nan$"),
    ("eps", 0, r"^eps: expected a finite number > 0"),
    ("level_weights", [1.0, -2.0], r"^level_weights: expected finite numbers >= 0, got \[1.0, -2.0\]$"),
    ("level_weights", [], r"^level_weights: expected at least one weight"),
    ("level_weights", 3.0, r"^level_weights: expected a sequence"),
])
def test_validation_names_the_field_in_one_line(field, value, match):
    with pytest.raises(InvalidArgumentError, match=match) as ei:
        Objective(**{field: value})
    assert "\n" not in str(ei.value)
    # the same rule, reached through every entry point
    for make in (lambda: DistillationLoss(**{field: value}), lambda: Objective().replace(**{field: value}),
                 lambda: preset_config("dcam", **{field: value}),
                 lambda: TrainConfig.from_dict({"objective": {field: value}})):
        with pytest.raises(InvalidArgumentError, match=f"^{field}: expected"):
            make()


def test_no_loss_and_unknown_fields():
    with pytest.raises(InvalidArgumentError, match="no loss at all"):
        Objective(cos="none", kl="none")
    with pytest.raises(InvalidArgumentError, match=r"unknown keys \['temperature'\]"):
        DistillationLoss(temperature=2.0)
    with pytest.raises(InvalidArgumentError, match="objective: expected a dcamkd.objective.Objective"):
        DistillationLoss("channel")  # the old positional form
    with pytest.raises(InvalidArgumentError, match="objective: expected a dcamkd.objective.Objective"):
        dataclasses.replace(TrainConfig(), objective={"tau": 2.0}).validate()


def test_frozen_normalised_and_round_trips():
    o = Objective(tau=2, lambda_kl=1, level_weights=[1, 2, 0.5])
    assert o.tau == 2.0 and isinstance(o.tau, float) and o.level_weights == (1.0, 2.0, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.tau = 3.0
    assert hash(o) == hash(Objective(tau=2.0, lambda_kl=1.0, level_weights=(1, 2, 0.5)))
    d = o.to_dict()
    assert list(d) == list(OBJECTIVE_FIELDS) and d["level_weights"] == [1.0, 2.0, 0.5]
    assert Objective.from_dict(json.loads(json.dumps(d))) == o
    cfg = preset_config("dcam-paper", tau=2.0, level_weights=[1, 1, 2], image_size=64)
    cd = cfg.to_dict()
    assert cd["objective"]["tau"] == 2.0 and "tau" not in cd
    assert TrainConfig.from_dict(cd) == cfg
    assert TrainConfig.from_dict(json.loads(json.dumps(cd))) == cfg


def test_flat_configs_of_committed_results_still_read():
    # configurations written before the objective was nested (flat keys) keep their meaning
    ran = json.loads((RESULTS / "cells" / "ch-ccd-skd-tau4" / "seed0" / "results.json").read_text())["config"]
    assert "tau" in ran and "objective" not in ran
    cfg = TrainConfig.from_dict(ran)
    assert cfg.objective == Objective(cos="channel", kl="spatial", tau=4.0, kd_reduction="mean_c",
                                      lambda_cos=1.0, lambda_kl=1.0)
    # flat keys apply on top of a nested objective
    both = TrainConfig.from_dict({"objective": {"kl": "channel"}, "tau": 3.0})
    assert (both.objective.kl, both.objective.tau) == ("channel", 3.0)


def test_same_loss_ignores_fields_the_loss_does_not_read():
    stfpm = PRESETS["stfpm"].objective
    assert stfpm.same_loss(stfpm.replace(tau=4.0, lambda_kl=1.0, kd_reduction="sum_c"))
    assert stfpm != stfpm.replace(tau=4.0)
    assert not stfpm.same_loss(stfpm.replace(level_weights=[1, 1, 2]))
    ckd = Objective(kl="channel")
    assert ckd.same_loss(ckd.replace(kd_reduction="sum_c")) and not Objective().same_loss(Objective(kd_reduction="sum_c"))
    kl_only = Objective(cos="none", kl="spatial")
    assert kl_only.same_loss(kl_only.replace(lambda_cos=5.0, eps=1e-3))
    # preset labels follow it
    with pytest.warns(UserWarning, match="has no effect with kl 'none'"):
        assert preset_config("stfpm", tau=2.0, lambda_kl=1.0).preset == "stfpm"
    assert preset_config("dcam", lambda_kl=0.5).preset == "custom"
    assert preset_config("dcam", dcam="spatial").preset == "custom"
    assert preset_config("dcam-paper", lambda_kl=1.0).preset == "dcam-paper"


def test_loss_constructors_agree_and_last_terms_are_unweighted():
    t, s = _pyr(1), _pyr(2)
    o = Objective(cos="spatial", kl="spatial", tau=1.7, kd_reduction="sum_c", lambda_cos=0.5, lambda_kl=3.0,
                  level_weights=(2.0, 5.0))
    terms = R.pyramid_terms(t, s, cos="spatial", kl="spatial", tau=1.7, kd_reduction="sum_c")
    expected = 2.0 * (0.5 * terms[0, 0] + 3.0 * terms[0, 1]) + 5.0 * (0.5 * terms[1, 0] + 3.0 * terms[1, 1])
    for fn in (DistillationLoss(o), DistillationLoss(**o.to_dict()),
               DistillationLoss(Objective(), **o.to_dict()),
               DistillationLoss.from_preset("dcam-paper", cos="spatial", tau=1.7, lambda_cos=0.5, lambda_kl=3.0,
                                            level_weights=[2, 5])):
        assert fn.objective == o
        torch.testing.assert_close(fn(t, s), expected, rtol=1e-10, atol=0)
        # before lambda_cos / lambda_kl and the level weights
        torch.testing.assert_close(fn.last_terms, terms, rtol=1e-10, atol=0)
    paper = DistillationLoss.from_preset("dcam-paper")
    terms = R.pyramid_terms(t, s, cos="channel", kl="spatial", tau=1.0, kd_reduction="sum_c")
    torch.testing.assert_close(paper(t, s), terms.sum(), rtol=1e-10, atol=0)


def test_single_term_losses_fix_their_modes():
    t, s = _pyr(3), _pyr(4)
    for cls, cos, kl in ((ChannelCDLoss, "channel", "none"), (SpatialCDLoss, "spatial", "none"),
                         (SpatialKDLoss, "none", "spatial"), (ChannelKDLoss, "none", "channel")):
        fn = cls()
        assert (fn.objective.cos, fn.objective.kl) == (cos, kl)
        col = 0 if cos != "none" else 1
        ref = R.pyramid_terms(t, s, cos=cos, kl=kl, kd_reduction=Objective().kd_reduction)[:, col].sum()
        torch.testing.assert_close(fn(t, s), ref, rtol=1e-10, atol=0)
        with pytest.raises(InvalidArgumentError, match=f"^kl: fixed by {cls.__name__}"):
            cls(kl="channel")
    assert SpatialKDLoss(tau=2.0, kd_reduction="sum_c").objective.tau == 2.0


def _actions(parser, command):
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {a.dest: a for a in sub._actions}


def test_cli_choices_and_defaults_come_from_the_definitions():
    from dcamkd.cli import build_parser
    from dcamkd.export import EXPORT_FORMATS
    from dcamkd.models import BACKBONES
    from dcamkd.scoring import FUSIONS

    p = build_parser()
    train = _actions(p, "train")
    cfg0 = TrainConfig()
    same = {"preset": PRESETS, "backbone": BACKBONES, "fusion": FUSIONS, "dcam": DCAM_VARIANTS,
            "cos": COS_MODES, "kl": KL_MODES, "kd_reduction": KD_REDUCTIONS, "dcam_at_inference": DCAM_AT_INFERENCE}
    for dest, const in same.items():
        assert train[dest].choices is const, dest
    assert _actions(p, "test")["fusion"].choices is FUSIONS
    assert _actions(p, "demo")["preset"].choices is PRESETS
    assert _actions(p, "export")["format"].choices is EXPORT_FORMATS
    assert _actions(p, "export")["fusion"].choices is FUSIONS
    for dest in ("preset", "backbone", "image_size", "seed", "device"):
        assert train[dest].default == getattr(cfg0, dest), dest
    for dest in ("epochs", "batch_size", "lr", "momentum", "weight_decay"):
        assert f"(default {getattr(cfg0, dest)})" in train[dest].help, dest
    # every setting has its option, as dcamkd.config says (the resume hint relies on it)
    import argparse

    from dcamkd.config import TRAIN_FLAGS, TRAIN_NEGATED_FLAGS, TRAIN_OPTIONLESS
    settings = set(TrainConfig().to_dict()) | set(OBJECTIVE_FIELDS)
    for name in settings - set(TRAIN_OPTIONLESS):
        flag = TRAIN_NEGATED_FLAGS.get(name, f"--{name.replace('_', '-')}")
        action = next((a for a in train.values() if flag in a.option_strings), None)
        assert action is not None, flag
        assert isinstance(action, argparse._StoreTrueAction) == (name in TRAIN_FLAGS or name in TRAIN_NEGATED_FLAGS), flag
    for name in TRAIN_OPTIONLESS:
        assert name in settings and f"--{name.replace('_', '-')}" not in {o for a in train.values() for o in a.option_strings}
    # objective flags default to None: the preset decides
    for dest in OBJECTIVE_FIELDS:
        if dest in train:
            assert train[dest].default is None, dest


def test_cli_flags_reach_the_objective(tmp_path):
    from dcamkd.cli import _train_config, build_parser

    a = build_parser().parse_args(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                                   "--preset", "dcam-paper", "--tau", "2", "--level-weights", "1,2,3",
                                   "--kd-reduction", "mean_c"])
    cfg = _train_config(a)
    assert cfg.objective == PRESETS["dcam-paper"].objective.replace(tau=2.0, level_weights=(1, 2, 3),
                                                                    kd_reduction="mean_c")
    assert cfg.preset == "custom" and cfg.dcam == "channel"


def test_trainer_trains_the_configured_objective(make_tree, tmp_path):
    from dcamkd.train import Trainer

    root = make_tree(categories=("alpha",), n_train=4, n_test_good=1, n_defect=1, size=32)
    cfg = preset_config("dcam-paper", data=str(root), image_size=32,
                        batch_size=2, steps=1, tau=3.0, level_weights=[1, 2, 3])
    tr = Trainer(cfg, tmp_path / "o", progress=False)
    assert tr.loss_fn.objective is cfg.objective
    assert tr.log["config"]["objective"]["tau"] == 3.0


def test_settings_layer_and_parser_do_not_load_torch():
    # the objective, the configuration and the parser's choices sit below torch in the layers
    import subprocess
    import sys

    code = ("import sys\n"
            "from dcamkd.cli import build_parser\n"
            "from dcamkd.config import preset_config\n"
            "build_parser().parse_args(['train', '--data', 'd', '--out', 'o', '--tau', '2'])\n"
            "preset_config('dcam-paper', tau=2.0).to_dict()\n"
            "print(sorted(m for m in ('torch', 'timm', 'numpy') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=str(Path(__file__).resolve().parents[1]))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


def test_settings_a_choice_ignores_are_refused_not_silently_dropped():
    from dcamkd.config import preset_config

    for name, value in (("mine_factor", 0.1), ("mine_start", 0.0), ("mine_final", 0.9), ("mine_ramp_steps", 10)):
        with pytest.raises(InvalidArgumentError, match=rf"^{name}: has no effect with mine 'none'"):
            Objective(**{name: value})
    assert Objective(mine="quantile", mine_factor=0.1).mining()["factor"] == 0.1
    with pytest.raises(InvalidArgumentError, match=r"^dcam_gate_floor: expected 0 with dcam 'none'"):
        preset_config("dcam", dcam="none", dcam_gate_floor=0.1).validate()
    with pytest.raises(InvalidArgumentError, match=r"^dcam_at_inference: expected 'drop' with dcam 'none'"):
        preset_config("dcam", dcam="none", dcam_at_inference="keep").validate()
    assert preset_config("dcam", dcam_gate_floor=0.1, dcam_at_inference="keep").validate().dcam_gate_floor == 0.1


def test_settings_a_choice_ignores_draw_a_warning_when_given():
    """Given explicitly where another setting makes them inert, tau, lambda_kl, kd_reduction
    (kl 'none'), topk_fraction (image score 'max'), dcam_reduction and dcam_kernel (dcam 'none')
    warn, once each, naming the setting; the defaults a preset carries do not."""
    import warnings

    from dcamkd.config import preset_config

    cases = ((dict(tau=2.0), "tau: has no effect with kl 'none'"),
             (dict(lambda_kl=0.5), "lambda_kl: has no effect with kl 'none'"),
             (dict(kd_reduction="sum_c"), "kd_reduction: has no effect with kl 'none'"),
             (dict(image_score="max", topk_fraction=0.05), "topk_fraction: has no effect with image_score 'max'"),
             (dict(dcam_kernel=5), "dcam_kernel: has no effect with dcam 'none'"),
             (dict(dcam_reduction=4), "dcam_reduction: has no effect with dcam 'none'"))
    for kw, msg in cases:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            preset_config("stfpm", data="x", **kw)
        assert [str(w.message) for w in caught] == [msg + " (ignored)"], kw
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for preset in ("stfpm", "dcam", "dcam-paper"):
            preset_config(preset, data="x")
        preset_config("dcam", data="x", tau=2.0, lambda_kl=0.5, dcam_kernel=5, topk_fraction=0.05)
        preset_config("dcam", data="x", dcam="none")
