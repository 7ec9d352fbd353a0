"""The memory frontier: fwd+bwd time of fusedce.linear_cross_entropy against its memory budget.

    python -m benchmarks budget --out DIR [--quick] [--budgets-mib 64,128,...] [--shape NxHxV]
    python -m benchmarks budget --plot DIR/budget.json      (redraw the plot, no GPU)

For each budget (default 64 MiB .. 2 GiB on the Llama-3 8B shape, 8192 x 4096 x 128256, bf16):
fusedce with ``memory_budget=`` (the plan it picks: rows per chunk, vocabulary tile), and, where
that plan keeps whole vocabulary rows, the tiled plan at the same budget (the alternative the
choice in fusedce/_budget.py passed over: measured, so the switch can be checked; not where one
chunk of whole rows fits). Beside them,
single points: fusedce's default and ``low_memory=True``, torch eager (F.linear +
F.cross_entropy(logits.float())), torch.compile of it, Liger's fused linear CE and Apple's Cut
Cross-Entropy where importable, and the floor: the three full-size GEMMs of the step.

Method (../shared/BENCHMARKING.md, as benchmarks/compare.py): same inputs for every method, one
run; CUDA events, median of `--iters` steps after warm-up; transient memory = peak allocated
during one step beyond what was allocated before it and beyond the gradients the step returns.
Each fusedce point is also compared with the default call (loss and gradients, relative error).
On the CPU (``--quick``: a tiny float32 shape, budgets in KiB) times are host wall-clock medians
and memory is not measured (null): it checks the script, not the numbers.

Writes DIR/budget.json (device, torch version, date, every point) and DIR/budget.md; the plot
DIR/budget_<shape>.png (time / floor vs transient memory) where matplotlib is installed.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F

from . import _timing
from .compare import _versions

MIB = 1 << 20
KIB = 1 << 10
LLAMA = (8192, 4096, 128256)
BUDGETS_MIB = [64, 128, 256, 512, 1024, 2048]
QUICK_SHAPE = (512, 64, 4099)
QUICK_BUDGETS_KIB = [64, 128, 256, 512, 1024, 2048, 8192]


def _eager(x, w, t):
    return F.cross_entropy(F.linear(x, w).float(), t)


def _sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, dev, warmup=3, iters=10):
    return _timing.time_ms(fn, dev == "cuda", warmup, iters)


def transient_bytes(step, grad_bytes, dev):
    """Peak allocated during one step beyond what was there before and the grads it returns
    (CUDA only: None elsewhere)."""
    if dev != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - before - grad_bytes)


def floor_ms(N, H, V, dtype, dev, iters):
    """The three full-size GEMMs of the step: logits, grad_input, grad_weight."""
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(N, H, device=dev, dtype=dtype, generator=g)
    w = torch.randn(V, H, device=dev, dtype=dtype, generator=g) * 0.02
    logits = torch.empty(N, V, device=dev, dtype=dtype)
    gx = torch.empty(N, H, device=dev, dtype=dtype)
    gw = torch.empty(V, H, device=dev, dtype=dtype)
    torch.mm(x, w.t(), out=logits)  # real data in the gradient GEMMs, not zeros

    def step():
        torch.mm(x, w.t(), out=logits)
        torch.mm(logits, w, out=gx)
        torch.mm(logits.t(), x, out=gw)

    ms = time_ms(step, dev, iters=iters)
    del x, w, logits, gx, gw
    if dev == "cuda":
        torch.cuda.empty_cache()
    return ms


def methods(N, H, V, dtype, dev, budgets, quick):
    """name -> (fn(x, w, t) -> loss, extra record fields); peers that cannot be imported or do
    not run here are recorded as skipped by the caller."""
    import fusedce
    from fusedce import _budget

    out = {}
    out["fusedce default"] = (lambda x, w, t: fusedce.linear_cross_entropy(x, w, t), {"series": "point"})
    out["fusedce low_memory"] = (lambda x, w, t: fusedce.linear_cross_entropy(x, w, t, low_memory=True),
                                 {"series": "point"})
    for b in budgets:
        try:
            p = _budget.plan(b, N, dev, dtype, V, H)
        except ValueError as e:
            out[f"fusedce budget={b}"] = (_Skip(e), {"series": "budget", "budget": b})
            continue
        fields = {"series": "budget", "budget": b, "chunk_size": p.chunk_size,
                  "vocab_chunk_size": p.vocab_chunk_size, "plan_bytes": p.bytes}
        out[f"fusedce budget={b}"] = (
            (lambda b: lambda x, w, t: fusedce.linear_cross_entropy(x, w, t, memory_budget=b))(b), fields)
        if not p.vocab_chunk_size and p.chunk_size < N:  # whole rows in several chunks
            q = _budget.plan(b, N, dev, dtype, V, H, allow_whole_rows=False)
            if q.vocab_chunk_size:
                fields = {"series": "tiled", "budget": b, "chunk_size": q.chunk_size,
                          "vocab_chunk_size": q.vocab_chunk_size, "plan_bytes": q.bytes}
                out[f"fusedce tiled budget={b}"] = (
                    (lambda q: lambda x, w, t: fusedce.linear_cross_entropy(
                        x, w, t, chunk_size=q.chunk_size, vocab_chunk_size=q.vocab_chunk_size))(q), fields)
    out["torch eager"] = (_eager, {"series": "point"})
    compiled = torch.compile(_eager)
    out["torch.compile"] = (lambda x, w, t: compiled(x, w, t), {"series": "point"})
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        out["liger"] = (lambda x, w, t: liger_fused_linear_cross_entropy(x, w, t), {"series": "point"})
    except Exception as e:  # noqa: BLE001 - a peer that cannot be imported is recorded, not fatal
        out["liger"] = (_Skip(e), {"series": "point"})
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["cut-cross-entropy"] = (lambda x, w, t: cce(x, w, t), {"series": "point"})
    except Exception as e:  # noqa: BLE001
        out["cut-cross-entropy"] = (_Skip(e), {"series": "point"})
    return out


class _Skip:
    def __init__(self, error):
        self.reason = f"{type(error).__name__}: {error}"

    def __call__(self, *args):
        raise RuntimeError(self.reason)


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def measure(name, fn, fields, x, w, t, floor, ref, dev, iters):
    rec = {"method": name, **fields}
    if isinstance(fn, _Skip):
        return {**rec, "status": "skipped", "error": fn.reason}
    try:
        def step():
            x.grad = w.grad = None
            fn(x, w, t).backward()

        step()  # compile / autotune / the first allocations outside the measurements
        x.grad = w.grad = None
        grad_bytes = (x.numel() + w.numel()) * x.element_size()
        tb = transient_bytes(step, grad_bytes, dev)
        rec["transient_mib"] = None if tb is None else tb / MIB
        rec["fwdbwd_ms"] = time_ms(step, dev, iters=iters)
        rec["ratio"] = rec["fwdbwd_ms"] / floor
        x.grad = w.grad = None
        loss = fn(x, w, t)
        loss.backward()
        if ref is not None:
            rec["loss_rel_err_vs_default"] = abs(float(loss.detach()) - float(ref[0])) / abs(float(ref[0]))
            rec["grad_input_rel_err_vs_default"] = rel_err(x.grad, ref[1])
            rec["grad_weight_rel_err_vs_default"] = rel_err(w.grad, ref[2])
        rec["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - a failing method is a result, not a crash
        rec["status"] = "failed"
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        if os.environ.get("FUSEDCE_BENCH_TRACEBACK"):
            traceback.print_exc()
    finally:
        x.grad = w.grad = None
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
    return rec


def _line(rec):
    if rec["status"] != "ok":
        return f"  {rec['method']:<30} {rec['status'].upper()} {rec.get('error', '')}"
    mem = "      n/a" if rec["transient_mib"] is None else f"{rec['transient_mib']:9.1f}"
    plan = ""
    if "chunk_size" in rec:
        plan = f"  chunk {rec['chunk_size']} x {rec['vocab_chunk_size'] or 'V'}"
    return f"  {rec['method']:<30} {rec['fwdbwd_ms']:9.2f} ms  x{rec['ratio']:.3f} floor  {mem} MiB{plan}"


def markdown(data):
    meta = data["meta"]
    N, H, V = meta["shape"]
    lines = [f"# fusedce memory budget — {meta['device']}", "",
             f"{meta['date']}; torch {meta['versions']['torch']}; N={N} H={H} V={V} {meta['dtype']}; "
             f"floor (3 GEMMs) {meta['floor_ms']:.3f} ms; logit std {meta['logit_std_measured']:.2f} "
             f"(measured on 256 rows).", "",
             "| method | budget | chunk rows x tile | fwd+bwd ms | x floor | transient MiB | loss / gx / gw rel err vs default |",
             "|---|---|---|---|---|---|---|"]
    for r in data["records"]:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | | | {r['status']}: {r.get('error', '')} | | | |")
            continue
        b = r.get("budget")
        budget = "" if b is None else (f"{b / MIB:g} MiB" if b >= MIB else f"{b / KIB:g} KiB")
        plan = f"{r['chunk_size']} x {r['vocab_chunk_size'] or 'V'}" if "chunk_size" in r else ""
        mem = "n/a" if r["transient_mib"] is None else f"{r['transient_mib']:.1f}"
        err = ""
        if "loss_rel_err_vs_default" in r:
            err = " / ".join(f"{r[k]:.1e}" for k in ("loss_rel_err_vs_default", "grad_input_rel_err_vs_default",
                                                    "grad_weight_rel_err_vs_default"))
        lines.append(f"| {r['method']} | {budget} | {plan} | {r['fwdbwd_ms']:.2f} | {r['ratio']:.3f} | {mem} | {err} |")
    return "\n".join(lines) + "\n"


def plot(json_path, out_dir=None):
    """time / floor vs transient memory: the budget curve, the tiled alternative, the peers."""
    from benchmarks import plots  # matplotlib (Agg), the shared colors and _save

    plt = plots.plt
    with open(json_path) as f:
        data = json.load(f)
    meta, recs = data["meta"], [r for r in data["records"] if r["status"] == "ok"]
    if not recs or recs[0].get("transient_mib") is None:
        print("no memory measured (a CPU run): nothing to plot")
        return None
    out_dir = out_dir or os.path.dirname(json_path)
    N, H, V = meta["shape"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for series, style, label in (("budget", "-o", "fusedce memory_budget"),
                                 ("tiled", "--s", "fusedce tiles at that budget")):
        rs = sorted((r for r in recs if r.get("series") == series), key=lambda r: r["budget"])
        if rs:
            ax.plot([r["transient_mib"] for r in rs], [r["ratio"] for r in rs], style,
                    color="#d62728" if series == "budget" else "#ff9896", label=label)
            for r in rs:
                ax.annotate(f"{r['budget'] / MIB:g}M", (r["transient_mib"], r["ratio"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    colors = {**plots.COLORS, "fusedce default": plots.COLORS["fusedce in-place"],
              "fusedce low_memory": plots.COLORS["fusedce low-memory"]}
    for r in recs:
        if r.get("series") == "point":
            ax.scatter(r["transient_mib"], r["ratio"], s=60, color=colors.get(r["method"], "k"),
                       label=r["method"], zorder=3)
    ax.axhline(1.0, color="k", lw=0.6, ls=":", label="floor (3 GEMMs)")
    ax.set_xscale("log")
    ax.set_xlabel("transient memory beyond inputs and grads (MiB, log scale)")
    ax.set_ylabel("fwd+bwd time / GEMM floor")
    ax.set_title(f"{meta['device']}: N={N} H={H} V={V} {meta['dtype']}, {meta['date'][:10]}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    return plots._save(fig, out_dir, f"budget_{N}x{H}x{V}_{meta['dtype']}.png")


def run(out_dir, shape, dtype, budgets, iters, quick, peers, logit_std=None):
    dev = "cuda" if torch.cuda.is_available() and not quick else "cpu"
    if not quick and dev != "cuda":
        raise SystemExit("python -m benchmarks budget: no CUDA here; --quick runs a tiny shape on the CPU")
    N, H, V = shape
    os.makedirs(out_dir, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(), "shape": [N, H, V], "dtype": str(dtype).split(".")[-1],
            "quick": quick, "iters": iters, "budgets": budgets}
    print(f"[budget] {meta['device']}, torch {torch.__version__}, N={N} H={H} V={V} {dtype}", flush=True)
    meta["floor_ms"] = floor_ms(N, H, V, dtype, dev, iters)
    print(f"[budget] floor (3 GEMMs) {meta['floor_ms']:.3f} ms", flush=True)

    g = torch.Generator(device=dev).manual_seed(0)
    # the weight scale sets the logits' spread (BENCHMARKING.md: some peers' speed depends on it):
    # 0.02 as benchmarks/compare.py (std ~0.02 sqrt(H)), or the std asked for with --logit-std
    scale = 0.02 if logit_std is None else logit_std / H**0.5
    x = torch.randn(N, H, device=dev, dtype=dtype, generator=g).requires_grad_()
    w = (torch.randn(V, H, device=dev, dtype=dtype, generator=g) * scale).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    with torch.no_grad():
        meta["weight_scale"] = scale
        meta["logit_std_measured"] = float((x[:256] @ w.t()).float().std())  # on 256 rows

    import fusedce

    loss = fusedce.linear_cross_entropy(x, w, t)
    loss.backward()
    ref = (loss.detach(), x.grad.detach().clone(), w.grad.detach().clone())
    x.grad = w.grad = None

    path = os.path.join(out_dir, "budget.json")
    records = []
    ms = methods(N, H, V, dtype, dev, budgets, quick)
    for name, (fn, fields) in ms.items():
        if not peers and fields["series"] == "point" and not name.startswith("fusedce"):
            continue
        fused = name.startswith("fusedce")
        rec = measure(name, fn, fields, x, w, t, meta["floor_ms"], ref if fused else None, dev, iters)
        records.append(rec)
        print(_line(rec), flush=True)
        with open(path, "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=1)
    data = {"meta": meta, "records": records}
    with open(os.path.join(out_dir, "budget.md"), "w") as f:
        f.write(markdown(data))
    try:
        p = plot(path, out_dir)
        if p:
            print(f"[budget] plot {p}")
    except ImportError as e:
        print(f"[budget] no plot here ({e}); python -m benchmarks budget --plot {path} where matplotlib is")
    return data


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for budget.json, budget.md and the plot")
    p.add_argument("--quick", action="store_true",
                   help=f"the CPU, a tiny float32 shape {'x'.join(map(str, QUICK_SHAPE))}, budgets in KiB")
    p.add_argument("--shape", help="N x H x V (default: the Llama-3 8B shape, 8192x4096x128256)")
    p.add_argument("--budgets-mib", help="comma-separated budgets in MiB (default 64..2048)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per point (default 10; --quick 3)")
    p.add_argument("--no-peers", action="store_true", help="fusedce only (no eager, compile, Liger, CCE)")
    p.add_argument("--logit-std", type=float, default=None,
                   help="std of the logits (weight scale std / sqrt(H)); default: weight scale 0.02")
    p.add_argument("--plot", metavar="JSON", help="only redraw the plot of a budget.json")
    a = p.parse_args(argv)
    if a.plot:
        print(plot(a.plot))
        return 0
    if not a.out:
        p.error("--out is required")
    if a.quick:
        shape, dtype = QUICK_SHAPE, torch.float32
        budgets = [k * KIB for k in QUICK_BUDGETS_KIB]
    else:
        shape, dtype = LLAMA, torch.bfloat16
        budgets = [m * MIB for m in BUDGETS_MIB]
    if a.shape:
        shape = tuple(int(s) for s in a.shape.lower().split("x"))
    if a.budgets_mib:
        budgets = [int(float(m) * MIB) for m in a.budgets_mib.split(",")]
    iters = a.iters or (3 if a.quick else 10)
    run(a.out, shape, dtype, budgets, iters, a.quick, peers=not a.no_peers, logit_std=a.logit_std)
    return 0


if __name__ == "__main__":
    sys.exit(main())
