// The extension module and the ONE schema block of the library.
//
// Every op of fusedce is declared here, with its defaults, so that the schema is the single source
// of truth for the CPU and CUDA backends (which only add TORCH_LIBRARY_IMPL blocks), for the fake
// kernels and autograd formulas in fusedce/ops.py, and for the C++-only CMake build.
//
// Semantics shared by every op (fusedce/reference.py is the executable definition):
//   raw logits  a = hidden @ weight.T (+ bias)                       [N, V]
//   z           = logit_scale * a, then softcap * tanh(z / softcap) when softcap > 0
//   lse         = logsumexp(z);  p = softmax(z)
//   per-token   = w[t] * ((1 - eps) * (lse - z[t]) + z_loss * lse^2) + eps / V * sum_c w[c] * (lse - z[c])
//                 (w = class weights or 1; 0 at rows whose target is ignore_index)
//   a target outside [0, V) that is not ignore_index: an error on the CPU and in validation mode
//                 (csrc/validate.h); otherwise on CUDA a NaN token loss and gradient (no host sync)
//   predicted   = argmax(z) (first maximum), -1 at ignored rows
//
// The ops return per-token values and (for the training case) the gradients; reductions and
// named outputs live in Python (fusedce/functional.py).

#include <torch/library.h>
#include <torch/version.h>

#ifndef FUSEDCE_NO_PYTHON
#include <pybind11/pybind11.h>
#endif

#include <string>

#include "shard_layout.h"
#include "terms_args.h"
#include "validate.h"

#ifdef FUSEDCE_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

TORCH_LIBRARY(fusedce, m) {
  // Fused linear head loss. `loss` is sum_i grad_scale * token_loss[i] (grad_scale defaults to 1):
  // the caller passes 1/denominator for a mean, so that gradients computed in this same pass
  // (grad_mask = which of hidden, weight, bias) are already those of the final scalar and the
  // backward only multiplies them by the upstream gradient. Gradients not requested come back as
  // empty tensors. chunk_size / vocab_chunk_size = 0 picks them from the memory budget;
  // vocab_chunk_size > 0 tiles the vocabulary (low-memory mode, logits recomputed per tile).
  // Terms beyond the CE, shared by `loss` and `loss_backward` (fusedce/reference.py defines each):
  //   ce_weight        weight of the CE + label-smoothing part (the z-loss is separate)
  //   want_entropy     output the entropy H of softmax(z) per token (empty otherwise)
  //   want_logprob     output log softmax(z)[target] per token, 0 at ignored rows (empty otherwise)
  //   entropy_coef     token_loss += entropy_coef * H (negative: an entropy bonus)
  //   teacher_*        distillation teacher: logits [N, V], or hidden [N, Ht] + weight [V, Ht]
  //                    (+ bias [V]) whose logits chunk is computed beside the student's
  //   distill          0 off, 1 forward KL(r||q), 2 reverse KL(q||r), 3 generalized JSD(beta)
  //                    with q = softmax(z / T), r = softmax(teacher / T), T = distill_temperature;
  //                    token_loss += distill_weight * divergence
  //   advantages       policy gradient on (TRL GRPO): token_loss += -min(ratio A, clip(ratio) A)
  //                    + kl_beta * k3(ref_logprobs), ratio = exp(logprob - old_logprobs)
  //   policy_kind      the policy part: 0 the clipped form above, 1 CISPO
  //                    -min(ratio, epsilon_high) A logprob (the ratio a constant), 2 SAPO
  //                    -4/tau sigmoid(tau (ratio - 1)) A, tau = sapo_temperature_pos (A > 0) or _neg
  //   policy_delta     > 0: the clipped form's unclipped ratio is min(ratio, policy_delta)
  //   policy_weights   [N] multiplies the policy part only (a vLLM importance-sampling ratio)
  //   kl_bias_correction  the KL term is k3 * ratio (ratio differentiable; TRL's default)
  //   entropy_weights  [N] the entropy term is entropy_coef * entropy_weights[i] * H
  //   policy_kind      the policy part: 0 the clipped form above, 1 CISPO
  //                    -min(ratio, epsilon_high) A logprob (the ratio a constant), 2 SAPO
  //                    -4/tau sigmoid(tau (ratio - 1)) A, tau = sapo_temperature_pos (A > 0) or _neg
  //   policy_delta     > 0: the clipped form's unclipped ratio is min(ratio, policy_delta)
  //   policy_weights   [N] multiplies the policy part only (a vLLM importance-sampling ratio)
  //   kl_bias_correction  the KL term is k3 * ratio (ratio differentiable; TRL's default)
  //   entropy_weights  [N] the entropy term is entropy_coef * entropy_weights[i] * H
  // Every term is 0 at ignored rows (target == ignore_index); the outputs lse and entropy are
  // defined (and differentiable) at every row.
  // These arguments are FUSEDCE_TERM_ARGS (csrc/terms_args.h): the seven optional tensors by name,
  // the scalars packed in `term_floats` / `term_ints` in the layout defined there (empty lists:
  // every default). Python builds them with fusedce._op_args.TermOptions(...).pack().

  // Fused linear head loss. `loss` is sum_i grad_scale[i] * token_loss[i] (grad_scale: one value
  // or one per token, default 1): the caller passes per-token weights or 1/num_items, so that
  // gradients computed in this same pass (grad_mask = which of hidden, weight, bias) are already
  // those of the final scalar and the backward only multiplies them by the upstream gradient.
  // mean=True (grad_scale must be None) is F.cross_entropy's mean, computed on the device in the
  // op itself: d = sum of class_weight[target] over the tokens whose target != ignore_index (1 per
  // token without class weights, 0 for a target outside [0, V)), loss = sum_i token_loss[i] / d
  // (nan or +-inf when d == 0, as F.cross_entropy), gradients scaled by 1/d (0 when d == 0).
  // Gradients not requested come back as empty tensors. chunk_size / vocab_chunk_size = 0 picks
  // them from the memory budget; vocab_chunk_size > 0 tiles the vocabulary (low-memory mode,
  // logits recomputed per tile).
  // Per-token statistics of softmax(z) from the same pass, defined at every row, not
  // differentiable (metrics: TRL's mean_logits and log_sum_sq_probs), empty when not requested:
  //   want_mean_logit  mean_logit      = sum_c z_c / V             (in term_ints)
  //   want_log_sum_sq  log_sum_sq_prob = log sum_c p_c^2           (in term_ints)
  m.def(
      "loss(Tensor hidden, Tensor weight, Tensor target, Tensor? bias=None, "
      "Tensor? class_weight=None, Tensor? grad_scale=None, int ignore_index=-100, "
      "float label_smoothing=0.0, float z_loss=0.0, float softcap=0.0, float logit_scale=1.0, "
      "bool[3] grad_mask=[False, False, False], int chunk_size=0, int vocab_chunk_size=0, "
      "bool fp32_grad_accum=False, bool mean=False, " FUSEDCE_TERM_ARGS ") "
      "-> (Tensor loss, Tensor token_loss, Tensor lse, Tensor predicted, Tensor entropy, "
      "Tensor logprob, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias, "
      "Tensor mean_logit, Tensor log_sum_sq_prob)");

  // Exact backward of `loss` for any per-token upstream gradient (reduction='none', or gradients
  // flowing into lse, entropy or logprob): recomputes the logits chunk by chunk (from the saved
  // lse when only the CE terms are on). grad_* are [N] in the dtype of token_loss.
  m.def(
      "loss_backward(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, "
      "Tensor? class_weight, Tensor lse, Tensor grad_token_loss, Tensor? grad_lse=None, "
      "Tensor? grad_entropy=None, Tensor? grad_logprob=None, "
      "int ignore_index=-100, float label_smoothing=0.0, float z_loss=0.0, float softcap=0.0, "
      "float logit_scale=1.0, bool[3] grad_mask=[True, True, True], int chunk_size=0, "
      "int vocab_chunk_size=0, bool fp32_grad_accum=False, " FUSEDCE_TERM_ARGS ") "
      "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");

  // The same terms on given logits [N, V]: one online-softmax pass per row. inplace_backward is
  // not used by the forward kernels: it tells the autograd formula (fusedce/ops.py) to run
  // cross_entropy_backward_ and overwrite the logits with their gradient.
  // mean=True also gives F.cross_entropy's mean as the 0-d `loss` (sum of token_loss / d, d = the
  // sum of the class weights of the non-ignored targets, 1 each without class weights; nan or
  // +-inf when d == 0) and grad_scale = 1 / d (0 when d == 0), the factor the backward applies to
  // loss's upstream gradient: one launch instead of the caller's ~7 small ops. Both are empty
  // ([0]) when mean=False.
  m.def(
      "cross_entropy(Tensor logits, Tensor target, Tensor? class_weight=None, "
      "int ignore_index=-100, float label_smoothing=0.0, float z_loss=0.0, float softcap=0.0, "
      "float logit_scale=1.0, bool inplace_backward=False, bool mean=False) "
      "-> (Tensor token_loss, Tensor lse, Tensor predicted, Tensor loss, Tensor grad_scale)");

  // Backward of cross_entropy from the saved lse: reads each logit once, writes its gradient once.
  m.def(
      "cross_entropy_backward(Tensor logits, Tensor target, Tensor? class_weight, Tensor lse, "
      "Tensor grad_token_loss, Tensor? grad_lse=None, int ignore_index=-100, "
      "float label_smoothing=0.0, float z_loss=0.0, float softcap=0.0, float logit_scale=1.0) "
      "-> Tensor");

  // In-place variant: overwrites the logits with their gradient (inplace_backward=True), so the
  // backward allocates nothing of size [N, V].
  m.def(
      "cross_entropy_backward_(Tensor(a!) logits, Tensor target, Tensor? class_weight, Tensor lse, "
      "Tensor grad_token_loss, Tensor? grad_lse=None, int ignore_index=-100, "
      "float label_smoothing=0.0, float z_loss=0.0, float softcap=0.0, float logit_scale=1.0) "
      "-> ()");

  // Vocab-parallel building blocks (fusedce/_parallel.py): the row math on this rank's shard of
  // the logits [N, V_local], columns [vocab_start, vocab_start + V_local) of the vocabulary;
  // target holds global ids (ignore_index or any id outside the shard owns nothing here).
  // shard_stats -> [N, 6] in the accumulation dtype, per row over the shard's final logits z:
  //   max z, sum exp(z - max), sum_c w_c z_c, z at the target and w at the target (0 unless this
  //   shard owns it), the first argmax as a global id.
  m.def(
      "shard_stats(Tensor logits, Tensor target, int vocab_start, Tensor? class_weight=None, "
      "int ignore_index=-100, float softcap=0.0, float logit_scale=1.0) -> Tensor");
  // logits <- d/d(raw logits) in place, from the gathered statistics: per row i and local class j
  //   (coef_p[i] exp(z_ij - lse[i]) - coef_w[i] w_j - [j is target i, not ignored] coef_t[i]) * dz/da
  m.def(
      "shard_grad_(Tensor(a!) logits, Tensor target, int vocab_start, Tensor? class_weight, "
      "Tensor lse, Tensor coef_p, Tensor coef_t, Tensor? coef_w=None, int ignore_index=-100, "
      "float softcap=0.0, float logit_scale=1.0) -> ()");

  // The same building blocks for every term beyond the plain CE (entropy, log-probs, statistics,
  // distillation, the token-level policy objective): the row math of csrc/cpu/terms.h and
  // kernels/terms_kernels.cu split at the per-row scalars, columns as csrc/shard_layout.h. Per
  // chunk: shard_partials on each rank, one all-gather of the partials into [world, N, kParts],
  // shard_finish (merge + the per-row values and gradient coefficients, the same on every rank),
  // shard_backward_ on each rank's logits. The JSD needs one more reduction: shard_finish without
  // `jsd` gives lse_u / lse_y, shard_jsd the rank's part of (jsd, jsd_s), summed over the ranks and
  // handed to a second shard_finish. term_floats / term_ints as in `loss` (csrc/terms_args.h);
  // teacher_logits: the teacher's raw logits on the same shard [N, V_local].
  m.def(
      "shard_partials(Tensor logits, Tensor target, int vocab_start, Tensor? class_weight=None, "
      "Tensor? teacher_logits=None, int ignore_index=-100, float softcap=0.0, "
      "float logit_scale=1.0, float[] term_floats=[], int[] term_ints=[]) -> Tensor");
  m.def(
      "shard_jsd(Tensor logits, Tensor teacher_logits, Tensor coefs, float softcap=0.0, "
      "float logit_scale=1.0, float[] term_floats=[], int[] term_ints=[]) -> Tensor");
  // partials: [world, N, kParts] (or [N, kParts] for one rank); jsd: [N, 2] summed over the
  // ranks (JSD only); g_*: the upstream gradients of token_loss, lse, entropy and logprob ([N] each,
  // None: 0). Returns (rows [N, kRows], coefs [N, kCoefs]) in the partials' dtype.
  m.def(
      "shard_finish(Tensor partials, Tensor target, Tensor? jsd=None, Tensor? g_token_loss=None, "
      "Tensor? g_lse=None, Tensor? g_entropy=None, Tensor? g_logprob=None, "
      "int ignore_index=-100, float label_smoothing=0.0, float z_loss=0.0, "
      "Tensor? old_logprobs=None, Tensor? advantages=None, Tensor? ref_logprobs=None, "
      "Tensor? policy_weights=None, Tensor? entropy_weights=None, float[] term_floats=[], "
      "int[] term_ints=[]) -> (Tensor rows, Tensor coefs)");
  m.def(
      "shard_backward_(Tensor(a!) logits, Tensor target, int vocab_start, Tensor coefs, "
      "Tensor? class_weight=None, Tensor? teacher_logits=None, int ignore_index=-100, "
      "float softcap=0.0, float logit_scale=1.0, float[] term_floats=[], int[] term_ints=[]) -> ()");

  // self *= scale (a one-element tensor on self's device), in place. The backward of `loss` uses it
  // to apply the upstream gradient to the gradients computed in the forward; when scale == 1
  // (plain loss.backward()) the kernel exits without touching self, with no host synchronization.
  m.def("scale_(Tensor(a!) self, Tensor scale) -> ()");
}

#ifndef FUSEDCE_NO_PYTHON
// The CMake build (a plain library for torch.ops.load_library) defines FUSEDCE_NO_PYTHON.
namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["torch_version"] = std::string(TORCH_VERSION);
#ifdef FUSEDCE_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                         std::to_string((CUDART_VERSION % 1000) / 10);
#ifdef FUSEDCE_CUDA_ARCHS
  info["cuda_archs"] = std::string(FUSEDCE_CUDA_ARCHS);
#else
  info["cuda_archs"] = std::string("");
#endif
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = std::string("");
#endif
  return info;
}

// The layout of term_floats / term_ints and the names of the term tensors (csrc/terms_args.h), for
// fusedce/_op_args.py to compare with its own table at import: (name, C++ type, default) each.
py::dict term_layout() {
  py::list floats, ints, tensors;
#define FUSEDCE_ENTRY_(type, name, default_value) \
  floats.append(py::make_tuple(#name, #type, static_cast<double>(default_value)));
  FUSEDCE_TERM_FLOATS(FUSEDCE_ENTRY_)
#undef FUSEDCE_ENTRY_
#define FUSEDCE_ENTRY_(type, name, default_value) \
  ints.append(py::make_tuple(#name, #type, static_cast<int64_t>(default_value)));
  FUSEDCE_TERM_INTS(FUSEDCE_ENTRY_)
#undef FUSEDCE_ENTRY_
#define FUSEDCE_ENTRY_(name) tensors.append(#name);
  FUSEDCE_TERM_TENSORS(FUSEDCE_ENTRY_)
#undef FUSEDCE_ENTRY_
  py::dict layout;
  layout["term_floats"] = floats;
  layout["term_ints"] = ints;
  layout["tensors"] = tensors;
  return layout;
}

// The column indices of the vocab-parallel term ops' packed tensors (csrc/shard_layout.h).
py::dict shard_layout() {
  namespace sh = fusedce::shard;
  py::dict parts, rows, coefs;
#define FUSEDCE_COL_(dict, name) dict[#name] = static_cast<int>(sh::name);
  FUSEDCE_COL_(parts, kM) FUSEDCE_COL_(parts, kS) FUSEDCE_COL_(parts, kHz) FUSEDCE_COL_(parts, kWz)
  FUSEDCE_COL_(parts, kZt) FUSEDCE_COL_(parts, kWt) FUSEDCE_COL_(parts, kArgmax)
  FUSEDCE_COL_(parts, kSu) FUSEDCE_COL_(parts, kHuU) FUSEDCE_COL_(parts, kHuY)
  FUSEDCE_COL_(parts, kMy) FUSEDCE_COL_(parts, kSy) FUSEDCE_COL_(parts, kHyY)
  FUSEDCE_COL_(parts, kHyU) FUSEDCE_COL_(parts, kSz) FUSEDCE_COL_(parts, kS2)
  FUSEDCE_COL_(parts, kWsum) FUSEDCE_COL_(parts, kV) FUSEDCE_COL_(parts, kParts)
  FUSEDCE_COL_(rows, kTokenLoss) FUSEDCE_COL_(rows, kLse) FUSEDCE_COL_(rows, kEntropy)
  FUSEDCE_COL_(rows, kLogprob) FUSEDCE_COL_(rows, kPredicted) FUSEDCE_COL_(rows, kMeanLogit)
  FUSEDCE_COL_(rows, kLogSumSq) FUSEDCE_COL_(rows, kWeightAtTarget) FUSEDCE_COL_(rows, kRows)
  FUSEDCE_COL_(coefs, kCoefP) FUSEDCE_COL_(coefs, kCoefT) FUSEDCE_COL_(coefs, kCoefW)
  FUSEDCE_COL_(coefs, kCoefE) FUSEDCE_COL_(coefs, kLam) FUSEDCE_COL_(coefs, kCoefLse)
  FUSEDCE_COL_(coefs, kLseU) FUSEDCE_COL_(coefs, kLseY) FUSEDCE_COL_(coefs, kDiv)
  FUSEDCE_COL_(coefs, kJsdS) FUSEDCE_COL_(coefs, kCoefs)
#undef FUSEDCE_COL_
  py::dict layout;
  layout["parts"] = parts;
  layout["rows"] = rows;
  layout["coefs"] = coefs;
  return layout;
}

}  // namespace

// A bare extension module: the ops come from the static TORCH_LIBRARY registration above when the
// shared object is loaded; the module itself only reports how it was built.
PYBIND11_MODULE(_C, mod) {
  mod.doc() = "fusedce build information; the ops live in torch.ops.fusedce";
  mod.def("build_info", &build_info, "How this fusedce._C was built (CPU/CUDA, versions, archs).");
  mod.def("term_layout", &term_layout,
          "The layout of the packed term arguments of fusedce::loss (csrc/terms_args.h).");
  mod.def("shard_layout", &shard_layout,
          "The column indices of the vocab-parallel term ops' packed tensors (csrc/shard_layout.h).");
  mod.def(
      "_validate_targets",
      [](int delta) { return fusedce::validate_depth().fetch_add(delta) + delta; },
      "Open (+1) or close (-1) a fusedce.validate_targets() block; returns the open blocks.");
  mod.def("_validation_enabled", &fusedce::validation_enabled,
          "Whether the CUDA ops check the targets on the host (a block open or FUSEDCE_VALIDATE).");
}
#endif  // FUSEDCE_NO_PYTHON
