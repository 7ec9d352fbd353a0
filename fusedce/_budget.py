"""``memory_budget=``: the chunking of one fused call from a bound on its transient bytes.

The C++ drivers pick their token chunk from a fixed budget (csrc/chunk_budget.h; CPU 64 MiB,
CUDA 1 GiB in fast mode and 64 MiB with vocabulary tiles, env-overridable there). A call with
``memory_budget`` instead gets an explicit ``chunk_size`` (and, when even a block of whole
vocabulary rows does not fit, a ``vocab_chunk_size``) computed here, so the drivers run exactly
the chunks planned here and no C++ change is needed for a per-call budget.

The byte accounting is the drivers' own, mirrored once in `driver_row_bytes` (what each driver
counts per token row when it fills its budget: csrc/cpu/loss_cpu.cpp `choose_tiling`,
csrc/cuda/loss_cuda.cpp `choose_tiling` / `choose_terms_chunk`) plus `extra_row_bytes`, the
per-chunk buffers a driver allocates beside the counted one but leaves out of its own count. The
mirror is pinned by tests/test_memory_budget.py against the chunks the C++ ops actually run
(the logits GEMMs' shapes, seen by the profiler) at the drivers' own budgets, and `chunk_rows`
against csrc/chunk_budget.h itself.

What the budget bounds: the buffers that scale with the chunk (logits chunk or tile, its
gradient written in place, the float32 grad_input chunk of tiled half-precision calls, the
teacher's logits chunk, the per-row softmax state). Not bounded: the inputs, the outputs and the
gradients (grad_input [N, H], grad_weight [V, H]), the float32 weight-gradient accumulator of
``fp32_grad_accum`` / float16, the CPU's float32 copy of a half-precision weight, the cuBLAS
workspace, and a few scalars per row kept on the host by the CPU driver.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Tiles narrower than this are refused rather than planned: each tile costs a GEMM launch and a
# row-kernel launch per chunk, so a narrower tile is launch-bound, not memory-bound.
MIN_VOCAB_TILE = 128
# Fast mode (whole vocabulary rows, no recompute) is kept while the budget holds this many rows
# (or all of them). Below it the grad_weight GEMM (K = rows per chunk) reads and writes the whole
# [V, H] gradient for few flops per byte and turns memory-bound, while tiles cost one more logits
# GEMM (+1/3 of the work) at any size. The threshold is a flop/byte estimate, not a measurement:
# `python -m benchmarks budget` times both modes at each budget to check it.
FAST_MIN_ROWS = 256
# Tiled mode aims at this many rows per chunk (then widens the tile as the budget allows): the
# grad_weight GEMM's K, large enough that its read-modify-write of [Vt, H] is amortized.
TILED_ROWS = 1024
_TILE_ALIGN = 128  # tile widths: a multiple of the GEMMs' column tile
_HALF = (torch.float16, torch.bfloat16)


class ChunkPlan(NamedTuple):
    """chunk_size rows per chunk, vocab_chunk_size columns per tile (0: whole rows), and the
    transient bytes the plan holds at most (chunk_size * its bytes per row)."""

    chunk_size: int
    vocab_chunk_size: int
    bytes: int


def chunk_rows(n: int, budget: int, per_row: int, balance: bool) -> int:
    """csrc/chunk_budget.h `chunk_rows` with chunk_size = 0: rows of `per_row` bytes that
    `budget` holds (>= 1, <= n); with `balance` (the CUDA driver's) spread evenly over the chunks
    and rounded up to 64 rows when that stays inside the budget."""
    n = max(n, 1)
    cmax = max(1, budget // max(per_row, 1))
    if cmax >= n:
        return n
    if not balance:
        return cmax
    chunks = -(-n // cmax)
    c = -(-n // chunks)
    c64 = -(-c // 64) * 64
    return c64 if c64 <= cmax else c


def _acc_bytes(dtype: torch.dtype) -> int:
    return 8 if dtype == torch.float64 else 4


def driver_row_bytes(device_type: str, dtype: torch.dtype, vocab: int, hidden: int,
                     vocab_tile: int = 0, *, need_grad_input: bool = True, terms: bool = False,
                     teacher: str | None = None) -> int:
    """Bytes per token row that the C++ driver of `device_type` counts against its budget.

    vocab_tile: columns of a vocabulary tile (0 or >= vocab: whole rows). terms: a call with
    terms beyond the plain CE (the CUDA driver's whole-row terms kernel). teacher: "head" (the
    teacher's logits computed chunk by chunk) or "logits" (given) or None."""
    vt = vocab if vocab_tile <= 0 or vocab_tile >= vocab else vocab_tile
    if device_type == "cuda":
        elt = dtype.itemsize  # the logits chunk is in the input dtype
        if terms:
            return vocab * elt * (2 if teacher == "head" else 1)
        if vt < vocab:
            return vt * elt + (4 * hidden if need_grad_input and dtype in _HALF else 0)
        return vocab * elt
    return vt * _acc_bytes(dtype)  # the CPU's tile is in the accumulation dtype


def extra_row_bytes(device_type: str, dtype: torch.dtype, vocab: int, hidden: int,
                    vocab_tile: int = 0, *, need_grad_input: bool = True, terms: bool = False,
                    teacher: str | None = None) -> int:
    """Per-row bytes of the chunk buffers the driver allocates but does not count."""
    vt = vocab if vocab_tile <= 0 or vocab_tile >= vocab else vocab_tile
    acc = _acc_bytes(dtype)
    if device_type == "cuda":
        # the online-softmax state of a tiled chunk: m, s, wz, zt (acc) and the argmax (int64)
        return 4 * acc + 8 if (vt < vocab and not terms) else 0
    extra = vt * acc if teacher is not None else 0           # the teacher's tile
    extra += hidden * acc if dtype in _HALF else 0           # the input chunk, converted
    extra += hidden * acc if need_grad_input else 0          # grad_input of the chunk, in acc
    return extra


def row_bytes(device_type, dtype, vocab, hidden, vocab_tile=0, **kw) -> int:
    """Transient bytes per token row of a chunk: what the driver counts plus what it does not."""
    return (driver_row_bytes(device_type, dtype, vocab, hidden, vocab_tile, **kw)
            + extra_row_bytes(device_type, dtype, vocab, hidden, vocab_tile, **kw))


def minimum_budget(device_type, dtype, vocab, hidden, **kw) -> int:
    """The smallest memory_budget a call accepts: one token row of the narrowest tile it may use
    (of whole rows where it cannot tile: terms beyond the CE, or V <= MIN_VOCAB_TILE)."""
    if kw.get("terms") or vocab <= MIN_VOCAB_TILE:
        return row_bytes(device_type, dtype, vocab, hidden, 0, **kw)
    return row_bytes(device_type, dtype, vocab, hidden, MIN_VOCAB_TILE, **kw)


def plan(budget: int, n: int | None, device_type: str, dtype: torch.dtype, vocab: int, hidden: int,
         *, need_grad_input: bool = True, terms: bool = False, teacher: str | None = None,
         allow_whole_rows: bool = True) -> ChunkPlan:
    """The chunking of a call of n token rows within `budget` bytes (see the module docstring).

    n None: unknown (a symbolic size under torch.compile): the plan then does not depend on it
    (the op clamps chunk_size to N). allow_whole_rows=False plans vocabulary tiles even where
    whole rows would fit (the benchmark's comparison of both modes at one budget)."""
    kw = dict(need_grad_input=need_grad_input, terms=terms, teacher=teacher)
    balance = device_type == "cuda"  # the CUDA driver balances its chunks; mirrored here
    minimum = minimum_budget(device_type, dtype, vocab, hidden, **kw)
    if budget < minimum:
        what = ("whole vocabulary rows" if terms or vocab <= MIN_VOCAB_TILE
                else f"a vocabulary tile of {MIN_VOCAB_TILE} classes")
        raise ValueError(
            f"fusedce: memory_budget={budget} bytes is below this call's minimum of {minimum} bytes "
            f"(one token row of {what}: V={vocab}, H={hidden}, {dtype}, {device_type})")

    def rows_of(per_row):
        if n is None:
            c = max(1, budget // per_row)
            return c // 64 * 64 if c >= 64 else c  # the balance's GEMM-tile alignment, N-free
        return chunk_rows(n, budget, per_row, balance)

    can_tile = not terms and vocab > MIN_VOCAB_TILE
    whole = row_bytes(device_type, dtype, vocab, hidden, 0, **kw)
    n_eff = FAST_MIN_ROWS if n is None else max(n, 1)
    if not can_tile or (allow_whole_rows and budget // max(whole, 1) >= min(n_eff, FAST_MIN_ROWS)):
        c = rows_of(whole)
        return ChunkPlan(c, 0, c * whole)

    # Vocabulary tiles: the widest tile that leaves `rows` rows, halving the rows only where not
    # even MIN_VOCAB_TILE columns would fit (budget >= minimum: one row always fits).
    per_col = dtype.itemsize if device_type == "cuda" else _acc_bytes(dtype) * (2 if teacher else 1)
    fixed = row_bytes(device_type, dtype, vocab, hidden, MIN_VOCAB_TILE, **kw) - per_col * MIN_VOCAB_TILE
    rows = min(n_eff, TILED_ROWS)
    while True:
        vt = (budget // rows - fixed) // per_col
        if vt >= MIN_VOCAB_TILE or rows == 1:
            break
        rows = max(1, rows // 2)
    vt = min(vt, vocab - 1) // _TILE_ALIGN * _TILE_ALIGN  # < vocab: the drivers tile only then
    per_row = row_bytes(device_type, dtype, vocab, hidden, vt, **kw)
    c = rows_of(per_row)
    return ChunkPlan(c, vt, c * per_row)


def _check_budget(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"fusedce: memory_budget must be a positive int (bytes) or None, got {value!r}")


def resolve(memory_budget, input: torch.Tensor, linear_weight: torch.Tensor, *, chunk_size=None,
            vocab_chunk_size=None, low_memory=False, process_group=None, terms=False,
            teacher=None, need_grad_input=None):
    """(chunk_size, vocab_chunk_size) for the op: as given when memory_budget is None, else
    planned from it. memory_budget is exclusive: with chunk_size, vocab_chunk_size or
    low_memory=True (which it replaces) or with process_group (the vocab-parallel layer has its
    own chunking) it is refused."""
    if memory_budget is None:
        return chunk_size, vocab_chunk_size
    _check_budget(memory_budget)
    given = [f"{name}={value!r}" for name, value in (
        ("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size),
        ("low_memory", low_memory)) if value is not None and value is not False]
    if given:
        raise ValueError(
            f"fusedce: memory_budget picks chunk_size, vocab_chunk_size and low_memory itself; "
            f"give memory_budget or those, not both (got memory_budget={memory_budget} and "
            f"{', '.join(given)})")
    if process_group is not None:
        raise ValueError(
            "fusedce: memory_budget is not supported with process_group (the vocab-parallel "
            "layer chunks tokens only, from its own budget); give chunk_size there")
    # int(): a symbolic V or H (torch.compile(dynamic=True)) is specialized, the plan is ints
    vocab, hidden = int(linear_weight.shape[0]), int(linear_weight.shape[-1])
    n = input.numel() // hidden if hidden else 0
    if not isinstance(n, int):  # symbolic under torch.compile(dynamic=True)
        n = None
    if need_grad_input is None:
        need_grad_input = torch.is_grad_enabled() and input.requires_grad
    p = plan(memory_budget, n, input.device.type, input.dtype, vocab, hidden,
             need_grad_input=bool(need_grad_input), terms=terms, teacher=teacher)
    return p.chunk_size, (p.vocab_chunk_size or None)
