"""Vocab-parallel head losses (fusedce.distributed) against the single-process float64 reference.

One process group per (backend, world size) is spawned once (a module-scoped fixture); every rank
runs every check in it and reports per check, so each check is its own pytest item without paying
a spawn each. gloo on the CPU always (world sizes 2 and 3, uneven shards); NCCL on CUDA: world 1 on
any GPU, world 2 / world 4 when that many GPUs are present.

The full weight is drawn from the same seed on every rank and each rank takes its contiguous slice;
the reference runs on the full weight in float64 and its gradient slice is the expected gradient of
the local shard. The shared sample cases (tests/samples.py: samples_* checks) and the refused
inputs of tests/test_bad_input.py (samples_bad_input) run sharded against the single-process call.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fusedce  # noqa: E402
import fusedce.distributed as fd  # noqa: E402
from fusedce import reference as ref  # noqa: E402
from accuracy import assert_close as budget_close  # noqa: E402
from samples import CASES, sample_inputs, semantic_kwargs  # noqa: E402
from collectives import CollectiveCounter as Counter  # noqa: E402
from ranks import run_checks, run_rank  # noqa: E402

F64 = dict(rtol=1e-9, atol=1e-11)
F32 = dict(rtol=2e-5, atol=2e-6)
F64_SP = dict(rtol=1e-8, atol=1e-9)  # against the single-process op (CUDA float64 kernels)

# ---------------------------------------------------------------------------------------------
# Helpers run inside the workers
# ---------------------------------------------------------------------------------------------


class Ctx:
    def __init__(self, rank, world, dev):
        self.rank, self.world, self.dev = rank, world, dev

    def layout(self, V):
        """Uneven contiguous shards that are not torch.chunk's (the rank's [start, stop))."""
        base = [V // self.world] * self.world
        for i in range(V % self.world):
            base[self.world - 1 - i] += 1  # the remainder on the LAST ranks
        start = sum(base[: self.rank])
        return start, start + base[self.rank]

    def randn(self, *shape, seed, dtype=torch.float64, scale=1.0):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(self.dev, dtype)


def close(a, b, tol, what):
    a = a.detach().to(torch.float64).cpu()
    b = b.detach().to(torch.float64).cpu()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    torch.testing.assert_close(a, b, **tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def leaf(x):
    return x.detach().clone().requires_grad_(True)


def grads_of(loss, *xs):
    gs = torch.autograd.grad(loss, xs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(xs, gs)]


GATHERS = ("all_gather_single", "all_gather_into_tensor", "all_gather")


# ---------------------------------------------------------------------------------------------
# The checks: each runs on every rank with the same arguments.
# ---------------------------------------------------------------------------------------------

CHECKS = {}
MIN_WORLD = {}  # checks whose layout needs several ranks (a sub-group, an empty shard beside others)


def check(fn=None, *, min_world=1):
    def register(fn):
        CHECKS[fn.__name__] = fn
        MIN_WORLD[fn.__name__] = min_world
        return fn
    return register if fn is None else register(fn)


def _ce_setup(c, V=11, N=23, H=6, dtype=torch.float64, seed=0):
    x = c.randn(N, H, seed=seed, dtype=dtype)
    W = c.randn(V, H, seed=seed + 1, dtype=dtype)
    b = c.randn(V, seed=seed + 2, dtype=dtype, scale=0.5)
    cw = (torch.rand(V, generator=torch.Generator().manual_seed(seed + 3), dtype=torch.float64) + 0.5).to(c.dev, dtype)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(seed + 4)).to(c.dev)
    t[::5] = -100
    return x, W, b, cw, t


CE_CONFIGS = [
    dict(),
    dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0, logit_scale=0.7, cw=True, bias=True),
    dict(label_smoothing=0.2, cw=True, reduction="sum"),
    dict(z_loss=1e-3, softcap=2.0, reduction="none", bias=True),
    dict(label_smoothing=0.05, logit_scale=1.3, num_items_in_batch=17, cw=True),
]


def _ce_kwargs(cfg, cw_full, cw_local, b_full, b_local):
    kw = {k: v for k, v in cfg.items() if k not in ("cw", "bias")}
    full, local = dict(kw), dict(kw)
    if cfg.get("cw"):
        full["weight"], local["weight"] = cw_full, cw_local
    return full, local, (b_full if cfg.get("bias") else None), (b_local if cfg.get("bias") else None)


@check
def ce_linear_every_term(c):
    """linear_cross_entropy: values, statistics and gradients (input, shard, bias) in float64."""
    x, W, b, cw, t = _ce_setup(c)
    lo, hi = c.layout(W.shape[0])
    for i, cfg in enumerate(CE_CONFIGS):
        full, local, bf, bl = _ce_kwargs(cfg, cw, cw[lo:hi], b, b[lo:hi])
        xs, Ws, bs = leaf(x), leaf(W[lo:hi]), leaf(bl) if bl is not None else None
        out = fd.linear_cross_entropy(xs, Ws, t, linear_bias=bs, return_stats=True, chunk_size=7, **local)
        xr, Wr, br = leaf(x), leaf(W), leaf(bf) if bf is not None else None
        r = ref.linear_cross_entropy(xr, Wr, t, linear_bias=br, **full)
        upstream = c.randn(*out.loss.shape, seed=99) if out.loss.dim() else torch.tensor(1.3, dtype=torch.float64)
        g = grads_of((out.loss * upstream.to(out.loss)).sum(), *[v for v in (xs, Ws, bs) if v is not None])
        gr = grads_of((r.loss * upstream.to(r.loss)).sum(), *[v for v in (xr, Wr, br) if v is not None])
        tag = f"config {i} {cfg}"
        close(out.loss, r.loss, F64, f"{tag} loss")
        close(out.lse, r.lse, F64, f"{tag} lse")
        assert torch.equal(out.predicted.cpu(), r.predicted.cpu()), f"{tag} predicted"
        close(out.accuracy, r.accuracy, F64, f"{tag} accuracy")
        close(out.z_loss, r.z_loss, F64, f"{tag} z_loss")
        close(g[0], gr[0], F64, f"{tag} grad input")
        close(g[1], gr[1][lo:hi], F64, f"{tag} grad weight shard")
        if bs is not None:
            close(g[2], gr[2][lo:hi], F64, f"{tag} grad bias shard")
        # and the single-process fusedce on the full weight
        sp = fusedce.linear_cross_entropy(x, W, t, linear_bias=bf, return_stats=True, **full)
        close(out.loss, sp.loss, F64_SP, f"{tag} vs fusedce loss")
        assert torch.equal(out.predicted.cpu(), sp.predicted.cpu()), f"{tag} vs fusedce predicted"


ENTROPY_CONFIGS = [
    dict(entropy_coef=0.1),
    dict(entropy_coef=-0.05, label_smoothing=0.1, z_loss=1e-2, softcap=3.0, logit_scale=0.7, cw=True,
         bias=True, return_entropy=True),
    dict(entropy_coef=0.2, label_smoothing=0.2, cw=True, reduction="sum", return_entropy=True),
    dict(entropy_coef=0.1, z_loss=1e-3, softcap=2.0, reduction="none", bias=True, return_entropy=True),
    dict(entropy_coef=0.05, label_smoothing=0.05, logit_scale=1.3, num_items_in_batch=17, cw=True),
    dict(return_entropy=True, label_smoothing=0.1, z_loss=1e-2),  # the entropy output only
    dict(entropy_coef=0.3, shift=True, softcap=2.5, reduction="none"),
]


def _ref_entropy_loss(logits, t, cfg, cw, dtype=torch.float64):
    """float64 reference of linear_cross_entropy with entropy_coef: the CE's token losses plus
    entropy_coef * H at non-ignored tokens, reduced like the CE; and H at every token (dtype=None:
    the same in the logits' dtype, the eager path of an error budget)."""
    kw = {k: cfg[k] for k in ("label_smoothing", "z_loss", "softcap", "logit_scale") if k in cfg}
    if cfg.get("shift"):
        t = ref.shift_labels(t)
    r = ref.cross_entropy(logits, t, weight=cw, reduction="none", dtype=dtype, **kw)
    ent = ref.entropy(logits, logit_scale=cfg.get("logit_scale", 1.0), softcap=cfg.get("softcap"), dtype=dtype)
    valid = t != -100
    tok = r.token_loss + cfg.get("entropy_coef", 0.0) * ent * valid
    red = cfg.get("reduction", "mean")
    if red == "none":
        return tok, ent, r
    if cfg.get("num_items_in_batch") is not None:
        return tok.sum() / cfg["num_items_in_batch"], ent, r
    if red == "sum":
        return tok.sum(), ent, r
    w = torch.ones_like(r.lse) if cw is None else cw[torch.where(valid, t, torch.zeros_like(t))]
    return tok.sum() / (w * valid).sum(), ent, r


@check
def ce_linear_entropy(c):
    """linear_cross_entropy(entropy_coef=..., return_entropy=True) sharded: the loss, the entropy
    output (every row, ignored ones too) and the gradients of input, weight shard and bias shard
    through both, with the smoothing, z-loss, class weights, softcap, logit_scale, shift and each
    reduction, against the float64 reference and the single-process op."""
    x, W, b, cw, t = _ce_setup(c, seed=10)
    lo, hi = c.layout(W.shape[0])
    for i, cfg in enumerate(ENTROPY_CONFIGS):
        tag = f"config {i} {cfg}"
        kw = {k: v for k, v in cfg.items() if k not in ("cw", "bias")}
        cwf = cw if cfg.get("cw") else None
        bf = b if cfg.get("bias") else None
        xs, Ws = leaf(x), leaf(W[lo:hi])
        bs = leaf(b[lo:hi]) if bf is not None else None
        out = fd.linear_cross_entropy(xs, Ws, t, linear_bias=bs, weight=None if cwf is None else cwf[lo:hi],
                                      return_stats=True, chunk_size=6, **kw)
        xr, Wr = leaf(x), leaf(W)
        br = leaf(bf) if bf is not None else None
        rl, rent, r = _ref_entropy_loss(torch.nn.functional.linear(xr, Wr, br), t, cfg, cwf)
        close(out.loss, rl, F64, f"{tag} loss")
        close(out.lse, r.lse, F64, f"{tag} lse")
        close(out.z_loss, _ref_entropy_z(r, cfg, t, cwf), F64, f"{tag} z_loss")
        up = c.randn(*out.loss.shape, seed=98) if out.loss.dim() else torch.tensor(1.3, dtype=torch.float64)
        total, rtotal = (out.loss * up).sum(), (rl * up).sum()
        if cfg.get("return_entropy"):
            close(out.entropy, rent, F64, f"{tag} entropy")
            ue = c.randn(*rent.shape, seed=97)
            total, rtotal = total + (out.entropy * ue).sum(), rtotal + (rent * ue).sum()
        else:
            assert out.entropy is None, f"{tag}: entropy returned without return_entropy"
        diff = [v for v in (xs, Ws, bs) if v is not None]
        g = grads_of(total, *diff)
        gr = grads_of(rtotal, *[v for v in (xr, Wr, br) if v is not None])
        close(g[0], gr[0], F64, f"{tag} grad input")
        close(g[1], gr[1][lo:hi], F64, f"{tag} grad weight shard")
        if bs is not None:
            close(g[2], gr[2][lo:hi], F64, f"{tag} grad bias shard")
        # and the single-process op on the full weight, values and gradients
        xp, Wp = leaf(x), leaf(W)
        bp = leaf(bf) if bf is not None else None
        sp = fusedce.linear_cross_entropy(xp, Wp, t, linear_bias=bp, weight=cwf, return_stats=True, **kw)
        close(out.loss, sp.loss, F64_SP, f"{tag} vs fusedce loss")
        stotal = (sp.loss * up).sum()
        if cfg.get("return_entropy"):
            close(out.entropy, sp.entropy, F64_SP, f"{tag} vs fusedce entropy")
            stotal = stotal + (sp.entropy * ue).sum()
        gs = grads_of(stotal, *[v for v in (xp, Wp, bp) if v is not None])
        close(g[0], gs[0], F64_SP, f"{tag} vs fusedce grad input")
        close(g[1], gs[1][lo:hi], F64_SP, f"{tag} vs fusedce grad weight shard")
    # a float32 head: the entropy rides on float32 tiles; equal to the float64 reference
    x32, W32 = x.float(), W.float()
    xs, Ws = leaf(x32), leaf(W32[lo:hi])
    out = fd.linear_cross_entropy(xs, Ws, t, entropy_coef=0.1, label_smoothing=0.1, softcap=3.0,
                                  return_stats=True, return_entropy=True, chunk_size=5)
    xr, Wr = leaf(x32.double()), leaf(W32.double())
    cfg = dict(entropy_coef=0.1, label_smoothing=0.1, softcap=3.0)
    rl, rent, _ = _ref_entropy_loss(xr @ Wr.T, t, cfg, None)
    close(out.loss, rl, F32, "float32 loss")
    close(out.entropy, rent, F32, "float32 entropy")
    g = grads_of(out.loss + out.entropy.sum(), xs, Ws)
    gr = grads_of(rl + rent.sum(), xr, Wr)
    close(g[0], gr[0], F32, "float32 grad input")
    close(g[1], gr[1][lo:hi], F32, "float32 grad weight shard")
    # bfloat16: the entropy's gradient joins the CE's on a float32 tile (not the bf16 chunk);
    # within the error budget of the same-dtype eager path (tests/accuracy.py)
    xb, Wb = (x * 2).bfloat16(), W.bfloat16()
    xs, Ws = leaf(xb), leaf(Wb[lo:hi])
    out = fd.linear_cross_entropy(xs, Ws, t, return_stats=True, chunk_size=5, **cfg, return_entropy=True)
    ue = c.randn(*t.shape, seed=96)
    g = grads_of(out.loss + (out.entropy * ue.to(out.entropy)).sum(), xs, Ws)
    xr, Wr = leaf(xb.double()), leaf(Wb.double())
    rl, rent, _ = _ref_entropy_loss(xr @ Wr.T, t, cfg, None)
    gr = grads_of(rl + (rent * ue).sum(), xr, Wr)
    xe, We = leaf(xb), leaf(Wb)
    el, eent, _ = _ref_entropy_loss(xe @ We.T, t, cfg, None, dtype=None)
    ge = grads_of(el + (eent * ue.to(eent)).sum(), xe, We)
    bf = torch.bfloat16
    budget_close(out.loss, rl, bf, eager=el, what="bfloat16 loss")
    budget_close(out.entropy, rent, bf, eager=eent, what="bfloat16 entropy")
    budget_close(g[0], gr[0], bf, eager=ge[0], what="bfloat16 grad input")
    budget_close(g[1], gr[1][lo:hi], bf, eager=ge[1][lo:hi], what="bfloat16 grad weight shard")


def _ref_entropy_z(r, cfg, t, cw):
    """The z_loss statistic of LossOutput, reduced like the loss (the reference's own helper
    reduces it with the CE's rule)."""
    if cfg.get("shift"):
        t = ref.shift_labels(t)
    valid = t != -100
    w = (torch.ones_like(r.lse) if cw is None else cw[torch.where(valid, t, torch.zeros_like(t))]) * valid
    z = w * cfg.get("z_loss", 0.0) * r.lse ** 2
    red = cfg.get("reduction", "mean")
    if red == "none":
        return z
    if cfg.get("num_items_in_batch") is not None:
        return z.sum() / cfg["num_items_in_batch"]
    return z.sum() if red == "sum" else z.sum() / w.sum()


@check
def ce_logits_shard_every_term(c):
    """cross_entropy on a logits shard: values, statistics and the gradient of the shard."""
    V, N = 13, 19
    z = c.randn(N, V, seed=5, scale=2.0)
    cw = c.randn(V, seed=6).abs() + 0.3
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(7)).to(c.dev)
    t[1::4] = -100
    lo, hi = c.layout(V)
    for i, cfg in enumerate(CE_CONFIGS):
        full, local, _, _ = _ce_kwargs(cfg, cw, cw[lo:hi], None, None)
        zs, zr = leaf(z[:, lo:hi]), leaf(z)
        out = fd.cross_entropy(zs, t, return_stats=True, chunk_size=4, **local)
        r = ref.cross_entropy(zr, t, **full)
        up = c.randn(*out.loss.shape, seed=98) if out.loss.dim() else torch.tensor(0.7, dtype=torch.float64)
        (g,) = grads_of((out.loss * up.to(out.loss)).sum(), zs)
        (gr,) = grads_of((r.loss * up.to(r.loss)).sum(), zr)
        tag = f"config {i} {cfg}"
        close(out.loss, r.loss, F64, f"{tag} loss")
        close(out.lse, r.lse, F64, f"{tag} lse")
        assert torch.equal(out.predicted.cpu(), r.predicted.cpu()), f"{tag} predicted"
        close(out.accuracy, r.accuracy, F64, f"{tag} accuracy")
        close(out.z_loss, r.z_loss, F64, f"{tag} z_loss")
        close(g, gr[:, lo:hi], F64, f"{tag} grad logits shard")
        sp = fusedce.cross_entropy(z, t, **full)
        close(out.loss, sp, F64_SP, f"{tag} vs fusedce")


@check
def ce_lse_gradient_and_shift(c):
    """A gradient through the per-token lse (recomputing pass) on top of the loss's; shift=True;
    3-D input."""
    V, B, T, H = 11, 3, 5, 4
    x = c.randn(B, T, H, seed=10)
    W = c.randn(V, H, seed=11)
    t = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(12)).to(c.dev)
    lo, hi = c.layout(V)
    xs, Ws = leaf(x), leaf(W[lo:hi])
    out = fd.linear_cross_entropy(xs, Ws, t, shift=True, z_loss=1e-2, return_stats=True, chunk_size=4)
    xr, Wr = leaf(x), leaf(W)
    r = ref.linear_cross_entropy(xr, Wr, t, shift=True, z_loss=1e-2)
    g = grads_of(out.loss + 0.3 * (out.lse ** 2).sum(), xs, Ws)
    gr = grads_of(r.loss + 0.3 * (r.lse ** 2).sum(), xr, Wr)
    close(out.loss, r.loss, F64, "loss")
    close(g[0], gr[0], F64, "grad input")
    close(g[1], gr[1][lo:hi], F64, "grad weight shard")


@check
def ce_argmax_ties_across_ranks(c):
    """The global argmax is the smallest global index among equal maxima, across shard borders.
    Small integers: the logits are exact whatever the GEMM's summation order, so the ties are too."""
    V, N, H = 11, 6, 3
    g = torch.Generator().manual_seed(20)
    x = torch.randint(1, 4, (N, H), generator=g).double().to(c.dev)
    W = torch.randint(-3, 2, (V, H), generator=g).double().to(c.dev)
    lo, hi = c.layout(V)
    lo1 = V // c.world if c.world > 1 else 5  # rank 1's first id in this layout (one rank: mid-vocab)
    for j in (2, lo1, V - 1):
        W[j] = 5.0  # the same, largest row on three ranks (rank 0, rank 1, the last)
    t = torch.arange(N, device=c.dev) % V
    out = fd.linear_cross_entropy(x, W[lo:hi], t, return_stats=True, chunk_size=4)
    r = ref.linear_cross_entropy(x, W, t)
    assert torch.equal(out.predicted.cpu(), r.predicted.cpu()), f"{out.predicted} vs {r.predicted}"
    assert (out.predicted == 2).all(), out.predicted
    close(out.accuracy, r.accuracy, F64, "accuracy")
    z = x @ W.T
    out = fd.cross_entropy(z[:, lo:hi], t, return_stats=True, chunk_size=4)
    assert (out.predicted == 2).all(), out.predicted


@check
def ce_all_ignored_and_masked(c):
    """An all-ignored batch: nan loss, zero gradients; -inf (masked) logits."""
    V, N = 11, 6
    z = c.randn(N, V, seed=30)
    z[:, 3] = -math.inf
    z[0, :] = -math.inf
    z[0, 5] = 1.0
    t = torch.full((N,), -100, device=c.dev)
    lo, hi = c.layout(V)
    zs = leaf(z[:, lo:hi])
    loss = fd.cross_entropy(zs, t)
    (g,) = grads_of(loss, zs)
    assert torch.isnan(loss), loss
    assert (g == 0).all()
    t = torch.tensor([5, 1, 2, 4, 0, 10], device=c.dev)
    zs, zr = leaf(z[:, lo:hi]), leaf(z)
    out = fd.cross_entropy(zs, t, return_stats=True, z_loss=1e-2)
    r = ref.cross_entropy(zr, t, z_loss=1e-2)
    (g,) = grads_of(out.loss, zs)
    (gr,) = grads_of(r.loss, zr)
    close(out.loss, r.loss, F64, "masked loss")
    close(g, gr[:, lo:hi], F64, "masked grad")


@check
def ce_float32(c):
    """float32 inputs: the float32 accumulation path, against the float64 reference."""
    x, W, b, cw, t = _ce_setup(c, V=37, N=40, H=16, dtype=torch.float32, seed=40)
    lo, hi = c.layout(W.shape[0])
    xs, Ws, bs = leaf(x), leaf(W[lo:hi]), leaf(b[lo:hi])
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, ignore_index=-100)
    out = fd.linear_cross_entropy(xs, Ws, t, linear_bias=bs, weight=cw[lo:hi], chunk_size=16,
                                  return_stats=True, **kw)
    xr, Wr, br = leaf(x.double()), leaf(W.double()), leaf(b.double())
    r = ref.linear_cross_entropy(xr, Wr, t, linear_bias=br, weight=cw.double(), **kw)
    g = grads_of(out.loss, xs, Ws, bs)
    gr = grads_of(r.loss, xr, Wr, br)
    assert out.loss.dtype == torch.float32 and g[1].dtype == torch.float32
    close(out.loss, r.loss, F32, "loss")
    close(g[0], gr[0], F32, "grad input")
    close(g[1], gr[1][lo:hi], F32, "grad weight shard")
    close(g[2], gr[2][lo:hi], F32, "grad bias shard")
    sp = fusedce.linear_cross_entropy(x, W, t, linear_bias=b, weight=cw, **kw)
    close(out.loss, sp, F32, "vs fusedce float32")


@check
def ce_bfloat16(c):
    """bfloat16 inputs (the benchmark's dtype): float32 statistics, bf16 gradients, against the
    float64 reference on the same (bf16-rounded) inputs and against single-process fusedce."""
    x, W, b, cw, t = _ce_setup(c, V=37, N=32, H=16, dtype=torch.bfloat16, seed=45)
    lo, hi = c.layout(W.shape[0])
    xs, Ws = leaf(x), leaf(W[lo:hi])
    out = fd.linear_cross_entropy(xs, Ws, t, z_loss=1e-3, chunk_size=8, fp32_grad_accum=True)
    g = grads_of(out, xs, Ws)
    xr, Wr = leaf(x.double()), leaf(W.double())
    r = ref.linear_cross_entropy(xr, Wr, t, z_loss=1e-3)
    gr = grads_of(r.loss, xr, Wr)
    assert out.dtype == torch.float32 and g[0].dtype == torch.bfloat16 and g[1].dtype == torch.bfloat16
    tol = dict(rtol=2e-2, atol=2e-3)
    close(out, r.loss, tol, "loss")
    close(g[0], gr[0], tol, "grad input")
    close(g[1], gr[1][lo:hi], tol, "grad weight shard")
    sp = fusedce.linear_cross_entropy(x, W, t, z_loss=1e-3)
    close(out, sp, dict(rtol=1e-3, atol=1e-4), "vs fusedce bfloat16")


@check
def token_logprobs_and_entropy(c):
    """Token log-probabilities with temperature and their entropy, both differentiated."""
    V, B, T, H = 37, 2, 7, 5
    x = c.randn(B, T, H, seed=50)
    W = c.randn(V, H, seed=51, scale=1.5)
    bias = c.randn(V, seed=52)
    tok = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(53)).to(c.dev)
    lo, hi = c.layout(V)
    for temp in (1.0, 0.7):
        xs, Ws, bs = leaf(x), leaf(W[lo:hi]), leaf(bias[lo:hi])
        lp, ent = fd.token_logprobs(xs, Ws, tok, linear_bias=bs, temperature=temp, return_entropy=True, chunk_size=5)
        xr, Wr, br = leaf(x), leaf(W), leaf(bias)
        lpr, entr = ref.token_logprobs(torch.nn.functional.linear(xr, Wr, br), tok, temperature=temp)
        u1, u2 = c.randn(B, T, seed=54), c.randn(B, T, seed=55)
        g = grads_of((lp * u1).sum() + (ent * u2).sum(), xs, Ws, bs)
        gr = grads_of((lpr * u1).sum() + (entr * u2).sum(), xr, Wr, br)
        close(lp, lpr, F64, f"T={temp} logprobs")
        close(ent, entr, F64, f"T={temp} entropy")
        for name, a, b_, s in (("input", g[0], gr[0], slice(None)), ("weight", g[1], gr[1], slice(lo, hi)),
                               ("bias", g[2], gr[2], slice(lo, hi))):
            close(a, b_[s], F64, f"T={temp} grad {name}")
    lp_only = fd.token_logprobs(x, W[lo:hi], tok, temperature=0.5)
    close(lp_only, ref.token_logprobs(x @ W.T, tok, temperature=0.5)[0], F64, "logprobs only")
    padded = tok.clone()
    padded[0, 2:4] = -100  # HF's padding label: log-probability 0 and no gradient
    xs = leaf(x)
    lp = fd.token_logprobs(xs, W[lo:hi], padded, chunk_size=4)
    (g,) = grads_of(lp.sum(), xs)
    lpr = ref.token_logprobs(x @ W.T, tok)[0]
    close(lp, torch.where(padded == -100, torch.zeros_like(lpr), lpr), F64, "padded logprobs")
    assert (g[0, 2:4] == 0).all()


@check
def token_statistics_every_output(c):
    """token_statistics sharded: every output (logprobs, entropy, mean_logits, log_sum_sq_probs,
    is_top1; -100 tokens and a tie for the top-1 across shards included) with temperature,
    softcap, logit_scale and a bias, against the float64 reference and the single-process op; the
    gradients of logprobs and entropy (input, weight shard, bias shard). A subset of outputs
    leaves the others None."""
    V, B, T, H = 13, 2, 5, 4
    x = c.randn(B, T, H, seed=170)
    W = c.randn(V, H, seed=171, scale=1.5)
    b = c.randn(V, seed=172, scale=0.3)
    W[V - 1] = W[0]  # a tie between the first and the last class (on different ranks)
    b[V - 1] = b[0]
    tok = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(173)).to(c.dev)
    tok[0, 3] = -100
    lo, hi = c.layout(V)
    names = ("logprobs", "entropy", "mean_logits", "log_sum_sq_probs", "is_top1")
    for kw in (dict(), dict(temperature=0.7, softcap=3.0, logit_scale=0.8), dict(temperature=1.6, logit_scale=1.2)):
        xs, Ws, bs = leaf(x), leaf(W[lo:hi]), leaf(b[lo:hi])
        out = fd.token_statistics(xs, Ws, tok, linear_bias=bs, chunk_size=3, **kw)
        xr, Wr, br = leaf(x), leaf(W), leaf(b)
        r = ref.token_statistics(xr @ Wr.T + br, tok, **kw)
        sp = fusedce.token_statistics(x, W, tok, linear_bias=b, **kw)
        for i, n in enumerate(names):
            if n == "is_top1":
                assert torch.equal(out[i].cpu(), r[n].cpu()), f"{kw} is_top1 {out[i]} vs {r[n]}"
                assert torch.equal(out[i].cpu(), sp[i].cpu()), f"{kw} is_top1 vs fusedce"
                continue
            close(out[i], r[n], F64, f"{kw} {n}")
            close(out[i], sp[i], F64_SP, f"{kw} {n} vs fusedce")
        ul, ue = c.randn(B, T, seed=174), c.randn(B, T, seed=175)
        g = grads_of((out.logprobs * ul).sum() + (out.entropy * ue).sum(), xs, Ws, bs)
        gr = grads_of((r["logprobs"] * ul).sum() + (r["entropy"] * ue).sum(), xr, Wr, br)
        close(g[0], gr[0], F64, f"{kw} grad input")
        close(g[1], gr[1][lo:hi], F64, f"{kw} grad weight shard")
        close(g[2], gr[2][lo:hi], F64, f"{kw} grad bias shard")
    # a top-1 tie between class 0 and class V - 1 (first and last shard): the first one wins
    bt = b.clone()
    bt[0] = bt[V - 1] = 30.0
    tt = tok.clone()
    tt[0, 0] = 0
    tt[1, :] = V - 1
    tie = fd.token_statistics(x, W[lo:hi], tt, linear_bias=bt[lo:hi], outputs=("is_top1",), chunk_size=4)
    rt = ref.token_statistics(x @ W.T + bt, tt)["is_top1"]
    assert bool(rt[0, 0]) and not bool(rt[1].any()), rt
    assert torch.equal(tie.is_top1.cpu(), rt.cpu()), f"tie is_top1 {tie.is_top1} vs {rt}"
    some = fd.token_statistics(x, W[lo:hi], tok, outputs=("is_top1",), chunk_size=4)
    assert some.entropy is None and some.mean_logits is None and some.log_sum_sq_probs is None
    close(some.logprobs, ref.token_statistics(x @ W.T, tok)["logprobs"], F64, "subset logprobs")
    assert torch.equal(some.is_top1.cpu(), ref.token_statistics(x @ W.T, tok)["is_top1"].cpu()), "subset is_top1"


def _distill_setup(c, V, B, T, H, Ht, seed):
    """Student and teacher (hidden + weight, and its logits), targets with two ignored positions,
    this rank's vocabulary slice."""
    x = c.randn(B, T, H, seed=seed)
    W = c.randn(V, H, seed=seed + 1)
    xt = c.randn(B, T, Ht, seed=seed + 2)
    Wt = c.randn(V, Ht, seed=seed + 3, scale=1.5)
    tl = torch.nn.functional.linear(xt, Wt)
    tgt = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed + 4)).to(c.dev)
    tgt[0, 1] = -100
    tgt[1, 4] = -100
    lo, hi = c.layout(V)
    return x, W, xt, Wt, tl, tgt, lo, hi


@check
def distillation_every_kind(c):
    """forward KL, reverse KL, JSD; teacher as logits and as hidden + weight; CE part; tempered."""
    V, B, T, H, Ht = 11, 2, 6, 5, 4
    x, W, xt, Wt, tl, tgt, lo, hi = _distill_setup(c, V, B, T, H, Ht, seed=60)
    cases = [("forward_kl", 0.5, 1.0, 0.0, "logits", "mean"), ("reverse_kl", 0.5, 2.0, 0.3, "weight", "mean"),
             ("jsd", 0.5, 1.0, 0.0, "logits", "sum"), ("jsd", 0.2, 1.5, 0.5, "weight", "mean"),
             ("forward_kl", 0.5, 0.8, 0.4, "weight", "none"), ("reverse_kl", 0.5, 1.0, 0.0, "logits", "none"),
             ("jsd", 0.7, 1.0, 0.0, "weight", "none")]
    for kind, beta, temp, cew, teacher, red in cases:
        tag = f"{kind} beta={beta} T={temp} ce={cew} teacher={teacher} {red}"
        xs, Ws = leaf(x), leaf(W[lo:hi])
        tk = dict(teacher_logits=tl[..., lo:hi]) if teacher == "logits" else dict(teacher_input=xt, teacher_weight=Wt[lo:hi])
        out = fd.distillation_loss(xs, Ws, tgt, kind=kind, beta=beta, temperature=temp, distill_weight=0.9,
                                   ce_weight=cew, reduction=red, chunk_size=5, **tk)
        xr, Wr = leaf(x), leaf(W)
        r = ref.distillation_loss(torch.nn.functional.linear(xr, Wr), tl, tgt, kind=kind, beta=beta,
                                  temperature=temp, distill_weight=0.9, ce_weight=cew, reduction=red)
        up = c.randn(*out.shape, seed=65) if out.dim() else torch.tensor(1.1, dtype=torch.float64)
        g = grads_of((out * up).sum(), xs, Ws)
        gr = grads_of((r * up).sum(), xr, Wr)
        close(out, r, F64, f"{tag} loss")
        close(g[0], gr[0], F64, f"{tag} grad input")
        close(g[1], gr[1][lo:hi], F64, f"{tag} grad weight shard")


@check
def distillation_entropy(c):
    """distillation_loss(entropy_coef=...) sharded: every kind, the teacher as logits and as hidden
    + weight, with the CE part, label smoothing, z-loss, softcap, logit_scale and each reduction;
    the entropy is the student's softmax at T = 1 (the single-process op's). Against the float64
    reference and the single-process op, values and gradients of input and weight shard."""
    V, B, T, H, Ht = 13, 2, 6, 5, 4
    x, W, xt, Wt, tl, tgt, lo, hi = _distill_setup(c, V, B, T, H, Ht, seed=160)
    cases = [
        ("forward_kl", dict(entropy_coef=0.1), "logits", "mean"),
        ("reverse_kl", dict(entropy_coef=-0.2, ce_weight=0.5, label_smoothing=0.1, z_loss=1e-2, temperature=1.5),
         "weight", "mean"),
        ("jsd", dict(entropy_coef=0.05, beta=0.3, softcap=3.0, logit_scale=0.8, temperature=0.7), "weight", "sum"),
        ("forward_kl", dict(entropy_coef=0.15, ce_weight=0.3, label_smoothing=0.2, z_loss=1e-3, softcap=2.0,
                            temperature=2.0), "logits", "none"),
        ("reverse_kl", dict(entropy_coef=0.1, distill_weight=0.0, ce_weight=0.0), "logits", "mean"),
    ]
    for kind, kw, teacher, red in cases:
        tag = f"{kind} {kw} teacher={teacher} {red}"
        xs, Ws = leaf(x), leaf(W[lo:hi])
        tk = dict(teacher_logits=tl[..., lo:hi]) if teacher == "logits" else dict(teacher_input=xt, teacher_weight=Wt[lo:hi])
        out = fd.distillation_loss(xs, Ws, tgt, kind=kind, reduction=red, chunk_size=5, **tk, **kw)
        xr, Wr = leaf(x), leaf(W)
        zr = ref.final_logits(torch.nn.functional.linear(xr, Wr), kw.get("logit_scale", 1.0), kw.get("softcap"))
        temp = kw.get("temperature", 1.0)
        div = ref.distillation_token_loss(zr, tl, kind=kind, beta=kw.get("beta", 0.5), temperature=temp)
        ce = ref.cross_entropy(zr, tgt, reduction="none", label_smoothing=kw.get("label_smoothing", 0.0))
        ent = ref.entropy(zr)
        valid = tgt != -100
        tok = (kw.get("distill_weight", 1.0) * div + kw.get("ce_weight", 0.0) * ce.token_loss
               + kw.get("z_loss", 0.0) * ce.lse ** 2 + kw["entropy_coef"] * ent)
        tok = torch.where(valid, tok, torch.zeros_like(tok))
        r = tok if red == "none" else (tok.sum() if red == "sum" else tok.sum() / valid.sum())
        up = c.randn(*out.shape, seed=165) if out.dim() else torch.tensor(1.1, dtype=torch.float64)
        g = grads_of((out * up).sum(), xs, Ws)
        gr = grads_of((r * up).sum(), xr, Wr)
        close(out, r, F64, f"{tag} loss")
        close(g[0], gr[0], F64, f"{tag} grad input")
        close(g[1], gr[1][lo:hi], F64, f"{tag} grad weight shard")
        xp, Wp = leaf(x), leaf(W)
        tkf = dict(teacher_logits=tl) if teacher == "logits" else dict(teacher_input=xt, teacher_weight=Wt)
        sp = fusedce.distillation_loss(xp, Wp, tgt, kind=kind, reduction=red, **tkf, **kw)
        close(out, sp, F64_SP, f"{tag} vs fusedce loss")
        gs = grads_of((sp * up).sum(), xp, Wp)
        close(g[0], gs[0], F64_SP, f"{tag} vs fusedce grad input")
        close(g[1], gs[1][lo:hi], F64_SP, f"{tag} vs fusedce grad weight shard")


@check
def preference_every_loss_type(c):
    """fusedce.preference_loss over a vocabulary-sharded head (and reference head): every loss
    type, its metrics (logits/* included) and the gradients of input, weight shard and bias shard."""
    V, B, T, H = 23, 2, 5, 4
    x = c.randn(2 * B, T, H, seed=90)
    W = c.randn(V, H, seed=91, scale=0.6)
    b = c.randn(V, seed=92, scale=0.2)
    xr = c.randn(2 * B, T, H + 1, seed=93)
    Wr = c.randn(V, H + 1, seed=94, scale=0.6)
    y = torch.randint(0, V, (2 * B, T), generator=torch.Generator().manual_seed(95)).to(c.dev)
    y[:, :2] = -100
    y[1, 4] = -100
    lo, hi = c.layout(V)
    group = dist.group.WORLD
    for lt in ("sigmoid", "hinge", "ipo", "orpo", "cpo", "simpo"):
        with_ref = lt in ("sigmoid", "hinge", "ipo")
        xs, Ws, bs = leaf(x), leaf(W[lo:hi]), leaf(b[lo:hi])
        kw = dict(ref_input=xr, ref_weight=Wr[lo:hi]) if with_ref else {}
        loss, m = fusedce.preference_loss(xs, Ws, y, loss_type=lt, beta=0.4, linear_bias=bs,
                                          temperature=0.8, chunk_size=3, process_group=group, **kw)
        xf, Wf, bf = leaf(x), leaf(W), leaf(b)
        rl, rm = ref.preference_loss(xf @ Wf.T + bf, y, loss_type=lt, beta=0.4, temperature=0.8,
                                     **(dict(ref_logits=xr @ Wr.T) if with_ref else {}))
        _pair_loss_close(lt, loss, m, rl, rm, (xs, Ws, bs), (xf, Wf, bf), lo, hi)


def _pair_loss_close(lt, loss, m, rl, rm, sharded_leaves, full_leaves, lo, hi):
    """A preference-style loss on the sharded head equals the float64 reference: the loss, every
    metric, and the gradients of input, weight shard and bias shard."""
    close(loss, rl, F64, f"{lt} loss")
    assert set(m) == set(rm), f"{lt} metrics {sorted(m)}"
    for k, v in m.items():
        close(v, rm[k], F64, f"{lt} {k}")
    g = grads_of(loss, *sharded_leaves)
    gr = grads_of(rl, *full_leaves)
    close(g[0], gr[0], F64, f"{lt} grad input")
    close(g[1], gr[1][lo:hi], F64, f"{lt} grad weight shard")
    close(g[2], gr[2][lo:hi], F64, f"{lt} grad bias shard")


@check
def kto_both_loss_types(c):
    """fusedce.kto_loss over a vocabulary-sharded head, reference head and KL completions: both
    loss types, every metric and the gradients of input, weight shard and bias shard."""
    V, N, T, H = 23, 5, 5, 4
    x = c.randn(N, T, H, seed=96)
    W = c.randn(V, H, seed=97, scale=0.6)
    b = c.randn(V, seed=98, scale=0.2)
    xr = c.randn(N, T, H + 1, seed=99)
    Wr = c.randn(V, H + 1, seed=100, scale=0.6)
    kx = c.randn(N, T, H, seed=101)
    kxr = c.randn(N, T, H + 1, seed=102, scale=2.0)
    y = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(103)).to(c.dev)
    y[:, :2] = -100
    y[1, 4] = -100
    ky = y.roll(1, 0)  # TRL's mismatched pairs: each prompt with the next row's completion
    desirable = torch.tensor([True, False, True, True, False], device=c.dev)
    lo, hi = c.layout(V)
    group = dist.group.WORLD
    for lt in ("kto", "apo_zero_unpaired"):
        xs, Ws, bs = leaf(x), leaf(W[lo:hi]), leaf(b[lo:hi])
        kl_kw = dict(kl_input=kx, kl_target=ky, ref_kl_input=kxr) if lt == "kto" else {}
        loss, m = fusedce.kto_loss(xs, Ws, y, desirable, loss_type=lt, beta=0.4, linear_bias=bs,
                                   ref_input=xr, ref_weight=Wr[lo:hi], temperature=0.8, chunk_size=3,
                                   desirable_weight=1.3, process_group=group, **kl_kw)
        xf, Wf, bf = leaf(x), leaf(W), leaf(b)
        rkl = dict(kl_logits=kx @ W.T + b, kl_target=ky, ref_kl_logits=kxr @ Wr.T) if lt == "kto" else {}
        rl, rm = ref.kto_loss(xf @ Wf.T + bf, y, desirable, loss_type=lt, beta=0.4, temperature=0.8,
                              ref_logits=xr @ Wr.T, desirable_weight=1.3, **rkl)
        assert lt != "kto" or m["kl"].item() > 0.1, "the KL term was clamped away"
        _pair_loss_close(lt, loss, m, rl, rm, (xs, Ws, bs), (xf, Wf, bf), lo, hi)


@check
def policy_every_loss_type(c):
    """Every TRL 1.16 loss type at token and sequence level, clipping active on both sides, beta > 0,
    entropy bonus, mask, and the TRL options (delta, IS ratios, num_items_in_batch, ...)."""
    V, B, T, H = 37, 3, 6, 5
    x = c.randn(B, T, H, seed=70)
    W = c.randn(V, H, seed=71)
    tok = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(72)).to(c.dev)
    lpr0, _ = ref.token_logprobs(x @ W.T, tok, temperature=0.9)
    old = lpr0 + c.randn(B, T, seed=73, scale=0.4)  # ratios well outside [0.8, 1.2] both ways
    adv = c.randn(B, T, seed=74)
    refl = lpr0 + c.randn(B, T, seed=75, scale=0.3)
    mask = torch.ones(B, T, device=c.dev)
    mask[0, 4:] = 0
    mask[2, 1] = 0
    lo, hi = c.layout(V)
    ratio = torch.exp(lpr0 - old)
    assert ((ratio > 1.2) & (adv > 0)).any() and ((ratio < 0.8) & (adv < 0)).any(), "clipping not exercised"
    isr = torch.rand(B, T, generator=torch.Generator().manual_seed(76), dtype=x.dtype).to(c.dev) * 1.5
    configs = [
        ("token", dict(beta=0.04, ref_logprobs=refl, entropy_coef=0.01, mask=mask)),
        ("token", dict(epsilon_high=0.28, max_completion_length=8, advantages_1d=True)),
        # every TRL 1.16 option at once (vLLM IS ratios, two-sided clipping, the plain KL, a
        # global normalizer as a tensor, gradient accumulation)
        ("token", dict(beta=0.04, ref_logprobs=refl, use_bias_correction_kl=False, delta=1.3,
                       importance_sampling_ratio=isr, entropy_coef=0.02, gradient_accumulation_steps=2,
                       num_items_in_batch=torch.tensor(9.0, device=c.dev), mask=mask)),
        # the two-pass path (sharded token log-probabilities, then the [B, T] math)
        ("sequence", dict(beta=0.04, ref_logprobs=refl, entropy_coef=0.01, mask=mask,
                          importance_sampling_ratio=isr)),
    ]
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo"):
        for level, kw in configs:
            kw = dict(kw, importance_sampling_level=level)
            a = adv[:, 0] if kw.pop("advantages_1d", False) else adv
            tag = f"{lt} {sorted(kw)}"
            xs, Ws = leaf(x), leaf(W[lo:hi])
            loss, metrics = fd.policy_loss(xs, Ws, tok, old, a, temperature=0.9, loss_type=lt, chunk_size=4, **kw)
            xr, Wr = leaf(x), leaf(W)
            rl, rpt, rlp, rent = ref.policy_loss(xr @ Wr.T, tok, old, a, temperature=0.9, loss_type=lt, **kw)
            g = grads_of(loss, xs, Ws)
            gr = grads_of(rl, xr, Wr)
            close(loss, rl, F64, f"{tag} loss")
            mm = kw.get("mask", torch.ones(B, T, device=c.dev)).to(rlp)
            mean = lambda v: (v * mm).sum() / mm.sum()  # noqa: E731
            close(metrics["logprob/mean"], mean(rlp), F64, f"{tag} logprob/mean")
            close(metrics["entropy"], mean(rent), F64, f"{tag} entropy")
            r = torch.exp(rlp - old)
            if level == "token":
                close(metrics["ratio/mean"], mean(r), F64, f"{tag} ratio/mean")
                if "ref_logprobs" in kw:
                    d = refl - rlp
                    k3 = torch.exp(d) - d - 1
                    close(metrics["kl"], mean(k3 * r if kw.get("use_bias_correction_kl", True) else k3), F64, f"{tag} kl")
            close(g[0], gr[0], F64, f"{tag} grad input")
            close(g[1], gr[1][lo:hi], F64, f"{tag} grad weight shard")


@check
def head_transforms_every_term(c):
    """softcap and logit_scale (applied before the temperature, as a sampler sees the final logits)
    in token log-probs, distillation and the policy loss: sharded and single-process fusedce both
    equal the reference on final_logits(x @ W.T)."""
    V, B, T, H = 13, 2, 5, 4
    x = c.randn(B, T, H, seed=130)
    W = c.randn(V, H, seed=131, scale=2.0)
    tok = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(132)).to(c.dev)
    tl = c.randn(B, T, V, seed=133)
    lo, hi = c.layout(V)
    hk = dict(softcap=3.0, logit_scale=0.8)
    zfin = lambda W_: ref.final_logits(x @ W_.T, hk["logit_scale"], hk["softcap"])  # noqa: E731
    for name, fn in (("sharded", lambda *a, **k: getattr(fd, k.pop("f"))(*a, **k)),
                     ("single", lambda *a, **k: getattr(fusedce, k.pop("f"))(*a, **k))):
        shard = name == "sharded"
        Wl = leaf(W[lo:hi] if shard else W)
        lp, ent = fn(x, Wl, tok, f="token_logprobs", temperature=0.7, return_entropy=True, **hk)
        Wr = leaf(W)
        rlp, rent = ref.token_logprobs(zfin(Wr), tok, temperature=0.7)
        close(lp, rlp, F64, f"{name} logprobs")
        close(ent, rent, F64, f"{name} entropy")
        g = grads_of(lp.sum() + ent.sum(), Wl)[0]
        gr = grads_of(rlp.sum() + rent.sum(), Wr)[0]
        close(g, gr[lo:hi] if shard else gr, F64, f"{name} logprobs grad")
        Wl, Wr = leaf(W[lo:hi] if shard else W), leaf(W)
        d = fn(x, Wl, tok, f="distillation_loss", teacher_logits=tl[..., lo:hi] if shard else tl,
               temperature=1.5, ce_weight=0.5, **hk)
        rd = ref.distillation_loss(zfin(Wr), tl, tok, temperature=1.5, ce_weight=0.5)
        close(d, rd, F64, f"{name} distillation")
        # with label smoothing and a z-loss in the same call (the CE part at T = 1)
        Wl2, Wr2 = leaf(W[lo:hi] if shard else W), leaf(W)
        d2 = fn(x, Wl2, tok, f="distillation_loss", teacher_logits=tl[..., lo:hi] if shard else tl,
                temperature=1.5, ce_weight=0.5, label_smoothing=0.1, z_loss=1e-2, **hk)
        zr = zfin(Wr2)
        kl = ref.distillation_token_loss(zr, tl, temperature=1.5)
        cer = ref.cross_entropy(zr, tok, label_smoothing=0.1, reduction="none")
        rd2 = (kl + 0.5 * cer.token_loss + 1e-2 * cer.lse ** 2).mean()
        close(d2, rd2, F64, f"{name} distillation + smoothing + z-loss")
        g2, gr2 = grads_of(d2, Wl2)[0], grads_of(rd2, Wr2)[0]
        close(g2, gr2[lo:hi] if shard else gr2, F64, f"{name} distillation + smoothing + z-loss grad")
        close(grads_of(d, Wl)[0], grads_of(rd, Wr)[0][lo:hi] if shard else grads_of(rd, Wr)[0],
              F64, f"{name} distillation grad")
        old = rlp.detach() + c.randn(B, T, seed=134, scale=0.3)
        adv = c.randn(B, seed=135)
        Wl, Wr = leaf(W[lo:hi] if shard else W), leaf(W)
        pl = fn(x, Wl, tok, old, adv, f="policy_loss", temperature=0.7, beta=0.0, **hk)[0]
        rp = ref.policy_loss(zfin(Wr), tok, old, adv, temperature=0.7)[0]
        close(pl, rp, F64, f"{name} policy")
        gp, grp = grads_of(pl, Wl)[0], grads_of(rp, Wr)[0]
        close(gp, grp[lo:hi] if shard else grp, F64, f"{name} policy grad")


@check
def dtensor_weight(c):
    """A DTensor weight Shard(0) on a 1-D mesh (torch.chunk's uneven layout): the local shard and
    the mesh's group are used, and the gradient reaches the DTensor parameter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    V, N, H = 11, 9, 4
    x = c.randn(N, H, seed=80)
    W = c.randn(V, H, seed=81)
    b = c.randn(V, seed=82)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(83)).to(c.dev)
    mesh = init_device_mesh(c.dev.type, (c.world,))
    Wd = torch.nn.Parameter(distribute_tensor(W, mesh, [Shard(0)]))
    bd = torch.nn.Parameter(distribute_tensor(b, mesh, [Shard(0)]))
    xs = leaf(x)
    loss = fd.linear_cross_entropy(xs, Wd, t, linear_bias=bd, label_smoothing=0.1, chunk_size=4)
    loss.backward()
    xr, Wr, br = leaf(x), leaf(W), leaf(b)
    r = ref.linear_cross_entropy(xr, Wr, t, linear_bias=br, label_smoothing=0.1)
    r.loss.backward()
    close(loss, r.loss, F64, "loss")
    close(xs.grad, xr.grad, F64, "grad input")
    assert Wd.grad is not None and type(Wd.grad).__name__ == "DTensor", type(Wd.grad)
    close(Wd.grad.full_tensor(), Wr.grad, F64, "DTensor weight grad")
    close(bd.grad.full_tensor(), br.grad, F64, "DTensor bias grad")
    lp = fd.token_logprobs(x, Wd.detach(), t)
    close(lp, ref.token_logprobs(x @ W.T, t)[0], F64, "DTensor token_logprobs")


@check
def public_entry_points(c):
    """fusedce's public functions with process_group= are the sharded ones (a DTensor weight alone is
    not: tests/test_fsdp.py checks it is refused):
    the same values as fusedce.distributed's, from the same shards."""
    V, N, H = 13, 8, 4
    x = c.randn(N, H, seed=120)
    W = c.randn(V, H, seed=121)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(122)).to(c.dev)
    lo, hi = c.layout(V)
    group = dist.group.WORLD
    Ws = W[lo:hi]
    close(fusedce.linear_cross_entropy(x, Ws, t, process_group=group, z_loss=1e-3),
          fd.linear_cross_entropy(x, Ws, t, z_loss=1e-3), F64, "linear_cross_entropy")
    close(fusedce.cross_entropy(x @ Ws.T, t, process_group=group),
          fd.cross_entropy(x @ Ws.T, t), F64, "cross_entropy")
    close(fusedce.token_logprobs(x, Ws, t, process_group=group),
          ref.token_logprobs(x @ W.T, t)[0], F64, "token_logprobs")
    tl = c.randn(N, V, seed=123)
    close(fusedce.distillation_loss(x, Ws, t, teacher_logits=tl[:, lo:hi], process_group=group),
          ref.distillation_loss(x @ W.T, tl, t), F64, "distillation_loss")
    adv = c.randn(2, seed=124)
    old = c.randn(2, N // 2, seed=125) - 2
    xb, tb = x.reshape(2, N // 2, H), t.reshape(2, N // 2)
    close(fusedce.policy_loss(xb, Ws, tb, old, adv, process_group=group)[0],
          ref.policy_loss(xb @ W.T, tb, old, adv)[0], F64, "policy_loss")


@check(min_world=2)
def process_group_subgroup(c):
    """process_group= a subgroup (the last two ranks): ranks, offsets and collectives are the
    group's; ranks outside it do nothing."""
    members = [c.world - 2, c.world - 1]
    group = dist.new_group(members)  # every rank calls new_group
    if c.rank not in members:
        return
    sub = Ctx(members.index(c.rank), 2, c.dev)
    V, N, H = 11, 10, 4
    x = c.randn(N, H, seed=95)
    W = c.randn(V, H, seed=96)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(97)).to(c.dev)
    lo, hi = sub.layout(V)
    xs, Ws = leaf(x), leaf(W[lo:hi])
    out = fd.linear_cross_entropy(xs, Ws, t, process_group=group, label_smoothing=0.1, return_stats=True, chunk_size=3)
    g = grads_of(out.loss, xs, Ws)
    xr, Wr = leaf(x), leaf(W)
    r = ref.linear_cross_entropy(xr, Wr, t, label_smoothing=0.1)
    gr = grads_of(r.loss, xr, Wr)
    close(out.loss, r.loss, F64, "loss")
    assert torch.equal(out.predicted.cpu(), r.predicted.cpu())
    close(g[0], gr[0], F64, "grad input")
    close(g[1], gr[1][lo:hi], F64, "grad weight shard")


@check
def offset_on_the_device(c):
    """vocab_start=None: the offset comes from a gather of the shard sizes and stays on the device
    (targets shifted there), so the call equals the one given vocab_start, with ignore_index a
    class id (a shifted valid target can equal it) on the CE kernels and on the term ops; on CUDA
    a whole fwd+bwd of each makes no host synchronization."""
    V, N, H = 13, 21, 5
    x = c.randn(N, H, seed=70)
    W = c.randn(V, H, seed=71)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(72)).to(c.dev)
    t[::4] = 2  # ignore_index below: a class id that the shifted ids of other shards hit
    lo, hi = c.layout(V)
    calls = {
        "ce": lambda xs, **kw: fd.linear_cross_entropy(
            xs, W[lo:hi], t, ignore_index=2, label_smoothing=0.1, return_stats=True, **kw),
        "terms": lambda xs, **kw: fd.linear_cross_entropy(
            xs, W[lo:hi], t, ignore_index=2, entropy_coef=0.1, return_stats=True, return_entropy=True, **kw),
        "logprobs": lambda xs, **kw: fd.token_statistics(xs, W[lo:hi], t, **kw),
    }
    for name, call in calls.items():
        xa, xb = leaf(x), leaf(x)
        if c.dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            a = call(xa)
            la = a.loss if hasattr(a, "loss") else a.logprobs.sum()
            ga, = torch.autograd.grad(la, xa)
        finally:
            if c.dev.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        b = call(xb, vocab_start=lo)
        lb = b.loss if hasattr(b, "loss") else b.logprobs.sum()
        gb, = torch.autograd.grad(lb, xb)
        close(la, lb, dict(rtol=1e-12, atol=1e-12), f"{name} loss")
        close(ga, gb, dict(rtol=1e-12, atol=1e-12), f"{name} grad_input")
        if hasattr(a, "predicted"):
            assert torch.equal(a.predicted.cpu(), b.predicted.cpu()), f"{name} predicted"
        else:
            assert torch.equal(a.is_top1.cpu(), b.is_top1.cpu()), f"{name} is_top1"


@check
def collective_count(c):
    """ONE collective per chunk in forward (two for JSD), ONE (grad_input) in backward; the vocab
    layout setup collective once per (group, V_local), then cached."""
    V, N, H = 11, 20, 4
    x = c.randn(N, H, seed=90)
    W = c.randn(V, H, seed=91)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(92)).to(c.dev)
    lo, hi = c.layout(V)
    n_chunks = 4  # chunk_size 5
    with Counter() as cnt:
        xs, Ws = leaf(x), leaf(W[lo:hi])
        loss = fd.linear_cross_entropy(xs, Ws, t, label_smoothing=0.1, z_loss=1e-3, softcap=4.0,
                                       return_stats=True, chunk_size=5).loss
        fwd = cnt.take()
        assert len(fwd) == 1 + n_chunks and all(n in GATHERS for n in fwd), f"setup + chunks: {fwd}"
        loss.backward()
        assert cnt.take() == ["all_reduce"], "backward"
        # vocab_start given: exactly one gather per chunk, every term requested
        xs = leaf(x)
        loss = fd.linear_cross_entropy(xs, Ws, t, vocab_start=lo, label_smoothing=0.1, z_loss=1e-3,
                                       weight=torch.ones(hi - lo, dtype=x.dtype, device=c.dev), softcap=4.0,
                                       return_stats=True, chunk_size=5).loss
        fwd = cnt.take()
        assert len(fwd) == n_chunks and all(n in GATHERS for n in fwd), f"forward: {fwd}"
        loss.backward()
        assert cnt.take() == ["all_reduce"], "backward"
        # reduce_grad_input=False: no collective in backward; partials sum to the full gradient
        xs = leaf(x)
        loss = fd.linear_cross_entropy(xs, Ws, t, vocab_start=lo, chunk_size=5, reduce_grad_input=False)
        cnt.take()
        loss.backward()
        assert cnt.take() == [], "reduce_grad_input=False backward"
        partial = xs.grad.clone()
        dist.all_reduce(partial)
        cnt.take()
        xr = leaf(x)
        ref.linear_cross_entropy(xr, W, t).loss.backward()
        close(partial, xr.grad, F64, "summed partial grad_input")
        # logits shard: no backward collective at all
        zs = leaf(x @ W[lo:hi].T)
        loss = fd.cross_entropy(zs, t, vocab_start=lo, chunk_size=5)
        assert len(cnt.take()) == n_chunks
        loss.backward()
        assert cnt.take() == []
        # per-token outputs: recomputing backward, one per chunk + grad_input
        xs = leaf(x)
        lp = fd.token_logprobs(xs, Ws, t, vocab_start=lo, chunk_size=5)
        assert len(cnt.take()) == n_chunks
        lp.sum().backward()
        bwd = cnt.take()
        assert len(bwd) == n_chunks + 1 and bwd[-1] == "all_reduce", bwd
        # distillation: one per chunk (KL), two per chunk (JSD)
        for kind, per in (("forward_kl", 1), ("reverse_kl", 1), ("jsd", 2)):
            loss = fd.distillation_loss(leaf(x), Ws, t, teacher_weight=Ws.detach() * 0.5, kind=kind,
                                        vocab_start=lo, chunk_size=5)
            assert len(cnt.take()) == per * n_chunks, kind
            loss.backward()
            assert cnt.take() == ["all_reduce"], kind
        # the entropy terms ride in the same gather: one per chunk, one all_reduce in backward
        out = fd.linear_cross_entropy(leaf(x), Ws, t, vocab_start=lo, label_smoothing=0.1, z_loss=1e-3,
                                      entropy_coef=0.1, return_stats=True, return_entropy=True, chunk_size=5)
        fwd = cnt.take()
        assert len(fwd) == n_chunks and all(n in GATHERS for n in fwd), f"entropy forward: {fwd}"
        out.loss.backward()
        assert cnt.take() == ["all_reduce"], "entropy backward"
        loss = fd.distillation_loss(leaf(x), Ws, t, teacher_weight=Ws.detach() * 0.5, entropy_coef=0.1,
                                    ce_weight=0.5, vocab_start=lo, chunk_size=5)
        assert len(cnt.take()) == n_chunks, "distillation + entropy forward"
        loss.backward()
        assert cnt.take() == ["all_reduce"], "distillation + entropy backward"
        # token statistics: every metric in the log-probabilities' one gather per chunk
        st = fd.token_statistics(leaf(x), Ws, t, vocab_start=lo, chunk_size=5)
        assert len(cnt.take()) == n_chunks, "token_statistics forward"
        (st.logprobs.sum() + st.entropy.sum()).backward()
        bwd = cnt.take()
        assert len(bwd) == n_chunks + 1 and bwd[-1] == "all_reduce", bwd
        # policy loss
        loss, _ = fd.policy_loss(leaf(x)[None], Ws, t[None], None, torch.ones(1, N, dtype=x.dtype, device=c.dev),
                                 vocab_start=lo, chunk_size=5)
        assert len(cnt.take()) == n_chunks
        loss.backward()
        assert cnt.take() == ["all_reduce"]


def _error_of(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the error is the result
        return e
    return None


def same_error(single, sharded, what):
    """Both paths refuse the call with the same exception type and message (first line: a C++
    error may carry more context below it)."""
    a, b = _error_of(single), _error_of(sharded)
    assert a is not None, f"{what}: the single-process call did not raise"
    assert b is not None, f"{what}: the sharded call did not raise (single-process: {a!r})"
    assert type(a) is type(b), f"{what}: {type(a).__name__}({a}) vs sharded {type(b).__name__}({b})"
    assert str(a).splitlines()[0] == str(b).splitlines()[0], f"{what}: {a} vs sharded {b}"


@check
def sharded_same_argument_checks(c):
    """Both paths run the one argument check (fusedce/_checks.py) before routing: softcap=0.0,
    a negative z_loss, float targets, token_logprobs(softcap=0), distillation limits, a bad
    ignore_index give the single-process error on the sharded path too."""
    V, N, H = 11, 6, 4
    x = c.randn(N, H, seed=300)
    W = c.randn(V, H, seed=301)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(302)).to(c.dev)
    lo, hi = c.layout(V)
    g = dist.group.WORLD
    Ws = W[lo:hi]
    z = x @ W.T
    cases = {
        "softcap=0": dict(softcap=0.0),
        "z_loss<0": dict(z_loss=-1e-3),
        "label_smoothing>1": dict(label_smoothing=1.5),
        "ignore_index=2**64": dict(ignore_index=2**64),
        "nan logit_scale": dict(logit_scale=math.nan),
        "chunk_size=0": dict(chunk_size=0),
    }
    for what, kw in cases.items():
        same_error(lambda: fusedce.linear_cross_entropy(x, W, t, **kw),
                   lambda: fusedce.linear_cross_entropy(x, Ws, t, process_group=g, **kw), f"lce {what}")
        same_error(lambda: fusedce.cross_entropy(z, t, **kw),
                   lambda: fusedce.cross_entropy(z[:, lo:hi], t, process_group=g, **kw), f"ce {what}")
    same_error(lambda: fusedce.linear_cross_entropy(x, W, t.double()),
               lambda: fd.linear_cross_entropy(x, Ws, t.double()), "float target")
    same_error(lambda: fusedce.token_logprobs(x, W, t, softcap=0),
               lambda: fd.token_logprobs(x, Ws, t, softcap=0), "token_logprobs softcap=0")
    same_error(lambda: fusedce.token_logprobs(x, W, t.float()),
               lambda: fd.token_logprobs(x, Ws, t.float()), "token_logprobs float tokens")
    for what, kw in (("softcap=0", dict(softcap=0)), ("temperature=0", dict(temperature=0.0)),
                     ("unknown output", dict(outputs=("logprobs", "top5"))), ("chunk_size=0", dict(chunk_size=0))):
        same_error(lambda: fusedce.token_statistics(x, W, t, **kw),
                   lambda: fd.token_statistics(x, Ws, t, **kw), f"token_statistics {what}")
    same_error(lambda: fusedce.linear_cross_entropy(x, W, t, entropy_coef=math.nan),
               lambda: fd.linear_cross_entropy(x, Ws, t, entropy_coef=math.nan), "entropy_coef nan")
    for kw in (dict(z_loss=-1.0), dict(label_smoothing=2.0), dict(distill_weight=-1.0), dict(ce_weight=-1.0),
               dict(kind="jsd", beta=1.0), dict(temperature=0.0)):
        same_error(lambda: fusedce.distillation_loss(x, W, t, teacher_logits=z, **kw),
                   lambda: fd.distillation_loss(x, Ws, t, teacher_logits=z[:, lo:hi], **kw), f"distillation {kw}")
    xb, tb = x.reshape(2, N // 2, H), t.reshape(2, N // 2)
    adv = c.randn(2, seed=303)
    for kw in (dict(loss_type="ppo"), dict(epsilon_low=2.0), dict(beta=0.1), dict(temperature=-1.0)):
        same_error(lambda: fusedce.policy_loss(xb, W, tb, None, adv, **kw),
                   lambda: fd.policy_loss(xb, Ws, tb, None, adv, **kw), f"policy {kw}")


@check
def sharded_target_out_of_range(c):
    """Each rank sees only its shard, so the range is checked against the GLOBAL vocabulary (the
    shards' sizes travel with the chunk's partials): the single-process error, on every rank at
    once (no collective left unmatched). A target past a rank's own shard but inside the
    vocabulary is fine (every other check)."""
    V, N, H = 11, 6, 4
    x = c.randn(N, H, seed=310)
    W = c.randn(V, H, seed=311)
    lo, hi = c.layout(V)
    g = dist.group.WORLD
    Ws, z = W[lo:hi], x @ W.T
    # The raising half runs in validation mode: a default CUDA call never reads the targets back
    # (both paths give NaN instead: below); the CPU raises either way.
    with fusedce.validate_targets():
        for bad in (V, -1, -100 + 1, 10**9):
            t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(312)).to(c.dev)
            t[3] = bad
            for cs in (None, 2):  # the bad row in the first chunk or in a later one
                same_error(lambda: fusedce.linear_cross_entropy(x, W, t),
                           lambda: fusedce.linear_cross_entropy(x, Ws, t, process_group=g, chunk_size=cs), f"lce {bad}")
                same_error(lambda: fusedce.cross_entropy(z, t),
                           lambda: fusedce.cross_entropy(z[:, lo:hi], t, process_group=g, chunk_size=cs), f"ce {bad}")
                same_error(lambda: fusedce.token_logprobs(x, W, t),
                           lambda: fd.token_logprobs(x, Ws, t, chunk_size=cs), f"token_logprobs {bad}")
                same_error(lambda: fusedce.distillation_loss(x, W, t, teacher_logits=z),
                           lambda: fd.distillation_loss(x, Ws, t, teacher_logits=z[:, lo:hi], chunk_size=cs),
                           f"distillation {bad}")
                xb, tb = x.reshape(2, N // 2, H), t.reshape(2, N // 2)
                adv = c.randn(2, seed=313)
                same_error(lambda: fusedce.policy_loss(xb, W, tb, None, adv),
                           lambda: fd.policy_loss(xb, Ws, tb, None, adv, chunk_size=cs), f"policy {bad}")
                err = _error_of(lambda: fd.policy_loss(xb, Ws, tb, None, adv, chunk_size=cs))
                assert "tokens" in str(err) and "ignore_index" not in str(err), err
    # Where no host read is allowed (a default CUDA call; forced here on any device): no error,
    # but the NaN of the single-process CUDA kernels: loss, the bad token's values, every gradient.
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(312)).to(c.dev)
    t[3] = V
    layer = fusedce._parallel  # the vocab-parallel layer's own check (fusedce/_parallel.py)
    saved = layer.host_target_check
    layer.host_target_check = lambda device: False
    try:
        xs, Ws = leaf(x), leaf(W[lo:hi])
        loss = fd.linear_cross_entropy(xs, Ws, t, chunk_size=2)
        loss.backward()
        assert loss.isnan() and xs.grad.isnan().all() and Ws.grad.isnan().all(), (loss, xs.grad)
        tok = fd.linear_cross_entropy(x, W[lo:hi], t, reduction="none")
        assert tok[3].isnan() and not tok[[0, 1, 2, 4, 5]].isnan().any(), tok
        assert fd.token_logprobs(x, W[lo:hi], t)[3].isnan()
    finally:
        layer.host_target_check = saved
    # masked-out policy tokens may hold anything (padding), on both paths alike
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(314)).to(c.dev)
    xb, tb = x.reshape(2, N // 2, H), t.reshape(2, N // 2)
    mask = torch.ones(2, N // 2, dtype=x.dtype, device=c.dev)
    mask[0, 1] = mask[1, 2] = 0
    padded = tb.clone()
    padded[0, 1], padded[1, 2] = -1, V + 5
    adv, old = c.randn(2, seed=315), c.randn(2, N // 2, seed=316) - 2
    close(fd.policy_loss(xb, Ws, padded, old, adv, mask=mask, chunk_size=2)[0],
          ref.policy_loss(xb @ W.T, tb, old, adv, mask=mask)[0], F64, "policy with masked padding")


@check(min_world=2)
def sharded_empty_shard(c):
    """Rank 0 holds an empty shard (the other ranks split the vocabulary). The argument check (run
    before routing, on every rank) accepts the empty shard, so no rank is left waiting in a
    collective, and the results equal the reference."""
    V, N, H = 5, 5, 3
    x = c.randn(N, H, seed=330)
    W = c.randn(V, H, seed=331)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(332)).to(c.dev)
    bounds = [0] + [round(V * r / (c.world - 1)) for r in range(c.world)]
    lo, hi = bounds[c.rank], bounds[c.rank + 1]
    g = dist.group.WORLD
    xs, Ws = leaf(x), leaf(W[lo:hi])
    loss = fusedce.linear_cross_entropy(xs, Ws, t, process_group=g, label_smoothing=0.1)
    loss.backward()
    xr, Wr = leaf(x), leaf(W)
    r = ref.linear_cross_entropy(xr, Wr, t, label_smoothing=0.1).loss
    r.backward()
    close(loss, r, F64, "loss")
    close(xs.grad, xr.grad, F64, "grad input")
    close(Ws.grad, Wr.grad[lo:hi], F64, "grad weight shard")
    close(fusedce.cross_entropy(x @ W[lo:hi].T, t, process_group=g), F.cross_entropy(x @ W.T, t), F64, "cross_entropy")
    close(fusedce.token_logprobs(x, W[lo:hi], t, process_group=g), ref.token_logprobs(x @ W.T, t)[0], F64, "token_logprobs")


@check(min_world=2)
def vocab_ranges_that_do_not_tile(c):
    """Given vocab_start values whose ranges overlap (each rank says 0) or leave a gap are refused
    by name on every rank (a target owned by two ranks, or by none, shows it in the one gather:
    no extra collective) instead of a silently wrong loss; a tiling in another order than the
    ranks' (rank 0 holding the last ids) is a valid layout and equals the reference."""
    V, N, H = 9, 12, 4
    x = c.randn(N, H, seed=350)
    W = c.randn(V, H, seed=351)
    t = torch.arange(N).remainder(V).to(c.dev)  # every id a target: a gap or an overlap is hit
    t[-1] = -100
    lo, hi = c.layout(V)
    g = dist.group.WORLD
    spans = [Ctx(r, c.world, c.dev).layout(V) for r in range(c.world)]
    sizes = [b - a for a, b in spans]
    for name, start, cw in (("overlap", 0, None), ("gap", lo + (1 if c.rank else 0), None),
                            ("overlap, class weights", 0, torch.ones(hi - lo, dtype=x.dtype, device=c.dev))):
        for fn in (lambda: fd.linear_cross_entropy(x, W[lo:hi], t, vocab_start=start, weight=cw, process_group=g),
                   # owners counted per chunk of the loop, checked after it
                   lambda: fd.linear_cross_entropy(x, W[lo:hi], t, vocab_start=start, weight=cw, chunk_size=5,
                                                   process_group=g),
                   lambda: fd.linear_cross_entropy(x, W[lo:hi], t, vocab_start=start, entropy_coef=0.1,
                                                   process_group=g),
                   lambda: fd.token_logprobs(x, W[lo:hi], t, vocab_start=start, process_group=g),
                   lambda: fd.cross_entropy(x @ W[lo:hi].T, t, vocab_start=start, process_group=g)):
            err = _error_of(fn)
            assert isinstance(err, ValueError) and "vocab_start" in str(err), f"{name}: {err!r}"
    # the ranks' ranges in reverse order: rank r holds the ids after those of ranks r+1, ...
    rev_start = sum(sizes[c.rank + 1:])
    perm = torch.cat([torch.arange(a, b) for a, b in reversed(spans)])
    Wp = W[perm.to(c.dev)]  # the full head in global id order of that layout
    xr, Wr = leaf(x), leaf(Wp)
    r = ref.linear_cross_entropy(xr, Wr, t, label_smoothing=0.1).loss
    r.backward()
    for chunk in (None, 5):  # one chunk, and three chunks' owner counts concatenated in row order
        xs, Ws = leaf(x), leaf(W[lo:hi])
        loss = fd.linear_cross_entropy(xs, Ws, t, vocab_start=rev_start, label_smoothing=0.1,
                                       chunk_size=chunk, process_group=g)
        loss.backward()
        close(loss, r, F64, "reversed layout loss")
        close(xs.grad, xr.grad, F64, "reversed layout grad input")
        close(Ws.grad, Wr.grad[rev_start:rev_start + hi - lo], F64, "reversed layout grad weight shard")


@check
def sharded_second_backward(c):
    """A second backward through a retained graph raised on the single-process path and silently
    added nothing on the sharded one: now the same error; inside allow_second_backward() both
    backward passes give the exact gradients. create_graph=True is refused by name."""
    V, N, H = 11, 7, 4
    x = c.randn(N, H, seed=320)
    W = c.randn(V, H, seed=321)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(322)).to(c.dev)
    lo, hi = c.layout(V)
    for reduction in ("mean", "sum"):
        xs, Ws = leaf(x), leaf(W[lo:hi])
        loss = fd.linear_cross_entropy(xs, Ws, t, reduction=reduction, chunk_size=3)
        loss.backward(retain_graph=True)
        err = _error_of(lambda: loss.backward())
        assert isinstance(err, RuntimeError) and "second backward" in str(err), repr(err)
        xs, Ws = leaf(x), leaf(W[lo:hi])
        loss = fd.linear_cross_entropy(xs, Ws, t, reduction=reduction, chunk_size=3)
        with fusedce.allow_second_backward():
            first = torch.autograd.grad(loss * 2.0, (xs, Ws), retain_graph=True)
            second = torch.autograd.grad(loss * 3.0, (xs, Ws), retain_graph=True)
        xr, Wr = leaf(x), leaf(W)
        r = ref.linear_cross_entropy(xr, Wr, t, reduction=reduction).loss
        rx, rW = torch.autograd.grad(r * 2.0, (xr, Wr))
        close(first[0], rx, F64, "grad input (first)")
        close(first[1], rW[lo:hi], F64, "grad weight (first)")
        close(second[0], 1.5 * rx, F64, "grad input (second)")
        close(second[1], 1.5 * rW[lo:hi], F64, "grad weight (second)")
    xs, Ws = leaf(x), leaf(W[lo:hi])
    for loss in (fd.linear_cross_entropy(xs, Ws, t), fd.linear_cross_entropy(xs, Ws, t, reduction="none").sum(),
                 fd.token_logprobs(xs, Ws, t).sum()):
        err = _error_of(lambda: torch.autograd.grad(loss, (xs, Ws), create_graph=True))
        assert isinstance(err, RuntimeError) and "create_graph" in str(err), repr(err)


# ---------------------------------------------------------------------------------------------
# The shared sample cases (tests/samples.py) and bad inputs (tests/test_bad_input.py), sharded
# ---------------------------------------------------------------------------------------------

# Every case of samples.CASES runs sharded; none is skipped. Options that only choose how the
# single-process op computes have no effect on the sharded path (it is not an error to pass them):
NOT_APPLICABLE_SHARDED = {
    "vocab_chunk_size": "accepted and ignored (fusedce/distributed.py, README): the vocabulary is "
                        "already split over the ranks and the sharded path tiles tokens only; the "
                        "cases vocab_tiles and vocab_tiles_none run, with the option ignored",
    "low_memory": "the same (no sample case sets it)",
}
SAMPLE_DTYPES = {
    "linear_cross_entropy": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
    "cross_entropy": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
}


def _shard_sample(op, args, kwargs, lo, hi):
    """The sharded call's (args, kwargs): this rank's [lo, hi) columns of everything indexed by
    the vocabulary, as views (a non-contiguous weight stays non-contiguous); fresh leaves for the
    input so that both calls get their own gradients."""
    kw = dict(kwargs)
    if kw.get("weight") is not None:
        kw["weight"] = kw["weight"][lo:hi]
    if op == "linear_cross_entropy":
        x, w, t = args
        if kw.get("linear_bias") is not None:
            kw["linear_bias"] = kw["linear_bias"].detach()[lo:hi].requires_grad_(True)
        return (x.detach().requires_grad_(True), w.detach()[lo:hi].requires_grad_(True), t), kw
    logits, t = args
    return (logits.detach()[..., lo:hi].requires_grad_(True), t), kw


def _sample_leaves(op, args, kwargs):
    """{name: leaf} of the call, in a fixed order; name -> how the full gradient maps to the shard."""
    if op == "linear_cross_entropy":
        leaves = dict(input=args[0], linear_weight=args[1], linear_bias=kwargs.get("linear_bias"))
    else:
        leaves = dict(input=args[0])
    return {k: v for k, v in leaves.items() if v is not None}


def _shard_of(op, name, g, lo, hi):
    if op == "cross_entropy":
        return g[..., lo:hi]
    return g if name == "input" else g[lo:hi]


def _sample_check(c, op, dtype):
    fn = fusedce.linear_cross_entropy if op == "linear_cross_entropy" else fusedce.cross_entropy
    failures = []
    for case, (args, kwargs) in zip(CASES, sample_inputs(c.dev, dtype, op, requires_grad=True)):
        tag = f"{op} {dtype} case {case.name}"
        try:
            lo, hi = c.layout(case.V)
            sargs, skw = _shard_sample(op, args, kwargs, lo, hi)
            single = fn(*args, return_stats=True, **kwargs)
            sharded = fn(*sargs, return_stats=True, process_group=dist.group.WORLD, **skw)
            up_gen = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
            if single.loss.dim() == 0:
                up = torch.rand((), generator=up_gen, dtype=torch.float64) + 0.5
            else:
                up = torch.randn(single.loss.shape, generator=up_gen, dtype=torch.float64)
            leaves, sleaves = _sample_leaves(op, args, kwargs), _sample_leaves(op, sargs, skw)
            gs = torch.autograd.grad(single.loss, list(leaves.values()), up.to(single.loss), allow_unused=True)
            gp = torch.autograd.grad(sharded.loss, list(sleaves.values()), up.to(sharded.loss), allow_unused=True)
            gs = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), gs)}
            gp = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(sleaves.items(), gp)}
            assert sharded.loss.dtype == single.loss.dtype, f"{tag}: loss dtype {sharded.loss.dtype} vs {single.loss.dtype}"
            if dtype in (torch.float64, torch.float32):
                # The single-process result is the truth, at the dtype's tight tolerance.
                budget_close(sharded.loss, single.loss, dtype, what=f"{tag} loss")
                budget_close(sharded.lse, single.lse, dtype, what=f"{tag} lse")
                assert torch.equal(sharded.predicted.cpu(), single.predicted.cpu()), (
                    f"{tag} predicted\n{sharded.predicted}\n{single.predicted}")
                budget_close(sharded.accuracy, single.accuracy, dtype, what=f"{tag} accuracy")
                budget_close(sharded.z_loss, single.z_loss, dtype, what=f"{tag} z_loss")
                for k, g in gs.items():
                    budget_close(gp[k], _shard_of(op, k, g, lo, hi), dtype, what=f"{tag} grad {k} shard")
            else:
                # Half inputs: the error budget of accuracy.py, with the single-process result as
                # the "eager" path: the sharded one may be off the float64 truth at most twice as
                # much (plus a unit of rounding) as the single-process op is.
                # The truth: fusedce/reference.py in float64 on the same (rounded) inputs.
                tleaves = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
                tkw = {k: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                       for k, v in semantic_kwargs(kwargs).items() if k != "linear_bias"}
                if op == "linear_cross_entropy":
                    truth = ref.linear_cross_entropy(tleaves["input"], tleaves["linear_weight"], args[2],
                                                     linear_bias=tleaves.get("linear_bias"), **tkw)
                else:
                    truth = ref.cross_entropy(tleaves["input"], args[1], **tkw)
                if truth.loss.dim() == 0 and truth.loss.isnan():
                    # a mean over no token: zero gradients, as F.cross_entropy (the reference's 0/0
                    # would give NaN)
                    gt = {k: torch.zeros_like(v) for k, v in tleaves.items()}
                else:
                    gt = torch.autograd.grad(truth.loss, list(tleaves.values()), up.to(truth.loss), allow_unused=True)
                    gt = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(tleaves.items(), gt)}
                budget_close(sharded.loss, truth.loss, dtype, eager=single.loss, what=f"{tag} loss")
                budget_close(sharded.lse, truth.lse, dtype, eager=single.lse, what=f"{tag} lse")
                budget_close(sharded.z_loss, truth.z_loss, dtype, eager=single.z_loss, what=f"{tag} z_loss")
                # Both paths take the argmax of the same float32 logits of the half inputs.
                assert torch.equal(sharded.predicted.cpu(), single.predicted.cpu()), (
                    f"{tag} predicted\n{sharded.predicted}\n{single.predicted}")
                budget_close(sharded.accuracy, single.accuracy, torch.float32, what=f"{tag} accuracy")
                for k, g in gt.items():
                    budget_close(gp[k], _shard_of(op, k, g, lo, hi), dtype,
                                 eager=_shard_of(op, k, gs[k], lo, hi), what=f"{tag} grad {k} shard")
        except Exception as e:  # noqa: BLE001 - every case is reported, not only the first failure
            failures.append(f"{tag}: {type(e).__name__}: {e}")
    assert not failures, f"{len(failures)} sample case(s) failed:\n" + "\n".join(failures)


def _register_sample_checks():
    for op, dtypes in SAMPLE_DTYPES.items():
        for dtype in dtypes:
            def fn(c, op=op, dtype=dtype):
                _sample_check(c, op, dtype)
            fn.__name__ = f"samples_{op}_{str(dtype).replace('torch.', '')}"
            fn.__doc__ = f"Every case of tests/samples.py, {op} in {dtype}: sharded vs single-process."
            check(fn)


_register_sample_checks()


# The refused inputs of tests/test_bad_input.py (each breaks one thing of a valid call), as
# (name, which functions, change): change(args, kwargs, V, dev) edits a valid call of V classes in
# place. The target range is sharded_target_out_of_range's (it needs the global vocabulary).
_BAD_N, _BAD_H = 5, 4


def _set_arg(i, make):
    def change(args, kwargs, V, dev):
        args[i] = make(args[i], V, dev)
    return change


def _set_kw(name, make):
    def change(args, kwargs, V, dev):
        kwargs[name] = make(V, dev) if callable(make) else make
    return change


_BOTH = ("linear_cross_entropy", "cross_entropy")
_LCE = ("linear_cross_entropy",)
BAD_INPUTS = [
    *[(f"target dtype {d}", _BOTH, _set_arg(-1, lambda t, V, dev, d=d: t.to(d)))
      for d in (torch.float32, torch.int16, torch.bool)],
    *[(f"target shape {s}", _BOTH, _set_arg(-1, lambda t, V, dev, s=s: torch.zeros(s, dtype=torch.long, device=dev)))
      for s in ((_BAD_N + 1,), (_BAD_N, 1), ())],
    ("hidden size mismatch", _LCE, _set_arg(1, lambda w, V, dev: torch.randn(V, _BAD_H + 1, device=dev))),
    ("linear_weight 1-D", _LCE, _set_arg(1, lambda w, V, dev: torch.randn(V * _BAD_H, device=dev))),
    ("linear_weight float64", _LCE, _set_arg(1, lambda w, V, dev: w.double())),
    *[(f"input dtype {d}", _BOTH, _set_arg(0, lambda x, V, dev, d=d: x.to(d))) for d in (torch.int64, torch.complex64)],
    ("linear_bias length", _LCE, _set_kw("linear_bias", lambda V, dev: torch.randn(V + 1, device=dev))),
    ("linear_bias 2-D", _LCE, _set_kw("linear_bias", lambda V, dev: torch.randn(1, V, device=dev))),
    ("linear_bias float64", _LCE, _set_kw("linear_bias", lambda V, dev: torch.randn(V, device=dev, dtype=torch.float64))),
    ("weight long", _BOTH, _set_kw("weight", lambda V, dev: torch.rand(V + 1, device=dev))),
    ("weight short", _BOTH, _set_kw("weight", lambda V, dev: torch.rand(V - 1, device=dev))),
    ("weight 2-D", _BOTH, _set_kw("weight", lambda V, dev: torch.rand(V, 1, device=dev))),
    ("weight int64", _BOTH, _set_kw("weight", lambda V, dev: torch.ones(V, device=dev, dtype=torch.int64))),
    ("linear_weight on meta", _LCE, _set_arg(1, lambda w, V, dev: w.to("meta"))),
    ("target on meta", _BOTH, _set_arg(-1, lambda t, V, dev: t.to("meta"))),
    ("weight on meta", _BOTH, _set_kw("weight", lambda V, dev: torch.rand(V, device="meta"))),
    ("linear_bias on meta", _LCE, _set_kw("linear_bias", lambda V, dev: torch.rand(V, device="meta"))),
    *[(f"{name}={value}", _BOTH, _set_kw(name, value))
      for name in ("label_smoothing", "z_loss", "logit_scale", "softcap")
      for value in (math.nan, math.inf, -math.inf)],
    *[(f"label_smoothing={v}", _BOTH, _set_kw("label_smoothing", v)) for v in (-0.1, 1.5)],
    *[(f"reduction={v!r}", _BOTH, _set_kw("reduction", v)) for v in ("avg", "batchmean", None)],
    *[(f"softcap={v}", _BOTH, _set_kw("softcap", v)) for v in (0.0, -30.0)],
    ("z_loss=-1e-4", _BOTH, _set_kw("z_loss", -1e-4)),
    *[(f"num_items_in_batch={v}", _BOTH, _set_kw("num_items_in_batch", lambda V, dev, v=v: v)) for v in (0, -3)],
    *[(f"num_items_in_batch=tensor({v})", _BOTH,
       # on the CPU: a CUDA num_items_in_batch is never read back (no host sync), on either path
       _set_kw("num_items_in_batch", lambda V, dev, v=v: torch.tensor(v))) for v in (0, -2.0)],
    *[(f"{name}={v}", _LCE, _set_kw(name, v)) for name in ("chunk_size", "vocab_chunk_size") for v in (0, -1)],
]
# Bad inputs whose message names a size of a vocabulary-indexed argument: the sharded call is
# refused with the message of the SHARD's sizes (the argument it was given), that is the
# single-process call's message on the shard-sized problem; the full problem's call raises the
# same type.
VOCAB_SIZED = {"hidden size mismatch", "linear_weight 1-D", "linear_bias length", "linear_bias 2-D",
               "weight long", "weight short", "weight 2-D"}


@check
def samples_bad_input(c):
    """Every refused input of tests/test_bad_input.py (but the target range: above) is refused by
    the sharded call with the single-process call's exception type and first message line."""
    V = 7
    lo, hi = c.layout(V)
    x = c.randn(_BAD_N, _BAD_H, seed=340, dtype=torch.float32)
    W = c.randn(V, _BAD_H, seed=341, dtype=torch.float32)
    t = torch.randint(0, V, (_BAD_N,), generator=torch.Generator().manual_seed(342)).to(c.dev)
    fns = {"linear_cross_entropy": fusedce.linear_cross_entropy, "cross_entropy": fusedce.cross_entropy}

    def call(which, change, W, **extra):
        v = W.shape[0]
        args = [x, W, t] if which == "linear_cross_entropy" else [x @ W.T, t]
        kwargs = {}
        change(args, kwargs, v, c.dev)
        return lambda: fns[which](*args, **kwargs, **extra)

    for name, whiches, change in BAD_INPUTS:
        for which in whiches:
            what = f"{which} {name}"
            sharded = call(which, change, W[lo:hi], process_group=dist.group.WORLD)
            if name in VOCAB_SIZED:
                full, shard_sized = _error_of(call(which, change, W)), _error_of(call(which, change, W[lo:hi]))
                assert full is not None and shard_sized is not None, f"{what}: not refused ({full!r}, {shard_sized!r})"
                assert type(full) is type(shard_sized), f"{what}: {full!r} vs {shard_sized!r}"
                same_error(call(which, change, W[lo:hi]), sharded, f"{what} (shard-sized)")
            else:
                same_error(call(which, change, W), sharded, what)


# ---------------------------------------------------------------------------------------------
# The spawned group
# ---------------------------------------------------------------------------------------------


def _worker(rank, world, backend, init_file, result_dir):
    if backend == "nccl":
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
    else:
        dev = torch.device("cpu")
        torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    run_rank(_checks_for(world), Ctx(rank, world, dev), rank, result_dir)


def _checks_for(world):
    return {name: fn for name, fn in CHECKS.items() if MIN_WORLD[name] <= world}


GROUPS = [
    pytest.param(("gloo", 2), id="gloo-2"),
    pytest.param(("gloo", 3), id="gloo-3"),
    # One GPU: a 1-rank NCCL group still runs every collective and the CUDA shard kernels (the
    # whole vocabulary is the one shard), the most a single-GPU machine can check of NCCL.
    pytest.param(("nccl", 1), id="nccl-1", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a GPU")),
    pytest.param(("nccl", 2), id="nccl-2", marks=pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")),
    pytest.param(("nccl", 4), id="nccl-4", marks=pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 4, reason="needs 4 GPUs")),
]


@pytest.fixture(scope="module", params=GROUPS)
def group_results(request):
    backend, world = request.param
    if backend == "gloo" and not dist.is_gloo_available():
        pytest.skip("gloo is not available")
    if backend == "nccl" and not dist.is_nccl_available():
        pytest.skip("NCCL is not available")
    return world, run_checks(_worker, (world, backend), world, _checks_for(world))


@pytest.mark.parametrize("name", list(CHECKS))
def test_sharded_equals_single_process(group_results, name):
    world, group_results = group_results
    if MIN_WORLD[name] > world:
        pytest.skip(f"{name} needs at least {MIN_WORLD[name]} ranks (this group has {world})")
    failures = {r: m for r, m in group_results[name].items() if m != "ok"}
    assert not failures, "\n".join(f"rank {r}:\n{m}" for r, m in failures.items())
