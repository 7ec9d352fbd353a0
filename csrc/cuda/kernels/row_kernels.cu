// Row kernels: one online-softmax pass per row of a logits chunk (statistics, per-token loss, lse,
// argmax) with the optional in-place gradient, and the one-read-one-write gradient from a saved lse.
// Plain CUDA C++ (no torch headers): CI compiles this file alone with bare nvcc.
//
// Layout: NT threads per row. NT = 32 is a warp per row (8 rows per 256-thread block, small V);
// NT = 256 is a block per row. Each thread walks its row in 16-byte vectors (8 bf16/fp16,
// 4 fp32, 2 fp64), 8 vectors (128 bytes) in flight, with a scalar head up to the first 16-byte boundary
// and a scalar tail, so any V and any row alignment work. All index arithmetic is 64-bit.
// A thread touches the same elements in the statistics pass and in the gradient pass, so the
// in-place overwrite needs no barrier beyond the one that orders the target-logit read.

#include "launchers.h"
#include "epilogue.cuh"
#include "online_softmax.cuh"

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

// Gradient of one row: out[j] = (cA p_j - cB [j==t] - cC w_j) * dz/da_j, p_j = exp(z_j - lse).
template <typename T, int NT>
__device__ __forceinline__ void grad_row(const T* in, T* out, int64_t n, int64_t col0, int64_t tl,
                                         acc_t<T> lse, acc_t<T> cA, acc_t<T> cB, acc_t<T> cC,
                                         const Epi<acc_t<T>>& ep, int lt) {
  using A = acc_t<T>;
  constexpr int VEC = Vec<T>::N;
  // tl: target column inside this tile (outside [0, n), e.g. -1, when not in it or ignored)
  if (cA == A(0) && cB == A(0) && cC == A(0)) {  // e.g. an ignored row without grad_lse
    const T zero = from_acc<T>(A(0));
    for (int64_t j = lt; j < n; j += NT) out[j] = zero;
    return;
  }
  const A* cw = (cC != A(0)) ? ep.class_weight : nullptr;
  const A cconst = (cC != A(0) && cw == nullptr) ? cC : A(0);  // cC * w_j with w = 1
  auto g1 = [&](A a, int64_t j, bool is_t) -> A {
    const A z = ep.z(a);
    A g = cA * acc_exp(z - lse) - cconst;
    if (cw != nullptr) g -= cC * cw[col0 + j];
    if (is_t) g -= cB;
    return g * ep.dz_da(z);
  };
  if (head_elems(in, n) == head_elems(out, n)) {
    walk_row<T, NT>(
        in, n, lt, [&](int64_t j) { out[j] = from_acc<T>(g1(to_acc(in[j]), j, j == tl)); },
        [&](int64_t j0, const Vec<T>& x) {
          const int64_t kt = tl - j0;  // target offset inside this vector, if any
          Vec<T> y;
#pragma unroll
          for (int k = 0; k < VEC; ++k) y.v[k] = from_acc<T>(g1(to_acc(x.v[k]), j0 + k, k == kt));
          store_vec(out + j0, y);
        });
  } else {  // in and out differ in 16-byte alignment: scalar walk
    for (int64_t j = lt; j < n; j += NT) out[j] = from_acc<T>(g1(to_acc(in[j]), j, j == tl));
  }
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

template <typename T, int NT>
__global__ void __launch_bounds__(RowMap<NT>::kBlock, kMinBlocksPerSM)
    row_stats_kernel(StatsK<T> a, Epi<acc_t<T>> ep) {
  using A = acc_t<T>;
  constexpr int VEC = Vec<T>::N;
  __shared__ BlockReduceSmem<A, (NT >= 32 ? NT : 32)> smem;
  const int lt = RowMap<NT>::lane();
  const bool whole = a.first_tile && a.last_tile;
  const bool need_wz = ep.eps != A(0);
  // Rows of a block-per-row kernel are uniform across the block; warp-per-row rows are uniform
  // across the warp, so the barriers inside the loop are reached by all threads that must.
  for (int64_t r = RowMap<NT>::first_row(); r < a.rows; r += RowMap<NT>::row_step()) {
    T* row = a.logits + r * a.ld;
    const int64_t t = a.target[r];
    const bool ok = ep.valid(t);
    const bool t_here = ok && t >= a.col0 && t < a.col0 + a.cols;
    A zt = A(0);
    if (t_here) zt = ep.z(to_acc(row[t - a.col0]));

    SoftmaxState<A> st;
    st.init();
    walk_row<T, NT>(
        row, a.cols, lt,
        [&](int64_t j) {
          const A z = ep.z(to_acc(row[j]));
          if (need_wz) st.wz += ep.w(a.col0 + j) * z;
          st.add1(z, a.col0 + j);
        },
        [&](int64_t j0, const Vec<T>& x) {
          A z[VEC];
#pragma unroll
          for (int k = 0; k < VEC; ++k) z[k] = ep.z(to_acc(x.v[k]));
          if (need_wz) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) st.wz += ep.w(a.col0 + j0 + k) * z[k];
          }
          st.add<VEC>(z, a.col0 + j0);
        });
    if (NT >= kSmallBlock) {
      block_reduce<A, NT>(st, smem);  // ends with a barrier: every zt read is done
    } else {
      warp_reduce(st);
      __syncwarp();
    }

    if (!whole) {  // vocabulary tiles: lane 0 merges with the running state (no fused gradient)
      if (lt == 0) {
        if (!a.first_tile) {
          st.merge(a.st_m[r], a.st_s[r], a.st_idx[r], a.st_wz[r]);
          if (!t_here) zt = a.st_zt[r];
        }
        if (!a.last_tile) {
          a.st_m[r] = st.m;
          a.st_s[r] = st.s;
          a.st_idx[r] = st.i;
          a.st_wz[r] = st.wz;
          if (t_here) a.st_zt[r] = zt;
        } else {
          const A lse = st.m + acc_log(st.s);
          a.lse[r] = lse;
          a.token_loss[r] = ep.token_loss(ok, t, lse, zt, st.wz);
          a.predicted[r] = ok ? (st.i == kNoIndex ? 0 : st.i) : -1;
        }
      }
      continue;
    }

    const A lse = st.m + acc_log(st.s);
    if (lt == 0) {
      a.lse[r] = lse;
      a.token_loss[r] = ep.token_loss(ok, t, lse, zt, st.wz);
      a.predicted[r] = ok ? (st.i == kNoIndex ? 0 : st.i) : -1;
    }
    if (a.fused_grad) {
      const A gs = a.grad_scale ? a.grad_scale[r * a.grad_scale_stride] : A(1);
      A cA, cB, cC;
      ep.grad_coefs(ok, t, lse, gs, A(0), cA, cB, cC);
      grad_row<T, NT>(row, row, a.cols, a.col0, ok ? t - a.col0 : -1, lse, cA, cB, cC, ep, lt);
    }
  }
}

template <typename T, int NT>
__global__ void __launch_bounds__(RowMap<NT>::kBlock, kMinBlocksPerSM)
    row_grad_kernel(GradK<T> a, Epi<acc_t<T>> ep) {
  using A = acc_t<T>;
  const int lt = RowMap<NT>::lane();
  for (int64_t r = RowMap<NT>::first_row(); r < a.rows; r += RowMap<NT>::row_step()) {
    const int64_t t = a.target[r];
    const bool ok = ep.valid(t);
    const A lse = a.lse[r];
    const A gs = a.grad_tok ? a.grad_tok[r * a.grad_tok_stride] : A(1);
    const A gl = a.grad_lse ? a.grad_lse[r * a.grad_lse_stride] : A(0);
    A cA, cB, cC;
    ep.grad_coefs(ok, t, lse, gs, gl, cA, cB, cC);
    grad_row<T, NT>(a.in + r * a.ld_in, a.out + r * a.ld_out, a.cols, a.col0, ok ? t - a.col0 : -1,
                    lse, cA, cB, cC, ep, lt);
  }
}

template <typename A>
Epi<A> make_epi(const gpu::EpiParams& p) {
  Epi<A> e;
  e.logit_scale = static_cast<A>(p.logit_scale);
  e.softcap = static_cast<A>(p.softcap > 0 ? p.softcap : 0.0);
  e.inv_softcap = static_cast<A>(p.softcap > 0 ? 1.0 / p.softcap : 0.0);
  e.eps = static_cast<A>(p.label_smoothing);
  e.z_loss = static_cast<A>(p.z_loss);
  e.class_weight = static_cast<const A*>(p.class_weight);
  e.class_weight_sum = static_cast<const A*>(p.class_weight_sum);
  e.V = p.V;
  e.ignore_index = p.ignore_index;
  return e;
}

// A warp per row up to 4 vectors per lane, else a 256-thread block per row (several blocks per SM
// keep enough loads in flight; a 1024-thread block per row measured ~3x under copy bandwidth).
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
  switch (nt) {
    case 32:
      row_stats_kernel<T, 32><<<grid, RowMap<32>::kBlock, 0, stream>>>(k, ep);
      break;
    default:
      row_stats_kernel<T, 256><<<grid, RowMap<256>::kBlock, 0, stream>>>(k, ep);
      break;
  }
  return cudaGetLastError();
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
  const unsigned grid = grid_for(g.rows, nt, 0);
  switch (nt) {
    case 32:
      row_grad_kernel<T, 32><<<grid, RowMap<32>::kBlock, 0, stream>>>(k, ep);
      break;
    default:
      row_grad_kernel<T, 256><<<grid, RowMap<256>::kBlock, 0, stream>>>(k, ep);
      break;
  }
  return cudaGetLastError();
}

}  // namespace kern

namespace gpu {

int row_threads(int64_t cols, int elem_size) { return kern::pick_nt(cols, elem_size); }

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
