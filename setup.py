"""Builds lgd_fast's compiled extensions with torch's cpp_extension and ninja.

``lgd_fast._C`` (C++, CPU) is always built. ``lgd_fast._C_cuda`` is built only where a CUDA build of
torch and a CUDA toolkit are both present. Metadata lives in pyproject.toml.
"""

import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    # -g0: no debug info (Python's CFLAGS ask for -g; with torch's headers it was a third of each file's compile)
    cxx = ["-O3", "-g0", "-std=c++20", "-fopenmp"]
    exts = [
        cpp_extension.CppExtension(
            "lgd_fast._C",
            _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp"),
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    import torch

    cuda_sources = _sources("csrc/cuda/*.cu")
    if cuda_sources and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        exts.append(
            cpp_extension.CUDAExtension(
                "lgd_fast._C_cuda",
                _sources("csrc/cuda/*.cpp") + cuda_sources,
                extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": ["-O3", "--use_fast_math"]},
            )
        )
    return exts


setup(
    packages=["lgd_fast", "lgd_fast.data", "lgd_fast.engine", "lgd_fast.kernels", "lgd_fast.models", "lgd_fast.ops"],
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
