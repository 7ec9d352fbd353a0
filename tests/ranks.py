"""Running a module's checks on several processes and collecting what each rank said.

The convention of the multi-process test files: `worker(rank, *args, result_dir)` runs every
check of the module's CHECKS on its rank and writes "ok" or the failure into
`result_dir/<check>.<rank>`. A rank that died leaves no file; its checks then report why.
"""

from __future__ import annotations

import os
import tempfile

import torch

import torch.multiprocessing as mp


def run_checks(worker, args: tuple, world: int, checks) -> dict:
    """{check: {rank: "ok" or the failure}} of worker(rank, *args, init_file, result_dir) run on
    `world` processes (init_file: a file:// rendezvous path in the same temporary folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        crash = None
        try:
            mp.spawn(worker, args=(*args, init_file, tmp), nprocs=world, join=True)
        except Exception as e:  # noqa: BLE001 - a rank died (e.g. a collective mismatch after a failure)
            crash = f"the process group crashed before this check ran: {e}"
        results = {}
        for name in checks:
            results[name] = {}
            for r in range(world):
                path = os.path.join(tmp, f"{name}.{r}")
                results[name][r] = open(path).read() if os.path.exists(path) else crash or "did not run"
    return results


def run_rank(checks, ctx, rank: int, result_dir: str):
    """On one rank: every check of `checks` ({name: fn(ctx)}) in order, each one's "ok" or its
    traceback written for run_checks, with a barrier after each so that the ranks stay in step;
    the process group is destroyed at the end."""
    import traceback

    import torch.distributed as dist

    try:
        for name, fn in checks.items():
            try:
                fn(ctx)
                msg = "ok"
            except Exception:  # noqa: BLE001 - reported per check
                msg = traceback.format_exc()
            with open(os.path.join(result_dir, f"{name}.{rank}"), "w") as f:
                f.write(msg)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def close(a, b, tol, what):
    """max |a - b| <= atol + rtol * max(|b|, 1), compared in float64 (tol: {"rtol", "atol"})."""
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    scale = max(b.abs().max().item(), 1.0) if b.numel() else 1.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    assert err <= tol["atol"] + tol["rtol"] * scale, f"{what}: max |diff| {err:.3g} (scale {scale:.3g})"
