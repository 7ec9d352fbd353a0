"""One softmax pass for several terms (issue 5), on the GPU, bf16, fwd+bwd:

- CE alone vs CE + z-loss + entropy + forward KL (teacher logits given) in ONE call of the op, vs
  the same terms as separate calls (CE, then entropy through token_logprobs, then the KL);
- distillation (generalized JSD, teacher hidden + weight) vs Liger's LigerFusedLinearJSDLoss;
- the GRPO policy loss vs Liger's LigerFusedLinearGRPOLoss;
each with its transient memory (peak beyond inputs and gradients) and the GEMM floor of the step
(the three full-size GEMMs, timed in the same run).

    python -m benchmarks terms OUT_DIR [--shape N H V] [--iters K]

Writes OUT_DIR/terms.json (device, torch version, date) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

import fusedce

from ._timing import bench, transient_mib

DEFAULT_SHAPE = (8192, 4096, 128256)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--shape", type=int, nargs=3, default=DEFAULT_SHAPE)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-peers", action="store_true")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    N, H, V = args.shape
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    x = (torch.randn(N, H, device=dev, generator=g) * 0.5).to(dt).requires_grad_()
    w = (torch.randn(V, H, device=dev, generator=g) * H**-0.5).to(dt).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    xt = (torch.randn(N, H, device=dev, generator=g) * 0.5).to(dt)
    wt = (torch.randn(V, H, device=dev, generator=g) * H**-0.5).to(dt)
    teacher_logits = (xt @ wt.T).detach()
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               date=datetime.date.today().isoformat(), shape=[N, H, V], dtype="bfloat16",
               fusedce=fusedce.build_info(), cases={})

    def run(name, fn):
        def step():
            x.grad = w.grad = None
            loss = fn()
            loss.backward()
            return loss
        ms = bench(step, args.iters)
        mem = transient_mib(step)
        value = float(step().float())
        res["cases"][name] = dict(ms=ms, transient_mib=mem, loss=value)
        print(f"{name:34s} {ms:9.2f} ms  {mem:9.0f} MiB  loss {value:.5f}", flush=True)

    # The floor: the three GEMMs of the step at full size.
    logits = torch.empty(N, V, device=dev, dtype=dt)
    gx = torch.empty(N, H, device=dev, dtype=dt)
    gw = torch.empty(V, H, device=dev, dtype=dt)
    f = [bench(lambda: torch.mm(x.detach(), w.detach().T, out=logits), args.iters),
         bench(lambda: torch.mm(logits, w.detach(), out=gx), args.iters),
         bench(lambda: torch.mm(logits.T, x.detach(), out=gw), args.iters)]
    res["floor_ms"] = sum(f)
    del logits, gx, gw
    torch.cuda.empty_cache()
    print(f"{'floor (3 GEMMs)':34s} {res['floor_ms']:9.2f} ms", flush=True)

    run("ce", lambda: fusedce.linear_cross_entropy(x, w, t))
    run("ce+z+entropy+kl one call", lambda: fusedce.distillation_loss(
        x, w, t, teacher_logits=teacher_logits, kind="forward_kl", ce_weight=1.0, z_loss=1e-4,
        entropy_coef=0.01))
    run("ce+z+entropy+kl separate calls", lambda: (
        fusedce.linear_cross_entropy(x, w, t, z_loss=1e-4)
        + 0.01 * fusedce.token_logprobs(x, w, t, return_entropy=True)[1].mean()
        + fusedce.distillation_loss(x, w, t, teacher_logits=teacher_logits, kind="forward_kl")))
    run("fusedce jsd (teacher hidden+weight)", lambda: fusedce.distillation_loss(
        x, w, t, teacher_input=xt, teacher_weight=wt, kind="jsd", beta=0.5, ce_weight=0.5,
        distill_weight=0.5))
    B = 8
    T = N // B
    tok = t.reshape(B, T)
    with torch.no_grad():
        lp0 = fusedce.token_logprobs(x.detach().reshape(B, T, H), w.detach(), tok)
    old = lp0 + 0.1 * torch.randn(B, T, device=dev, generator=g)
    ref_lp = lp0 + 0.1 * torch.randn(B, T, device=dev, generator=g)
    adv = torch.randn(B, device=dev, generator=g)
    mask = torch.ones(B, T, device=dev, dtype=torch.long)
    run("fusedce grpo (beta 0.04)", lambda: fusedce.policy_loss(
        x.reshape(B, T, H), w, tok, old, adv, mask=mask, ref_logprobs=ref_lp, beta=0.04,
        loss_type="dapo", use_bias_correction_kl=False)[0])  # Liger's KL: no ratio weighting

    if not args.no_peers:
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss, LigerFusedLinearJSDLoss
        except Exception as e:  # noqa: BLE001
            print("liger unavailable:", e)
            res["liger_error"] = repr(e)
        else:
            jsd = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5)
            run("liger jsd (teacher hidden+weight)", lambda: jsd(x, w, xt, wt, t))
            grpo = LigerFusedLinearGRPOLoss(beta=0.04, loss_type="dapo", use_ref_model=True)

            def liger_grpo():
                out = grpo(x.reshape(B, T, H), w, tok, mask, adv, ref_per_token_logps=ref_lp,
                           old_per_token_logps=old)
                return out[0] if isinstance(out, tuple) else out
            run("liger grpo (beta 0.04)", liger_grpo)

    c = res["cases"]
    base = c["ce"]["ms"]
    for k, v in c.items():
        v["ratio_vs_ce"] = v["ms"] / base
        v["ratio_vs_floor"] = v["ms"] / res["floor_ms"]
    for a, b in (("fusedce jsd (teacher hidden+weight)", "liger jsd (teacher hidden+weight)"),
                 ("fusedce grpo (beta 0.04)", "liger grpo (beta 0.04)")):
        if a in c and b in c:
            c[a]["ratio_vs_liger"] = c[a]["ms"] / c[b]["ms"]
    with open(os.path.join(args.out, "terms.json"), "w") as fh:
        json.dump(res, fh, indent=2)
    print(json.dumps({k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in c.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
