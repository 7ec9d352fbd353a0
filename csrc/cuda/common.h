// Host-side helpers shared by the CUDA ops (csrc/cuda/*.cpp): the kernels' dtype tag, launch
// checks, and the opt-in target validation.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <optional>
#include <tuple>

#include "../terms_args.h"
#include "../validate.h"
#include "kernels/launchers.h"

namespace fusedce {
namespace cuda_impl {

using at::Tensor;
using Out3 = std::tuple<Tensor, Tensor, Tensor>;
using Out5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

inline int64_t env_int(const char* name, int64_t dflt) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return dflt;
  return std::atoll(s);
}

inline gpu::DType kdtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return gpu::DType::kFloat16;
    case at::kBFloat16:
      return gpu::DType::kBFloat16;
    case at::kFloat:
      return gpu::DType::kFloat32;
    case at::kDouble:
      return gpu::DType::kFloat64;
    default:
      TORCH_CHECK(false, "fusedce (CUDA): unsupported dtype ", t,
                  "; expected float16, bfloat16, float32 or float64");
  }
}

inline bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

inline void check_launch(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "fusedce (CUDA): launch of ", what, " failed: ",
              cudaGetErrorString(e));
}

inline bool stream_capturing(cudaStream_t s) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  const cudaError_t e = cudaStreamIsCapturing(s, &st);
  TORCH_CHECK(e == cudaSuccess, "fusedce (CUDA): cudaStreamIsCapturing failed: ",
              cudaGetErrorString(e));
  return st != cudaStreamCaptureStatusNone;
}

// Validation mode only (fusedce.validate_targets(), FUSEDCE_VALIDATE=1): the clear error with the
// first bad index, at the cost of a host sync; skipped while the stream is being captured into a
// CUDA graph. The kernels never index by an out-of-range target either way.
// The CE epilogue's scalar options and class weights, as the fused loss and CE on given logits
// both hand them to the row kernels; cw / cw_sum (class weights in the accumulation dtype and
// their sum, on the device) are the caller's, kept alive for the launches that read them.
inline void set_ce_epilogue(gpu::EpiParams& ep, Tensor& cw, Tensor& cw_sum,
                            const std::optional<Tensor>& class_weight, at::ScalarType acc,
                            int64_t V, int64_t ignore_index, double label_smoothing,
                            double z_loss, double softcap, double logit_scale) {
  ep.logit_scale = logit_scale;
  ep.softcap = softcap;
  ep.label_smoothing = label_smoothing;
  ep.z_loss = z_loss;
  ep.V = V;
  ep.ignore_index = ignore_index;
  if (class_weight.has_value()) {
    cw = class_weight->to(acc).contiguous();
    cw_sum = cw.sum();
    ep.class_weight = cw.data_ptr();
    ep.class_weight_sum = cw_sum.data_ptr();
  }
}

// The scalar options of the terms beyond the CE as the kernels take them (the per-row pointers are
// the caller's to set): the fused loss and the vocab-parallel term ops read them alike.
inline gpu::TermsParams terms_params(const TermArgs& ta) {
  gpu::TermsParams tp;
  tp.ce_weight = ta.ce_weight;
  tp.entropy_coef = ta.entropy_coef;
  tp.distill = static_cast<int>(ta.distill);
  tp.distill_weight = ta.distill_weight;
  tp.beta = ta.distill_beta;
  tp.inv_T = 1.0 / ta.distill_temperature;
  tp.eps_low = ta.epsilon_low;
  tp.eps_high = ta.epsilon_high;
  tp.kl_beta = ta.kl_beta;
  tp.policy_kind = static_cast<int>(ta.policy_kind);
  tp.delta = ta.policy_delta;
  tp.kl_bias_correction = ta.kl_bias_correction;
  tp.sapo_tau_pos = ta.sapo_temperature_pos;
  tp.sapo_tau_neg = ta.sapo_temperature_neg;
  return tp;
}

inline void check_targets(const Tensor& tgt, int64_t vocab, int64_t ignore_index, cudaStream_t s) {
  if (!validation_enabled() || tgt.numel() == 0 || stream_capturing(s)) return;
  const Tensor bad = ((tgt < 0) | (tgt >= vocab)) & (tgt != ignore_index);
  if (!bad.any().item<bool>()) return;
  const int64_t i = bad.nonzero().select(1, 0).min().item<int64_t>();
  const int64_t val = tgt[i].item<int64_t>();
  TORCH_CHECK(false, "fusedce: target[", i, "] = ", val, " is outside [0, ", vocab,
              ") and is not ignore_index (", ignore_index, ")");
}

}  // namespace cuda_impl
}  // namespace fusedce
