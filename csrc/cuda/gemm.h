// cuBLAS GEMM through the current ATen handle and stream: float32 C for half / bf16 A and B (which
// at::mm cannot give), alpha optionally read on the device (no host sync).
#pragma once

#include <ATen/ATen.h>

namespace fusedce {
namespace cuda_impl {

// out (+)= a @ b in out's dtype (beta 0 on the first contribution, then 1); with f32acc (out is
// float32) the product is scaled by dev_scalars' alpha when given (see gemm.cpp).
void gemm_acc(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool first, bool f32acc,
              const at::Tensor& dev_scalars = at::Tensor());

}  // namespace cuda_impl
}  // namespace fusedce
