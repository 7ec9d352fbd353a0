"""PNG plots from a results.json of benchmarks/compare.py (needs matplotlib; no GPU).

    python -m benchmarks plots RESULTS_DIR/results.json [OUT_DIR]

(1) per shape, the time-memory plane: each method a point, fusedce's chunk sweep a curve;
(2) fwd+bwd time vs N; (3) transient memory vs N; (4) CE-on-logits achieved bandwidth vs V;
(5) issue 13's grid: time / floor vs N of every method, one panel per (H, V).
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {
    "fusedce": "#d62728",
    "fusedce low-memory": "#ff9896",
    "fusedce in-place": "#8c1a1a",
    "torch eager": "#7f7f7f",
    "torch.compile": "#1f77b4",
    "liger": "#2ca02c",
    "cut-cross-entropy": "#9467bd",
    "torch F.linear_cross_entropy": "#8c564b",
    "torch F.linear_cross_entropy chunked": "#e377c2",
}


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _ok(records, **match):
    return [r for r in records if r["status"] == "ok" and all(r.get(k) == v for k, v in match.items())]


def time_memory_planes(data, out_dir) -> list[str]:
    meta, records = data["meta"], data["records"]
    shapes = sorted({(r["N"], r["H"], r["V"], r["dtype"]) for r in _ok(records, kind="fused", group="shape")})
    paths = []
    for N, H, V, dtype in shapes:
        rs = _ok(records, kind="fused", group="shape", N=N, H=H, V=V, dtype=dtype)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        sweep = sorted((r for r in rs if r["method"].startswith("fusedce chunk=")),
                       key=lambda r: int(r["method"].split("=")[1]))
        if sweep:
            ax.plot([r["transient_mib"] for r in sweep], [r["ratio"] for r in sweep], "-o",
                    color=COLORS["fusedce"], alpha=0.5, label="fusedce chunk sweep")
            for r in sweep:
                ax.annotate(r["method"].split("=")[1], (r["transient_mib"], r["ratio"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        for r in rs:
            if r["method"].startswith("fusedce chunk="):
                continue
            ax.scatter(r["transient_mib"], r["ratio"], s=60, color=COLORS.get(r["method"], "k"),
                       label=r["method"], zorder=3)
        failed = [r["method"] for r in records if r.get("kind") == "fused" and r.get("group") == "shape"
                  and r["status"] != "ok" and (r["N"], r["H"], r["V"], r["dtype"]) == (N, H, V, dtype)]
        if failed:
            ax.text(0.99, 0.02, "failed: " + ", ".join(failed), transform=ax.transAxes, ha="right",
                    va="bottom", fontsize=8, color="#b00")
        ax.set_xscale("log")
        ax.set_xlabel("transient memory beyond inputs and grads (MiB, log scale)")
        ax.set_ylabel("fwd+bwd time / GEMM floor")
        ax.axhline(1.0, color="k", lw=0.5, ls=":")
        ax.set_title(f"{meta['device']}: N={N} H={H} V={V} {dtype}")
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3, which="both")
        paths.append(_save(fig, out_dir, f"plane_{N}x{H}x{V}_{dtype}.png"))
    return paths


def n_sweep(data, out_dir) -> list[str]:
    meta, records = data["meta"], data["records"]
    rs = _ok(records, kind="fused", group="n_sweep")
    if not rs:
        return []
    methods = sorted({r["method"] for r in rs})
    paths = []
    # Time: absolute (log-log) beside time / floor, where the differences between methods show.
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in methods:
        pts = sorted((r["N"], r["fwdbwd_ms"], r["ratio"]) for r in rs if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=m, color=COLORS.get(m))
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], "-o", label=m, color=COLORS.get(m))
    pts = sorted({(r["N"], r["floor_ms"]) for r in rs})
    ax.plot(*zip(*pts), "k--", label="GEMM floor")
    ax2.axhline(1.0, color="k", ls="--", label="GEMM floor")
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("tokens N (H=4096, V=128256, bf16)")
        a.grid(alpha=0.3, which="both")
    ax.set_yscale("log")
    ax.set_ylabel("fwd+bwd time (ms, log scale)")
    ax2.set_ylabel("fwd+bwd time / GEMM floor")
    ax2.set_ylim(0.9, min(5.0, max(r["ratio"] for r in rs) * 1.05))
    ax.legend(fontsize=8)
    fig.suptitle(f"{meta['device']}: fused linear cross entropy vs N")
    paths.append(_save(fig, out_dir, "time_vs_n.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        pts = sorted((r["N"], max(r["transient_mib"], 0.1)) for r in rs if r["method"] == m)
        ax.plot(*zip(*pts), "-o", label=m, color=COLORS.get(m))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens N (H=4096, V=128256, bf16)")
    ax.set_ylabel("transient memory beyond inputs and grads (MiB, log scale)")
    ax.set_title(f"{meta['device']}: fused linear cross entropy, memory vs N")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    paths.append(_save(fig, out_dir, "memory_vs_n.png"))
    return paths


def n_grid(data, out_dir) -> list[str]:
    """Time / floor vs N (log-log) of every method, one panel per (H, V) of the grid."""
    meta, records = data["meta"], data["records"]
    grid = [r for r in records if r.get("kind") == "fused" and r.get("group") == "n_grid"]
    rs = [r for r in grid if r["status"] == "ok" and "ratio" in r]
    if not rs:
        return []
    shapes = list(dict.fromkeys((r["H"], r["V"]) for r in grid))
    methods = list(dict.fromkeys(r["method"] for r in grid))
    cols = 2 if len(shapes) > 1 else 1
    rows = (len(shapes) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.5 * rows), squeeze=False)
    for ax in axes.flat[len(shapes):]:
        ax.set_visible(False)
    for ax, (H, V) in zip(axes.flat, shapes):
        for m in methods:
            pts = sorted((r["N"], r["ratio"]) for r in rs if (r["H"], r["V"], r["method"]) == (H, V, m))
            if pts:
                ax.plot(*zip(*pts), "-o", ms=3, label=m, color=COLORS.get(m))
        # A method with no time at some N says so on the panel: a missing point is not a fast one.
        missing = {}
        for r in grid:
            if (r["H"], r["V"]) == (H, V) and r["status"] != "ok":
                why = "OOM" if r.get("oom") or r["status"] == "skipped" else "failed"
                missing.setdefault(f"{r['method']} ({why})", []).append(r["N"])
        if missing:
            text = "\n".join(f"{k}: N=" + ", ".join(map(str, sorted(v))) for k, v in missing.items())
            ax.text(0.99, 0.98, text, transform=ax.transAxes, ha="right", va="top", fontsize=7,
                    color="#b00")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ns = sorted({r["N"] for r in grid if (r["H"], r["V"]) == (H, V)})
        ax.set_xticks(ns, [str(n) for n in ns], fontsize=7)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        # Ratios near 1 matter: plain numbers on the log axis, not powers of ten.
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
        ax.set_xlabel("tokens N (log scale)")
        ax.set_ylabel("fwd+bwd time / 3-GEMM floor (log scale)")
        label = next(r.get("label", "") for r in grid if (r["H"], r["V"]) == (H, V))
        ax.set_title(f"{label}: H={H}, V={V}, {grid[0]['dtype']}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{meta['device']}: fused linear cross entropy fwd+bwd, time / floor vs N")
    return [_save(fig, out_dir, "n_sweep_ratio_vs_n.png")]


def ce_bandwidth(data, out_dir) -> list[str]:
    meta, records = data["meta"], data["records"]
    rs = _ok(records, kind="ce", group="ce_v_sweep")
    if not rs:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in sorted({r["method"] for r in rs}):
        pts = sorted((r["V"], r["bandwidth_tbs"]) for r in rs if r["method"] == m)
        ax.plot(*zip(*pts), "-o", label=m, color=COLORS.get(m))
    if meta.get("copy_bandwidth_tbs"):
        ax.axhline(meta["copy_bandwidth_tbs"], color="k", ls="--", label="device copy bandwidth")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("vocabulary V (N=8192, bf16 logits)")
    ax.set_ylabel("achieved bandwidth, 6 bytes/element (TB/s)")
    ax.set_title(f"{meta['device']}: cross entropy on given logits, fwd+bwd")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return [_save(fig, out_dir, "ce_bandwidth_vs_v.png")]


def draw_all(json_path: str, out_dir: str | None = None) -> list[str]:
    with open(json_path) as f:
        data = json.load(f)
    out_dir = out_dir or os.path.dirname(json_path)
    os.makedirs(out_dir, exist_ok=True)
    return (time_memory_planes(data, out_dir) + n_sweep(data, out_dir) + n_grid(data, out_dir)
            + ce_bandwidth(data, out_dir))


if __name__ == "__main__":
    for p in draw_all(*sys.argv[1:3]):
        print(p)
