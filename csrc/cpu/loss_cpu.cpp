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
#include "../chunk_budget.h"
#include "../terms_args.h"
#include "common.h"
#include "terms.h"

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
  check_chunk_args(chunk_size, vocab_chunk_size);
  Tiling t;
  t.cols = vocab_tile(vocab, vocab_chunk_size);
  t.rows = chunk_rows(n, chunk_size, kTileBudgetBytes, t.cols * acc_bytes, /*balance=*/false);
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

// The distillation teacher's logits, tile by tile: given, or computed beside the student's.
struct Teacher {
  at::Tensor logits;                  // [N, V] any float dtype, or undefined
  at::Tensor hidden, weight, bias;    // accumulation dtype, contiguous (bias may be undefined)
  bool defined() const { return logits.defined() || hidden.defined(); }

  void tile(int64_t r0, int64_t rows, int64_t c0, int64_t cols, at::Tensor& out) const {
    if (logits.defined()) {
      out.copy_(logits.narrow(0, r0, rows).narrow(1, c0, cols));
      return;
    }
    const at::Tensor h = hidden.narrow(0, r0, rows);
    const at::Tensor w = weight.narrow(0, c0, cols);
    if (bias.defined()) {
      at::addmm_out(out, bias.narrow(0, c0, cols), h, w.t());
    } else {
      at::mm_out(out, h, w.t());
    }
  }
};

// Per-row inputs and outputs of the chunk loop (row-indexed from 0; nullptr where absent).
template <typename acc_t>
struct RowIO {
  // forward outputs (when want_stats)
  acc_t* token_loss = nullptr;
  acc_t* lse = nullptr;
  int64_t* predicted = nullptr;
  acc_t* entropy = nullptr;
  acc_t* logprob = nullptr;
  acc_t* mean_logit = nullptr;
  acc_t* log_sum_sq = nullptr;
  // upstream gradients: of token_loss (uniform_g when g_tok is null), lse, entropy, logprob
  acc_t uniform_g = 0;
  const acc_t* g_tok = nullptr;
  const acc_t* g_lse = nullptr;
  const acc_t* g_entropy = nullptr;
  const acc_t* g_logprob = nullptr;
  const acc_t* lse_in = nullptr;  // backward of the plain CE: the saved lse (no statistics pass)
};

// The chunk loop shared by the forward (stats, optionally gradients) and the recomputing backward.
// `tm` is null for the plain CE, else the terms of terms.h (which always need the statistics).
template <typename acc_t>
void run_linear(const LinearProblem& P, const Epilogue<acc_t>& ep, const Terms<acc_t>* tm,
                const Teacher& teacher, bool want_stats, bool want_grad, const RowIO<acc_t>& io,
                GradAccumulators& acc, at::Tensor& grad_hidden_out) {
  const int64_t n = P.n, v = P.v;
  const int64_t C = P.tiling.rows, Vt = P.tiling.cols;
  const int64_t num_tiles = (v + Vt - 1) / Vt;
  const auto opts = P.weight.options();
  const int64_t buf_rows = std::min(C, std::max<int64_t>(n, 1));
  at::Tensor tile_buf = at::empty({buf_rows, Vt}, opts);
  at::Tensor teacher_buf = teacher.defined() ? at::empty({buf_rows, Vt}, opts) : at::Tensor();
  const int64_t* tgt = P.target.data_ptr<int64_t>();
  const bool jsd = tm && tm->distill == kJSD;
  std::vector<RowStats<acc_t>> stats;
  std::vector<ExtSums> ext;
  std::vector<acc_t> row_lse;
  std::vector<ExtGrad<acc_t>> eg;

  for (int64_t r0 = 0; r0 < n; r0 += C) {
    const int64_t rows = std::min(C, n - r0);
    const at::Tensor hidden_chunk = P.hidden.narrow(0, r0, rows).to(P.acc).contiguous();
    auto student = [&](int64_t c0, int64_t cols) {
      at::Tensor tile = tile_buf.narrow(0, 0, rows).narrow(1, 0, cols);
      P.logits_tile(hidden_chunk, c0, cols, tile);
      return tile;
    };
    auto teacher_tile = [&](int64_t c0, int64_t cols) -> const acc_t* {
      if (!teacher.defined()) return nullptr;
      at::Tensor t = teacher_buf.narrow(0, 0, rows).narrow(1, 0, cols);
      teacher.tile(r0, rows, c0, cols, t);
      return t.data_ptr<acc_t>();
    };

    // Pass 1: statistics (skipped by the plain backward, which has the lse).
    row_lse.assign(rows, acc_t(0));
    const bool stats_pass = want_stats || tm;
    if (stats_pass) {
      stats.assign(rows, RowStats<acc_t>());
      if (tm) ext.assign(rows, ExtSums());
      for (int64_t vt = 0; vt < num_tiles; ++vt) {
        const int64_t c0 = vt * Vt, cols = std::min(Vt, v - c0);
        const at::Tensor tile = student(c0, cols);
        const acc_t* tp = tile.data_ptr<acc_t>();
        const acc_t* bp = teacher_tile(c0, cols);
        const int64_t ld = tile.stride(0), ldb = Vt;
        at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            if (tm) {  // the softmax sums are accumulate_ext's (s relative to m)
              accumulate_row<acc_t, acc_t, /*kSoftmax=*/false>(ep, tp + i * ld, c0, cols,
                                                                tgt[r0 + i], stats[i]);
              accumulate_ext(ep, *tm, tp + i * ld, bp ? bp + i * ldb : nullptr, cols, ext[i]);
            } else {
              accumulate_row<acc_t, acc_t>(ep, tp + i * ld, c0, cols, tgt[r0 + i], stats[i]);
            }
          }
        });
      }
      if (tm) {
        for (int64_t i = 0; i < rows; ++i) {
          stats[i].max = static_cast<acc_t>(ext[i].m);
          stats[i].sumexp = ext[i].s;
        }
      }
      for (int64_t i = 0; i < rows; ++i) row_lse[i] = stats[i].lse();
      if (jsd) {  // the JSD summand needs both normalizers: one more pass over the row
        for (int64_t vt = 0; vt < num_tiles; ++vt) {
          const int64_t c0 = vt * Vt, cols = std::min(Vt, v - c0);
          const at::Tensor tile = num_tiles == 1 ? tile_buf.narrow(0, 0, rows).narrow(1, 0, cols)
                                                 : student(c0, cols);
          const acc_t* tp = tile.data_ptr<acc_t>();
          const acc_t* bp = num_tiles == 1 ? teacher_buf.data_ptr<acc_t>() : teacher_tile(c0, cols);
          const int64_t ld = tile.stride(0);
          at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
            for (int64_t i = b; i < e; ++i) {
              accumulate_jsd(ep, *tm, tp + i * ld, bp + i * Vt, cols, lse_u_of(ext[i], tm->inv_T),
                             lse_y_of(ext[i]), ext[i]);
            }
          });
        }
      }
    } else {
      for (int64_t i = 0; i < rows; ++i) row_lse[i] = io.lse_in[r0 + i];
    }

    // Per-row values and gradient coefficients.
    std::vector<RowGrad<acc_t>> rg(rows);
    if (tm) eg.assign(rows, ExtGrad<acc_t>());
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t row = r0 + i, t = tgt[row];
      const acc_t g = io.g_tok ? io.g_tok[row] : io.uniform_g;
      const acc_t gl = io.g_lse ? io.g_lse[row] : acc_t(0);
      rg[i] = RowGrad<acc_t>::make(ep, row_lse[i], t, want_grad ? g : acc_t(0),
                                   want_grad ? gl : acc_t(0));
      double extra = 0;
      if (tm) {
        const double gh = want_grad && io.g_entropy ? io.g_entropy[row] : 0.0;
        const double glp = want_grad && io.g_logprob ? io.g_logprob[row] : 0.0;
        const ExtRow<acc_t> er = finish_ext(*tm, ext[i], stats[i], row, t, t != ep.ignore_index,
                                            want_grad ? static_cast<double>(g) : 0.0, gh, glp,
                                            rg[i]);
        eg[i] = er.grad;
        extra = er.loss;
        if (want_stats) {
          if (io.entropy) io.entropy[row] = static_cast<acc_t>(er.entropy);
          if (io.logprob) io.logprob[row] = static_cast<acc_t>(er.logprob);
          // log sum p^2 = log(s2) - 2 log(s), both sums relative to the same maximum
          if (io.mean_logit) io.mean_logit[row] = static_cast<acc_t>(ext[i].sz / P.v);
          if (io.log_sum_sq) {
            io.log_sum_sq[row] =
                static_cast<acc_t>(std::log(ext[i].s2) - 2.0 * std::log(ext[i].s));
          }
        }
      }
      if (want_stats) {
        io.lse[row] = row_lse[i];
        io.token_loss[row] = row_loss(ep, stats[i], t) + static_cast<acc_t>(extra);
        io.predicted[row] = t == ep.ignore_index ? -1 : stats[i].argmax;
      }
    }
    if (!want_grad) continue;

    // Pass 2: d(loss)/d(raw logits) tile by tile (recomputed unless the one tile is still here).
    const bool tile_is_current = stats_pass && num_tiles == 1;
    for (int64_t vt = 0; vt < num_tiles; ++vt) {
      const int64_t c0 = vt * Vt, cols = std::min(Vt, v - c0);
      at::Tensor tile = tile_is_current ? tile_buf.narrow(0, 0, rows).narrow(1, 0, cols)
                                        : student(c0, cols);
      const acc_t* bp = !teacher.defined() ? nullptr
                        : tile_is_current  ? teacher_buf.data_ptr<acc_t>()
                                           : teacher_tile(c0, cols);
      acc_t* tp = tile.data_ptr<acc_t>();
      const int64_t ld = tile.stride(0);
      at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          if (tm) {
            row_backward_ext(ep, *tm, rg[i], eg[i], tp + i * ld, bp ? bp + i * Vt : nullptr, c0,
                             cols, tp + i * ld);
          } else {
            row_backward<acc_t, acc_t, acc_t>(ep, rg[i], tp + i * ld, c0, cols, tp + i * ld);
          }
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

Teacher make_teacher(const TermArgs& ta, at::ScalarType acc) {
  Teacher t;
  if (ta.distill == 0) return t;
  if (ta.teacher_logits.has_value()) {
    t.logits = *ta.teacher_logits;
  } else {
    t.hidden = ta.teacher_hidden->to(acc).contiguous();
    t.weight = ta.teacher_weight->to(acc).contiguous();
    if (ta.teacher_bias.has_value()) t.bias = ta.teacher_bias->to(acc).contiguous();
  }
  return t;
}

struct GradOutputs {
  at::Tensor hidden, weight, bias;
};

// Allocates the gradient outputs (empty where not requested) and their accumulators. f32_out:
// the requested gradients are returned in float32 (see f32_outputs).
GradAccumulators make_accumulators(const LinearProblem& P, const at::Tensor& hidden,
                                   const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                   const std::array<bool, 3>& mask, GradOutputs& out,
                                   bool f32_out = false) {
  GradAccumulators acc;
  acc.need_hidden = mask[0];
  acc.need_weight = mask[1];
  acc.need_bias = mask[2] && bias.has_value();
  const auto accopts = P.weight.options();
  out.hidden = acc.need_hidden
                   ? at::empty({P.n, P.h}, f32_out ? accopts : hidden.options())
                   : at::empty({0}, hidden.options());
  out.weight = at::empty({0}, weight.options());
  out.bias = at::empty({0}, bias.has_value() ? bias->options() : hidden.options());
  if (acc.need_weight) acc.weight_grad = at::zeros({P.v, P.h}, accopts);
  if (acc.need_bias) acc.bias_grad = at::zeros({P.v}, accopts);
  return acc;
}

void finish_grads(const GradAccumulators& acc, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, GradOutputs& out, bool f32_out = false) {
  if (acc.need_weight) out.weight = f32_out ? acc.weight_grad : acc.weight_grad.to(weight.scalar_type());
  if (acc.need_bias) out.bias = f32_out ? acc.bias_grad : acc.bias_grad.to(bias->scalar_type());
}

// A float16 forward returns the gradients it computes in float32: they are those of the scalar
// loss before its upstream gradient (a GradScaler loss scale) is applied, so a mean's 1/N makes
// them small enough to fall into fp16's subnormals; the backward multiplies by the upstream
// gradient in float32 and rounds to float16 once (fusedce/ops.py), as eager PyTorch does.
bool f32_outputs(const at::Tensor& hidden) { return hidden.scalar_type() == at::kHalf; }

// grad_scale: one value, or one per token (checked here), in acc dtype.
at::Tensor per_token_scale(const std::optional<at::Tensor>& grad_scale, const LinearProblem& P,
                           const at::Tensor& hidden) {
  if (!grad_scale.has_value()) return at::ones({}, hidden.options().dtype(P.acc));
  TORCH_CHECK(grad_scale->numel() == 1 || (grad_scale->dim() == 1 && grad_scale->size(0) == P.n),
              "fusedce: grad_scale must be a single value or one per token ([", P.n, "]), got ",
              grad_scale->sizes());
  check_same_device(*grad_scale, hidden, "grad_scale", "hidden");
  return grad_scale->numel() == 1 && P.n != 1 ? grad_scale->to(P.acc).reshape({})
                                              : grad_scale->to(P.acc).reshape({-1}).contiguous();
}

using LossOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor>;

// mean=True: the same sums as csrc/cuda/kernels/mean.cu, in double (in token order here, in
// per-thread strides there: a count is exact either way, a weighted sum agrees once rounded):
// d = sum of class_weight[target] over the tokens whose target != ignore_index (1 each without
// class weights, 0 for a target outside [0, V)), summed in double and rounded to acc_t.
template <typename acc_t>
acc_t mean_denominator(const LinearProblem& P, int64_t ignore_index) {
  const int64_t* t = P.target.data_ptr<int64_t>();
  const acc_t* cw = P.class_weight.defined() ? P.class_weight.data_ptr<acc_t>() : nullptr;
  double s = 0.0;
  for (int64_t i = 0; i < P.n; ++i) {
    if (t[i] == ignore_index) continue;
    if (cw == nullptr) {
      s += 1.0;
    } else if (t[i] >= 0 && t[i] < P.v) {
      s += static_cast<double>(cw[t[i]]);
    }
  }
  return static_cast<acc_t>(s);
}

// loss = sum(token_loss) / d (nan or +-inf when d == 0, as F.cross_entropy's mean).
template <typename acc_t>
acc_t mean_loss(const at::Tensor& token_loss, double d) {
  const acc_t* l = token_loss.data_ptr<acc_t>();
  double s = 0.0;
  for (int64_t i = 0; i < token_loss.numel(); ++i) s += static_cast<double>(l[i]);
  return static_cast<acc_t>(s / d);
}

LossOutputs loss_cpu(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                     const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& class_weight,
                     const std::optional<at::Tensor>& grad_scale, int64_t ignore_index,
                     double label_smoothing, double z_loss, double softcap, double logit_scale,
                     std::array<bool, 3> grad_mask, int64_t chunk_size, int64_t vocab_chunk_size,
                     bool fp32_grad_accum, bool mean, FUSEDCE_TERM_PARAMS) {
  (void)fp32_grad_accum;  // the CPU always accumulates in float32 (float64 for float64 inputs)
  check_scalars(label_smoothing, z_loss, softcap, logit_scale);
  check_mean_args(mean, grad_scale);
  const TermArgs ta = FUSEDCE_TERM_ARGS_STRUCT;
  const LinearProblem P(hidden, weight, target, bias, class_weight, ignore_index, chunk_size,
                        vocab_chunk_size);
  ta.check(P.n, P.v, hidden);
  at::Tensor scale;
  double denom = 0.0;  // mean=True: d as rounded to acc_t (exact in double)
  if (mean) {
    AT_DISPATCH_FLOATING_TYPES(P.acc, "fusedce_loss_cpu_mean", [&] {
      const scalar_t d = mean_denominator<scalar_t>(P, ignore_index);
      denom = static_cast<double>(d);
      scale = at::full({}, d != scalar_t(0) ? scalar_t(1) / d : scalar_t(0),
                       hidden.options().dtype(P.acc));
    });
  } else {
    scale = per_token_scale(grad_scale, P, hidden);
  }
  const auto accopts = hidden.options().dtype(P.acc);
  at::Tensor token_loss = at::empty({P.n}, accopts);
  at::Tensor lse = at::empty({P.n}, accopts);
  at::Tensor predicted = at::empty({P.n}, hidden.options().dtype(at::kLong));
  at::Tensor entropy = at::empty({ta.want_entropy ? P.n : 0}, accopts);
  at::Tensor logprob = at::empty({ta.want_logprob ? P.n : 0}, accopts);
  at::Tensor mean_logit = at::empty({ta.want_mean_logit ? P.n : 0}, accopts);
  at::Tensor log_sum_sq = at::empty({ta.want_log_sum_sq ? P.n : 0}, accopts);
  GradOutputs grads;
  const bool f32_out = f32_outputs(hidden);
  GradAccumulators acc = make_accumulators(P, hidden, weight, bias, grad_mask, grads, f32_out);
  const bool want_grad = acc.need_hidden || acc.need_weight || acc.need_bias;
  const Teacher teacher = make_teacher(ta, P.acc);

  AT_DISPATCH_FLOATING_TYPES(P.acc, "fusedce_loss_cpu", [&] {
    using acc_t = scalar_t;
    auto ep = make_epilogue<acc_t>(P.class_weight, P.v, ignore_index, label_smoothing, z_loss,
                                   softcap, logit_scale);
    ep.ce_weight = static_cast<acc_t>(ta.ce_weight);
    std::vector<at::Tensor> keep;
    const Terms<acc_t> tm = make_terms<acc_t>(ta, P.acc, keep);
    RowIO<acc_t> io;
    io.token_loss = token_loss.data_ptr<acc_t>();
    io.lse = lse.data_ptr<acc_t>();
    io.predicted = predicted.data_ptr<int64_t>();
    io.entropy = ta.want_entropy ? entropy.data_ptr<acc_t>() : nullptr;
    io.logprob = ta.want_logprob ? logprob.data_ptr<acc_t>() : nullptr;
    io.mean_logit = ta.want_mean_logit ? mean_logit.data_ptr<acc_t>() : nullptr;
    io.log_sum_sq = ta.want_log_sum_sq ? log_sum_sq.data_ptr<acc_t>() : nullptr;
    if (scale.dim() == 0) {
      io.uniform_g = scale.item<acc_t>();
    } else {
      io.g_tok = scale.data_ptr<acc_t>();
    }
    run_linear<acc_t>(P, ep, ta.any() ? &tm : nullptr, teacher, /*want_stats=*/true, want_grad,
                      io, acc, grads.hidden);
  });
  finish_grads(acc, weight, bias, grads, f32_out);
  at::Tensor loss;
  if (mean) {
    AT_DISPATCH_FLOATING_TYPES(P.acc, "fusedce_loss_cpu_mean_loss", [&] {
      loss = at::full({}, mean_loss<scalar_t>(token_loss, denom),
                      hidden.options().dtype(P.acc));
    });
  } else {
    loss = (token_loss * scale).sum().to(P.acc);
  }
  return {loss,         token_loss,   lse,        predicted,  entropy,   logprob,
          grads.hidden, grads.weight, grads.bias, mean_logit, log_sum_sq};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_backward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& class_weight,
    const at::Tensor& lse, const at::Tensor& grad_token_loss,
    const std::optional<at::Tensor>& grad_lse, const std::optional<at::Tensor>& grad_entropy,
    const std::optional<at::Tensor>& grad_logprob, int64_t ignore_index, double label_smoothing,
    double z_loss, double softcap, double logit_scale, std::array<bool, 3> grad_mask,
    int64_t chunk_size, int64_t vocab_chunk_size, bool fp32_grad_accum, FUSEDCE_TERM_PARAMS) {
  (void)fp32_grad_accum;
  check_scalars(label_smoothing, z_loss, softcap, logit_scale);
  TermArgs ta = FUSEDCE_TERM_ARGS_STRUCT;
  ta.without_statistics();
  const LinearProblem P(hidden, weight, target, bias, class_weight, ignore_index, chunk_size,
                        vocab_chunk_size);
  ta.check(P.n, P.v, hidden);
  check_per_token(lse, P.n, hidden, "lse");
  check_per_token(grad_token_loss, P.n, hidden, "grad_token_loss");
  check_per_token(grad_lse, P.n, hidden, "grad_lse");
  check_per_token(grad_entropy, P.n, hidden, "grad_entropy");
  check_per_token(grad_logprob, P.n, hidden, "grad_logprob");
  TORCH_CHECK(!grad_entropy.has_value() || ta.entropy_needed(),
              "fusedce: grad_entropy needs want_entropy=True");
  TORCH_CHECK(!grad_logprob.has_value() || ta.want_logprob,
              "fusedce: grad_logprob needs want_logprob=True");
  auto to_acc = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->to(P.acc).contiguous() : at::Tensor();
  };
  const at::Tensor lse_acc = lse.to(P.acc).contiguous();
  const at::Tensor g_acc = grad_token_loss.to(P.acc).contiguous();
  const at::Tensor glse_acc = to_acc(grad_lse), gent_acc = to_acc(grad_entropy),
                   glp_acc = to_acc(grad_logprob);
  GradOutputs grads;
  GradAccumulators acc = make_accumulators(P, hidden, weight, bias, grad_mask, grads);
  const Teacher teacher = make_teacher(ta, P.acc);

  AT_DISPATCH_FLOATING_TYPES(P.acc, "fusedce_loss_backward_cpu", [&] {
    using acc_t = scalar_t;
    auto ep = make_epilogue<acc_t>(P.class_weight, P.v, ignore_index, label_smoothing, z_loss,
                                   softcap, logit_scale);
    ep.ce_weight = static_cast<acc_t>(ta.ce_weight);
    std::vector<at::Tensor> keep;
    const Terms<acc_t> tm = make_terms<acc_t>(ta, P.acc, keep);
    auto ptr = [](const at::Tensor& t) -> const acc_t* {
      return t.defined() ? t.data_ptr<acc_t>() : nullptr;
    };
    RowIO<acc_t> io;
    io.g_tok = g_acc.data_ptr<acc_t>();
    io.g_lse = ptr(glse_acc);
    io.g_entropy = ptr(gent_acc);
    io.g_logprob = ptr(glp_acc);
    io.lse_in = lse_acc.data_ptr<acc_t>();
    run_linear<acc_t>(P, ep, ta.any() ? &tm : nullptr, teacher, /*want_stats=*/false,
                      /*want_grad=*/true, io, acc, grads.hidden);
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
