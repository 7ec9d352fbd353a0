// Online softmax state (running max, sum of exp, first argmax, sum of w*z) and its warp / block
// reductions. Plain CUDA C++ (no torch headers).
#pragma once

#include "common.cuh"

namespace fusedce {
namespace kern {

constexpr int64_t kNoIndex = INT64_MAX;

template <typename A>
struct SoftmaxState {
  A m;        // running max of z (= the argmax value)
  A s;        // sum of exp(z - m)
  int64_t i;  // first index attaining m (kNoIndex when none seen)
  A wz;       // sum_c w_c * z_c (label smoothing only)

  __device__ __forceinline__ void init() {
    m = neg_inf<A>();
    s = A(0);
    i = kNoIndex;
    wz = A(0);
  }

  // Merge another state; ties on the max keep the smaller index (first maximum).
  __device__ __forceinline__ void merge(A om, A os, int64_t oi, A owz) {
    wz += owz;
    if (om > m) {
      s = (m == neg_inf<A>() ? A(0) : s * acc_exp(m - om)) + os;
      m = om;
      i = oi;
    } else if (om == m) {
      s += os;
      i = oi < i ? oi : i;
    } else if (om != neg_inf<A>()) {  // om < m
      s += os * acc_exp(om - m);
    }
  }

  // Add a batch of K values z[0..K) at global indices base + k (increasing).
  template <int K>
  __device__ __forceinline__ void add(const A (&z)[K], int64_t base) {
    A vmax = z[0];
    int kmax = 0;
#pragma unroll
    for (int k = 1; k < K; ++k) {
      if (z[k] > vmax) {
        vmax = z[k];
        kmax = k;
      }
    }
    // NaN needs no test: a NaN z makes its exp NaN, hence s and lse (comparisons skip it).
    if (vmax == neg_inf<A>()) {  // nothing to add (exp(-inf) = 0); keep the first index seen
      if (i == kNoIndex && m == neg_inf<A>()) i = base;
      return;
    }
    A mn = vmax > m ? vmax : m;
    A acc = (m == neg_inf<A>()) ? A(0) : s * acc_exp(m - mn);
#pragma unroll
    for (int k = 0; k < K; ++k) acc += acc_exp(z[k] - mn);
    s = acc;
    if (vmax > m || i == kNoIndex) {
      i = base + kmax;
    }
    m = mn;
  }

  __device__ __forceinline__ void add1(A z, int64_t idx) {
    A zz[1] = {z};
    add<1>(zz, idx);
  }
};

// Warp all-reduce of the state (every lane ends with the merged state).
template <typename A>
__device__ __forceinline__ void warp_reduce(SoftmaxState<A>& st, unsigned mask = 0xffffffffu) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    A om = __shfl_xor_sync(mask, st.m, off);
    A os = __shfl_xor_sync(mask, st.s, off);
    long long oi = __shfl_xor_sync(mask, static_cast<long long>(st.i), off);
    A owz = __shfl_xor_sync(mask, st.wz, off);
    st.merge(om, os, static_cast<int64_t>(oi), owz);
  }
}

// Block all-reduce for a block that handles one row with NT threads (NT a multiple of 32).
// smem must hold NT/32 entries of each field. Every thread ends with the merged state.
template <typename A, int NT>
struct BlockReduceSmem {
  A m[NT / 32];
  A s[NT / 32];
  int64_t i[NT / 32];
  A wz[NT / 32];
};

template <typename A, int NT>
__device__ __forceinline__ void block_reduce(SoftmaxState<A>& st, BlockReduceSmem<A, NT>& sm) {
  warp_reduce(st);
  if (NT == 32) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // the smem may still be read by a previous reduction
  if (lane == 0) {
    sm.m[warp] = st.m;
    sm.s[warp] = st.s;
    sm.i[warp] = st.i;
    sm.wz[warp] = st.wz;
  }
  __syncthreads();
  SoftmaxState<A> r;
  r.m = sm.m[0];
  r.s = sm.s[0];
  r.i = sm.i[0];
  r.wz = sm.wz[0];
#pragma unroll
  for (int w = 1; w < NT / 32; ++w) r.merge(sm.m[w], sm.s[w], sm.i[w], sm.wz[w]);
  st = r;
}


// Per-thread state of the statistics pass. Unlike SoftmaxState::add, a batch costs one exp per
// element: the batch max is taken first and the running sum is rescaled only when it rises (rare
// after the first few batches of a row), and the first argmax is located only then, among the
// values already in registers. c = neg_scaled(m) is kept finite (0) while m is -inf, so that
// exp_shifted(-inf, ...) = 0 and an all -inf batch adds nothing.
template <typename A>
struct FastState {
  A m;        // running max
  A s;        // sum of exp(z - m)
  A c;        // neg_scaled(m), or 0 while m = -inf
  A wz;       // sum_c w_c z_c (label smoothing only)
  int64_t i;  // first index attaining m (kNoIndex while m = -inf)

  __device__ __forceinline__ void init() {
    m = neg_inf<A>();
    s = A(0);
    c = A(0);
    wz = A(0);
    i = kNoIndex;
  }

  template <int K>
  __device__ __forceinline__ void add(const A (&z)[K], int64_t base) {
    A vmax = z[0];
#pragma unroll
    for (int k = 1; k < K; ++k) vmax = acc_max(vmax, z[k]);  // NaN is skipped; it poisons s below
    if (vmax > m) {
      const A nc = neg_scaled(vmax);
      s *= exp_shifted(m, vmax, nc);  // 0 while m = -inf (s is 0 then too)
      m = vmax;
      c = nc;
      int kk = K - 1;
#pragma unroll
      for (int k = K - 1; k >= 0; --k) kk = (z[k] == vmax) ? k : kk;
      i = base + kk;
    }
    // pairwise: shorter dependency chain than a running sum
    A e[K];
#pragma unroll
    for (int k = 0; k < K; ++k) e[k] = exp_shifted(z[k], m, c);
#pragma unroll
    for (int w = 1; w < K; w *= 2) {
#pragma unroll
      for (int k = 0; k + w < K; k += 2 * w) e[k] += e[k + w];
    }
    s += e[0];
  }

  __device__ __forceinline__ void add1(A z, int64_t idx) {
    A zz[1] = {z};
    add<1>(zz, idx);
  }
};

template <typename A, int NW>
struct FastRedSmem {
  A m[NW];
  A s[NW];
  A wz[NW];
  int64_t i[NW];
};

// All-reduce of FastState over NT threads (a warp, or a block of NT/32 warps). Max first, then
// one rescale per thread and plain sums: one exp per thread instead of one per merge step.
// Barriers: the block variant writes m[] before barrier 1 and s[] before barrier 2, so a fast
// thread's next row cannot overwrite either array while a slow thread still reads it.
template <typename A, int NT, bool kWz>
__device__ __forceinline__ void reduce_fast(FastState<A>& st, FastRedSmem<A, (NT + 31) / 32>& sm) {
  constexpr int NW = NT / 32;
  const int warp = threadIdx.x / 32 % (NW > 0 ? NW : 1), lane = threadIdx.x % 32;
  A M = st.m;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) M = acc_max(M, __shfl_xor_sync(0xffffffffu, M, off));
  if (NW > 1) {
    if (lane == 0) sm.m[warp] = M;
    __syncthreads();
    M = sm.m[0];
#pragma unroll
    for (int w = 1; w < NW; ++w) M = acc_max(M, sm.m[w]);
  }
  A s = st.m == neg_inf<A>() ? A(0) : st.s * exp_shifted(st.m, M, neg_scaled(M));
  long long i = (st.m == M) ? static_cast<long long>(st.i) : static_cast<long long>(kNoIndex);
  A wz = st.wz;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    s += __shfl_xor_sync(0xffffffffu, s, off);
    if (kWz) wz += __shfl_xor_sync(0xffffffffu, wz, off);
    const long long oi = __shfl_xor_sync(0xffffffffu, i, off);
    i = oi < i ? oi : i;
  }
  if (NW > 1) {
    if (lane == 0) {
      sm.s[warp] = s;
      sm.wz[warp] = wz;
      sm.i[warp] = i;
    }
    __syncthreads();
    s = sm.s[0];
    wz = sm.wz[0];
    i = sm.i[0];
#pragma unroll
    for (int w = 1; w < NW; ++w) {
      s += sm.s[w];
      if (kWz) wz += sm.wz[w];
      i = sm.i[w] < i ? sm.i[w] : i;
    }
  }
  st.m = M;
  st.s = s;
  st.wz = kWz ? wz : A(0);
  st.i = static_cast<int64_t>(i);
  st.c = M == neg_inf<A>() ? A(0) : neg_scaled(M);
}

}  // namespace kern
}  // namespace fusedce
