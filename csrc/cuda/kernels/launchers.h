// Host-facing launchers of the row kernels (raw pointers + cudaStream_t). Plain C++: the host driver
// (csrc/cuda/*.cpp) includes this; the kernels live in row_kernels.cu.
//
// Every floating-point per-row array (token_loss, lse, state, grad_scale, grad_token_loss, grad_lse,
// class_weight) is in the accumulation dtype: float for bf16 / fp16 / fp32 inputs, double for
// float64 inputs. Targets are int64. Pointers are already offset to the first row of the call.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fusedce {
namespace gpu {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

struct EpiParams {
  double logit_scale = 1.0;
  double softcap = 0.0;  // 0 = off
  double label_smoothing = 0.0;
  double z_loss = 0.0;
  const void* class_weight = nullptr;      // [V] acc dtype, or nullptr (all 1)
  const void* class_weight_sum = nullptr;  // device scalar acc dtype, or nullptr (= V)
  int64_t V = 0;                           // full vocabulary size
  int64_t ignore_index = -100;
};

// Running per-row statistics across vocabulary tiles (acc dtype, [rows] each; idx int64).
struct RowState {
  void* m = nullptr;
  void* s = nullptr;
  void* wz = nullptr;
  void* zt = nullptr;
  int64_t* idx = nullptr;
};

// One online-softmax pass over a tile of a logits chunk: raw logits a [rows, cols] (leading dim ld)
// hold vocabulary columns [col0, col0 + cols). Statistics are merged into `state` unless the tile is
// the whole row (first_tile && last_tile). On the last tile each row is finalized into token_loss,
// lse (acc dtype) and predicted (int64, -1 at ignored rows). With fused_grad (whole-row tiles only)
// the logits are then overwritten in place by d(grad_scale * token_loss)/d(a).
struct StatsArgs {
  void* logits = nullptr;
  int64_t ld = 0;
  int64_t rows = 0;
  int64_t col0 = 0;
  int64_t cols = 0;
  const int64_t* target = nullptr;
  RowState state;
  bool first_tile = true;
  bool last_tile = true;
  void* token_loss = nullptr;
  void* lse = nullptr;
  int64_t* predicted = nullptr;
  bool fused_grad = false;
  const void* grad_scale = nullptr;  // acc dtype; element i at grad_scale[i * stride]; nullptr = 1
  int64_t grad_scale_stride = 0;
  int grid_limit = 0;  // max blocks of the (persistent) grid; 0 = one block (or warp) per row
};

// Gradient of a tile from the saved lse: out[i, j] = d(gs_i * token_loss_i + gl_i * lse_i)/d(a_ij),
// reading each logit once and writing its gradient once. `out` may equal `in` (in place).
struct GradArgs {
  const void* in = nullptr;
  int64_t ld_in = 0;
  void* out = nullptr;
  int64_t ld_out = 0;
  int64_t rows = 0;
  int64_t col0 = 0;
  int64_t cols = 0;
  const int64_t* target = nullptr;
  const void* lse = nullptr;
  const void* grad_tok = nullptr;  // nullptr = 1
  int64_t grad_tok_stride = 0;
  const void* grad_lse = nullptr;  // nullptr = 0
  int64_t grad_lse_stride = 0;
};

cudaError_t launch_row_stats(DType dtype, const StatsArgs& args, const EpiParams& epi,
                             cudaStream_t stream);
cudaError_t launch_row_grad(DType dtype, const GradArgs& args, const EpiParams& epi,
                            cudaStream_t stream);

// The terms beyond the CE (entropy, log-prob, distillation, policy gradient; csrc/cpu/terms.h is
// the CPU twin, fusedce.cpp's comments on the term arguments the definitions), on whole rows: one
// block per row reads the row for its maxima, its sums (and the JSD's sums), then writes d/d(logits) in place.
struct TermsParams {
  double ce_weight = 1.0;
  double entropy_coef = 0.0;
  int distill = 0;  // 0 off, 1 forward KL, 2 reverse KL, 3 JSD
  double distill_weight = 1.0, beta = 0.5, inv_T = 1.0;
  double eps_low = 0.2, eps_high = 0.2, kl_beta = 0.0;
  // per-row inputs of the policy loss (acc dtype, offset to row 0 of the call); policy on when
  // advantages != nullptr; old_logprobs nullptr: ratio 1; ref_logprobs nullptr: no KL term.
  const void* advantages = nullptr;
  const void* old_logprobs = nullptr;
  const void* ref_logprobs = nullptr;
  const void* policy_weights = nullptr;   // nullptr: 1 (multiplies the policy part only)
  const void* entropy_weights = nullptr;  // nullptr: 1 (multiplies entropy_coef)
  int policy_kind = 0;                    // 0 clipped, 1 cispo, 2 sapo
  double delta = 0.0;                     // > 0: two-sided clipping of the unclipped ratio
  bool kl_bias_correction = false;        // KL term k3 * ratio
  double sapo_tau_pos = 1.0, sapo_tau_neg = 1.05;
};

struct TermsArgs {
  void* logits = nullptr;  // [rows, V] raw logits (ld), overwritten by the gradient if write_grad
  int64_t ld = 0;
  int64_t rows = 0;
  const void* teacher = nullptr;  // [rows, V] raw teacher logits in the logits' dtype, or nullptr
  int64_t ld_teacher = 0;
  const int64_t* target = nullptr;
  bool write_grad = false;
  // upstream gradients (acc dtype): of token_loss at g_tok[i * g_tok_stride] (nullptr = 1), of
  // lse, entropy, logprob at [i] (nullptr = 0)
  const void* g_tok = nullptr;
  int64_t g_tok_stride = 0;
  const void* g_lse = nullptr;
  const void* g_entropy = nullptr;
  const void* g_logprob = nullptr;
  // outputs (acc dtype, int64 for predicted), each nullptr = not written
  void* token_loss = nullptr;
  void* lse = nullptr;
  void* entropy = nullptr;
  void* logprob = nullptr;
  int64_t* predicted = nullptr;
  // statistics from the same pass (acc dtype, nullptr = not computed): sum_c z_c / V and
  // log sum_c p_c^2
  void* mean_logit = nullptr;
  void* log_sum_sq = nullptr;
};

cudaError_t launch_row_terms(DType dtype, const TermsArgs& args, const EpiParams& epi,
                             const TermsParams& terms, cudaStream_t stream);

// The vocab-parallel building blocks (fusedce::shard_stats / shard_grad_; csrc/cpu/shard_cpu.cpp is
// the CPU twin): one block per row of a shard [rows, cols] of the logits, at global column
// vocab_start. Per-row arrays are in the accumulation dtype; class_weight is the shard's [cols].
struct ShardArgs {
  void* logits = nullptr;  // read by shard_stats, overwritten by shard_grad
  int64_t ld = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  const int64_t* target = nullptr;  // global ids
  int64_t vocab_start = 0;
  int64_t ignore_index = -100;
  const void* class_weight = nullptr;
  double softcap = 0.0;
  double logit_scale = 1.0;
  void* stats = nullptr;  // shard_stats: [rows, 6]
  const void* lse = nullptr;  // shard_grad: [rows] each; coef_w may be nullptr (0)
  const void* coef_p = nullptr;
  const void* coef_t = nullptr;
  const void* coef_w = nullptr;
};

cudaError_t launch_shard_stats(DType dtype, const ShardArgs& args, cudaStream_t stream);
cudaError_t launch_shard_grad(DType dtype, const ShardArgs& args, cudaStream_t stream);

// The vocab-parallel term ops (fusedce::shard_partials, shard_jsd, shard_finish, shard_backward_;
// csrc/shard_layout.h the packed columns, csrc/cpu/ the CPU twin): terms_row.cuh's pieces on one
// shard [rows, cols] of the logits at global column vocab_start. Per-row arrays are in the
// accumulation dtype; class_weight is the shard's [cols], class_weight_sum a device scalar (its
// sum; nullptr: cols). terms.distill > 0 needs teacher (the teacher's raw logits on the shard, in
// the logits' dtype); terms' per-row policy pointers are read by shard_finish only.
struct ShardTermsArgs {
  void* logits = nullptr;  // read by partials / jsd, overwritten by backward
  int64_t ld = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  const void* teacher = nullptr;
  int64_t ld_teacher = 0;
  const int64_t* target = nullptr;  // global ids
  int64_t vocab_start = 0;
  int64_t ignore_index = -100;
  const void* class_weight = nullptr;
  const void* class_weight_sum = nullptr;
  double softcap = 0.0;
  double logit_scale = 1.0;
  bool moments = false;        // partials: sum z and sum e^(2(z-m)) (kSz, kS2)
  void* partials = nullptr;    // shard_partials: [rows, kParts]
  void* jsd = nullptr;         // shard_jsd: [rows, 2]
  const void* coefs = nullptr; // shard_jsd, shard_backward_: [rows, kCoefs]
};

// shard_finish: one thread per row. partials [world, rows, kParts]; jsd [rows, 2] or nullptr;
// upstream gradients [rows] each or nullptr (0). Writes out_rows [rows, kRows] and
// coefs [rows, kCoefs]. dtype: the partials' (kFloat32 or kFloat64).
struct ShardFinishArgs {
  const void* partials = nullptr;
  int64_t world = 1;
  int64_t rows = 0;
  const int64_t* target = nullptr;
  int64_t ignore_index = -100;
  const void* jsd = nullptr;
  const void* g_tok = nullptr;
  const void* g_lse = nullptr;
  const void* g_entropy = nullptr;
  const void* g_logprob = nullptr;
  double label_smoothing = 0.0;
  double z_loss = 0.0;
  bool want_mean_logit = false;
  bool want_log_sum_sq = false;
  void* out_rows = nullptr;
  void* coefs = nullptr;
};

cudaError_t launch_shard_partials(DType dtype, const ShardTermsArgs& args,
                                  const TermsParams& terms, cudaStream_t stream);
cudaError_t launch_shard_jsd(DType dtype, const ShardTermsArgs& args, const TermsParams& terms,
                             cudaStream_t stream);
cudaError_t launch_shard_backward(DType dtype, const ShardTermsArgs& args,
                                  const TermsParams& terms, cudaStream_t stream);
cudaError_t launch_shard_finish(DType dtype, const ShardFinishArgs& args, const TermsParams& terms,
                                cudaStream_t stream);

// data[0, n) *= *scale in place (contiguous data of `dtype`; scale: a device scalar of the
// accumulation dtype). When *scale == 1 the kernel exits without touching data (no host sync).
cudaError_t launch_scale(DType dtype, void* data, int64_t n, const void* scale, int sm_count,
                         cudaStream_t stream);

// The mean reduction of `loss` (mean=True), in the accumulation dtype `acc` (kFloat32 or
// kFloat64), one block each. Before the pass: *d = sum over the n tokens with target !=
// ignore_index of class_weight[target] ([V], nullptr: 1 each; 0 for a target outside [0, V)) and
// *grad_scale = 1 / *d (0 when *d == 0). After it: *loss = sum(token_loss[0, n)) / *d.
cudaError_t launch_mean_denominator(DType acc, const int64_t* target, int64_t n,
                                    const void* class_weight, int64_t V, int64_t ignore_index,
                                    void* d, void* grad_scale, cudaStream_t stream);
cudaError_t launch_mean_finish(DType acc, const void* token_loss, int64_t n, const void* d,
                               void* loss, cudaStream_t stream);
// cross_entropy's mean=True, one block after its pass: *grad_scale = 1 / d (0 when d == 0) and
// *loss = sum(token_loss[0, n)) / d, d as above.
cudaError_t launch_mean_after(DType acc, const int64_t* target, const void* token_loss, int64_t n,
                              const void* class_weight, int64_t V, int64_t ignore_index,
                              void* loss, void* grad_scale, cudaStream_t stream);

}  // namespace gpu
}  // namespace fusedce
