"""Anomaly maps (method.md section 5) and the backbones (section 2)."""

import urllib.error

import pytest
import torch

from dcamkd import models
from dcamkd.errors import BackboneWeightsError, InvalidArgumentError, MissingFileError, ShapeMismatchError
from dcamkd.scoring import AnomalyModel, anomaly_map, fuse_levels, gaussian_blur, gaussian_kernel_size


def test_fuse_levels_sum_and_product_constant_maps():
    lv = [torch.full((2, 8, 8), 0.5), torch.full((2, 4, 4), 0.25), torch.full((2, 2, 2), 2.0)]
    torch.testing.assert_close(fuse_levels(lv, (16, 16), "sum"), torch.full((2, 16, 16), 2.75))
    torch.testing.assert_close(fuse_levels(lv, (16, 16), "product"), torch.full((2, 16, 16), 0.25))
    with pytest.raises(InvalidArgumentError, match="fusion"):
        fuse_levels(lv, (16, 16), "max")


def test_fuse_levels_bilinear_two_step_resize():
    lv0 = torch.zeros(1, 4, 4)
    lv1 = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    out = fuse_levels([lv0, lv1], (4, 4), "sum")
    expected = torch.nn.functional.interpolate(lv1[:, None], size=(4, 4), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(out, expected)
    assert out[0, 0].tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0])


def test_gaussian_blur_properties():
    assert gaussian_kernel_size(4) == 33
    assert gaussian_kernel_size(1.0) == 9
    x = torch.full((1, 40, 40), 3.0)
    torch.testing.assert_close(gaussian_blur(x, 4.0), x)
    impulse = torch.zeros(1, 41, 41)
    impulse[0, 20, 20] = 1.0
    y = gaussian_blur(impulse, 2.0)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert y[0, 20, 20] == y.max()
    # the peak of a 2-D Gaussian with sigma 2 (truncation at 4 sigma changes it by < 1e-3)
    assert y[0, 20, 20].item() == pytest.approx(1 / (2 * torch.pi * 4), rel=2e-3)
    assert gaussian_blur(impulse, 0) is impulse


def test_anomaly_map_zero_for_identical_pyramids_and_shape():
    torch.manual_seed(0)
    t = [torch.randn(3, 8, 16, 16), torch.randn(3, 16, 8, 8)]
    m = anomaly_map(t, [x.clone() for x in t], (64, 48))
    assert m.shape == (3, 64, 48)
    assert m.abs().max().item() < 1e-5
    s = [-x for x in t]  # opposite vectors: distance 2 per level
    torch.testing.assert_close(anomaly_map(t, s, (32, 32)), torch.full((3, 32, 32), 4.0), atol=1e-5, rtol=0)
    with pytest.raises(ShapeMismatchError):
        anomaly_map(t, s[:1], (32, 32))


def test_anomaly_model_scores_are_map_max():
    torch.manual_seed(0)
    teacher = models.build_teacher("resnet18", weights=None)
    student = models.build_student("resnet18").eval()
    model = AnomalyModel(teacher, student, fusion="sum", sigma=1.0).eval()
    x = torch.randn(2, 3, 80, 96)
    with torch.no_grad():
        maps, scores = model(x)
    assert maps.shape == (2, 80, 96) and scores.shape == (2,)
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))


@pytest.mark.parametrize("name, channels", [("resnet18", (64, 128, 256)), ("tf_efficientnet_lite0", (24, 40, 112))])
def test_pyramid_shapes_and_no_deeper_stage(name, channels):
    pyr = models.build_student(name)
    out = pyr(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in out] == [(1, channels[0], 16, 16), (1, channels[1], 8, 8), (1, channels[2], 4, 4)]
    names = {n for n, _ in pyr.named_modules()}
    assert not any("layer4" in n or "conv_head" in n or "classifier" in n for n in names)
    if name == "tf_efficientnet_lite0":
        assert len(pyr.stages) == 5  # blocks 0..4; blocks 5 and 6 are not computed


def test_wide_resnet_channels():
    assert models.backbone_spec("wide_resnet50_2").channels == (256, 512, 1024)
    with pytest.raises(InvalidArgumentError, match="backbone must be one of"):
        models.backbone_spec("vgg16")


def test_lite0_teacher_offline_weights_frozen_eval():
    t = models.build_teacher("tf_efficientnet_lite0")
    assert not t.training and all(not p.requires_grad for p in t.parameters())
    t.train()
    assert not t.training, "a frozen teacher must stay in eval mode"
    # the package weights were loaded (random init would not give these BN statistics)
    sd = models._package_state_dict(models.backbone_spec("tf_efficientnet_lite0"))
    first_bn_mean = [v for k, v in sd.items() if "running_mean" in k][0]
    torch.testing.assert_close(t.stem[1].running_mean, first_bn_mean)


def test_resnet_download_failure_names_the_fix(monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(BackboneWeightsError, match="--teacher-weights"):
        models.build_teacher("resnet18", weights="imagenet")


def test_teacher_weights_from_local_file(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    t = models.build_teacher("resnet18", weights=tmp_path / "r18.pth")
    torch.testing.assert_close(t.stages[2][0].conv1.weight, net.layer3[0].conv1.weight)
    with pytest.raises(MissingFileError, match="no such file"):
        models.build_teacher("resnet18", weights=tmp_path / "missing.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(BackboneWeightsError, match="not a resnet18 state dict"):
        models.build_teacher("resnet18", weights=tmp_path / "bad.pth")


@pytest.mark.parametrize("sigma", [-1.0, float("nan"), float("inf")])
def test_bad_sigma(sigma):
    with pytest.raises(InvalidArgumentError, match="sigma must be a finite number >= 0"):
        gaussian_blur(torch.zeros(1, 8, 8), sigma)
