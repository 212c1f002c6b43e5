"""Compiler flags for the extension: one definition for setup.py and tests/test_cuda_compile.py,
so the test compiles the CUDA sources exactly as the build does.

C++ standard: the one the installed torch requires (C++17 up to torch 2.13; torch 2.14's
ATen/ATen.h stops with ``#error C++20 or later compatible compiler is required``), read from that
``#if __cplusplus < NNNNNNL`` check in torch's headers, from the torch version when the headers
cannot be read, and overridden by ``SAMKERNELS_CXX_STD`` (``17``, ``20``, ``c++20``, ...).

No ``--use_fast_math`` for nvcc: the kernels are memory-bound, and fast math would turn
logf/sinf/cosf into approximate intrinsics (wrong Box-Muller tails near u = 1), fp32 division and
sqrt into approximations and flush denormals, unlike the CPU and Triton backends.  nvcc's
defaults (-ftz=false -prec-div=true -prec-sqrt=true) keep IEEE fp32; tests/test_cuda_compile.py
checks the PTX for it.
"""
from __future__ import annotations

import os
import re

CXX_STD_ENV = "SAMKERNELS_CXX_STD"
# __cplusplus of each standard our compilers take; our own sources need C++17 (if constexpr).
_STANDARDS = [(201703, "c++17"), (202002, "c++20"), (202302, "c++23")]
# torch's "C++NN or later is required" guards (ATen.h for ATen users, all.h for torch/torch.h)
_GUARD_HEADERS = [("ATen", "ATen.h"), ("torch", "csrc", "api", "include", "torch", "all.h")]
_GUARD = re.compile(r"__cplusplus\s*<\s*(\d{6})L")


def _parse_std(value: str) -> str:
    m = re.fullmatch(r"(?:c\+\+|gnu\+\+)?(\d\d)", value.strip().lower())
    if m is None or m.group(1) not in ("17", "20", "23"):
        raise ValueError(f"{CXX_STD_ENV}={value!r}: expected 17, 20 or 23 (or c++17, c++20, c++23)")
    return "c++" + m.group(1)


def _torch_include() -> str:
    import torch  # only to locate its headers
    return os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "include")


def _torch_version() -> tuple:
    import torch
    return tuple(int(p) for p in re.findall(r"\d+", torch.__version__.split("+")[0])[:2])


def required_cplusplus(torch_include: str) -> int | None:
    """The largest ``__cplusplus < N`` guard in torch's top-level headers, None if none is read."""
    found = []
    for parts in _GUARD_HEADERS:
        try:
            with open(os.path.join(torch_include, *parts)) as f:
                head = f.read(4096)  # the guard is at the top
        except OSError:
            continue
        found += [int(n) for n in _GUARD.findall(head)]
    return max(found) if found else None


def cxx_std(torch_include: str | None = None) -> str:
    """'c++17', 'c++20', ...: the standard for g++ and nvcc against the installed torch."""
    override = os.environ.get(CXX_STD_ENV, "").strip()
    if override:
        return _parse_std(override)
    need = required_cplusplus(torch_include or _torch_include())
    if need is None:  # headers unreadable (unusual layout): torch 2.14 moved to C++20
        return "c++20" if _torch_version() >= (2, 14) else "c++17"
    for value, name in _STANDARDS:
        if value >= need:
            return name
    raise RuntimeError(f"torch requires __cplusplus >= {need}L, newer than any standard known "
                       f"here; set {CXX_STD_ENV}")


# -fno-math-errno: with errno semantics GCC will not vectorize loops that call std::sqrt (Adam's
# restore, bSAM's precision update); sqrt stays correctly rounded, so results are unchanged.
def cxx_flags(std: str) -> list:
    return ["-O3", f"-std={std}", "-fopenmp", "-fno-math-errno", "-DSAMKERNELS_OPENMP"]


CUDA_DEFINE = "-DSAMKERNELS_WITH_CUDA"


def nvcc_flags(std: str) -> list:
    """What setup.py passes to nvcc (torch's cpp_extension adds COMMON_NVCC_FLAGS and -gencode)."""
    return ["-O3", f"-std={std}", "-lineinfo", CUDA_DEFINE]
