// CUDA implementation of the vocab-parallel building blocks (fusedce::shard_stats, shard_grad_):
// kernels/shard_kernels.cu on one shard of the logits. csrc/cpu/shard_cpu.cpp is the CPU twin.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "../checks.h"
#include "common.h"

namespace fusedce {
namespace cuda_impl {
namespace {

// ---- vocab-parallel building blocks ---------------------------------------------------------------
gpu::ShardArgs shard_args(const Tensor& lg, const Tensor& tgt, int64_t vocab_start,
                          const Tensor& cw, int64_t ignore_index, double softcap,
                          double logit_scale) {
  gpu::ShardArgs a;
  a.logits = lg.data_ptr();
  a.ld = lg.size(1);
  a.rows = lg.size(0);
  a.cols = lg.size(1);
  a.target = tgt.data_ptr<int64_t>();
  a.vocab_start = vocab_start;
  a.ignore_index = ignore_index;
  a.class_weight = cw.defined() ? cw.data_ptr() : nullptr;
  a.softcap = softcap;
  a.logit_scale = logit_scale;
  return a;
}

Tensor shard_stats_cuda(const Tensor& logits, const Tensor& target, int64_t vocab_start,
                        const std::optional<Tensor>& class_weight, int64_t ignore_index,
                        double softcap, double logit_scale) {
  c10::cuda::CUDAGuard guard(logits.device());
  check_shard_args(logits, target, vocab_start, class_weight);
  check_scalars(0.0, 0.0, softcap, logit_scale);
  const Tensor lg = logits.contiguous();
  const Tensor tgt = target.to(at::kLong).contiguous();
  const auto acc = acc_type_of(lg.scalar_type());
  const Tensor cw = class_weight.has_value() ? class_weight->to(acc).contiguous() : Tensor();
  Tensor out = at::empty({lg.size(0), 6}, lg.options().dtype(acc));
  gpu::ShardArgs a = shard_args(lg, tgt, vocab_start, cw, ignore_index, softcap, logit_scale);
  a.stats = out.data_ptr();
  check_launch(gpu::launch_shard_stats(kdtype(lg.scalar_type()), a,
                                       c10::cuda::getCurrentCUDAStream().stream()),
               "shard_stats");
  return out;
}

void shard_grad_cuda(const Tensor& logits, const Tensor& target, int64_t vocab_start,
                     const std::optional<Tensor>& class_weight, const Tensor& lse,
                     const Tensor& coef_p, const Tensor& coef_t,
                     const std::optional<Tensor>& coef_w, int64_t ignore_index, double softcap,
                     double logit_scale) {
  c10::cuda::CUDAGuard guard(logits.device());
  check_shard_args(logits, target, vocab_start, class_weight);
  check_scalars(0.0, 0.0, softcap, logit_scale);
  const int64_t n = logits.size(0);
  check_per_token(std::optional<Tensor>(lse), n, logits, "lse");
  check_per_token(std::optional<Tensor>(coef_p), n, logits, "coef_p");
  check_per_token(std::optional<Tensor>(coef_t), n, logits, "coef_t");
  check_per_token(coef_w, n, logits, "coef_w");
  TORCH_CHECK(logits.is_contiguous(),
              "fusedce: shard_grad_ needs contiguous logits (it writes in place)");
  const auto acc = acc_type_of(logits.scalar_type());
  const Tensor tgt = target.to(at::kLong).contiguous();
  const Tensor cw = class_weight.has_value() ? class_weight->to(acc).contiguous() : Tensor();
  const Tensor L = lse.to(acc).contiguous(), P = coef_p.to(acc).contiguous(),
               T = coef_t.to(acc).contiguous();
  const Tensor W = coef_w.has_value() ? coef_w->to(acc).contiguous() : Tensor();
  gpu::ShardArgs a = shard_args(logits, tgt, vocab_start, cw, ignore_index, softcap, logit_scale);
  a.lse = L.data_ptr();
  a.coef_p = P.data_ptr();
  a.coef_t = T.data_ptr();
  a.coef_w = W.defined() ? W.data_ptr() : nullptr;
  check_launch(gpu::launch_shard_grad(kdtype(logits.scalar_type()), a,
                                      c10::cuda::getCurrentCUDAStream().stream()),
               "shard_grad");
}
}  // namespace
}  // namespace cuda_impl
}  // namespace fusedce

TORCH_LIBRARY_IMPL(fusedce, CUDA, m) {
  m.impl("shard_stats", &fusedce::cuda_impl::shard_stats_cuda);
  m.impl("shard_grad_", &fusedce::cuda_impl::shard_grad_cuda);
}
