"""Install script. Metadata lives in pyproject.toml.

Default: a plain Python install; the C++ CPU kernels are JIT-built on first use from the
sources shipped inside the package (``dcamkd/csrc``). ``DCAMKD_BUILD_EXT=1`` builds them ahead of
time as ``dcamkd._C`` (needs torch and a C++ compiler at build time, e.g.
``DCAMKD_BUILD_EXT=1 pip install --no-build-isolation .``).
"""

import os

from setuptools import setup

kwargs = {
    # ship csrc inside the wheel as dcamkd/csrc, so non-editable installs can JIT-build
    "package_dir": {"dcamkd.csrc": "csrc"},
    "packages": None,
}

if os.environ.get("DCAMKD_BUILD_EXT", "0") == "1":
    import glob

    from torch.utils.cpp_extension import BuildExtension, CppExtension

    native = os.environ.get("DCAMKD_NATIVE", "0") == "1"  # wheels may travel: no -march=native by default
    flags = ["-O3", "-fopenmp"] + (["-march=native"] if native else [])
    kwargs["ext_modules"] = [
        CppExtension(
            "dcamkd._C",
            ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp")),
            include_dirs=[os.path.abspath("csrc/cpu")],
            extra_compile_args=flags,
            extra_link_args=["-fopenmp"],
        )
    ]
    kwargs["cmdclass"] = {"build_ext": BuildExtension}

from setuptools import find_packages  # noqa: E402

kwargs["packages"] = find_packages(include=["dcamkd*"]) + ["dcamkd.csrc", "dcamkd.csrc.cpu"]
kwargs["package_data"] = {"dcamkd.csrc": ["*.cpp", "*.h", "cpu/*", "cuda/*"], "dcamkd.csrc.cpu": ["*"]}

setup(**kwargs)
