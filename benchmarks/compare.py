"""fusedce against every peer, side by side, on one GPU: time, memory, accuracy, time / floor.

    python -m benchmarks compare RESULTS_DIR [--quick] [--only shapes|sweeps|n_sweep|ce] [--methods a,b,...]

Writes RESULTS_DIR/results.json (every measurement, with device, versions and date),
RESULTS_DIR/results.md (tables) and, where matplotlib is installed, the PNG plots
(benchmarks/plots.py can draw them later from the JSON on any machine).

Method (../shared/BENCHMARKING.md): same inputs, same device, same run for every method;
CUDA events, median of >= 10 timed steps after warm-up; random data (never zeros). The floor of
the fused linear loss is the three full-size cuBLAS GEMMs of the step (logits, grad_input,
grad_weight), timed in the same run; the floor of CE on given bf16 logits is 6 bytes per element
at the measured device copy bandwidth. Transient memory is the peak allocated during one step
minus what was allocated before it, minus the bytes of the gradients the step returns (so it is
what a method needs beyond inputs and grads); for CE on given logits the gradient of the logits is
counted, since writing it in place is what saves the memory. A peer that fails on a shape is recorded with its
error, never dropped.

The n_sweep part (issue 13's grid) runs every method, fwd+bwd in bf16, at each N of N_GRID for each
(H, V) of N_GRID_HV, and writes per point each method's time / floor, its transient memory and
the verdicts the issue asks for (fusedce <= torch.compile in time and memory, fusedce <= eager
in time), counted over the points (records of group "n_grid"; `results.json` also holds the
verdicts under "n_sweep_verdicts").
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from . import _timing

GIB = 1 << 30
MIB = 1 << 20

# Shapes of BENCHMARKING.md: (N tokens, H hidden, V vocab, model).
SHAPES = [
    (8192, 4096, 128256, "Llama-3 8B"),
    (8192, 2304, 256000, "Gemma-2 2B"),
    (16384, 3584, 152064, "Qwen2.5 7B"),
]
N_SWEEP = [1024, 2048, 4096, 8192, 16384, 32768]  # at the Llama-3 shape
V_SWEEP = [32768, 65536, 131072, 262144]  # at H = 4096, N = 8192
CE_N_SWEEP = [2048, 8192, 16384]  # CE on given logits, V = 128256
CE_V_SWEEP = [32768, 65536, 131072, 262144]  # CE on given logits, N = 8192
# Issue 13's grid (the n_sweep part): every N for every (H, V). The small shape first, so that a
# run cut short by its time limit has one complete shape; the three suite shapes after it.
N_GRID = [128, 512, 1024, 2048, 4096, 8192, 32768, 65536]
N_GRID_QUICK = [128, 8192]
N_GRID_HV = [
    (1024, 32000, "H1024 V32000"),
    (4096, 128256, "Llama-3 8B"),
    (2304, 256000, "Gemma-2 2B"),
    (3584, 152064, "Qwen2.5 7B"),
]
# A point whose floor exceeds this is timed with fewer steps (grid_schedule): at the largest N,
# 3 + 10 steps of every method would not fit the grid into one ~7 minute GPU command.
LONG_STEP_MS = 50.0


# ------------------------------------------------------------------------------------------------
# Methods: each returns a function (x, w, t) -> scalar loss, or raises ImportError to be skipped.
# ------------------------------------------------------------------------------------------------


def _eager(x, w, t):
    # The Hugging Face path: materialized logits, upcast, then cross entropy.
    return F.cross_entropy(F.linear(x, w).float(), t)


def make_fused_methods(include_sweep: bool = True):
    import fusedce

    methods = {
        "fusedce": lambda x, w, t: fusedce.linear_cross_entropy(x, w, t),
        "fusedce low-memory": lambda x, w, t: fusedce.linear_cross_entropy(x, w, t, low_memory=True),
    }
    if include_sweep:
        for c in (512, 1024, 2048, 4096):
            methods[f"fusedce chunk={c}"] = (lambda c: lambda x, w, t: fusedce.linear_cross_entropy(x, w, t, chunk_size=c))(c)
    return methods


def make_peer_methods():
    # Every (shape, grad mode) of the suite is a recompilation: let torch.compile keep them all
    # rather than fall back to eager at dynamo's default limit of 8.
    torch._dynamo.config.recompile_limit = 256
    methods = {"torch eager": _eager}
    compiled = torch.compile(_eager)
    methods["torch.compile"] = lambda x, w, t: compiled(x, w, t)
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        methods["liger"] = lambda x, w, t: liger_fused_linear_cross_entropy(x, w, t)
    except Exception as e:  # noqa: BLE001 - a peer that cannot be imported is reported, not fatal
        methods["liger"] = _skipped(e)
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        methods["cut-cross-entropy"] = lambda x, w, t: cce(x, w, t)
    except Exception as e:  # noqa: BLE001
        methods["cut-cross-entropy"] = _skipped(e)
    if hasattr(F, "linear_cross_entropy"):
        methods["torch F.linear_cross_entropy"] = lambda x, w, t: F.linear_cross_entropy(x, w, t)
        try:  # its chunked implementation, where this torch has the options class
            from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

            chunked = LinearCrossEntropyOptions()  # "auto" chunking and accumulation policy
            methods["torch F.linear_cross_entropy chunked"] = lambda x, w, t: F.linear_cross_entropy(
                x, w, t, options=chunked
            )
        except ImportError as e:
            methods["torch F.linear_cross_entropy chunked"] = _skipped(e)
    else:
        methods["torch F.linear_cross_entropy"] = _skipped(
            RuntimeError(f"not in torch {torch.__version__}")
        )
    return methods


def _eager_n_dynamic(x, w, t):
    # _eager's body in a function of its own: dynamo caches compiled code per code object, so the
    # grid's dynamic-N graphs neither reuse nor evict the static ones the shape runs compile.
    return F.cross_entropy(F.linear(x, w).float(), t)


def make_n_grid_methods(methods_filter=None) -> dict:
    """The grid's methods: fusedce (both modes) and every peer, with torch.compile dynamic in N."""
    methods = {**make_fused_methods(include_sweep=False), **make_peer_methods()}
    compiled = torch.compile(_eager_n_dynamic)

    def compiled_dynamic_n(x, w, t):
        # One graph per (H, V), not one per N: one compilation per shape instead of 8 (each an
        # untimed first step, but wall time of the grid's one GPU command), and a training loop
        # with varying sequence lengths gets a dynamic-N graph anyway (dynamo's automatic dynamic
        # shapes, after the second size). The token dimension is marked dynamic (maybe_: a guard
        # that specializes it recompiles instead of failing the method), H and V static:
        # unmarked, automatic dynamic would also make H and V symbolic from the second shape on
        # (checked with backend="aot_eager", torch 2.13), and compile the suite shapes'
        # reductions over V for an unknown V. Not torch.compile(dynamic=True) for the same
        # reason. Caveat: inductor may pick a dynamic graph's kernel configs at their first
        # launch (N = 128 here); the shape and sweep runs' static torch.compile at the same
        # (N, H, V) is the check. Each record's "dynamo_new_graphs" shows the recompilations.
        torch._dynamo.maybe_mark_dynamic(x, 0)
        torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.mark_static(x, 1)
        torch._dynamo.mark_static(w)
        return compiled(x, w, t)

    methods["torch.compile"] = compiled_dynamic_n
    if methods_filter:
        methods = {k: v for k, v in methods.items() if k in methods_filter or k == "fusedce"}
    return methods


def make_ce_methods():
    import fusedce

    def torch_ce(logits, t):
        return F.cross_entropy(logits.float(), t)

    compiled = torch.compile(torch_ce)
    methods = {
        "fusedce in-place": lambda lg, t: fusedce.cross_entropy(lg, t, inplace_backward=True),
        "fusedce": lambda lg, t: fusedce.cross_entropy(lg, t),
        "torch eager": torch_ce,
        "torch.compile": lambda lg, t: compiled(lg, t),
    }
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy

        methods["liger"] = lambda lg, t: liger_cross_entropy(lg, t)
    except Exception as e:  # noqa: BLE001
        methods["liger"] = _skipped(e)
    return methods


class _Skipped:
    def __init__(self, error: BaseException):
        self.reason = f"{type(error).__name__}: {error}"

    def __call__(self, *args):
        raise RuntimeError(self.reason)


def _skipped(error):
    return _Skipped(error)


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------


def cuda_time_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median of `iters` CUDA-event timings after `warmup` calls (benchmarks/_timing.py)."""
    return _timing.time_ms(fn, True, warmup, iters)


def transient_bytes(step, grad_bytes: int) -> int:
    """Peak allocated during one step beyond what was there before and beyond the grads it makes."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - before - grad_bytes)


def gemm_floor_ms(N, H, V, dtype, fwd: bool = True, schedule=None) -> dict:
    """The three full-size GEMMs of a fused linear loss step: logits, grad_input, grad_weight.

    fwd: also time the logits GEMM alone ("floor_fwd_ms"). schedule: a function of one probe
    step's ms giving (warmup, iters), for points too large for the default 3 + 10 steps."""
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(N, H, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(V, H, device="cuda", dtype=dtype, generator=g) * 0.02
    logits = torch.empty(N, V, device="cuda", dtype=dtype)
    gx = torch.empty(N, H, device="cuda", dtype=dtype)
    gw = torch.empty(V, H, device="cuda", dtype=dtype)

    def step():
        torch.mm(x, w.t(), out=logits)
        torch.mm(logits, w, out=gx)
        torch.mm(logits.t(), x, out=gw)

    torch.mm(x, w.t(), out=logits)  # real (random) data in the grad GEMMs, not zeros
    warmup, iters = (3, 10) if schedule is None else schedule(cuda_time_ms(step, warmup=1, iters=1))
    ms = cuda_time_ms(step, warmup=warmup, iters=iters)
    out = {"floor_ms": ms, "tflops": 6 * N * H * V / (ms * 1e-3) / 1e12, "floor_iters": iters}
    if fwd:
        out["floor_fwd_ms"] = cuda_time_ms(lambda: torch.mm(x, w.t(), out=logits))
    del x, w, logits, gx, gw
    torch.cuda.empty_cache()
    return out


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / (ms * 1e-3)


def reference_fp32(x, w, t, chunk: int = 1024):
    """float32 loss and grads (input, weight) computed chunk by chunk from upcast inputs."""
    xf, wf = x.detach().float(), w.detach().float().requires_grad_()
    n_valid = (t != -100).sum().clamp(min=1)
    total = torch.zeros((), device=x.device)
    gx = torch.empty_like(xf)
    for r0 in range(0, x.shape[0], chunk):
        xc = xf[r0 : r0 + chunk].clone().requires_grad_()
        loss = F.cross_entropy(xc @ wf.t(), t[r0 : r0 + chunk], reduction="sum") / n_valid
        loss.backward()
        gx[r0 : r0 + chunk] = xc.grad
        total += loss.detach()
    return total, gx, wf.grad


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _is_oom(e: BaseException) -> bool:
    # torch's allocator raises torch.OutOfMemoryError; a peer's own allocation path may surface
    # the same condition as a RuntimeError with the allocator's message.
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def measure_fused(name, fn, N, H, V, dtype, floor, ref, seed=0, fwd=True, warmup=3, iters=10,
                  device="cuda") -> dict:
    """One method at one point. floor: gemm_floor_ms's dict, or None where it could not be timed
    (no ratio then). fwd: also time the forward alone. device: "cuda" but for the unit tests,
    which run this on the CPU with the timing functions replaced."""
    rec = {"kind": "fused", "method": name, "N": N, "H": H, "V": V, "dtype": str(dtype).split(".")[-1]}
    try:
        g = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(N, H, device=device, dtype=dtype, generator=g).requires_grad_()
        w = (torch.randn(V, H, device=device, dtype=dtype, generator=g) * 0.02).requires_grad_()
        t = torch.randint(0, V, (N,), device=device, generator=g)

        def step():
            x.grad = None
            w.grad = None
            fn(x, w, t).backward()

        def forward():
            with torch.no_grad():
                fn(x, w, t)

        step()  # first call: compile / autotune outside the timings
        x.grad = w.grad = None  # "before" holds the inputs only; the step's new grads are subtracted
        grad_bytes = (x.numel() + w.numel()) * x.element_size()
        rec["transient_mib"] = transient_bytes(step, grad_bytes) / MIB
        rec["fwdbwd_ms"] = cuda_time_ms(step, warmup=warmup, iters=iters)
        if fwd:
            rec["fwd_ms"] = cuda_time_ms(forward)
        if floor is not None:
            rec["floor_ms"] = floor["floor_ms"]
            rec["ratio"] = rec["fwdbwd_ms"] / floor["floor_ms"]
        if ref is not None:
            x.grad = w.grad = None
            loss = fn(x, w, t)
            loss.backward()
            rl, rgx, rgw = ref
            rec["loss_rel_err"] = abs(float(loss.detach()) - float(rl)) / abs(float(rl))
            rec["grad_input_rel_err"] = rel_err(x.grad, rgx)
            rec["grad_weight_rel_err"] = rel_err(w.grad, rgw)
        rec["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - a failing method is a result, not a crash
        rec["status"] = "failed"
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        rec["oom"] = _is_oom(e)
        if os.environ.get("FUSEDCE_BENCH_TRACEBACK"):
            traceback.print_exc()
    finally:
        # After an OOM too: the step's closures hold the inputs; drop them, then hand the cached
        # blocks back so that the next method starts from the same free memory.
        x = w = t = step = forward = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rec


def measure_ce(name, fn, N, V, dtype, floor_ms, seed=0) -> dict:
    rec = {"kind": "ce", "method": name, "N": N, "V": V, "dtype": str(dtype).split(".")[-1]}
    try:
        g = torch.Generator(device="cuda").manual_seed(seed)
        base = torch.randn(N, V, device="cuda", dtype=dtype, generator=g)
        t = torch.randint(0, V, (N,), device="cuda", generator=g)
        logits = base.clone().requires_grad_()

        def step():
            # Fresh logits each step (an in-place backward overwrites them); the copy is outside
            # the timed region because the timed function is `timed` below.
            logits.grad = None
            fn(logits, t).backward()

        def timed_setup():
            with torch.no_grad():
                logits.copy_(base)

        step()
        timed_setup()
        logits.grad = None  # "before" holds the inputs only
        # Not minus the gradient's bytes here: whether the [N, V] gradient is a new buffer or the
        # logits' own storage (inplace_backward) is exactly what this column shows.
        rec["transient_mib"] = transient_bytes(step, 0) / MIB
        times = []
        for i in range(13):
            timed_setup()
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step()
            e.record()
            e.synchronize()
            if i >= 3:
                times.append(s.elapsed_time(e))
        rec["fwdbwd_ms"] = statistics.median(times)
        rec["floor_ms"] = floor_ms
        rec["ratio"] = rec["fwdbwd_ms"] / floor_ms
        rec["bandwidth_tbs"] = 6 * N * V / (rec["fwdbwd_ms"] * 1e-3) / 1e12
        rec["status"] = "ok"
    except Exception as e:  # noqa: BLE001
        rec["status"] = "failed"
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    finally:
        base = logits = t = None
        gc.collect()
        torch.cuda.empty_cache()
    return rec


# ------------------------------------------------------------------------------------------------
# Issue 13's grid: every method at every N for each (H, V)
# ------------------------------------------------------------------------------------------------


def grid_schedule(step_ms: float) -> tuple[int, int]:
    """(warm-up steps, timed steps) at a point whose floor (or probe step) takes step_ms."""
    return (2, 5) if step_ms > LONG_STEP_MS else (3, 10)


def _dynamo_graphs():
    """dynamo's count of graphs compiled so far (to show that torch.compile compiled once per
    (H, V), not per N); None where this torch does not keep the counter."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a missing diagnostic must not stop the benchmark
        return None


def _elapsed(start: float) -> str:
    return f"[+{time.monotonic() - start:5.0f} s]"


def n_grid(methods: dict, records: list, save, hv=N_GRID_HV, ns=N_GRID, dtype=torch.bfloat16,
           device="cuda", on_shape_done=None, progress=None, start=None) -> list:
    """Measures every method at every (H, V, N) of the grid, appending one record per method and
    point to `records` and calling `save()` after each, `on_shape_done()` after each (H, V).

    A method that ran out of memory at some N of a shape is not run at the larger N of that shape
    (recorded as skipped, naming the N); any other failure is recorded and the method still runs
    at the next N. fusedce's own time is in each point's "fusedce" record."""
    progress = progress or _progress
    start = time.monotonic() if start is None else start
    dt = str(dtype).split(".")[-1]
    for H, V, label in hv:
        oomed = {}  # method -> the N at which it ran out of memory on this shape
        for N in ns:
            floor, floor_error = None, None
            try:
                floor = gemm_floor_ms(N, H, V, dtype, fwd=False, schedule=grid_schedule)
                warmup, iters = grid_schedule(floor["floor_ms"])
                head = f"floor {floor['floor_ms']:.3f} ms"
            except Exception as e:  # noqa: BLE001 - the methods' times still count without it
                floor_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                warmup, iters = grid_schedule(float("inf"))
                head = f"floor FAILED ({floor_error})"
                if device == "cuda":
                    gc.collect()
                    torch.cuda.empty_cache()
            progress(f"{_elapsed(start)} n_sweep {label}: N={N} H={H} V={V} {dt}, {head}, "
                     f"{warmup} warm-up + {iters} timed steps")
            for name, fn in methods.items():
                if isinstance(fn, _Skipped):
                    continue
                if name in oomed:
                    rec = {"kind": "fused", "method": name, "N": N, "H": H, "V": V, "dtype": dt,
                           "status": "skipped", "error": f"skipped: OOM at smaller N (N={oomed[name]})"}
                else:
                    graphs = _dynamo_graphs()
                    rec = measure_fused(name, fn, N, H, V, dtype, floor, None, fwd=False,
                                        warmup=warmup, iters=iters, device=device)
                    if name == "torch.compile" and graphs is not None:
                        rec["dynamo_new_graphs"] = _dynamo_graphs() - graphs
                    if rec.get("oom"):
                        oomed[name] = N
                rec.update(group="n_grid", part="n_sweep", label=label, warmup=warmup, iters=iters)
                if floor is not None:
                    rec.update(floor_ms=floor["floor_ms"], floor_tflops=floor["tflops"])
                else:
                    rec["floor_error"] = floor_error
                records.append(rec)
                line = _line(rec)
                if "dynamo_new_graphs" in rec:
                    line += f"  ({rec['dynamo_new_graphs']} new dynamo graphs)"
                progress(f"{_elapsed(start)} {line}")
                save()
        if on_shape_done is not None:
            on_shape_done()
    return records


# (key, peer, measured field, what "yes" means)
VERDICTS = [
    ("time_vs_compile", "torch.compile", "fwdbwd_ms", "fusedce time <= torch.compile's"),
    ("memory_vs_compile", "torch.compile", "transient_mib", "fusedce transient memory <= torch.compile's"),
    ("time_vs_eager", "torch eager", "fwdbwd_ms", "fusedce time <= torch eager's"),
]
BOTH_VS_COMPILE = ("time_and_memory_vs_compile", "fusedce time and memory both <= torch.compile's")


def _outcome(name, rec) -> str:
    if rec is None:
        return f"{name} not run"
    if rec["status"] == "skipped":
        return f"{name} skipped after OOM"
    return f"{name} OOM" if rec.get("oom") else f"{name} failed"


def _verdict(fused, peer_name, peer, field) -> str:
    """"yes" / "no" where both ran, else why the point has no verdict."""
    if fused is None or fused["status"] != "ok":
        return _outcome("fusedce", fused)
    if peer is None or peer["status"] != "ok":
        return _outcome(peer_name, peer)
    return "yes" if fused[field] <= peer[field] else "no"


def n_grid_verdicts(records) -> dict:
    """Per grid point: fusedce's time and each verdict of VERDICTS; and each verdict counted."""
    by_point = {}
    for r in records:
        if r.get("group") == "n_grid":
            by_point.setdefault((r["H"], r["V"], r["N"]), {})[r["method"]] = r
    points = []
    for (H, V, N), by in sorted(by_point.items()):
        f = by.get("fusedce")
        p = {"H": H, "V": V, "N": N,
             "fusedce_ms": f.get("fwdbwd_ms") if f is not None else None}
        for key, peer, field, _ in VERDICTS:
            p[key] = _verdict(f, peer, by.get(peer), field)
        t, m = p["time_vs_compile"], p["memory_vs_compile"]
        if t in ("yes", "no") and m in ("yes", "no"):
            p[BOTH_VS_COMPILE[0]] = "yes" if t == m == "yes" else "no"
        else:
            p[BOTH_VS_COMPILE[0]] = t if t not in ("yes", "no") else m
        points.append(p)
    counts = {}
    for key in [k for k, *_ in VERDICTS] + [BOTH_VS_COMPILE[0]]:
        c = {}
        for p in points:
            c[p[key]] = c.get(p[key], 0) + 1
        counts[key] = c
    return {"n_points": len(points), "points": points, "counts": counts}


def _count_line(what: str, counts: dict, n: int) -> str:
    rest = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()) if k not in ("yes", "no"))
    s = f"{what} at {counts.get('yes', 0)} of {n} points (no at {counts.get('no', 0)}"
    return s + (f"; no verdict: {rest})" if rest else ")")


def _grid_cell(r) -> str:
    if r is None:
        return ""
    if r["status"] == "ok":
        return f"{r['ratio']:.3f}" if "ratio" in r else f"{r['fwdbwd_ms']:.3f} ms"
    if r["status"] == "skipped":
        return "skipped (OOM at smaller N)"
    return "OOM" if r.get("oom") else "failed"


def n_grid_markdown(records) -> list:
    rs = [r for r in records if r.get("group") == "n_grid"]
    if not rs:
        return []
    v = n_grid_verdicts(records)
    yn = {"yes": "yes", "no": "**no**"}
    lines = [
        "", f"## fwd+bwd vs N, every method (issue 13's grid), {rs[0]['dtype']}", "",
        "Verdicts over every point of the grid that ran:", "",
    ]
    for key, _, _, what in VERDICTS + [(BOTH_VS_COMPILE[0], None, None, BOTH_VS_COMPILE[1])]:
        lines.append("- " + _count_line(what, v["counts"][key], v["n_points"]))
    lines += [
        "",
        "Each method's cell: fwd+bwd time / the 3-GEMM floor of that point. Timed steps: median of "
        f"10 after 3 warm-up steps, of 5 after 2 where the floor exceeds {LONG_STEP_MS:g} ms "
        "(each record's `iters`). torch.compile: one graph per (H, V), dynamic in N. "
        "At small N the fixed cost per call dominates: fusedce's own time is its column `fusedce ms`.",
    ]
    methods = list(dict.fromkeys(r["method"] for r in rs))
    verdict_of = {(p["H"], p["V"], p["N"]): p for p in v["points"]}
    for H, V in dict.fromkeys((r["H"], r["V"]) for r in rs):
        label = next(r["label"] for r in rs if (r["H"], r["V"]) == (H, V))
        pts = {}
        for r in rs:
            if (r["H"], r["V"]) == (H, V):
                pts.setdefault(r["N"], {})[r["method"]] = r
        lines += ["", f"### {label}: H={H}, V={V}", "",
                  "| N | floor ms | fusedce ms | " + " | ".join(methods)
                  + " | fusedce MiB | torch.compile MiB | <= compile time | <= compile memory | <= eager time |",
                  "|---" * (len(methods) + 8) + "|"]
        for N in sorted(pts):
            by = pts[N]
            any_rec = next(iter(by.values()))
            floor = f"{any_rec['floor_ms']:.3f}" if "floor_ms" in any_rec else "failed"
            f, c = by.get("fusedce"), by.get("torch.compile")
            mib = lambda r: f"{r['transient_mib']:.1f}" if r is not None and r["status"] == "ok" else ""
            fms = f"{f['fwdbwd_ms']:.3f}" if f is not None and f["status"] == "ok" else _grid_cell(f)
            p = verdict_of[(H, V, N)]
            lines.append(
                f"| {N} | {floor} | {fms} | " + " | ".join(_grid_cell(by.get(m)) for m in methods)
                + f" | {mib(f)} | {mib(c)} | "
                + " | ".join(yn.get(p[k], p[k]) for k in ("time_vs_compile", "memory_vs_compile", "time_vs_eager"))
                + " |"
            )
    errors = [f"- {r['method']} at N={r['N']} H={r['H']} V={r['V']}: {r.get('error', '')}"
              for r in rs if r["status"] == "failed"]
    floor_errors = {(r["N"], r["H"], r["V"]): r["floor_error"] for r in rs if "floor_error" in r}
    errors += [f"- the floor at N={N} H={H} V={V}: {e}" for (N, H, V), e in floor_errors.items()]
    if errors:
        lines += ["", "Errors:", ""] + errors
    return lines


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def _versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for dist in ("fusedce", "liger-kernel", "cut-cross-entropy", "triton"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _progress(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(out_dir: str, quick: bool = False, only: str | None = None, methods_filter=None) -> dict:
    assert torch.cuda.is_available(), "the benchmark suite needs a CUDA GPU"
    os.makedirs(out_dir, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "quick": quick,
    }
    _progress(f"device {meta['device']}, torch {torch.__version__}")
    path = os.path.join(out_dir, "results.json")
    records = []
    if os.path.exists(path):
        # A suite split over several runs (one GPU command each) accumulates into one file; a part
        # run again replaces its own earlier records.
        with open(path) as f:
            old = json.load(f)
        parts = _parts(only)
        records = [r for r in old["records"] if r.get("part") not in parts]
        meta["earlier_runs"] = old["meta"].get("earlier_runs", []) + [old["meta"].get("date")]
        if "copy_bandwidth_tbs" in old["meta"] and "ce" not in parts:
            meta["copy_bandwidth_tbs"] = old["meta"]["copy_bandwidth_tbs"]

    def save():
        write_results(path, meta, records)

    parts = _parts(only)
    fused = {}
    if parts & {"shapes", "sweeps"}:
        fused = {**make_fused_methods(include_sweep=not quick), **make_peer_methods()}
        if methods_filter:
            fused = {k: v for k, v in fused.items() if k in methods_filter or k == "fusedce"}
    grid = make_n_grid_methods(methods_filter) if "n_sweep" in parts else {}
    skipped = {k: v.reason for k, v in {**fused, **grid}.items() if isinstance(v, _Skipped)}
    for name, reason in skipped.items():
        _progress(f"skipping {name}: {reason}")
    meta["skipped"] = skipped

    cases = []
    if "shapes" in parts:
        cases += [(N, H, V, label, torch.bfloat16, "shape") for N, H, V, label in SHAPES]
        cases += [(N, H, V, label, torch.float32, "shape") for N, H, V, label in SHAPES[:1 if quick else 3]]
    if "sweeps" in parts and not quick:
        cases += [(n, 4096, 128256, "Llama-3 N sweep", torch.bfloat16, "n_sweep") for n in N_SWEEP]
        cases += [(8192, 4096, v, "V sweep", torch.bfloat16, "v_sweep") for v in V_SWEEP]
    for N, H, V, label, dtype, group in cases:
        _progress(f"{group} {label}: N={N} H={H} V={V} {dtype}")
        floor = gemm_floor_ms(N, H, V, dtype)
        ref = None
        if group == "shape":
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(N, H, device="cuda", dtype=dtype, generator=g)
            w = torch.randn(V, H, device="cuda", dtype=dtype, generator=g) * 0.02
            t = torch.randint(0, V, (N,), device="cuda", generator=g)
            ref = reference_fp32(x, w, t)
            del x, w, t
            torch.cuda.empty_cache()
        if dtype == torch.float32:
            # One fp32 row per shape: fusedce against the eager path (fp32 GEMMs are ~10x slower,
            # the peers' fp32 support is not what users pick them for).
            methods = {k: v for k, v in fused.items() if k in ("fusedce", "torch eager")}
        elif group == "shape":
            methods = fused
        else:
            methods = {k: v for k, v in fused.items() if not k.startswith("fusedce chunk")}
        for name, fn in methods.items():
            if isinstance(fn, _Skipped):
                continue
            rec = measure_fused(name, fn, N, H, V, dtype, floor, ref)
            rec.update(group=group, label=label, floor_tflops=floor["tflops"],
                       part="shapes" if group == "shape" else "sweeps")
            records.append(rec)
            _progress(_line(rec))
            save()
        ref = None

    if "n_sweep" in parts:
        # results.md after each shape too: a command cut short by its time limit leaves tables.
        n_grid(grid, records, save, ns=N_GRID_QUICK if quick else N_GRID,
               on_shape_done=lambda: write_markdown(out_dir, meta, records))

    if "ce" in parts:
        bw = copy_bandwidth()
        meta["copy_bandwidth_tbs"] = bw / 1e12
        _progress(f"copy bandwidth {bw / 1e12:.2f} TB/s")
        ce_methods = make_ce_methods()
        ce_cases = [(n, 128256, "ce_n_sweep") for n in CE_N_SWEEP] + [(8192, v, "ce_v_sweep") for v in CE_V_SWEEP]
        if quick:
            ce_cases = [(8192, 128256, "ce_n_sweep")]
        for N, V, group in ce_cases:
            floor_ms = 6 * N * V / bw * 1e3
            _progress(f"{group}: CE on logits N={N} V={V} bf16 (floor {floor_ms:.3f} ms)")
            for name, fn in ce_methods.items():
                if isinstance(fn, _Skipped):
                    continue
                rec = measure_ce(name, fn, N, V, torch.bfloat16, floor_ms)
                rec.update(group=group, part="ce")
                records.append(rec)
                _progress(_line(rec))
                save()

    save()
    write_markdown(out_dir, meta, records)
    draw_plots(path, out_dir)
    return {"meta": meta, "records": records}


def write_results(path: str, meta: dict, records: list):
    data = {"meta": meta, "records": records}
    if any(r.get("group") == "n_grid" for r in records):
        data["n_sweep_verdicts"] = n_grid_verdicts(records)
    # Written whole to a temporary file, then renamed: a run killed mid-write keeps the last one.
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def write_markdown(out_dir: str, meta: dict, records: list):
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(meta, records))


def draw_plots(path: str, out_dir: str) -> list:
    """compare's PNG plots from results.json; [] (and a line saying so) without matplotlib."""
    try:
        from benchmarks import plots
    except ImportError as e:
        _progress(f"no plots here ({e}); run python -m benchmarks plots {path} on a machine with matplotlib")
        return []
    return plots.draw_all(path, out_dir)


def _parts(only) -> set:
    return {"shapes", "sweeps", "n_sweep", "ce"} if only is None else {only}


def _line(rec) -> str:
    if rec["status"] != "ok":
        return f"  {rec['method']:<28} {rec['status'].upper()} {rec.get('error', '')}"
    ratio = f"x{rec['ratio']:.3f} floor" if "ratio" in rec else "(no floor)"
    s = f"  {rec['method']:<28} fwd+bwd {rec['fwdbwd_ms']:8.2f} ms  {ratio}  {rec['transient_mib']:9.1f} MiB"
    if "loss_rel_err" in rec:
        s += f"  loss err {rec['loss_rel_err']:.1e} gx {rec['grad_input_rel_err']:.1e} gw {rec['grad_weight_rel_err']:.1e}"
    return s


def markdown(meta, records) -> str:
    v = meta["versions"]
    lines = [
        f"# fusedce benchmark — {meta['device']}",
        "",
        f"{meta['date']}; torch {v['torch']}, liger-kernel {v.get('liger-kernel')}, "
        f"cut-cross-entropy {v.get('cut-cross-entropy')}, triton {v.get('triton')}.",
        "",
        "Time / floor: fwd+bwd time divided by the three full-size cuBLAS GEMMs of the step "
        "timed in the same run (CE on logits: 6 bytes/element at the measured copy bandwidth). "
        "Transient memory: peak during the step beyond inputs and the gradients it returns.",
    ]
    # A section without records (a part not run into this folder) is left out.
    if any(r["kind"] == "fused" and r.get("group") != "n_grid" for r in records):
        lines += [
            "", "## Fused linear cross entropy", "",
            "| shape (N x H x V) | dtype | method | fwd ms | fwd+bwd ms | x floor | transient MiB | loss rel err | grad_input rel err | grad_weight rel err |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for r in records:
        if r["kind"] != "fused" or r.get("group") == "n_grid":  # the grid has its own section
            continue
        shape = f"{r['N']}x{r['H']}x{r['V']}"
        if r["status"] != "ok":
            lines.append(f"| {shape} | {r['dtype']} | {r['method']} | failed: {r.get('error', '')} | | | | | | |")
            continue
        err = lambda k: f"{r[k]:.1e}" if k in r else ""
        lines.append(
            f"| {shape} | {r['dtype']} | {r['method']} | {r['fwd_ms']:.2f} | {r['fwdbwd_ms']:.2f} | "
            f"{r['ratio']:.3f} | {r['transient_mib']:.1f} | {err('loss_rel_err')} | "
            f"{err('grad_input_rel_err')} | {err('grad_weight_rel_err')} |"
        )
    if any(r["kind"] == "ce" for r in records):
        lines += ["", "## Cross entropy on given bf16 logits (fwd+bwd)", "",
                  "| N x V | method | fwd+bwd ms | x floor | TB/s (6 B/elem) | transient MiB |", "|---|---|---|---|---|---|"]
    for r in records:
        if r["kind"] != "ce":
            continue
        if r["status"] != "ok":
            lines.append(f"| {r['N']}x{r['V']} | {r['method']} | failed: {r.get('error', '')} | | | |")
            continue
        lines.append(
            f"| {r['N']}x{r['V']} | {r['method']} | {r['fwdbwd_ms']:.3f} | {r['ratio']:.3f} | "
            f"{r['bandwidth_tbs']:.2f} | {r['transient_mib']:.1f} |"
        )
    lines += n_grid_markdown(records)
    if meta.get("skipped"):
        lines += ["", "Skipped (not importable here): " + "; ".join(f"{k} ({v})" for k, v in meta["skipped"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="folder for results.json, results.md and the plots")
    p.add_argument("--quick", action="store_true", help="the three shapes, one CE case and n_sweep at N in %s only" % N_GRID_QUICK)
    p.add_argument("--only", choices=["shapes", "sweeps", "n_sweep", "ce"],
                   help="run one part of the suite (results.json in out_dir accumulates the parts); "
                   "n_sweep: every method at N in %s for each (H, V) in %s"
                   % (N_GRID, [hv[:2] for hv in N_GRID_HV]))
    p.add_argument("--methods", help="comma-separated method names to keep (fusedce always runs)")
    a = p.parse_args(argv)
    run(a.out_dir, quick=a.quick, only=a.only, methods_filter=a.methods.split(",") if a.methods else None)


if __name__ == "__main__":
    sys.exit(main())
