// Host-side helpers shared by the CPU ops.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "../terms_args.h"
#include "row_math.h"
#include "terms.h"

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

// The terms' constants in acc_t, with the per-row inputs converted to acc_t (kept alive in `keep`).
template <typename acc_t>
Terms<acc_t> make_terms(const TermArgs& ta, at::ScalarType acc, std::vector<at::Tensor>& keep) {
  Terms<acc_t> tm;
  tm.any = true;
  tm.ce_weight = static_cast<acc_t>(ta.ce_weight);
  tm.entropy = ta.entropy_needed();
  tm.entropy_coef = static_cast<acc_t>(ta.entropy_coef);
  tm.distill = ta.distill;
  tm.distill_weight = static_cast<acc_t>(ta.distill_weight);
  tm.beta = static_cast<acc_t>(ta.distill_beta);
  tm.inv_T = static_cast<acc_t>(1.0 / ta.distill_temperature);
  tm.policy = ta.policy();
  auto rowvec = [&](const std::optional<at::Tensor>& t) -> const acc_t* {
    if (!t.has_value()) return nullptr;
    keep.push_back(t->to(acc).contiguous());
    return keep.back().data_ptr<acc_t>();
  };
  tm.advantages = rowvec(ta.advantages);
  tm.old_logprobs = rowvec(ta.old_logprobs);
  tm.ref_logprobs = ta.kl_beta != 0.0 ? rowvec(ta.ref_logprobs) : nullptr;
  tm.eps_low = static_cast<acc_t>(ta.epsilon_low);
  tm.eps_high = static_cast<acc_t>(ta.epsilon_high);
  tm.kl_beta = static_cast<acc_t>(ta.kl_beta);
  tm.policy_weights = tm.policy ? rowvec(ta.policy_weights) : nullptr;
  tm.entropy_weights = ta.entropy_coef != 0.0 ? rowvec(ta.entropy_weights) : nullptr;
  tm.policy_kind = ta.policy_kind;
  tm.delta = static_cast<acc_t>(ta.policy_delta);
  tm.kl_bias_correction = ta.kl_bias_correction;
  tm.sapo_tau_pos = static_cast<acc_t>(ta.sapo_temperature_pos);
  tm.sapo_tau_neg = static_cast<acc_t>(ta.sapo_temperature_neg);
  tm.moments = ta.want_mean_logit || ta.want_log_sum_sq;
  return tm;
}

}  // namespace cpu
}  // namespace fusedce
