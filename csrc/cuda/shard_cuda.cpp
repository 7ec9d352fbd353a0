// CUDA implementation of the vocab-parallel building blocks: shard_stats / shard_grad_ (the plain
// CE, kernels/shard_kernels.cu) and the term ops shard_partials / shard_jsd / shard_finish /
// shard_backward_ (kernels/shard_terms.cu, the row math of the fused loss's terms kernel), on one
// shard of the logits. csrc/cpu/ holds the CPU twins; csrc/shard_layout.h the packed columns.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../shard_layout.h"
#include "../terms_args.h"
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

// ---- the term ops ---------------------------------------------------------------------------------
// term_floats / term_ints as `loss` takes them; the term tensors of these ops are their own
// arguments, so none is unpacked here.
TermArgs shard_term_args(c10::ArrayRef<double> term_floats, c10::ArrayRef<int64_t> term_ints) {
  TermArgs ta = TermArgs::unpack(term_floats, term_ints, {});
  TORCH_CHECK(std::isfinite(ta.ce_weight), "fusedce: ce_weight must be finite, got ", ta.ce_weight);
  TORCH_CHECK(std::isfinite(ta.entropy_coef), "fusedce: entropy_coef must be finite, got ",
              ta.entropy_coef);
  TORCH_CHECK(ta.distill >= 0 && ta.distill <= 3,
              "fusedce: distill must be 0 (off), 1 (forward KL), 2 (reverse KL) or 3 (JSD), got ",
              ta.distill);
  if (ta.distill != 0) {
    TORCH_CHECK(std::isfinite(ta.distill_weight), "fusedce: distill_weight must be finite, got ",
                ta.distill_weight);
    TORCH_CHECK(std::isfinite(ta.distill_temperature) && ta.distill_temperature > 0,
                "fusedce: distill_temperature must be finite and > 0, got ",
                ta.distill_temperature);
    TORCH_CHECK(ta.distill != 3 || (ta.distill_beta > 0 && ta.distill_beta < 1),
                "fusedce: distill_beta must be in (0, 1) for the JSD, got ", ta.distill_beta);
  }
  return ta;
}

// The teacher's raw logits on the shard, in the logits' dtype (as the fused loss hands them to
// the terms kernel): required exactly when distill != 0.
Tensor shard_teacher(const std::optional<Tensor>& teacher_logits, const Tensor& logits,
                     const TermArgs& ta) {
  if (ta.distill == 0) {
    TORCH_CHECK(!teacher_logits.has_value(), "fusedce: teacher_logits was given but distill = 0");
    return Tensor();
  }
  TORCH_CHECK(teacher_logits.has_value(), "fusedce: distill = ", ta.distill,
              " needs teacher_logits (the teacher's raw logits on this shard)");
  const Tensor& t = *teacher_logits;
  check_float_tensor(t, "teacher_logits");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == logits.size(0) && t.size(1) == logits.size(1),
              "fusedce: teacher_logits must have the shape of logits ", logits.sizes(), ", got ",
              t.sizes());
  check_same_device(t, logits, "teacher_logits", "logits");
  return t.to(logits.scalar_type()).contiguous();
}

// coefs [N, kCoefs] of shard_finish, in the accumulation dtype of `logits`.
Tensor shard_coefs(const Tensor& coefs, const Tensor& logits) {
  check_float_tensor(coefs, "coefs");
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(0) == logits.size(0) &&
                  coefs.size(1) == shard::kCoefs,
              "fusedce: coefs must have shape [", logits.size(0), ", ", int(shard::kCoefs),
              "] (shard_finish's coefs), got ", coefs.sizes());
  check_same_device(coefs, logits, "coefs", "logits");
  return coefs.to(acc_type_of(logits.scalar_type())).contiguous();
}

gpu::ShardTermsArgs shard_terms_args(const Tensor& lg, const Tensor& tgt, int64_t vocab_start,
                                     const Tensor& cw, const Tensor& teacher, int64_t ignore_index,
                                     double softcap, double logit_scale) {
  gpu::ShardTermsArgs a;
  a.logits = lg.data_ptr();
  a.ld = lg.size(1);
  a.rows = lg.size(0);
  a.cols = lg.size(1);
  if (teacher.defined()) {
    a.teacher = teacher.data_ptr();
    a.ld_teacher = teacher.size(1);
  }
  a.target = tgt.defined() ? tgt.data_ptr<int64_t>() : nullptr;
  a.vocab_start = vocab_start;
  a.ignore_index = ignore_index;
  a.class_weight = cw.defined() ? cw.data_ptr() : nullptr;
  a.softcap = softcap;
  a.logit_scale = logit_scale;
  return a;
}

void check_columns(const Tensor& logits) {
  TORCH_CHECK(logits.size(1) <= INT32_MAX, "fusedce: logits may have at most 2^31 - 1 columns, got ",
              logits.size(1));
}

// The arguments shard_partials and shard_backward_ share (the term kernels index columns as int).
void check_term_shard(const Tensor& logits, const Tensor& target, int64_t vocab_start,
                      const std::optional<Tensor>& class_weight, double softcap, double logit_scale) {
  check_shard_args(logits, target, vocab_start, class_weight);
  check_scalars(0.0, 0.0, softcap, logit_scale);
  check_columns(logits);
}

Tensor shard_partials_cuda(const Tensor& logits, const Tensor& target, int64_t vocab_start,
                           const std::optional<Tensor>& class_weight,
                           const std::optional<Tensor>& teacher_logits, int64_t ignore_index,
                           double softcap, double logit_scale, c10::ArrayRef<double> term_floats,
                           c10::ArrayRef<int64_t> term_ints) {
  c10::cuda::CUDAGuard guard(logits.device());
  check_term_shard(logits, target, vocab_start, class_weight, softcap, logit_scale);
  const TermArgs ta = shard_term_args(term_floats, term_ints);
  const Tensor lg = logits.contiguous();
  const Tensor tb = shard_teacher(teacher_logits, lg, ta);
  const Tensor tgt = target.to(at::kLong).contiguous();
  const auto acc = acc_type_of(lg.scalar_type());
  const Tensor cw = class_weight.has_value() ? class_weight->to(acc).contiguous() : Tensor();
  const Tensor cw_sum = cw.defined() ? cw.sum() : Tensor();  // stays on the device
  Tensor out = at::empty({lg.size(0), shard::kParts}, lg.options().dtype(acc));
  gpu::ShardTermsArgs a =
      shard_terms_args(lg, tgt, vocab_start, cw, tb, ignore_index, softcap, logit_scale);
  a.class_weight_sum = cw_sum.defined() ? cw_sum.data_ptr() : nullptr;
  a.moments = ta.want_mean_logit || ta.want_log_sum_sq;
  a.partials = out.data_ptr();
  check_launch(gpu::launch_shard_partials(kdtype(lg.scalar_type()), a, terms_params(ta),
                                          c10::cuda::getCurrentCUDAStream().stream()),
               "shard_partials");
  return out;
}

Tensor shard_jsd_cuda(const Tensor& logits, const Tensor& teacher_logits, const Tensor& coefs,
                      double softcap, double logit_scale, c10::ArrayRef<double> term_floats,
                      c10::ArrayRef<int64_t> term_ints) {
  c10::cuda::CUDAGuard guard(logits.device());
  check_float_tensor(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "fusedce: logits must be 2-D [N, V_local], got ", logits.sizes());
  check_scalars(0.0, 0.0, softcap, logit_scale);
  check_columns(logits);
  const TermArgs ta = shard_term_args(term_floats, term_ints);
  TORCH_CHECK(ta.distill == 3, "fusedce: shard_jsd is the JSD's pass: term_ints must say distill = 3, "
              "got distill = ", ta.distill);
  const Tensor lg = logits.contiguous();
  const Tensor tb = shard_teacher(teacher_logits, lg, ta);
  const Tensor cf = shard_coefs(coefs, lg);
  const auto acc = acc_type_of(lg.scalar_type());
  Tensor out = at::empty({lg.size(0), 2}, lg.options().dtype(acc));
  gpu::ShardTermsArgs a = shard_terms_args(lg, Tensor(), 0, Tensor(), tb, -100, softcap,
                                           logit_scale);
  a.coefs = cf.data_ptr();
  a.jsd = out.data_ptr();
  check_launch(gpu::launch_shard_jsd(kdtype(lg.scalar_type()), a, terms_params(ta),
                                     c10::cuda::getCurrentCUDAStream().stream()),
               "shard_jsd");
  return out;
}

// A per-row input of shard_finish ([N] float, or None), in the partials' dtype.
Tensor finish_row_input(const std::optional<Tensor>& t, int64_t n, const Tensor& ref,
                        const char* name) {
  check_per_token(t, n, ref, name);
  return t.has_value() ? t->to(ref.scalar_type()).contiguous() : Tensor();
}

const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

std::tuple<Tensor, Tensor> shard_finish_cuda(
    const Tensor& partials, const Tensor& target, const std::optional<Tensor>& jsd,
    const std::optional<Tensor>& g_token_loss, const std::optional<Tensor>& g_lse,
    const std::optional<Tensor>& g_entropy, const std::optional<Tensor>& g_logprob,
    int64_t ignore_index, double label_smoothing, double z_loss,
    const std::optional<Tensor>& old_logprobs, const std::optional<Tensor>& advantages,
    const std::optional<Tensor>& ref_logprobs, const std::optional<Tensor>& policy_weights,
    const std::optional<Tensor>& entropy_weights, c10::ArrayRef<double> term_floats,
    c10::ArrayRef<int64_t> term_ints) {
  c10::cuda::CUDAGuard guard(partials.device());
  TORCH_CHECK(partials.scalar_type() == at::kFloat || partials.scalar_type() == at::kDouble,
              "fusedce: partials must be float32 or float64 (shard_partials' accumulation dtype), "
              "got ", partials.scalar_type());
  TORCH_CHECK((partials.dim() == 2 || partials.dim() == 3) &&
                  partials.size(-1) == shard::kParts,
              "fusedce: partials must have shape [world, N, ", int(shard::kParts), "] or [N, ",
              int(shard::kParts), "], got ", partials.sizes());
  const int64_t world = partials.dim() == 3 ? partials.size(0) : 1;
  TORCH_CHECK(world >= 1, "fusedce: partials must hold at least one rank, got ", partials.sizes());
  const int64_t n = partials.size(-2);
  check_target(target, n, partials);
  check_scalars(label_smoothing, z_loss, 0.0, 1.0);
  const TermArgs ta = shard_term_args(term_floats, term_ints);
  const Tensor P = partials.contiguous();
  const Tensor tgt = target.to(at::kLong).contiguous();
  Tensor J;
  if (jsd.has_value()) {
    // the CPU twin's rule: a jsd without the JSD would be silently ignored, so it is refused
    TORCH_CHECK(ta.distill == 3, "fusedce: jsd is the JSD's second reduction (distill = 3), but distill = ",
                ta.distill);
    check_float_tensor(*jsd, "jsd");
    TORCH_CHECK(jsd->dim() == 2 && jsd->size(0) == n && jsd->size(1) == 2,
                "fusedce: jsd must have shape [", n, ", 2] (shard_jsd summed over the ranks), got ",
                jsd->sizes());
    check_same_device(*jsd, partials, "jsd", "partials");
    J = jsd->to(P.scalar_type()).contiguous();
  }
  const Tensor gt = finish_row_input(g_token_loss, n, P, "g_token_loss");
  const Tensor gl = finish_row_input(g_lse, n, P, "g_lse");
  const Tensor gh = finish_row_input(g_entropy, n, P, "g_entropy");
  const Tensor gp = finish_row_input(g_logprob, n, P, "g_logprob");
  const bool policy = advantages.has_value();
  if (policy) {
    TORCH_CHECK(std::isfinite(ta.epsilon_low) && ta.epsilon_low >= 0 && ta.epsilon_low <= 1,
                "fusedce: epsilon_low must be in [0, 1], got ", ta.epsilon_low);
    TORCH_CHECK(std::isfinite(ta.epsilon_high) && ta.epsilon_high >= 0,
                "fusedce: epsilon_high must be finite and >= 0, got ", ta.epsilon_high);
    TORCH_CHECK(std::isfinite(ta.kl_beta), "fusedce: kl_beta must be finite, got ", ta.kl_beta);
    TORCH_CHECK(ta.kl_beta == 0.0 || ref_logprobs.has_value(),
                "fusedce: kl_beta != 0 needs ref_logprobs");
    TORCH_CHECK(ta.policy_kind >= 0 && ta.policy_kind <= 2,
                "fusedce: policy_kind must be 0 (clipped), 1 (cispo) or 2 (sapo), got ",
                ta.policy_kind);
    TORCH_CHECK(std::isfinite(ta.policy_delta) && ta.policy_delta >= 0,
                "fusedce: policy_delta must be finite and >= 0 (0: off), got ", ta.policy_delta);
    TORCH_CHECK(std::isfinite(ta.sapo_temperature_pos) && ta.sapo_temperature_pos > 0,
                "fusedce: sapo_temperature_pos must be finite and > 0, got ",
                ta.sapo_temperature_pos);
    TORCH_CHECK(std::isfinite(ta.sapo_temperature_neg) && ta.sapo_temperature_neg > 0,
                "fusedce: sapo_temperature_neg must be finite and > 0, got ",
                ta.sapo_temperature_neg);
  } else {
    TORCH_CHECK(!old_logprobs.has_value() && !ref_logprobs.has_value() &&
                    !policy_weights.has_value(),
                "fusedce: old_logprobs/ref_logprobs/policy_weights are policy-loss inputs and "
                "need advantages");
  }
  const Tensor adv = finish_row_input(advantages, n, P, "advantages");
  const Tensor old = finish_row_input(old_logprobs, n, P, "old_logprobs");
  const Tensor ref = finish_row_input(ref_logprobs, n, P, "ref_logprobs");
  const Tensor pw = finish_row_input(policy_weights, n, P, "policy_weights");
  const Tensor ew = finish_row_input(entropy_weights, n, P, "entropy_weights");
  gpu::TermsParams tp = terms_params(ta);
  // As the fused loss: the KL's reference only with a KL weight, the entropy's weights only with
  // an entropy term (a 0 weight times an infinite k3 must not turn the loss into NaN).
  tp.advantages = ptr_or_null(adv);
  tp.old_logprobs = ptr_or_null(old);
  tp.ref_logprobs = ta.kl_beta != 0.0 ? ptr_or_null(ref) : nullptr;
  tp.policy_weights = ptr_or_null(pw);
  tp.entropy_weights = ta.entropy_coef != 0.0 ? ptr_or_null(ew) : nullptr;
  Tensor rows = at::empty({n, shard::kRows}, P.options());
  Tensor coefs = at::empty({n, shard::kCoefs}, P.options());
  gpu::ShardFinishArgs f;
  f.partials = P.data_ptr();
  f.world = world;
  f.rows = n;
  f.target = tgt.data_ptr<int64_t>();
  f.ignore_index = ignore_index;
  f.jsd = ptr_or_null(J);
  f.g_tok = ptr_or_null(gt);
  f.g_lse = ptr_or_null(gl);
  f.g_entropy = ptr_or_null(gh);
  f.g_logprob = ptr_or_null(gp);
  f.label_smoothing = label_smoothing;
  f.z_loss = z_loss;
  f.want_mean_logit = ta.want_mean_logit;
  f.want_log_sum_sq = ta.want_log_sum_sq;
  f.out_rows = rows.data_ptr();
  f.coefs = coefs.data_ptr();
  check_launch(gpu::launch_shard_finish(kdtype(P.scalar_type()), f, tp,
                                        c10::cuda::getCurrentCUDAStream().stream()),
               "shard_finish");
  return {rows, coefs};
}

void shard_backward_cuda(const Tensor& logits, const Tensor& target, int64_t vocab_start,
                         const Tensor& coefs, const std::optional<Tensor>& class_weight,
                         const std::optional<Tensor>& teacher_logits, int64_t ignore_index,
                         double softcap, double logit_scale, c10::ArrayRef<double> term_floats,
                         c10::ArrayRef<int64_t> term_ints) {
  c10::cuda::CUDAGuard guard(logits.device());
  check_term_shard(logits, target, vocab_start, class_weight, softcap, logit_scale);
  TORCH_CHECK(logits.is_contiguous(),
              "fusedce: shard_backward_ needs contiguous logits (it writes in place)");
  const TermArgs ta = shard_term_args(term_floats, term_ints);
  const Tensor tb = shard_teacher(teacher_logits, logits, ta);
  const Tensor cf = shard_coefs(coefs, logits);
  const auto acc = acc_type_of(logits.scalar_type());
  const Tensor tgt = target.to(at::kLong).contiguous();
  const Tensor cw = class_weight.has_value() ? class_weight->to(acc).contiguous() : Tensor();
  gpu::ShardTermsArgs a =
      shard_terms_args(logits, tgt, vocab_start, cw, tb, ignore_index, softcap, logit_scale);
  a.coefs = cf.data_ptr();
  check_launch(gpu::launch_shard_backward(kdtype(logits.scalar_type()), a, terms_params(ta),
                                          c10::cuda::getCurrentCUDAStream().stream()),
               "shard_backward_");
}
}  // namespace
}  // namespace cuda_impl
}  // namespace fusedce

TORCH_LIBRARY_IMPL(fusedce, CUDA, m) {
  m.impl("shard_stats", &fusedce::cuda_impl::shard_stats_cuda);
  m.impl("shard_grad_", &fusedce::cuda_impl::shard_grad_cuda);
  m.impl("shard_partials", &fusedce::cuda_impl::shard_partials_cuda);
  m.impl("shard_jsd", &fusedce::cuda_impl::shard_jsd_cuda);
  m.impl("shard_finish", &fusedce::cuda_impl::shard_finish_cuda);
  m.impl("shard_backward_", &fusedce::cuda_impl::shard_backward_cuda);
}
