"""Compute precision (``--precision fp32 | bf16``) and compilation (``--compile``): what is cast,
that bfloat16 maps and losses stay close to float32, and that the settings travel through the
configuration, the checkpoint, the command line and the Detector."""

import copy
import json
import warnings

import pytest
import torch

from conftest import tiny_cfg
from dcamkd.checkpoint import load_checkpoint, model_from_checkpoint
from dcamkd.cli import main
from dcamkd.config import DEFAULT_PRECISION, PRECISIONS, TrainConfig, preset_config
from dcamkd.errors import InvalidArgumentError
from dcamkd.models import build_student, build_teacher
from dcamkd.precision import PRECISION_DTYPES, autocast, compile_module, to_precision
from dcamkd.scoring import AnomalyModel
from dcamkd.train import Trainer, train


def _close_pair(seed):
    """A teacher and a student near it (weights perturbed by 5 % of their spread), so the map
    is small and structured, as for a trained student."""
    torch.manual_seed(seed)
    t = build_teacher("tf_efficientnet_lite0", weights=None)
    s = copy.deepcopy(t)
    with torch.no_grad():
        for p in s.parameters():
            if p.numel() > 1:
                p.add_(0.05 * p.std() * torch.randn_like(p))
    return t, s.eval()


def test_precision_table_and_validation():
    assert PRECISIONS == ("fp32", "bf16") and DEFAULT_PRECISION == "fp32"
    assert PRECISION_DTYPES == {"fp32": torch.float32, "bf16": torch.bfloat16}
    assert TrainConfig().precision == "fp32" and TrainConfig().compile is False
    with pytest.raises(InvalidArgumentError, match="precision: expected one of"):
        preset_config("dcam", precision="fp16")
    with pytest.raises(InvalidArgumentError, match="compile"):
        preset_config("dcam", compile="yes")
    # configurations written before the setting existed read as float32, eager
    d = TrainConfig().to_dict()
    del d["precision"], d["compile"]
    assert TrainConfig.from_dict(d).precision == "fp32" and not TrainConfig.from_dict(d).compile
    with pytest.raises(InvalidArgumentError, match="precision"):
        autocast("half", "cpu")


def test_to_precision_casts_only_for_bf16():
    x64 = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    x32 = torch.randn(2, 3, 4, 5)
    assert to_precision([x64], "fp32")[0] is x64  # fp32 leaves every dtype alone
    a, b = to_precision([x32, x32.bfloat16()], "bf16")
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), x32, rtol=2 ** -8, atol=0)  # bfloat16 keeps 8 mantissa bits
    # the backbone under autocast: convolutions in bfloat16, the levels leave in bfloat16
    s = build_student("tf_efficientnet_lite0").eval()
    with torch.no_grad(), autocast("bf16", "cpu"):
        levels = s(torch.randn(1, 3, 64, 64))
    assert [f.dtype for f in levels] == [torch.bfloat16] * 3
    assert all(p.dtype == torch.float32 for p in s.parameters())  # weights are not cast


@pytest.mark.parametrize("seed,shape", [(0, (2, 3, 64, 96)), (1, (1, 3, 80, 48))])
def test_bf16_maps_are_close_to_fp32(seed, shape):
    t, s = _close_pair(seed)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 10))
    for cl in (False, True):
        model = AnomalyModel(copy.deepcopy(t), copy.deepcopy(s), sigma=1.0).eval()
        if cl:
            model.teacher.to(memory_format=torch.channels_last)
            model.student.to(memory_format=torch.channels_last)
        with torch.no_grad():
            m32, s32 = model(x)
            model.precision = "bf16"
            m16, s16 = model(x)
        assert m16.dtype == s16.dtype == torch.float32 and m16.shape == m32.shape == shape[:1] + shape[2:]
        # measured: relative L2 error about 0.02, correlation 0.996
        assert ((m16 - m32).norm() / m32.norm()).item() < 0.06
        corr = torch.corrcoef(torch.stack([m16.flatten(), m32.flatten()]))[0, 1].item()
        assert corr > 0.98
        torch.testing.assert_close(s16, s32, rtol=0.05, atol=0)
        assert not torch.equal(m16, m32)  # bf16 really ran


@pytest.mark.parametrize("preset", ["dcam", "stfpm"])
def test_bf16_training_step_is_close_to_fp32_and_keeps_float32_weights(tree, tmp_path, preset):
    logs, trainers = {}, {}
    for prec in PRECISIONS:
        tr = Trainer(tiny_cfg(tree, preset, steps=1, precision=prec), tmp_path / prec, progress=False)
        logs[prec] = tr.run()
        trainers[prec] = tr
    # the cached teacher levels are stored in the precision's dtype
    assert trainers["bf16"]._train_feats.levels[0].dtype == torch.bfloat16
    assert trainers["fp32"]._train_feats.levels[0].dtype == torch.float32
    a, b = logs["fp32"]["epochs"][0], logs["bf16"]["epochs"][0]
    assert b["loss"] == pytest.approx(a["loss"], rel=0.02) and b["loss"] != a["loss"]
    assert b["val_score"] == pytest.approx(a["val_score"], rel=0.05)
    ck = load_checkpoint(tmp_path / "bf16" / "last.pt")
    assert ck["config"]["precision"] == "bf16"
    assert all(v.dtype == torch.float32 for v in ck["student"].values() if v.is_floating_point())
    assert all(v.dtype == torch.float32 for v in ck["teacher"].values() if v.is_floating_point())
    # the two runs' students differ by one step's rounding only
    sa, sb = load_checkpoint(tmp_path / "fp32" / "last.pt")["student"], ck["student"]
    diff = sum((sa[k] - sb[k]).norm() ** 2 for k in sa if sa[k].is_floating_point()) ** 0.5
    ref = sum(sa[k].norm() ** 2 for k in sa if sa[k].is_floating_point()) ** 0.5
    assert 0 < diff / ref < 1e-2


def test_precision_round_trips_through_checkpoint_cli_and_detector(tree, tmp_path, capsys):
    from dcamkd import Detector

    out = tmp_path / "run"
    assert main(["train", "--data", str(tree), "--steps", "2", "--batch-size", "4", "--image-size", "64",
                 "--out", str(out), "--quiet", "--precision", "bf16", "--seed", "0"]) == 0
    ck = load_checkpoint(out / "best.pt")
    assert ck["config"]["precision"] == "bf16" and ck["config"]["compile"] is False
    model, cfg = model_from_checkpoint(ck)
    assert cfg.precision == model.precision == "bf16"  # the checkpoint's precision by default
    assert model_from_checkpoint(ck, precision="fp32")[0].precision == "fp32"
    # dcamkd test: the checkpoint's precision, or --precision
    res = {}
    for flag in (None, "fp32", "bf16"):
        path = tmp_path / f"res_{flag}.json"
        argv = ["test", "--checkpoint", str(out / "best.pt"), "--data", str(tree), "--out", str(path)]
        assert main(argv + (["--precision", flag] if flag else [])) == 0
        res[flag] = json.loads(path.read_text())
    assert [res[f]["precision"] for f in (None, "fp32", "bf16")] == ["bf16", "fp32", "bf16"]
    assert res[None]["mean"] == res["bf16"]["mean"]
    for k in ("image_auroc", "pixel_auroc"):
        assert res["fp32"]["mean"][k] == pytest.approx(res["bf16"]["mean"][k], abs=0.1)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["test", "--checkpoint", str(out / "best.pt"), "--data", str(tree), "--out", str(tmp_path / "x.json"),
              "--precision", "fp16"])
    assert "--precision: invalid choice" in capsys.readouterr().err
    # predict and calibrate take it too
    assert main(["predict", "--checkpoint", str(out / "best.pt"), str(tree / "alpha" / "test"), "--out",
                 str(tmp_path / "pred"), "--no-heatmaps", "--precision", "fp32"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # recalibrating in another precision does not warn
        assert main(["calibrate", "--checkpoint", str(out / "best.pt"), "--out", str(tmp_path / "cal.pt"),
                     "--precision", "fp32"]) == 0
    # a calibration records its precision; inference defaults to it and warns on another one
    assert ck["calibration"]["precision"] == "bf16"
    cal32 = load_checkpoint(tmp_path / "cal.pt")
    assert cal32["calibration"]["precision"] == "fp32" and cal32["config"]["precision"] == "bf16"
    assert model_from_checkpoint(cal32)[0].precision == "fp32"
    with pytest.warns(UserWarning, match="calibrated in fp32 and scoring runs in bf16"):
        model_from_checkpoint(cal32, precision="bf16")
    # the Detector: a float32 run scored in bfloat16 and the other way round
    det = Detector.from_checkpoint(out / "best.pt", precision="fp32")
    assert det.model.precision == "fp32"
    p32 = det.predict(str(tree / "alpha" / "test" / "good" / "000.png"))
    det.model.precision = "bf16"
    p16 = det.predict(str(tree / "alpha" / "test" / "good" / "000.png"))
    assert p16.anomaly_map.dtype == "float32" and p16.score == pytest.approx(p32.score, rel=0.05)
    with pytest.raises(InvalidArgumentError, match="precision"):
        Detector.from_checkpoint(out / "best.pt", precision="fp16")


def test_compile_in_place_keeps_the_state_dict_keys():
    s = build_student("tf_efficientnet_lite0")
    keys = list(s.state_dict())
    assert compile_module(s) is s
    assert list(s.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    s2 = build_student("tf_efficientnet_lite0")
    s2.load_state_dict(s.state_dict())  # loads into an uncompiled module


@pytest.mark.slow
def test_compiled_training_and_inference_match_eager(tree, tmp_path):
    # minutes on one thread: inductor compiles the student's forward and backward (train mode),
    # its eval forward (validation), then teacher and student for inference. With diagnostics,
    # whose retained-graph backward runs the student eagerly
    logs = {}
    for comp in (False, True):
        logs[comp] = train(tiny_cfg(tree, "dcam", steps=2, compile=comp), tmp_path / str(comp), progress=False)
    assert "diagnostics" in logs[True]["epochs"][-1]
    assert logs[True]["compile"]["compile_seconds"] > 0 and "compile" not in logs[False]
    a = load_checkpoint(tmp_path / "False" / "last.pt")
    b = load_checkpoint(tmp_path / "True" / "last.pt")
    assert b["config"]["compile"] is True and list(a["student"]) == list(b["student"])
    # float reassociation only: the same loss (checked to 1e-5 below); relative weight difference
    # over the student: below 1e-4 with one thread, 2e-4 measured with two (the compiled kernels
    # split reductions over the threads in another order)
    sa, sb = a["student"], b["student"]
    ks = [k for k in sa if sa[k].is_floating_point()]
    diff = sum((sa[k] - sb[k]).norm() ** 2 for k in ks) ** 0.5 / sum(sa[k].norm() ** 2 for k in ks) ** 0.5
    print("relative student difference, compiled vs eager:", diff.item())
    assert diff < 1e-3
    assert logs[True]["epochs"][-1]["loss"] == pytest.approx(logs[False]["epochs"][-1]["loss"], rel=1e-5)
    m_eager, _ = model_from_checkpoint(a)
    m_comp, _ = model_from_checkpoint(a, compile=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(m_comp(x)[0], m_eager(x)[0], rtol=1e-4, atol=1e-5)


def test_depthwise_convolutions_train_in_float32_under_cpu_bf16():
    from dcamkd.precision import float32_depthwise_when_training

    s = build_student("tf_efficientnet_lite0")
    dw = [m for m in s.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
    assert len(dw) == 11 and float32_depthwise_when_training(s) == 11  # every block's; idempotent
    assert {type(m).__name__ for m in dw} == {"Conv2d", "Conv2dSame"}  # repr and isinstance unchanged
    assert list(build_student("tf_efficientnet_lite0").state_dict()) == list(s.state_dict())
    conv = dw[1]  # a strided tf-"same" one
    x = torch.randn(2, conv.in_channels, 9, 11)
    eager = conv(x)
    with autocast("bf16", "cpu"):
        y = conv(x)  # trainable, gradients on: float32, bit for bit the float32 convolution
        assert y.dtype == torch.float32 and torch.equal(y, eager)
        with torch.no_grad():
            assert conv(x).dtype == torch.bfloat16  # validation / inference
        conv.weight.requires_grad_(False)
        assert conv(x).dtype == torch.bfloat16  # frozen (teacher)
        conv.weight.requires_grad_(True)
    # a copy keeps the rule and uses its own weights
    c2 = copy.deepcopy(conv)
    with torch.no_grad():
        c2.weight.zero_()
    with autocast("bf16", "cpu"):
        assert c2(x).abs().max().item() == 0 and torch.equal(conv(x), eager)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_non_finite_features_are_named_in_either_precision(precision):
    from dcamkd.errors import NonFiniteError
    from dcamkd.scoring import anomaly_map

    g = torch.Generator().manual_seed(5)
    shapes = [(3, 4, 6, 5), (3, 6, 3, 3)]
    t = [torch.randn(*s, generator=g).to(PRECISION_DTYPES[precision]) for s in shapes]
    s = [torch.randn(*s, generator=g).to(PRECISION_DTYPES[precision]) for s in shapes]
    assert torch.isfinite(anomaly_map(t, s, (12, 10))).all()
    s[1][2, 5, 0, 2] = float("inf")
    t[0][0, 1, 1, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"teacher level 0, student level 1 contain NaN or Inf for batch "
                                             r"images \[0, 2\]") as e:
        anomaly_map(t, s, (12, 10))
    assert e.value.batch_indices == [0, 2]
