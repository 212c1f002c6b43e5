// What the per-element maths (csrc/math/*.h) is written in: SK_HD marks a function for the host
// and, under nvcc, for the device too (SK_UNROLL: nvcc's unroll hint); sk_abs / sk_sqrt / sk_exp are the IEEE functions of libm
// and of CUDA's device library (no fast-math intrinsics), one overload per opmath type, so one
// template body serves float and double on either side.  Free of torch, includable by nvcc.
#pragma once
#include <math.h>

#include <cmath>

#if defined(__CUDACC__)
#define SK_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always_inline: the CPU kernels' loops (and bisam_loss.cpp's target clones) must inline the
// maths to vectorise it.
#define SK_HD inline __attribute__((always_inline))
#else
#define SK_HD inline
#endif

// nvcc's loop unrolling hint; g++ would warn about an unknown pragma and ignore it.
#if defined(__CUDACC__)
#define SK_UNROLL _Pragma("unroll")
#else
#define SK_UNROLL
#endif

namespace samkernels {
namespace math {

SK_HD float sk_abs(float x) { return fabsf(x); }
SK_HD double sk_abs(double x) { return fabs(x); }
SK_HD float sk_sqrt(float x) { return sqrtf(x); }
SK_HD double sk_sqrt(double x) { return sqrt(x); }
SK_HD float sk_exp(float x) { return expf(x); }
SK_HD double sk_exp(double x) { return exp(x); }
SK_HD float sk_log1p(float x) { return log1pf(x); }
SK_HD double sk_log1p(double x) { return log1p(x); }

}  // namespace math
}  // namespace samkernels
