"""Per-rank work of the vocab-parallel terms beyond the CE (issue 11): fwd+bwd of token_logprobs
(with the entropy and a per-token upstream, the recomputing backward) and of distillation_loss
(forward KL and JSD, T = 2, with a CE part) on a 1-rank group, so that the time is the rank's own
work: the GEMMs, the shard term ops and their one (two for JSD) collectives of one rank.

    python -m benchmarks shard_terms [--device cpu|cuda] [--shape N H V] [--dtype float32]

CPU: gloo (the thread count is torch's, --threads to pin it); CUDA: NCCL, synchronized timing.
Median of --steps after one warm-up step. Prints one line per kind.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fusedce  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 256, 8192], metavar=("N", "H", "V"))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--port", default="29613")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", a.port)
    cuda = a.device == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    group = dist.new_group([0])
    dtype = getattr(torch, a.dtype)
    N, H, V = a.shape
    torch.manual_seed(0)
    x = (torch.randn(N, H) * 0.5).to(a.device, dtype).requires_grad_()
    w = (torch.randn(V, H) * 0.05).to(a.device, dtype).requires_grad_()
    tw = (torch.randn(V, H) * 0.05).to(a.device, dtype)
    tgt = torch.randint(0, V, (N,), device=a.device)
    up = torch.randn(N, device=a.device)

    def lp():
        out, ent = fusedce.token_logprobs(x, w, tgt, temperature=0.9, return_entropy=True,
                                          process_group=group)
        ((out * up).sum() + ent.sum()).backward()

    def distill(kind):
        def step():
            fusedce.distillation_loss(x, w, tgt, teacher_weight=tw, kind=kind, temperature=2.0,
                                      ce_weight=0.5, process_group=group).backward()
        return step

    for name, fn in (("token_logprobs+entropy", lp), ("distill forward_kl", distill("forward_kl")),
                     ("distill jsd", distill("jsd"))):
        fn()
        times = []
        for _ in range(a.steps):
            x.grad = w.grad = None
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        print(f"{name}: median {statistics.median(times) * 1e3:.2f} ms over {a.steps} "
              f"(all {[round(t * 1e3, 2) for t in times]}) [{a.device}, {a.dtype}, N={N} H={H} V={V}, "
              f"1-rank group]", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
