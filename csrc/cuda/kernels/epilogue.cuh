// The row epilogue math: logit transform (logit_scale, softcap), the per-token loss from the row
// statistics, and the per-row coefficients of d(loss)/d(logits). Plain CUDA C++ (no torch headers).
//
// Per row i with target t (valid when t != ignore_index and 0 <= t < V), w = class weights or 1,
// W = sum_c w_c, eps = label smoothing:
//   token_loss = valid ? w_t*((1-eps)*(lse - z_t) + z_loss*lse^2) + eps/V*(W*lse - sum_c w_c z_c) : 0
//   d/dz_j     = gs * [w_t(1-eps)(p_j - [j==t]) + eps/V (W p_j - w_j) + 2 z_loss w_t lse p_j] + gl * p_j
//              = A p_j - B [j==t] - Cc w_j
//   d/da_j     = d/dz_j * logit_scale * (softcap > 0 ? 1 - (z_j/softcap)^2 : 1)
// gs = upstream gradient of token_loss (grad_scale or grad_token_loss[i]), gl = that of lse.
//
// Out-of-range targets (t outside [0, V), not ignore_index) are never used as an index. The host
// does not check them by default (that would read a device flag back: one host sync per call), so
// the kernels make them loud instead: the token's loss is NaN (hence a NaN reduced loss), and so
// is its whole gradient row whenever gs != 0 (a GradScaler then skips the step). The lse stays
// exact and its gradient (gl) too; predicted is -1 as for an ignored token. The host-side check
// with the index and value is the opt-in validation mode (csrc/validate.h).

#pragma once

#include "common.cuh"
#include "launchers.h"

namespace fusedce {
namespace kern {

template <typename A>
struct Epi {
  A logit_scale;
  A softcap;      // 0 = off
  A inv_softcap;  // 1/softcap (0 when off)
  A eps;
  A z_loss;
  const A* class_weight;      // [V] or nullptr
  const A* class_weight_sum;  // device scalar or nullptr (then W = V)
  int64_t V;
  int64_t ignore_index;

  __device__ __forceinline__ A z(A a) const {
    A s = a * logit_scale;
    if (softcap > A(0)) s = softcap * acc_tanh(s * inv_softcap);
    return s;
  }
  // dz/da at the transformed value z.
  __device__ __forceinline__ A dz_da(A zz) const {
    if (softcap > A(0)) {
      const A r = mul_rn(zz, inv_softcap);
      return mul_rn(logit_scale, fma_rn(-r, r, A(1)));  // one rounding order everywhere
    }
    return logit_scale;
  }
  __device__ __forceinline__ bool valid(int64_t t) const {
    return t != ignore_index && t >= 0 && t < V;
  }
  __device__ __forceinline__ bool bad(int64_t t) const {
    return t != ignore_index && (t < 0 || t >= V);
  }
  __device__ __forceinline__ A w(int64_t j) const { return class_weight ? class_weight[j] : A(1); }
  __device__ __forceinline__ A wsum() const {
    return class_weight_sum ? *class_weight_sum : static_cast<A>(V);
  }

  __device__ __forceinline__ A token_loss(bool ok, int64_t t, A lse, A zt, A wz) const {
    if (!ok) return bad(t) ? quiet_nan<A>() : A(0);
    const A wt = w(t);
    A r = wt * ((A(1) - eps) * (lse - zt) + z_loss * lse * lse);
    if (eps != A(0)) r += eps / static_cast<A>(V) * (wsum() * lse - wz);
    return r;
  }

  // Coefficients of d/dz_j = A p_j - B [j==t] - Cc w_j.
  __device__ __forceinline__ void grad_coefs(bool ok, int64_t t, A lse, A gs, A gl, A& cA, A& cB,
                                             A& cC) const {
    if (!ok) {
      cA = bad(t) && gs != A(0) ? quiet_nan<A>() : gl;
      cB = A(0);
      cC = A(0);
      return;
    }
    const A wt = w(t);
    const A e = eps / static_cast<A>(V);
    cA = gs * (wt * (A(1) - eps) + e * wsum() + A(2) * z_loss * wt * lse) + gl;
    cB = gs * wt * (A(1) - eps);
    cC = gs * e;
  }
};

template <typename A>
inline Epi<A> make_epi(const gpu::EpiParams& p) {
  Epi<A> e;
  e.logit_scale = static_cast<A>(p.logit_scale);
  e.softcap = static_cast<A>(p.softcap > 0 ? p.softcap : 0.0);
  e.inv_softcap = static_cast<A>(p.softcap > 0 ? 1.0 / p.softcap : 0.0);
  e.eps = static_cast<A>(p.label_smoothing);
  e.z_loss = static_cast<A>(p.z_loss);
  e.class_weight = static_cast<const A*>(p.class_weight);
  e.class_weight_sum = static_cast<const A*>(p.class_weight_sum);
  e.V = p.V;
  e.ignore_index = p.ignore_index;
  return e;
}

}  // namespace kern
}  // namespace fusedce
