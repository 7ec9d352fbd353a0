// The arguments of the terms beyond the CE (FUSEDCE_TERM_ARGS in fusedce.cpp), gathered and
// checked once for both backends. Every message names the op argument.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "checks.h"

namespace fusedce {

struct TermArgs {
  double ce_weight = 1.0;
  bool want_entropy = false;
  bool want_logprob = false;
  double entropy_coef = 0.0;
  std::optional<at::Tensor> teacher_logits, teacher_hidden, teacher_weight, teacher_bias;
  int64_t distill = 0;
  double distill_weight = 1.0, distill_beta = 0.5, distill_temperature = 1.0;
  std::optional<at::Tensor> old_logprobs, advantages, ref_logprobs;
  double epsilon_low = 0.2, epsilon_high = 0.2, kl_beta = 0.0;
  // TRL 1.16 GRPO options (policy loss): per-token multipliers of the policy part (vLLM
  // importance-sampling ratio) and of entropy_coef, the policy form, two-sided clipping, the
  // ratio-weighted KL, SAPO's temperatures.
  std::optional<at::Tensor> policy_weights, entropy_weights;
  int64_t policy_kind = 0;  // 0 clipped (grpo/bnpo/dr_grpo/dapo/luspo), 1 cispo, 2 sapo
  double policy_delta = 0.0;  // > 0: the unclipped ratio is min(ratio, delta); 0: off
  bool kl_bias_correction = false;
  double sapo_temperature_pos = 1.0, sapo_temperature_neg = 1.05;
  // Statistics of `loss` only (not in FUSEDCE_TERM_ARGS: no gradient, so loss_backward has none).
  bool want_mean_logit = false, want_log_sum_sq = false;

  bool entropy_needed() const { return want_entropy || entropy_coef != 0.0; }
  bool policy() const { return advantages.has_value(); }
  // Anything beyond the plain CE (which has its own tuned kernels).
  bool any() const {
    return ce_weight != 1.0 || entropy_needed() || want_logprob || distill != 0 || policy() ||
           want_mean_logit || want_log_sum_sq;
  }

  // n rows, v classes (the student's), ref: the student's hidden (device, for messages).
  void check(int64_t n, int64_t v, const at::Tensor& ref) const {
    TORCH_CHECK(std::isfinite(ce_weight), "fusedce: ce_weight must be finite, got ", ce_weight);
    TORCH_CHECK(std::isfinite(entropy_coef), "fusedce: entropy_coef must be finite, got ",
                entropy_coef);
    TORCH_CHECK(distill >= 0 && distill <= 3,
                "fusedce: distill must be 0 (off), 1 (forward KL), 2 (reverse KL) or 3 (JSD), got ",
                distill);
    const bool has_teacher = teacher_logits.has_value() || teacher_hidden.has_value() ||
                             teacher_weight.has_value();
    if (distill == 0) {
      TORCH_CHECK(!has_teacher, "fusedce: a teacher was given but distill = 0");
    } else {
      TORCH_CHECK(std::isfinite(distill_weight), "fusedce: distill_weight must be finite, got ",
                  distill_weight);
      TORCH_CHECK(std::isfinite(distill_temperature) && distill_temperature > 0,
                  "fusedce: distill_temperature must be finite and > 0, got ", distill_temperature);
      TORCH_CHECK(distill != 3 || (distill_beta > 0 && distill_beta < 1),
                  "fusedce: distill_beta must be in (0, 1) for the JSD (use forward or reverse KL "
                  "for the limits), got ", distill_beta);
      TORCH_CHECK(teacher_logits.has_value() != teacher_hidden.has_value(),
                  "fusedce: give the teacher as teacher_logits or as teacher_hidden + "
                  "teacher_weight, exactly one of them");
      if (teacher_logits.has_value()) {
        const at::Tensor& t = *teacher_logits;
        check_float_tensor(t, "teacher_logits");
        TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == v,
                    "fusedce: teacher_logits must have shape [", n, ", ", v, "], got ", t.sizes());
        check_same_device(t, ref, "teacher_logits", "hidden");
        TORCH_CHECK(!teacher_weight.has_value() && !teacher_bias.has_value(),
                    "fusedce: teacher_weight/teacher_bias go with teacher_hidden, not with "
                    "teacher_logits");
      } else {
        TORCH_CHECK(teacher_weight.has_value(),
                    "fusedce: teacher_hidden needs teacher_weight [V, Ht]");
        const at::Tensor& th = *teacher_hidden;
        const at::Tensor& tw = *teacher_weight;
        check_float_tensor(th, "teacher_hidden");
        check_float_tensor(tw, "teacher_weight");
        TORCH_CHECK(th.dim() == 2 && th.size(0) == n, "fusedce: teacher_hidden must have shape [",
                    n, ", Ht], got ", th.sizes());
        TORCH_CHECK(tw.dim() == 2 && tw.size(0) == v && tw.size(1) == th.size(1),
                    "fusedce: teacher_weight must have shape [", v, ", ", th.size(1), "], got ",
                    tw.sizes());
        TORCH_CHECK(th.scalar_type() == tw.scalar_type(), "fusedce: teacher_hidden is ",
                    th.scalar_type(), " but teacher_weight is ", tw.scalar_type());
        check_same_device(th, ref, "teacher_hidden", "hidden");
        check_same_device(tw, ref, "teacher_weight", "hidden");
        if (teacher_bias.has_value()) {
          TORCH_CHECK(teacher_bias->dim() == 1 && teacher_bias->size(0) == v,
                      "fusedce: teacher_bias must have shape [", v, "], got ",
                      teacher_bias->sizes());
          check_same_device(*teacher_bias, ref, "teacher_bias", "hidden");
        }
      }
    }
    if (policy()) {
      check_per_token(advantages, n, ref, "advantages");
      check_per_token(old_logprobs, n, ref, "old_logprobs");
      check_per_token(ref_logprobs, n, ref, "ref_logprobs");
      TORCH_CHECK(std::isfinite(epsilon_low) && epsilon_low >= 0 && epsilon_low <= 1,
                  "fusedce: epsilon_low must be in [0, 1], got ", epsilon_low);
      TORCH_CHECK(std::isfinite(epsilon_high) && epsilon_high >= 0,
                  "fusedce: epsilon_high must be finite and >= 0, got ", epsilon_high);
      TORCH_CHECK(std::isfinite(kl_beta), "fusedce: kl_beta must be finite, got ", kl_beta);
      TORCH_CHECK(kl_beta == 0.0 || ref_logprobs.has_value(),
                  "fusedce: kl_beta != 0 needs ref_logprobs");
      check_per_token(policy_weights, n, ref, "policy_weights");
      TORCH_CHECK(policy_kind >= 0 && policy_kind <= 2,
                  "fusedce: policy_kind must be 0 (clipped), 1 (cispo) or 2 (sapo), got ",
                  policy_kind);
      TORCH_CHECK(std::isfinite(policy_delta) && policy_delta >= 0,
                  "fusedce: policy_delta must be finite and >= 0 (0: off), got ", policy_delta);
      TORCH_CHECK(std::isfinite(sapo_temperature_pos) && sapo_temperature_pos > 0,
                  "fusedce: sapo_temperature_pos must be finite and > 0, got ",
                  sapo_temperature_pos);
      TORCH_CHECK(std::isfinite(sapo_temperature_neg) && sapo_temperature_neg > 0,
                  "fusedce: sapo_temperature_neg must be finite and > 0, got ",
                  sapo_temperature_neg);
    } else {
      TORCH_CHECK(!old_logprobs.has_value() && !ref_logprobs.has_value() &&
                      !policy_weights.has_value(),
                  "fusedce: old_logprobs/ref_logprobs/policy_weights are policy-loss inputs and "
                  "need advantages");
    }
    check_per_token(entropy_weights, n, ref, "entropy_weights");
  }
};

}  // namespace fusedce

// The C++ parameters of FUSEDCE_TERM_ARGS (same order), and the TermArgs built from them: one
// definition for the CPU and CUDA implementations of `loss` and `loss_backward`.
#define FUSEDCE_TERM_PARAMS                                                                       \
  double ce_weight, bool want_entropy, bool want_logprob, double entropy_coef,                    \
      const std::optional<at::Tensor>&teacher_logits,                                             \
      const std::optional<at::Tensor>&teacher_hidden,                                             \
      const std::optional<at::Tensor>&teacher_weight, const std::optional<at::Tensor>&teacher_bias, \
      int64_t distill, double distill_weight, double distill_beta, double distill_temperature,    \
      const std::optional<at::Tensor>&old_logprobs, const std::optional<at::Tensor>&advantages,   \
      const std::optional<at::Tensor>&ref_logprobs, double epsilon_low, double epsilon_high,      \
      double kl_beta, const std::optional<at::Tensor>&policy_weights,                           \
      const std::optional<at::Tensor>&entropy_weights, int64_t policy_kind, double policy_delta,  \
      bool kl_bias_correction, double sapo_temperature_pos, double sapo_temperature_neg

#define FUSEDCE_TERM_ARGS_STRUCT                                                                 \
  ::fusedce::TermArgs {                                                                          \
    ce_weight, want_entropy, want_logprob, entropy_coef, teacher_logits, teacher_hidden,         \
        teacher_weight, teacher_bias, distill, distill_weight, distill_beta, distill_temperature, \
        old_logprobs, advantages, ref_logprobs, epsilon_low, epsilon_high, kl_beta,              \
        policy_weights, entropy_weights, policy_kind, policy_delta, kl_bias_correction,          \
        sapo_temperature_pos, sapo_temperature_neg                                               \
  }
