// The row math of the terms beyond the CE, in the pieces that both the whole-row kernel
// (terms_kernels.cu) and the vocab-parallel shard kernels (shard_terms.cu) are composed of, so that
// every term is written once on the GPU (csrc/cpu/terms.h is the CPU twin, same names):
//   (a) row_sums    block-level maxima and sums over V columns of a row (pass 1/2)
//   (b) jsd_sums    block-level JSD pass, given both normalizers (pass 3)
//   (c) finish_row  the per-row values and gradient coefficients from the merged sums: scalar code,
//                   run by every thread of a block (terms_kernel) or by one thread per row
//                   (shard_finish)
//   (d) grad_pass   d(loss)/d(raw logits) in place over V columns, from the coefficients (pass 4)
// Columns are local to the V columns given (class_weight points at their slice, the target column
// and the argmax are local): a shard's caller adds its vocabulary offset.
// Plain CUDA C++ (no torch).
#pragma once

#include "common.cuh"
#include "epilogue.cuh"
#include "row_iter.cuh"

namespace fusedce {
namespace kern {

constexpr int kTermsNoCol = INT32_MAX;

// Per-call constants of the terms; row-indexed pointers are offset to row 0 of the call.
template <typename A>
struct TermsK {
  A ce_weight, entropy_coef;
  int distill;
  A distill_weight, beta, inv_T;
  A eps_low, eps_high, kl_beta;
  const A* advantages;
  const A* old_logprobs;
  const A* ref_logprobs;
  const A* policy_weights;   // nullptr: 1 (multiplies the policy part only)
  const A* entropy_weights;  // nullptr: 1 (multiplies entropy_coef)
  int policy_kind;           // 0 clipped, 1 cispo, 2 sapo
  A delta;                   // > 0: two-sided clipping of the unclipped ratio
  bool kl_bias_correction;   // KL term k3 * ratio
  A sapo_tau_pos, sapo_tau_neg;
};

template <typename A>
inline TermsK<A> make_terms_k(const gpu::TermsParams& tp) {
  TermsK<A> tk;
  tk.ce_weight = static_cast<A>(tp.ce_weight);
  tk.entropy_coef = static_cast<A>(tp.entropy_coef);
  tk.distill = tp.distill;
  tk.distill_weight = static_cast<A>(tp.distill_weight);
  tk.beta = static_cast<A>(tp.beta);
  tk.inv_T = static_cast<A>(tp.inv_T);
  tk.eps_low = static_cast<A>(tp.eps_low);
  tk.eps_high = static_cast<A>(tp.eps_high);
  tk.kl_beta = static_cast<A>(tp.kl_beta);
  tk.advantages = static_cast<const A*>(tp.advantages);
  tk.old_logprobs = static_cast<const A*>(tp.old_logprobs);
  tk.ref_logprobs = static_cast<const A*>(tp.ref_logprobs);
  tk.policy_weights = static_cast<const A*>(tp.policy_weights);
  tk.entropy_weights = static_cast<const A*>(tp.entropy_weights);
  tk.policy_kind = tp.policy_kind;
  tk.delta = static_cast<A>(tp.delta);
  tk.kl_bias_correction = tp.kl_bias_correction;
  tk.sapo_tau_pos = static_cast<A>(tp.sapo_tau_pos);
  tk.sapo_tau_neg = static_cast<A>(tp.sapo_tau_neg);
  return tk;
}

// Accurate exp / log1p / min / max for the per-row scalars (acc_exp of common.cuh, the fast
// approximate exp of the CE kernels, is used per element).
__device__ __forceinline__ float xexp(float x) { return expf(x); }
__device__ __forceinline__ double xexp(double x) { return exp(x); }
__device__ __forceinline__ float xlog1p(float x) { return log1pf(x); }
__device__ __forceinline__ double xlog1p(double x) { return log1p(x); }
__device__ __forceinline__ float xmin(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double xmin(double a, double b) { return fmin(a, b); }

template <typename A>
__device__ __forceinline__ A log_add_exp(A x, A y) {
  const A mx = acc_max(x, y);
  if (mx == neg_inf<A>()) return mx;
  return mx + acc_log(xexp(x - mx) + xexp(y - mx));
}

// The sums of a row (csrc/cpu/terms.h's ExtSums) relative to its maxima m (of z) and my (of the
// teacher's y = b / T); mu = m / T.
template <typename A>
struct RowSums {
  A m, my;
  int im;  // the first argmax (local column; kTermsNoCol: none seen)
  A zt;    // z at the target's column (0 without one)
  A v[9];  // s, hz, wz, su, hu_u, hu_y, sy, hy_y, hy_u
  A mom[2];  // MOM: sum z, sum e^(2(z-m))
};

// (a) Pass 1/2 of a row in one read, online: each thread keeps its sums relative to its running
// maxima and re-expresses them when a maximum grows (the rule of csrc/cpu/terms.h's rescale); the
// block then agrees on the maxima, every thread shifts its sums to them, and one block sum adds
// them up. At T = 1, u = z: q's sums are p's. DK: the distillation kind (0 off, 1 forward KL,
// 2 reverse KL, 3 JSD), so that each kind accumulates only the sums it reads; MOM: the moments.
// want_wz: accumulate sum w z (label smoothing). tcol: the target's column (-1: none). Every
// thread gets the totals.
template <int NT, typename T, typename A, int DK, bool MOM>
__device__ __forceinline__ void row_sums(const T* a, const T* b, int V, int tcol, const Epi<A>& ep,
                                         A inv_T, bool want_wz, A* red, int64_t* red_i,
                                         RowSums<A>& r) {
  constexpr bool distill = DK != 0;
  const A ninf = neg_inf<A>();
  const bool t1 = inv_T == A(1);
  A m = ninf, my = ninf;
  int im = kTermsNoCol;
  A (&v)[9] = r.v;
  A (&mom)[2] = r.mom;
#pragma unroll
  for (int k = 0; k < 9; ++k) v[k] = A(0);
  mom[0] = mom[1] = A(0);
  auto shift_z = [&](A m2) {  // m2 > m; sums that are 0 stay 0 (and -inf - -inf never forms)
    const A d = m - m2;
    if (v[0] > A(0)) {
      const A f = acc_exp(d);
      v[1] = f * (v[1] + d * v[0]);
      v[0] *= f;
      if (MOM) mom[1] *= f * f;
    }
    if (distill) {
      const A du = d * inv_T;
      if (v[3] > A(0)) {
        const A fu = acc_exp(du);
        if (DK == 2) {
          v[4] = fu * (v[4] + du * v[3]);
          v[5] *= fu;
        }
        v[3] *= fu;
      }
      if (DK == 1 && v[6] > A(0)) v[8] += du * v[6];
    }
    m = m2;
  };
  auto shift_y = [&](A my2) {
    const A d = my - my2;
    if (DK == 2 && v[3] > A(0)) v[5] += d * v[3];
    if (v[6] > A(0)) {
      const A f = acc_exp(d);
      if (DK == 1) {
        v[7] = f * (v[7] + d * v[6]);
        v[8] *= f;
      }
      v[6] *= f;
    }
    my = my2;
  };
  for_row<NT, T, A>(a, b, V, [&](int j, A raw, A braw) {
    const A z = ep.z(raw);
    if (z > m) {
      shift_z(z);
      im = j;
    } else if (im == kTermsNoCol) {
      im = j;  // an all -inf row: the first index, as torch.argmax
    }
    if (want_wz) v[2] += ep.w(j) * z;
    A y = A(0);
    if (distill) {
      y = braw * inv_T;
      if (y > my) shift_y(y);
    }
    const A zf = z - m;
    if (MOM) mom[0] += z;
    if (z != ninf) {
      const A e = acc_exp(zf);
      v[0] += e;
      v[1] += e * zf;
      if (MOM) mom[1] += e * e;
      if (distill) {
        const A uf = zf * inv_T;
        const A eu = t1 ? e : acc_exp(uf);
        v[3] += eu;
        if (DK == 2) {
          v[4] += eu * uf;
          v[5] += eu * (y == ninf ? ninf : y - my);  // a teacher zero under the student: KL(q||r) = inf
        }
      }
    }
    if (distill && y != ninf) {
      const A yf = y - my;
      const A ey = acc_exp(yf);
      v[6] += ey;
      if (DK == 1) {
        v[7] += ey * yf;
        v[8] += ey * (z == ninf ? ninf : (z - m) * inv_T);  // a student zero: KL(r||q) = inf
      }
    }
  });
  {
    A M = m, MY = my;
    int64_t iM = im;
    block_max<NT>(M, iM, MY, red, red_i);
    if (M > m) shift_z(M);
    if (distill && MY > my) shift_y(MY);
    m = M;
    my = MY;
    im = static_cast<int>(iM);
  }
  r.zt = tcol >= 0 ? ep.z(to_acc(a[tcol])) : A(0);
  block_sum<NT>(v, red);
  if (MOM) block_sum<NT>(mom, red);
  r.m = m;
  r.my = my;
  r.im = im;
}

// (b) The JSD pass, once lse_u and lse_y are known: the divergence and
// S = sum_j q_j (1 - beta)(log q_j - log m_j), the mean its gradient subtracts (lb = log beta,
// l1b = log(1 - beta)). Every thread gets the totals.
template <int NT, typename T, typename A>
__device__ __forceinline__ void jsd_sums(const T* a, const T* b, int V, const Epi<A>& ep, A inv_T,
                                         A beta, A lb, A l1b, A lse_u, A lse_y, A* red, A& jsd,
                                         A& jsd_s) {
  const A ninf = neg_inf<A>();
  A w2[2] = {A(0), A(0)};
  for_row<NT, T, A>(a, b, V, [&](int, A raw, A braw) {
    const A lq = ep.z(raw) * inv_T - lse_u;
    const A lr = braw * inv_T - lse_y;
    const A lm = log_add_exp(lr + lb, lq + l1b);
    if (lr != ninf) w2[0] += beta * xexp(lr) * (lr - lm);
    if (lq != ninf) {
      const A q = (A(1) - beta) * xexp(lq) * (lq - lm);
      w2[0] += q;
      w2[1] += q;
    }
  });
  block_sum<NT>(w2, red);
  jsd = w2[0];
  jsd_s = w2[1];
}

// What (c) needs of a row beyond the sums: the target's logit (0 when not valid), the width of
// the whole vocabulary (V), the JSD's sums. The target's class weight and sum_c w_c come from a
// functor called only at valid rows (the whole-row kernel loads them there: no register holds
// them through the passes).
template <typename A>
struct RowIn {
  A m, my;
  A s, hz, wz, su, hu_u, hu_y, sy, hy_y, hy_u;
  A zt, V;
  A jsd, jsd_s;
};

// The row's gradient coefficients (csrc/shard_layout.h's Coef):
//   d/dz_j = cA p_j - cB [j == t] - cC w_j + cE p_j (z_j - lse) + lam * distill_j
template <typename A>
struct RowCoefs {
  A lse, cA, cB, cC, cE, lam, lse_u, lse_y, div, jsd_s;
};

template <typename A>
struct RowOut {
  RowCoefs<A> c;
  A H, loss, logprob;  // logprob: NaN at an out-of-range target, else 0 unless valid
};

// (c) The per-row values and gradient coefficients. valid: the target is a class of the
// vocabulary; bad: it is neither that nor ignore_index. Upstream gradients of token_loss (g_tok),
// lse, entropy (g_h) and logprob (g_lp, read whatever valid is: a bad row's NaN needs it).
// eps / z_loss: label smoothing and z-loss. row: the index into tk's per-row inputs.
// weights(wt, wsum): the target's class weight and sum_c w_c (1 and V without class weights).
template <typename A, int DK, typename WF>
__device__ __forceinline__ RowOut<A> finish_row(const TermsK<A>& tk, A eps, A z_loss,
                                                int64_t row, bool valid, bool bad,
                                                const RowIn<A>& in, WF&& weights, A g_tok,
                                                A g_lse, A g_h, A g_lp_in) {
  constexpr bool distill = DK != 0;
  const A inv_T = tk.inv_T;
  const A s = in.s;
  const A lse = in.m + acc_log(s);
  const A H = s > A(0) ? acc_log(s) - in.hz / s : A(0);
  const A lse_u = in.m * inv_T + acc_log(in.su), lse_y = in.my + acc_log(in.sy);
  A g_lp = valid ? g_lp_in : A(0);
  A loss = A(0), logprob = A(0), lam = A(0), div = A(0);
  A cA = g_lse, cB = A(0), cC = A(0);
  if (valid) {
    A wt, wsum;
    weights(wt, wsum);
    const A e = eps / in.V;
    const A hard = tk.ce_weight * wt * (A(1) - eps);
    loss = hard * (lse - in.zt) + wt * z_loss * lse * lse;
    if (eps != A(0)) loss += tk.ce_weight * e * (wsum * lse - in.wz);
    cA += g_tok * (hard + tk.ce_weight * e * wsum + A(2) * z_loss * wt * lse);
    cB = g_tok * hard;
    cC = g_tok * tk.ce_weight * e;
    logprob = in.zt - lse;
    if (tk.entropy_coef != A(0)) {
      const A ec = tk.entropy_weights ? tk.entropy_coef * tk.entropy_weights[row] : tk.entropy_coef;
      loss += ec * H;
      g_h += g_tok * ec;
    }
    if (distill) {
      if (DK == 1) {
        div = (in.hy_y - in.hy_u) / in.sy + acc_log(in.su) - acc_log(in.sy);
      } else if (DK == 2) {
        div = (in.hu_u - in.hu_y) / in.su - acc_log(in.su) + acc_log(in.sy);
      } else {
        div = in.jsd;
      }
      loss += tk.distill_weight * div;
      lam = g_tok * tk.distill_weight * inv_T;
    }
    if (tk.advantages) {
      const A old = tk.old_logprobs ? tk.old_logprobs[row] : logprob;
      const A adv = tk.advantages[row];
      const A ratio = xexp(logprob - old);
      A pol, dpol;  // the policy part and its derivative in logprob (csrc/cpu/terms.h)
      if (tk.policy_kind == 1) {
        const A w = xmin(ratio, tk.eps_high);
        pol = -w * adv * logprob;
        dpol = -w * adv;
      } else if (tk.policy_kind == 2) {
        const A tau = adv > A(0) ? tk.sapo_tau_pos : tk.sapo_tau_neg;
        const A sg = A(1) / (A(1) + xexp(-tau * (ratio - A(1))));
        pol = -sg * A(4) / tau * adv;
        dpol = A(-4) * adv * sg * (A(1) - sg) * ratio;
      } else {
        const A lo = A(1) - tk.eps_low, hi = A(1) + tk.eps_high, dl = tk.delta;
        const A c1 = dl > A(0) ? xmin(ratio, dl) : ratio;
        const A d1 = dl > A(0) && ratio > dl ? A(0) : ratio;
        const A c2 = xmin(acc_max(ratio, lo), hi);
        const A d2 = ratio >= lo && ratio <= hi ? ratio : A(0);
        const A un = c1 * adv, cl = c2 * adv;
        pol = -xmin(un, cl);
        dpol = un < cl ? -adv * d1 : (un > cl ? -adv * d2 : A(-0.5) * adv * (d1 + d2));
      }
      if (tk.policy_weights) {
        const A w = tk.policy_weights[row];
        pol *= w;
        dpol *= w;
      }
      loss += pol;
      A dlp = dpol;
      if (tk.ref_logprobs) {
        const A d = tk.ref_logprobs[row] - logprob;
        const A k3 = xexp(d) - d - A(1), dk3 = A(1) - xexp(d);
        if (tk.kl_bias_correction) {
          loss += tk.kl_beta * k3 * ratio;
          dlp += tk.kl_beta * (dk3 + k3) * ratio;
        } else {
          loss += tk.kl_beta * k3;
          dlp += tk.kl_beta * dk3;
        }
      }
      g_lp += g_tok * dlp;
    }
  }
  // An out-of-range target (epilogue.cuh): NaN loss and log-prob, and a NaN gradient row when an
  // upstream gradient of either is nonzero; the entropy, the lse and their gradients stay exact.
  if (bad) {
    loss = quiet_nan<A>();
    logprob = quiet_nan<A>();
    if (g_tok != A(0) || g_lp_in != A(0)) cA = quiet_nan<A>();
  }
  // d logp/dz_j = [j == t] - p_j;  dH/dz_j = -p_j (z_j - lse) - H p_j
  cA -= g_lp;
  cB -= g_lp;
  cA -= g_h * H;
  RowOut<A> o;
  o.c.lse = lse;
  o.c.cA = cA;
  o.c.cB = cB;
  o.c.cC = cC;
  o.c.cE = -g_h;
  o.c.lam = lam;
  o.c.lse_u = lse_u;
  o.c.lse_y = lse_y;
  o.c.div = div;
  o.c.jsd_s = in.jsd_s;
  o.H = H;
  o.loss = loss;
  o.logprob = logprob;
  return o;
}

// (d) The gradient, in place, over V columns (tcol: the target's local column, -1 when none;
// lb / l1b as in (b), read by the JSD only).
template <int NT, typename T, typename A, int DK>
__device__ __forceinline__ void grad_pass(T* a, const T* b, int V, int tcol, const Epi<A>& ep,
                                          A inv_T, A beta, A lb, A l1b, const RowCoefs<A>& c) {
  const bool t1 = inv_T == A(1);
  update_row<NT, T, A>(a, b, V, [&](int j, A raw, A braw) {
    const A z = ep.z(raw);
    const A zl = z - c.lse;
    const A p = acc_exp(zl);
    A dz = c.cA * p;
    if (c.cC != A(0)) dz -= c.cC * ep.w(j);
    if (j == tcol) dz -= c.cB;
    if (c.cE != A(0) && p > A(0)) dz += c.cE * p * zl;
    if (DK != 0 && c.lam != A(0)) {
      const A lq = t1 ? z - c.lse_u : z * inv_T - c.lse_u;
      const A lr = braw * inv_T - c.lse_y;
      const A q = t1 ? p : acc_exp(lq);  // at T = 1, lse_u == lse bit for bit (same sums)
      if (DK == 1) {
        dz += c.lam * (q - acc_exp(lr));
      } else if (q > A(0)) {
        if (DK == 2) {
          dz += c.lam * q * (lq - lr - c.div);
        } else {
          const A lm = log_add_exp(lr + lb, lq + l1b);
          dz += c.lam * q * ((A(1) - beta) * (lq - lm) - c.jsd_s);
        }
      }
    }
    return dz * ep.dz_da(z);
  });
}

}  // namespace kern
}  // namespace fusedce
