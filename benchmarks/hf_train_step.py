"""End-to-end training step of Hugging Face models, stock vs fusedce-patched.

Real-size random-init configs (Llama-3.2-1B-shaped, Gemma-2-2B-shaped), sequence 4096, bf16, CUDA:
the step time (forward + backward + AdamW step; median of --steps timed steps after 2 warm-up
steps), the peak memory of a step, and the largest batch that fits (1, 2, 4, ... until an
out-of-memory error), for the stock forward and for fusedce.integrations.transformers.apply().

    python -m benchmarks hf results.json            # CUDA, the real shapes
    python -m benchmarks hf --tiny /tmp/tiny.json   # anywhere (CPU), tiny shapes: a smoke run

Writes JSON (device, torch and transformers versions, date, one row per model x method) and prints
a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import transformers  # noqa: E402

import fusedce.integrations.transformers as fhf  # noqa: E402


def configs(tiny: bool):
    if tiny:
        return {
            "llama-tiny": transformers.LlamaConfig(
                hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=2048, tie_word_embeddings=True),
            "gemma2-tiny": transformers.Gemma2Config(
                hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=128, vocab_size=4096, final_logit_softcapping=30.0, tie_word_embeddings=True),
        }
    return {
        # meta-llama/Llama-3.2-1B's shape
        "Llama-3.2-1B": transformers.LlamaConfig(
            hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
            intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
        # google/gemma-2-2b's shape
        "Gemma-2-2B": transformers.Gemma2Config(
            hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
            intermediate_size=9216, vocab_size=256000, final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0, query_pre_attn_scalar=256, sliding_window=4096,
            tie_word_embeddings=True, max_position_embeddings=8192),
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(model, opt, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out


def measure(model, opt, batch, seq, vocab, device, steps):
    """(median step seconds, peak bytes or None, loss) at this batch size."""
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    for _ in range(2):
        step(model, opt, ids)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        out = step(model, opt, ids)
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return statistics.median(times), peak, float(out.loss)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(e):
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run(name, cfg, method, args, device, dtype):
    torch.manual_seed(0)
    # Gemma-2's attention softcapping has no sdpa path in transformers: eager there unless --attn says
    attn = args.attn or ("eager" if cfg.model_type == "gemma2" else "sdpa")
    cfg._attn_implementation = attn
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype).to(device).train()
    if method == "fusedce":
        fhf.apply(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    row = {"model": name, "method": method, "seq": args.seq, "attn_implementation": attn, "dtype": str(dtype).replace("torch.", "")}
    try:
        t, peak, loss = measure(model, opt, args.batch, args.seq, cfg.vocab_size, device, args.steps)
        row.update(batch=args.batch, step_s=t, peak_bytes=peak, loss=loss,
                   tokens_per_s=args.batch * args.seq / t)
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        row.update(batch=args.batch, step_s=None, peak_bytes=None, error="out of memory")
    opt.zero_grad(set_to_none=True)
    free(device)
    largest, b = 0, 1
    while b <= args.max_batch:
        try:
            t, peak, _ = measure(model, opt, b, args.seq, cfg.vocab_size, device, 1)
            largest = b
            row.setdefault("by_batch", {})[b] = {"step_s": t, "peak_bytes": peak}
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            opt.zero_grad(set_to_none=True)
            free(device)
            break
        opt.zero_grad(set_to_none=True)
        free(device)
        b *= 2
    row["largest_batch"] = largest
    row["largest_batch_capped"] = largest * 2 > args.max_batch
    del model, opt
    free(device)
    print(json.dumps({k: v for k, v in row.items() if k != "by_batch"}), flush=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="JSON file to write")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (runs on the CPU); a smoke test")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 4096; 64 with --tiny)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the timed steps (default 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2 with --tiny)")
    p.add_argument("--max-batch", type=int, default=None, help="batch-search cap (default 64; 4 with --tiny)")
    p.add_argument("--attn", default=None, help="attention implementation (default: sdpa; eager for Gemma-2)")
    p.add_argument("--models", default=None, help="comma-separated subset of the model names")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.seq = args.seq or (64 if args.tiny else 4096)
    args.steps = args.steps or (2 if args.tiny else 10)
    args.max_batch = args.max_batch or (4 if args.tiny else 64)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfgs = configs(args.tiny)
    if args.models:
        cfgs = {k: v for k, v in cfgs.items() if k in args.models.split(",")}
    rows = [run(name, cfg, method, args, device, dtype) for name, cfg in cfgs.items() for method in ("stock", "fusedce")]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "optimizer": "AdamW (foreach)", "tiny": args.tiny, "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(table(result))


def table(result):
    gib = 2 ** 30
    lines = ["| model | method | step time (batch 1) | peak memory (batch 1) | largest batch |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        st = f"{r['step_s'] * 1e3:.0f} ms" if r.get("step_s") else "OOM"
        pk = f"{r['peak_bytes'] / gib:.1f} GiB" if r.get("peak_bytes") else "-"
        lb = f"{r['largest_batch']}{'+' if r.get('largest_batch_capped') else ''}"
        lines.append(f"| {r['model']} | {r['method']} | {st} | {pk} | {lb} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
