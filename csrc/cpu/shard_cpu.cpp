// CPU implementation of the vocab-parallel building blocks: the plain CE (fusedce::shard_stats,
// shard_grad_) and every other term (shard_partials, shard_jsd, shard_finish, shard_backward_):
// the row math of row_math.h and terms.h on one rank's shard of the logits, at a vocabulary
// offset, split at the per-row scalars (columns: ../shard_layout.h). No term is written here: the
// partials are accumulate_row + accumulate_ext, the finish is merge + row_loss + finish_ext, the
// gradient is row_backward_ext, as in the single-process op (loss_cpu.cpp).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../shard_layout.h"
#include "../terms_args.h"
#include "common.h"
#include "terms.h"

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


// ---------------------------------------------------------------------------------------------
// The term ops
// ---------------------------------------------------------------------------------------------

namespace sh = ::fusedce::shard;

// TermArgs of a shard op: the teacher is the only term tensor the per-shard ops take.
TermArgs shard_term_args(c10::ArrayRef<double> term_floats, c10::ArrayRef<int64_t> term_ints,
                         const std::optional<at::Tensor>& teacher_logits) {
  return TermArgs::unpack(term_floats, term_ints,
                          {teacher_logits, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                           std::nullopt, std::nullopt, std::nullopt, std::nullopt});
}

void check_coefs(const at::Tensor& coefs, const at::Tensor& logits) {
  check_float_tensor(coefs, "coefs");
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(0) == logits.size(0) && coefs.size(1) == sh::kCoefs,
              "fusedce: coefs must have shape [", logits.size(0), ", ", int(sh::kCoefs),
              "] (shard_finish's second output), got ", coefs.sizes());
  check_same_device(coefs, logits, "coefs", "logits");
}

// A local class index of a global target, -1 where this shard does not own it.
inline int64_t local_target(int64_t t, int64_t ignore_index, int64_t vocab_start, int64_t v) {
  const int64_t lt = t - vocab_start;
  return t != ignore_index && lt >= 0 && lt < v ? lt : -1;
}

at::Tensor shard_partials_cpu(const at::Tensor& logits, const at::Tensor& target,
                              int64_t vocab_start, const std::optional<at::Tensor>& class_weight,
                              const std::optional<at::Tensor>& teacher_logits,
                              int64_t ignore_index, double softcap, double logit_scale,
                              c10::ArrayRef<double> term_floats, c10::ArrayRef<int64_t> term_ints) {
  check_shard_args(logits, target, vocab_start, class_weight);
  check_scalars(0.0, 0.0, softcap, logit_scale);
  const TermArgs ta = shard_term_args(term_floats, term_ints, teacher_logits);
  ta.check(logits.size(0), logits.size(1), logits);
  const at::Tensor lg = logits.contiguous();
  const at::Tensor tgt = target.to(at::kLong).contiguous();
  const int64_t n = lg.size(0), v = lg.size(1);
  const auto acc = acc_type_of(lg.scalar_type());
  at::Tensor out = at::empty({n, sh::kParts}, lg.options().dtype(acc));
  const at::Tensor cw = class_weight.has_value() ? class_weight->to(acc).contiguous() : at::Tensor();
  const at::Tensor tb = ta.distill != 0 ? teacher_logits->to(acc).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lg.scalar_type(), "fusedce_shard_partials", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto ep = make_epilogue<acc_t>(cw, v, ignore_index, 0.0, 0.0, softcap, logit_scale);
    std::vector<at::Tensor> keep;
    const Terms<acc_t> tm = make_terms<acc_t>(ta, acc, keep);
    const scalar_t* lp = lg.data_ptr<scalar_t>();
    const acc_t* bp = tb.defined() ? tb.data_ptr<acc_t>() : nullptr;
    const int64_t* tp = tgt.data_ptr<int64_t>();
    acc_t* op = out.data_ptr<acc_t>();
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* row = lp + i * v;
        const int64_t lt = local_target(tp[i], ignore_index, vocab_start, v);
        RowStats<acc_t> st;
        accumulate_row<scalar_t, acc_t, /*kSoftmax=*/false>(ep, row, 0, v, lt, st);
        ExtSums x;
        accumulate_ext(ep, tm, row, bp ? bp + i * v : static_cast<const acc_t*>(nullptr), v, x);
        acc_t* o = op + i * sh::kParts;
        o[sh::kM] = static_cast<acc_t>(x.m);
        o[sh::kS] = static_cast<acc_t>(x.s);
        o[sh::kHz] = static_cast<acc_t>(x.hz);
        o[sh::kWz] = static_cast<acc_t>(st.weighted_sum);
        o[sh::kZt] = lt >= 0 ? st.target_logit : acc_t(0);
        o[sh::kWt] = lt >= 0 ? ep.weight_of(lt) : acc_t(0);
        // An empty shard offers no argmax: +inf never wins the finish's smallest-id rule.
        o[sh::kArgmax] = st.argmax >= 0 ? static_cast<acc_t>(vocab_start + st.argmax)
                                        : std::numeric_limits<acc_t>::infinity();
        o[sh::kSu] = static_cast<acc_t>(x.su);
        o[sh::kHuU] = static_cast<acc_t>(x.hu_u);
        o[sh::kHuY] = static_cast<acc_t>(x.hu_y);
        o[sh::kMy] = static_cast<acc_t>(x.my);
        o[sh::kSy] = static_cast<acc_t>(x.sy);
        o[sh::kHyY] = static_cast<acc_t>(x.hy_y);
        o[sh::kHyU] = static_cast<acc_t>(x.hy_u);
        o[sh::kSz] = static_cast<acc_t>(x.sz);
        o[sh::kS2] = static_cast<acc_t>(x.s2);
        o[sh::kWsum] = ep.class_weight_sum;
        o[sh::kV] = static_cast<acc_t>(v);
      }
    });
  });
  return out;
}

at::Tensor shard_jsd_cpu(const at::Tensor& logits, const at::Tensor& teacher_logits,
                         const at::Tensor& coefs, double softcap, double logit_scale,
                         c10::ArrayRef<double> term_floats, c10::ArrayRef<int64_t> term_ints) {
  check_float_tensor(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "fusedce: logits must be 2-D [N, V_local], got ", logits.sizes());
  check_scalars(0.0, 0.0, softcap, logit_scale);
  const TermArgs ta = shard_term_args(term_floats, term_ints, teacher_logits);
  TORCH_CHECK(ta.distill == 3, "fusedce: shard_jsd is the JSD's pass: term_ints' distill must be 3, got ",
              ta.distill);
  ta.check(logits.size(0), logits.size(1), logits);
  check_coefs(coefs, logits);
  const at::Tensor lg = logits.contiguous();
  const int64_t n = lg.size(0), v = lg.size(1);
  const auto acc = acc_type_of(lg.scalar_type());
  const at::Tensor tb = teacher_logits.to(acc).contiguous();
  const at::Tensor cf = coefs.to(acc).contiguous();
  at::Tensor out = at::empty({n, 2}, lg.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lg.scalar_type(), "fusedce_shard_jsd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto ep = make_epilogue<acc_t>(at::Tensor(), v, -100, 0.0, 0.0, softcap, logit_scale);
    std::vector<at::Tensor> keep;
    const Terms<acc_t> tm = make_terms<acc_t>(ta, acc, keep);
    const scalar_t* lp = lg.data_ptr<scalar_t>();
    const acc_t* bp = tb.data_ptr<acc_t>();
    const acc_t* cp = cf.data_ptr<acc_t>();
    acc_t* op = out.data_ptr<acc_t>();
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const acc_t* c = cp + i * sh::kCoefs;
        ExtSums x;
        accumulate_jsd(ep, tm, lp + i * v, bp + i * v, v, static_cast<double>(c[sh::kLseU]),
                       static_cast<double>(c[sh::kLseY]), x);
        op[2 * i] = static_cast<acc_t>(x.jsd);
        op[2 * i + 1] = static_cast<acc_t>(x.jsd_s);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> shard_finish_cpu(
    const at::Tensor& partials, const at::Tensor& target, const std::optional<at::Tensor>& jsd,
    const std::optional<at::Tensor>& g_token_loss, const std::optional<at::Tensor>& g_lse,
    const std::optional<at::Tensor>& g_entropy, const std::optional<at::Tensor>& g_logprob,
    int64_t ignore_index, double label_smoothing, double z_loss,
    const std::optional<at::Tensor>& old_logprobs, const std::optional<at::Tensor>& advantages,
    const std::optional<at::Tensor>& ref_logprobs, const std::optional<at::Tensor>& policy_weights,
    const std::optional<at::Tensor>& entropy_weights, c10::ArrayRef<double> term_floats,
    c10::ArrayRef<int64_t> term_ints) {
  TORCH_CHECK(partials.scalar_type() == at::kFloat || partials.scalar_type() == at::kDouble,
              "fusedce: partials must be float32 or float64 (shard_partials' output), got ",
              partials.scalar_type());
  TORCH_CHECK((partials.dim() == 2 || partials.dim() == 3) && partials.size(-1) == sh::kParts,
              "fusedce: partials must have shape [world, N, ", int(sh::kParts), "] or [N, ",
              int(sh::kParts), "], got ", partials.sizes());
  const at::Tensor P3 = (partials.dim() == 2 ? partials.unsqueeze(0) : partials).contiguous();
  const int64_t world = P3.size(0), n = P3.size(1);
  TORCH_CHECK(world > 0, "fusedce: partials must hold at least one rank's partials, got ",
              partials.sizes());
  check_target(target, n, partials);
  check_scalars(label_smoothing, z_loss, 0.0, 1.0);
  const TermArgs ta = TermArgs::unpack(
      term_floats, term_ints,
      {std::nullopt, std::nullopt, std::nullopt, std::nullopt, old_logprobs, advantages,
       ref_logprobs, policy_weights, entropy_weights});
  ta.check(n, 0, partials, /*with_teacher=*/false);
  if (jsd.has_value()) {
    TORCH_CHECK(ta.distill == 3, "fusedce: jsd is the JSD's second reduction (distill = 3), but distill = ",
                ta.distill);
    check_float_tensor(*jsd, "jsd");
    TORCH_CHECK(jsd->dim() == 2 && jsd->size(0) == n && jsd->size(1) == 2,
                "fusedce: jsd must have shape [", n, ", 2], got ", jsd->sizes());
    check_same_device(*jsd, partials, "jsd", "partials");
  }
  check_per_token(g_token_loss, n, partials, "g_token_loss");
  check_per_token(g_lse, n, partials, "g_lse");
  check_per_token(g_entropy, n, partials, "g_entropy");
  check_per_token(g_logprob, n, partials, "g_logprob");
  const auto acc = P3.scalar_type();
  const auto opts = P3.options();
  auto vec = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->to(acc).contiguous() : at::Tensor();
  };
  const at::Tensor tgt = target.to(at::kLong).contiguous();
  const at::Tensor J = vec(jsd), G = vec(g_token_loss), GL = vec(g_lse), GH = vec(g_entropy),
                   GP = vec(g_logprob);
  at::Tensor rows = at::empty({n, sh::kRows}, opts);
  at::Tensor coefs = at::empty({n, sh::kCoefs}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "fusedce_shard_finish", [&] {
    using acc_t = scalar_t;
    std::vector<at::Tensor> keep;
    const Terms<acc_t> tm = make_terms<acc_t>(ta, acc, keep);
    // The CE part's constants; the vocabulary, its class-weight sum and w_t come per row from
    // the partials (the ranks' shards together).
    Epilogue<acc_t> ep0{};
    ep0.logit_scale = 1;
    ep0.softcap = 0;
    ep0.inv_softcap = 0;
    ep0.eps = static_cast<acc_t>(label_smoothing);
    ep0.z_loss = static_cast<acc_t>(z_loss);
    ep0.ce_weight = static_cast<acc_t>(ta.ce_weight);
    ep0.class_weight = nullptr;
    ep0.ignore_index = ignore_index;
    auto ptr = [](const at::Tensor& t) -> const acc_t* {
      return t.defined() ? t.data_ptr<acc_t>() : nullptr;
    };
    const acc_t *pp = P3.data_ptr<acc_t>(), *jp = ptr(J), *gp = ptr(G), *glp = ptr(GL),
                *ghp = ptr(GH), *gpp = ptr(GP);
    const int64_t* tp = tgt.data_ptr<int64_t>();
    acc_t* rp = rows.data_ptr<acc_t>();
    acc_t* cp = coefs.data_ptr<acc_t>();
    const double inv_T = tm.inv_T;
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    // a few hundred flops per row: threads pay off only for many rows
    at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        // Merge the ranks' sums (terms.h's rule, as tiles of one row) and the CE's statistics.
        ExtSums st;
        double zt = 0, wt = 0, wz = 0, wsum = 0, vocab = 0;
        for (int64_t r = 0; r < world; ++r) {
          const acc_t* p = pp + (r * n + i) * sh::kParts;
          ExtSums x;
          x.m = p[sh::kM];
          x.s = p[sh::kS];
          x.hz = p[sh::kHz];
          x.su = p[sh::kSu];
          x.hu_u = p[sh::kHuU];
          x.hu_y = p[sh::kHuY];
          x.my = p[sh::kMy];
          x.sy = p[sh::kSy];
          x.hy_y = p[sh::kHyY];
          x.hy_u = p[sh::kHyU];
          x.sz = p[sh::kSz];
          x.s2 = p[sh::kS2];
          merge(st, x, inv_T);
          zt += p[sh::kZt];
          wt += p[sh::kWt];
          wz += p[sh::kWz];
          wsum += p[sh::kWsum];
          vocab += p[sh::kV];
        }
        // The first argmax: the smallest global id among the ranks holding the global maximum.
        double argmax = std::numeric_limits<double>::infinity();
        for (int64_t r = 0; r < world; ++r) {
          const acc_t* p = pp + (r * n + i) * sh::kParts;
          if (static_cast<double>(p[sh::kM]) == st.m) {
            argmax = std::min(argmax, static_cast<double>(p[sh::kArgmax]));
          }
        }
        if (jp) {
          st.jsd = jp[2 * i];
          st.jsd_s = jp[2 * i + 1];
        }
        RowStats<acc_t> base;
        base.max = static_cast<acc_t>(st.m);
        base.sumexp = st.s;
        base.target_logit = static_cast<acc_t>(zt);
        base.weighted_sum = wz;
        Epilogue<acc_t> ep = ep0;
        ep.vocab = static_cast<int64_t>(std::llround(vocab));
        ep.class_weight_sum = static_cast<acc_t>(wsum);

        const int64_t t = tp[i];
        const bool valid = t != ignore_index;
        const bool bad = valid && (t < 0 || t >= ep.vocab);  // owned by no rank: NaN, as on CUDA
        const acc_t w_t = static_cast<acc_t>(wt);
        const acc_t g = gp ? gp[i] : acc_t(0);
        const acc_t lse = base.lse();
        RowGrad<acc_t> rg = RowGrad<acc_t>::make(ep, lse, t, g, glp ? glp[i] : acc_t(0), w_t);
        const ExtRow<acc_t> er = finish_ext(tm, st, base, i, t, valid, static_cast<double>(g),
                                            ghp ? static_cast<double>(ghp[i]) : 0.0,
                                            gpp ? static_cast<double>(gpp[i]) : 0.0, rg);
        acc_t* o = rp + i * sh::kRows;
        o[sh::kTokenLoss] = bad ? nan : row_loss(ep, base, t, w_t) + static_cast<acc_t>(er.loss);
        o[sh::kLse] = lse;
        o[sh::kEntropy] = static_cast<acc_t>(er.entropy);
        o[sh::kLogprob] = bad ? nan : static_cast<acc_t>(er.logprob);
        o[sh::kPredicted] = valid ? static_cast<acc_t>(argmax) : acc_t(-1);
        o[sh::kMeanLogit] = static_cast<acc_t>(st.sz / vocab);
        // log sum p^2 = log(s2) - 2 log(s), both sums relative to the same maximum
        o[sh::kLogSumSq] = tm.moments ? static_cast<acc_t>(std::log(st.s2) - 2.0 * std::log(st.s))
                                      : acc_t(0);
        o[sh::kWeightAtTarget] = valid ? w_t : acc_t(0);
        acc_t* c = cp + i * sh::kCoefs;
        c[sh::kCoefP] = bad ? nan : rg.coef_p;
        c[sh::kCoefT] = rg.coef_t;
        c[sh::kCoefW] = rg.coef_w;
        c[sh::kCoefE] = static_cast<acc_t>(er.grad.coef_e);
        c[sh::kLam] = static_cast<acc_t>(er.grad.lam);
        c[sh::kCoefLse] = rg.lse;
        // every row's (not only the non-ignored ones'): shard_jsd reads them on every row
        c[sh::kLseU] = tm.distill != kNoDistill ? static_cast<acc_t>(lse_u_of(st, inv_T)) : acc_t(0);
        c[sh::kLseY] = tm.distill != kNoDistill ? static_cast<acc_t>(lse_y_of(st)) : acc_t(0);
        c[sh::kDiv] = static_cast<acc_t>(er.grad.rkl);
        c[sh::kJsdS] = static_cast<acc_t>(er.grad.jsd_s);
      }
    });
  });
  return {rows, coefs};
}

void shard_backward_cpu(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                        const at::Tensor& coefs, const std::optional<at::Tensor>& class_weight,
                        const std::optional<at::Tensor>& teacher_logits, int64_t ignore_index,
                        double softcap, double logit_scale, c10::ArrayRef<double> term_floats,
                        c10::ArrayRef<int64_t> term_ints) {
  check_shard_args(logits, target, vocab_start, class_weight);
  check_scalars(0.0, 0.0, softcap, logit_scale);
  TORCH_CHECK(logits.is_contiguous(),
              "fusedce: shard_backward_ needs contiguous logits (it writes in place)");
  const TermArgs ta = shard_term_args(term_floats, term_ints, teacher_logits);
  const int64_t n = logits.size(0), v = logits.size(1);
  ta.check(n, v, logits);
  check_coefs(coefs, logits);
  const auto acc = acc_type_of(logits.scalar_type());
  const at::Tensor tgt = target.to(at::kLong).contiguous();
  const at::Tensor cf = coefs.to(acc).contiguous();
  const at::Tensor cw = class_weight.has_value() ? class_weight->to(acc).contiguous() : at::Tensor();
  const at::Tensor tb = ta.distill != 0 ? teacher_logits->to(acc).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fusedce_shard_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto ep = make_epilogue<acc_t>(cw, v, ignore_index, 0.0, 0.0, softcap, logit_scale);
    std::vector<at::Tensor> keep;
    const Terms<acc_t> tm = make_terms<acc_t>(ta, acc, keep);
    scalar_t* lp = const_cast<at::Tensor&>(logits).data_ptr<scalar_t>();
    const acc_t* bp = tb.defined() ? tb.data_ptr<acc_t>() : nullptr;
    const acc_t* cp = cf.data_ptr<acc_t>();
    const int64_t* tp = tgt.data_ptr<int64_t>();
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const acc_t* c = cp + i * sh::kCoefs;
        RowGrad<acc_t> rg{c[sh::kCoefLse], c[sh::kCoefP], c[sh::kCoefW], c[sh::kCoefT],
                          local_target(tp[i], ignore_index, vocab_start, v)};
        ExtGrad<acc_t> eg;
        eg.coef_e = c[sh::kCoefE];
        eg.lam = c[sh::kLam];
        eg.lse_u = c[sh::kLseU];
        eg.lse_y = c[sh::kLseY];
        eg.rkl = c[sh::kDiv];
        eg.jsd_s = c[sh::kJsdS];
        scalar_t* row = lp + i * v;
        row_backward_ext(ep, tm, rg, eg, row, bp ? bp + i * v : static_cast<const acc_t*>(nullptr),
                         0, v, row);
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
  m.impl("shard_partials", &fusedce::cpu::shard_partials_cpu);
  m.impl("shard_jsd", &fusedce::cpu::shard_jsd_cpu);
  m.impl("shard_finish", &fusedce::cpu::shard_finish_cpu);
  m.impl("shard_backward_", &fusedce::cpu::shard_backward_cpu);
}
