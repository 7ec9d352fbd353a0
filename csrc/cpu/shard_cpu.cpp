// CPU implementation of the vocab-parallel building blocks (fusedce::shard_stats, shard_grad_):
// the row math of row_math.h on one rank's shard of the logits, at a vocabulary offset.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>

#include "../checks.h"
#include "common.h"

namespace fusedce {
namespace cpu {
namespace {

template <typename acc_t>
Epilogue<acc_t> shard_epilogue(double softcap, double logit_scale) {
  Epilogue<acc_t> ep{};
  ep.logit_scale = static_cast<acc_t>(logit_scale);
  ep.softcap = static_cast<acc_t>(softcap);
  ep.inv_softcap = softcap > 0 ? static_cast<acc_t>(1.0 / softcap) : acc_t(0);
  ep.class_weight = nullptr;
  return ep;
}

at::Tensor shard_stats_cpu(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                           const std::optional<at::Tensor>& class_weight, int64_t ignore_index,
                           double softcap, double logit_scale) {
  check_shard_args(logits, target, vocab_start, class_weight);
  check_scalars(0.0, 0.0, softcap, logit_scale);
  const at::Tensor lg = logits.contiguous();
  const at::Tensor tgt = target.to(at::kLong).contiguous();
  const int64_t n = lg.size(0), v = lg.size(1);
  const auto acc = acc_type_of(lg.scalar_type());
  at::Tensor out = at::empty({n, 6}, lg.options().dtype(acc));
  const at::Tensor cw = class_weight.has_value() ? class_weight->to(acc).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lg.scalar_type(), "fusedce_shard_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto ep = shard_epilogue<acc_t>(softcap, logit_scale);
    const scalar_t* lp = lg.data_ptr<scalar_t>();
    const int64_t* tp = tgt.data_ptr<int64_t>();
    const acc_t* wp = cw.defined() ? cw.data_ptr<acc_t>() : nullptr;
    acc_t* op = out.data_ptr<acc_t>();
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* row = lp + i * v;
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        int64_t am = 0;
        for (int64_t j = 0; j < v; ++j) {
          const acc_t z = ep.final_logit(static_cast<acc_t>(row[j]));
          if (z > m) {  // the first index among equal maxima, as torch.argmax
            m = z;
            am = j;
          }
        }
        double s = 0, wz = 0;
        for (int64_t j = 0; j < v; ++j) {
          const acc_t z = ep.final_logit(static_cast<acc_t>(row[j]));
          if (z != -std::numeric_limits<acc_t>::infinity()) s += std::exp(static_cast<double>(z - m));
          wz += static_cast<double>((wp ? wp[j] : acc_t(1)) * z);
        }
        const int64_t t = tp[i], lt = t - vocab_start;
        const bool owned = t != ignore_index && lt >= 0 && lt < v;
        acc_t* o = op + i * 6;
        o[0] = m;
        o[1] = static_cast<acc_t>(s);
        o[2] = static_cast<acc_t>(wz);
        o[3] = owned ? ep.final_logit(static_cast<acc_t>(row[lt])) : acc_t(0);
        o[4] = owned ? (wp ? wp[lt] : acc_t(1)) : acc_t(0);
        o[5] = static_cast<acc_t>(vocab_start + am);
      }
    });
  });
  return out;
}

void shard_grad_cpu(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                    const std::optional<at::Tensor>& class_weight, const at::Tensor& lse,
                    const at::Tensor& coef_p, const at::Tensor& coef_t,
                    const std::optional<at::Tensor>& coef_w, int64_t ignore_index, double softcap,
                    double logit_scale) {
  check_shard_args(logits, target, vocab_start, class_weight);
  check_scalars(0.0, 0.0, softcap, logit_scale);
  const int64_t n = logits.size(0), v = logits.size(1);
  check_per_token(lse, n, logits, "lse");
  check_per_token(coef_p, n, logits, "coef_p");
  check_per_token(coef_t, n, logits, "coef_t");
  check_per_token(coef_w, n, logits, "coef_w");
  TORCH_CHECK(logits.is_contiguous(), "fusedce: shard_grad_ needs contiguous logits (it writes in place)");
  const auto acc = acc_type_of(logits.scalar_type());
  const at::Tensor tgt = target.to(at::kLong).contiguous();
  auto vec = [&](const at::Tensor& t) { return t.to(acc).contiguous(); };
  const at::Tensor L = vec(lse), P = vec(coef_p), T = vec(coef_t);
  const at::Tensor W = coef_w.has_value() ? vec(*coef_w) : at::Tensor();
  const at::Tensor cw = class_weight.has_value() ? class_weight->to(acc).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fusedce_shard_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto ep = shard_epilogue<acc_t>(softcap, logit_scale);
    scalar_t* lp = const_cast<at::Tensor&>(logits).data_ptr<scalar_t>();
    const int64_t* tp = tgt.data_ptr<int64_t>();
    const acc_t *lsp = L.data_ptr<acc_t>(), *pp = P.data_ptr<acc_t>(), *ttp = T.data_ptr<acc_t>();
    const acc_t* wcp = W.defined() ? W.data_ptr<acc_t>() : nullptr;
    const acc_t* wp = cw.defined() ? cw.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        scalar_t* row = lp + i * v;
        const int64_t lt = tp[i] == ignore_index ? -1 : tp[i] - vocab_start;
        const acc_t cwi = wcp ? wcp[i] : acc_t(0);
        for (int64_t j = 0; j < v; ++j) {
          const acc_t z = ep.final_logit(static_cast<acc_t>(row[j]));
          acc_t dz = pp[i] * std::exp(z - lsp[i]);
          if (cwi != 0) dz -= cwi * (wp ? wp[j] : acc_t(1));
          if (j == lt) dz -= ttp[i];
          row[j] = static_cast<scalar_t>(dz * ep.dz_da(z));
        }
      }
    });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace fusedce

TORCH_LIBRARY_IMPL(fusedce, CPU, m) {
  m.impl("shard_stats", &fusedce::cpu::shard_stats_cpu);
  m.impl("shard_grad_", &fusedce::cpu::shard_grad_cpu);
}
