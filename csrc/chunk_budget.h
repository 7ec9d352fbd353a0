// Chunk sizes of the fused loss, for the CPU and the CUDA drivers alike: how many token rows a chunk
// takes when chunk_size = 0 (from a memory budget), and how wide a vocabulary tile is. Each backend
// passes its own budget and bytes per row (csrc/cpu/loss_cpu.cpp, csrc/cuda/loss_cuda.cpp).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace fusedce {

inline void check_chunk_args(int64_t chunk_size, int64_t vocab_chunk_size) {
  TORCH_CHECK(chunk_size >= 0, "fusedce: chunk_size must be >= 0 (0 = automatic), got ",
              chunk_size);
  TORCH_CHECK(vocab_chunk_size >= 0,
              "fusedce: vocab_chunk_size must be >= 0 (0 = whole vocabulary), got ",
              vocab_chunk_size);
}

// Columns of a vocabulary tile: vocab_chunk_size > 0 tiles the vocabulary (low-memory mode), else
// the whole row.
inline int64_t vocab_tile(int64_t vocab, int64_t vocab_chunk_size) {
  return vocab_chunk_size > 0 ? std::min(vocab_chunk_size, vocab) : vocab;
}

// Rows of a chunk over n token rows: chunk_size when given, else as many rows of per_row_bytes as
// budget_bytes holds; at least 1, at most n. With balance, when the rows need several chunks they
// are spread evenly over them (no short last chunk) and rounded up to a multiple of 64 rows when
// that stays inside the budget (the CUDA GEMMs' tile height).
inline int64_t chunk_rows(int64_t n, int64_t chunk_size, int64_t budget_bytes,
                          int64_t per_row_bytes, bool balance) {
  n = std::max<int64_t>(n, 1);
  if (chunk_size > 0) return std::min(chunk_size, n);
  const int64_t cmax = std::max<int64_t>(1, budget_bytes / per_row_bytes);
  if (cmax >= n) return n;
  if (!balance) return cmax;
  const int64_t chunks = (n + cmax - 1) / cmax;
  const int64_t c = (n + chunks - 1) / chunks;
  const int64_t c64 = (c + 63) / 64 * 64;
  return c64 <= cmax ? c64 : c;
}

}  // namespace fusedce
