"""dcamkd: multi-class visual anomaly detection by attention-aware knowledge distillation.

DCAM (Jena et al., ICPR 2024, arXiv 2405.06467) on a STFPM teacher/student feature pyramid,
with fused CPU/GPU kernels for the distillation losses, the DCAM attention and the anomaly map.
"""

__version__ = "0.1.0"
