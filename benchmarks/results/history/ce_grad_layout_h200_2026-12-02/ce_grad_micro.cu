// Standalone micro-benchmark: layouts of the one-read-one-write CE gradient (bf16, in place)
// against cudaMemcpyAsync. nvcc -O3 -std=c++17 -arch=sm_90a ce_grad_micro.cu -o m && ./m
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>
typedef __nv_bfloat16 bf;
struct alignas(16) V8 { bf v[8]; };
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("err %s line %d\n", cudaGetErrorString(e), __LINE__); exit(1);} } while (0)
__device__ __forceinline__ float ex2(float x){ float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
constexpr float L2E = 1.4426950408889634f;

template <bool GRAD>
__device__ __forceinline__ V8 op(V8 x, float c, float cA, float cB, int64_t tl, int64_t j0) {
  if (!GRAD) return x;
  V8 y;
  const bool has = static_cast<uint64_t>(tl - j0) < 8u;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    float r = __fmul_rn(cA, ex2(fmaf(__bfloat162float(x.v[k]), L2E, c)));
    if (has && j0 + k == tl) r = __fsub_rn(r, cB);
    y.v[k] = __float2bfloat16_rn(r);
  }
  return y;
}
template <int LD>  // 0 plain, 1 evict-first (__ldcs/__stcs), 2 L1 no-allocate
__device__ __forceinline__ V8 ld(const V8* p) {
  if (LD == 1) { int4 t = __ldcs(reinterpret_cast<const int4*>(p)); return *reinterpret_cast<V8*>(&t); }
  if (LD == 2) { int4 t = __ldlu(reinterpret_cast<const int4*>(p)); return *reinterpret_cast<V8*>(&t); }
  return *p;
}
template <int LD>
__device__ __forceinline__ void st(V8* p, V8 v) {
  if (LD == 1) { __stcs(reinterpret_cast<int4*>(p), *reinterpret_cast<int4*>(&v)); return; }
  *p = v;
}

// (a) today's layout: a block of NT per row, U vectors in flight, serial remainder loop
template <int NT, int U, int MINB, bool GRAD, bool PRED, int LD>
__global__ void __launch_bounds__(NT, MINB) row_k(bf* p, int64_t rows, int64_t cols, const float* lse, const int64_t* tgt, float cA) {
  const int64_t nv = cols / 8;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    V8* row = reinterpret_cast<V8*>(p + r * cols);
    const float c = -lse[r] * L2E; const int64_t tl = tgt[r];
    int64_t v = threadIdx.x;
    if (!PRED) {
      for (; v + (U - 1) * NT < nv; v += U * NT) {
        V8 x[U];
#pragma unroll
        for (int u = 0; u < U; ++u) x[u] = ld<LD>(row + v + u * NT);
#pragma unroll
        for (int u = 0; u < U; ++u) st<LD>(row + v + u * NT, op<GRAD>(x[u], c, cA, cA, tl, (v + u * NT) * 8));
      }
      for (; v < nv; v += NT) st<LD>(row + v, op<GRAD>(ld<LD>(row + v), c, cA, cA, tl, v * 8));
    } else {
      for (; v < nv; v += U * NT) {
        V8 x[U];
#pragma unroll
        for (int u = 0; u < U; ++u) if (v + u * NT < nv) x[u] = ld<LD>(row + v + u * NT);
#pragma unroll
        for (int u = 0; u < U; ++u) if (v + u * NT < nv) st<LD>(row + v + u * NT, op<GRAD>(x[u], c, cA, cA, tl, (v + u * NT) * 8));
      }
    }
  }
}

// (b) row segments: grid (segments, rows); a block covers SEGV vectors of one row, predicated
template <int NT, int U, int MINB, bool GRAD, int LD>
__global__ void __launch_bounds__(NT, MINB) seg_k(bf* p, int64_t rows, int64_t cols, int64_t segv, const float* lse, const int64_t* tgt, float cA) {
  const int64_t nv = cols / 8;
  const int64_t r = blockIdx.y;
  V8* row = reinterpret_cast<V8*>(p + r * cols);
  const float c = -lse[r] * L2E; const int64_t tl = tgt[r];
  const int64_t v0 = blockIdx.x * segv;
  const int64_t v1 = min(nv, v0 + segv);
  for (int64_t v = v0 + threadIdx.x; v < v1; v += U * NT) {
    V8 x[U];
#pragma unroll
    for (int u = 0; u < U; ++u) if (v + u * NT < v1) x[u] = ld<LD>(row + v + u * NT);
#pragma unroll
    for (int u = 0; u < U; ++u) if (v + u * NT < v1) st<LD>(row + v + u * NT, op<GRAD>(x[u], c, cA, cA, tl, (v + u * NT) * 8));
  }
}

// (c) flat: the [rows, cols] block as one array of vectors, tiles of NT*U vectors, grid-stride
template <int NT, int U, int MINB, bool GRAD, int LD>
__global__ void __launch_bounds__(NT, MINB) flat_k(bf* p, int64_t rows, int64_t cols, const float* lse, const int64_t* tgt, float cA) {
  const int64_t nvr = cols / 8, nv = rows * nvr;
  V8* a = reinterpret_cast<V8*>(p);
  for (int64_t t0 = static_cast<int64_t>(blockIdx.x) * NT * U; t0 < nv; t0 += static_cast<int64_t>(gridDim.x) * NT * U) {
    V8 x[U];
#pragma unroll
    for (int u = 0; u < U; ++u) { const int64_t v = t0 + threadIdx.x + u * NT; if (v < nv) x[u] = ld<LD>(a + v); }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = t0 + threadIdx.x + u * NT;
      if (v < nv) {
        const int64_t r = v / nvr;
        st<LD>(a + v, op<GRAD>(x[u], -lse[r] * L2E, cA, cA, tgt[r], (v - r * nvr) * 8));
      }
    }
  }
}

__global__ void read_k(const bf* p, int64_t n, float* out) {  // read-only reference
  const V8* a = reinterpret_cast<const V8*>(p);
  float s = 0;
  for (int64_t v = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; v < n / 8; v += (int64_t)gridDim.x * blockDim.x * 4) {
    V8 x[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) { int64_t w = v + u * (int64_t)gridDim.x * blockDim.x; if (w < n / 8) x[u] = a[w]; else x[u] = V8{}; }
#pragma unroll
    for (int u = 0; u < 4; ++u) for (int k = 0; k < 8; ++k) s += __bfloat162float(x[u].v[k]);
  }
  if (s == 12345.f) out[0] = s;
}

template <typename F>
float timeit(F f, int iters = 15) {
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  for (int i = 0; i < 3; ++i) f();
  std::vector<float> ts;
  for (int i = 0; i < iters; ++i) {
    cudaEventRecord(a); f(); cudaEventRecord(b); CK(cudaEventSynchronize(b));
    float ms; cudaEventElapsedTime(&ms, a, b); ts.push_back(ms);
  }
  CK(cudaGetLastError());
  std::sort(ts.begin(), ts.end()); return ts[ts.size() / 2];
}

__global__ void init_k(bf* p, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    p[i] = __float2bfloat16((float)((i * 2654435761ull) % 1000) * 0.003f - 1.5f);
}

int main() {
  int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int64_t shapes[][2] = {{8192, 128256}, {16384, 128256}, {4096, 256000}, {8192, 152064}, {32768, 32000}};
  for (int rep = 0; rep < 2; ++rep)
  for (auto& sh : shapes) {
    const int64_t R = sh[0], C = sh[1], n = R * C;
    bf *x, *y; float *lse, *o; int64_t* t;
    CK(cudaMalloc(&x, n * 2)); CK(cudaMalloc(&y, n * 2)); CK(cudaMalloc(&lse, R * 4)); CK(cudaMalloc(&t, R * 8)); CK(cudaMalloc(&o, 4));
    init_k<<<1024, 256>>>(x, n); CK(cudaMemset(lse, 0, R * 4));
    std::vector<int64_t> th(R); for (int64_t i = 0; i < R; ++i) th[i] = (i * 7919) % C;
    CK(cudaMemcpy(t, th.data(), R * 8, cudaMemcpyHostToDevice));
    const float cA = 1.f / R;
    const float cp = timeit([&] { cudaMemcpyAsync(y, x, n * 2, cudaMemcpyDeviceToDevice); });
    const double bw = 4.0 * n / (cp * 1e-3);
    printf("%lldx%lld rep %d: memcpy %.3f ms = %.2f TB/s (x of it below)\n", (long long)R, (long long)C, rep, cp, bw / 1e12);
    auto rep_ = [&](const char* name, float ms) { printf("  %-44s %.3f ms  %.3fx\n", name, ms, ms / cp); };
    rep_("read-only (2 B/elem; x of memcpy's 4 B)", timeit([&] { read_k<<<sms * 8, 256>>>(x, n, o); }) * 2.f);
    const unsigned gr = (unsigned)R;
    rep_("row today (256,U4,mb4) copy", timeit([&] { row_k<256, 4, 4, false, false, 0><<<gr, 256>>>(x, R, C, lse, t, cA); }));
    rep_("row today (256,U4,mb4) grad", timeit([&] { row_k<256, 4, 4, true, false, 0><<<gr, 256>>>(x, R, C, lse, t, cA); }));
    rep_("row pred (256,U4,mb4) grad", timeit([&] { row_k<256, 4, 4, true, true, 0><<<gr, 256>>>(x, R, C, lse, t, cA); }));
    rep_("row persistent sms*4 grad", timeit([&] { row_k<256, 4, 4, true, false, 0><<<sms * 4, 256>>>(x, R, C, lse, t, cA); }));
    rep_("row (512,U4,mb2) grad", timeit([&] { row_k<512, 4, 2, true, true, 0><<<gr, 512>>>(x, R, C, lse, t, cA); }));
    rep_("row (128,U4,mb8) grad", timeit([&] { row_k<128, 4, 8, true, true, 0><<<gr, 128>>>(x, R, C, lse, t, cA); }));
    rep_("row (256,U2,mb8) grad", timeit([&] { row_k<256, 2, 8, true, true, 0><<<gr, 256>>>(x, R, C, lse, t, cA); }));
    rep_("row pred evict-first grad", timeit([&] { row_k<256, 4, 4, true, true, 1><<<gr, 256>>>(x, R, C, lse, t, cA); }));
    for (int64_t segv : {1024, 2048, 4096, 8192}) {
      const int64_t nv = C / 8; dim3 g((unsigned)((nv + segv - 1) / segv), (unsigned)R);
      char nm[64];
      snprintf(nm, 64, "seg %lld vec (256,U4,mb4) grad", (long long)segv);
      rep_(nm, timeit([&] { seg_k<256, 4, 4, true, 0><<<g, 256>>>(x, R, C, segv, lse, t, cA); }));
    }
    { const int64_t nv = C / 8; dim3 g((unsigned)((nv + 2047) / 2048), (unsigned)R);
      rep_("seg 2048 copy", timeit([&] { seg_k<256, 4, 4, false, 0><<<g, 256>>>(x, R, C, 2048, lse, t, cA); }));
      rep_("seg 2048 (256,U2,mb8) grad", timeit([&] { seg_k<256, 2, 8, true, 0><<<g, 256>>>(x, R, C, 2048, lse, t, cA); }));
      rep_("seg 2048 evict-first grad", timeit([&] { seg_k<256, 4, 4, true, 1><<<g, 256>>>(x, R, C, 2048, lse, t, cA); })); }
    const int64_t tiles = (n / 8 + 1023) / 1024;
    rep_("flat tiles (one tile per block) copy", timeit([&] { flat_k<256, 4, 4, false, 0><<<(unsigned)tiles, 256>>>(x, R, C, lse, t, cA); }));
    rep_("flat tiles (one tile per block) grad", timeit([&] { flat_k<256, 4, 4, true, 0><<<(unsigned)tiles, 256>>>(x, R, C, lse, t, cA); }));
    rep_("flat persistent sms*4 grad", timeit([&] { flat_k<256, 4, 4, true, 0><<<sms * 4, 256>>>(x, R, C, lse, t, cA); }));
    rep_("flat persistent sms*8 (U2) grad", timeit([&] { flat_k<256, 2, 8, true, 0><<<sms * 8, 256>>>(x, R, C, lse, t, cA); }));
    CK(cudaFree(x)); CK(cudaFree(y)); CK(cudaFree(lse)); CK(cudaFree(t)); CK(cudaFree(o));
  }
  return 0;
}
