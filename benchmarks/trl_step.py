"""One SFT and one GRPO training step with TRL's real trainers, TRL's own fused LM head vs
fusedce's (fusedce.integrations.trl.install()), at a real vocabulary.

A Llama-shaped random-init model (hidden 2048, 4 layers, vocabulary 128256, bf16, on one GPU),
random token ids, AdamW:
- SFT: batch 2 x 4096 tokens, every token scored;
- GRPO: 8 prompts of 512 tokens x 256 sampled completion tokens (8 generations per prompt,
  generation by transformers, a Python reward), loss "dapo", beta 0.04 (reference model on the
  fused head too), num_iterations 2 (the old log-probs pass as well).
Per step: the median time of the timed steps after warm-up (synchronized), and for GRPO also the
time spent outside generation (the part the head changes), and the peak memory of the timed steps;
the first logged loss of both runs (they must agree).

    python -m benchmarks trl --out trl.json           # CUDA, the real shapes (< 3 min on an H200)
    python -m benchmarks trl --tiny --out /tmp/t.json  # anywhere (CPU), tiny shapes: a smoke run
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
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import transformers  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import fusedce.integrations.trl as ftrl  # noqa: E402


def shapes(tiny: bool) -> dict:
    if tiny:
        return dict(hidden=32, layers=1, heads=4, kv=2, inter=64, vocab=4099, sft_batch=2, sft_len=64,
                    prompts=2, prompt_len=16, gens=2, completion=8, warmup=1, timed=2)
    return dict(hidden=2048, layers=4, heads=16, kv=8, inter=8192, vocab=128256, sft_batch=2,
                sft_len=4096, prompts=8, prompt_len=512, gens=8, completion=256, warmup=2, timed=3)


def make_tokenizer(vocab: int):
    """A word-level tokenizer with `vocab` entries (no hub): the data below is given as ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<bos>", "<eos>", "<unk>"]
    words = {w: i for i, w in enumerate(special + [f"w{i}" for i in range(vocab - len(special))])}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_model_dir(s: dict, path: str, device) -> str:
    cfg = transformers.LlamaConfig(
        hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"], intermediate_size=s["inter"], vocab_size=s["vocab"],
        tie_word_embeddings=False, max_position_embeddings=8192, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    make_tokenizer(s["vocab"]).save_pretrained(path)
    del model
    return path


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (synchronized), and the peak memory from the first timed one."""

    def __init__(self, device, warmup):
        self.device, self.warmup, self.times, self.t0 = device, warmup, [], None
        self.gen = []  # generation time per step (GRPO)

    def on_step_begin(self, args, state, control, **kw):
        sync(self.device)
        if state.global_step == self.warmup and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()
        self.gen.append(0.0)

    def on_step_end(self, args, state, control, **kw):
        sync(self.device)
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self.t0)
        else:
            self.gen.pop()


def timed_generation(trainer, timer):
    """Accumulates the time of GRPO's generation + scoring into the current step's slot."""
    inner = trainer._generate_and_score_completions

    def wrapped(*a, **k):
        sync(timer.device)
        t0 = time.perf_counter()
        out = inner(*a, **k)
        sync(timer.device)
        if timer.gen:
            timer.gen[-1] += time.perf_counter() - t0
        return out

    trainer._generate_and_score_completions = wrapped


def common_args(out_dir, steps, device):
    return dict(output_dir=out_dir, max_steps=steps, logging_steps=1, report_to="none",
                save_strategy="no", use_cpu=device.type != "cuda", bf16=device.type == "cuda",
                learning_rate=1e-5, optim="adamw_torch", disable_tqdm=True, seed=0,
                dataloader_num_workers=0, gradient_checkpointing=True)


def run_sft(s, path, device, out_dir):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    g = torch.Generator().manual_seed(1)
    n = s["sft_batch"] * (s["warmup"] + s["timed"])
    ids = torch.randint(4, s["vocab"], (n, s["sft_len"]), generator=g).tolist()
    data = Dataset.from_dict({"input_ids": ids})
    args = SFTConfig(**common_args(out_dir, s["warmup"] + s["timed"], device),
                     per_device_train_batch_size=s["sft_batch"], max_length=s["sft_len"])
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data,
                         processing_class=make_tokenizer(s["vocab"]))
    return trainer


def run_grpo(s, path, device, out_dir):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tok = make_tokenizer(s["vocab"])
    g = torch.Generator().manual_seed(2)
    n = s["prompts"] * (s["warmup"] + s["timed"])
    prompts = [" ".join(f"w{i}" for i in torch.randint(0, s["vocab"] - 8, (s["prompt_len"],), generator=g).tolist())
               for _ in range(n)]

    def reward(completions, **kw):
        return [float(len(c)) % 7.0 for c in completions]

    args = GRPOConfig(**common_args(out_dir, s["warmup"] + s["timed"], device),
                      per_device_train_batch_size=s["prompts"] * s["gens"] // 2,
                      gradient_accumulation_steps=2, num_generations=s["gens"],
                      max_completion_length=s["completion"], loss_type="dapo", beta=0.04,
                      num_iterations=2, temperature=1.0,
                      model_init_kwargs={"dtype": torch.bfloat16, "device_map": str(device)})
    trainer = GRPOTrainer(model=path, args=args, reward_funcs=reward,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok)
    return trainer


def measure(kind, head, s, path, device, out_dir):
    if head == "fusedce":
        ftrl.install()
    try:
        trainer = (run_sft if kind == "sft" else run_grpo)(s, path, device, out_dir)
    finally:
        if head == "fusedce":
            ftrl.uninstall()
    assert bool(getattr(trainer.model.forward.__func__, "_fusedce_trl", False)) == (head == "fusedce")
    timer = StepTimer(device, s["warmup"])
    trainer.add_callback(timer)
    if kind == "grpo":
        timed_generation(trainer, timer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    row = {
        "trainer": kind, "head": head,
        "step_ms": 1e3 * statistics.median(timer.times),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "first_loss": losses[0] if losses else None,
        "losses": losses,
    }
    if kind == "grpo":
        row["step_ms_without_generation"] = 1e3 * statistics.median(
            t - gt for t, gt in zip(timer.times, timer.gen))
        row["generation_ms"] = 1e3 * statistics.median(timer.gen)
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, any device (a smoke run)")
    ap.add_argument("--only", choices=["sft", "grpo"], help="run one trainer only")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not a.tiny:
        sys.exit("trl_step.py: the real shapes need CUDA (use --tiny for a smoke run)")
    s = shapes(a.tiny)
    import tempfile

    import trl

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model_dir(s, os.path.join(tmp, "model"), device)
        for kind in ("sft", "grpo"):
            if a.only and kind != a.only:
                continue
            for head in ("trl", "fusedce"):
                t0 = time.perf_counter()
                row = measure(kind, head, s, path, device, os.path.join(tmp, f"{kind}-{head}"))
                row["wall_s"] = time.perf_counter() - t0
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    result = {
        "benchmark": "trl_step", "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "shapes": s, "rows": rows,
    }
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print("| trainer | head | step (ms) | without generation (ms) | peak (GiB) | losses |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        wg = r.get("step_ms_without_generation")
        peak = r["peak_gib"]
        print(f"| {r['trainer']} | {r['head']} | {r['step_ms']:.1f} | "
              f"{'' if wg is None else f'{wg:.1f}'} | {'' if peak is None else f'{peak:.2f}'} | "
              f"{', '.join(f'{x:.6g}' for x in r['losses'])} |")


if __name__ == "__main__":
    main()
