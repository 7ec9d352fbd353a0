// Host-side helpers shared by the CPU ops.
#pragma once

#include <ATen/ATen.h>

#include "row_math.h"

namespace fusedce {
namespace cpu {

// On the CPU the check is free, so it runs on every call, before anything is read by target.
inline void check_targets_in_range(const at::Tensor& target, int64_t vocab, int64_t ignore_index) {
  const at::Tensor t = target.to(at::kLong).contiguous();
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK(p[i] == ignore_index || (p[i] >= 0 && p[i] < vocab), "fusedce: target[", i,
                "] = ", p[i], " is outside [0, ", vocab, ") and is not ignore_index (",
                ignore_index, ")");
  }
}

// class_weight: [V] in acc_t, contiguous, or undefined.
template <typename acc_t>
Epilogue<acc_t> make_epilogue(const at::Tensor& class_weight, int64_t vocab, int64_t ignore_index,
                              double label_smoothing, double z_loss, double softcap,
                              double logit_scale) {
  Epilogue<acc_t> ep;
  ep.logit_scale = static_cast<acc_t>(logit_scale);
  ep.softcap = static_cast<acc_t>(softcap);
  ep.inv_softcap = softcap > 0 ? static_cast<acc_t>(1.0 / softcap) : acc_t(0);
  ep.eps = static_cast<acc_t>(label_smoothing);
  ep.z_loss = static_cast<acc_t>(z_loss);
  ep.class_weight = class_weight.defined() ? class_weight.data_ptr<acc_t>() : nullptr;
  ep.class_weight_sum =
      class_weight.defined() ? class_weight.sum().item<acc_t>() : static_cast<acc_t>(vocab);
  ep.vocab = vocab;
  ep.ignore_index = ignore_index;
  return ep;
}

}  // namespace cpu
}  // namespace fusedce
