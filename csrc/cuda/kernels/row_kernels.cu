// Row kernels: one online-softmax pass per row of a logits chunk (statistics, per-token loss, lse,
// argmax) with the optional in-place gradient, and the one-read-one-write gradient from a saved lse.
// Plain CUDA C++ (no torch headers): CI compiles this file alone with bare nvcc.
//
// Layout: NT threads per row. NT = 32 is a warp per row (8 rows per 256-thread block, small V);
// NT = 256 is a block per row. Each thread walks its row in 16-byte vectors (8 bf16/fp16,
// 4 fp32, 2 fp64), 4 vectors (2 for fp64) in flight, with a scalar head up to the first 16-byte
// boundary and a scalar tail, so any V and any row alignment work. All index arithmetic is 64-bit.
// The gradient from a saved lse needs no row reduction: its long rows go to a 128-thread block per
// row segment instead (row_grad_seg_kernel), which streams at copy speed where a block walking a
// whole row did not.
// A thread touches the same elements in the statistics pass and in the gradient pass, so the
// in-place overwrite needs no barrier beyond the one that orders the target-logit read.

#include "launchers.h"
#include "epilogue.cuh"
#include "online_softmax.cuh"

#include <type_traits>

namespace fusedce {
namespace kern {

constexpr int kSmallBlock = 256;  // block size of the warp-per-row kernels
constexpr int kMinBlocksPerSM = 4;  // 1024 threads per SM: enough 16-byte loads in flight

// 16-byte vectors in flight per thread: 64 bytes (32 for double); more spills under the 64-register
// cap of 4 blocks per SM.
template <typename T>
struct Unroll {
  static constexpr int value = sizeof(T) == 8 ? 2 : 4;
};

template <typename T>
struct StatsK {
  T* logits;
  int64_t ld, rows, col0, cols;
  const int64_t* target;
  acc_t<T>* st_m;
  acc_t<T>* st_s;
  acc_t<T>* st_wz;
  acc_t<T>* st_zt;
  int64_t* st_idx;
  bool first_tile, last_tile, fused_grad;
  acc_t<T>* token_loss;
  acc_t<T>* lse;
  int64_t* predicted;
  const acc_t<T>* grad_scale;
  int64_t grad_scale_stride;
};

template <typename T>
struct GradK {
  const T* in;
  int64_t ld_in;
  T* out;
  int64_t ld_out;
  int64_t rows, col0, cols;
  const int64_t* target;
  const acc_t<T>* lse;
  const acc_t<T>* grad_tok;
  int64_t grad_tok_stride;
  const acc_t<T>* grad_lse;
  int64_t grad_lse_stride;
};

// The logit transform, compiled out when it is the identity (logit_scale 1, no softcap): the plain
// path then spends per element only the conversion, the max, one FFMA, one exp and one add.
template <bool kTr, typename A>
__device__ __forceinline__ A zf(const Epi<A>& ep, A a) {
  return kTr ? ep.z(a) : a;
}

// Walk the elements [0, n) of a row owned by lane `lt` of NT, in increasing index order:
// f(ptr_offset, count, is_vector) is called on a scalar element or on a 16-byte vector.
// The vector body starts at the first 16-byte boundary of `row`.
template <typename T, int NT, typename FS, typename FV>
__device__ __forceinline__ void walk_row(const T* row, int64_t n, int lt, FS scalar, FV vec) {
  constexpr int VEC = Vec<T>::N;
  const int64_t h = head_elems(row, n);
  if (lt < h) scalar(static_cast<int64_t>(lt));
  const int64_t nv = (n - h) / VEC;
  constexpr int kUnroll = Unroll<T>::value;
  int64_t v = lt;
  for (; v + (kUnroll - 1) * NT < nv; v += kUnroll * NT) {
    Vec<T> x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) x[u] = load_vec(row + h + (v + u * NT) * VEC);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) vec(h + (v + u * NT) * VEC, x[u]);
  }
  for (; v < nv; v += NT) vec(h + v * VEC, load_vec(row + h + v * VEC));
  const int64_t tail0 = h + nv * VEC;
  if (tail0 + lt < n) scalar(tail0 + lt);
}

// Walk segment `s` of `nseg` of a row: the vectors [s, s + 1) x NT x U of its vector body (one
// load of U vectors per thread), the scalar head in segment 0 and the scalar tail in the last one.
// The row's split into head, vectors and tail is walk_row's, so an element's arithmetic (and the
// thread that reads and rewrites it) does not depend on which walk reached it. `nseg` x NT x U
// vectors must cover ceil(n / VEC) (the host's count; a row's own body may be a vector shorter).
template <typename T, int NT, typename FS, typename FV>
__device__ __forceinline__ void walk_segment(const T* row, int64_t n, int64_t s, int64_t nseg,
                                             int lt, FS scalar, FV vec) {
  constexpr int VEC = Vec<T>::N;
  constexpr int kUnroll = Unroll<T>::value;
  const int64_t h = head_elems(row, n);
  if (s == 0 && lt < h) scalar(static_cast<int64_t>(lt));
  const int64_t nv = (n - h) / VEC;
  const int64_t v = s * (kUnroll * NT) + lt;
  Vec<T> x[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u)
    if (v + u * NT < nv) x[u] = load_vec(row + h + (v + u * NT) * VEC);
#pragma unroll
  for (int u = 0; u < kUnroll; ++u)
    if (v + u * NT < nv) vec(h + (v + u * NT) * VEC, x[u]);
  const int64_t tail0 = h + nv * VEC;
  if (s == nseg - 1 && tail0 + lt < n) scalar(tail0 + lt);
}

// Statistics of one element / one 16-byte vector at tile column j (class weights at col0 + j).
template <typename T, bool kTr, bool kWz>
__device__ __forceinline__ void stats_scalar(FastState<acc_t<T>>& st, const Epi<acc_t<T>>& ep,
                                             T x, int64_t j, int64_t col0) {
  const acc_t<T> z = zf<kTr>(ep, to_acc(x));
  if (kWz) st.wz += ep.w(col0 + j) * z;
  st.add1(z, j);
}
template <typename T, bool kTr, bool kWz>
__device__ __forceinline__ void stats_vec(FastState<acc_t<T>>& st, const Epi<acc_t<T>>& ep,
                                          const Vec<T>& x, int64_t j0, int64_t col0) {
  using A = acc_t<T>;
  constexpr int VEC = Vec<T>::N;
  A z[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) z[k] = zf<kTr>(ep, to_acc(x.v[k]));
  if (kWz) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) st.wz += ep.w(col0 + j0 + k) * z[k];
  }
  st.add<VEC>(z, j0);
}

// Per-row gradient constants: d/da_j = (cA p_j - cB [j==t] - cC w_j) * dz/da_j, p_j = exp(z_j - lse).
template <typename A>
struct GradRow {
  A lse, c, cA, cB, cC;
  int64_t tl;  // target column inside the tile, or -1
};

// One element's gradient. The target term is subtracted before the dz/da factor, in the same
// expression for the vector and the scalar walks: a row's split into a scalar head, vectors and a
// scalar tail depends on its alignment, and the in-place and out-of-place results must agree
// bit for bit.
template <typename T, bool kTr, bool kSm>
__device__ __forceinline__ acc_t<T> grad_elem(const GradRow<acc_t<T>>& g, const Epi<acc_t<T>>& ep,
                                              acc_t<T> a, int64_t jglob, bool is_t) {
  using A = acc_t<T>;
  const A z = zf<kTr>(ep, a);
  A r = mul_rn(g.cA, exp_shifted(z, g.lse, g.c));
  if (kSm) r = fma_rn(-g.cC, ep.w(jglob), r);
  if (is_t) r = sub_rn(r, g.cB);
  return kTr ? mul_rn(r, ep.dz_da(z)) : r;
}

template <typename T, bool kTr, bool kSm>
__device__ __forceinline__ Vec<T> grad_vec(const GradRow<acc_t<T>>& g, const Epi<acc_t<T>>& ep,
                                           const Vec<T>& x, int64_t j0, int64_t col0) {
  using A = acc_t<T>;
  constexpr int VEC = Vec<T>::N;
  A r[VEC];
  // the target column lies in at most one vector of the row: compare per vector, not per element
  if (static_cast<uint64_t>(g.tl - j0) < static_cast<uint64_t>(VEC)) {
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      r[k] = grad_elem<T, kTr, kSm>(g, ep, to_acc(x.v[k]), col0 + j0 + k, j0 + k == g.tl);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      r[k] = grad_elem<T, kTr, kSm>(g, ep, to_acc(x.v[k]), col0 + j0 + k, false);
  }
  Vec<T> y;
#pragma unroll
  for (int k = 0; k < VEC; ++k) y.v[k] = from_acc<T>(r[k]);
  return y;
}
template <typename T, bool kTr, bool kSm>
__device__ __forceinline__ T grad_scalar(const GradRow<acc_t<T>>& g, const Epi<acc_t<T>>& ep, T x,
                                         int64_t j, int64_t col0) {
  return from_acc<T>(grad_elem<T, kTr, kSm>(g, ep, to_acc(x), col0 + j, j == g.tl));
}

template <typename A>
__device__ __forceinline__ GradRow<A> make_grad_row(const Epi<A>& ep, bool ok, int64_t t,
                                                    int64_t col0, A lse, A gs, A gl) {
  GradRow<A> g;
  g.lse = lse;
  g.c = neg_scaled(lse);
  ep.grad_coefs(ok, t, lse, gs, gl, g.cA, g.cB, g.cC);
  g.tl = ok ? t - col0 : -1;
  return g;
}

// Gradient of a row (tile columns [0, n), vocabulary col0 + j), or of one segment's share of it:
// [e0, e1) on the zero and scalar paths, and on the vector path whatever walk(row, lt, scalar, vec)
// visits (walk_segment: its vectors, shifted by the row's head, plus the head or the tail). The
// shares split the row exactly because every segment of a row takes the same path (it depends only
// on g and on the alignment of the row's in and out).
template <typename T, int NT, bool kTr, bool kSm, typename W>
__device__ __forceinline__ void grad_span(const T* in, T* out, int64_t n, int64_t e0, int64_t e1,
                                          int64_t col0, const GradRow<acc_t<T>>& g,
                                          const Epi<acc_t<T>>& ep, int lt, W walk) {
  using A = acc_t<T>;
  if (g.cA == A(0) && g.cB == A(0) && g.cC == A(0)) {  // e.g. an ignored row without grad_lse
    const T zero = from_acc<T>(A(0));
    for (int64_t j = e0 + lt; j < e1; j += NT) out[j] = zero;
    return;
  }
  if (head_elems(in, n) == head_elems(out, n)) {
    walk(
        in, lt, [&](int64_t j) { out[j] = grad_scalar<T, kTr, kSm>(g, ep, in[j], j, col0); },
        [&](int64_t j0, const Vec<T>& x) {
          store_vec(out + j0, grad_vec<T, kTr, kSm>(g, ep, x, j0, col0));
        });
  } else {  // in and out differ in 16-byte alignment: scalar walk
    for (int64_t j = e0 + lt; j < e1; j += NT)
      out[j] = grad_scalar<T, kTr, kSm>(g, ep, in[j], j, col0);
  }
}

template <typename T, int NT, bool kTr, bool kSm>
__device__ __forceinline__ void grad_row(const T* in, T* out, int64_t n, int64_t col0,
                                         const GradRow<acc_t<T>>& g, const Epi<acc_t<T>>& ep,
                                         int lt) {
  grad_span<T, NT, kTr, kSm>(in, out, n, 0, n, col0, g, ep, lt,
                             [&](const T* row, int l, auto scalar, auto vec) {
                               walk_row<T, NT>(row, n, l, scalar, vec);
                             });
}

template <int NT>
struct RowMap {
  static constexpr int kRowsPerBlock = NT >= kSmallBlock ? 1 : kSmallBlock / NT;
  static constexpr int kBlock = NT >= kSmallBlock ? NT : kSmallBlock;
  __device__ static int lane() { return threadIdx.x % NT; }
  __device__ static int64_t first_row() {
    return static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / NT;
  }
  __device__ static int64_t row_step() { return static_cast<int64_t>(gridDim.x) * kRowsPerBlock; }
};

// Finalize a row from its merged statistics (one thread).
template <typename A>
__device__ __forceinline__ void write_row_outputs(A* token_loss, A* lse_out, int64_t* predicted,
                                                  int64_t r, const Epi<A>& ep, bool ok, int64_t t,
                                                  A lse, A zt, A wz, int64_t idx) {
  lse_out[r] = lse;
  token_loss[r] = ep.token_loss(ok, t, lse, zt, wz);
  predicted[r] = ok ? (idx == kNoIndex ? 0 : idx) : -1;
}

template <typename T, int NT, bool kTr, bool kWz>
__global__ void __launch_bounds__(RowMap<NT>::kBlock, kMinBlocksPerSM)
    row_stats_kernel(StatsK<T> a, Epi<acc_t<T>> ep) {
  using A = acc_t<T>;
  __shared__ FastRedSmem<A, NT / 32> smem;
  const int lt = RowMap<NT>::lane();
  const bool whole = a.first_tile && a.last_tile;
  // Rows of a block-per-row kernel are uniform across the block; warp-per-row rows are uniform
  // across the warp, so the barriers inside the loop are reached by all threads that must.
  for (int64_t r = RowMap<NT>::first_row(); r < a.rows; r += RowMap<NT>::row_step()) {
    T* row = a.logits + r * a.ld;
    const int64_t t = a.target[r];
    const bool ok = ep.valid(t);
    const bool t_here = ok && t >= a.col0 && t < a.col0 + a.cols;
    A zt = A(0);
    // only lane 0 finalizes; its read precedes the reduction's barriers, hence any overwrite
    if (lt == 0 && t_here) zt = zf<kTr>(ep, to_acc(row[t - a.col0]));

    FastState<A> st;
    st.init();
    walk_row<T, NT>(
        row, a.cols, lt, [&](int64_t j) { stats_scalar<T, kTr, kWz>(st, ep, row[j], j, a.col0); },
        [&](int64_t j0, const Vec<T>& x) { stats_vec<T, kTr, kWz>(st, ep, x, j0, a.col0); });
    reduce_fast<A, NT, kWz>(st, smem);
    if (NT < kSmallBlock) __syncwarp();
    const int64_t idx = st.i == kNoIndex ? kNoIndex : a.col0 + st.i;

    if (!whole) {  // vocabulary tiles: lane 0 merges with the running state (no fused gradient)
      if (lt == 0) {
        SoftmaxState<A> ms;
        ms.m = st.m;
        ms.s = st.s;
        ms.i = idx;
        ms.wz = st.wz;
        if (!a.first_tile) {
          ms.merge(a.st_m[r], a.st_s[r], a.st_idx[r], a.st_wz[r]);
          if (!t_here) zt = a.st_zt[r];
        }
        if (!a.last_tile) {
          a.st_m[r] = ms.m;
          a.st_s[r] = ms.s;
          a.st_idx[r] = ms.i;
          a.st_wz[r] = ms.wz;
          if (t_here) a.st_zt[r] = zt;
        } else {
          write_row_outputs(a.token_loss, a.lse, a.predicted, r, ep, ok, t,
                            ms.m + acc_log(ms.s), zt, ms.wz, ms.i);
        }
      }
      continue;
    }

    const A lse = st.m + acc_log(st.s);
    if (lt == 0) write_row_outputs(a.token_loss, a.lse, a.predicted, r, ep, ok, t, lse, zt, st.wz, idx);
    if (a.fused_grad) {
      const A gs = a.grad_scale ? a.grad_scale[r * a.grad_scale_stride] : A(1);
      const GradRow<A> g = make_grad_row(ep, ok, t, a.col0, lse, gs, A(0));
      // a thread rewrites exactly the elements it read above: no barrier needed
      grad_row<T, NT, kTr, kWz>(row, row, a.cols, a.col0, g, ep, lt);
    }
  }
}

template <typename T>
__device__ __forceinline__ GradRow<acc_t<T>> grad_row_of(const GradK<T>& a, const Epi<acc_t<T>>& ep,
                                                         int64_t r) {
  using A = acc_t<T>;
  const int64_t t = a.target[r];
  const A gs = a.grad_tok ? a.grad_tok[r * a.grad_tok_stride] : A(1);
  const A gl = a.grad_lse ? a.grad_lse[r * a.grad_lse_stride] : A(0);
  return make_grad_row(ep, ep.valid(t), t, a.col0, a.lse[r], gs, gl);
}

// Short rows: a warp per row (8 rows per block).
template <typename T, int NT, bool kTr, bool kSm>
__global__ void __launch_bounds__(RowMap<NT>::kBlock, kMinBlocksPerSM)
    row_grad_kernel(GradK<T> a, Epi<acc_t<T>> ep) {
  const int lt = RowMap<NT>::lane();
  for (int64_t r = RowMap<NT>::first_row(); r < a.rows; r += RowMap<NT>::row_step()) {
    grad_row<T, NT, kTr, kSm>(a.in + r * a.ld_in, a.out + r * a.ld_out, a.cols, a.col0,
                              grad_row_of(a, ep, r), ep, lt);
  }
}

// Long rows: a block per row segment (blockIdx.x) of kSegThreads x U vectors, one load of U
// vectors per thread and no loop, rows along blockIdx.y. Measured on an H200 (bf16 in place, the
// kernel alone against cudaMemcpyAsync of the same bytes): 1.01-1.05x of the copy's time (1.05x at
// power-of-two V), where a 256-thread block walking a whole row ran at 1.13-1.16x
// (benchmarks/results/history/ce_grad_layout_h200_2026-12-02/).
constexpr int kSegThreads = 128;
constexpr int kSegMinBlocks = 8;  // 1024 threads per SM, <= 64 registers as the row kernels

template <typename T, bool kTr, bool kSm>
__global__ void __launch_bounds__(kSegThreads, kSegMinBlocks)
    row_grad_seg_kernel(GradK<T> a, Epi<acc_t<T>> ep) {
  constexpr int64_t kSegElems = int64_t(kSegThreads) * Unroll<T>::value * Vec<T>::N;
  const int lt = threadIdx.x;
  const int64_t s = blockIdx.x, nseg = gridDim.x;
  const int64_t e0 = s * kSegElems;
  const int64_t e1 = e0 + kSegElems < a.cols ? e0 + kSegElems : a.cols;
  for (int64_t r = blockIdx.y; r < a.rows; r += gridDim.y) {
    grad_span<T, kSegThreads, kTr, kSm>(
        a.in + r * a.ld_in, a.out + r * a.ld_out, a.cols, e0, e1, a.col0, grad_row_of(a, ep, r), ep,
        lt, [&](const T* row, int l, auto scalar, auto vec) {
          walk_segment<T, kSegThreads>(row, a.cols, s, nseg, l, scalar, vec);
        });
  }
}

// A warp per row up to 4 vectors per lane, else a 256-thread block per row (several blocks per SM
// keep enough loads in flight; a 1024-thread block per row measured ~3x under copy bandwidth).
// The gradient launcher takes the segment kernel instead of the 256-thread one.
inline int pick_nt(int64_t cols, int elem_size) {
  const int64_t nvec = cols * elem_size / 16;
  return nvec <= 4 * 32 ? 32 : 256;
}

inline unsigned grid_for(int64_t rows, int nt, int limit) {
  const int64_t rpb = nt >= kSmallBlock ? 1 : kSmallBlock / nt;
  int64_t g = (rows + rpb - 1) / rpb;
  if (limit > 0 && g > limit) g = limit;
  if (g > 0x7fffffff) g = 0x7fffffff;
  return static_cast<unsigned>(g < 1 ? 1 : g);
}

// Calls f(integral_constant<bool, kTr>, integral_constant<bool, kFlag2>) with the specialization
// of the row math that the parameters need; double always takes the general one (few
// instantiations, and double is a correctness path, not a speed path).
template <typename T, typename F>
cudaError_t with_flags(const gpu::EpiParams& p, F&& f) {
  using TT = std::integral_constant<bool, true>;
  using FF = std::integral_constant<bool, false>;
  if constexpr (sizeof(T) == 8) {
    return f(TT{}, TT{});
  } else {
    const bool tr = p.logit_scale != 1.0 || p.softcap > 0;
    const bool sm = p.label_smoothing != 0.0;
    if (tr) return sm ? f(TT{}, TT{}) : f(TT{}, FF{});
    return sm ? f(FF{}, TT{}) : f(FF{}, FF{});
  }
}

template <typename T>
cudaError_t stats_impl(const gpu::StatsArgs& s, const gpu::EpiParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  if (s.rows <= 0) return cudaSuccess;
  StatsK<T> k;
  k.logits = static_cast<T*>(s.logits);
  k.ld = s.ld;
  k.rows = s.rows;
  k.col0 = s.col0;
  k.cols = s.cols;
  k.target = s.target;
  k.st_m = static_cast<A*>(s.state.m);
  k.st_s = static_cast<A*>(s.state.s);
  k.st_wz = static_cast<A*>(s.state.wz);
  k.st_zt = static_cast<A*>(s.state.zt);
  k.st_idx = s.state.idx;
  k.first_tile = s.first_tile;
  k.last_tile = s.last_tile;
  k.fused_grad = s.fused_grad;
  k.token_loss = static_cast<A*>(s.token_loss);
  k.lse = static_cast<A*>(s.lse);
  k.predicted = s.predicted;
  k.grad_scale = static_cast<const A*>(s.grad_scale);
  k.grad_scale_stride = s.grad_scale_stride;
  const Epi<A> ep = make_epi<A>(p);
  const int nt = pick_nt(s.cols, sizeof(T));
  const unsigned grid = grid_for(s.rows, nt, s.grid_limit);
  return with_flags<T>(p, [&](auto tr, auto wz) -> cudaError_t {
    constexpr bool kTr = decltype(tr)::value, kWz = decltype(wz)::value;
    if (nt == 32) {
      row_stats_kernel<T, 32, kTr, kWz><<<grid, RowMap<32>::kBlock, 0, stream>>>(k, ep);
    } else {
      row_stats_kernel<T, 256, kTr, kWz><<<grid, RowMap<256>::kBlock, 0, stream>>>(k, ep);
    }
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t grad_impl(const gpu::GradArgs& g, const gpu::EpiParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  if (g.rows <= 0 || g.cols <= 0) return cudaSuccess;
  GradK<T> k;
  k.in = static_cast<const T*>(g.in);
  k.ld_in = g.ld_in;
  k.out = static_cast<T*>(g.out);
  k.ld_out = g.ld_out;
  k.rows = g.rows;
  k.col0 = g.col0;
  k.cols = g.cols;
  k.target = g.target;
  k.lse = static_cast<const A*>(g.lse);
  k.grad_tok = static_cast<const A*>(g.grad_tok);
  k.grad_tok_stride = g.grad_tok_stride;
  k.grad_lse = static_cast<const A*>(g.grad_lse);
  k.grad_lse_stride = g.grad_lse_stride;
  const Epi<A> ep = make_epi<A>(p);
  const int nt = pick_nt(g.cols, sizeof(T));
  // segments of the long-row kernel: enough to cover ceil(cols / VEC) vectors (walk_segment)
  constexpr int64_t kSegVecs = int64_t(kSegThreads) * Unroll<T>::value;
  const int64_t nvec = (g.cols + Vec<T>::N - 1) / Vec<T>::N;
  const int64_t nseg = (nvec + kSegVecs - 1) / kSegVecs;
  if (nt != 32 && nseg > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return with_flags<T>(p, [&](auto tr, auto sm) -> cudaError_t {
    constexpr bool kTr = decltype(tr)::value, kSm = decltype(sm)::value;
    if (nt == 32) {
      const unsigned grid = grid_for(g.rows, nt, 0);
      row_grad_kernel<T, 32, kTr, kSm><<<grid, RowMap<32>::kBlock, 0, stream>>>(k, ep);
    } else {
      const dim3 grid(static_cast<unsigned>(nseg),
                      static_cast<unsigned>(g.rows < 65535 ? g.rows : 65535));
      row_grad_seg_kernel<T, kTr, kSm><<<grid, kSegThreads, 0, stream>>>(k, ep);
    }
    return cudaGetLastError();
  });
}

}  // namespace kern

namespace gpu {

cudaError_t launch_row_stats(DType dtype, const StatsArgs& args, const EpiParams& epi,
                             cudaStream_t stream) {
  switch (dtype) {
    case DType::kBFloat16:
      return kern::stats_impl<__nv_bfloat16>(args, epi, stream);
    case DType::kFloat16:
      return kern::stats_impl<__half>(args, epi, stream);
    case DType::kFloat32:
      return kern::stats_impl<float>(args, epi, stream);
    case DType::kFloat64:
      return kern::stats_impl<double>(args, epi, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_row_grad(DType dtype, const GradArgs& args, const EpiParams& epi,
                            cudaStream_t stream) {
  switch (dtype) {
    case DType::kBFloat16:
      return kern::grad_impl<__nv_bfloat16>(args, epi, stream);
    case DType::kFloat16:
      return kern::grad_impl<__half>(args, epi, stream);
    case DType::kFloat32:
      return kern::grad_impl<float>(args, epi, stream);
    case DType::kFloat64:
      return kern::grad_impl<double>(args, epi, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gpu
}  // namespace fusedce
