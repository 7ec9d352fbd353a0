"""python -m fusedce: build information, then fusedce against the eager PyTorch path.

On an LM-head-sized problem on whatever device is present (CUDA when available, else the CPU):
eager = F.linear, then F.cross_entropy on logits.float() (what HF transformers does), versus
fusedce.linear_cross_entropy. For each: the loss, its difference from eager, the relative difference
of the gradients, the fwd+bwd time (median) and the transient memory of one step (peak during the
step minus what was allocated before it, minus the returned gradients).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import threading
import time
from typing import Callable

import torch
import torch.nn.functional as F

import fusedce

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (tokens, hidden, vocab, dtype, iters): Llama-3-8B's head on a GPU; a CPU problem of well under a minute.
DEFAULTS = {"cuda": (8192, 4096, 128256, "bfloat16", 10), "cpu": (2048, 512, 32000, "float32", 3)}


def log(msg: str) -> None:
    print(f"[fusedce] {msg}", flush=True)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


class RssSampler:
    """Peak resident set size of this process while a step runs, sampled from /proc/self/statm by a
    thread (torch's kernels release the GIL). An approximation: the CPU allocator may reuse memory
    it kept from before, and a peak shorter than the sampling period can be missed."""

    def __init__(self, period_s: float = 0.001):
        self.period_s = period_s
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def available() -> bool:
        return os.path.exists("/proc/self/statm")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period_s)

    def __enter__(self) -> "RssSampler":
        self.peak = self.rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def eager_loss(hidden, weight, target):
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), target, ignore_index=-100)


def fused_loss(hidden, weight, target):
    return fusedce.linear_cross_entropy(hidden, weight, target, ignore_index=-100)


def run_method(name: str, fn: Callable, hidden, weight, target, iters: int, device: torch.device):
    """fwd+bwd `iters` times after one warm-up; returns loss, grads, median seconds, transient bytes."""
    is_cuda = device.type == "cuda"
    times: list[float] = []
    transient: list[int] = []
    loss = grads = None
    for i in range(iters + 1):
        loss = grads = None
        if is_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = fn(hidden, weight, target)
            grads = torch.autograd.grad(loss, (hidden, weight))
            end.record()
            torch.cuda.synchronize(device)
            seconds = start.elapsed_time(end) / 1e3
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            sampler = RssSampler() if RssSampler.available() else None
            if sampler is not None:
                with sampler:
                    before = sampler.peak
                    t0 = time.perf_counter()
                    loss = fn(hidden, weight, target)
                    grads = torch.autograd.grad(loss, (hidden, weight))
                    seconds = time.perf_counter() - t0
                peak = sampler.peak - before
            else:
                t0 = time.perf_counter()
                loss = fn(hidden, weight, target)
                grads = torch.autograd.grad(loss, (hidden, weight))
                seconds = time.perf_counter() - t0
                peak = None
        grad_bytes = sum(g.numel() * g.element_size() for g in grads)
        if peak is not None:
            transient.append(max(peak - grad_bytes, 0))
        label = "warm-up" if i == 0 else f"run {i}/{iters}"
        log(f"{name}: {label}: {seconds * 1e3:.1f} ms, loss {loss.item():.6f}")
        if i > 0:
            times.append(seconds)
    return {
        "loss": loss.detach().float().item(),
        "grads": [g.detach() for g in grads],
        "time": statistics.median(times),
        "transient": statistics.median(transient) if transient else None,
    }


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tokens", type=int, default=None, help="N (CUDA default 8192, CPU 2048)")
    p.add_argument("--hidden", type=int, default=None, help="H (CUDA default 4096, CPU 512)")
    p.add_argument("--vocab", type=int, default=None, help="V (CUDA default 128256, CPU 32000)")
    p.add_argument("--iters", type=int, default=None, help="timed runs after one warm-up (CUDA 10, CPU 3)")
    p.add_argument("--ignore-frac", type=float, default=0.05, help="fraction of targets set to ignore_index")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    n_def, h_def, v_def, dt_def, it_def = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    N = args.tokens if args.tokens is not None else n_def
    H = args.hidden if args.hidden is not None else h_def
    V = args.vocab if args.vocab is not None else v_def
    iters = max(1, args.iters if args.iters is not None else it_def)
    dtype = DTYPES[dt_def if args.dtype == "auto" else args.dtype]

    log("build info:")
    for key, value in fusedce.build_info().items():
        print(f"    {key:24s} {value}", flush=True)

    log(f"problem: N={N} tokens, H={H}, V={V}, {str(dtype).replace('torch.', '')} on {device}"
        f" ({torch.get_num_threads()} CPU threads); logits would be {fmt_bytes(N * V * 4)} in float32")
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    hidden = torch.randn(N, H, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=gen) / math.sqrt(H)).to(device=device, dtype=dtype).requires_grad_(True)
    target = torch.randint(0, V, (N,), generator=gen)
    target[torch.rand(N, generator=gen) < args.ignore_frac] = -100
    target = target.to(device)
    log(f"inputs ready: hidden {fmt_bytes(hidden.numel() * hidden.element_size())}, "
        f"weight {fmt_bytes(weight.numel() * weight.element_size())}")

    methods = [("torch eager (F.linear + F.cross_entropy(logits.float()))", eager_loss),
               ("fusedce.linear_cross_entropy", fused_loss)]
    results: dict[str, dict] = {}
    failed = False
    for name, fn in methods:
        log(f"{name}: {iters} timed fwd+bwd runs after 1 warm-up")
        try:
            results[name] = run_method(name, fn, hidden, weight, target, iters, device)
        except Exception as e:  # noqa: BLE001 - reported in the table, exit status says it failed
            first = str(e).splitlines()[0] if str(e) else ""
            log(f"{name}: FAILED: {type(e).__name__}: {first}")
            short = first if len(first) <= 80 else first[:77] + "..."
            results[name] = {"error": f"FAILED: {type(e).__name__}: {short}"}
            failed = True
        if device.type == "cuda":
            torch.cuda.empty_cache()

    eager = results[methods[0][0]]
    mem_label = "transient mem" if device.type == "cuda" else "transient mem (RSS, approx)"
    header = ["method", "loss", "|loss diff| vs eager", "grad rel diff (h, w)", "fwd+bwd (median)", mem_label]
    rows = []
    for name, _ in methods:
        r = results[name]
        if "error" in r:
            rows.append([name, r["error"], "", "", "", ""])
            continue
        if "error" in eager:
            diff, gdiff = "n/a", "n/a"
        else:
            diff = f"{abs(r['loss'] - eager['loss']):.3e}"
            gdiff = ", ".join(f"{rel_diff(g, ge):.1e}" for g, ge in zip(r["grads"], eager["grads"]))
        rows.append([name, f"{r['loss']:.6f}", diff, gdiff, f"{r['time'] * 1e3:.1f} ms", fmt_bytes(r["transient"])])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join("-" * w for w in widths)
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    print(line)
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    print()
    print(f"device: {fusedce.build_info().get('device')}; times and memory hold only for this machine; "
          "transient memory = peak during one step minus what was allocated before it, minus the gradients"
          + ("" if device.type == "cuda" else " (CPU: resident set size sampled every ms: approximate)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
