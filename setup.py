"""Builds the compiled extension ``samkernels._C`` against the torch that is installed.

Build without isolation so the extension links the torch you run with:
    pip install --no-build-isolation .          (or: pip wheel --no-build-isolation --no-deps .)

* C++ standard: the one the installed torch requires, for g++ and nvcc alike: C++17 up to torch
  2.13, C++20 from torch 2.14 (read from the ``__cplusplus`` guard in torch's ATen/ATen.h; see
  build_flags.py).  ``SAMKERNELS_CXX_STD=17|20`` overrides it.
* C++ CPU kernels (``csrc/*.cpp``, ``csrc/ops/*.cpp``) are always built: OpenMP, -O3.
* CUDA kernels (``csrc/cuda/*.cu``, and the torch glue in ``csrc/ops/*.cpp`` under
  ``-DSAMKERNELS_WITH_CUDA``) are built when torch has CUDA and ``nvcc`` is found.
  ``SAMKERNELS_CUDA=1`` forces them on (error if impossible), ``SAMKERNELS_CUDA=0`` off.
  ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default 8.0;9.0).
  nvcc keeps IEEE fp32 (no ``--use_fast_math``), so CUDA results match the CPU and Triton backends.

The flags live in build_flags.py, shared with tests/test_cuda_compile.py (which compiles the CUDA
sources with exactly these flags on machines without a GPU).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # build_flags.py sits next to this file
import build_flags  # noqa: E402


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


CXX_STD = build_flags.cxx_std()
print(f"samkernels: building with -std={CXX_STD} for torch {torch.__version__}")
cxx_flags = build_flags.cxx_flags(CXX_STD)
sources = _rel("csrc/*.cpp") + _rel("csrc/ops/*.cpp")
ext_kwargs = dict(extra_link_args=["-fopenmp"], include_dirs=[os.path.join(ROOT, "csrc")])

if _want_cuda():
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        "samkernels._C",
        sources + _rel("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx_flags + [build_flags.CUDA_DEFINE],
                            "nvcc": build_flags.nvcc_flags(CXX_STD)},
        **ext_kwargs)
else:
    ext = CppExtension("samkernels._C", sources, extra_compile_args=cxx_flags, **ext_kwargs)

setup(
    packages=find_packages(include=["samkernels", "samkernels.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
