// The parameter dtypes of the CUDA kernels as C++ types: each ParamType (cuda/launch.h) with its
// opmath type (float, double for double: reference.py `opmath`), and the switch from one to the
// other.  Shared by the multi-tensor engine (cuda/multi_tensor.cuh) and the BiSAM loss kernel.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/launch.h"

namespace samkernels {
namespace cuda {

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename P>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};
template <typename P>
using opmath_t = typename OpMath<P>::type;

// Calls f(TypeTag<P>{}) for the parameter dtype t (P: float, double, __half or
// __nv_bfloat16).
template <class F>
cudaError_t dispatch_param(ParamType t, F&& f) {
  switch (t) {
    case ParamType::kFloat:
      return f(TypeTag<float>{});
    case ParamType::kDouble:
      return f(TypeTag<double>{});
    case ParamType::kHalf:
      return f(TypeTag<__half>{});
    case ParamType::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace samkernels
