// In-place scaling of a precomputed gradient by a device scalar (fusedce::scale_). The scalar is
// read on the device, so a plain loss.backward() (upstream gradient exactly 1) costs one tiny
// launch and no host synchronization, instead of a read-modify-write of a [V, H] tensor.
// Plain CUDA C++ (no torch headers): CI compiles this file alone with bare nvcc.

#include "common.cuh"
#include "launchers.h"

namespace fusedce {
namespace kern {

constexpr int kScaleBlock = 256;

template <typename T>
__global__ void __launch_bounds__(kScaleBlock) scale_kernel(T* p, int64_t n, const acc_t<T>* scale) {
  using A = acc_t<T>;
  const A s = *scale;
  if (s == A(1)) return;  // uniform across the grid: every block exits at once
  constexpr int VEC = Vec<T>::N;
  const int64_t h = head_elems(p, n);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (tid < h) p[tid] = from_acc<T>(to_acc(p[tid]) * s);
  const int64_t nv = (n - h) / VEC;
  T* body = p + h;
  for (int64_t v = tid; v < nv; v += stride) {
    Vec<T> x = load_vec(body + v * VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) x.v[k] = from_acc<T>(to_acc(x.v[k]) * s);
    store_vec(body + v * VEC, x);
  }
  const int64_t t0 = h + nv * VEC;
  if (t0 + tid < n) p[t0 + tid] = from_acc<T>(to_acc(p[t0 + tid]) * s);
}

template <typename T>
cudaError_t scale_impl(void* data, int64_t n, const void* scale, int sm_count,
                       cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int64_t nv = n / Vec<T>::N + 1;
  int64_t grid = (nv + kScaleBlock - 1) / kScaleBlock;
  // a grid-stride loop over at most 8 blocks per SM: enough in flight, few idle blocks
  const int64_t cap = static_cast<int64_t>(sm_count > 0 ? sm_count : 132) * 8;
  if (grid > cap) grid = cap;
  if (grid < 1) grid = 1;
  scale_kernel<T><<<static_cast<unsigned>(grid), kScaleBlock, 0, stream>>>(
      static_cast<T*>(data), n, static_cast<const acc_t<T>*>(scale));
  return cudaGetLastError();
}

}  // namespace kern

namespace gpu {

cudaError_t launch_scale(DType dtype, void* data, int64_t n, const void* scale, int sm_count,
                         cudaStream_t stream) {
  switch (dtype) {
    case DType::kBFloat16:
      return kern::scale_impl<__nv_bfloat16>(data, n, scale, sm_count, stream);
    case DType::kFloat16:
      return kern::scale_impl<__half>(data, n, scale, sm_count, stream);
    case DType::kFloat32:
      return kern::scale_impl<float>(data, n, scale, sm_count, stream);
    case DType::kFloat64:
      return kern::scale_impl<double>(data, n, scale, sm_count, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gpu
}  // namespace fusedce
