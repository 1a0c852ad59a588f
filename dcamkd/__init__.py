"""dcamkd: multi-class visual anomaly detection by attention-aware knowledge distillation.

DCAM (Jena et al., ICPR 2024, arXiv 2405.06467) on a STFPM teacher/student feature pyramid,
with fused CPU/GPU kernels for the distillation losses, the DCAM attention and the anomaly map.

``from dcamkd import Detector`` gives the inference API (:class:`dcamkd.detector.Detector`); it
is imported on first use, so ``import dcamkd`` stays light (no torch import).
"""

from ._version import __version__

__all__ = ["Detector", "Prediction", "__version__"]


def __getattr__(name):
    if name in ("Detector", "Prediction"):
        from . import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'dcamkd' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + ["Detector", "Prediction"])
