// CUDA implementation of the fused linear head loss (fusedce::loss, fusedce::loss_backward) and of
// fusedce::scale_. The other CUDA ops: cross_entropy_cuda.cpp, shard_cuda.cpp; GEMMs: gemm.cpp.
//
// Fused linear loss, per chunk of C token rows (C from a memory budget unless chunk_size is given):
//   1. logits chunk [C, V] = hidden[C] @ weight.T (+ bias)            cuBLAS through at::mm_out
//   2. one row kernel: online softmax (max, sum-exp, target logit, argmax, sum w*z), token loss,
//      lse, predicted, and d(loss)/d(logits) written in place into the chunk     (kernels/)
//   3. grad_hidden[C] = G @ weight,  grad_weight += G.T @ hidden[C] (beta = 1)  cuBLAS
// Low-memory mode (0 < vocab_chunk_size < V): the vocabulary is tiled; a statistics pass over the
// tiles finalizes lse, then the tiles are recomputed for the gradient (8*N*H*V flops instead of 6).
// Everything runs on the current stream under a device guard; the chunk loop has no host sync and
// no data-dependent host branch, so the ops can be captured in a CUDA graph. No call reads a device
// value on the host: an out-of-range target gives a NaN token loss and gradient in the kernels
// (kernels/epilogue.cuh); only the opt-in validation mode (csrc/validate.h) checks on the host.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../chunk_budget.h"
#include "../terms_args.h"
#include "common.h"
#include "gemm.h"

namespace fusedce {
namespace cuda_impl {
namespace {

// fusedce::loss: loss, token_loss, lse, predicted, entropy, logprob, grad_hidden, grad_weight,
// grad_bias, mean_logit, log_sum_sq_prob
using Out11 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                         Tensor, Tensor>;

constexpr int64_t kMiB = int64_t(1) << 20;
constexpr int64_t kFastBudgetDefault = 1024 * kMiB;  // [C, V] logits chunk, fast mode
constexpr int64_t kTiledBudgetDefault = 64 * kMiB;   // [C, Vt] tile + fp32 [C, H], low-memory mode

// ---- the problem shared by loss / loss_backward -----------------------------------------------
struct Linear {
  Tensor h, w, b, tgt, cw, cw_sum;
  int64_t N = 0, H = 0, V = 0;
  at::ScalarType dt, acc;
  gpu::DType kd;
  gpu::EpiParams ep;
  cudaStream_t stream;
  int64_t C = 1, Vt = 1;  // chunk rows, vocabulary tile
  bool tiled = false;
  int dev = 0;
};

void setup_linear(Linear& P, const Tensor& hidden, const Tensor& weight, const Tensor& target,
                  const std::optional<Tensor>& bias, const std::optional<Tensor>& class_weight,
                  int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
                  double logit_scale) {
  check_linear_args(hidden, weight, target, bias, class_weight);
  check_scalars(label_smoothing, z_loss, softcap, logit_scale);
  TORCH_CHECK(hidden.is_cuda(), "fusedce (CUDA): hidden must be a CUDA tensor");
  P.dt = hidden.scalar_type();
  P.acc = acc_type_of(P.dt);
  P.kd = kdtype(P.dt);
  P.N = hidden.size(0);
  P.H = hidden.size(1);
  P.V = weight.size(0);
  P.h = hidden.contiguous();
  P.w = weight.contiguous();
  if (bias.has_value()) P.b = bias->contiguous();
  P.tgt = target.to(at::kLong).contiguous();
  P.stream = c10::cuda::getCurrentCUDAStream().stream();
  P.dev = hidden.get_device();
  set_ce_epilogue(P.ep, P.cw, P.cw_sum, class_weight, P.acc, P.V, ignore_index,
                  label_smoothing, z_loss, softcap, logit_scale);
}

// The CUDA memory budgets (FUSEDCE_CHUNK_BUDGET_MB / FUSEDCE_LOWMEM_BUDGET_MB override them).
int64_t budget_bytes(bool lowmem) {
  return lowmem ? env_int("FUSEDCE_LOWMEM_BUDGET_MB", kTiledBudgetDefault / kMiB) * kMiB
                : env_int("FUSEDCE_CHUNK_BUDGET_MB", kFastBudgetDefault / kMiB) * kMiB;
}

void choose_tiling(Linear& P, int64_t chunk_size, int64_t vocab_chunk_size, bool need_gh) {
  check_chunk_args(chunk_size, vocab_chunk_size);
  const int64_t elt = static_cast<int64_t>(at::elementSize(P.dt));
  P.tiled = vocab_chunk_size > 0 && vocab_chunk_size < P.V;
  P.Vt = vocab_tile(P.V, vocab_chunk_size);
  const int64_t per_row =
      P.tiled ? P.Vt * elt + ((need_gh && is_half(P.dt)) ? P.H * 4 : 0) : P.V * elt;
  P.C = chunk_rows(P.N, chunk_size, budget_bytes(P.tiled), per_row, /*balance=*/true);
}

// Grid of the fused row kernel: by default one block (or warp) per row. FUSEDCE_ROW_GRID=k caps it
// at k persistent blocks, fewer rows in flight, so that the gradient pass could re-read each row
// from L2 rather than HBM (measured in benchmarks/NOTES.md).
int fused_grid_limit() {
  const int64_t forced = env_int("FUSEDCE_ROW_GRID", 0);
  return static_cast<int>(std::max<int64_t>(forced, 0));
}

Tensor logits_view(const Tensor& buf, int64_t rows, int64_t cols) {
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
}

void logits_gemm(const Linear& P, Tensor& out, const Tensor& hc, int64_t v0, int64_t cols) {
  const Tensor w = cols == P.V ? P.w : P.w.narrow(0, v0, cols);
  if (P.b.defined()) {
    at::addmm_out(out, cols == P.V ? P.b : P.b.narrow(0, v0, cols), hc, w.t());
  } else {
    at::mm_out(out, hc, w.t());
  }
}

struct Grads {
  bool gh = false, gw = false, gb = false;
  Tensor grad_hidden;  // [N, H] dt (float32 with f32_out)
  Tensor gh32;         // [C, H] fp32 accumulator (tiled, half dtypes) or undefined
  Tensor gw_acc;       // [V, H]: grad_weight itself, or its fp32 accumulator
  bool gw_f32 = false;
  Tensor gb_acc;  // [V] acc dtype
  // float16 forward (the gradients of a scalar loss, computed before its upstream gradient, a
  // GradScaler loss scale, is known): every gradient is kept and returned in float32. The row
  // kernels write d(loss)/d(logits) with the per-row coefficient normalized to max |.| = 1 (not
  // the tiny 1/N of a mean, which rounds (p - y)/N into fp16's subnormals or to 0), and the
  // GEMMs apply the remaining factor `scalars` = {alpha, 0, 1} (device, float32) in fp32.
  bool f32_out = false;
  Tensor scalars;
  bool any() const { return gh || gw || gb; }
};

// The GEMMs of one gradient tile g [rows, cols] (vocabulary columns [v0, v0 + cols)).
void tile_gemms(const Linear& P, Grads& G, const Tensor& g, const Tensor& hc, int64_t r0,
                int64_t v0, int64_t cols, bool first_tile, bool first_chunk) {
  const int64_t rows = g.size(0);
  const Tensor w = cols == P.V ? P.w : P.w.narrow(0, v0, cols);
  if (G.gh) {
    if (G.gh32.defined()) {
      Tensor acc = G.gh32.narrow(0, 0, rows);
      gemm_acc(acc, g, w, first_tile, /*f32acc=*/true);
    } else {
      Tensor out = G.grad_hidden.narrow(0, r0, rows);
      gemm_acc(out, g, w, first_tile, G.f32_out, G.scalars);
    }
  }
  if (G.gw) {
    Tensor out = cols == P.V ? G.gw_acc : G.gw_acc.narrow(0, v0, cols);
    gemm_acc(out, g.t(), hc, first_chunk, G.gw_f32, G.scalars);
  }
  if (G.gb) {
    Tensor out = cols == P.V ? G.gb_acc : G.gb_acc.narrow(0, v0, cols);
    if (G.f32_out) {
      out.add_(at::sum(g, {0}, false, P.acc) * G.scalars.narrow(0, 0, 1));
    } else {
      out.add_(at::sum(g, {0}, false, P.acc));
    }
  }
}

// scalars: the float32 {alpha, 0, 1} of a float16 forward (Grads::f32_out), else undefined.
void init_grads(const Linear& P, Grads& G, std::array<bool, 3> mask, bool fp32_grad_accum,
                const Tensor& scalars = Tensor()) {
  G.gh = mask[0];
  G.gw = mask[1];
  G.gb = mask[2] && P.b.defined();
  G.f32_out = scalars.defined();
  G.scalars = scalars;
  const auto opt = P.h.options();
  // With beta on the device cuBLAS cannot tell beta == 0 at launch: the float32 outputs start at
  // zero so that a first GEMM which reads C anyway reads zeros, not NaN garbage.
  auto alloc32 = [&](at::IntArrayRef shape) {
    return G.f32_out ? at::zeros(shape, opt.dtype(at::kFloat)) : at::empty(shape, opt.dtype(at::kFloat));
  };
  if (G.gh) {
    G.grad_hidden = G.f32_out ? alloc32({P.N, P.H}) : at::empty({P.N, P.H}, opt);
    if (P.tiled && is_half(P.dt) && P.N > 0 && !G.f32_out) {
      G.gh32 = at::empty({P.C, P.H}, opt.dtype(at::kFloat));
    }
  }
  if (G.gw) {
    G.gw_f32 = (fp32_grad_accum || G.f32_out) && is_half(P.dt);
    G.gw_acc = G.gw_f32 ? alloc32({P.V, P.H}) : at::empty({P.V, P.H}, opt.dtype(P.dt));
    if (P.N == 0) G.gw_acc.zero_();
  }
  if (G.gb) G.gb_acc = at::zeros({P.V}, opt.dtype(P.acc));
}

Out3 finish_grads(const Linear& P, Grads& G) {
  const auto opt = P.h.options();
  Tensor gh = G.gh ? G.grad_hidden : at::empty({0}, opt);
  Tensor gw = G.gw ? (G.gw_f32 && !G.f32_out ? G.gw_acc.to(P.dt) : G.gw_acc) : at::empty({0}, opt);
  const at::ScalarType bdt = P.b.defined() ? P.b.scalar_type() : P.dt;
  Tensor gb = G.gb ? G.gb_acc.to(G.f32_out ? at::kFloat : bdt) : at::empty({0}, opt.dtype(bdt));
  return {gh, gw, gb};
}

// Gradient pass of one token chunk from the final lse: per vocabulary tile, recompute the logits,
// overwrite them with the gradient, run the tile's GEMMs.
void grad_pass(const Linear& P, Grads& G, Tensor& buf, const Tensor& hc, int64_t r0, int64_t rows,
               const void* lse, const void* gtok, int64_t gtok_stride, const void* glse,
               int64_t glse_stride, bool first_chunk) {
  for (int64_t v0 = 0; v0 < P.V; v0 += P.Vt) {
    const int64_t cols = std::min(P.Vt, P.V - v0);
    Tensor lg = logits_view(buf, rows, cols);
    logits_gemm(P, lg, hc, v0, cols);
    gpu::GradArgs ga;
    ga.in = lg.data_ptr();
    ga.ld_in = cols;
    ga.out = lg.data_ptr();
    ga.ld_out = cols;
    ga.rows = rows;
    ga.col0 = v0;
    ga.cols = cols;
    ga.target = P.tgt.data_ptr<int64_t>() + r0;
    ga.lse = lse;
    ga.grad_tok = gtok;
    ga.grad_tok_stride = gtok_stride;
    ga.grad_lse = glse;
    ga.grad_lse_stride = glse_stride;
    check_launch(gpu::launch_row_grad(P.kd, ga, P.ep, P.stream), "row_grad");
    tile_gemms(P, G, lg, hc, r0, v0, cols, v0 == 0, first_chunk);
  }
  if (G.gh && G.gh32.defined()) G.grad_hidden.narrow(0, r0, rows).copy_(G.gh32.narrow(0, 0, rows));
}

// grad_scale: one value (stride 0) or one per token, in acc dtype on the device.
Tensor grad_scale_tensor(const std::optional<Tensor>& t, const Linear& P, int64_t& stride) {
  stride = 0;
  if (!t.has_value()) return Tensor();
  TORCH_CHECK(t->numel() == 1 || (t->dim() == 1 && t->size(0) == P.N),
              "fusedce: grad_scale must be a single value or one per token ([", P.N, "]), got ",
              t->sizes());
  check_float_tensor(*t, "grad_scale");
  check_same_device(*t, P.h, "grad_scale", "hidden");
  if (t->numel() == 1) return t->to(P.acc).reshape({}).contiguous();
  stride = 1;
  return t->to(P.acc).contiguous();
}

const void* row_ptr(const Tensor& t, int64_t r0, int64_t stride = 1) {
  if (!t.defined()) return nullptr;
  return static_cast<const char*>(t.data_ptr()) + r0 * stride * t.element_size();
}

// ---- the terms beyond the CE (kernels/terms_kernels.cu) ------------------------------------------
struct TermsRun {
  Tensor tl;              // teacher logits [N, V] in the student's dtype, or undefined
  Tensor th, tw, tb;      // teacher hidden / weight / bias in the student's dtype, or undefined
  Tensor adv, old, ref;   // policy inputs [N] in acc dtype, or undefined
  Tensor pw, ew;          // policy_weights / entropy_weights [N] in acc dtype, or undefined
  gpu::TermsParams tp;
};

TermsRun prepare_terms(const Linear& P, const TermArgs& ta) {
  TermsRun T;
  T.tp = terms_params(ta);
  if (ta.entropy_coef != 0.0 && ta.entropy_weights.has_value()) {
    T.ew = ta.entropy_weights->to(P.acc).contiguous();
  }
  if (ta.distill != 0) {
    if (ta.teacher_logits.has_value()) {
      T.tl = ta.teacher_logits->to(P.dt).contiguous();
    } else {
      T.th = ta.teacher_hidden->to(P.dt).contiguous();
      T.tw = ta.teacher_weight->to(P.dt).contiguous();
      if (ta.teacher_bias.has_value()) T.tb = ta.teacher_bias->to(P.dt).contiguous();
    }
  }
  if (ta.policy()) {
    T.adv = ta.advantages->to(P.acc).contiguous();
    if (ta.old_logprobs.has_value()) T.old = ta.old_logprobs->to(P.acc).contiguous();
    if (ta.kl_beta != 0.0) T.ref = ta.ref_logprobs->to(P.acc).contiguous();
    if (ta.policy_weights.has_value()) T.pw = ta.policy_weights->to(P.acc).contiguous();
  }
  return T;
}

// Whole-row chunks for the terms kernel: rows from the fast (or, when vocabulary tiles were asked
// for, the low-memory) budget, counting the teacher's logits chunk when it is computed here.
void choose_terms_chunk(Linear& P, const TermsRun& T, int64_t chunk_size, int64_t vocab_chunk_size) {
  P.tiled = false;
  P.Vt = P.V;
  const bool lowmem = vocab_chunk_size > 0 && vocab_chunk_size < P.V;
  const int64_t per_row =
      P.V * static_cast<int64_t>(at::elementSize(P.dt)) * (T.th.defined() ? 2 : 1);
  P.C = chunk_rows(P.N, chunk_size, budget_bytes(lowmem), per_row, /*balance=*/false);
}

// Per-row upstream gradients and outputs of one run of the terms kernel over all chunks.
struct TermsIO {
  Tensor g_tok;  // scalar (stride 0) or [N]; undefined = 1
  int64_t g_tok_stride = 0;
  Tensor g_lse, g_entropy, g_logprob;                  // [N] acc or undefined
  Tensor token_loss, lse, entropy, logprob, predicted;  // outputs or undefined
  Tensor mean_logit, log_sum_sq;                        // outputs or undefined / empty
};

void run_terms(Linear& P, TermsRun& T, Grads& G, const TermsIO& io) {
  if (P.N == 0) return;
  const auto opt = P.h.options();
  Tensor buf = at::empty({P.C * P.V}, opt);
  Tensor tbuf = T.th.defined() ? at::empty({P.C * P.V}, opt) : Tensor();
  auto out_ptr = [](const Tensor& t, int64_t r0) -> void* {
    return t.defined() && t.numel() > 0 ? static_cast<char*>(t.data_ptr()) + r0 * t.element_size()
                                        : nullptr;
  };
  for (int64_t r0 = 0; r0 < P.N; r0 += P.C) {
    const int64_t rows = std::min(P.C, P.N - r0);
    const Tensor hc = P.h.narrow(0, r0, rows);
    Tensor lg = logits_view(buf, rows, P.V);
    logits_gemm(P, lg, hc, 0, P.V);
    gpu::TermsArgs ta;
    ta.logits = lg.data_ptr();
    ta.ld = P.V;
    ta.rows = rows;
    if (T.tl.defined()) {
      ta.teacher = row_ptr(T.tl, r0, P.V);
      ta.ld_teacher = P.V;
    } else if (T.th.defined()) {
      Tensor tlg = logits_view(tbuf, rows, P.V);
      const Tensor thc = T.th.narrow(0, r0, rows);
      if (T.tb.defined()) {
        at::addmm_out(tlg, T.tb, thc, T.tw.t());
      } else {
        at::mm_out(tlg, thc, T.tw.t());
      }
      ta.teacher = tlg.data_ptr();
      ta.ld_teacher = P.V;
    }
    ta.target = P.tgt.data_ptr<int64_t>() + r0;
    ta.write_grad = G.any();
    ta.g_tok = row_ptr(io.g_tok, r0, io.g_tok_stride);
    ta.g_tok_stride = io.g_tok_stride;
    ta.g_lse = row_ptr(io.g_lse, r0);
    ta.g_entropy = row_ptr(io.g_entropy, r0);
    ta.g_logprob = row_ptr(io.g_logprob, r0);
    ta.token_loss = out_ptr(io.token_loss, r0);
    ta.lse = out_ptr(io.lse, r0);
    ta.entropy = out_ptr(io.entropy, r0);
    ta.logprob = out_ptr(io.logprob, r0);
    ta.mean_logit = out_ptr(io.mean_logit, r0);
    ta.log_sum_sq = out_ptr(io.log_sum_sq, r0);
    ta.predicted = io.predicted.defined() ? io.predicted.data_ptr<int64_t>() + r0 : nullptr;
    gpu::TermsParams tp = T.tp;
    tp.advantages = row_ptr(T.adv, r0);
    tp.old_logprobs = row_ptr(T.old, r0);
    tp.ref_logprobs = row_ptr(T.ref, r0);
    tp.policy_weights = row_ptr(T.pw, r0);
    tp.entropy_weights = row_ptr(T.ew, r0);
    check_launch(gpu::launch_row_terms(P.kd, ta, P.ep, tp, P.stream), "row_terms");
    if (G.any()) tile_gemms(P, G, lg, hc, r0, 0, P.V, true, r0 == 0);
  }
}

// Per-token float tensor [N] in acc dtype on the device; returns the element stride.
Tensor per_token(const Tensor& t, const Linear& P, int64_t& stride) {
  Tensor r = t.to(P.acc);
  if (r.dim() != 1) r = r.reshape({-1});
  stride = r.numel() <= 1 ? 0 : r.stride(0);
  return r;
}

// A float16 forward that computes gradients (Grads::f32_out): the row kernels' per-row coefficient
// coef = grad_scale / alpha, and scalars = {alpha, 0, 1} in float32 on the device for the GEMMs,
// which multiply alpha back in fp32 (no host sync: alpha stays on the device). alpha makes
// |coef| = prescale / bound at most: a mean's 1/N is not rounded into the fp16 gradient of the
// logits. For the CE (prescale 16, bound = max(1, logit_scale) * max(1, max |class weight|)), the
// logits' gradient is then at most ~16 (times 1 + 2 z_loss lse), far from fp16's 65504, and the
// small probabilities of a large vocabulary (~2^-17 at V = 128k) stay normal fp16 numbers, as in
// eager PyTorch under GradScaler's 2^16 (S / N = 2^3 at N = 8192). The other terms (prescale 1)
// have unbounded gradients (a policy ratio), so they only get the normalization.
void fp16_grad_scale(const Linear& P, const Tensor& gs, double prescale, Tensor& coef,
                     Tensor& scalars) {
  const auto f32 = P.h.options().dtype(at::kFloat);
  Tensor amax = !gs.defined() || gs.numel() == 0 ? at::ones({}, f32)
                : gs.dim() == 0                   ? gs.abs()
                                                  : gs.abs().amax();
  Tensor bound = amax;
  double pre = prescale;
  if (prescale != 1.0) {
    pre = prescale / std::max(1.0, std::abs(P.ep.logit_scale));
    if (P.cw.defined()) bound = bound * P.cw.abs().amax().clamp_min(1.0);
  }
  if (!gs.defined()) {
    // No grad_scale (a sum): the coefficient is pre / bound, so that coef * alpha == 1 exactly as
    // with a given scale (bound carries the class weights' largest magnitude).
    coef = (at::full({}, pre, f32) / bound).to(at::kFloat).contiguous();
  } else if (gs.numel() == 0) {
    coef = gs;
  } else {
    // A zero scale (a mean over no token) keeps zero gradients; a NaN one propagates through alpha.
    coef = at::where(amax > 0, gs * (pre / bound), at::zeros_like(gs)).contiguous();
  }
  const Tensor alpha = (bound / pre).to(at::kFloat).reshape({1});
  scalars = at::cat({alpha, at::zeros({1}, f32), at::ones({1}, f32)});
}

// mean=True: the denominator d and the gradient scale (0-d tensors in acc dtype) from one kernel,
// before the pass, so that the gradients the pass computes are already the mean's.
struct Mean {
  Tensor d, gs;
};

Mean mean_denominator(const Linear& P) {
  Mean m;
  m.d = at::empty({}, P.h.options().dtype(P.acc));
  m.gs = at::empty({}, P.h.options().dtype(P.acc));
  check_launch(gpu::launch_mean_denominator(kdtype(P.acc), P.tgt.data_ptr<int64_t>(), P.N,
                                            P.cw.defined() ? P.cw.data_ptr() : nullptr, P.V,
                                            P.ep.ignore_index, m.d.data_ptr(), m.gs.data_ptr(),
                                            P.stream),
               "mean_denominator");
  return m;
}

// The scalar `loss`: sum / d for a mean, else sum_i grad_scale[i] * token_loss[i].
Tensor final_loss(const Linear& P, const Tensor& token_loss, const Tensor& gs, const Mean& mean) {
  if (mean.d.defined()) {
    Tensor loss = at::empty({}, token_loss.options());
    check_launch(gpu::launch_mean_finish(kdtype(P.acc), token_loss.data_ptr(), P.N,
                                         mean.d.data_ptr(), loss.data_ptr(), P.stream),
                 "mean_finish");
    return loss;
  }
  return gs.defined() ? (token_loss * gs).sum() : token_loss.sum();
}

// ---- ops ----------------------------------------------------------------------------------------
Out11 loss_cuda(const Tensor& hidden, const Tensor& weight, const Tensor& target,
                const std::optional<Tensor>& bias, const std::optional<Tensor>& class_weight,
                const std::optional<Tensor>& grad_scale, int64_t ignore_index,
                double label_smoothing, double z_loss, double softcap, double logit_scale,
                std::array<bool, 3> grad_mask, int64_t chunk_size, int64_t vocab_chunk_size,
                bool fp32_grad_accum, bool mean, FUSEDCE_TERM_PARAMS) {
  c10::cuda::CUDAGuard guard(hidden.device());
  TermArgs targs = FUSEDCE_TERM_ARGS_STRUCT;
  Linear P;
  setup_linear(P, hidden, weight, target, bias, class_weight, ignore_index, label_smoothing,
               z_loss, softcap, logit_scale);
  targs.check(P.N, P.V, P.h);
  check_mean_args(mean, grad_scale);
  // The CE path's first logits GEMM goes to the GPU before the rest of the setup (the mean's
  // kernel, the outputs, the gradient buffers): at small N a synchronized step otherwise starts
  // with the GPU idle for that host work. Everything it needs is known here; the checks that
  // follow only throw, and a GEMM already queued into the scratch chunk is then harmless.
  Tensor buf;
  bool first_gemm_issued = false;
  if (!targs.any()) {
    choose_tiling(P, chunk_size, vocab_chunk_size, grad_mask[0]);
    if (P.N > 0) {
      buf = at::empty({P.C * P.Vt}, P.h.options());
      const int64_t rows = std::min(P.C, P.N), cols = std::min(P.Vt, P.V);
      Tensor lg = logits_view(buf, rows, cols);
      logits_gemm(P, lg, P.h.narrow(0, 0, rows), 0, cols);
      first_gemm_issued = true;
    }
  }
  int64_t gs_stride = 0;
  const Mean md = mean ? mean_denominator(P) : Mean{};
  const Tensor gs = mean ? md.gs : grad_scale_tensor(grad_scale, P, gs_stride);
  check_targets(P.tgt, P.V, ignore_index, P.stream);
  // The per-row gradient coefficient the row kernels apply (gs, or its normalized fp16 form).
  Tensor coef = gs, scalars;
  const bool any_grad = grad_mask[0] || grad_mask[1] || (grad_mask[2] && P.b.defined());
  if (P.dt == at::kHalf && any_grad) fp16_grad_scale(P, gs, targs.any() ? 1.0 : 16.0, coef, scalars);

  if (targs.any()) {
    TermsRun T = prepare_terms(P, targs);
    choose_terms_chunk(P, T, chunk_size, vocab_chunk_size);
    const auto opt = P.h.options();
    TermsIO io;
    io.g_tok = coef;
    io.g_tok_stride = gs_stride;
    io.token_loss = at::empty({P.N}, opt.dtype(P.acc));
    io.lse = at::empty({P.N}, opt.dtype(P.acc));
    io.predicted = at::empty({P.N}, opt.dtype(at::kLong));
    io.entropy = at::empty({targs.want_entropy ? P.N : 0}, opt.dtype(P.acc));
    io.logprob = at::empty({targs.want_logprob ? P.N : 0}, opt.dtype(P.acc));
    io.mean_logit = at::empty({targs.want_mean_logit ? P.N : 0}, opt.dtype(P.acc));
    io.log_sum_sq = at::empty({targs.want_log_sum_sq ? P.N : 0}, opt.dtype(P.acc));
    Grads G;
    init_grads(P, G, grad_mask, fp32_grad_accum, scalars);
    run_terms(P, T, G, io);
    Tensor loss = final_loss(P, io.token_loss, gs, md);
    auto [gh, gw, gb] = finish_grads(P, G);
    return {loss, io.token_loss, io.lse, io.predicted, io.entropy, io.logprob, gh, gw, gb,
            io.mean_logit, io.log_sum_sq};
  }
  const auto opt = P.h.options();
  Tensor token_loss = at::empty({P.N}, opt.dtype(P.acc));
  Tensor lse = at::empty({P.N}, opt.dtype(P.acc));
  Tensor predicted = at::empty({P.N}, opt.dtype(at::kLong));
  Grads G;
  init_grads(P, G, grad_mask, fp32_grad_accum, scalars);

  if (P.N > 0) {
    const bool fused = !P.tiled && G.any();
    Tensor state, state_idx;
    if (P.tiled) {
      state = at::empty({4, P.C}, opt.dtype(P.acc));
      state_idx = at::empty({P.C}, opt.dtype(at::kLong));
    }
    const int grid_limit = fused ? fused_grid_limit() : 0;
    for (int64_t r0 = 0; r0 < P.N; r0 += P.C) {
      const int64_t rows = std::min(P.C, P.N - r0);
      const Tensor hc = P.h.narrow(0, r0, rows);
      gpu::StatsArgs sa;
      sa.rows = rows;
      sa.target = P.tgt.data_ptr<int64_t>() + r0;
      sa.token_loss = static_cast<char*>(token_loss.data_ptr()) + r0 * token_loss.element_size();
      sa.lse = static_cast<char*>(lse.data_ptr()) + r0 * lse.element_size();
      sa.predicted = predicted.data_ptr<int64_t>() + r0;
      if (P.tiled) {
        const int64_t es = state.element_size();
        char* sp = static_cast<char*>(state.data_ptr());
        sa.state.m = sp;
        sa.state.s = sp + P.C * es;
        sa.state.wz = sp + 2 * P.C * es;
        sa.state.zt = sp + 3 * P.C * es;
        sa.state.idx = state_idx.data_ptr<int64_t>();
      }
      for (int64_t v0 = 0; v0 < P.V; v0 += P.Vt) {
        const int64_t cols = std::min(P.Vt, P.V - v0);
        Tensor lg = logits_view(buf, rows, cols);
        if (!(first_gemm_issued && r0 == 0 && v0 == 0)) logits_gemm(P, lg, hc, v0, cols);
        sa.logits = lg.data_ptr();
        sa.ld = cols;
        sa.col0 = v0;
        sa.cols = cols;
        sa.first_tile = v0 == 0;
        sa.last_tile = v0 + cols == P.V;
        sa.fused_grad = fused;
        sa.grad_scale = row_ptr(coef, r0, gs_stride);
        sa.grad_scale_stride = gs_stride;
        sa.grid_limit = grid_limit;
        check_launch(gpu::launch_row_stats(P.kd, sa, P.ep, P.stream), "row_stats");
        if (fused) tile_gemms(P, G, lg, hc, r0, 0, cols, true, r0 == 0);
      }
      if (P.tiled && G.any()) {
        grad_pass(P, G, buf, hc, r0, rows, sa.lse, row_ptr(coef, r0, gs_stride), gs_stride,
                  nullptr, 0, r0 == 0);
      }
    }
  }
  Tensor loss = final_loss(P, token_loss, gs, md);
  auto [gh, gw, gb] = finish_grads(P, G);
  // Two distinct empty outputs: the schema promises outputs that do not alias one another.
  return {loss,           token_loss, lse, predicted, at::empty({0}, opt.dtype(P.acc)),
          at::empty({0}, opt.dtype(P.acc)), gh, gw, gb, at::empty({0}, opt.dtype(P.acc)),
          at::empty({0}, opt.dtype(P.acc))};
}

Out3 loss_backward_cuda(const Tensor& hidden, const Tensor& weight, const Tensor& target,
                        const std::optional<Tensor>& bias,
                        const std::optional<Tensor>& class_weight, const Tensor& lse_in,
                        const Tensor& grad_token_loss, const std::optional<Tensor>& grad_lse,
                        const std::optional<Tensor>& grad_entropy,
                        const std::optional<Tensor>& grad_logprob, int64_t ignore_index,
                        double label_smoothing, double z_loss, double softcap, double logit_scale,
                        std::array<bool, 3> grad_mask, int64_t chunk_size,
                        int64_t vocab_chunk_size, bool fp32_grad_accum, FUSEDCE_TERM_PARAMS) {
  c10::cuda::CUDAGuard guard(hidden.device());
  TermArgs targs = FUSEDCE_TERM_ARGS_STRUCT;
  targs.without_statistics();
  Linear P;
  setup_linear(P, hidden, weight, target, bias, class_weight, ignore_index, label_smoothing,
               z_loss, softcap, logit_scale);
  targs.check(P.N, P.V, P.h);
  check_per_token(std::optional<Tensor>(lse_in), P.N, P.h, "lse");
  check_per_token(std::optional<Tensor>(grad_token_loss), P.N, P.h, "grad_token_loss");
  check_per_token(grad_lse, P.N, P.h, "grad_lse");
  check_per_token(grad_entropy, P.N, P.h, "grad_entropy");
  check_per_token(grad_logprob, P.N, P.h, "grad_logprob");
  TORCH_CHECK(!grad_entropy.has_value() || targs.entropy_needed(),
              "fusedce: grad_entropy needs want_entropy=True");
  TORCH_CHECK(!grad_logprob.has_value() || targs.want_logprob,
              "fusedce: grad_logprob needs want_logprob=True");
  check_targets(P.tgt, P.V, ignore_index, P.stream);

  if (targs.any()) {
    TermsRun T = prepare_terms(P, targs);
    choose_terms_chunk(P, T, chunk_size, vocab_chunk_size);
    auto acc = [&](const std::optional<Tensor>& t) {
      return t.has_value() ? t->to(P.acc).contiguous() : Tensor();
    };
    TermsIO io;
    io.g_tok = grad_token_loss.to(P.acc).contiguous();
    io.g_tok_stride = 1;
    io.g_lse = acc(grad_lse);
    io.g_entropy = acc(grad_entropy);
    io.g_logprob = acc(grad_logprob);
    Grads G;
    init_grads(P, G, grad_mask, fp32_grad_accum);
    if (G.any()) run_terms(P, T, G, io);
    return finish_grads(P, G);
  }
  choose_tiling(P, chunk_size, vocab_chunk_size, grad_mask[0]);
  const Tensor lse = lse_in.to(P.acc).contiguous();
  int64_t gt_stride = 0, gl_stride = 0;
  const Tensor gt = per_token(grad_token_loss, P, gt_stride);
  Tensor gl;
  if (grad_lse.has_value()) gl = per_token(*grad_lse, P, gl_stride);

  Grads G;
  init_grads(P, G, grad_mask, fp32_grad_accum);
  if (P.N > 0 && G.any()) {
    Tensor buf = at::empty({P.C * P.Vt}, P.h.options());
    const int64_t es = lse.element_size();
    for (int64_t r0 = 0; r0 < P.N; r0 += P.C) {
      const int64_t rows = std::min(P.C, P.N - r0);
      const Tensor hc = P.h.narrow(0, r0, rows);
      grad_pass(P, G, buf, hc, r0, rows, static_cast<const char*>(lse.data_ptr()) + r0 * es,
                static_cast<const char*>(gt.data_ptr()) + r0 * gt_stride * es, gt_stride,
                gl.defined() ? static_cast<const char*>(gl.data_ptr()) + r0 * gl_stride * es
                             : nullptr,
                gl_stride, r0 == 0);
    }
  }
  return finish_grads(P, G);
}

// fusedce::scale_: the precomputed gradients of a scalar loss times the upstream gradient, which
// is 1 after a plain loss.backward(): the kernel reads the scalar on the device and returns at
// once then (no host sync, no [V, H] read-modify-write).
void scale_cuda(const Tensor& self, const Tensor& scale) {
  TORCH_CHECK(scale.numel() == 1, "fusedce: scale must be a single value, got shape ",
              scale.sizes());
  check_same_device(scale, self, "scale", "self");
  c10::cuda::CUDAGuard guard(self.device());
  Tensor& out = const_cast<Tensor&>(self);
  const at::ScalarType dt = self.scalar_type();
  const bool supported = dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat ||
                         dt == at::kDouble;
  if (!supported || !self.is_contiguous()) {  // rare layouts: the plain (always-run) multiply
    out.mul_(scale.reshape({}));
    return;
  }
  if (self.numel() == 0) return;
  // The kernel reads the one value at data_ptr(), whatever its shape; a conversion only when the
  // dtype differs (each skipped no-op is a dispatch on the host, and this runs on every backward).
  const at::ScalarType acc = acc_type_of(dt);
  const Tensor s = scale.scalar_type() == acc ? scale : scale.to(acc);
  int sm_count = 0;  // a cheap attribute query (no sync); 0 lets the launcher assume 132
  if (cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, self.get_device()) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    sm_count = 0;
  }
  check_launch(gpu::launch_scale(kdtype(dt), self.data_ptr(), self.numel(), s.data_ptr(), sm_count,
                                 c10::cuda::getCurrentCUDAStream().stream()),
               "scale");
}

}  // namespace
}  // namespace cuda_impl
}  // namespace fusedce

TORCH_LIBRARY_IMPL(fusedce, CUDA, m) {
  m.impl("loss", &fusedce::cuda_impl::loss_cuda);
  m.impl("loss_backward", &fusedce::cuda_impl::loss_backward_cuda);
  m.impl("scale_", &fusedce::cuda_impl::scale_cuda);
}
