// exp and log that the compiler can vectorize, for the per-element loops of terms.h.
//
// std::exp / std::log are library calls, so a loop that calls them runs one element at a time
// (the extension builds for the baseline ISA, without -ffast-math, so no vector math library is
// substituted). These are branch-free float versions (Cody-Waite range reduction plus the
// minimax polynomials of Cephes' expf / logf, about 1 ulp), written with selects and integer bit
// operations that SSE2 has, so that `#pragma omp simd` loops calling them vectorize. float64
// keeps the library functions: its accuracy budget (1e-9, tests/accuracy.py) is beyond these.
//
// Differences from std::expf / std::logf, harmless where terms.h uses them (sums and gradients
// next to terms of order 1): fast_exp flushes results below the smallest normal float
// (x < -87.33, e^x < 1.2e-38) to 0, and fast_log expects a normal positive argument or a NaN
// (callers clamp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Always inlined: a call per element would undo the vectorization, and in a large translation
// unit GCC's inlining budget otherwise leaves some of them as calls.
#if defined(__GNUC__)
#define FUSEDCE_VEC_INLINE inline __attribute__((always_inline))
#else
#define FUSEDCE_VEC_INLINE inline
#endif

namespace fusedce {
namespace cpu {

FUSEDCE_VEC_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

FUSEDCE_VEC_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// c ? a : b through bit masks. GCC (12) does not if-convert a loop with more than one float
// ?: under the default -ftrapping-math (a comparison may trap, so it stays a branch, and the
// loop is not vectorized); integer masks have no such restriction.
FUSEDCE_VEC_INLINE float sel(bool c, float a, float b) {
  const int32_t m = -static_cast<int32_t>(c);
  return bits_to_float((float_to_bits(a) & m) | (float_to_bits(b) & ~m));
}
FUSEDCE_VEC_INLINE double sel(bool c, double a, double b) { return c ? a : b; }

FUSEDCE_VEC_INLINE float fast_exp(float x) {
  constexpr float kLo = -87.3365447f;  // e^kLo = 2^-126, the smallest normal float
  constexpr float kHi = 88.3762589f;   // e^kHi = FLT_MAX
  float xc = sel(x < kLo, kLo, x);  // a NaN stays NaN
  xc = sel(xc > kHi, kHi, xc);
  // n = round(x / ln 2) by the 1.5 * 2^23 shifter (no roundps in SSE2); r = x - n ln 2 in
  // [-ln2/2, ln2/2], ln 2 split so that n * kLn2Hi is exact.
  constexpr float kShift = 12582912.0f;
  const float nf = (xc * 1.44269504088896341f + kShift) - kShift;
  const float r = (xc - nf * 0.693359375f) - nf * -2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  // 2^n from its exponent bits; n in [-126, 128). At n = 128 (x near kHi) split the scale.
  const int32_t n = static_cast<int32_t>(nf);
  const int32_t n1 = n >> 1;
  float y = p * bits_to_float((n1 + 127) << 23) * bits_to_float((n - n1 + 127) << 23);
  // x < kLo covers -inf; a NaN x gives NaN through p.
  y = sel(x < kLo, 0.0f, y);
  return sel(x > kHi, HUGE_VALF, y);
}

// log x for a normal positive x; a NaN stays NaN (the bit manipulation below would read it as
// a number: a NaN mixture from a NaN or all -inf row must not become a finite log).
FUSEDCE_VEC_INLINE float fast_log(float x) {
  const int32_t bits = float_to_bits(x);
  // x = f 2^e with f in [sqrt(1/2), sqrt(2)).
  int32_t e = ((bits >> 23) & 0xff) - 126;
  float f = bits_to_float((bits & 0x007fffff) | 0x3f000000);  // in [0.5, 1)
  const bool small = f < 0.707106781186547524f;
  e -= static_cast<int32_t>(small);
  f = f + sel(small, f, 0.0f) - 1.0f;
  const float f2 = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float ef = static_cast<float>(e);
  float y = p * f * f2;
  y += -2.12194440e-4f * ef;
  y += -0.5f * f2;
  return sel(x != x, x, f + y + 0.693359375f * ef);
}

// The per-element exp / log of terms.h: the vectorizable float versions, the library in double.
FUSEDCE_VEC_INLINE float vexp(float x) { return fast_exp(x); }
FUSEDCE_VEC_INLINE double vexp(double x) { return std::exp(x); }
FUSEDCE_VEC_INLINE float vlog(float x) { return fast_log(x); }
FUSEDCE_VEC_INLINE double vlog(double x) { return std::log(x); }

}  // namespace cpu
}  // namespace fusedce
