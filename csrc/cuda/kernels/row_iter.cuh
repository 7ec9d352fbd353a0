// Row iteration and block reductions of the one-block-per-row kernels (terms_kernels.cu,
// shard_kernels.cu): each of the NT threads of a block visits its columns of a row through 16-byte
// vector accesses.
// Plain CUDA C++ (no torch headers).
#pragma once

#include "common.cuh"

namespace fusedce {
namespace kern {

// Column indices within a row are 32-bit (V < 2^31; the launchers check): fewer instructions per
// element in these compute-bound loops.
// Calls f(j, a_j, b_j) for this thread's columns j of a row (raw values in A; b_j = 0 without a
// teacher), in increasing j per thread: 16-byte vector loads of the aligned body (a row is read at
// full bandwidth only with enough bytes in flight per thread), scalar head and tail.
template <int NT, typename T, typename A, typename F>
__device__ __forceinline__ void for_row(const T* a, const T* b, int V, F&& f) {
  constexpr int K = Vec<T>::N;
  const int tid = threadIdx.x;
  const int h = static_cast<int>(head_elems(a, V));
  for (int j = tid; j < h; j += NT) f(j, to_acc(a[j]), b ? to_acc(b[j]) : A(0));
  const int nv = (V - h) / K;
  const bool bvec = b != nullptr && head_elems(b, V) == h;
  for (int i = tid; i < nv; i += NT) {
    const int j0 = h + i * K;
    const Vec<T> va = load_vec(a + j0);
    Vec<T> vb;
    if (bvec) vb = load_vec(b + j0);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const A bk = b == nullptr ? A(0) : to_acc(bvec ? vb.v[k] : b[j0 + k]);
      f(j0 + k, to_acc(va.v[k]), bk);
    }
  }
  for (int j = h + nv * K + tid; j < V; j += NT) {
    f(j, to_acc(a[j]), b ? to_acc(b[j]) : A(0));
  }
}

// a_j = f(j, a_j, b_j) in place, with the same access pattern.
template <int NT, typename T, typename A, typename F>
__device__ __forceinline__ void update_row(T* a, const T* b, int V, F&& f) {
  constexpr int K = Vec<T>::N;
  const int tid = threadIdx.x;
  const int h = static_cast<int>(head_elems(a, V));
  for (int j = tid; j < h; j += NT) {
    a[j] = from_acc<T>(f(j, to_acc(a[j]), b ? to_acc(b[j]) : A(0)));
  }
  const int nv = (V - h) / K;
  const bool bvec = b != nullptr && head_elems(b, V) == h;
  for (int i = tid; i < nv; i += NT) {
    const int j0 = h + i * K;
    Vec<T> va = load_vec(a + j0);
    Vec<T> vb;
    if (bvec) vb = load_vec(b + j0);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const A bk = b == nullptr ? A(0) : to_acc(bvec ? vb.v[k] : b[j0 + k]);
      va.v[k] = from_acc<T>(f(j0 + k, to_acc(va.v[k]), bk));
    }
    store_vec(a + j0, va);
  }
  for (int j = h + nv * K + tid; j < V; j += NT) {
    a[j] = from_acc<T>(f(j, to_acc(a[j]), b ? to_acc(b[j]) : A(0)));
  }
}

// Sum of K values over the block; every thread gets the totals.
template <int NT, typename A, int K>
__device__ __forceinline__ void block_sum(A (&v)[K], A* smem /* K * NT / 32 */) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // smem may still be read by the previous reduction
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) smem[k * (NT / 32) + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    A s = A(0);
#pragma unroll
    for (int w = 0; w < (NT / 32); ++w) s += smem[k * (NT / 32) + w];
    v[k] = s;
  }
}

// Block maximum of (m, first index attaining it) and of my; every thread gets the results.
template <int NT, typename A>
__device__ __forceinline__ void block_max(A& m, int64_t& im, A& my, A* smem, int64_t* smem_i) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const A om = __shfl_xor_sync(0xffffffffu, m, off);
    const long long oi = __shfl_xor_sync(0xffffffffu, static_cast<long long>(im), off);
    const A omy = __shfl_xor_sync(0xffffffffu, my, off);
    if (om > m || (om == m && oi < im)) {
      m = om;
      im = oi;
    }
    my = acc_max(my, omy);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) {
    smem[warp] = m;
    smem[(NT / 32) + warp] = my;
    smem_i[warp] = im;
  }
  __syncthreads();
  m = smem[0];
  im = smem_i[0];
  my = smem[(NT / 32)];
#pragma unroll
  for (int w = 1; w < (NT / 32); ++w) {
    const A om = smem[w];
    const int64_t oi = smem_i[w];
    if (om > m || (om == m && oi < im)) {
      m = om;
      im = oi;
    }
    my = acc_max(my, smem[(NT / 32) + w]);
  }
}

}  // namespace kern
}  // namespace fusedce
