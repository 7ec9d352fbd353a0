"""Timing and memory of one step, shared by the benchmarks (BENCHMARKING.md's method)."""

from __future__ import annotations

import statistics
import time

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


def time_ms(fn, cuda, warmup=3, iters=10):
    """Median of `iters` timings after `warmup` calls, in ms: CUDA events on the GPU, host
    wall-clock on the CPU (where the benchmarks' --quick / --tiny modes check themselves)."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
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
