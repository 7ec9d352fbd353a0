// The packed per-row tensors of the vocab-parallel term ops (fusedce::shard_partials, shard_jsd,
// shard_finish, shard_backward_ in csrc/fusedce.cpp): column indices shared by the CPU driver,
// the CUDA kernels and fusedce/_parallel.py (which reads them from _C.shard_layout()). Plain C++:
// the kernels under csrc/cuda/kernels/ include it.
//
// The partials are csrc/cpu/terms.h's ExtSums of one rank's shard, each relative to that rank's
// own maxima (m of z, my of the teacher's y), so that shard_finish merges the ranks with terms.h's
// rescale rule, exactly as the single-process kernels merge tiles of one row.
#pragma once

namespace fusedce {
namespace shard {

// shard_partials -> [N, kParts] in the accumulation dtype
enum Part : int {
  kM = 0,    // max z over the shard (-inf: no finite logit)
  kS,        // sum e^(z - m)
  kHz,       // sum e^(z - m) (z - m)           (entropy)
  kWz,       // sum_c w_c z_c                     (label smoothing; w = 1 without class weights)
  kZt,       // z at the target when this shard owns it, else 0
  kWt,       // w at the target when this shard owns it, else 0
  kArgmax,   // the first argmax as a global id (ranks hold ascending vocabulary ranges)
  kSu,       // sum e^(u - mu), u = z / T, mu = m / T  (distillation; 0 when off)
  kHuU,      // sum e^(u - mu) (u - mu)
  kHuY,      // sum e^(u - mu) (y - my)
  kMy,       // max of the teacher's y = b / T (-inf when off)
  kSy,       // sum e^(y - my)
  kHyY,      // sum e^(y - my) (y - my)
  kHyU,      // sum e^(y - my) (u - mu)
  kSz,       // sum z                              (mean_logit; 0 unless want_mean_logit)
  kS2,       // sum e^(2 (z - m))                  (log_sum_sq_prob; 0 unless want_log_sum_sq)
  kWsum,     // sum_c w_c over the shard (the shard's width without class weights)
  kV,        // the shard's width
  kParts
};

// shard_finish -> rows [N, kRows] (the per-row outputs of fusedce::loss, merged over the ranks)
enum Row : int {
  kTokenLoss = 0,  // 0 at ignored rows; NaN at an out-of-range target
  kLse,
  kEntropy,
  kLogprob,        // 0 at ignored rows
  kPredicted,      // the global argmax as a float id; -1 at ignored rows
  kMeanLogit,
  kLogSumSq,
  kWeightAtTarget, // w_t at non-ignored rows, else 0 (the weighted mean's denominator)
  kRows
};

// shard_finish -> coefs [N, kCoefs]; shard_backward_ writes, per local class j of the row,
//   d/dz_j = coef_p p_j - coef_w w_j - [j == target] coef_t + coef_e p_j (z_j - lse)
//            + lam * (the distillation term at j, from lse_u, lse_y, div, jsd_s)
// times dz/da (softcap, logit_scale). shard_jsd reads lse_u and lse_y.
enum Coef : int {
  kCoefP = 0,
  kCoefT,
  kCoefW,
  kCoefE,
  kLam,
  kCoefLse,
  kLseU,
  kLseY,
  kDiv,
  kJsdS,
  kCoefs
};

}  // namespace shard
}  // namespace fusedce
