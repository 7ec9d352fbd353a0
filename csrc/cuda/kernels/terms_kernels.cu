// The terms beyond the CE on whole rows: entropy, token log-probability, distillation against a
// teacher (forward KL, reverse KL, generalized JSD) and the clipped policy-gradient objective,
// together with the CE, z-loss and label smoothing of epilogue.cuh. Plain CUDA C++ (no torch).
//
// One 256-thread block per row, all from the one logits chunk the host's GEMM wrote:
//   pass 1  maxima of z (with the first argmax) and of the teacher's y = b / T
//   pass 2  the sums relative to those maxima (csrc/cpu/terms.h names them):
//           s, hz (entropy), wz (smoothing), su, hu_u, hu_y (under q), sy, hy_y, hy_u (under r)
//   pass 3  (JSD only) the divergence and the mean its gradient subtracts, with both normalizers
//   pass 4  d(loss)/d(raw logits) written in place.
// Each pass re-reads the row (16-byte vector loads); a general kernel for the extra terms, while
// the plain CE keeps the tuned kernels of row_kernels.cu.

#include "common.cuh"
#include "epilogue.cuh"
#include "launchers.h"
#include "row_iter.cuh"

namespace fusedce {
namespace kern {

constexpr int kTermsThreads = 256;
constexpr int kTermsWarps = kTermsThreads / 32;
constexpr int kTermsNoCol = INT32_MAX;

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

// DK: the distillation kind (0 off, 1 forward KL, 2 reverse KL, 3 JSD), a template parameter so
// that each kind accumulates only the sums it reads. MOM: the moments sum z and sum e^(2(z-m))
// (mean_logit, log_sum_sq outputs), a template parameter so that the other calls keep their
// registers.
template <typename T, typename A, int DK, bool MOM>
__global__ void __launch_bounds__(kTermsThreads, 4)  // <= 64 registers: 4 blocks per SM
    terms_kernel(gpu::TermsArgs g, const Epi<A> ep, const TermsK<A> tk) {
  __shared__ A red[9 * kTermsWarps];
  __shared__ int64_t red_i[kTermsWarps];
  const int64_t row = blockIdx.x;
  T* a = static_cast<T*>(g.logits) + row * g.ld;
  const T* b = g.teacher ? static_cast<const T*>(g.teacher) + row * g.ld_teacher : nullptr;
  const int V = static_cast<int>(ep.V);
  const int tid = threadIdx.x;
  const int64_t t = g.target[row];
  const bool valid = ep.valid(t);
  const int tcol = valid ? static_cast<int>(t) : -1;
  constexpr bool distill = DK != 0;
  const A inv_T = tk.inv_T;
  const A ninf = neg_inf<A>();

  // Pass 1: the statistics in one read, online: each thread keeps its sums relative to its running
  // maxima (m of z, my of the teacher's y) and re-expresses them when a maximum grows (the rule of
  // csrc/cpu/terms.h's rescale); the block then agrees on the maxima, every thread shifts its sums
  // to them, and one block sum adds them up. At T = 1, u = z: q's sums are p's.
  const bool t1 = inv_T == A(1);
  A m = ninf, my = ninf;
  int im = kTermsNoCol;
  // v: s, hz, wz, su, hu_u, hu_y, sy, hy_y, hy_u (csrc/cpu/terms.h's ExtSums)
  A v[9] = {A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0)};
  A mom[2] = {A(0), A(0)};  // MOM: sum z, sum e^(2(z-m))
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
  for_row<kTermsThreads, T, A>(a, b, V, [&](int j, A raw, A braw) {
    const A z = ep.z(raw);
    if (z > m) {
      shift_z(z);
      im = j;
    } else if (im == kTermsNoCol) {
      im = j;  // an all -inf row: the first index, as torch.argmax
    }
    if (ep.eps != A(0)) v[2] += ep.w(j) * z;
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
    block_max<kTermsThreads>(M, iM, MY, red, red_i);
    if (M > m) shift_z(M);
    if (distill && MY > my) shift_y(MY);
    m = M;
    my = MY;
    im = iM;
  }
  const A zt = valid ? ep.z(to_acc(a[t])) : A(0);
  const A mu = m * inv_T;
  block_sum<kTermsThreads>(v, red);
  if (MOM) block_sum<kTermsThreads>(mom, red);
  const A s = v[0], hz = v[1], wz = v[2], su = v[3], hu_u = v[4], hu_y = v[5], sy = v[6],
          hy_y = v[7], hy_u = v[8];
  const A lse = m + acc_log(s);
  const A H = s > A(0) ? acc_log(s) - hz / s : A(0);
  const A lse_u = mu + acc_log(su), lse_y = my + acc_log(sy);

  // Pass 3 (JSD): the divergence and S = sum_j q_j (1 - beta)(log q_j - log m_j).
  const A lb = acc_log(tk.beta), l1b = xlog1p(-tk.beta);
  A jsd = A(0), jsd_s = A(0);
  if (DK == 3) {
    A w2[2] = {A(0), A(0)};
    for_row<kTermsThreads, T, A>(a, b, V, [&](int, A raw, A braw) {
      const A lq = ep.z(raw) * inv_T - lse_u;
      const A lr = braw * inv_T - lse_y;
      const A lm = log_add_exp(lr + lb, lq + l1b);
      if (lr != ninf) w2[0] += tk.beta * xexp(lr) * (lr - lm);
      if (lq != ninf) {
        const A q = (A(1) - tk.beta) * xexp(lq) * (lq - lm);
        w2[0] += q;
        w2[1] += q;
      }
    });
    block_sum<kTermsThreads>(w2, red);
    jsd = w2[0];
    jsd_s = w2[1];
  }

  // The row's values and gradient coefficients (every thread computes the same scalars):
  //   d/dz_j = cA p_j - cB [j == t] - cC w_j + cE p_j (z_j - lse) + lam * distill_j
  const A gtok = g.g_tok ? static_cast<const A*>(g.g_tok)[row * g.g_tok_stride] : A(1);
  const A g_tok = g.write_grad ? gtok : A(0);
  const A g_lse = g.write_grad && g.g_lse ? static_cast<const A*>(g.g_lse)[row] : A(0);
  A g_h = g.write_grad && g.g_entropy ? static_cast<const A*>(g.g_entropy)[row] : A(0);
  A g_lp = g.write_grad && g.g_logprob && valid ? static_cast<const A*>(g.g_logprob)[row] : A(0);
  A loss = A(0), logprob = A(0), lam = A(0), div = A(0);
  A cA = g_lse, cB = A(0), cC = A(0);
  if (valid) {
    const A wt = ep.w(t);
    const A e = ep.eps / static_cast<A>(V);
    const A hard = tk.ce_weight * wt * (A(1) - ep.eps);
    loss = hard * (lse - zt) + wt * ep.z_loss * lse * lse;
    if (ep.eps != A(0)) loss += tk.ce_weight * e * (ep.wsum() * lse - wz);
    cA += g_tok * (hard + tk.ce_weight * e * ep.wsum() + A(2) * ep.z_loss * wt * lse);
    cB = g_tok * hard;
    cC = g_tok * tk.ce_weight * e;
    logprob = zt - lse;
    if (tk.entropy_coef != A(0)) {
      const A ec = tk.entropy_weights ? tk.entropy_coef * tk.entropy_weights[row] : tk.entropy_coef;
      loss += ec * H;
      g_h += g_tok * ec;
    }
    if (distill) {
      if (DK == 1) {
        div = (hy_y - hy_u) / sy + acc_log(su) - acc_log(sy);
      } else if (DK == 2) {
        div = (hu_u - hu_y) / su - acc_log(su) + acc_log(sy);
      } else {
        div = jsd;
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
  const bool bad = ep.bad(t);
  if (bad) {
    loss = quiet_nan<A>();
    logprob = quiet_nan<A>();
    const A g_lp_in = g.write_grad && g.g_logprob ? static_cast<const A*>(g.g_logprob)[row] : A(0);
    if (g_tok != A(0) || g_lp_in != A(0)) cA = quiet_nan<A>();
  }
  // d logp/dz_j = [j == t] - p_j;  dH/dz_j = -p_j (z_j - lse) - H p_j
  cA -= g_lp;
  cB -= g_lp;
  const A cE = -g_h;
  cA -= g_h * H;

  if (tid == 0) {
    if (g.token_loss) static_cast<A*>(g.token_loss)[row] = loss;
    if (g.lse) static_cast<A*>(g.lse)[row] = lse;
    if (g.entropy) static_cast<A*>(g.entropy)[row] = H;
    if (g.logprob) static_cast<A*>(g.logprob)[row] = valid || bad ? logprob : A(0);
    if (g.predicted) g.predicted[row] = valid ? (im == kTermsNoCol ? 0 : im) : -1;
    if (MOM && g.mean_logit) static_cast<A*>(g.mean_logit)[row] = mom[0] / static_cast<A>(V);
    if (MOM && g.log_sum_sq) {
      static_cast<A*>(g.log_sum_sq)[row] = acc_log(mom[1]) - A(2) * acc_log(s);
    }
  }
  if (!g.write_grad) return;
  __syncthreads();  // every read of the row (zt included) is done before it is overwritten

  // Pass 4: the gradient, in place.
  update_row<kTermsThreads, T, A>(a, b, V, [&](int j, A raw, A braw) {
    const A z = ep.z(raw);
    const A zl = z - lse;
    const A p = acc_exp(zl);
    A dz = cA * p;
    if (cC != A(0)) dz -= cC * ep.w(j);
    if (j == tcol) dz -= cB;
    if (cE != A(0) && p > A(0)) dz += cE * p * zl;
    if (lam != A(0)) {
      const A lq = t1 ? z - lse_u : z * inv_T - lse_u;
      const A lr = braw * inv_T - lse_y;
      const A q = t1 ? p : acc_exp(lq);  // at T = 1, lse_u == lse bit for bit (same sums)
      if (DK == 1) {
        dz += lam * (q - acc_exp(lr));
      } else if (q > A(0)) {
        if (DK == 2) {
          dz += lam * q * (lq - lr - div);
        } else {
          const A lm = log_add_exp(lr + lb, lq + l1b);
          dz += lam * q * ((A(1) - tk.beta) * (lq - lm) - jsd_s);
        }
      }
    }
    return dz * ep.dz_da(z);
  });
}

template <typename T, typename A, bool MOM>
cudaError_t terms_launch(const gpu::TermsArgs& args, const Epi<A>& ep, const TermsK<A>& tk,
                         const gpu::TermsParams& tp, cudaStream_t stream) {
  // One block per row; rows beyond the grid's y-limit are not a concern (blockIdx.x: 2^31 - 1).
  const unsigned grid = static_cast<unsigned>(args.rows);
  switch (args.teacher ? tp.distill : 0) {
    case 1:
      terms_kernel<T, A, 1, MOM><<<grid, kTermsThreads, 0, stream>>>(args, ep, tk);
      break;
    case 2:
      terms_kernel<T, A, 2, MOM><<<grid, kTermsThreads, 0, stream>>>(args, ep, tk);
      break;
    case 3:
      terms_kernel<T, A, 3, MOM><<<grid, kTermsThreads, 0, stream>>>(args, ep, tk);
      break;
    default:
      terms_kernel<T, A, 0, MOM><<<grid, kTermsThreads, 0, stream>>>(args, ep, tk);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t terms_impl(const gpu::TermsArgs& args, const gpu::EpiParams& p,
                       const gpu::TermsParams& tp, cudaStream_t stream) {
  using A = acc_t<T>;
  if (args.rows <= 0) return cudaSuccess;
  if (p.V > INT32_MAX) return cudaErrorInvalidValue;  // 32-bit columns within a row
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
  const Epi<A> ep = make_epi<A>(p);
  if (args.mean_logit || args.log_sum_sq) return terms_launch<T, A, true>(args, ep, tk, tp, stream);
  return terms_launch<T, A, false>(args, ep, tk, tp, stream);
}

}  // namespace kern

namespace gpu {

cudaError_t launch_row_terms(DType dtype, const TermsArgs& args, const EpiParams& epi,
                             const TermsParams& terms, cudaStream_t stream) {
  switch (dtype) {
    case DType::kBFloat16:
      return kern::terms_impl<__nv_bfloat16>(args, epi, terms, stream);
    case DType::kFloat16:
      return kern::terms_impl<__half>(args, epi, terms, stream);
    case DType::kFloat32:
      return kern::terms_impl<float>(args, epi, terms, stream);
    case DType::kFloat64:
      return kern::terms_impl<double>(args, epi, terms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gpu
}  // namespace fusedce
