// Argument checks shared by the backends. Every message names the op argument it is about, so a
// misuse reached through torch.ops directly is as clear as one caught in fusedce/functional.py.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <optional>

namespace fusedce {

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) && t.scalar_type() != at::kFloat8_e4m3fn &&
                  t.scalar_type() != at::kFloat8_e5m2,
              "fusedce: ", name, " must be float16, bfloat16, float32 or float64, got ",
              t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "fusedce: ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
}

inline void check_scalars(double label_smoothing, double z_loss, double softcap,
                          double logit_scale) {
  TORCH_CHECK(std::isfinite(label_smoothing) && label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "fusedce: label_smoothing must be a finite number in [0, 1], got ", label_smoothing);
  TORCH_CHECK(std::isfinite(z_loss), "fusedce: z_loss must be finite, got ", z_loss);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0,
              "fusedce: softcap must be finite and > 0 (0 means off at the op level), got ",
              softcap);
  TORCH_CHECK(std::isfinite(logit_scale), "fusedce: logit_scale must be finite, got ",
              logit_scale);
}

// `loss`'s mean=True computes its own gradient scale: a grad_scale beside it would be ambiguous.
inline void check_mean_args(bool mean, const std::optional<at::Tensor>& grad_scale) {
  TORCH_CHECK(!mean || !grad_scale.has_value(),
              "fusedce: loss takes either mean=True or a grad_scale, not both (mean=True computes "
              "the mean's scale 1/sum(weights of the non-ignored tokens) itself)");
}

inline void check_target(const at::Tensor& target, int64_t rows, const at::Tensor& ref) {
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
              "fusedce: target must be int64 or int32 class indices, got ", target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == rows, "fusedce: target must have shape [",
              rows, "], got ", target.sizes());
  check_same_device(target, ref, "target", "hidden/logits");
}

inline void check_class_weight(const std::optional<at::Tensor>& class_weight, int64_t vocab,
                               const at::Tensor& ref) {
  if (!class_weight.has_value()) return;
  const at::Tensor& w = *class_weight;
  check_float_tensor(w, "class_weight");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == vocab, "fusedce: class_weight must have shape [",
              vocab, "], got ", w.sizes());
  check_same_device(w, ref, "class_weight", "hidden/logits");
}

inline void check_per_token(const std::optional<at::Tensor>& t, int64_t rows, const at::Tensor& ref,
                            const char* name) {
  if (!t.has_value()) return;
  check_float_tensor(*t, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == rows, "fusedce: ", name, " must have shape [", rows,
              "], got ", t->sizes());
  check_same_device(*t, ref, name, "hidden/logits");
}

// Checks of the fused linear ops: hidden [N, H], weight [V, H], bias [V].
inline void check_linear_args(const at::Tensor& hidden, const at::Tensor& weight,
                              const at::Tensor& target, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& class_weight) {
  check_float_tensor(hidden, "hidden");
  check_float_tensor(weight, "weight");
  TORCH_CHECK(hidden.dim() == 2, "fusedce: hidden must be 2-D [N, H], got ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, "fusedce: weight must be 2-D [V, H], got ", weight.sizes());
  TORCH_CHECK(hidden.size(1) == weight.size(1), "fusedce: hidden has hidden size ",
              hidden.size(1), " but weight has ", weight.size(1), " (weight must be [V, H])");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "fusedce: hidden is ",
              hidden.scalar_type(), " but weight is ", weight.scalar_type(),
              "; they must have the same dtype");
  TORCH_CHECK(weight.size(0) > 0, "fusedce: weight must have at least one class (V > 0)");
  check_same_device(weight, hidden, "weight", "hidden");
  check_target(target, hidden.size(0), hidden);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "fusedce: bias must have shape [", weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type(), "fusedce: bias is ",
                bias->scalar_type(), " but hidden is ", hidden.scalar_type());
    check_same_device(*bias, hidden, "bias", "hidden");
  }
  check_class_weight(class_weight, weight.size(0), hidden);
}

inline void check_logits_args(const at::Tensor& logits, const at::Tensor& target,
                              const std::optional<at::Tensor>& class_weight) {
  check_float_tensor(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "fusedce: logits must be 2-D [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) > 0, "fusedce: logits must have at least one class (V > 0)");
  check_target(target, logits.size(0), logits);
  check_class_weight(class_weight, logits.size(1), logits);
}

// The shard ops: logits [N, V_local] (unit stride along the vocabulary), target [N] global ids,
// class weights [V_local] (this shard's), vocab_start >= 0.
inline void check_shard_args(const at::Tensor& logits, const at::Tensor& target,
                             int64_t vocab_start, const std::optional<at::Tensor>& class_weight) {
  check_float_tensor(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "fusedce: logits must be 2-D [N, V_local], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) == 0 || logits.stride(1) == 1,
              "fusedce: logits must have unit stride along the vocabulary");
  TORCH_CHECK(vocab_start >= 0, "fusedce: vocab_start must be >= 0, got ", vocab_start);
  check_target(target, logits.size(0), logits);
  check_class_weight(class_weight, logits.size(1), logits);
}

// The accumulation dtype of the softmax math: float32 for half types, else the input's.
inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace fusedce
