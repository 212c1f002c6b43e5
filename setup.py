"""Builds the compiled extension ``samkernels._C`` against the torch that is installed.

Build without isolation so the extension links the torch you run with:
    pip install --no-build-isolation .          (or: pip wheel --no-build-isolation --no-deps .)

* C++ CPU kernels (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) are always built: C++17, OpenMP, -O3.
* CUDA kernels (``csrc/cuda/*.cu`` + their torch glue ``csrc/cuda/*.cpp``) are built when torch has
  CUDA and ``nvcc`` is found.  ``SAMKERNELS_CUDA=1`` forces them on (error if impossible),
  ``SAMKERNELS_CUDA=0`` off.  ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default 8.0;9.0).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda() -> bool:
    flag = os.environ.get("SAMKERNELS_CUDA", "auto").lower()
    have_nvcc = shutil.which("nvcc") is not None or os.path.exists(
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
    possible = torch.version.cuda is not None and have_nvcc
    if flag in ("0", "off", "false", "no"):
        return False
    if flag in ("1", "on", "true", "yes"):
        if not possible:
            sys.exit("SAMKERNELS_CUDA=1 but torch has no CUDA or nvcc is missing")
        return True
    return possible


# -fno-math-errno: with errno semantics GCC will not vectorize loops that call std::sqrt (Adam's
# restore, bSAM's precision update); sqrt stays correctly rounded, so results are unchanged.
cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-DSAMKERNELS_OPENMP"]
sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
ext_kwargs = dict(extra_link_args=["-fopenmp"], include_dirs=[os.path.join(ROOT, "csrc")])

if _want_cuda():
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        "samkernels._C",
        sources + _rel("csrc/cuda/*.cpp") + _rel("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx_flags + ["-DSAMKERNELS_WITH_CUDA"],
                            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                                     "-DSAMKERNELS_WITH_CUDA"]},
        **ext_kwargs)
else:
    ext = CppExtension("samkernels._C", sources, extra_compile_args=cxx_flags, **ext_kwargs)

setup(
    packages=find_packages(include=["samkernels", "samkernels.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
