// CUDA implementation of the cross entropy on given logits (fusedce::cross_entropy,
// cross_entropy_backward, cross_entropy_backward_): the row kernels of kernels/row_kernels.cu on
// the caller's logits, no GEMM. csrc/cpu/cross_entropy_cpu.cpp is the CPU twin.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../checks.h"
#include "common.h"

namespace fusedce {
namespace cuda_impl {
namespace {

// ---- cross entropy on given logits ---------------------------------------------------------------
struct Logits {
  Tensor lg;  // last dim unit stride
  int64_t N, V, ld;
  Tensor tgt, cw, cw_sum;
  gpu::EpiParams ep;
  gpu::DType kd;
  at::ScalarType acc;
  cudaStream_t stream;
};

void setup_logits(Logits& L, const Tensor& logits, const Tensor& target,
                  const std::optional<Tensor>& class_weight, int64_t ignore_index,
                  double label_smoothing, double z_loss, double softcap, double logit_scale) {
  check_logits_args(logits, target, class_weight);
  check_scalars(label_smoothing, z_loss, softcap, logit_scale);
  TORCH_CHECK(logits.is_cuda(), "fusedce (CUDA): logits must be a CUDA tensor");
  L.N = logits.size(0);
  L.V = logits.size(1);
  L.lg = (logits.stride(1) == 1 && (L.N <= 1 || logits.stride(0) >= L.V)) ? logits
                                                                          : logits.contiguous();
  L.ld = L.N <= 1 ? L.V : L.lg.stride(0);
  L.kd = kdtype(logits.scalar_type());
  L.acc = acc_type_of(logits.scalar_type());
  L.tgt = target.to(at::kLong).contiguous();
  L.stream = c10::cuda::getCurrentCUDAStream().stream();
  set_ce_epilogue(L.ep, L.cw, L.cw_sum, class_weight, L.acc, L.V, ignore_index,
                  label_smoothing, z_loss, softcap, logit_scale);
  check_targets(L.tgt, L.V, ignore_index, L.stream);
}

Out5 cross_entropy_cuda(const Tensor& logits, const Tensor& target,
                        const std::optional<Tensor>& class_weight, int64_t ignore_index,
                        double label_smoothing, double z_loss, double softcap,
                        double logit_scale, bool /*inplace_backward: for the autograd formula*/,
                        bool mean) {
  c10::cuda::CUDAGuard guard(logits.device());
  Logits L;
  setup_logits(L, logits, target, class_weight, ignore_index, label_smoothing, z_loss, softcap,
               logit_scale);
  const auto opt = logits.options();
  Tensor token_loss = at::empty({L.N}, opt.dtype(L.acc));
  Tensor lse = at::empty({L.N}, opt.dtype(L.acc));
  Tensor predicted = at::empty({L.N}, opt.dtype(at::kLong));
  if (L.N > 0) {
    gpu::StatsArgs sa;
    sa.logits = L.lg.data_ptr();  // read only (no fused gradient)
    sa.ld = L.ld;
    sa.rows = L.N;
    sa.col0 = 0;
    sa.cols = L.V;
    sa.target = L.tgt.data_ptr<int64_t>();
    sa.token_loss = token_loss.data_ptr();
    sa.lse = lse.data_ptr();
    sa.predicted = predicted.data_ptr<int64_t>();
    check_launch(gpu::launch_row_stats(L.kd, sa, L.ep, L.stream), "row_stats");
  }
  // After the pass (it does not need them): the row kernel is the first launch of the call.
  const auto acc_opt = opt.dtype(L.acc);
  Tensor loss = mean ? at::empty({}, acc_opt) : at::empty({0}, acc_opt);
  Tensor grad_scale = mean ? at::empty({}, acc_opt) : at::empty({0}, acc_opt);
  if (mean) {
    check_launch(gpu::launch_mean_after(kdtype(L.acc), L.tgt.data_ptr<int64_t>(),
                                        token_loss.data_ptr(), L.N,
                                        L.cw.defined() ? L.cw.data_ptr() : nullptr, L.V,
                                        L.ep.ignore_index, loss.data_ptr(), grad_scale.data_ptr(),
                                        L.stream),
                 "mean_after");
  }
  return {token_loss, lse, predicted, loss, grad_scale};
}

void ce_grad(const Logits& L, const Tensor& out, int64_t ld_out, const Tensor& lse_in,
             const Tensor& grad_token_loss, const std::optional<Tensor>& grad_lse) {
  check_per_token(std::optional<Tensor>(lse_in), L.N, L.lg, "lse");
  check_per_token(std::optional<Tensor>(grad_token_loss), L.N, L.lg, "grad_token_loss");
  check_per_token(grad_lse, L.N, L.lg, "grad_lse");
  if (L.N == 0) return;
  const Tensor lse = lse_in.to(L.acc).contiguous();
  Tensor gt = grad_token_loss.to(L.acc);
  const int64_t gt_stride = L.N <= 1 ? 0 : gt.stride(0);
  Tensor gl;
  int64_t gl_stride = 0;
  if (grad_lse.has_value()) {
    gl = grad_lse->to(L.acc);
    gl_stride = L.N <= 1 ? 0 : gl.stride(0);
  }
  gpu::GradArgs ga;
  ga.in = L.lg.data_ptr();
  ga.ld_in = L.ld;
  ga.out = out.data_ptr();
  ga.ld_out = ld_out;
  ga.rows = L.N;
  ga.col0 = 0;
  ga.cols = L.V;
  ga.target = L.tgt.data_ptr<int64_t>();
  ga.lse = lse.data_ptr();
  ga.grad_tok = gt.data_ptr();
  ga.grad_tok_stride = gt_stride;
  ga.grad_lse = gl.defined() ? gl.data_ptr() : nullptr;
  ga.grad_lse_stride = gl_stride;
  check_launch(gpu::launch_row_grad(L.kd, ga, L.ep, L.stream), "row_grad");
}

Tensor cross_entropy_backward_cuda(const Tensor& logits, const Tensor& target,
                                   const std::optional<Tensor>& class_weight, const Tensor& lse,
                                   const Tensor& grad_token_loss,
                                   const std::optional<Tensor>& grad_lse, int64_t ignore_index,
                                   double label_smoothing, double z_loss, double softcap,
                                   double logit_scale) {
  c10::cuda::CUDAGuard guard(logits.device());
  Logits L;
  setup_logits(L, logits, target, class_weight, ignore_index, label_smoothing, z_loss, softcap,
               logit_scale);
  Tensor out = at::empty({L.N, L.V}, logits.options());
  ce_grad(L, out, L.V, lse, grad_token_loss, grad_lse);
  return out;
}

void cross_entropy_backward_inplace_cuda(const Tensor& logits, const Tensor& target,
                                         const std::optional<Tensor>& class_weight,
                                         const Tensor& lse, const Tensor& grad_token_loss,
                                         const std::optional<Tensor>& grad_lse,
                                         int64_t ignore_index, double label_smoothing,
                                         double z_loss, double softcap, double logit_scale) {
  c10::cuda::CUDAGuard guard(logits.device());
  Logits L;
  setup_logits(L, logits, target, class_weight, ignore_index, label_smoothing, z_loss, softcap,
               logit_scale);
  if (L.lg.is_same(logits)) {
    ce_grad(L, L.lg, L.ld, lse, grad_token_loss, grad_lse);
  } else {  // a layout the kernel cannot write in place: through a contiguous copy
    ce_grad(L, L.lg, L.ld, lse, grad_token_loss, grad_lse);
    const_cast<Tensor&>(logits).copy_(L.lg);
  }
}

}  // namespace
}  // namespace cuda_impl
}  // namespace fusedce

TORCH_LIBRARY_IMPL(fusedce, CUDA, m) {
  m.impl("cross_entropy", &fusedce::cuda_impl::cross_entropy_cuda);
  m.impl("cross_entropy_backward", &fusedce::cuda_impl::cross_entropy_backward_cuda);
  m.impl("cross_entropy_backward_", &fusedce::cuda_impl::cross_entropy_backward_inplace_cuda);
}
