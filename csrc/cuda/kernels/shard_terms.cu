// The vocab-parallel term ops on the GPU (fusedce::shard_partials, shard_jsd, shard_finish,
// shard_backward_): the pieces of terms_row.cuh, which terms_kernel is made of, split at the
// per-row scalars. Per chunk the caller runs shard_partials on every rank, gathers the partials,
// merges them in shard_finish (csrc/cpu/terms.h's rescale rule, then the same per-row finish as
// terms_kernel), and shard_backward_ writes each rank's gradient; the JSD adds shard_jsd and a
// second shard_finish. Columns: csrc/shard_layout.h. Plain CUDA C++ (no torch).

#include "../../shard_layout.h"
#include "common.cuh"
#include "epilogue.cuh"
#include "launchers.h"
#include "row_iter.cuh"
#include "terms_row.cuh"

namespace fusedce {
namespace kern {

namespace sh = ::fusedce::shard;

constexpr int kShardTermThreads = 256;
constexpr int kShardTermWarps = kShardTermThreads / 32;
constexpr int kFinishThreads = 128;

// The shard's logit transform and class weights (its slice; eps and z_loss belong to shard_finish).
template <typename A>
Epi<A> shard_terms_epi(const gpu::ShardTermsArgs& s) {
  gpu::EpiParams p;
  p.logit_scale = s.logit_scale;
  p.softcap = s.softcap;
  p.class_weight = s.class_weight;
  p.class_weight_sum = s.class_weight_sum;
  p.V = s.cols;
  return make_epi<A>(p);
}

// The local column of a row's target on this shard, -1 when the shard does not own it.
__device__ __forceinline__ int owned_col(const gpu::ShardTermsArgs& g, int64_t t) {
  const int64_t lt = t - g.vocab_start;
  return t != g.ignore_index && lt >= 0 && lt < g.cols ? static_cast<int>(lt) : -1;
}

// (a) on the shard -> one row of partials. wz is always summed: the label smoothing is
// shard_finish's argument, not this op's.
template <typename T, typename A, int DK, bool MOM>
__global__ void __launch_bounds__(kShardTermThreads, 4)
    shard_partials_kernel(gpu::ShardTermsArgs g, const Epi<A> ep, const A inv_T) {
  __shared__ A red[9 * kShardTermWarps];
  __shared__ int64_t red_i[kShardTermWarps];
  const int64_t row = blockIdx.x;
  const T* a = static_cast<const T*>(g.logits) + row * g.ld;
  const T* b = DK != 0 ? static_cast<const T*>(g.teacher) + row * g.ld_teacher : nullptr;
  const int V = static_cast<int>(g.cols);
  const int lt = owned_col(g, g.target[row]);
  RowSums<A> rs;
  row_sums<kShardTermThreads, T, A, DK, MOM>(a, b, V, lt, ep, inv_T, true, red, red_i, rs);
  if (threadIdx.x == 0) {
    A* o = static_cast<A*>(g.partials) + row * sh::kParts;
    o[sh::kM] = rs.m;
    o[sh::kS] = rs.v[0];
    o[sh::kHz] = rs.v[1];
    o[sh::kWz] = rs.v[2];
    o[sh::kZt] = rs.zt;
    o[sh::kWt] = lt >= 0 ? ep.w(lt) : A(0);
    o[sh::kArgmax] = static_cast<A>(g.vocab_start + (rs.im == kTermsNoCol ? 0 : rs.im));
    o[sh::kSu] = rs.v[3];
    o[sh::kHuU] = rs.v[4];
    o[sh::kHuY] = rs.v[5];
    o[sh::kMy] = rs.my;
    o[sh::kSy] = rs.v[6];
    o[sh::kHyY] = rs.v[7];
    o[sh::kHyU] = rs.v[8];
    o[sh::kSz] = MOM ? rs.mom[0] : A(0);
    o[sh::kS2] = MOM ? rs.mom[1] : A(0);
    o[sh::kWsum] = ep.wsum();
    o[sh::kV] = static_cast<A>(V);
  }
}

// (b) on the shard, with the merged normalizers of shard_finish -> this rank's (jsd, jsd_s).
template <typename T, typename A>
__global__ void __launch_bounds__(kShardTermThreads, 4)
    shard_jsd_kernel(gpu::ShardTermsArgs g, const Epi<A> ep, const A inv_T, const A beta) {
  __shared__ A red[2 * kShardTermWarps];
  const int64_t row = blockIdx.x;
  const T* a = static_cast<const T*>(g.logits) + row * g.ld;
  const T* b = static_cast<const T*>(g.teacher) + row * g.ld_teacher;
  const A* c = static_cast<const A*>(g.coefs) + row * sh::kCoefs;
  A jsd, jsd_s;
  jsd_sums<kShardTermThreads, T, A>(a, b, static_cast<int>(g.cols), ep, inv_T, beta,
                                    acc_log(beta), xlog1p(-beta), c[sh::kLseU], c[sh::kLseY], red,
                                    jsd, jsd_s);
  if (threadIdx.x == 0) {
    A* o = static_cast<A*>(g.jsd) + row * 2;
    o[0] = jsd;
    o[1] = jsd_s;
  }
}

// (d) on the shard, in place, from shard_finish's coefficients.
template <typename T, typename A, int DK>
__global__ void __launch_bounds__(kShardTermThreads, 4)
    shard_backward_kernel(gpu::ShardTermsArgs g, const Epi<A> ep, const A inv_T, const A beta) {
  const int64_t row = blockIdx.x;
  T* a = static_cast<T*>(g.logits) + row * g.ld;
  const T* b = DK != 0 ? static_cast<const T*>(g.teacher) + row * g.ld_teacher : nullptr;
  const A* cf = static_cast<const A*>(g.coefs) + row * sh::kCoefs;
  RowCoefs<A> c;
  c.lse = cf[sh::kCoefLse];
  c.cA = cf[sh::kCoefP];
  c.cB = cf[sh::kCoefT];
  c.cC = cf[sh::kCoefW];
  c.cE = cf[sh::kCoefE];
  c.lam = cf[sh::kLam];
  c.lse_u = cf[sh::kLseU];
  c.lse_y = cf[sh::kLseY];
  c.div = cf[sh::kDiv];
  c.jsd_s = cf[sh::kJsdS];
  const A lb = DK == 3 ? acc_log(beta) : A(0), l1b = DK == 3 ? xlog1p(-beta) : A(0);
  grad_pass<kShardTermThreads, T, A, DK>(a, b, static_cast<int>(g.cols),
                                         owned_col(g, g.target[row]), ep, inv_T, beta, lb, l1b, c);
}

// One rank's sums re-expressed relative to the global maxima (M, MY) and added to acc
// (csrc/cpu/terms.h's rescale + merge); a sum that is 0 stays 0 (no -inf - -inf).
template <typename A>
__device__ __forceinline__ void merge_rank(RowIn<A>& acc, A& s2, const A* x, A M, A MY, A inv_T) {
  const A m = x[sh::kM], my = x[sh::kMy];
  const A mu = m * inv_T, mu2 = M * inv_T;
  A s = x[sh::kS], su = x[sh::kSu], sy = x[sh::kSy];
  if (s > A(0)) {
    const A f = xexp(m - M);
    acc.hz += f * (x[sh::kHz] + (m - M) * s);
    acc.s += f * s;
    s2 += f * f * x[sh::kS2];
  }
  if (su > A(0)) {
    const A f = xexp(mu - mu2);
    acc.hu_u += f * (x[sh::kHuU] + (mu - mu2) * su);
    acc.hu_y += f * (x[sh::kHuY] + (my - MY) * su);
    acc.su += f * su;
  }
  if (sy > A(0)) {
    const A f = xexp(my - MY);
    acc.hy_y += f * (x[sh::kHyY] + (my - MY) * sy);
    acc.hy_u += f * (x[sh::kHyU] + (mu - mu2) * sy);
    acc.sy += f * sy;
  }
  acc.wz += x[sh::kWz];
  acc.zt += x[sh::kZt];
  acc.V += x[sh::kV];
}

// Merge of the world's partials, then (c): one thread per row.
template <typename A, int DK>
__global__ void __launch_bounds__(kFinishThreads)
    shard_finish_kernel(gpu::ShardFinishArgs g, const TermsK<A> tk) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kFinishThreads + threadIdx.x;
  if (row >= g.rows) return;
  const A* P = static_cast<const A*>(g.partials) + row * sh::kParts;
  const int64_t wstride = g.rows * sh::kParts;
  const A ninf = neg_inf<A>();
  // The global maxima (NaN logits are skipped, as by the kernels' comparisons).
  A M = ninf, MY = ninf;
  for (int64_t w = 0; w < g.world; ++w) {
    M = acc_max(M, P[w * wstride + sh::kM]);
    MY = acc_max(MY, P[w * wstride + sh::kMy]);
  }
  RowIn<A> in;
  in.m = M;
  in.my = MY;
  in.s = in.hz = in.wz = in.su = in.hu_u = in.hu_y = in.sy = in.hy_y = in.hy_u = A(0);
  in.zt = in.V = A(0);
  A s2 = A(0), sz = A(0), wt = A(0), wsum = A(0);
  A arg = A(-1);  // the first argmax: the smallest global id among the ranks attaining M
  for (int64_t w = 0; w < g.world; ++w) {
    const A* x = P + w * wstride;
    if (x[sh::kM] == M && (arg < A(0) || x[sh::kArgmax] < arg)) arg = x[sh::kArgmax];
    merge_rank(in, s2, x, M, MY, tk.inv_T);
    sz += x[sh::kSz];
    wt += x[sh::kWt];
    wsum += x[sh::kWsum];
  }
  const A* jp = static_cast<const A*>(g.jsd);
  in.jsd = jp ? jp[row * 2] : A(0);
  in.jsd_s = jp ? jp[row * 2 + 1] : A(0);
  // The width: a sum of integers, exact in float up to 2^24 classes.
  const int64_t Vg = static_cast<int64_t>(in.V);
  const int64_t t = g.target[row];
  const bool valid = t != g.ignore_index && t >= 0 && t < Vg;
  const bool bad = t != g.ignore_index && (t < 0 || t >= Vg);
  auto up = [&](const void* p) { return p ? static_cast<const A*>(p)[row] : A(0); };
  const RowOut<A> o = finish_row<A, DK>(
      tk, static_cast<A>(g.label_smoothing), static_cast<A>(g.z_loss), row, valid, bad, in,
      [&](A& wt_, A& wsum_) {
        wt_ = wt;
        wsum_ = wsum;
      },
      up(g.g_tok), up(g.g_lse), up(g.g_entropy), up(g.g_logprob));
  A* r = static_cast<A*>(g.out_rows) + row * sh::kRows;
  r[sh::kTokenLoss] = o.loss;
  r[sh::kLse] = o.c.lse;
  r[sh::kEntropy] = o.H;
  r[sh::kLogprob] = valid || bad ? o.logprob : A(0);
  r[sh::kPredicted] = valid ? (arg < A(0) ? P[sh::kArgmax] : arg) : A(-1);
  r[sh::kMeanLogit] = g.want_mean_logit ? sz / in.V : A(0);
  r[sh::kLogSumSq] = g.want_log_sum_sq ? acc_log(s2) - A(2) * acc_log(in.s) : A(0);
  r[sh::kWeightAtTarget] = valid ? wt : A(0);
  A* c = static_cast<A*>(g.coefs) + row * sh::kCoefs;
  c[sh::kCoefP] = o.c.cA;
  c[sh::kCoefT] = o.c.cB;
  c[sh::kCoefW] = o.c.cC;
  c[sh::kCoefE] = o.c.cE;
  c[sh::kLam] = o.c.lam;
  c[sh::kCoefLse] = o.c.lse;
  c[sh::kLseU] = DK != 0 ? o.c.lse_u : A(0);
  c[sh::kLseY] = DK != 0 ? o.c.lse_y : A(0);
  c[sh::kDiv] = o.c.div;
  c[sh::kJsdS] = o.c.jsd_s;
}

template <typename T, typename A, bool MOM>
void partials_launch(const gpu::ShardTermsArgs& s, const Epi<A>& ep, A inv_T, int dk,
                     cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(s.rows);
  switch (dk) {
    case 1:
      shard_partials_kernel<T, A, 1, MOM><<<grid, kShardTermThreads, 0, stream>>>(s, ep, inv_T);
      break;
    case 2:
      shard_partials_kernel<T, A, 2, MOM><<<grid, kShardTermThreads, 0, stream>>>(s, ep, inv_T);
      break;
    case 3:
      shard_partials_kernel<T, A, 3, MOM><<<grid, kShardTermThreads, 0, stream>>>(s, ep, inv_T);
      break;
    default:
      shard_partials_kernel<T, A, 0, MOM><<<grid, kShardTermThreads, 0, stream>>>(s, ep, inv_T);
  }
}

enum class ShardOp { kPartials, kJsd, kBackward };

template <typename T>
cudaError_t shard_terms_impl(ShardOp op, const gpu::ShardTermsArgs& s, const gpu::TermsParams& tp,
                             cudaStream_t stream) {
  using A = acc_t<T>;
  if (s.rows <= 0) return cudaSuccess;
  if (s.cols > INT32_MAX) return cudaErrorInvalidValue;  // 32-bit columns within a row
  const Epi<A> ep = shard_terms_epi<A>(s);
  const A inv_T = static_cast<A>(tp.inv_T), beta = static_cast<A>(tp.beta);
  const int dk = s.teacher ? tp.distill : 0;
  const unsigned grid = static_cast<unsigned>(s.rows);
  switch (op) {
    case ShardOp::kPartials:
      if (s.moments) {
        partials_launch<T, A, true>(s, ep, inv_T, dk, stream);
      } else {
        partials_launch<T, A, false>(s, ep, inv_T, dk, stream);
      }
      break;
    case ShardOp::kJsd:
      if (!s.teacher) return cudaErrorInvalidValue;
      shard_jsd_kernel<T, A><<<grid, kShardTermThreads, 0, stream>>>(s, ep, inv_T, beta);
      break;
    case ShardOp::kBackward:
      switch (dk) {
        case 1:
          shard_backward_kernel<T, A, 1><<<grid, kShardTermThreads, 0, stream>>>(s, ep, inv_T, beta);
          break;
        case 2:
          shard_backward_kernel<T, A, 2><<<grid, kShardTermThreads, 0, stream>>>(s, ep, inv_T, beta);
          break;
        case 3:
          shard_backward_kernel<T, A, 3><<<grid, kShardTermThreads, 0, stream>>>(s, ep, inv_T, beta);
          break;
        default:
          shard_backward_kernel<T, A, 0><<<grid, kShardTermThreads, 0, stream>>>(s, ep, inv_T, beta);
      }
      break;
  }
  return cudaGetLastError();
}

cudaError_t shard_terms_dispatch(ShardOp op, gpu::DType dtype, const gpu::ShardTermsArgs& s,
                                 const gpu::TermsParams& tp, cudaStream_t stream) {
  switch (dtype) {
    case gpu::DType::kBFloat16:
      return shard_terms_impl<__nv_bfloat16>(op, s, tp, stream);
    case gpu::DType::kFloat16:
      return shard_terms_impl<__half>(op, s, tp, stream);
    case gpu::DType::kFloat32:
      return shard_terms_impl<float>(op, s, tp, stream);
    case gpu::DType::kFloat64:
      return shard_terms_impl<double>(op, s, tp, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename A>
cudaError_t shard_finish_impl(const gpu::ShardFinishArgs& f, const gpu::TermsParams& tp,
                              cudaStream_t stream) {
  if (f.rows <= 0) return cudaSuccess;
  const TermsK<A> tk = make_terms_k<A>(tp);
  const unsigned grid = static_cast<unsigned>((f.rows + kFinishThreads - 1) / kFinishThreads);
  switch (tp.distill) {
    case 1:
      shard_finish_kernel<A, 1><<<grid, kFinishThreads, 0, stream>>>(f, tk);
      break;
    case 2:
      shard_finish_kernel<A, 2><<<grid, kFinishThreads, 0, stream>>>(f, tk);
      break;
    case 3:
      shard_finish_kernel<A, 3><<<grid, kFinishThreads, 0, stream>>>(f, tk);
      break;
    default:
      shard_finish_kernel<A, 0><<<grid, kFinishThreads, 0, stream>>>(f, tk);
  }
  return cudaGetLastError();
}

}  // namespace kern

namespace gpu {

cudaError_t launch_shard_partials(DType dtype, const ShardTermsArgs& args,
                                  const TermsParams& terms, cudaStream_t stream) {
  return kern::shard_terms_dispatch(kern::ShardOp::kPartials, dtype, args, terms, stream);
}

cudaError_t launch_shard_jsd(DType dtype, const ShardTermsArgs& args, const TermsParams& terms,
                             cudaStream_t stream) {
  return kern::shard_terms_dispatch(kern::ShardOp::kJsd, dtype, args, terms, stream);
}

cudaError_t launch_shard_backward(DType dtype, const ShardTermsArgs& args,
                                  const TermsParams& terms, cudaStream_t stream) {
  return kern::shard_terms_dispatch(kern::ShardOp::kBackward, dtype, args, terms, stream);
}

cudaError_t launch_shard_finish(DType dtype, const ShardFinishArgs& args, const TermsParams& terms,
                                cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return kern::shard_finish_impl<float>(args, terms, stream);
    case DType::kFloat64:
      return kern::shard_finish_impl<double>(args, terms, stream);
    default:
      return cudaErrorInvalidValue;  // the partials are in an accumulation dtype
  }
}

}  // namespace gpu
}  // namespace fusedce
