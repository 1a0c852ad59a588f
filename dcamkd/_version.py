"""The version of dcamkd, in a module of its own so that submodules need not import the package
root (which lazily re-exports the :class:`~dcamkd.detector.Detector` API from above them)."""

__version__ = "0.1.0"
