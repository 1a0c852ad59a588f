"""The one check of a ``--device`` / ``device=`` argument, made before anything heavy runs.

Accepted: ``'cpu'``, ``'cuda'`` and ``'cuda:N'``. :func:`check_device_name` checks the spelling
only (configurations are written on one machine and run on another); :func:`check_device` also
checks that the device exists here, so that ``dcamkd ... --device cuda`` on a machine without a
GPU, or ``--device gpu``, ends in one line (``dcamkd: error: --device ...``, exit status 2)
instead of a traceback from deep inside torch.
"""

from __future__ import annotations

import re

from .errors import InvalidArgumentError

__all__ = ["DEVICE_HELP", "check_device_name", "check_device"]

#: Help text of every ``--device`` option.
DEVICE_HELP = "cpu, cuda or cuda:N (default cpu)"

_PATTERN = re.compile(r"cpu|cuda(:\d+)?")


def check_device_name(device, name: str = "--device") -> str:
    """Check the spelling of a device: ``'cpu'``, ``'cuda'`` or ``'cuda:N'``.

    Args:
        device: the device string.
        name: the argument's name, used in the message.

    Returns:
        ``device`` unchanged.

    Raises:
        InvalidArgumentError: anything else (``'gpu'``, ``'cuda:x'``, ``None``...).
    """
    if not isinstance(device, str) or not _PATTERN.fullmatch(device):
        raise InvalidArgumentError(f"{name}: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device


def check_device(device, name: str = "--device") -> str:
    """Check that ``device`` is spelled right and exists on this machine.

    Args:
        device: ``'cpu'``, ``'cuda'`` or ``'cuda:N'``.
        name: the argument's name, used in the message.

    Returns:
        ``device`` unchanged.

    Raises:
        InvalidArgumentError: a bad spelling (:func:`check_device_name`); a CUDA device when this
            torch has no CUDA support or sees no GPU; ``cuda:N`` with ``N`` >= the GPU count.
    """
    check_device_name(device, name)
    if device == "cpu":
        return device
    import torch

    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA GPU is visible on this machine")
        raise InvalidArgumentError(f"{name} {device}: {why}; use --device cpu")
    if ":" in device:
        idx, count = int(device.split(":")[1]), torch.cuda.device_count()
        if idx >= count:
            raise InvalidArgumentError(
                f"{name} {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device
