"""fusedce CUDA vs its floors, on one GPU, in one run.

Fused linear loss (bf16, fwd+bwd): floor = the three full-size cuBLAS GEMMs of the step
(logits = X W^T, grad_X = G W, grad_W = G^T X; 6*N*H*V flops) timed in this same run.
CE on given logits (bf16, fwd + in-place bwd): floor = 6 bytes/element at the measured
device-to-device copy bandwidth (read + write bytes).
Transient memory = peak allocated during the call - allocated before - the bytes of its outputs.

    python -m benchmarks floor --out results_dir [--quick] [--sweep]

Writes floor.json (device, torch version, date, every number) into --out.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import statistics
import sys

import torch

try:
    import fusedce  # noqa: F401
except Exception:  # the package's Python layer may be incomplete: load the extension alone
    for so in glob.glob(os.path.join(os.path.dirname(__file__), "..", "fusedce", "_C*.so")):
        torch.ops.load_library(so)

ops = torch.ops.fusedce
SHAPES = [(8192, 4096, 128256), (8192, 2304, 256000), (16384, 3584, 152064)]
MiB = 1 << 20


def bench(fn, iters=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times), min(times), max(times)


def transient(fn):
    """Peak allocated during fn() beyond what was allocated before and what it returns."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    outs = out if isinstance(out, (tuple, list)) else (out,)
    kept = sum(t.numel() * t.element_size() for t in outs if isinstance(t, torch.Tensor))
    del out, outs
    return (peak - before - kept) / MiB


def copy_bandwidth():
    n = 1 << 30  # 1 GiB
    a = torch.randn(n // 4, device="cuda")
    b = torch.empty_like(a)
    t, _, _ = bench(lambda: b.copy_(a), iters=20, warmup=3)
    del a, b
    return 2 * n / (t * 1e-3)


def with_env(name, value, fn):
    old = os.environ.get(name)
    os.environ[name] = str(value)
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def run_shape(N, H, V, args, res):
    dt = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, H, device="cuda", dtype=dt, generator=g)
    w = (torch.randn(V, H, device="cuda", dtype=dt, generator=g) / H**0.5).to(dt)
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    gs = torch.tensor(1.0 / N, device="cuda")
    r = {"N": N, "H": H, "V": V, "flops": 6 * N * H * V}

    # floor: the three full-size GEMMs
    logits = torch.empty(N, V, device="cuda", dtype=dt)
    torch.mm(x, w.t(), out=logits)
    logits.mul_(1e-2)  # a gradient-like operand, not zeros
    gx = torch.empty_like(x)
    gw = torch.empty_like(w)
    t1 = bench(lambda: torch.mm(x, w.t(), out=logits), args.iters)[0]
    t2 = bench(lambda: torch.mm(logits, w, out=gx), args.iters)[0]
    t3 = bench(lambda: torch.mm(logits.t(), x, out=gw), args.iters)[0]
    floor = t1 + t2 + t3
    r.update(floor_ms=floor, gemm_ms=[t1, t2, t3], tflops=6 * N * H * V / (floor * 1e-3) / 1e12)
    del logits, gx, gw
    torch.cuda.empty_cache()

    def fused(mask, vchunk=0, chunk=0, f32=False):
        return lambda: ops.loss(x, w, t, None, None, gs, grad_mask=mask, chunk_size=chunk,
                                vocab_chunk_size=vchunk, fp32_grad_accum=f32)

    fb = fused([True, True, False])
    r["fast_ms"] = bench(fb, args.iters)[0]
    r["fast_ratio"] = r["fast_ms"] / floor
    r["fast_mem_mib"] = transient(fb)
    fwd = fused([False, False, False])
    r["fast_fwd_ms"] = bench(fwd, args.iters)[0]
    r["fast_fwd_ratio"] = r["fast_fwd_ms"] / t1
    r["fast_fwd_mem_mib"] = transient(fwd)
    f32 = fused([True, True, False], f32=True)
    r["fast_f32acc_ms"] = bench(f32, args.iters)[0]
    r["fast_f32acc_ratio"] = r["fast_f32acc_ms"] / floor
    for vt in args.lowmem_vchunk:
        lm = fused([True, True, False], vchunk=vt)
        key = f"lowmem_v{vt}"
        r[key + "_ms"] = bench(lm, args.iters)[0]
        r[key + "_ratio"] = r[key + "_ms"] / floor
        r[key + "_mem_mib"] = transient(lm)
    if args.sweep:
        sweep = []
        for mb in (256, 512, 1024, 2048):
            ms = with_env("FUSEDCE_CHUNK_BUDGET_MB", mb, lambda: bench(fb, args.iters)[0])
            mem = with_env("FUSEDCE_CHUNK_BUDGET_MB", mb, lambda: transient(fb))
            sweep.append({"budget_mib": mb, "ms": ms, "ratio": ms / floor, "mem_mib": mem})
        r["chunk_sweep"] = sweep
        grid = []
        for gsz in (0, 132, 264, 528):
            ms = with_env("FUSEDCE_ROW_GRID", gsz, lambda: bench(fb, args.iters)[0])
            grid.append({"row_grid": gsz, "ms": ms, "ratio": ms / floor})
        r["row_grid_sweep"] = grid
    # the accuracy of the fused loss against an fp32 chunked reference (first 1024 rows)
    loss, tok, lse, *_ = ops.loss(x, w, t, None, None, gs)
    rows = slice(0, 1024)
    lf = torch.mm(x[rows].float(), w.float().t())
    ref_tok = torch.logsumexp(lf, -1) - lf.gather(1, t[rows, None])[:, 0]
    r["tok_rel_err_vs_fp32"] = ((tok[rows] - ref_tok).norm() / ref_tok.norm()).item()
    del lf
    # eager PyTorch as a reference point (F.linear + F.cross_entropy on logits.float())
    if args.eager:
        xe = x.detach().requires_grad_(True)
        we = w.detach().requires_grad_(True)

        def eager():
            lg = torch.nn.functional.linear(xe, we).float()
            loss = torch.nn.functional.cross_entropy(lg, t)
            gx_, gw_ = torch.autograd.grad(loss, (xe, we))
            return gx_, gw_

        try:
            r["eager_ms"] = bench(eager, max(3, args.iters // 2), 1)[0]
            r["eager_ratio"] = r["eager_ms"] / floor
            r["eager_mem_mib"] = transient(eager)
        except torch.OutOfMemoryError:
            r["eager_ms"] = None
        torch.cuda.empty_cache()
    res["fused"].append(r)
    print(f"{N}x{H}x{V}: floor {floor:.2f} ms ({r['tflops']:.0f} TFLOP/s) | fast "
          f"{r['fast_ms']:.2f} ms = {r['fast_ratio']:.3f}x, {r['fast_mem_mib']:.0f} MiB "
          f"(fwd {r['fast_fwd_ratio']:.3f}x) | "
          + " | ".join(f"{k[:-6]} {r[k]:.3f}x {r[k[:-6] + '_mem_mib']:.0f} MiB"
                       for k in r if k.startswith("lowmem") and k.endswith("_ratio")),
          flush=True)


def run_ce(N, V, bw, args, res):
    dt = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(1)
    logits = torch.randn(N, V, device="cuda", dtype=dt, generator=g) * 2
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    gtok = torch.full((N,), 1.0 / N, device="cuda")
    floor_ms = 6 * N * V / bw * 1e3

    def step():
        tok, lse, *_ = ops.cross_entropy(logits, t)
        ops.cross_entropy_backward_(logits, t, None, lse, gtok, None)
        return tok

    # in-place backward overwrites the logits: time on a fresh copy each time is not free, so
    # time the step on the buffer as it evolves (values stay finite: gradients are small numbers)
    ms = bench(step, args.iters)[0]
    logits.normal_().mul_(2)
    fwd_ms = bench(lambda: ops.cross_entropy(logits, t), args.iters)[0]
    # backward alone (one read, one write per element; no data-dependent work in the kernel)
    lse0 = ops.cross_entropy(logits, t)[1]
    bwd_ms = bench(lambda: ops.cross_entropy_backward_(logits, t, None, lse0, gtok, None),
                   args.iters)[0]
    r = {"N": N, "V": V, "floor_ms": floor_ms, "fused_ms": ms, "ratio": ms / floor_ms,
         "fwd_ms": fwd_ms, "fwd_ratio": fwd_ms / (2 * N * V / bw * 1e3),
         "bwd_ms": bwd_ms, "bwd_ratio": bwd_ms / (4 * N * V / bw * 1e3)}
    if args.eager:
        xe = logits.detach().requires_grad_(True)

        def torch_ce():
            loss = torch.nn.functional.cross_entropy(xe.float(), t)
            return torch.autograd.grad(loss, xe)[0]

        try:
            r["torch_ms"] = bench(torch_ce, args.iters)[0]
            r["torch_ratio"] = r["torch_ms"] / floor_ms
        except torch.OutOfMemoryError:
            pass
    res["ce"].append(r)
    print(f"CE {N}x{V}: floor {floor_ms:.3f} ms | fused {ms:.3f} ms = {r['ratio']:.3f}x "
          f"(fwd {r['fwd_ratio']:.3f}x of 2 B/elem, bwd {r['bwd_ratio']:.3f}x of 4 B/elem)" + (f" | torch {r['torch_ratio']:.2f}x"
                                             if "torch_ratio" in r else ""), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="first shape only")
    p.add_argument("--sweep", action="store_true", help="chunk-budget and row-grid sweeps")
    p.add_argument("--no-eager", dest="eager", action="store_false")
    p.add_argument("--lowmem-vchunk", type=int, nargs="*", default=[4096, 8192, 16384])
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    res = {
        "device": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fused": [],
        "ce": [],
    }
    bw = copy_bandwidth()
    res["copy_bw_GBps"] = bw / 1e9
    print(f"{res['device']}, torch {res['torch']}, copy {bw / 1e9:.0f} GB/s", flush=True)
    for N, V in [(8192, 128256), (8192, 256000)]:
        run_ce(N, V, bw, args, res)
    for shape in SHAPES[:1] if args.quick else SHAPES:
        run_shape(*shape, args, res)
        torch.cuda.empty_cache()
        with open(os.path.join(args.out, "floor.json"), "w") as f:
            json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "floor.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
