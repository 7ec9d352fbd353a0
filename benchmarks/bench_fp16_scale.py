"""float16 under a GradScaler-style loss scale (issue 12 section 2), on the GPU.

At a Llama shape (default 8192 x 4096 x 128256, fp16 inputs, head weight of std 0.02, mean CE over
the non-ignored tokens):

- the error of the unscaled gradients (grad / S) against float64 (fusedce/reference.py, token chunk
  by token chunk) for eager PyTorch (F.linear in fp16, F.cross_entropy(logits.float()), backward of
  loss * S) and for fusedce, at S = 1, 2^8, 2^16: max abs error, max abs error / max |truth|, the
  relative Frobenius error and the median over rows of the row's relative error (the rows of rare
  tokens in grad_weight, invisible to the other three);
- the fwd+bwd time and transient peak memory of fusedce.linear_cross_entropy in fp16 vs bf16 (same
  values rounded to each dtype), at S = 1 and S = 2^16.

    python -m benchmarks fp16 --out RESULT.json [--shape N H V] [--iters K]

(--device cpu: the accuracy part only, a smoke run at a small --shape.)
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
import torch.nn.functional as F

import fusedce

from ._timing import bench, transient_mib
from fusedce import reference

SCALES = (1.0, 2.0**8, 2.0**16)


def inputs(N, H, V, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(N, H, device=device, generator=g) * 2).to(dtype)
    w = (torch.randn(V, H, device=device, generator=g) * 0.02).to(dtype)
    t = torch.randint(0, V, (N,), device=device, generator=g)
    t[torch.rand(N, device=device, generator=g) < 0.05] = -100
    return x, w, t


def truth_grads(x, w, t, chunk=1024):
    """float64 gradients of the mean CE, from reference.py on token chunks (sum per chunk, then
    divided by the global count): the [chunk, V] float64 logits instead of the whole [N, V]."""
    count = float((t != -100).sum())
    wd = w.double().requires_grad_()
    gx = torch.empty(x.shape, dtype=torch.float64, device=x.device)
    gw = torch.zeros(w.shape, dtype=torch.float64, device=w.device)
    for r0 in range(0, x.shape[0], chunk):
        xd = x[r0:r0 + chunk].double().requires_grad_()
        loss = reference.linear_cross_entropy(xd, wd, t[r0:r0 + chunk], reduction="sum").loss / count
        gx[r0:r0 + chunk], gw_chunk = torch.autograd.grad(loss, (xd, wd))
        gw += gw_chunk
    return gx, gw


def errors(got, truth, S):
    d = got.double() / S
    if not torch.isfinite(d).all():
        return dict(max_abs=float("inf"), max_rel=float("inf"), fro_rel=float("inf"),
                    row_rel_median=float("inf"), finite=False)
    diff = d - truth
    norm = truth.norm(dim=-1)
    keep = norm > 0
    return dict(max_abs=float(diff.abs().max()), max_rel=float(diff.abs().max() / truth.abs().max()),
                fro_rel=float(diff.norm() / truth.norm()),
                row_rel_median=float((diff.norm(dim=-1)[keep] / norm[keep]).median()), finite=True)


def eager_grads(x, w, t, S):
    xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = F.cross_entropy(F.linear(xe, we).float(), t)
    return torch.autograd.grad(loss * S, (xe, we))


def fused_grads(x, w, t, S, **kw):
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fusedce.linear_cross_entropy(xf, wf, t, **kw)
    return torch.autograd.grad(loss * S, (xf, wf))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, help="path of the JSON result")
    p.add_argument("--shape", type=int, nargs=3, default=(8192, 4096, 128256), metavar=("N", "H", "V"))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda")
    a = p.parse_args(argv)
    N, H, V = a.shape
    cuda = a.device == "cuda"
    result = dict(device=torch.cuda.get_device_name() if cuda else a.device, torch=torch.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  shape=dict(N=N, H=H, V=V), fusedce_build=fusedce.build_info(),
                  accuracy=[], timing=[])

    x, w, t = inputs(N, H, V, torch.float16, a.device)
    gx_t, gw_t = truth_grads(x, w, t)
    for S in SCALES:
        row = dict(scale=S)
        for name, fn in (("eager", lambda: eager_grads(x, w, t, S)),
                         ("fusedce", lambda: fused_grads(x, w, t, S)),
                         ("fusedce_fp32_grad_accum", lambda: fused_grads(x, w, t, S, fp32_grad_accum=True))):
            gx, gw = fn()
            row[name] = dict(grad_input=errors(gx, gx_t, S), grad_weight=errors(gw, gw_t, S))
            del gx, gw
        for g in ("grad_input", "grad_weight"):
            for m in ("max_abs", "row_rel_median"):
                e = row["eager"][g][m]
                row[f"{g}_{m}_fusedce_over_eager"] = row["fusedce"][g][m] / e if e > 0 else None
        result["accuracy"].append(row)
        print(f"S={S:g}: " + ", ".join(
            f"{g} max_rel eager {row['eager'][g]['max_rel']:.3g} fusedce {row['fusedce'][g]['max_rel']:.3g}"
            f" row_rel eager {row['eager'][g]['row_rel_median']:.3g} fusedce {row['fusedce'][g]['row_rel_median']:.3g}"
            for g in ("grad_input", "grad_weight")), flush=True)
    del gx_t, gw_t

    for dtype in (torch.float16, torch.bfloat16) if cuda else ():
        xs, ws = x.to(dtype), w.to(dtype)
        for S in (1.0, 2.0**16):
            xf, wf = xs.clone().requires_grad_(), ws.clone().requires_grad_()

            def step():
                xf.grad = wf.grad = None
                (fusedce.linear_cross_entropy(xf, wf, t) * S).backward()

            ms = bench(step, a.iters)
            mib = transient_mib(step)
            result["timing"].append(dict(dtype=str(dtype), scale=S, fwd_bwd_ms=ms, transient_mib=mib))
            print(f"{dtype} S={S:g}: {ms:.2f} ms, transient {mib:.0f} MiB", flush=True)
            del xf, wf
    by = {(r["dtype"], r["scale"]): r["fwd_bwd_ms"] for r in result["timing"]}
    result["fp16_over_bf16"] = {str(S): by[("torch.float16", S)] / by[("torch.bfloat16", S)]
                                for S in (1.0, 2.0**16) if ("torch.float16", S) in by}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result["fp16_over_bf16"]))


if __name__ == "__main__":
    main()
