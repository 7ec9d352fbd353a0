// The terms beyond the CE on the CPU: entropy, token log-probability, distillation against a
// teacher (forward KL, reverse KL, generalized JSD) and the clipped policy-gradient objective.
// They share the row's softmax with the CE (row_math.h): one pass of statistics per row (plus one
// more for the JSD, whose summand needs both normalizers), one gradient pass.
//
// Notation per row: z = final student logits, p = softmax(z), lse; u = z / T, q = softmax(u),
// lse_u; y = teacher logits / T, r = softmax(y), lse_y (T = distillation temperature).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "row_math.h"
#include "vec_math.h"

namespace fusedce {
namespace cpu {

enum DistillKind : int64_t { kNoDistill = 0, kForwardKL = 1, kReverseKL = 2, kJSD = 3 };

// Per-call constants of the extra terms. Row-indexed pointers are offset to row 0 of the call.
template <typename acc_t>
struct Terms {
  bool any = false;         // anything below is on (else the plain CE path runs)
  acc_t ce_weight = 1;      // weight of the CE + smoothing part (the z-loss is separate)
  bool entropy = false;     // compute the entropy of p
  acc_t entropy_coef = 0;   // token_loss += entropy_coef * H
  int64_t distill = kNoDistill;
  acc_t distill_weight = 1, beta = 0.5, inv_T = 1;
  bool policy = false;      // advantages given
  const acc_t* old_logprobs = nullptr;  // nullptr: the current log-prob (ratio 1)
  const acc_t* advantages = nullptr;
  const acc_t* ref_logprobs = nullptr;  // nullptr: no KL term
  acc_t eps_low = 0.2, eps_high = 0.2, kl_beta = 0;
  const acc_t* policy_weights = nullptr;   // nullptr: 1 (multiplies the policy part only)
  const acc_t* entropy_weights = nullptr;  // nullptr: 1 (multiplies entropy_coef)
  int64_t policy_kind = 0;                 // 0 clipped, 1 cispo, 2 sapo
  acc_t delta = 0;                         // > 0: two-sided clipping of the unclipped ratio
  bool kl_bias_correction = false;         // KL term k3 * ratio
  acc_t sapo_tau_pos = 1, sapo_tau_neg = 1.05;
  bool moments = false;     // sum z and sum p^2 (mean_logit, log_sum_sq_prob outputs)
};

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Sums of a row relative to per-distribution shifts (the running maxima), mergeable tile by tile:
//   s  = sum e^(z-m),  hz   = sum e^(z-m) (z-m)                    (entropy of p)
//   su = sum e^(u-mu), hu_u = sum e^(u-mu) (u-mu), hu_y = sum e^(u-mu) (y-my)   (under q)
//   sy = sum e^(y-my), hy_y = sum e^(y-my) (y-my), hy_u = sum e^(y-my) (u-mu)   (under r)
// with mu = m / T (u is z scaled by 1/T > 0, so its maximum is m / T).
struct ExtSums {
  double m = kNegInf, s = 0, hz = 0;
  double su = 0, hu_u = 0, hu_y = 0;
  double my = kNegInf, sy = 0, hy_y = 0, hy_u = 0;
  // filled by the JSD pass
  double jsd = 0, jsd_s = 0;
  // moments: sz = sum z (no shift), s2 = sum e^(2(z-m)) (relative to m, like s)
  double sz = 0, s2 = 0;
};

// Re-expresses the sums of `x` relative to the shifts (m2, my2) >= its own.
inline void rescale(ExtSums& x, double m2, double my2, double inv_T) {
  const double mu = x.m * inv_T, mu2 = m2 * inv_T;
  if (x.s > 0) {
    const double f = std::exp(x.m - m2);
    x.hz = f * (x.hz + (x.m - m2) * x.s);
    x.s *= f;
    x.s2 *= f * f;
  }
  if (x.su > 0) {
    const double f = std::exp(mu - mu2);
    x.hu_u = f * (x.hu_u + (mu - mu2) * x.su);
    x.hu_y = f * (x.hu_y + (x.my - my2) * x.su);
    x.su *= f;
  }
  if (x.sy > 0) {
    const double f = std::exp(x.my - my2);
    x.hy_y = f * (x.hy_y + (x.my - my2) * x.sy);
    x.hy_u = f * (x.hy_u + (mu - mu2) * x.sy);
    x.sy *= f;
  }
  x.m = m2;
  x.my = my2;
}

inline void merge(ExtSums& a, ExtSums b, double inv_T) {
  const double m2 = std::max(a.m, b.m), my2 = std::max(a.my, b.my);
  rescale(a, m2, my2, inv_T);
  rescale(b, m2, my2, inv_T);
  a.s += b.s;
  a.hz += b.hz;
  a.su += b.su;
  a.hu_u += b.hu_u;
  a.hu_y += b.hu_y;
  a.sy += b.sy;
  a.hy_y += b.hy_y;
  a.hy_u += b.hy_u;
  a.sz += b.sz;
  a.s2 += b.s2;
}

// One block's sums (ExtSums' fields, relative to the tile's shifts m, mu = m / T, my) added to t.
// kT1: T = 1, so u = z and q's exp is p's.
template <bool kDistill, bool kT1, bool kMoments, typename f_t>
FUSEDCE_BLOCK_FN void ext_block(const f_t* z, const f_t* b, int64_t n, f_t m, f_t mu, f_t my,
                                f_t inv_T, ExtSums& t) {
  constexpr f_t ninf = -std::numeric_limits<f_t>::infinity();
  f_t s = 0, hz = 0, s2 = 0, su = 0, hu_u = 0, hu_y = 0, sy = 0, hy_y = 0, hy_u = 0;
#pragma omp simd reduction(+ : s, hz, s2, su, hu_u, hu_y, sy, hy_y, hy_u)
  for (int64_t k = 0; k < n; ++k) {
    // A masked class (z = -inf) adds 0 (and would make 0 * -inf = nan).
    const bool live = z[k] != ninf;
    const f_t zf = z[k] - m;
    const f_t e = sel(live, vexp(zf), f_t(0));
    s += e;
    hz += sel(live, e * zf, f_t(0));
    if (kMoments) s2 += e * e;
    if (kDistill) {
      const f_t uf = kT1 ? zf : z[k] * inv_T - mu;
      const f_t eu = kT1 ? e : sel(live, vexp(uf), f_t(0));
      const f_t yf = b[k] * inv_T - my;
      su += eu;
      hu_u += sel(live, eu * uf, f_t(0));
      hu_y += sel(live, eu * yf, f_t(0));
      const bool ylive = b[k] != ninf;
      const f_t ey = sel(ylive, vexp(yf), f_t(0));
      sy += ey;
      hy_y += sel(ylive, ey * yf, f_t(0));
      hy_u += sel(ylive, ey * uf, f_t(0));
    }
  }
  t.s += s;
  t.hz += hz;
  t.s2 += s2;
  t.su += su;
  t.hu_u += hu_u;
  t.hu_y += hu_y;
  t.sy += sy;
  t.hy_y += hy_y;
  t.hy_u += hy_u;
  if (kMoments) {  // sum z has both signs: summed in double from the start
    double sz = 0;
#pragma omp simd reduction(+ : sz)
    for (int64_t k = 0; k < n; ++k) sz += static_cast<double>(z[k]);
    t.sz += sz;
  }
}

// Folds one tile of a row (raw student logits a, teacher logits b or nullptr, n columns) into the
// sums: the tile's maxima first, then the sums relative to them, then one merge.
// a_t: the logits' storage type (the shard ops read a rank's logits in the input dtype).
template <typename acc_t, typename a_t>
inline void accumulate_ext(const Epilogue<acc_t>& ep, const Terms<acc_t>& tm, const a_t* a,
                           const acc_t* b, int64_t n, ExtSums& st) {
  using f_t = acc_t;
  const f_t inv_T = tm.inv_T;
  const bool distill = tm.distill != kNoDistill;
  const f_t m = max_final_logit(ep, a, n);
  // max(b / T) = max(b) / T: scaling by 1/T > 0 keeps the order (and rounds monotonically).
  const f_t my = b ? max_of_array(b, n) * inv_T : -std::numeric_limits<f_t>::infinity();
  f_t zb[kBlock];
  const f_t mu = m * inv_T;
  ExtSums t;
  t.m = m;
  t.my = my;
  const bool t1 = inv_T == f_t(1);
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t nb = std::min(kBlock, n - j0);
    load_final_logits(ep, a + j0, nb, zb);
    const f_t* bb = distill ? b + j0 : nullptr;
    if (!distill) {
      if (tm.moments) {
        ext_block<false, false, true>(zb, bb, nb, m, mu, my, inv_T, t);
      } else {
        ext_block<false, false, false>(zb, bb, nb, m, mu, my, inv_T, t);
      }
    } else if (t1) {
      if (tm.moments) {
        ext_block<true, true, true>(zb, bb, nb, m, mu, my, inv_T, t);
      } else {
        ext_block<true, true, false>(zb, bb, nb, m, mu, my, inv_T, t);
      }
    } else if (tm.moments) {
      ext_block<true, false, true>(zb, bb, nb, m, mu, my, inv_T, t);
    } else {
      ext_block<true, false, false>(zb, bb, nb, m, mu, my, inv_T, t);
    }
  }
  merge(st, t, inv_T);
}

// The log-normalizers of q = softmax(z / T) and r = softmax(teacher / T) from a row's sums.
inline double lse_u_of(const ExtSums& st, double inv_T) { return st.m * inv_T + std::log(st.su); }
inline double lse_y_of(const ExtSums& st) { return st.my + std::log(st.sy); }

inline double log_add_exp(double x, double y) {
  const double mx = std::max(x, y);
  if (mx == kNegInf) return kNegInf;
  return mx + std::log(std::exp(x - mx) + std::exp(y - mx));
}

// log m of the JSD's mixture m = beta r + (1 - beta) q, given r = e^lr and q = e^lq already:
// one log instead of log_add_exp's two more exps, unless m is below the normal range (then the
// log-domain form keeps its precision).
inline double log_mixture(double r, double q, double lr, double lq, double beta, double lb,
                          double l1b) {
  const double m = beta * r + (1 - beta) * q;
  return m >= std::numeric_limits<double>::min() ? std::log(m) : log_add_exp(lr + lb, lq + l1b);
}

// log_mixture in the per-element loops. float: the one-log form, the argument clamped to the
// smallest normal float (vexp has flushed anything smaller to 0, and every use multiplies by r or
// q > 0, which bounds m below by beta r or (1 - beta) q: the clamp moves terms below 1e-37).
FUSEDCE_VEC_INLINE float log_mixture_v(float r, float q, float, float, float beta, float, float) {
  const float m = beta * r + (1 - beta) * q;
  // m < min, not m >= min: a NaN m (a NaN or all -inf teacher row) must stay NaN, never a clamp.
  return vlog(sel(m < std::numeric_limits<float>::min(), std::numeric_limits<float>::min(), m));
}
inline double log_mixture_v(double r, double q, double lr, double lq, double beta, double lb,
                            double l1b) {
  return log_mixture(r, q, lr, lq, beta, lb, l1b);
}

// One block of the JSD pass (accumulate_jsd), added to st.jsd / st.jsd_s.
template <typename f_t>
FUSEDCE_BLOCK_FN void jsd_block(const f_t* z, const f_t* b, int64_t n, f_t inv_T, f_t lu, f_t ly,
                                f_t beta, f_t lb, f_t l1b, ExtSums& st) {
  f_t jsd = 0, jsd_s = 0;
#pragma omp simd reduction(+ : jsd, jsd_s)
  for (int64_t k = 0; k < n; ++k) {
    const f_t lq = z[k] * inv_T - lu;
    const f_t lr = b[k] * inv_T - ly;
    const f_t r = vexp(lr), q = vexp(lq);
    const f_t lm = log_mixture_v(r, q, lr, lq, beta, lb, l1b);
    // r = 0 (lr = -inf, or below the range) adds 0, as does q = 0; a NaN (a NaN or all -inf
    // row, whose normalizer is then -inf or NaN) is added, so the loss is NaN, as on the GPU.
    const f_t jr = sel(r == 0, f_t(0), beta * r * (lr - lm));
    const f_t jq = sel(q == 0, f_t(0), (1 - beta) * q * (lq - lm));
    jsd += jr + jq;
    jsd_s += jq;
  }
  st.jsd += jsd;
  st.jsd_s += jsd_s;
}

// The JSD pass over one tile, once lse_u and lse_y are known: the divergence and
// S = sum_j q_j (1 - beta) (log q_j - log m_j), the mean that its gradient subtracts.
template <typename acc_t, typename a_t>
inline void accumulate_jsd(const Epilogue<acc_t>& ep, const Terms<acc_t>& tm, const a_t* a,
                           const acc_t* b, int64_t n, double lse_u, double lse_y, ExtSums& st) {
  using f_t = acc_t;
  const f_t beta = tm.beta, inv_T = tm.inv_T;
  const f_t lb = std::log(beta), l1b = std::log1p(-beta);
  const f_t lu = static_cast<f_t>(lse_u), ly = static_cast<f_t>(lse_y);
  f_t zb[kBlock];
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t nb = std::min(kBlock, n - j0);
    load_final_logits(ep, a + j0, nb, zb);
    jsd_block(zb, b + j0, nb, inv_T, lu, ly, beta, lb, l1b, st);
  }
}

// Everything the gradient pass needs for one row, beyond the CE's RowGrad:
//   d/dz_j += coef_e * p_j (z_j - lse) + lam * [distillation term at j]
template <typename acc_t>
struct ExtGrad {
  double coef_e = 0;  // entropy: -(upstream of H)
  double lam = 0;     // distillation: upstream * distill_weight / T (0: off)
  double lse_u = 0, lse_y = 0, rkl = 0, jsd_s = 0;
};

// Per-row values of the extra terms and the gradient coefficients they add to RowGrad.
template <typename acc_t>
struct ExtRow {
  double entropy = 0, logprob = 0, loss = 0;  // loss: the extra terms' part of token_loss
  ExtGrad<acc_t> grad;
};

// Finalizes a row. g: upstream of token_loss; g_h: of the entropy output; g_lp: of the log-prob
// output. Adds the extra terms' coefficients to rg (built by RowGrad::make with ce_weight folded).
template <typename acc_t>
inline ExtRow<acc_t> finish_ext(const Terms<acc_t>& tm, const ExtSums& st,
                                const RowStats<acc_t>& base, int64_t row, int64_t target,
                                bool valid, double g, double g_h, double g_lp, RowGrad<acc_t>& rg) {
  ExtRow<acc_t> out;
  const double lse = base.lse();
  const double H = st.s > 0 ? std::log(st.s) - st.hz / st.s : 0.0;
  out.entropy = H;
  double g_h_total = g_h;
  double g_lp_total = valid ? g_lp : 0.0;
  if (valid) {
    const double lp = static_cast<double>(base.target_logit) - lse;
    out.logprob = lp;
    if (tm.entropy_coef != 0) {
      const double ec = static_cast<double>(tm.entropy_coef) *
                        (tm.entropy_weights ? static_cast<double>(tm.entropy_weights[row]) : 1.0);
      out.loss += ec * H;
      g_h_total += g * ec;
    }
    if (tm.distill != kNoDistill) {
      const double lse_u = lse_u_of(st, tm.inv_T);
      const double lse_y = lse_y_of(st);
      double d = 0;
      if (tm.distill == kForwardKL) {
        d = (st.hy_y - st.hy_u) / st.sy + std::log(st.su) - std::log(st.sy);
      } else if (tm.distill == kReverseKL) {
        d = (st.hu_u - st.hu_y) / st.su - std::log(st.su) + std::log(st.sy);
      } else {
        d = st.jsd;
      }
      out.loss += tm.distill_weight * d;
      out.grad.lam = g * tm.distill_weight * tm.inv_T;
      out.grad.lse_u = lse_u;
      out.grad.lse_y = lse_y;
      out.grad.rkl = d;
      out.grad.jsd_s = st.jsd_s;
    }
    if (tm.policy) {
      const double old = tm.old_logprobs ? static_cast<double>(tm.old_logprobs[row]) : lp;
      const double adv = tm.advantages[row];
      const double ratio = std::exp(lp - old);
      double pol = 0, dpol = 0;  // the policy part and its derivative in lp
      if (tm.policy_kind == 1) {
        // CISPO: the capped ratio is a constant weight of the log-probability.
        const double w = std::min(ratio, static_cast<double>(tm.eps_high));
        pol = -w * adv * lp;
        dpol = -w * adv;
      } else if (tm.policy_kind == 2) {
        const double tau = adv > 0 ? tm.sapo_tau_pos : tm.sapo_tau_neg;
        const double sg = 1.0 / (1.0 + std::exp(-tau * (ratio - 1.0)));
        pol = -sg * 4.0 / tau * adv;
        dpol = -4.0 * adv * sg * (1.0 - sg) * ratio;
      } else {
        // c1 = min(ratio, delta) (delta > 0), c2 = clip(ratio); -min(c1 A, c2 A). At a tie
        // torch.minimum splits the gradient evenly, and clamp passes it at the bounds.
        const double lo = 1.0 - tm.eps_low, hi = 1.0 + tm.eps_high, dl = tm.delta;
        const double c1 = dl > 0 ? std::min(ratio, dl) : ratio;
        const double d1 = dl > 0 && ratio > dl ? 0.0 : ratio;
        const double c2 = std::min(std::max(ratio, lo), hi);
        const double d2 = ratio >= lo && ratio <= hi ? ratio : 0.0;
        const double un = c1 * adv, cl = c2 * adv;
        pol = -std::min(un, cl);
        dpol = un < cl ? -adv * d1 : (un > cl ? -adv * d2 : -0.5 * adv * (d1 + d2));
      }
      if (tm.policy_weights) {
        const double w = tm.policy_weights[row];
        pol *= w;
        dpol *= w;
      }
      out.loss += pol;
      double dlp = dpol;
      if (tm.ref_logprobs) {
        const double dref = static_cast<double>(tm.ref_logprobs[row]) - lp;
        const double k3 = std::exp(dref) - dref - 1.0, dk3 = 1.0 - std::exp(dref);
        if (tm.kl_bias_correction) {
          // d(k3 r)/dlp = k3' r + k3 r (the ratio keeps its gradient, as in TRL)
          out.loss += tm.kl_beta * k3 * ratio;
          dlp += tm.kl_beta * (dk3 + k3) * ratio;
        } else {
          out.loss += tm.kl_beta * k3;
          dlp += tm.kl_beta * dk3;
        }
      }
      g_lp_total += g * dlp;
    }
  }
  // d logp/dz_j = [j == t] - p_j;  dH/dz_j = -p_j (z_j - lse) - H p_j.
  if (g_lp_total != 0) {
    rg.coef_p -= static_cast<acc_t>(g_lp_total);
    rg.coef_t -= static_cast<acc_t>(g_lp_total);
    rg.target = target;
  }
  if (g_h_total != 0) {
    out.grad.coef_e = -g_h_total;
    rg.coef_p -= static_cast<acc_t>(g_h_total * H);
  }
  return out;
}

// One block of the gradient pass: dz[k] = d(loss)/dz at z[k], without the class-weight and target
// terms (row_backward_ext adds those). DK: the distillation kind (0: none); kT1: T = 1, where
// q = p e^(lse - lse_u) saves an exp.
template <int64_t DK, bool kT1, typename f_t>
FUSEDCE_BLOCK_FN void grad_block(const f_t* z, const f_t* b, int64_t n, f_t lse, f_t coef_p,
                                 f_t coef_e, f_t lam, f_t inv_T, f_t lse_u, f_t lse_y, f_t rkl,
                                 f_t jsd_s, f_t beta, f_t lb, f_t l1b, f_t* dz) {
  const f_t du = lse - lse_u, fu = kT1 ? vexp(du) : f_t(1);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const f_t zl = z[k] - lse;
    const f_t p = vexp(zl);
    f_t d = coef_p * p;
    d += sel(p == 0, f_t(0), coef_e * p * zl);  // == 0, not > 0: a NaN passes through
    if (DK != kNoDistill) {
      const f_t lq = kT1 ? zl + du : z[k] * inv_T - lse_u;
      const f_t lr = b[k] * inv_T - lse_y;
      const f_t q = kT1 ? p * fu : vexp(lq);
      if (DK == kForwardKL) {
        d += lam * (q - vexp(lr));
      } else if (DK == kReverseKL) {
        d += sel(q == 0, f_t(0), lam * q * (lq - lr - rkl));
      } else {
        const f_t lm = log_mixture_v(vexp(lr), q, lr, lq, beta, lb, l1b);
        d += sel(q == 0, f_t(0), lam * q * ((1 - beta) * (lq - lm) - jsd_s));
      }
    }
    dz[k] = d;
  }
}

// Reads raw logits a[0, n) (columns v0 + j; teacher b or nullptr) and writes d/da into out,
// which may alias a: the CE part of RowGrad plus the extra terms of ExtGrad.
template <typename acc_t, typename a_t, typename out_t>
inline void row_backward_ext(const Epilogue<acc_t>& ep, const Terms<acc_t>& tm,
                             const RowGrad<acc_t>& rg, const ExtGrad<acc_t>& eg, const a_t* a,
                             const acc_t* b, int64_t v0, int64_t n, out_t* out) {
  using f_t = acc_t;
  const f_t beta = tm.beta, inv_T = tm.inv_T;
  const f_t lb = std::log(beta), l1b = std::log1p(-beta);
  const int64_t DK = eg.lam != 0 ? tm.distill : int64_t(kNoDistill);
  const bool t1 = inv_T == f_t(1);
  const f_t lse = rg.lse, coef_p = rg.coef_p, coef_e = static_cast<f_t>(eg.coef_e),
            lam = static_cast<f_t>(eg.lam), lse_u = static_cast<f_t>(eg.lse_u),
            lse_y = static_cast<f_t>(eg.lse_y), rkl = static_cast<f_t>(eg.rkl),
            jsd_s = static_cast<f_t>(eg.jsd_s);
  f_t zb[kBlock], dz[kBlock];
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t nb = std::min(kBlock, n - j0);
    load_final_logits(ep, a + j0, nb, zb);
    const f_t* bb = b ? b + j0 : nullptr;
#define FUSEDCE_GRAD_BLOCK(K, T1)                                                                 \
  grad_block<K, T1>(zb, bb, nb, lse, coef_p, coef_e, lam, inv_T, lse_u, lse_y, rkl, jsd_s, beta, \
                    lb, l1b, dz)
    switch (DK) {
      case kForwardKL:
        if (t1) FUSEDCE_GRAD_BLOCK(kForwardKL, true); else FUSEDCE_GRAD_BLOCK(kForwardKL, false);
        break;
      case kReverseKL:
        if (t1) FUSEDCE_GRAD_BLOCK(kReverseKL, true); else FUSEDCE_GRAD_BLOCK(kReverseKL, false);
        break;
      case kJSD:
        if (t1) FUSEDCE_GRAD_BLOCK(kJSD, true); else FUSEDCE_GRAD_BLOCK(kJSD, false);
        break;
      default:
        FUSEDCE_GRAD_BLOCK(kNoDistill, false);
    }
#undef FUSEDCE_GRAD_BLOCK
    if (rg.coef_w != 0) {
      for (int64_t k = 0; k < nb; ++k) dz[k] -= rg.coef_w * ep.weight_of(v0 + j0 + k);
    }
    const int64_t tk = rg.target - v0 - j0;
    if (tk >= 0 && tk < nb) dz[tk] -= rg.coef_t;
    if (ep.softcap > 0) {
      for (int64_t k = 0; k < nb; ++k) out[j0 + k] = static_cast<out_t>(dz[k] * ep.dz_da(zb[k]));
    } else {
      const f_t s = ep.logit_scale;
#pragma omp simd
      for (int64_t k = 0; k < nb; ++k) out[j0 + k] = static_cast<out_t>(dz[k] * s);
    }
  }
}

}  // namespace cpu
}  // namespace fusedce
