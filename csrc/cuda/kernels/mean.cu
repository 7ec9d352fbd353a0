// The mean reduction of fusedce::loss on the device (mean=True): its denominator and gradient
// scale before the pass, the final division after it. One block each: N is the number of tokens
// (at most a few hundred thousand per call), and two launches replace the ~10 tiny PyTorch ops a
// caller would otherwise issue around the op (host time, not GPU time, is what they cost).
// Both reduce in double in a fixed order (per thread, then the warps, then thread 0): the result
// does not depend on the run, and a count of tokens is exact far beyond float's 2^24.
// Plain CUDA C++ (no torch headers): CI compiles this file alone with bare nvcc.

#include "common.cuh"
#include "launchers.h"

namespace fusedce {
namespace kern {

constexpr int kMeanBlock = 1024;

// Sum of v over the block, returned to thread 0.
__device__ __forceinline__ double block_sum_to_0(double v) {
  __shared__ double part[kMeanBlock / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) part[warp] = v;
  __syncthreads();
  double s = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kMeanBlock / 32; ++w) s += part[w];
  }
  return s;
}

// A token's share of d: class_weight[t] (1 without class weights), 0 for an ignored token or for a
// target outside [0, V) (the op already makes that token's loss NaN; the index is never read).
template <typename A>
__device__ __forceinline__ double token_weight(int64_t t, const A* class_weight, int64_t V,
                                               int64_t ignore_index) {
  if (t == ignore_index) return 0.0;
  if (class_weight == nullptr) return 1.0;
  return t >= 0 && t < V ? static_cast<double>(class_weight[t]) : 0.0;
}

// d = sum over tokens of token_weight; grad_scale = 1 / d, or 0 when d == 0 (zero gradients, as
// F.cross_entropy gives for an all-ignored batch).
template <typename A>
__global__ void __launch_bounds__(kMeanBlock)
    mean_denominator_kernel(const int64_t* target, int64_t n, const A* class_weight, int64_t V,
                            int64_t ignore_index, A* d_out, A* grad_scale_out) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kMeanBlock)
    s += token_weight(target[i], class_weight, V, ignore_index);
  s = block_sum_to_0(s);
  if (threadIdx.x == 0) {
    const A d = static_cast<A>(s);
    *d_out = d;
    *grad_scale_out = d != A(0) ? A(1) / d : A(0);
  }
}

// loss = sum_i token_loss[i] / d: F.cross_entropy's mean, nan (0 / 0) or +-inf when d == 0.
template <typename A>
__global__ void __launch_bounds__(kMeanBlock)
    mean_finish_kernel(const A* token_loss, int64_t n, const A* d, A* loss) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kMeanBlock) s += static_cast<double>(token_loss[i]);
  s = block_sum_to_0(s);
  if (threadIdx.x == 0) *loss = static_cast<A>(s / static_cast<double>(*d));
}

// cross_entropy on given logits (mean=True): its gradient comes in a separate backward, so the
// denominator, the gradient scale and the loss all come from one launch after the pass. The same
// sums as mean_denominator_kernel and mean_finish_kernel, in the same order.
template <typename A>
__global__ void __launch_bounds__(kMeanBlock)
    mean_after_kernel(const int64_t* target, const A* token_loss, int64_t n, const A* class_weight,
                      int64_t V, int64_t ignore_index, A* loss, A* grad_scale_out) {
  double s = 0.0, l = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kMeanBlock) {
    l += static_cast<double>(token_loss[i]);
    s += token_weight(target[i], class_weight, V, ignore_index);
  }
  s = block_sum_to_0(s);
  __syncthreads();  // block_sum_to_0's shared partials are reused by the second sum
  l = block_sum_to_0(l);
  if (threadIdx.x == 0) {
    const A d = static_cast<A>(s);
    *grad_scale_out = d != A(0) ? A(1) / d : A(0);
    *loss = static_cast<A>(l / static_cast<double>(d));
  }
}

template <typename A>
cudaError_t mean_denominator_impl(const int64_t* target, int64_t n, const void* class_weight,
                                  int64_t V, int64_t ignore_index, void* d, void* grad_scale,
                                  cudaStream_t stream) {
  mean_denominator_kernel<A><<<1, kMeanBlock, 0, stream>>>(
      target, n, static_cast<const A*>(class_weight), V, ignore_index, static_cast<A*>(d),
      static_cast<A*>(grad_scale));
  return cudaGetLastError();
}

template <typename A>
cudaError_t mean_finish_impl(const void* token_loss, int64_t n, const void* d, void* loss,
                             cudaStream_t stream) {
  mean_finish_kernel<A><<<1, kMeanBlock, 0, stream>>>(
      static_cast<const A*>(token_loss), n, static_cast<const A*>(d), static_cast<A*>(loss));
  return cudaGetLastError();
}

template <typename A>
cudaError_t mean_after_impl(const int64_t* target, const void* token_loss, int64_t n,
                            const void* class_weight, int64_t V, int64_t ignore_index, void* loss,
                            void* grad_scale, cudaStream_t stream) {
  mean_after_kernel<A><<<1, kMeanBlock, 0, stream>>>(
      target, static_cast<const A*>(token_loss), n, static_cast<const A*>(class_weight), V,
      ignore_index, static_cast<A*>(loss), static_cast<A*>(grad_scale));
  return cudaGetLastError();
}

}  // namespace kern

namespace gpu {

cudaError_t launch_mean_denominator(DType acc, const int64_t* target, int64_t n,
                                    const void* class_weight, int64_t V, int64_t ignore_index,
                                    void* d, void* grad_scale, cudaStream_t stream) {
  switch (acc) {
    case DType::kFloat32:
      return kern::mean_denominator_impl<float>(target, n, class_weight, V, ignore_index, d,
                                                grad_scale, stream);
    case DType::kFloat64:
      return kern::mean_denominator_impl<double>(target, n, class_weight, V, ignore_index, d,
                                                 grad_scale, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_mean_finish(DType acc, const void* token_loss, int64_t n, const void* d,
                               void* loss, cudaStream_t stream) {
  switch (acc) {
    case DType::kFloat32:
      return kern::mean_finish_impl<float>(token_loss, n, d, loss, stream);
    case DType::kFloat64:
      return kern::mean_finish_impl<double>(token_loss, n, d, loss, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_mean_after(DType acc, const int64_t* target, const void* token_loss, int64_t n,
                              const void* class_weight, int64_t V, int64_t ignore_index,
                              void* loss, void* grad_scale, cudaStream_t stream) {
  switch (acc) {
    case DType::kFloat32:
      return kern::mean_after_impl<float>(target, token_loss, n, class_weight, V, ignore_index,
                                          loss, grad_scale, stream);
    case DType::kFloat64:
      return kern::mean_after_impl<double>(target, token_loss, n, class_weight, V, ignore_index,
                                           loss, grad_scale, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace gpu
}  // namespace fusedce
