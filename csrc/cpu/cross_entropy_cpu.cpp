// CPU implementation of the terms on given logits (fusedce::cross_entropy and its backwards).
// Each row is read in its own dtype and converted on the fly: no [N, V] temporary.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../checks.h"
#include "common.h"

namespace fusedce {
namespace cpu {
namespace {

struct LogitsProblem {
  at::Tensor logits, target, class_weight;  // contiguous; class_weight in acc dtype or undefined
  int64_t n, v;
  at::ScalarType acc;

  LogitsProblem(const at::Tensor& logits_, const at::Tensor& target_,
                const std::optional<at::Tensor>& class_weight_, int64_t ignore_index) {
    check_logits_args(logits_, target_, class_weight_);
    acc = acc_type_of(logits_.scalar_type());
    n = logits_.size(0);
    v = logits_.size(1);
    logits = logits_.contiguous();
    target = target_.to(at::kLong).contiguous();
    if (class_weight_.has_value()) class_weight = class_weight_->to(acc).contiguous();
    check_targets_in_range(target, v, ignore_index);
  }
};

// mean=True: csrc/cuda/kernels/mean.cu's mean_after_kernel in token order. Both sums in double:
// d over the non-ignored targets (class_weight[t], 1 each without class weights, 0 for t outside
// [0, V)) rounded to acc_t, and the token losses; loss = sum / d (nan or +-inf when d == 0),
// grad_scale = 1 / d (0 when d == 0).
template <typename acc_t>
void mean_after(const LogitsProblem& P, const at::Tensor& token_loss, int64_t ignore_index,
                at::Tensor& loss, at::Tensor& grad_scale) {
  const int64_t* t = P.target.data_ptr<int64_t>();
  const acc_t* cw = P.class_weight.defined() ? P.class_weight.data_ptr<acc_t>() : nullptr;
  const acc_t* l = token_loss.data_ptr<acc_t>();
  double s = 0.0, sl = 0.0;
  for (int64_t i = 0; i < P.n; ++i) {
    sl += static_cast<double>(l[i]);
    if (t[i] == ignore_index) continue;
    if (cw == nullptr) {
      s += 1.0;
    } else if (t[i] >= 0 && t[i] < P.v) {
      s += static_cast<double>(cw[t[i]]);
    }
  }
  const acc_t d = static_cast<acc_t>(s);
  *loss.data_ptr<acc_t>() = static_cast<acc_t>(sl / static_cast<double>(d));
  *grad_scale.data_ptr<acc_t>() = d != acc_t(0) ? acc_t(1) / d : acc_t(0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_cpu(
    const at::Tensor& logits, const at::Tensor& target,
    const std::optional<at::Tensor>& class_weight, int64_t ignore_index, double label_smoothing,
    double z_loss, double softcap, double logit_scale, bool inplace_backward, bool mean) {
  (void)inplace_backward;  // read by the autograd formula only
  check_scalars(label_smoothing, z_loss, softcap, logit_scale);
  const LogitsProblem P(logits, target, class_weight, ignore_index);
  const auto accopts = logits.options().dtype(P.acc);
  at::Tensor token_loss = at::empty({P.n}, accopts);
  at::Tensor lse = at::empty({P.n}, accopts);
  at::Tensor predicted = at::empty({P.n}, logits.options().dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, P.logits.scalar_type(),
                                  "fusedce_cross_entropy_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto ep = make_epilogue<acc_t>(P.class_weight, P.v, ignore_index, label_smoothing,
                                         z_loss, softcap, logit_scale);
    const scalar_t* lp = P.logits.data_ptr<scalar_t>();
    const int64_t* tgt = P.target.data_ptr<int64_t>();
    acc_t* tl = token_loss.data_ptr<acc_t>();
    acc_t* ls = lse.data_ptr<acc_t>();
    int64_t* pr = predicted.data_ptr<int64_t>();
    at::parallel_for(0, P.n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        RowStats<acc_t> st;
        accumulate_row<scalar_t, acc_t>(ep, lp + i * P.v, 0, P.v, tgt[i], st);
        ls[i] = st.lse();
        tl[i] = row_loss(ep, st, tgt[i]);
        pr[i] = tgt[i] == ignore_index ? -1 : st.argmax;
      }
    });
  });
  at::Tensor loss = mean ? at::empty({}, accopts) : at::empty({0}, accopts);
  at::Tensor grad_scale = mean ? at::empty({}, accopts) : at::empty({0}, accopts);
  if (mean) {
    AT_DISPATCH_FLOATING_TYPES(P.acc, "fusedce_cross_entropy_cpu_mean", [&] {
      mean_after<scalar_t>(P, token_loss, ignore_index, loss, grad_scale);
    });
  }
  return {token_loss, lse, predicted, loss, grad_scale};
}

// Writes the gradient of the rows of P.logits into `out` (which may be P.logits itself).
void backward_into(const LogitsProblem& P, at::Tensor& out, const at::Tensor& lse,
                   const at::Tensor& grad_token_loss, const std::optional<at::Tensor>& grad_lse,
                   int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
                   double logit_scale) {
  check_per_token(lse, P.n, P.logits, "lse");
  check_per_token(grad_token_loss, P.n, P.logits, "grad_token_loss");
  check_per_token(grad_lse, P.n, P.logits, "grad_lse");
  const at::Tensor lse_acc = lse.to(P.acc).contiguous();
  const at::Tensor g_acc = grad_token_loss.to(P.acc).contiguous();
  const at::Tensor glse_acc =
      grad_lse.has_value() ? grad_lse->to(P.acc).contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, P.logits.scalar_type(),
                                  "fusedce_cross_entropy_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto ep = make_epilogue<acc_t>(P.class_weight, P.v, ignore_index, label_smoothing,
                                         z_loss, softcap, logit_scale);
    const scalar_t* lp = P.logits.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t* tgt = P.target.data_ptr<int64_t>();
    const acc_t* ls = lse_acc.data_ptr<acc_t>();
    const acc_t* g = g_acc.data_ptr<acc_t>();
    const acc_t* gl = glse_acc.defined() ? glse_acc.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, P.n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const auto rg = RowGrad<acc_t>::make(ep, ls[i], tgt[i], g[i], gl ? gl[i] : acc_t(0));
        row_backward<scalar_t, acc_t, scalar_t>(ep, rg, lp + i * P.v, 0, P.v, op + i * P.v);
      }
    });
  });
}

at::Tensor cross_entropy_backward_cpu(const at::Tensor& logits, const at::Tensor& target,
                                      const std::optional<at::Tensor>& class_weight,
                                      const at::Tensor& lse, const at::Tensor& grad_token_loss,
                                      const std::optional<at::Tensor>& grad_lse,
                                      int64_t ignore_index, double label_smoothing, double z_loss,
                                      double softcap, double logit_scale) {
  check_scalars(label_smoothing, z_loss, softcap, logit_scale);
  const LogitsProblem P(logits, target, class_weight, ignore_index);
  at::Tensor out = at::empty_like(P.logits);
  backward_into(P, out, lse, grad_token_loss, grad_lse, ignore_index, label_smoothing, z_loss,
                softcap, logit_scale);
  return out;
}

void cross_entropy_backward_inplace_cpu(const at::Tensor& logits, const at::Tensor& target,
                                        const std::optional<at::Tensor>& class_weight,
                                        const at::Tensor& lse, const at::Tensor& grad_token_loss,
                                        const std::optional<at::Tensor>& grad_lse,
                                        int64_t ignore_index, double label_smoothing,
                                        double z_loss, double softcap, double logit_scale) {
  check_scalars(label_smoothing, z_loss, softcap, logit_scale);
  const LogitsProblem P(logits, target, class_weight, ignore_index);
  // A non-contiguous input was copied by LogitsProblem: compute there, then write back.
  at::Tensor out = P.logits;
  backward_into(P, out, lse, grad_token_loss, grad_lse, ignore_index, label_smoothing, z_loss,
                softcap, logit_scale);
  if (!out.is_same(logits)) const_cast<at::Tensor&>(logits).copy_(out);
}

}  // namespace
}  // namespace cpu
}  // namespace fusedce

TORCH_LIBRARY_IMPL(fusedce, CPU, m) {
  m.impl("cross_entropy", &fusedce::cpu::cross_entropy_cpu);
  m.impl("cross_entropy_backward", &fusedce::cpu::cross_entropy_backward_cpu);
  m.impl("cross_entropy_backward_", &fusedce::cpu::cross_entropy_backward_inplace_cpu);
}
