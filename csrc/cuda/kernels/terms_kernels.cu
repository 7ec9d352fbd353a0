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
// the plain CE keeps the tuned kernels of row_kernels.cu. The passes and the per-row scalar math
// are the pieces of terms_row.cuh, shared with the vocab-parallel kernels of shard_terms.cu.

#include "common.cuh"
#include "epilogue.cuh"
#include "launchers.h"
#include "row_iter.cuh"
#include "terms_row.cuh"

namespace fusedce {
namespace kern {

constexpr int kTermsThreads = 256;
constexpr int kTermsWarps = kTermsThreads / 32;

// The pieces of terms_row.cuh on a whole row: (a), (b) for the JSD, (c) in every thread, (d).
template <typename T, typename A, int DK, bool MOM>
__global__ void __launch_bounds__(kTermsThreads, 4)  // <= 64 registers: 4 blocks per SM
    terms_kernel(gpu::TermsArgs g, const Epi<A> ep, const TermsK<A> tk) {
  __shared__ A red[9 * kTermsWarps];
  __shared__ int64_t red_i[kTermsWarps];
  const int64_t row = blockIdx.x;
  T* a = static_cast<T*>(g.logits) + row * g.ld;
  const T* b = g.teacher ? static_cast<const T*>(g.teacher) + row * g.ld_teacher : nullptr;
  const int V = static_cast<int>(ep.V);
  const int64_t t = g.target[row];
  const bool valid = ep.valid(t);
  const int tcol = valid ? static_cast<int>(t) : -1;
  const A inv_T = tk.inv_T;

  RowSums<A> rs;
  row_sums<kTermsThreads, T, A, DK, MOM>(a, b, V, tcol, ep, inv_T, ep.eps != A(0), red, red_i, rs);
  RowIn<A> in;
  in.m = rs.m;
  in.my = rs.my;
  in.s = rs.v[0];
  in.hz = rs.v[1];
  in.wz = rs.v[2];
  in.su = rs.v[3];
  in.hu_u = rs.v[4];
  in.hu_y = rs.v[5];
  in.sy = rs.v[6];
  in.hy_y = rs.v[7];
  in.hy_u = rs.v[8];
  in.zt = rs.zt;
  in.V = static_cast<A>(V);
  in.jsd = in.jsd_s = A(0);

  const A lb = acc_log(tk.beta), l1b = xlog1p(-tk.beta);
  if (DK == 3) {
    const A lse_u = in.m * inv_T + acc_log(in.su), lse_y = in.my + acc_log(in.sy);
    jsd_sums<kTermsThreads, T, A>(a, b, V, ep, inv_T, tk.beta, lb, l1b, lse_u, lse_y, red, in.jsd,
                                  in.jsd_s);
  }

  const A gtok = g.g_tok ? static_cast<const A*>(g.g_tok)[row * g.g_tok_stride] : A(1);
  const A g_tok = g.write_grad ? gtok : A(0);
  const A g_lse = g.write_grad && g.g_lse ? static_cast<const A*>(g.g_lse)[row] : A(0);
  const A g_h = g.write_grad && g.g_entropy ? static_cast<const A*>(g.g_entropy)[row] : A(0);
  const A g_lp = g.write_grad && g.g_logprob ? static_cast<const A*>(g.g_logprob)[row] : A(0);
  const bool bad = ep.bad(t);
  const RowOut<A> o =
      finish_row<A, DK>(tk, ep.eps, ep.z_loss, row, valid, bad, in,
                        [&](A& wt, A& wsum) {
                          wt = ep.w(t);
                          wsum = ep.wsum();
                        },
                        g_tok, g_lse, g_h, g_lp);

  if (threadIdx.x == 0) {
    if (g.token_loss) static_cast<A*>(g.token_loss)[row] = o.loss;
    if (g.lse) static_cast<A*>(g.lse)[row] = o.c.lse;
    if (g.entropy) static_cast<A*>(g.entropy)[row] = o.H;
    if (g.logprob) static_cast<A*>(g.logprob)[row] = valid || bad ? o.logprob : A(0);
    if (g.predicted) g.predicted[row] = valid ? (rs.im == kTermsNoCol ? 0 : rs.im) : -1;
    if (MOM && g.mean_logit) static_cast<A*>(g.mean_logit)[row] = rs.mom[0] / static_cast<A>(V);
    if (MOM && g.log_sum_sq) {
      static_cast<A*>(g.log_sum_sq)[row] = acc_log(rs.mom[1]) - A(2) * acc_log(in.s);
    }
  }
  if (!g.write_grad) return;
  __syncthreads();  // every read of the row (zt included) is done before it is overwritten
  grad_pass<kTermsThreads, T, A, DK>(a, b, V, tcol, ep, inv_T, tk.beta, lb, l1b, o.c);
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
  const TermsK<A> tk = make_terms_k<A>(tp);
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
