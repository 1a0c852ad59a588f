"""Compute precision and compilation of the backbones (``--precision``, ``--compile``).

**Precision** (:data:`dcamkd.config.PRECISIONS`). ``fp32`` runs everything in float32. ``bf16``
runs the backbone forwards under ``torch.autocast(device_type, dtype=torch.bfloat16)`` and casts
exactly these tensors:

* inside autocast (the teacher, student and DCAM forwards): convolutions and linear layers take
  bfloat16 copies of their float32 input and weights and return bfloat16; batch norm and the
  activations run in the dtype of their input (bfloat16) with float32 statistics and affine
  parameters. The images stay float32 until the first convolution casts them.
* teacher and student pyramid levels leave the forward as bfloat16 (:func:`to_precision` casts
  any level that is not), so the two pyramids agree in dtype before the loss or the anomaly map;
  the trainer caches the teacher levels in bfloat16 (half the memory of float32).
* the loss (:func:`dcamkd.ops.pyramid_terms`) and the per-level anomaly maps
  (:func:`dcamkd.ops.anomaly_map_level`) read the bfloat16 levels and accumulate in float32; the
  DCAM gates enter the loss as float32. Loss terms, anomaly maps (upsampling, fusion, blur) and
  image scores are float32, so the metrics are computed in float32.
* one exception, on the CPU: a depthwise convolution (``groups == in_channels > 1``) with
  trainable weights under gradient mode computes in float32 (input cast up, autocast off for that
  call), and returns float32, which the batch norm after it keeps until the next convolution casts
  to bfloat16 again. oneDNN's bfloat16 depthwise backward ran 2-3.5x slower than its float32 one
  on a CPU with ``avx512_bf16`` and no AMX (a profiled lite0 step at batch 8: about 1.3 s against 0.55 s for the
  depthwise layers), while the pointwise convolutions ran about 3x faster in bfloat16; frozen
  (teacher) and no-grad (validation, inference) depthwise convolutions stay bfloat16, where the
  forward is faster. :func:`float32_depthwise_when_training` installs the rule; every
  :class:`dcamkd.models.FeaturePyramid` has it.
* the weights stay float32: the optimiser updates float32 master weights from float32 gradients
  (autocast's backward returns the gradients in the dtype of the weights), and checkpoints hold
  float32. A float32 checkpoint therefore scores in either precision.

This is the standard mixed-precision scheme of ``torch.autocast``; on a CPU with
``avx512_bf16`` the oneDNN bfloat16 convolutions are what make it faster.

**Compilation** (``compile``): :func:`compile_module` compiles a module in place with
``nn.Module.compile`` (``torch.compile`` of its forward; the fused ops are registered custom ops
and compile as single nodes). In place, the module's ``state_dict`` keys stay unchanged (no
``_orig_mod.`` prefix), so checkpoints written from a compiled student load anywhere. Compilation
happens lazily at the first call of each new mode, shape or autocast state, so the first steps are
slow: the trainer logs the time (``compile_seconds``).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import Tensor, nn

from .config import DEFAULT_PRECISION, PRECISIONS
from .objective import check_choice

__all__ = ["PRECISIONS", "DEFAULT_PRECISION", "PRECISION_DTYPES", "check_precision", "autocast", "to_precision",
           "compile_module", "float32_depthwise_when_training"]

#: The feature dtype of each precision.
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
assert tuple(PRECISION_DTYPES) == PRECISIONS


def check_precision(precision, name: str = "precision") -> str:
    """``precision`` if it is one of :data:`PRECISIONS`; else :class:`InvalidArgumentError`
    naming ``name``."""
    return check_choice(name, precision, PRECISIONS)


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """The context of a backbone forward at ``precision`` on ``device`` (a ``torch.device`` or
    its name): ``torch.autocast(device type, dtype=torch.bfloat16)`` for ``'bf16'``, a null
    context for ``'fp32'``.

    Raises:
        InvalidArgumentError: an unknown precision.
    """
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=PRECISION_DTYPES[precision])


def to_precision(levels: Sequence[Tensor], precision: str) -> list[Tensor]:
    """Feature levels ``(B, C, H, W)`` in the feature dtype of ``precision``: bfloat16 for
    ``'bf16'`` (levels already bfloat16 are returned as they are, others cast); unchanged for
    ``'fp32'`` (float64 levels stay float64). Gradients flow through the cast."""
    if check_precision(precision) == "fp32":
        return list(levels)
    dtype = PRECISION_DTYPES[precision]
    return [x if x.dtype == dtype else x.to(dtype) for x in levels]


_FLOAT32_DEPTHWISE: dict[type, type] = {}  # convolution class -> its subclass with the rule


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def _float32_depthwise_class(cls: type) -> type:
    sub = _FLOAT32_DEPTHWISE.get(cls)
    if sub is None:
        def forward(self, x: Tensor) -> Tensor:
            if x.device.type == "cpu" and self.weight.requires_grad and torch.is_grad_enabled() \
                    and torch.is_autocast_enabled("cpu"):
                with torch.autocast("cpu", enabled=False):
                    return cls.forward(self, x.float())
            return cls.forward(self, x)

        sub = type(cls.__name__, (cls,), {"forward": forward, "__doc__": cls.__doc__})
        _FLOAT32_DEPTHWISE[cls] = sub
    return sub


def float32_depthwise_when_training(module: nn.Module) -> int:
    """Give every depthwise ``nn.Conv2d`` of ``module`` the CPU training rule of the module
    docstring (float32 under bfloat16 autocast when its weights train and gradients are on;
    unchanged otherwise), by switching its class to a subclass: parameters, ``state_dict`` keys,
    ``repr`` and ``isinstance`` stay as they were, and copies keep the rule. Idempotent.

    Returns the number of depthwise convolutions of ``module``.
    """
    n = 0
    for m in module.modules():
        if _is_depthwise(m):
            if type(m) not in _FLOAT32_DEPTHWISE.values():
                m.__class__ = _float32_depthwise_class(type(m))
            n += 1
    return n


def compile_module(module: nn.Module) -> nn.Module:
    """Compile ``module`` in place (``nn.Module.compile``: ``torch.compile`` with the default
    inductor backend) and return it. ``state_dict`` keys are unchanged. Compilation runs at the
    first call (and again for a new train/eval mode, input shape or autocast state)."""
    module.compile()
    return module
