"""ONNX export of the inference model: onnxruntime output against eager PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from dcamkd.cli import main  # noqa: E402
from dcamkd.config import TrainConfig  # noqa: E402
from dcamkd.errors import CheckpointError, InvalidArgumentError  # noqa: E402
from dcamkd.export import export_onnx  # noqa: E402
from dcamkd.models import backbone_spec  # noqa: E402
from dcamkd.checkpoint import CHECKPOINT_FORMAT, model_from_checkpoint  # noqa: E402
from dcamkd.checkpoint import build_networks as _build_networks  # noqa: E402

S = 64


def _checkpoint(fusion: str, sigma: float, dcam_at_inference: str = "drop", seed: int = 0) -> dict:
    """A checkpoint dict of random resnet18 teacher/student/DCAM weights (no training needed)."""
    torch.manual_seed(seed)
    cfg = TrainConfig(backbone="resnet18", teacher_weights=None, image_size=S, dcam="channel",
                      dcam_at_inference=dcam_at_inference, fusion=fusion, sigma=sigma, image_score="max")
    t, s, d = _build_networks(cfg)
    # non-trivial BN running statistics, so eval-mode normalisation is exercised
    for m in s.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.8, 1.2)
    spec = backbone_spec("resnet18")
    return {"kind": "dcamkd-checkpoint", "format_version": CHECKPOINT_FORMAT, "config": cfg.to_dict(),
            "image_size": S, "mean": list(spec.mean), "std": list(spec.std), "teacher": t.state_dict(),
            "student": s.state_dict(), "dcam": d.state_dict(), "step": 0, "epoch": 0, "best_val": 0.0}


def _run(path, x: torch.Tensor):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["maps", "scores"], {"images": x.numpy()})


@pytest.mark.parametrize("fusion,keep", [("sum", "drop"), ("product", "keep")])
def test_dynamic_batch_matches_eager(tmp_path, fusion, keep):
    ck = _checkpoint(fusion, sigma=2.0, dcam_at_inference=keep)
    path = export_onnx(ck, tmp_path / "m.onnx", dynamic_batch=True)
    eager, _ = model_from_checkpoint(ck)  # the default implementation (the fused CPU kernel when built)
    assert eager.fusion == fusion and eager.sigma == 2.0 and (eager.dcam is not None) == (keep == "keep")
    g = torch.Generator().manual_seed(1)
    for b in (1, 3):  # one dynamic-axis model serves both
        x = torch.randn(b, 3, S, S, generator=g)
        maps, scores = _run(path, x)
        with torch.no_grad():
            em, es = eager(x)
        assert maps.shape == (b, S, S) and scores.shape == (b,)
        assert float(em.abs().max()) > 1e-3  # a non-trivial map
        np.testing.assert_allclose(maps, em.numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(scores, es.numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(scores, maps.reshape(b, -1).max(axis=1), rtol=0, atol=0)


def test_blur_is_in_the_graph(tmp_path):
    ck = _checkpoint("sum", sigma=2.0)
    blurred = export_onnx(ck, tmp_path / "b.onnx", dynamic_batch=True)
    plain = export_onnx(ck, tmp_path / "p.onnx", dynamic_batch=True, sigma=0.0)
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(2))
    mb, _ = _run(blurred, x)
    mp, _ = _run(plain, x)
    eager, _ = model_from_checkpoint(ck, sigma=0.0)
    with torch.no_grad():
        np.testing.assert_allclose(mp, eager(x)[0].numpy(), atol=1e-4, rtol=0)
    # a blur lowers the peaks and keeps the mean (reflect padding keeps it up to the borders)
    assert mb.max() < mp.max() - 1e-3
    assert abs(mb.mean() - mp.mean()) < 0.02 * mp.mean()


def test_static_batch_model_and_cli(tmp_path, capsys):
    ck = _checkpoint("sum", sigma=1.0)
    ckpt = tmp_path / "ck.pt"
    torch.save(ck, ckpt)
    out = tmp_path / "sub dir" / "static.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out),
                 "--batch-size", "2"]) == 0
    assert "static batch 2" in capsys.readouterr().out
    model = onnx.load(str(out))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, S, S]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["image_size"] == str(S) and json.loads(meta["mean"]) == pytest.approx(list(ck["mean"]))
    assert meta["fusion"] == "sum" and float(meta["sigma"]) == 1.0 and meta["backbone"] == "resnet18"
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(3))
    maps, scores = _run(out, x)
    eager, _ = model_from_checkpoint(ck)
    with torch.no_grad():
        em, es = eager(x)
    np.testing.assert_allclose(maps, em.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(scores, es.numpy(), atol=1e-4, rtol=0)
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # the batch is fixed at 2
        _run(out, torch.randn(3, 3, S, S))
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # atomic write left no temp


def test_export_errors(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="bad.pt.*truncated"):
        export_onnx(bad, tmp_path / "x.onnx")
    assert main(["export", "--checkpoint", str(bad), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dcamkd: error: checkpoint") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()
    ck = _checkpoint("sum", 0.0)
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        export_onnx(ck, tmp_path / "y.onnx", batch_size=0)
    with pytest.raises(InvalidArgumentError, match="fusion"):
        export_onnx(ck, tmp_path / "y.onnx", fusion="max")


@pytest.mark.parametrize("rule", ["max", "topk"])
def test_export_eager_and_detector_agree_for_both_image_score_rules(tmp_path, rule):
    """One image through the exported graph, the eager model and :class:`dcamkd.Detector`: the
    same map and score for the 'max' and 'topk' rules; the ONNX metadata carries the rule and
    the calibration, from which the Detector's decision follows."""
    from dcamkd import Detector
    from dcamkd.calibration import build_calibration, is_defective, normalise, select_calibration
    from dcamkd.data import image_to_tensor
    from dcamkd.scoring import ScoringSettings

    ck = _checkpoint("sum", sigma=1.0)
    ck["config"].update(image_score=rule, topk_fraction=0.02)
    settings = ScoringSettings("sum", 1.0, rule, 0.02)
    rng = np.random.default_rng(7)
    imgs = rng.integers(0, 256, size=(6, S, S, 3), dtype=np.uint8)
    mean = torch.tensor(ck["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(ck["std"], dtype=torch.float32).view(3, 1, 1)
    x = torch.stack([image_to_tensor(a, mean, std) for a in imgs])
    eager, _ = model_from_checkpoint(ck)
    with torch.no_grad():
        em, es = eager(x)
    if rule == "topk":  # the rule is really the top-k mean (k = ceil(0.02 * 64 * 64) = 82), not the max
        k = 82
        np.testing.assert_allclose(es.numpy(), em.flatten(1).topk(k, dim=1).values.mean(1).numpy(), rtol=1e-6)
        assert (em.flatten(1).amax(1) - es).min() > 0
    ck["calibration"] = build_calibration(es[:5].double().numpy(), ["c"] * 5, 0.2, settings, {"kind": "fixture"}, ["c"])
    path = export_onnx(ck, tmp_path / "m.onnx", dynamic_batch=True)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["image_score"] == rule and float(meta["topk_fraction"]) == 0.02
    cal = json.loads(meta["calibration"])
    assert cal["per_category"]["c"]["threshold"] == ck["calibration"]["per_category"]["c"]["threshold"]
    maps, scores = _run(path, x[5:])
    det = Detector(ck)
    p = det.predict(imgs[5], category="c")
    np.testing.assert_allclose(scores[0], es[5].item(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(p.score, es[5].item(), rtol=1e-6)
    np.testing.assert_allclose(maps[0], p.anomaly_map, atol=1e-4, rtol=0)
    entry = select_calibration(ck["calibration"], "c")[1]
    assert p.is_defective == is_defective(float(scores[0]), entry) or abs(float(scores[0]) - entry["threshold"]) < 1e-4
    assert p.normalised_score == pytest.approx(normalise(float(scores[0]), entry), abs=1e-3)


def test_export_refuses_other_settings_than_the_calibration(tmp_path):
    from dcamkd.calibration import build_calibration
    from dcamkd.scoring import ScoringSettings

    ck = _checkpoint("sum", sigma=1.0)
    ck["calibration"] = build_calibration([1.0, 2.0, 3.0], ["c"] * 3, 0.2, ScoringSettings("sum", 1.0),
                                          {"kind": "fixture"}, ["c"])
    with pytest.raises(InvalidArgumentError, match="dcamkd calibrate"):
        export_onnx(ck, tmp_path / "x.onnx", sigma=0.0)
