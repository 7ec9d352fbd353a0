// The per-row math of every op on the CPU: the final-logit transform, the online softmax
// statistics (mergeable across vocabulary tiles) and the row epilogue that turns them into the
// token loss and d(loss)/d(raw logits). One place, so the fused-linear and the given-logits ops
// cannot drift apart.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "vec_math.h"

namespace fusedce {
namespace cpu {

// Per-call constants of the epilogue.
template <typename acc_t>
struct Epilogue {
  acc_t logit_scale;
  acc_t softcap;  // <= 0: off
  acc_t inv_softcap;
  acc_t eps;  // label smoothing
  acc_t z_loss;
  acc_t ce_weight = 1;        // weight of the CE + smoothing part (terms beyond the CE: terms.h)
  const acc_t* class_weight;  // [V] or nullptr
  acc_t class_weight_sum;     // sum_c w_c (V without class weights)
  int64_t vocab;
  int64_t ignore_index;

  inline acc_t final_logit(acc_t a) const {
    const acc_t s = a * logit_scale;
    return softcap > 0 ? softcap * std::tanh(s * inv_softcap) : s;
  }
  // dz/da from z itself, so the backward never needs the raw logit again.
  inline acc_t dz_da(acc_t z) const {
    if (softcap > 0) {
      const acc_t r = z * inv_softcap;
      return logit_scale * (acc_t(1) - r * r);
    }
    return logit_scale;
  }
  inline acc_t weight_of(int64_t c) const { return class_weight ? class_weight[c] : acc_t(1); }
};

// The per-element loops of terms.h (and the no-softmax statistics below) run on blocks of kBlock
// columns: the final logits of a block are formed once into a buffer (the dtype conversion and
// the softcap's tanh, which do not vectorize), then branch-free loops (vec_math.h's exp / log,
// selects for the masked classes) run over the buffer, `#pragma omp simd` so that the reductions
// vectorize without -ffast-math. The float sums of a block (kBlock / lanes terms per lane) are
// added to double sums, so a long row still sums in double (RowStats below says why). float64
// inputs take the same loops in double with the library exp / log.
constexpr int64_t kBlock = 64;

// The block loops are kept out of line: inlined into their callers' dispatch, GCC 12 stopped
// vectorizing some of them ("control flow in loop"); one call per kBlock columns costs nothing.
// On x86-64 Linux with GCC they are also compiled for AVX-512 and AVX2 beside the baseline
// (target_clones: the loader picks the clone the CPU supports, at the first call, through an
// ifunc; the baseline SSE2 one otherwise), since the build itself targets the baseline ISA.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FUSEDCE_BLOCK_FN __attribute__((noinline, target_clones("avx512f", "avx2", "default")))
#elif defined(__GNUC__)
#define FUSEDCE_BLOCK_FN __attribute__((noinline))
#else
#define FUSEDCE_BLOCK_FN
#endif

// z[0, n) = final logits of raw a[0, n), n <= kBlock.
template <typename acc_t, typename a_t>
FUSEDCE_VEC_INLINE void load_final_logits(const Epilogue<acc_t>& ep, const a_t* a, int64_t n,
                                          acc_t* z) {
  if (ep.softcap > 0) {
    for (int64_t k = 0; k < n; ++k) z[k] = ep.final_logit(static_cast<acc_t>(a[k]));
    return;
  }
  const acc_t scale = ep.logit_scale;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) z[k] = static_cast<acc_t>(a[k]) * scale;
}

template <typename f_t>
FUSEDCE_VEC_INLINE f_t max_of(const f_t* x, int64_t n, f_t m) {
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < n; ++k) m = x[k] > m ? x[k] : m;
  return m;
}

// The maximum of x[0, n) (-inf when empty).
template <typename f_t>
FUSEDCE_BLOCK_FN f_t max_of_array(const f_t* x, int64_t n) {
  return max_of(x, n, -std::numeric_limits<f_t>::infinity());
}

// The maximum of the final logits of raw a[0, n) (-inf when empty).
template <typename acc_t, typename a_t>
FUSEDCE_BLOCK_FN acc_t max_final_logit(const Epilogue<acc_t>& ep, const a_t* a, int64_t n) {
  acc_t zb[kBlock];
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t nb = std::min(kBlock, n - j0);
    load_final_logits(ep, a + j0, nb, zb);
    m = max_of(zb, nb, m);
  }
  return m;
}

// Online softmax statistics of one row, accumulated tile by tile in increasing vocabulary order.
// The two long sums of a row (up to 256k terms, added one by one) are kept in double: a float32
// running sum would lose ~1e-4 relative there, more than the rest of the computation together.
template <typename acc_t>
struct RowStats {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  double sumexp = 0;
  acc_t target_logit = 0;
  double weighted_sum = 0;  // sum_c w_c z_c, for label smoothing
  acc_t argmax_value = -std::numeric_limits<acc_t>::infinity();
  int64_t argmax = -1;

  inline acc_t lse() const { return static_cast<acc_t>(static_cast<double>(max) + std::log(sumexp)); }
};

// accumulate_row's statistics, block by block: per block, its maximum (one vector pass; a NaN is
// passed over there and reaches the sum instead), with kSoftmax the running sum rescaled when the
// maximum grows (one scalar exp per block, not per element) and the block's exps added, the
// argmax (the first index of a block's maximum where it beats the maximum so far: strictly, so the
// first index among equal maxima wins, as in torch.argmax; a NaN first logit keeps index 0, as an
// element-by-element scan does) and the weighted sum. One final-logit transform per element.
template <bool kSoftmax, typename scalar_t, typename acc_t>
FUSEDCE_BLOCK_FN void accumulate_blocks(const Epilogue<acc_t>& ep, const scalar_t* a, int64_t v0,
                                        int64_t n, RowStats<acc_t>& st) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  acc_t zb[kBlock];
  acc_t m = st.max;
  double s = st.sumexp, wz = st.weighted_sum;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t nb = std::min(kBlock, n - j0);
    load_final_logits(ep, a + j0, nb, zb);
    if (st.argmax < 0) {
      st.argmax_value = zb[0];
      st.argmax = v0 + j0;
    }
    const acc_t bm = max_of(zb, nb, ninf);
    if (kSoftmax) {
      // exp(-inf) = 0 drops the empty sum of a row that has seen only masked classes so far
      // (s = 0, or NaN: a NaN stays).
      if (bm > m) {
        s *= static_cast<double>(std::exp(m - bm));
        m = bm;
      }
      // A -inf logit (a masked class) adds 0; skipping it also avoids exp(-inf - (-inf)) = nan
      // while the row has seen nothing finite yet. The maximum itself adds exactly 1, also when
      // it is +inf (lse = +inf, as an element-by-element online softmax gives, not inf - inf).
      acc_t sb = 0;
#pragma omp simd reduction(+ : sb)
      for (int64_t k = 0; k < nb; ++k) {
        sb += sel(zb[k] == ninf, acc_t(0), sel(zb[k] == m, acc_t(1), vexp(zb[k] - m)));
      }
      s += static_cast<double>(sb);
    }
    if (bm > st.argmax_value) {
      int64_t k = 0;
      while (!(zb[k] == bm)) ++k;  // bm is one of zb (max_of passes over NaNs)
      st.argmax_value = bm;
      st.argmax = v0 + j0 + k;
    }
    double w = 0;
    if (ep.class_weight) {
      const acc_t* cw = ep.class_weight + v0 + j0;
#pragma omp simd reduction(+ : w)
      for (int64_t k = 0; k < nb; ++k) w += static_cast<double>(cw[k] * zb[k]);
    } else {
#pragma omp simd reduction(+ : w)
      for (int64_t k = 0; k < nb; ++k) w += static_cast<double>(zb[k]);
    }
    wz += w;
  }
  if (kSoftmax) {
    st.max = m;
    st.sumexp = s;
  }
  st.weighted_sum = wz;
}

// Folds raw logits a[0, n) (global columns v0 + j) of one row into its statistics.
// kSoftmax = false leaves max / sumexp alone (the shard ops and the terms take the softmax sums
// from terms.h's accumulate_ext and need only the target logit, the weighted sum and the argmax
// from here).
template <typename scalar_t, typename acc_t, bool kSoftmax = true>
inline void accumulate_row(const Epilogue<acc_t>& ep, const scalar_t* a, int64_t v0, int64_t n,
                           int64_t target, RowStats<acc_t>& st) {
  if (target >= v0 && target < v0 + n) {
    st.target_logit = ep.final_logit(static_cast<acc_t>(a[target - v0]));
  }
  accumulate_blocks<kSoftmax>(ep, a, v0, n, st);
}

// The loss of a row from its statistics (0 for an ignored row); wt: the class weight of the
// target (the vocab-parallel finish has it from the shard that owns the target).
template <typename acc_t>
inline acc_t row_loss(const Epilogue<acc_t>& ep, const RowStats<acc_t>& st, int64_t target,
                      acc_t wt) {
  if (target == ep.ignore_index) return 0;
  const acc_t lse = st.lse();
  acc_t loss = wt * (ep.ce_weight * (acc_t(1) - ep.eps) * (lse - st.target_logit) +
                     ep.z_loss * lse * lse);
  if (ep.eps > 0) {
    loss += ep.ce_weight * ep.eps / static_cast<acc_t>(ep.vocab) *
            static_cast<acc_t>(ep.class_weight_sum * lse - st.weighted_sum);
  }
  return loss;
}

template <typename acc_t>
inline acc_t row_loss(const Epilogue<acc_t>& ep, const RowStats<acc_t>& st, int64_t target) {
  if (target == ep.ignore_index) return 0;
  return row_loss(ep, st, target, ep.weight_of(target));
}

// d(g * token_loss + g_lse * lse)/dz_j = coef_p * p_j - coef_w * w_j - [j == t] * coef_t.
template <typename acc_t>
struct RowGrad {
  acc_t lse, coef_p, coef_w, coef_t;
  int64_t target;

  static inline RowGrad make(const Epilogue<acc_t>& ep, acc_t lse, int64_t target, acc_t g,
                             acc_t g_lse) {
    const bool reads_wt = target != ep.ignore_index && g != 0;
    return make(ep, lse, target, g, g_lse, reads_wt ? ep.weight_of(target) : acc_t(0));
  }

  // wt: the class weight of the target (given by the vocab-parallel finish).
  static inline RowGrad make(const Epilogue<acc_t>& ep, acc_t lse, int64_t target, acc_t g,
                             acc_t g_lse, acc_t wt) {
    RowGrad r{lse, g_lse, 0, 0, -1};
    if (target != ep.ignore_index && g != 0) {
      const acc_t smooth = ep.ce_weight * ep.eps / static_cast<acc_t>(ep.vocab);
      const acc_t hard = ep.ce_weight * wt * (acc_t(1) - ep.eps);
      r.coef_p += g * (hard + smooth * ep.class_weight_sum + acc_t(2) * ep.z_loss * wt * lse);
      r.coef_w = g * smooth;
      r.coef_t = g * hard;
      r.target = target;
    }
    return r;
  }
};

// One block of row_backward: db[k] = d/da at final logits z[k] (class weights cw or nullptr;
// tk: the target's index in the block, or -1).
template <typename acc_t>
FUSEDCE_BLOCK_FN void grad_ce_block(const acc_t* z, const acc_t* cw, int64_t n, int64_t tk,
                                    acc_t lse, acc_t coef_p, acc_t coef_w, acc_t coef_t,
                                    acc_t logit_scale, acc_t inv_softcap, bool softcap, acc_t* db) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    acc_t d = coef_p * vexp(z[k] - lse);
    d -= coef_w * (cw ? cw[k] : acc_t(1));
    d -= sel(k == tk, coef_t, acc_t(0));
    // Epilogue::dz_da from z: the softcap's derivative without the raw logit.
    const acc_t r = z[k] * inv_softcap;
    db[k] = d * (softcap ? logit_scale * (acc_t(1) - r * r) : logit_scale);
  }
}

// Reads raw logits a[0, n) (columns v0 + j) and writes d/da into out[0, n); out may alias a
// (each block is read into a buffer before it is written).
template <typename scalar_t, typename acc_t, typename out_t>
inline void row_backward(const Epilogue<acc_t>& ep, const RowGrad<acc_t>& rg, const scalar_t* a,
                         int64_t v0, int64_t n, out_t* out) {
  acc_t zb[kBlock], db[kBlock];
  const bool softcap = ep.softcap > 0;
  // coef_w = 0 multiplies no class weight (a 0 * w term would be 0 anyway, but w may be absent).
  const bool weighted = rg.coef_w != 0 && ep.class_weight != nullptr;
  const acc_t coef_w = rg.coef_w;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t nb = std::min(kBlock, n - j0);
    load_final_logits(ep, a + j0, nb, zb);
    const int64_t tk = rg.target >= v0 + j0 && rg.target < v0 + j0 + nb ? rg.target - v0 - j0 : -1;
    grad_ce_block(zb, weighted ? ep.class_weight + v0 + j0 : nullptr, nb, tk, rg.lse, rg.coef_p,
                  coef_w, rg.coef_t, ep.logit_scale, softcap ? ep.inv_softcap : acc_t(0), softcap,
                  db);
    for (int64_t k = 0; k < nb; ++k) out[j0 + k] = static_cast<out_t>(db[k]);
  }
}

}  // namespace cpu
}  // namespace fusedce
