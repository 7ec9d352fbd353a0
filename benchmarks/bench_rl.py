"""Preference and RL losses on the LM head (issue 14 section 3), bf16, fwd+bwd w.r.t. hidden and
weight, every method on the same inputs in the same run:

- preference, input [2B, T, H] (the B chosen rows, then the B rejected), target [2B, T] with the
  first `prompt` tokens of every row ignored (-100); default B=1 pair of 4096-token sequences,
  H=4096, V=128256, beta 0.1:
  DPO (sigmoid) with the reference model as hidden + weight, DPO with it as precomputed per-sequence
  log-prob sums, and ORPO; each as fusedce.preference_loss, Liger-Kernel's
  LigerFusedLinearDPOLoss / LigerFusedLinearORPOLoss, and a TRL-stock-style eager baseline
  (materialized bf16 logits, float32 log_softmax, gather, the formula);
- GRPO, B=8 completions x T=1024 (random completion lengths), H=4096, V=128256, old and reference
  log-probs given, beta 0.04: fusedce.policy_loss for every loss_type in fusedce.terms._LOSS_TYPES
  (read at run time), Liger's LigerFusedLinearGRPOLoss with the same loss_type where Liger has it,
  and the eager baseline (TRL's formula on float32 log-probs of materialized logits, the entropy
  logged under no_grad in row chunks as TRL does); sequence-level importance sampling (GSPO) as
  well when fusedce.policy_loss takes importance_sampling_level.

Per method: median fwd+bwd time (CUDA events, after warm-up), transient memory (peak allocated in
one step minus what was allocated before it: inputs and the previous step's gradients), the loss,
and the relative difference of its gradients from the eager baseline's. Each fusedce loss must
equal the eager one within a bf16 tolerance: a mismatch is printed, recorded under "checks" and
makes the exit status 1 (after the JSON is written). A peer that cannot be imported is skipped
with its reason; a method that raises is recorded as failed with its error.

    python -m benchmarks rl --out DIR                  # CUDA, the shapes above
    python -m benchmarks rl --out DIR --tiny           # CPU, tiny shapes, no peers: a smoke run

Writes DIR/rl.json (device, torch version, date) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fusedce
import fusedce.terms
from fusedce import reference

from ._timing import bench, transient_mib

BETA_DPO = 0.1
BETA_ORPO = 0.1
BETA_GRPO = 0.04
EPS = 0.2
# Liger-Kernel 0.8.5's GRPO loss types (liger_kernel/chunked_loss/grpo_loss.py, ppo_loss_fn).
LIGER_GRPO_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# A CISPO weight is clipped at epsilon_high itself, not at 1 + epsilon_high: 0.2 would clip every
# token, so CISPO runs with a large bound (every method gets the same value).
TYPE_KWARGS = {"cispo": {"epsilon_high": 5.0}}
# The loss check against the eager baseline: |loss - eager| <= LOSS_ATOL + LOSS_RTOL |eager|
# (+ sum_tol for the objectives on per-sequence sums, see sum_tolerance).
LOSS_RTOL, LOSS_ATOL = 1e-2, 1e-2
BF16_U = 2.0**-8


def sum_tolerance(beta, logit_rms, n_tokens):
    """The extra tolerance of a loss of beta * (per-sequence log-prob sums). fusedce keeps the
    logits in fp32 while the eager path rounds them to bf16 (relative error <= 2^-8), so a token's
    log-prob differs by ~2^-8 |z| and a sum over n tokens by ~2^-8 rms(z) sqrt(n) (independent
    roundings); the mean-aggregated losses (NLL, GRPO) average that away and need no extra term.
    Measured on the CPU (1 pair x 1792 completion tokens, rms(z) 0.45): |diff| was 0.4x this."""
    return beta * BF16_U * logit_rms * math.sqrt(n_tokens)


def _accepts(fn, name: str) -> bool:
    """Whether fn names the keyword (a **kwargs catch-all does not count: it may not use it)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _error(e: BaseException) -> str:
    first = str(e).splitlines()[0][:300] if str(e) else ""
    return f"{type(e).__name__}: {first}"


# ---------------------------------------------------------------------------------------------
# Eager baselines (TRL stock style: materialize the logits, float32 log_softmax, gather)
# ---------------------------------------------------------------------------------------------


def eager_sequence_logps(x, w, target):
    """Per-sequence sums of the target log-probs, token counts, and the masked mean logit."""
    logits = F.linear(x, w)
    keep = target != -100
    logp = logits.float().log_softmax(-1)
    tok = logp.gather(-1, torch.where(keep, target, 0).unsqueeze(-1)).squeeze(-1) * keep
    with torch.no_grad():
        mean_logit = (logits.mean(-1, dtype=torch.float32) * keep).sum() / keep.sum().clamp(min=1)
    return tok.sum(-1), keep.sum(-1).float(), mean_logit


@torch.no_grad()
def eager_token_logps(x, w, tokens):
    """Per-token float32 log-probs of materialized logits, one row at a time (input data only)."""
    out = []
    for xr, tr in zip(x, tokens):
        lp = F.linear(xr, w).float().log_softmax(-1)
        out.append(lp.gather(-1, tr.clamp(min=0).unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def eager_dpo(x, w, target, beta, ref_input=None, ref_weight=None, ref_logps=None):
    sums, _, _ = eager_sequence_logps(x, w, target)
    if ref_logps is None:
        with torch.no_grad():
            ref_logps, _, _ = eager_sequence_logps(ref_input, ref_weight, target)
    B = sums.shape[0] // 2
    d = sums - ref_logps
    return -F.logsigmoid(beta * (d[:B] - d[B:])).mean()


def eager_orpo(x, w, target, beta):
    sums, counts, _ = eager_sequence_logps(x, w, target)
    B = sums.shape[0] // 2
    avg = sums / counts.clamp(min=1)
    nll = -sums[:B].sum() / counts[:B].sum()
    log_odds = (avg[:B] - avg[B:]) - (torch.log1p(-torch.exp(avg[:B])) - torch.log1p(-torch.exp(avg[B:])))
    return nll - beta * F.logsigmoid(log_odds).mean()


EAGER_GRPO_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def eager_grpo(x, w, tokens, old, adv, mask, ref, *, beta, loss_type, epsilon_low, epsilon_high,
               max_completion_length, importance_sampling_level="token"):
    """TRL GRPOTrainer's loss on float32 log-probs of the materialized bf16 logits."""
    logits = F.linear(x, w)
    lp = logits.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():  # TRL logs the entropy, computed in row chunks without a graph
        flat = logits.detach().reshape(-1, logits.shape[-1])
        torch.cat([torch.special.entr(c.float().softmax(-1)).sum(-1) for c in flat.split(1024)])
    m = mask.float()
    log_ratio = lp - old
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1)).unsqueeze(-1)
    coef = torch.exp(log_ratio)
    a = adv.unsqueeze(1)
    per = -torch.min(coef * a, torch.clamp(coef, 1 - epsilon_low, 1 + epsilon_high) * a)
    if beta != 0.0:
        d = ref - lp
        per = per + beta * (torch.exp(d) - d - 1)
    B = lp.shape[0]
    if loss_type == "grpo":
        return ((per * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if loss_type in ("bnpo", "dapo"):
        return (per * m).sum() / m.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return (per * m).sum() / (B * max_completion_length)
    raise ValueError(f"eager_grpo: loss_type {loss_type!r} has no eager formula here")


def eager_grpo_reference(x, w, tokens, old, adv, mask, ref, *, beta, loss_type, **kw):
    """A loss type without a formula above: fusedce.reference.policy_loss in float32 on the
    materialized logits (the eager definitions the tests check fusedce against)."""
    kw = {k: v for k, v in kw.items() if _accepts(reference.policy_loss, k)}
    return reference.policy_loss(F.linear(x, w), tokens, old, adv, mask=mask, ref_logprobs=ref,
                                 beta=beta, loss_type=loss_type, dtype=torch.float32, **kw)[0]


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


class Runner:
    def __init__(self, device, iters):
        self.device, self.iters = device, iters
        self.cuda = device.type == "cuda"
        self.records = []
        self.checks = []

    def _time(self, step):
        if self.cuda:
            return bench(step, self.iters)
        step()
        times = []
        for _ in range(self.iters):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def _free(self, leaves):
        for t in leaves:
            t.grad = None
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def run(self, section, objective, method, fn, leaves, eager_grads=None, skip=None, **info):
        """Time fn (-> scalar loss) fwd+bwd; returns the leaves' gradients of its last step."""
        rec = dict(section=section, objective=objective, method=method, **info)
        self.records.append(rec)
        if skip is not None:
            rec.update(status="skipped", reason=skip)
            print(f"  {objective:34s} {method:26s} skipped: {skip}", flush=True)
            return None
        out = {}

        def step():
            for t in leaves:
                t.grad = None
            loss = fn()
            loss.backward()
            out["loss"] = loss
        try:
            rec["ms"] = self._time(step)
            rec["transient_mib"] = transient_mib(step) if self.cuda else None
            rec["loss"] = float(out["loss"].detach().float())
            grads = [t.grad.detach().clone() for t in leaves]
            rec["status"] = "ok"
        except Exception as e:  # noqa: BLE001  (recorded, the run goes on)
            rec.update(status="failed", error=_error(e))
            print(f"  {objective:34s} {method:26s} FAILED {rec['error']}", flush=True)
            out.clear()
            self._free(leaves)
            return None
        out.clear()
        self._free(leaves)
        if eager_grads is not None:
            for name, g, ge in zip(("input", "weight"), grads, eager_grads):
                rec[f"grad_rel_diff_{name}"] = float(torch.linalg.vector_norm((g.float() - ge.float()))
                                                     / torch.linalg.vector_norm(ge.float()).clamp(min=1e-30))
        mem = "" if rec["transient_mib"] is None else f"{rec['transient_mib']:9.0f} MiB"
        print(f"  {objective:34s} {method:26s} {rec['ms']:9.2f} ms {mem}  loss {rec['loss']:.6f}", flush=True)
        return grads

    def check(self, section, objective, sum_tol=0.0):
        """Every method's loss against the eager one (Liger's where the eager one did not run);
        only fusedce against the eager baseline is enforced (a mismatch fails the run)."""
        recs = [r for r in self.records if r["section"] == section and r["objective"] == objective
                and r.get("status") == "ok"]
        base = next((r for r in recs if r["method"].startswith("eager")), None)
        base = base or next((r for r in recs if r["method"] == "liger"), None)
        if base is None:
            print(f"  {objective}: no baseline ran, loss not checked", flush=True)
            return
        for r in recs:
            if r is base:
                continue
            diff = abs(r["loss"] - base["loss"])
            tol = LOSS_ATOL + LOSS_RTOL * abs(base["loss"]) + sum_tol
            ok = bool(diff <= tol)  # False for a NaN loss too
            r["loss_abs_diff"] = diff
            r["loss_diff_against"] = base["method"]
            c = dict(section=section, objective=objective, method=r["method"], loss=r["loss"],
                     against=base["method"], against_loss=base["loss"], abs_diff=diff, tol=tol,
                     ok=ok, enforced=r["method"] == "fusedce" and base["method"].startswith("eager"))
            self.checks.append(c)
            if not ok:
                print(f"  MISMATCH {objective} / {r['method']}: loss {r['loss']:.6f} vs {base['method']} "
                      f"{base['loss']:.6f}, |diff| {diff:.3g} > tol {tol:.3g}", flush=True)
        losses = [r["loss"] for r in recs]
        print(f"  {objective}: max |loss difference| between methods {max(losses) - min(losses):.3g}", flush=True)


def floor_ms(runner, x, w):
    """The three full-size GEMMs of a head step (logits, grad input, grad weight)."""
    if not runner.cuda:
        return None
    x2, w2 = x.detach().reshape(-1, x.shape[-1]), w.detach()
    logits = torch.empty(x2.shape[0], w2.shape[0], device=x.device, dtype=x.dtype)
    gx, gw = torch.empty_like(x2), torch.empty_like(w2)
    f = [bench(lambda: torch.mm(x2, w2.T, out=logits), runner.iters),
         bench(lambda: torch.mm(logits, w2, out=gx), runner.iters),
         bench(lambda: torch.mm(logits.T, x2, out=gw), runner.iters)]
    del logits, gx, gw
    torch.cuda.empty_cache()
    return sum(f)


def load_liger(no_peers):
    if no_peers:
        return None, "not requested (--tiny or --no-peers)"
    try:
        from liger_kernel.chunked_loss import (LigerFusedLinearDPOLoss, LigerFusedLinearGRPOLoss,
                                               LigerFusedLinearORPOLoss)
    except Exception as e:  # noqa: BLE001
        return None, _error(e)
    return dict(dpo=LigerFusedLinearDPOLoss, orpo=LigerFusedLinearORPOLoss,
                grpo=LigerFusedLinearGRPOLoss), None


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def preference_section(runner, shape, prompt, liger, liger_reason, gen):
    pairs, T, H, V = shape
    dev, dt = runner.device, torch.bfloat16
    x = torch.randn(2 * pairs, T, H, device=dev, generator=gen).to(dt).requires_grad_()
    w = (torch.randn(V, H, device=dev, generator=gen) * 0.02).to(dt).requires_grad_()
    target = torch.randint(0, V, (2 * pairs, T), device=dev, generator=gen)
    target[:, :prompt] = -100
    # The reference model: the policy's head on slightly different hidden states, so the DPO
    # log-ratios are moderate (not saturating the sigmoid).
    ref_input = (x.detach().float() + 0.05 * torch.randn(x.shape, device=dev, generator=gen)).to(dt)
    ref_weight = w.detach().clone()
    with torch.no_grad():
        keep = target != -100
        ref_logps = (eager_token_logps(ref_input, ref_weight, target) * keep).sum(-1)
    # rms of the logits of random data: each is a sum of H products of independent terms.
    logit_rms = math.sqrt(float(H * x.detach().float().pow(2).mean() * w.detach().float().pow(2).mean()))
    dpo_tol = sum_tolerance(BETA_DPO, logit_rms, int(keep.sum()))
    sec = dict(pairs=pairs, seq_len=T, prompt_len=prompt, hidden=H, vocab=V, beta_dpo=BETA_DPO,
               beta_orpo=BETA_ORPO, logit_rms=logit_rms, dpo_sum_tol=dpo_tol,
               floor_ms=floor_ms(runner, x, w))
    leaves = [x, w]
    S = "preference"
    no_liger = None if liger else f"liger unavailable: {liger_reason}"

    obj = "dpo sigmoid, ref hidden+weight"
    ge = runner.run(S, obj, "eager (TRL-style, fp32)", lambda: eager_dpo(
        x, w, target, BETA_DPO, ref_input=ref_input, ref_weight=ref_weight), leaves)
    runner.run(S, obj, "fusedce", lambda: fusedce.preference_loss(
        x, w, target, loss_type="sigmoid", beta=BETA_DPO, ref_input=ref_input,
        ref_weight=ref_weight)[0], leaves, ge)
    if liger:
        dpo = liger["dpo"](beta=BETA_DPO, use_ref_model=True, loss_type="sigmoid")
    runner.run(S, obj, "liger", lambda: _first(dpo(w, x, target, ref_input=ref_input, ref_weight=ref_weight)),
               leaves, ge, skip=no_liger)
    runner.check(S, obj, dpo_tol)
    del ge

    obj = "dpo sigmoid, ref log-prob sums"
    ge = runner.run(S, obj, "eager (TRL-style, fp32)", lambda: eager_dpo(
        x, w, target, BETA_DPO, ref_logps=ref_logps), leaves)
    runner.run(S, obj, "fusedce", lambda: fusedce.preference_loss(
        x, w, target, loss_type="sigmoid", beta=BETA_DPO, ref_logps=ref_logps)[0], leaves, ge)
    runner.run(S, obj, "liger", None, leaves, skip=no_liger or (
        "LigerFusedLinearDPOLoss 0.8.5 takes the reference only as ref_input + ref_weight"))
    runner.check(S, obj, dpo_tol)
    del ge

    obj = "orpo"
    ge = runner.run(S, obj, "eager (TRL-style, fp32)", lambda: eager_orpo(x, w, target, BETA_ORPO), leaves)
    runner.run(S, obj, "fusedce", lambda: fusedce.preference_loss(
        x, w, target, loss_type="orpo", beta=BETA_ORPO)[0], leaves, ge)
    if liger:
        orpo = liger["orpo"](beta=BETA_ORPO)
    runner.run(S, obj, "liger", lambda: _first(orpo(w, x, target)), leaves, ge, skip=no_liger)
    runner.check(S, obj)
    del ge
    return sec


def grpo_section(runner, shape, liger, liger_reason, gen):
    B, T, H, V = shape
    dev, dt = runner.device, torch.bfloat16
    x = torch.randn(B, T, H, device=dev, generator=gen).to(dt).requires_grad_()
    w = (torch.randn(V, H, device=dev, generator=gen) * 0.02).to(dt).requires_grad_()
    tokens = torch.randint(0, V, (B, T), device=dev, generator=gen)
    lengths = torch.randint(T // 2, T + 1, (B,), device=dev, generator=gen)
    mask = (torch.arange(T, device=dev)[None, :] < lengths[:, None]).long()
    lp0 = eager_token_logps(x.detach(), w.detach(), tokens)
    old = lp0 + 0.1 * torch.randn(B, T, device=dev, generator=gen)
    ref = lp0 + 0.1 * torch.randn(B, T, device=dev, generator=gen)
    adv = torch.randn(B, device=dev, generator=gen)
    types = tuple(fusedce.terms._LOSS_TYPES)
    sec = dict(batch=B, seq_len=T, hidden=H, vocab=V, beta=BETA_GRPO, epsilon_low=EPS,
               epsilon_high=EPS, type_overrides=TYPE_KWARGS, fusedce_loss_types=list(types),
               masked_tokens=int((mask == 0).sum()), floor_ms=floor_ms(runner, x, w))
    leaves = [x, w]
    S = "grpo"
    fused_kw = {"use_bias_correction_kl": False} if _accepts(fusedce.policy_loss, "use_bias_correction_kl") else {}
    variants = [(lt, "token") for lt in types]
    if _accepts(fusedce.policy_loss, "importance_sampling_level"):
        variants.append(("grpo", "sequence"))
    else:
        sec["gspo"] = "skipped: fusedce.policy_loss has no importance_sampling_level"
    for lt, level in variants:
        kw = dict(epsilon_low=EPS, epsilon_high=EPS, max_completion_length=T)
        kw.update(TYPE_KWARGS.get(lt, {}))
        seq = {} if level == "token" else {"importance_sampling_level": level}
        obj = f"loss_type={lt}" + ("" if level == "token" else f", {level}-level IS")
        if lt in EAGER_GRPO_TYPES:
            ename, efn, ekw = "eager (TRL-style, fp32)", eager_grpo, {}
        else:
            # TRL defaults use_bias_correction_kl to True; every method here runs without it.
            ename, efn, ekw = "eager (reference.policy_loss, fp32)", eager_grpo_reference, {"use_bias_correction_kl": False}
        ge = runner.run(S, obj, ename, lambda: efn(
            x, w, tokens, old, adv, mask, ref, beta=BETA_GRPO, loss_type=lt, **kw, **ekw, **seq), leaves)
        runner.run(S, obj, "fusedce", lambda: fusedce.policy_loss(
            x, w, tokens, old, adv, mask=mask, ref_logprobs=ref, beta=BETA_GRPO, loss_type=lt,
            **kw, **fused_kw, **seq)[0], leaves, ge)
        skip = None if liger else f"liger unavailable: {liger_reason}"
        if skip is None and lt not in LIGER_GRPO_TYPES:
            skip = f"Liger 0.8.5 has no GRPO loss_type {lt!r}"
        if skip is None:
            lg = liger["grpo"](beta=BETA_GRPO, loss_type=lt, use_ref_model=True,
                               use_bias_correction_kl=False, importance_sampling_level=level, **kw)
        runner.run(S, obj, "liger", lambda: _first(lg(
            x, w, tokens, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)),
            leaves, ge, skip=skip)
        runner.check(S, obj)
        del ge
    return sec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for rl.json")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, no peers (a smoke run)")
    p.add_argument("--only", choices=["preference", "grpo"])
    p.add_argument("--pref-shape", type=int, nargs=4, metavar=("PAIRS", "T", "H", "V"))
    p.add_argument("--prompt", type=int, help="ignored prompt tokens per preference row")
    p.add_argument("--grpo-shape", type=int, nargs=4, metavar=("B", "T", "H", "V"))
    p.add_argument("--iters", type=int)
    p.add_argument("--no-peers", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        device = torch.device("cpu")
        pref, prompt, grpo, iters = (1, 48, 32, 1000), 8, (4, 24, 32, 1000), 3
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_rl: the real shapes need CUDA (use --tiny for a smoke run)")
        device = torch.device("cuda")
        pref, prompt, grpo, iters = (1, 4096, 4096, 128256), 256, (8, 1024, 4096, 128256), 10
    pref = tuple(args.pref_shape or pref)
    grpo = tuple(args.grpo_shape or grpo)
    prompt = prompt if args.prompt is None else args.prompt
    iters = args.iters or iters
    os.makedirs(args.out, exist_ok=True)
    liger, liger_reason = load_liger(args.tiny or args.no_peers)
    peers = {}
    for mod, dist in (("liger_kernel", "liger-kernel"), ("triton", "triton")):
        try:
            from importlib.metadata import version
            peers[mod] = version(dist)
        except Exception:  # noqa: BLE001
            peers[mod] = None
    res = dict(benchmark="bench_rl", date=datetime.date.today().isoformat(),
               device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               torch=torch.__version__, dtype="bfloat16", tiny=args.tiny, iters=iters,
               fusedce=fusedce.build_info(), peers=peers,
               skipped={} if liger else {"liger": liger_reason}, sections={})
    runner = Runner(device, iters)
    gen = torch.Generator(device=device).manual_seed(0)
    if args.only in (None, "preference"):
        print(f"preference: {pref[0]} pair(s) x {pref[1]} tokens (prompt {prompt}) x H {pref[2]} x V {pref[3]}", flush=True)
        res["sections"]["preference"] = preference_section(runner, pref, prompt, liger, liger_reason, gen)
    if args.only in (None, "grpo"):
        print(f"grpo: {grpo[0]} x {grpo[1]} tokens x H {grpo[2]} x V {grpo[3]}", flush=True)
        res["sections"]["grpo"] = grpo_section(runner, grpo, liger, liger_reason, gen)
    for sec_name, sec in res["sections"].items():
        fl = sec.get("floor_ms")
        for r in runner.records:
            if r["section"] == sec_name and r.get("status") == "ok" and fl:
                r["ratio_vs_floor"] = r["ms"] / fl
    res["records"] = runner.records
    res["checks"] = runner.checks
    bad = [c for c in runner.checks if c["enforced"] and not c["ok"]]
    res["checks_ok"] = not bad
    path = os.path.join(args.out, "rl.json")
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1)
    print("\n| section | objective | method | ms | transient MiB | loss | vs eager | grad rel diff (input, weight) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runner.records:
        if r.get("status") != "ok":
            print(f"| {r['section']} | {r['objective']} | {r['method']} | {r['status']}: "
                  f"{r.get('reason') or r.get('error')} | | | | |")
            continue
        mem = "" if r["transient_mib"] is None else f"{r['transient_mib']:.0f}"
        gd = (f"{r['grad_rel_diff_input']:.2e}, {r['grad_rel_diff_weight']:.2e}"
              if "grad_rel_diff_input" in r else "")
        vd = (f"{r['loss_abs_diff']:.2e}" + ("" if r["loss_diff_against"].startswith("eager") else " (vs liger)")
              if "loss_abs_diff" in r else "")
        print(f"| {r['section']} | {r['objective']} | {r['method']} | {r['ms']:.2f} | {mem} | "
              f"{r['loss']:.6f} | {vd} | {gd} |")
    print(f"\nwrote {path}")
    if bad:
        for c in bad:
            print(f"FAIL: fusedce's {c['section']} {c['objective']} loss {c['loss']:.6f} differs from "
                  f"the eager baseline's {c['against_loss']:.6f} by {c['abs_diff']:.3g} "
                  f"(bf16 tolerance {c['tol']:.3g})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
