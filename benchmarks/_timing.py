"""Timing and memory of one CUDA step, shared by the benchmarks (BENCHMARKING.md's method)."""

from __future__ import annotations

import statistics

import torch


def bench(fn, iters):
    """Median of `iters` timed calls (CUDA events) after two warm-up calls, in ms."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def transient_mib(fn):
    """Peak allocated during one call minus what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
