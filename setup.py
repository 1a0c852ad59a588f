"""Install script. Metadata lives in pyproject.toml.

Default: a plain Python install; the C++ kernels (CPU and CUDA) are JIT-built on first use from
the sources shipped inside the package (``dcamkd/csrc``, see ``dcamkd/_build.py``).
``DCAMKD_BUILD_EXT=1`` builds the CPU kernels ahead of time as the library ``dcamkd/_C*.so``,
which ``dcamkd._build.load`` then loads (needs torch and a C++ compiler at build time, e.g.
``DCAMKD_BUILD_EXT=1 pip install --no-build-isolation .``).
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class build_py_with_csrc(build_py):
    """Copy ``csrc/`` into the package as ``dcamkd/csrc`` so non-editable installs can JIT-build
    (``dcamkd._build.csrc_dir`` looks there first)."""

    def run(self):
        super().run()
        src = Path(__file__).resolve().parent / "csrc"
        dst = Path(self.build_lib) / "dcamkd" / "csrc"
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


kwargs = {"cmdclass": {"build_py": build_py_with_csrc}}

if os.environ.get("DCAMKD_BUILD_EXT", "0") == "1":
    import glob

    from torch.utils.cpp_extension import BuildExtension, CppExtension

    native = os.environ.get("DCAMKD_NATIVE", "0") == "1"  # wheels may travel: no -march=native by default
    # the same flags as the JIT build (dcamkd/_build.py): without -fno-trapping-math GCC keeps the
    # polynomial exp loops scalar
    flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"] + (["-march=native"] if native else [])
    kwargs["ext_modules"] = [
        CppExtension(  # a plain library: its kernels register with the dispatcher when loaded
            "dcamkd._C",
            sorted(glob.glob("csrc/cpu/*.cpp")),
            include_dirs=[os.path.abspath("csrc/cpu")],
            extra_compile_args=flags,
            extra_link_args=["-fopenmp"],
        )
    ]
    kwargs["cmdclass"]["build_ext"] = BuildExtension

setup(**kwargs)
