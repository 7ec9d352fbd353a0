// The opt-in target validation mode (fusedce.validate_targets(), FUSEDCE_VALIDATE=1).
//
// By default a CUDA call never reads the targets back on the host (that is a host sync per call);
// an out-of-range target instead gives a NaN token loss and gradient in the kernels themselves
// (csrc/cuda/kernels/epilogue.cuh). In validation mode the CUDA driver checks the targets on the
// host first and raises with the first bad index and its value. The CPU always checks (free there).
#pragma once

#include <atomic>
#include <cstdlib>

namespace fusedce {

// Open fusedce.validate_targets() blocks, process-wide (one definition across translation units).
inline std::atomic<int>& validate_depth() {
  static std::atomic<int> depth{0};
  return depth;
}

// Read on every call, not cached: a test or a launcher may set the variable after import.
inline bool validate_env() {
  const char* s = std::getenv("FUSEDCE_VALIDATE");
  return s != nullptr && *s != '\0' && !(s[0] == '0' && s[1] == '\0');
}

inline bool validation_enabled() {
  return validate_depth().load(std::memory_order_relaxed) > 0 || validate_env();
}

}  // namespace fusedce
