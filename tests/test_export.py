"""ONNX export of the inference model: onnxruntime output against eager PyTorch (issue 5)."""

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
                      dcam_at_inference=dcam_at_inference, fusion=fusion, sigma=sigma)
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
    eager, _ = model_from_checkpoint(ck)  # the default backend (the fused CPU kernel when built)
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
