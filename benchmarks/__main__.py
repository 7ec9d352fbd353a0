"""One entry point for the benchmarks: ``python -m benchmarks <command> [args]``.

Each command runs one benchmark module with the arguments that follow (``<command> --help``
prints that module's own options). ``python -m benchmarks RESULTS_DIR [args]`` (a first argument
that is no command) is ``compare``, as before.
"""

from __future__ import annotations

import difflib
import os
import runpy
import shlex
import subprocess
import sys

# command: (module, what it measures)
COMMANDS = {
    "compare": ("benchmarks.compare", "fusedce against every peer, side by side (RESULTS_DIR)"),
    "floor": ("benchmarks.floor", "fusedce alone against its floors, the tuning sweeps (--out DIR)"),
    "terms": ("benchmarks.bench_terms", "the terms beyond the CE, one call vs separate calls (OUT_DIR)"),
    "rl": ("benchmarks.bench_rl", "DPO / ORPO / GRPO: fusedce vs Liger vs TRL-style eager (--out DIR)"),
    "profile": ("benchmarks.profile_terms", "CUDA kernel totals of a CE call vs a terms call"),
    "distributed": ("benchmarks.bench_distributed",
                    "vocab-parallel loss on K ranks, under torchrun (--nproc K, --out DIR; --tiny: CPU + gloo)"),
    "shard_terms": ("benchmarks.bench_shard_terms",
                    "per-rank fwd+bwd of the sharded log-probs / distillation on a 1-rank group"),
    "hf": ("benchmarks.hf_train_step", "a Hugging Face training step, stock vs patched (OUT.json)"),
    "trl": ("benchmarks.trl_step", "an SFT and a GRPO step of TRL's trainers (--out OUT.json)"),
    "fp16": ("benchmarks.bench_fp16_scale", "float16 under a loss scale: error and time (--out OUT.json)"),
    "small_n": ("benchmarks.small_n", "the small-call regime: host time, syncs, kernels (--out OUT.json)"),
    "budget": ("benchmarks.budget", "time vs memory_budget (64 MiB .. 2 GiB) beside the peers (--out DIR; --quick: CPU)"),
    "host_overhead": ("benchmarks.host_overhead", "host time of one tiny fwd+bwd call per function vs eager"),
    "plots": ("benchmarks.plots", "redraw compare's plots from a results.json (no GPU)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m benchmarks <command> [args]   (<command> --help: its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    lines += ["", "python -m benchmarks RESULTS_DIR [args] is compare (the benchmark against the peers)."]
    return "\n".join(lines)


def _run_module(module: str, args: list[str]) -> int:
    """Runs the module as `python -m module args` would (its own argument parsing and exit)."""
    sys.argv = [module] + args
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def _distributed(args: list[str]) -> int:
    """Under torchrun (RANK set): the benchmark itself. Otherwise the torchrun line that starts it,
    printed, then run: --nproc K ranks (default: the GPUs here, or 2 with --tiny or no GPU)."""
    module = COMMANDS["distributed"][0]
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _run_module(module, args)
    nproc = None
    if "--nproc" in args:
        i = args.index("--nproc")
        nproc = int(args[i + 1])
        args = args[:i] + args[i + 2:]
    if nproc is None:
        import torch

        gpus = torch.cuda.device_count()
        nproc = 2 if "--tiny" in args or gpus == 0 else gpus
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module] + args
    print("+", shlex.join(cmd), flush=True)
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    if command == "distributed":
        return _distributed(args)
    if command in COMMANDS:
        return _run_module(COMMANDS[command][0], args)
    near = difflib.get_close_matches(command, COMMANDS, n=1)
    if command.startswith("-") or near:
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        print(f"python -m benchmarks: unknown command {command!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    # python -m benchmarks RESULTS_DIR [args]: the form of the peer comparison before the commands
    print(f"python -m benchmarks: {command!r} is no command: compare, results into it", file=sys.stderr)
    return _run_module(COMMANDS["compare"][0], argv)


if __name__ == "__main__":
    sys.exit(main())
