// Types, conversions, math overloads and 16-byte vector access for the row kernels.
//
// Plain CUDA C++: no torch / ATen / c10 headers (CI compiles kernels/*.cu alone with bare nvcc).
// Inputs are __nv_bfloat16, __half, float or double; all math is in acc_t = float (double for
// double inputs).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fusedce {
namespace kern {

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// ---- conversions ------------------------------------------------------------------------------
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }

// ---- math (the build has no fast-math) ---------------------------------------------------------
// exp of x <= 0 (arguments are z - max or z - lse): the hardware ex2 path (__expf, ~2 ulp near 0,
// relative error growing with |x| only where exp(x) is negligible in the sums); the accurate expf
// made the statistics pass instruction-bound (~2x over the copy-bandwidth floor).
__device__ __forceinline__ float acc_exp(float x) { return __expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
// exp(x - m) with c = -m*log2(e) precomputed: one FFMA and one MUFU.EX2 per element in float, the
// statistics pass's whole per-element arithmetic budget. ex2.approx has ~2 ulp relative error; the
// FFMA rounds x*log2(e) once (relative error of the result ~|x| * 2^-24, negligible against the
// lse it feeds). x = -inf gives 0; the caller keeps c finite while m is -inf.
constexpr float kLog2e = 1.4426950408889634f;
__device__ __forceinline__ float fast_ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float exp_shifted(float x, float /*m*/, float c) {
  return fast_ex2(fmaf(x, kLog2e, c));
}
// As the float version, through c = -m (kept 0 while m is -inf): x - m itself would be
// -inf - (-inf) = nan for a masked (-inf) logit seen before any finite one.
__device__ __forceinline__ double exp_shifted(double x, double /*m*/, double c) {
  return exp(x + c);
}
__device__ __forceinline__ float neg_scaled(float m) { return -m * kLog2e; }
__device__ __forceinline__ double neg_scaled(double m) { return -m; }

__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
__device__ __forceinline__ float acc_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double acc_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float acc_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double acc_max(double a, double b) { return fmax(a, b); }

// Explicitly rounded operations (never contracted into an FMA by the compiler): the gradient of an
// element must not depend on whether it was reached by the vector or the scalar walk of its row.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

template <typename A>
__device__ __forceinline__ A neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() { return -__int_as_float(0x7f800000); }
template <>
__device__ __forceinline__ double neg_inf<double>() {
  return -__longlong_as_double(0x7ff0000000000000LL);
}

// The per-token loss (and gradient) of an out-of-range target: loud rather than a silent finite value.
template <typename A>
__device__ __forceinline__ A quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}

// ---- 16-byte vectors --------------------------------------------------------------------------
// VEC elements of T in one 16-byte access.
template <typename T>
struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const T* p) {  // p 16-byte aligned
  return *reinterpret_cast<const Vec<T>*>(p);
}
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T>& r) {
  *reinterpret_cast<Vec<T>*>(p) = r;
}

// Elements before the first 16-byte boundary of a row starting at p (0 when aligned), capped at n.
template <typename T>
__device__ __forceinline__ int64_t head_elems(const T* p, int64_t n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const int64_t mis = static_cast<int64_t>(a & 15u);
  int64_t h = mis == 0 ? 0 : (16 - mis) / static_cast<int64_t>(sizeof(T));
  return h < n ? h : n;
}

}  // namespace kern
}  // namespace fusedce
