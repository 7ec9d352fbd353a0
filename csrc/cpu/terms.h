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

// Folds one tile of a row (raw student logits a, teacher logits b or nullptr, n columns) into the
// sums: the tile's maxima first, then the sums relative to them, then one merge.
// a_t: the logits' storage type (the shard ops read a rank's logits in the input dtype).
template <typename acc_t, typename a_t>
inline void accumulate_ext(const Epilogue<acc_t>& ep, const Terms<acc_t>& tm, const a_t* a,
                           const acc_t* b, int64_t n, ExtSums& st) {
  const double inv_T = tm.inv_T;
  ExtSums t;
  for (int64_t j = 0; j < n; ++j) {
    t.m = std::max(t.m, static_cast<double>(ep.final_logit(static_cast<acc_t>(a[j]))));
    if (b) t.my = std::max(t.my, static_cast<double>(b[j]) * inv_T);
  }
  const double mu = t.m * inv_T;
  const bool distill = tm.distill != kNoDistill;
  for (int64_t j = 0; j < n; ++j) {
    const double z = ep.final_logit(static_cast<acc_t>(a[j]));
    if (z != kNegInf) {  // a masked class adds 0 (and would make 0 * -inf = nan)
      const double zf = z - t.m, e = std::exp(zf);
      t.s += e;
      t.hz += e * zf;
      if (tm.moments) t.s2 += e * e;
    }
    if (tm.moments) t.sz += z;
    if (!distill) continue;
    const double uf = z * inv_T - mu;
    const double yf = b[j] * inv_T - t.my;
    if (z != kNegInf) {
      const double eu = std::exp(uf);
      t.su += eu;
      t.hu_u += eu * uf;
      t.hu_y += eu * yf;
    }
    if (yf != kNegInf) {
      const double ey = std::exp(yf);
      t.sy += ey;
      t.hy_y += ey * yf;
      t.hy_u += ey * uf;
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

// The JSD pass over one tile, once lse_u and lse_y are known: the divergence and
// S = sum_j q_j (1 - beta) (log q_j - log m_j), the mean that its gradient subtracts.
template <typename acc_t, typename a_t>
inline void accumulate_jsd(const Epilogue<acc_t>& ep, const Terms<acc_t>& tm, const a_t* a,
                           const acc_t* b, int64_t n, double lse_u, double lse_y, ExtSums& st) {
  const double beta = tm.beta, lb = std::log(beta), l1b = std::log1p(-beta);
  for (int64_t j = 0; j < n; ++j) {
    const double lq = ep.final_logit(static_cast<acc_t>(a[j])) * tm.inv_T - lse_u;
    const double lr = b[j] * tm.inv_T - lse_y;
    const double r = std::exp(lr), q = std::exp(lq);
    const double lm = log_mixture(r, q, lr, lq, beta, lb, l1b);
    if (lr != kNegInf) st.jsd += beta * r * (lr - lm);
    if (lq != kNegInf) {
      const double g = (1 - beta) * q * (lq - lm);
      st.jsd += g;
      st.jsd_s += g;
    }
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

// Reads raw logits a[0, n) (columns v0 + j; teacher b or nullptr) and writes d/da into out,
// which may alias a: the CE part of RowGrad plus the extra terms of ExtGrad.
template <typename acc_t, typename a_t, typename out_t>
inline void row_backward_ext(const Epilogue<acc_t>& ep, const Terms<acc_t>& tm,
                             const RowGrad<acc_t>& rg, const ExtGrad<acc_t>& eg, const a_t* a,
                             const acc_t* b, int64_t v0, int64_t n, out_t* out) {
  const double beta = tm.beta, lb = std::log(beta), l1b = std::log1p(-beta);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t c = v0 + j;
    const acc_t z = ep.final_logit(static_cast<acc_t>(a[j]));
    const double zl = static_cast<double>(z) - rg.lse;
    const double p = std::exp(zl);
    double dz = rg.coef_p * p;
    if (rg.coef_w != 0) dz -= rg.coef_w * ep.weight_of(c);
    if (c == rg.target) dz -= rg.coef_t;
    if (eg.coef_e != 0 && p > 0) dz += eg.coef_e * p * zl;
    if (eg.lam != 0) {
      const double lq = z * static_cast<double>(tm.inv_T) - eg.lse_u;
      const double lr = b[j] * static_cast<double>(tm.inv_T) - eg.lse_y;
      const double q = std::exp(lq);
      if (tm.distill == kForwardKL) {
        dz += eg.lam * (q - std::exp(lr));
      } else if (q > 0) {
        if (tm.distill == kReverseKL) {
          dz += eg.lam * q * (lq - lr - eg.rkl);
        } else {
          const double lm = log_mixture(std::exp(lr), q, lr, lq, beta, lb, l1b);
          dz += eg.lam * q * ((1 - beta) * (lq - lm) - eg.jsd_s);
        }
      }
    }
    out[j] = static_cast<out_t>(dz * ep.dz_da(z));
  }
}

}  // namespace cpu
}  // namespace fusedce
