"""Exception types of dcamkd.

Every error that dcamkd raises on bad input derives from :class:`DcamkdError` *and* from the
matching built-in exception, so callers can catch either. Messages name the file or argument
and what was expected. The command line prints them in one line and exits non-zero.
"""

from __future__ import annotations

__all__ = [
    "DcamkdError",
    "InvalidArgumentError",
    "ShapeMismatchError",
    "DatasetError",
    "MissingFileError",
    "ImageReadError",
    "CheckpointError",
    "BackboneWeightsError",
    "MetricUndefinedError",
    "NonFiniteError",
    "BuildError",
    "DcamkdWarning",
    "EmptyMaskWarning",
]


class DcamkdError(Exception):
    """Base class of every dcamkd error."""


class InvalidArgumentError(DcamkdError, ValueError):
    """An argument has a value outside what is accepted (a mode name, a negative size...)."""


class ShapeMismatchError(DcamkdError, ValueError):
    """Tensors that must agree in shape, level count, dtype or device do not."""


class DatasetError(DcamkdError, ValueError):
    """A dataset folder does not follow the MVTec AD layout, or a mask does not fit its image."""


class MissingFileError(DcamkdError, FileNotFoundError):
    """A file or folder that must exist does not (a mask, a category, a checkpoint)."""


class ImageReadError(DcamkdError, OSError):
    """An image or mask file cannot be decoded (empty, truncated, not an image)."""


class CheckpointError(DcamkdError, ValueError):
    """A checkpoint is truncated, of another format version, or of another backbone."""


class BackboneWeightsError(DcamkdError, RuntimeError):
    """Pretrained teacher weights cannot be obtained (offline hub, bad local file)."""


class MetricUndefinedError(DcamkdError, ValueError):
    """A metric is undefined for the given data (AUROC with one class, AUPRO with no region)."""


class NonFiniteError(DcamkdError, FloatingPointError):
    """A NaN or Inf appeared in an input or a loss."""


class BuildError(DcamkdError, RuntimeError):
    """A C++/CUDA extension failed to build."""


class DcamkdWarning(UserWarning):
    """Base class of dcamkd's warnings (filter them with ``warnings.filterwarnings``)."""


class EmptyMaskWarning(DcamkdWarning):
    """Defective test images have no defect pixel at the evaluation size (a small defect erased
    by resizing the mask, or an empty mask file); the metrics count them as stated in the
    message."""
