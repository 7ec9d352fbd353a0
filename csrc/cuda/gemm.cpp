// cuBLAS GEMM helpers of the CUDA host driver (gemm.h).

#include "gemm.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

#if __has_include(<cublas_v2.h>)
#include <ATen/cuda/CUDAContext.h>
#else
// Build hosts without the cuBLAS headers (compile checks only): the few declarations used here.
// The symbols resolve at load time through libtorch_cuda's own dependency on libcublas.
#include <library_types.h>
typedef struct cublasContext* cublasHandle_t;
typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 } cublasOperation_t;
typedef enum { CUBLAS_COMPUTE_32F = 68 } cublasComputeType_t;
typedef enum { CUBLAS_GEMM_DEFAULT = -1 } cublasGemmAlgo_t;
typedef enum { CUBLAS_POINTER_MODE_HOST = 0, CUBLAS_POINTER_MODE_DEVICE = 1 } cublasPointerMode_t;
extern "C" cublasStatus_t cublasGetPointerMode_v2(cublasHandle_t, cublasPointerMode_t*);
extern "C" cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t, cublasPointerMode_t);
#define cublasGetPointerMode cublasGetPointerMode_v2
#define cublasSetPointerMode cublasSetPointerMode_v2
extern "C" cublasStatus_t cublasGemmEx(cublasHandle_t, cublasOperation_t, cublasOperation_t, int,
                                       int, int, const void*, const void*, cudaDataType, int,
                                       const void*, cudaDataType, int, const void*, void*,
                                       cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
namespace at {
namespace cuda {
cublasHandle_t getCurrentCUDABlasHandle();
}
}  // namespace at
#endif

namespace fusedce {
namespace cuda_impl {
namespace {

using at::Tensor;

// ---- cuBLAS GEMM with fp32 C for half / bf16 A and B ------------------------------------------
// C[M, N] (fp32, row-major, ldc = C.stride(0)) = beta * C + A[M, K] @ B[K, N]. A and B are 2-D
// views with one unit stride (row-major or transposed row-major).
void operand(const Tensor& x, cublasOperation_t& op, int64_t& ld) {
  // cuBLAS is column-major: a row-major [r, c] tensor is the column-major [c, r] = x^T (op N).
  if (x.stride(1) == 1 && (x.size(0) <= 1 || x.stride(0) >= x.size(1))) {
    op = CUBLAS_OP_N;
    ld = std::max<int64_t>(x.size(0) <= 1 ? x.size(1) : x.stride(0), 1);
  } else {
    TORCH_INTERNAL_ASSERT(x.stride(0) == 1, "fusedce: unexpected GEMM operand strides");
    op = CUBLAS_OP_T;
    ld = std::max<int64_t>(x.size(1) <= 1 ? x.size(0) : x.stride(1), 1);
  }
}

// Switches the (shared) cuBLAS handle to device-resident alpha / beta for one call, and back.
class DevicePointerMode {
 public:
  explicit DevicePointerMode(cublasHandle_t h) : h_(h) {
    TORCH_CHECK(cublasGetPointerMode(h_, &prev_) == CUBLAS_STATUS_SUCCESS &&
                    cublasSetPointerMode(h_, CUBLAS_POINTER_MODE_DEVICE) == CUBLAS_STATUS_SUCCESS,
                "fusedce (CUDA): cublasSetPointerMode failed");
  }
  ~DevicePointerMode() { cublasSetPointerMode(h_, prev_); }
  DevicePointerMode(const DevicePointerMode&) = delete;
  DevicePointerMode& operator=(const DevicePointerMode&) = delete;

 private:
  cublasHandle_t h_;
  cublasPointerMode_t prev_ = CUBLAS_POINTER_MODE_HOST;
};

// dev_scalars: undefined (alpha 1, beta on the host), or a float32 device tensor {alpha, 0, 1}:
// alpha is then read on the device (a data-dependent gradient scale, no host sync) and beta is
// element 1 (beta == 0) or 2 (beta == 1).
void gemm_f32acc(const Tensor& a, const Tensor& b, Tensor& c, float beta,
                 const Tensor& dev_scalars) {
  TORCH_INTERNAL_ASSERT(c.scalar_type() == at::kFloat && c.stride(1) == 1);
  TORCH_INTERNAL_ASSERT(beta == 0.f || beta == 1.f || !dev_scalars.defined());
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (beta == 0.f) c.zero_();
    return;
  }
  const cudaDataType t = a.scalar_type() == at::kHalf ? CUDA_R_16F : CUDA_R_16BF;
  cublasOperation_t opa, opb;
  int64_t lda, ldb;
  operand(a, opa, lda);
  operand(b, opb, ldb);
  const int64_t ldc = M <= 1 ? N : c.stride(0);
  TORCH_CHECK(M < INT32_MAX && N < INT32_MAX && K < INT32_MAX && lda < INT32_MAX &&
                  ldb < INT32_MAX && ldc < INT32_MAX,
              "fusedce (CUDA): GEMM dimension too large for cublasGemmEx");
  const float one = 1.f;
  const void* alpha_p = &one;
  const void* beta_p = &beta;
  std::optional<DevicePointerMode> device_mode;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  if (dev_scalars.defined()) {
    TORCH_INTERNAL_ASSERT(dev_scalars.scalar_type() == at::kFloat && dev_scalars.numel() == 3 &&
                          dev_scalars.is_contiguous());
    const float* d = dev_scalars.data_ptr<float>();
    alpha_p = d;
    beta_p = d + (beta == 0.f ? 1 : 2);
    device_mode.emplace(handle);
  }
  // col-major: C^T [N, M] = B^T [N, K] @ A^T [K, M]
  const cublasStatus_t st = cublasGemmEx(
      handle, opb, opa, static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), alpha_p,
      b.data_ptr(), t, static_cast<int>(ldb), a.data_ptr(), t, static_cast<int>(lda), beta_p,
      c.data_ptr(), CUDA_R_32F, static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  TORCH_CHECK(st == CUBLAS_STATUS_SUCCESS, "fusedce (CUDA): cublasGemmEx failed with status ",
              static_cast<int>(st));
}

}  // namespace

// out (+)= a @ b in out's dtype (beta 0 on the first contribution, then 1); with f32acc (out is
// float32) the product is scaled by dev_scalars' alpha when given (see gemm_f32acc).
void gemm_acc(Tensor& out, const Tensor& a, const Tensor& b, bool first, bool f32acc,
              const Tensor& dev_scalars) {
  if (f32acc) {
    gemm_f32acc(a, b, out, first ? 0.f : 1.f, dev_scalars);
  } else if (first) {
    at::mm_out(out, a, b);
  } else {
    at::addmm_out(out, out, a, b);
  }
}

}  // namespace cuda_impl
}  // namespace fusedce
