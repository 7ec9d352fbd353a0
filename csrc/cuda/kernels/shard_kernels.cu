// The vocab-parallel building blocks: the row statistics of one rank's shard of the logits, and the
// in-place gradient from the statistics gathered over all ranks (fusedce/_parallel.py combines
// them). One 256-thread block per row, 16-byte vector accesses. Plain CUDA C++ (no torch headers).

#include "common.cuh"
#include "epilogue.cuh"
#include "launchers.h"
#include "row_iter.cuh"

namespace fusedce {
namespace kern {

constexpr int kShardThreads = 256;

template <typename A>
Epi<A> shard_epi(const gpu::ShardArgs& s) {
  gpu::EpiParams p;
  p.logit_scale = s.logit_scale;
  p.softcap = s.softcap;
  p.V = s.cols;
  return make_epi<A>(p);
}

// stats[row] = (max z, sum exp(z - max), sum w z, z_t and w_t when this shard owns the target,
// first argmax as a global id)
template <typename T, typename A>
__global__ void __launch_bounds__(kShardThreads)
    shard_stats_kernel(gpu::ShardArgs g, const Epi<A> ep) {
  __shared__ A red[2 * (kShardThreads / 32)];
  __shared__ int64_t red_i[kShardThreads / 32];
  const int64_t row = blockIdx.x;
  const T* a = static_cast<const T*>(g.logits) + row * g.ld;
  const A* w = static_cast<const A*>(g.class_weight);
  const A ninf = neg_inf<A>();
  A m = ninf, unused = ninf;
  int64_t im = INT64_MAX;
  for_row<kShardThreads, T, A>(a, static_cast<const T*>(nullptr), g.cols, [&](int64_t j, A raw, A) {
    const A z = ep.z(raw);
    if (z > m) {
      m = z;
      im = j;
    } else if (im == INT64_MAX) {
      im = j;
    }
  });
  block_max<kShardThreads>(m, im, unused, red, red_i);
  A v[2] = {A(0), A(0)};
  for_row<kShardThreads, T, A>(a, static_cast<const T*>(nullptr), g.cols, [&](int64_t j, A raw, A) {
    const A z = ep.z(raw);
    if (z != ninf) v[0] += acc_exp(z - m);
    v[1] += (w ? w[j] : A(1)) * z;
  });
  block_sum<kShardThreads>(v, red);
  if (threadIdx.x == 0) {
    const int64_t t = g.target[row];
    const int64_t lt = t - g.vocab_start;
    const bool owned = t != g.ignore_index && lt >= 0 && lt < g.cols;
    A* o = static_cast<A*>(g.stats) + row * 6;
    o[0] = m;
    o[1] = v[0];
    o[2] = v[1];
    o[3] = owned ? ep.z(to_acc(a[lt])) : A(0);
    o[4] = owned ? (w ? w[lt] : A(1)) : A(0);
    o[5] = static_cast<A>(g.vocab_start + (im == INT64_MAX ? 0 : im));
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kShardThreads)
    shard_grad_kernel(gpu::ShardArgs g, const Epi<A> ep) {
  const int64_t row = blockIdx.x;
  T* a = static_cast<T*>(g.logits) + row * g.ld;
  const A* w = static_cast<const A*>(g.class_weight);
  const int64_t t = g.target[row];
  const int64_t lt = t == g.ignore_index ? -1 : t - g.vocab_start;
  const A lse = static_cast<const A*>(g.lse)[row];
  const A cp = static_cast<const A*>(g.coef_p)[row];
  const A ct = static_cast<const A*>(g.coef_t)[row];
  const A cw = g.coef_w ? static_cast<const A*>(g.coef_w)[row] : A(0);
  update_row<kShardThreads, T, A>(a, static_cast<const T*>(nullptr), g.cols, [&](int64_t j, A raw, A) {
    const A z = ep.z(raw);
    A dz = cp * acc_exp(z - lse);
    if (cw != A(0)) dz -= cw * (w ? w[j] : A(1));
    if (j == lt) dz -= ct;
    return dz * ep.dz_da(z);
  });
}

template <typename T>
cudaError_t shard_impl(const gpu::ShardArgs& s, bool grad, cudaStream_t stream) {
  using A = acc_t<T>;
  if (s.rows <= 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(s.rows);
  if (grad) {
    shard_grad_kernel<T, A><<<grid, kShardThreads, 0, stream>>>(s, shard_epi<A>(s));
  } else {
    shard_stats_kernel<T, A><<<grid, kShardThreads, 0, stream>>>(s, shard_epi<A>(s));
  }
  return cudaGetLastError();
}

cudaError_t shard_dispatch(gpu::DType dtype, const gpu::ShardArgs& s, bool grad,
                           cudaStream_t stream) {
  switch (dtype) {
    case gpu::DType::kBFloat16:
      return shard_impl<__nv_bfloat16>(s, grad, stream);
    case gpu::DType::kFloat16:
      return shard_impl<__half>(s, grad, stream);
    case gpu::DType::kFloat32:
      return shard_impl<float>(s, grad, stream);
    case gpu::DType::kFloat64:
      return shard_impl<double>(s, grad, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kern

namespace gpu {

cudaError_t launch_shard_stats(DType dtype, const ShardArgs& args, cudaStream_t stream) {
  return kern::shard_dispatch(dtype, args, false, stream);
}

cudaError_t launch_shard_grad(DType dtype, const ShardArgs& args, cudaStream_t stream) {
  return kern::shard_dispatch(dtype, args, true, stream);
}

}  // namespace gpu
}  // namespace fusedce
