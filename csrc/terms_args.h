// The arguments of the terms beyond the CE (FUSEDCE_TERM_ARGS, the tail of the `loss` and
// `loss_backward` schemas in fusedce.cpp), gathered and checked once for both backends. Every message names the op argument.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <optional>
#include <utility>

#include "checks.h"

namespace fusedce {

// The term arguments of `loss` and `loss_backward`, defined once: the op schema (fusedce.cpp), the
// C++ parameters and TermArgs' fields below, and the layout that fusedce/_op_args.py checks at
// import (_C.term_layout()) all come from these three lists. The scalars travel packed in two list
// arguments, `float[] term_floats` and `int[] term_ints`, in the order written here: every op
// argument costs host time on every call (Python argument parsing, boxing, autograd.Function's
// scan of its inputs), and torch.library.register_autograd's wrapper even costs time quadratic in
// their number (fusedce/ops.py: ~0.35 ms per call of `loss` when it had 35 arguments).
// Adding a scalar: one line at the end of its list here, one field in _op_args.TermOptions (same
// name, default and place); the import check refuses any other difference.
//   X(C++ type, name, default)
// The TRL 1.16 GRPO options of the policy term: policy_weights / entropy_weights are per-token
// multipliers of the policy part (vLLM importance-sampling ratio) and of entropy_coef;
// policy_kind 0 clipped (grpo/bnpo/dr_grpo/dapo/luspo), 1 cispo, 2 sapo; policy_delta > 0: the
// unclipped ratio is min(ratio, delta) (0: off); kl_bias_correction: the KL times the ratio;
// sapo_temperature_pos / _neg: SAPO's temperatures.
#define FUSEDCE_TERM_FLOATS(X)          \
  X(double, ce_weight, 1.0)             \
  X(double, entropy_coef, 0.0)          \
  X(double, distill_weight, 1.0)        \
  X(double, distill_beta, 0.5)          \
  X(double, distill_temperature, 1.0)   \
  X(double, epsilon_low, 0.2)           \
  X(double, epsilon_high, 0.2)          \
  X(double, kl_beta, 0.0)               \
  X(double, policy_delta, 0.0)          \
  X(double, sapo_temperature_pos, 1.0)  \
  X(double, sapo_temperature_neg, 1.05)
// bool entries must be 0 or 1 (checked); want_mean_logit / want_log_sum_sq are statistics of
// `loss` only (no gradient): loss_backward ignores them.
#define FUSEDCE_TERM_INTS(X)            \
  X(bool, want_entropy, false)          \
  X(bool, want_logprob, false)          \
  X(int64_t, distill, 0)                \
  X(bool, want_mean_logit, false)       \
  X(bool, want_log_sum_sq, false)       \
  X(int64_t, policy_kind, 0)            \
  X(bool, kl_bias_correction, false)
// Optional tensors stay separate `Tensor? name=None` arguments (a Tensor?[] list would make
// register_autograd flatten every call's arguments with pytree: slower than what it saves).
#define FUSEDCE_TERM_TENSORS(X)         \
  X(teacher_logits)                     \
  X(teacher_hidden)                     \
  X(teacher_weight)                     \
  X(teacher_bias)                       \
  X(old_logprobs)                       \
  X(advantages)                         \
  X(ref_logprobs)                       \
  X(policy_weights)                     \
  X(entropy_weights)

#define FUSEDCE_COUNT_ONE_(...) +1
constexpr size_t kTermFloats = 0 FUSEDCE_TERM_FLOATS(FUSEDCE_COUNT_ONE_);
constexpr size_t kTermInts = 0 FUSEDCE_TERM_INTS(FUSEDCE_COUNT_ONE_);
constexpr size_t kTermTensors = 0 FUSEDCE_TERM_TENSORS(FUSEDCE_COUNT_ONE_);
#undef FUSEDCE_COUNT_ONE_

namespace detail {
template <typename T>
inline T term_int(int64_t v, const char* name) {
  return static_cast<T>(v);
}
template <>
inline bool term_int<bool>(int64_t v, const char* name) {
  TORCH_CHECK(v == 0 || v == 1, "fusedce: term_ints entry ", name, " is a flag (0 or 1), got ", v);
  return v != 0;
}
}  // namespace detail

struct TermArgs {
#define FUSEDCE_FIELD_(type, name, default_value) type name = default_value;
  FUSEDCE_TERM_FLOATS(FUSEDCE_FIELD_)
  FUSEDCE_TERM_INTS(FUSEDCE_FIELD_)
#undef FUSEDCE_FIELD_
#define FUSEDCE_FIELD_(name) std::optional<at::Tensor> name;
  FUSEDCE_TERM_TENSORS(FUSEDCE_FIELD_)
#undef FUSEDCE_FIELD_

  // From the op's arguments: each list empty (all defaults) or exactly as long as its layout; a
  // list of another length is refused, never read partly (a shifted layout would be a silently
  // wrong loss).
  static TermArgs unpack(c10::ArrayRef<double> floats, c10::ArrayRef<int64_t> ints,
                         std::array<std::optional<at::Tensor>, kTermTensors> tensors) {
#define FUSEDCE_NAME_(type, name, default_value) " " #name
    TORCH_CHECK(floats.empty() || floats.size() == kTermFloats,
                "fusedce: term_floats must be empty (all defaults) or hold ", kTermFloats,
                " values in this order:" FUSEDCE_TERM_FLOATS(FUSEDCE_NAME_) "; got ",
                floats.size(), " values (build it with fusedce._op_args.TermOptions.pack())");
    TORCH_CHECK(ints.empty() || ints.size() == kTermInts,
                "fusedce: term_ints must be empty (all defaults) or hold ", kTermInts,
                " values in this order:" FUSEDCE_TERM_INTS(FUSEDCE_NAME_) "; got ", ints.size(),
                " values (build it with fusedce._op_args.TermOptions.pack())");
#undef FUSEDCE_NAME_
    TermArgs ta;
    size_t i = 0;
    if (!floats.empty()) {
#define FUSEDCE_READ_(type, name, default_value) ta.name = floats[i++];
      FUSEDCE_TERM_FLOATS(FUSEDCE_READ_)
#undef FUSEDCE_READ_
    }
    i = 0;
    if (!ints.empty()) {
#define FUSEDCE_READ_(type, name, default_value) \
  ta.name = detail::term_int<type>(ints[i++], #name);
      FUSEDCE_TERM_INTS(FUSEDCE_READ_)
#undef FUSEDCE_READ_
    }
    i = 0;
#define FUSEDCE_READ_(name) ta.name = std::move(tensors[i++]);
    FUSEDCE_TERM_TENSORS(FUSEDCE_READ_)
#undef FUSEDCE_READ_
    return ta;
  }

  // loss_backward: the statistics have no gradient, so their flags must not pull a plain CE
  // backward off its tuned kernels.
  void without_statistics() { want_mean_logit = want_log_sum_sq = false; }

  bool entropy_needed() const { return want_entropy || entropy_coef != 0.0; }
  bool policy() const { return advantages.has_value(); }
  // Anything beyond the plain CE (which has its own tuned kernels).
  bool any() const {
    return ce_weight != 1.0 || entropy_needed() || want_logprob || distill != 0 || policy() ||
           want_mean_logit || want_log_sum_sq;
  }

  // n rows, v classes (the student's), ref: the student's hidden (device, for messages).
  // with_teacher = false: the call takes no teacher tensor although distill may be on (the
  // vocab-parallel shard_finish, which sees only the per-row partials).
  void check(int64_t n, int64_t v, const at::Tensor& ref, bool with_teacher = true) const {
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
    }
    if (distill != 0 && with_teacher) {
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

// The op schema text of the term arguments (the tail of `loss` and `loss_backward`), the matching
// C++ parameters, and the TermArgs built from them: one definition for the CPU and CUDA drivers.
#define FUSEDCE_TENSOR_SCHEMA_(name) "Tensor? " #name "=None, "
#define FUSEDCE_TERM_ARGS \
  FUSEDCE_TERM_TENSORS(FUSEDCE_TENSOR_SCHEMA_) "float[] term_floats=[], int[] term_ints=[]"

#define FUSEDCE_TENSOR_PARAM_(name) const std::optional<at::Tensor>&name,
#define FUSEDCE_TERM_PARAMS                           \
  FUSEDCE_TERM_TENSORS(FUSEDCE_TENSOR_PARAM_)         \
  c10::ArrayRef<double> term_floats, c10::ArrayRef<int64_t> term_ints

#define FUSEDCE_TENSOR_NAME_(name) name,
#define FUSEDCE_TERM_ARGS_STRUCT          \
  ::fusedce::TermArgs::unpack(term_floats, term_ints, \
                              {FUSEDCE_TERM_TENSORS(FUSEDCE_TENSOR_NAME_)})
