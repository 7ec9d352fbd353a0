"""The small-call regime: host time per call, GPU time per step, host syncs, per-kernel profile.

    python -m benchmarks small_n --out RESULTS.json [--shapes 128x1024x32000,512x2048x128256]

For each shape (N x H x V, bf16, fwd+bwd of a mean CE with the head weight's gradient):
- host_ms: wall time of issuing one fwd+bwd on the host, the GPU kept busy beforehand by a long
  queued matmul so that nothing the call issues can have finished: a call that synchronizes shows
  the queued work in its host time;
- step_ms: back-to-back steps, CUDA events, median of 50 after warm-up (what a training loop sees);
- syncs: host synchronizations counted by torch.cuda.set_sync_debug_mode("warn") in one step;
- kernels: the CUDA kernels of one fusedce step and their GPU time (torch.profiler).
Methods: fusedce, eager (F.linear + F.cross_entropy(logits.float())), torch.compile of the eager
function. Same inputs for every method, in one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import fusedce


def _eager(x, w, t):
    return F.cross_entropy(F.linear(x, w).float(), t)


def _fused(x, w, t):
    return fusedce.linear_cross_entropy(x, w, t)


def _step(fn, x, w, t):
    x.grad = None
    w.grad = None
    fn(x, w, t).backward()


def _busy(ms: float):
    """Queue about `ms` of GPU work (a chain of matmuls) without waiting for it."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    a @ a
    torch.cuda.synchronize()
    one = max(time.perf_counter() - t0, 1e-5) * 1e3
    for _ in range(max(1, int(ms / one))):
        a = a @ a * 0.001
    return a


def host_ms(fn, x, w, t, reps=20):
    out = []
    for _ in range(reps):
        keep = _busy(20.0)
        t0 = time.perf_counter()
        _step(fn, x, w, t)
        out.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        del keep
    return statistics.median(out)


def step_ms(fn, x, w, t, reps=50):
    for _ in range(5):
        _step(fn, x, w, t)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        _step(fn, x, w, t)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def syncs(fn, x, w, t):
    _step(fn, x, w, t)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _step(fn, x, w, t)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    # torch's warning for a sync reads "called a synchronizing CUDA operation"; the once-per-process
    # notice that the debug mode is a prototype ("Synchronization debug mode is ...") is no sync,
    # and would be counted against whichever method is measured first.
    return [str(c.message).splitlines()[0] for c in caught
            if "called a synchronizing" in str(c.message)]


def kernels(fn, x, w, t):
    _step(fn, x, w, t)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _step(fn, x, w, t)
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        dev = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if dev > 0:
            rows.append({"name": ev.key[:100], "count": ev.count, "us": round(dev, 1)})
    return sorted(rows, key=lambda r: -r["us"])[:25]


def host_profile(x, w, t, steps=200, top=30):
    """cProfile of back-to-back fusedce steps: where the host time of a small call goes."""
    import cProfile
    import io
    import pstats

    for _ in range(10):
        _step(_fused, x, w, t)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        _step(_fused, x, w, t)
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--profile", action="store_true", help="also print a cProfile of the smallest shape")
    p.add_argument("--shapes", default="128x1024x32000,512x2048x128256,512x4096x128256,2048x4096x128256")
    args = p.parse_args()
    torch.manual_seed(0)
    compiled = torch.compile(_eager)
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "fusedce": fusedce.__version__, "date": datetime.date.today().isoformat(), "shapes": [],
        "torch_fill_defaults_fix": fusedce.build_info()["torch_fill_defaults_fix"],
    }
    for spec in args.shapes.split(","):
        N, H, V = (int(v) for v in spec.split("x"))
        x = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16) * H**-0.5).requires_grad_()
        t = torch.randint(0, V, (N,), device="cuda")
        row = {"N": N, "H": H, "V": V}
        for name, fn in (("fusedce", _fused), ("eager", _eager), ("compile", compiled)):
            row[name] = {
                "step_ms": round(step_ms(fn, x, w, t), 4),
                "host_ms": round(host_ms(fn, x, w, t), 4),
                "syncs": syncs(fn, x, w, t),
            }
        row["fusedce"]["kernels"] = kernels(_fused, x, w, t)
        print(json.dumps({k: v for k, v in row.items()}, indent=None)[:2000], flush=True)
        result["shapes"].append(row)
        if args.profile and len(result["shapes"]) == 1:
            text = host_profile(x, w, t)
            result["host_profile"] = text
            print(text, flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
