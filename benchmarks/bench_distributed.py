"""Vocab-parallel head loss (fusedce.distributed.linear_cross_entropy) on K GPUs against the
single-GPU fusedce.linear_cross_entropy.

    python -m benchmarks distributed --nproc K --out DIR      # CUDA + NCCL (starts torchrun)
    python -m benchmarks distributed --tiny --out DIR         # CPU + gloo, 2 ranks
    torchrun --nproc_per_node=K -m benchmarks.bench_distributed --out DIR   # the same, by hand

Per shape (N x H x V, bf16; the weight sharded over the K ranks, torch.chunk layout, input and
targets the same on every rank): fwd+bwd time of one step (CUDA events, median of --steps after
--warmup; every rank's time, the max reported), transient peak memory per rank (peak allocated
during the step minus what was allocated before it, minus the gradients the step returns; the
same method as benchmarks/README.md), collectives per step (counted by wrapping torch.distributed's
functions for one step), the single-process fusedce time on one GPU (rank 0, the full weight) and
the scaling efficiency t_1 / (K * t_K). The losses of both are recorded as a sanity check.
Writes DIR/distributed_<device>_k<K>.json (rank 0).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)
# The collective counter is a test tool (tests/collectives.py): one definition, shared.
sys.path.insert(0, os.path.join(_REPO, "tests"))

import fusedce  # noqa: E402
import fusedce.distributed as fd  # noqa: E402
from collectives import CollectiveCounter as CountCollectives  # noqa: E402

from benchmarks._timing import time_ms  # noqa: E402

SHAPES = [(8192, 4096, 128256), (8192, 2304, 256000), (16384, 3584, 152064)]
TINY_SHAPES = [(256, 64, 1001), (512, 32, 2003)]


class Timer:
    def __init__(self, cuda):
        self.cuda = cuda

    def __call__(self, fn, warmup, steps):
        return time_ms(fn, self.cuda, warmup, steps)


def transient(step, cuda, grad_bytes):
    if not cuda:
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before - grad_bytes) / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="CPU + gloo, tiny shapes (a smoke test)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--skip-single", action="store_true", help="no 1-GPU baseline")
    args = ap.parse_args()

    cuda = not args.tiny and torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    dtype = getattr(torch, args.dtype) if cuda else torch.float32
    shapes = TINY_SHAPES if args.tiny else SHAPES
    timer = Timer(cuda)
    results = []

    for N, H, V in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(N, H, device=dev, dtype=dtype, generator=g)
        t = torch.randint(0, V, (N,), device=dev, generator=g)
        step_ = -(-V // world)
        lo, hi = min(rank * step_, V), min((rank + 1) * step_, V)
        # the shard of the same full weight on every rank (generated row block by row block)
        gw = torch.Generator(device=dev).manual_seed(1)
        W_local = None
        for blk in range(0, V, step_):
            rows = torch.randn(min(step_, V - blk), H, device=dev, dtype=dtype, generator=gw) * 0.02
            if blk == lo:
                W_local = rows
            del rows
        xs = x.clone().requires_grad_(True)
        Ws = W_local.requires_grad_(True)

        def step():
            xs.grad = None
            Ws.grad = None
            loss = fd.linear_cross_entropy(xs, Ws, t, vocab_start=lo, chunk_size=args.chunk_size)
            loss.backward()
            return loss

        grad_bytes = xs.numel() * xs.element_size() + Ws.numel() * Ws.element_size()
        loss_k = step().item()
        with CountCollectives() as cc:
            step()
        n_coll = len(cc.calls)
        mem = transient(step, cuda, grad_bytes)
        dist.barrier()
        ms = timer(step, args.warmup, args.steps)
        all_ms = [None] * world
        all_mem = [None] * world
        dist.all_gather_object(all_ms, ms)
        dist.all_gather_object(all_mem, mem)
        xs.grad = Ws.grad = None
        del Ws, W_local

        single = None
        if rank == 0 and not args.skip_single:
            gw = torch.Generator(device=dev).manual_seed(1)
            W = torch.cat([torch.randn(min(step_, V - b), H, device=dev, dtype=dtype, generator=gw) * 0.02
                           for b in range(0, V, step_)]).requires_grad_(True)
            x1 = x.clone().requires_grad_(True)

            def step1():
                x1.grad = None
                W.grad = None
                loss = fusedce.linear_cross_entropy(x1, W, t, chunk_size=args.chunk_size)
                loss.backward()
                return loss

            loss_1 = step1().item()
            mem1 = transient(step1, cuda, x1.numel() * x1.element_size() + W.numel() * W.element_size())
            ms1 = timer(step1, args.warmup, args.steps)
            single = dict(ms=ms1, transient_mib=mem1, loss=loss_1)
            del W, x1
        dist.barrier()
        if rank == 0:
            tk = max(all_ms)
            row = dict(N=N, H=H, V=V, dtype=str(dtype).replace("torch.", ""), world_size=world,
                       v_local=[min(step_, V - min(r * step_, V)) for r in range(world)],
                       ms=tk, ms_per_rank=all_ms, transient_mib_per_rank=all_mem,
                       collectives_per_step=n_coll, loss=loss_k, single_gpu=single)
            if single is not None:
                row["speedup"] = single["ms"] / tk
                row["scaling_efficiency"] = single["ms"] / (world * tk)
                row["loss_abs_diff"] = abs(single["loss"] - loss_k)
            results.append(row)
            print(json.dumps(row), flush=True)
        if cuda:
            torch.cuda.empty_cache()

    if rank == 0:
        meta = dict(
            device=torch.cuda.get_device_name(dev) if cuda else "cpu", backend=backend,
            torch=torch.__version__, cuda=torch.version.cuda, date=datetime.date.today().isoformat(),
            world_size=world, warmup=args.warmup, steps=args.steps, chunk_size=args.chunk_size,
            method="fwd+bwd of fusedce.distributed.linear_cross_entropy (mean CE), vocab_start given "
                   "(no setup collective); time = max over ranks of each rank's median",
        )
        os.makedirs(args.out, exist_ok=True)
        name = "cpu-gloo-tiny" if not cuda else meta["device"].replace(" ", "-")
        path = os.path.join(args.out, f"distributed_{name}_k{world}.json")
        with open(path, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
        print("wrote", path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
