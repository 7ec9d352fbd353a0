// CPU implementation of the fused linear head loss (fusedce::loss, fusedce::loss_backward).
//
// Tokens are processed in chunks of C rows, the vocabulary optionally in tiles of Vt columns; the
// only buffers beyond inputs and gradients are the [C, Vt] logits tile, the [C, H] hidden chunk in
// the accumulation dtype, and (for half inputs) accumulation copies of the weight and of
// grad_weight. So memory is bounded by the chunk, never by N * V.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "common.h"

namespace fusedce {
namespace cpu {
namespace {

// Transient budget for one logits tile; chunk sizes are derived from it unless given.
constexpr int64_t kTileBudgetBytes = int64_t(64) << 20;
constexpr int64_t kGradHiddenBlock = 4096;

struct Tiling {
  int64_t rows;  // C
  int64_t cols;  // Vt
};

Tiling choose_tiling(int64_t n, int64_t vocab, int64_t chunk_size, int64_t vocab_chunk_size,
                     int64_t acc_bytes) {
  TORCH_CHECK(chunk_size >= 0, "fusedce: chunk_size must be >= 0 (0 = automatic), got ",
              chunk_size);
  TORCH_CHECK(vocab_chunk_size >= 0,
              "fusedce: vocab_chunk_size must be >= 0 (0 = whole vocabulary), got ",
              vocab_chunk_size);
  Tiling t;
  t.cols = vocab_chunk_size > 0 ? std::min(vocab_chunk_size, vocab) : vocab;
  t.rows = chunk_size > 0 ? chunk_size
                          : std::max<int64_t>(1, kTileBudgetBytes / (t.cols * acc_bytes));
  t.rows = std::max<int64_t>(1, std::min(t.rows, std::max<int64_t>(n, 1)));
  return t;
}

// Everything both ops share: the inputs in the accumulation dtype, the tiling, the GEMMs.
struct LinearProblem {
  at::Tensor hidden, weight, bias;  // accumulation dtype, contiguous; bias undefined if absent
  at::Tensor target;                // int64
  at::Tensor class_weight;          // accumulation dtype, or undefined
  int64_t n, h, v;
  Tiling tiling;
  at::ScalarType acc;

  LinearProblem(const at::Tensor& hidden_, const at::Tensor& weight_, const at::Tensor& target_,
                const std::optional<at::Tensor>& bias_,
                const std::optional<at::Tensor>& class_weight_, int64_t ignore_index,
                int64_t chunk_size, int64_t vocab_chunk_size) {
    check_linear_args(hidden_, weight_, target_, bias_, class_weight_);
    acc = acc_type_of(hidden_.scalar_type());
    n = hidden_.size(0);
    h = hidden_.size(1);
    v = weight_.size(0);
    hidden = hidden_.contiguous();  // converted to acc chunk by chunk
    weight = weight_.to(acc).contiguous();
    if (bias_.has_value()) bias = bias_->to(acc).contiguous();
    target = target_.to(at::kLong).contiguous();
    if (class_weight_.has_value()) class_weight = class_weight_->to(acc).contiguous();
    check_targets_in_range(target, v, ignore_index);
    tiling = choose_tiling(n, v, chunk_size, vocab_chunk_size, at::elementSize(acc));
  }

  // Raw logits of rows [r0, r0 + rows) x columns [c0, c0 + cols) into `out` ([rows, cols]).
  void logits_tile(const at::Tensor& hidden_chunk, int64_t c0, int64_t cols, at::Tensor& out) const {
    const at::Tensor w = weight.narrow(0, c0, cols);
    if (bias.defined()) {
      at::addmm_out(out, bias.narrow(0, c0, cols), hidden_chunk, w.t());
    } else {
      at::mm_out(out, hidden_chunk, w.t());
    }
  }
};

// The row gradients of one tile are in `tile` ([rows, cols]); fold them into the gradients.
struct GradAccumulators {
  at::Tensor hidden_chunk_grad;  // [C, H] acc, summed over vocabulary tiles
  at::Tensor weight_grad;        // [V, H] acc
  at::Tensor bias_grad;          // [V] acc
  bool need_hidden, need_weight, need_bias;

  void add_tile(const at::Tensor& tile, const at::Tensor& hidden_chunk, const at::Tensor& weight,
                int64_t c0, int64_t cols, bool first_tile) {
    if (need_hidden) {
      // grad_hidden sums over the whole vocabulary (K = V, up to 256k terms with cancellation).
      // Summing it in blocks of kGradHiddenBlock classes keeps the float32 rounding error of
      // that reduction independent of how the BLAS splits a long K (some do not split at all).
      for (int64_t b0 = 0; b0 < cols; b0 += kGradHiddenBlock) {
        const int64_t bn = std::min(kGradHiddenBlock, cols - b0);
        const at::Tensor g = tile.narrow(1, b0, bn);
        const at::Tensor w = weight.narrow(0, c0 + b0, bn);
        if (first_tile && b0 == 0) {
          at::mm_out(hidden_chunk_grad, g, w);
        } else {
          hidden_chunk_grad.addmm_(g, w);
        }
      }
    }
    if (need_weight) weight_grad.narrow(0, c0, cols).addmm_(tile.t(), hidden_chunk);
    if (need_bias) bias_grad.narrow(0, c0, cols).add_(tile.sum(0));
  }
};

// The chunk loop shared by the forward (stats, optionally gradients) and the recomputing backward.
// Per row it needs: the upstream g of the token loss, g_lse of the lse, and (backward) the lse.
template <typename acc_t>
void run_linear(const LinearProblem& P, const Epilogue<acc_t>& ep, bool want_stats,
                // forward outputs (when want_stats)
                acc_t* token_loss, acc_t* lse_out, int64_t* predicted,
                // gradient inputs: uniform g (forward) or per-token (backward)
                bool want_grad, acc_t uniform_g, const acc_t* g_tok, const acc_t* g_lse,
                const acc_t* lse_in, GradAccumulators& acc, at::Tensor& grad_hidden_out) {
  const int64_t n = P.n, v = P.v;
  const int64_t C = P.tiling.rows, Vt = P.tiling.cols;
  const int64_t num_tiles = (v + Vt - 1) / Vt;
  const auto opts = P.weight.options();
  at::Tensor tile_buf = at::empty({std::min(C, std::max<int64_t>(n, 1)), Vt}, opts);
  const int64_t* tgt = P.target.data_ptr<int64_t>();
  std::vector<RowStats<acc_t>> stats;
  std::vector<acc_t> row_lse;

  for (int64_t r0 = 0; r0 < n; r0 += C) {
    const int64_t rows = std::min(C, n - r0);
    const at::Tensor hidden_chunk = P.hidden.narrow(0, r0, rows).to(P.acc).contiguous();

    // Pass 1: statistics (skipped by the backward, which has the lse).
    row_lse.assign(rows, acc_t(0));
    if (want_stats) {
      stats.assign(rows, RowStats<acc_t>());
      for (int64_t vt = 0; vt < num_tiles; ++vt) {
        const int64_t c0 = vt * Vt, cols = std::min(Vt, v - c0);
        at::Tensor tile = tile_buf.narrow(0, 0, rows).narrow(1, 0, cols);
        P.logits_tile(hidden_chunk, c0, cols, tile);
        const acc_t* tp = tile.data_ptr<acc_t>();
        const int64_t ld = tile.stride(0);
        at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            accumulate_row<acc_t, acc_t>(ep, tp + i * ld, c0, cols, tgt[r0 + i], stats[i]);
          }
        });
      }
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t t = tgt[r0 + i];
        row_lse[i] = stats[i].lse();
        lse_out[r0 + i] = row_lse[i];
        token_loss[r0 + i] = row_loss(ep, stats[i], t);
        predicted[r0 + i] = t == ep.ignore_index ? -1 : stats[i].argmax;
      }
    } else {
      for (int64_t i = 0; i < rows; ++i) row_lse[i] = lse_in[r0 + i];
    }
    if (!want_grad) continue;

    // Pass 2: d(loss)/d(raw logits) tile by tile (recomputed unless the one tile is still here).
    std::vector<RowGrad<acc_t>> rg(rows);
    for (int64_t i = 0; i < rows; ++i) {
      const acc_t g = g_tok ? g_tok[r0 + i] : uniform_g;
      rg[i] = RowGrad<acc_t>::make(ep, row_lse[i], tgt[r0 + i], g, g_lse ? g_lse[r0 + i] : 0);
    }
    const bool tile_is_current = want_stats && num_tiles == 1;
    for (int64_t vt = 0; vt < num_tiles; ++vt) {
      const int64_t c0 = vt * Vt, cols = std::min(Vt, v - c0);
      at::Tensor tile = tile_buf.narrow(0, 0, rows).narrow(1, 0, cols);
      if (!tile_is_current) P.logits_tile(hidden_chunk, c0, cols, tile);
      acc_t* tp = tile.data_ptr<acc_t>();
      const int64_t ld = tile.stride(0);
      at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          row_backward<acc_t, acc_t, acc_t>(ep, rg[i], tp + i * ld, c0, cols, tp + i * ld);
        }
      });
      if (acc.need_hidden) {
        acc.hidden_chunk_grad = vt == 0 ? at::empty({rows, P.h}, opts) : acc.hidden_chunk_grad;
      }
      acc.add_tile(tile, hidden_chunk, P.weight, c0, cols, vt == 0);
    }
    if (acc.need_hidden) grad_hidden_out.narrow(0, r0, rows).copy_(acc.hidden_chunk_grad);
  }
}

struct GradOutputs {
  at::Tensor hidden, weight, bias;
};

// Allocates the gradient outputs (empty where not requested) and their accumulators.
GradAccumulators make_accumulators(const LinearProblem& P, const at::Tensor& hidden,
                                   const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                   const std::array<bool, 3>& mask, GradOutputs& out) {
  GradAccumulators acc;
  acc.need_hidden = mask[0];
  acc.need_weight = mask[1];
  acc.need_bias = mask[2] && bias.has_value();
  const auto accopts = P.weight.options();
  out.hidden = acc.need_hidden ? at::empty({P.n, P.h}, hidden.options())
                               : at::empty({0}, hidden.options());
  out.weight = at::empty({0}, weight.options());
  out.bias = at::empty({0}, bias.has_value() ? bias->options() : hidden.options());
  if (acc.need_weight) acc.weight_grad = at::zeros({P.v, P.h}, accopts);
  if (acc.need_bias) acc.bias_grad = at::zeros({P.v}, accopts);
  return acc;
}

void finish_grads(const GradAccumulators& acc, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, GradOutputs& out) {
  if (acc.need_weight) out.weight = acc.weight_grad.to(weight.scalar_type());
  if (acc.need_bias) out.bias = acc.bias_grad.to(bias->scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
loss_cpu(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& class_weight,
         const std::optional<at::Tensor>& grad_scale, int64_t ignore_index, double label_smoothing,
         double z_loss, double softcap, double logit_scale, std::array<bool, 3> grad_mask,
         int64_t chunk_size, int64_t vocab_chunk_size, bool fp32_grad_accum) {
  (void)fp32_grad_accum;  // the CPU always accumulates in float32 (float64 for float64 inputs)
  check_scalars(label_smoothing, z_loss, softcap, logit_scale);
  const LinearProblem P(hidden, weight, target, bias, class_weight, ignore_index, chunk_size,
                        vocab_chunk_size);
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->numel() == 1, "fusedce: grad_scale must be a single value, got ",
                grad_scale->sizes());
    check_same_device(*grad_scale, hidden, "grad_scale", "hidden");
  }
  const auto accopts = hidden.options().dtype(P.acc);
  at::Tensor token_loss = at::empty({P.n}, accopts);
  at::Tensor lse = at::empty({P.n}, accopts);
  at::Tensor predicted = at::empty({P.n}, hidden.options().dtype(at::kLong));
  GradOutputs grads;
  GradAccumulators acc = make_accumulators(P, hidden, weight, bias, grad_mask, grads);
  const bool want_grad = acc.need_hidden || acc.need_weight || acc.need_bias;
  at::Tensor scale = grad_scale.has_value() ? grad_scale->to(P.acc).reshape({})
                                            : at::ones({}, accopts);

  AT_DISPATCH_FLOATING_TYPES(P.acc, "fusedce_loss_cpu", [&] {
    using acc_t = scalar_t;
    const auto ep = make_epilogue<acc_t>(P.class_weight, P.v, ignore_index, label_smoothing,
                                         z_loss, softcap, logit_scale);
    run_linear<acc_t>(P, ep, /*want_stats=*/true, token_loss.data_ptr<acc_t>(),
                      lse.data_ptr<acc_t>(), predicted.data_ptr<int64_t>(), want_grad,
                      scale.item<acc_t>(), nullptr, nullptr, nullptr, acc, grads.hidden);
  });
  finish_grads(acc, weight, bias, grads);
  at::Tensor loss = (token_loss.sum() * scale).to(P.acc);
  return {loss, token_loss, lse, predicted, grads.hidden, grads.weight, grads.bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_backward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& class_weight,
    const at::Tensor& lse, const at::Tensor& grad_token_loss,
    const std::optional<at::Tensor>& grad_lse, int64_t ignore_index, double label_smoothing,
    double z_loss, double softcap, double logit_scale, std::array<bool, 3> grad_mask,
    int64_t chunk_size, int64_t vocab_chunk_size, bool fp32_grad_accum) {
  (void)fp32_grad_accum;
  check_scalars(label_smoothing, z_loss, softcap, logit_scale);
  const LinearProblem P(hidden, weight, target, bias, class_weight, ignore_index, chunk_size,
                        vocab_chunk_size);
  check_per_token(lse, P.n, hidden, "lse");
  check_per_token(grad_token_loss, P.n, hidden, "grad_token_loss");
  check_per_token(grad_lse, P.n, hidden, "grad_lse");
  const at::Tensor lse_acc = lse.to(P.acc).contiguous();
  const at::Tensor g_acc = grad_token_loss.to(P.acc).contiguous();
  const at::Tensor glse_acc = grad_lse.has_value() ? grad_lse->to(P.acc).contiguous() : at::Tensor();
  GradOutputs grads;
  GradAccumulators acc = make_accumulators(P, hidden, weight, bias, grad_mask, grads);

  AT_DISPATCH_FLOATING_TYPES(P.acc, "fusedce_loss_backward_cpu", [&] {
    using acc_t = scalar_t;
    const auto ep = make_epilogue<acc_t>(P.class_weight, P.v, ignore_index, label_smoothing,
                                         z_loss, softcap, logit_scale);
    run_linear<acc_t>(P, ep, /*want_stats=*/false, nullptr, nullptr, nullptr,
                      /*want_grad=*/true, acc_t(0), g_acc.data_ptr<acc_t>(),
                      glse_acc.defined() ? glse_acc.data_ptr<acc_t>() : nullptr,
                      lse_acc.data_ptr<acc_t>(), acc, grads.hidden);
  });
  finish_grads(acc, weight, bias, grads);
  return {grads.hidden, grads.weight, grads.bias};
}

void scale_cpu(const at::Tensor& self, const at::Tensor& scale) {
  TORCH_CHECK(scale.numel() == 1, "fusedce: scale must be a single value, got ", scale.sizes());
  check_same_device(scale, self, "scale", "self");
  if (scale.item<double>() == 1.0) return;  // free on the CPU; the common loss.backward() case
  const_cast<at::Tensor&>(self).mul_(scale.reshape({}));
}

}  // namespace
}  // namespace cpu
}  // namespace fusedce

TORCH_LIBRARY_IMPL(fusedce, CPU, m) {
  m.impl("loss", &fusedce::cpu::loss_cpu);
  m.impl("loss_backward", &fusedce::cpu::loss_backward_cpu);
  m.impl("scale_", &fusedce::cpu::scale_cpu);
}
