"""The vocab-parallel path against the single-process call on the full vocabulary and the float64
reference, output by output and gradient by gradient: every LossOutput field (the statistics
included, which tests/test_distributed.py compares by value only), uneven and odd layouts with and
without vocab_start, empty batches, 3-D inputs. Small float64 problems on gloo (2 and 3 ranks),
one spawned group per world size (tests/ranks.py)."""

from __future__ import annotations

import datetime
import math
import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fusedce  # noqa: E402
import fusedce.distributed as fd  # noqa: E402
from fusedce import reference as ref  # noqa: E402
from ranks import run_checks, run_rank  # noqa: E402

F64 = dict(rtol=1e-9, atol=1e-11)


class Ctx:
    def __init__(self, rank, world):
        self.rank, self.world = rank, world

    def cuts(self, V):
        """Uneven contiguous slices: the first rank gets the most (the opposite of
        tests/test_distributed.py's layout), so shard borders move with the world size."""
        base = [V // self.world] * self.world
        for i in range(V % self.world):
            base[i] += 1
        base[0], base[-1] = base[0] + min(2, base[-1] - 1), base[-1] - min(2, base[-1] - 1)
        starts = [sum(base[:i]) for i in range(self.world)]
        return starts[self.rank], starts[self.rank] + base[self.rank]


def randn(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale


def leaf(x):
    return x.detach().clone().requires_grad_(True)


def grads_of(y, *xs, retain=False):
    gs = torch.autograd.grad(y, xs, allow_unused=True, retain_graph=retain)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(xs, gs)]


def close(a, b, what, tol=F64):
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    torch.testing.assert_close(a, b, **tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def _ce_problem(V=13, N=10, H=5, seed=0, ignore=(1, 6)):
    x = randn(N, H, seed=seed)
    W = randn(V, H, seed=seed + 1)
    b = randn(V, seed=seed + 2, scale=0.5)
    cw = torch.rand(V, generator=torch.Generator().manual_seed(seed + 3), dtype=torch.float64) + 0.5
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(seed + 4))
    t[list(ignore)] = -100
    return x, W, b, cw, t


@check
def z_loss_statistic_gradient(c):
    """LossOutput.z_loss and LossOutput.lse are differentiable on both paths: the gradients of
    out.z_loss, of out.lse.sum() and of loss + z_loss equal the single-process call's, for every
    reduction (num_items_in_batch too), with and without class weights; a mean over no weight
    (every target ignored) keeps zero gradients, as the single-process call."""
    x, W, b, cw, t = _ce_problem(seed=10)
    lo, hi = c.cuts(W.shape[0])
    cases = [dict(), dict(cw=True), dict(reduction="sum", cw=True), dict(num_items_in_batch=7),
             dict(reduction="none", cw=True), dict(all_ignored=True), dict(all_ignored=True, cw=True)]
    for cfg in cases:
        tag = str(cfg)
        tt = torch.full_like(t, -100) if cfg.get("all_ignored") else t
        kw = {k: v for k, v in cfg.items() if k not in ("cw", "all_ignored")}
        cwf = cw if cfg.get("cw") else None
        for what in ("z_loss", "lse", "loss+z_loss"):
            xs, Ws, bs = leaf(x), leaf(W[lo:hi]), leaf(b[lo:hi])
            out = fd.linear_cross_entropy(xs, Ws, tt, linear_bias=bs, weight=None if cwf is None else cwf[lo:hi],
                                          z_loss=0.1, return_stats=True, chunk_size=4, **kw)
            xp, Wp, bp = leaf(x), leaf(W), leaf(b)
            sp = fusedce.linear_cross_entropy(xp, Wp, tt, linear_bias=bp, weight=cwf, z_loss=0.1,
                                              return_stats=True, **kw)
            close(out.z_loss, sp.z_loss, f"{tag} z_loss value")

            def scalar(o):
                if what == "z_loss":
                    return o.z_loss.sum()
                if what == "lse":
                    return o.lse.sum()
                return (o.loss + o.z_loss).sum()
            g = grads_of(scalar(out), xs, Ws, bs)
            gp = grads_of(scalar(sp), xp, Wp, bp)
            close(g[0], gp[0], f"{tag} d({what})/d input")
            close(g[1], gp[1][lo:hi], f"{tag} d({what})/d weight shard")
            close(g[2], gp[2][lo:hi], f"{tag} d({what})/d bias shard")
            if what == "z_loss" and not cfg.get("all_ignored"):
                assert g[1].abs().sum() > 0, f"{tag}: no gradient through z_loss"
        # the logits-shard entry point: the same statistics from cross_entropy
        z = (x @ W.T + b)
        zs, zp = leaf(z[:, lo:hi]), leaf(z)
        out = fd.cross_entropy(zs, tt, weight=None if cwf is None else cwf[lo:hi], z_loss=0.1,
                               return_stats=True, chunk_size=3, **kw)
        sp = fusedce.cross_entropy(zp, tt, weight=cwf, z_loss=0.1, return_stats=True, **kw)
        (g,) = grads_of((out.z_loss.sum() + 0.5 * out.lse.sum()), zs)
        (gp,) = grads_of((sp.z_loss.sum() + 0.5 * sp.lse.sum()), zp)
        close(g, gp[:, lo:hi], f"{tag} cross_entropy d(z_loss + lse/2)/d logits shard")


@check
def num_items_forms(c):
    """num_items_in_batch as an int, a float, a 0-d tensor and a one-element [1] tensor (int and
    float): every LossOutput field has the single-process call's shape, value and gradient."""
    x, W, b, cw, t = _ce_problem(seed=20)
    lo, hi = c.cuts(W.shape[0])
    forms = (5, 6.5, torch.tensor(5), torch.tensor([6.5], dtype=torch.float64), torch.tensor([4]),
             torch.tensor(6.5, dtype=torch.float32))
    for ni in forms:
        tag = f"num_items_in_batch={ni!r}"
        xs, Ws = leaf(x), leaf(W[lo:hi])
        out = fd.linear_cross_entropy(xs, Ws, t, weight=cw[lo:hi], z_loss=0.1, label_smoothing=0.1,
                                      num_items_in_batch=ni, return_stats=True, chunk_size=4)
        xp, Wp = leaf(x), leaf(W)
        sp = fusedce.linear_cross_entropy(xp, Wp, t, weight=cw, z_loss=0.1, label_smoothing=0.1,
                                          num_items_in_batch=ni, return_stats=True)
        for f in ("loss", "lse", "accuracy", "z_loss"):
            close(getattr(out, f), getattr(sp, f), f"{tag} {f}")
        g = grads_of(out.loss + out.z_loss, xs, Ws)
        gp = grads_of(sp.loss + sp.z_loss, xp, Wp)
        close(g[0], gp[0], f"{tag} grad input")
        close(g[1], gp[1][lo:hi], f"{tag} grad weight shard")


def _same_outputs(a, b, what):
    """Two results of the same structure (tensors, tuples, dicts of metrics) are equal."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), f"{what}: keys {sorted(a)} != {sorted(b)}"
        for k in b:
            _same_outputs(a[k], b[k], f"{what}[{k}]")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), f"{what}: {len(a)} outputs != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same_outputs(x, y, f"{what}[{i}]")
    elif a is None or b is None:
        assert a is None and b is None, f"{what}: {a!r} vs {b!r}"
    else:
        close(a, b, what)


@check
def policy_empty_batch(c):
    """policy_loss on an empty batch (B = 0 or T = 0), every loss type at the token level (the
    one-pass path) and the sequence level: the loss, every metric and the (zero) gradients equal
    the single-process call's."""
    V, H = 13, 4
    W = randn(V, H, seed=31)
    lo, hi = c.cuts(V)
    for B, T in ((0, 4), (2, 0)):
        x = randn(B, T, H, seed=32)
        tok = torch.zeros(B, T, dtype=torch.long)
        old, adv, m = randn(B, T, seed=33) - 2, randn(B, seed=34), torch.ones(B, T)
        for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"):
            for level in ("token", "sequence"):
                if lt == "vespo" and level == "sequence":
                    continue
                tag = f"B={B} T={T} {lt} {level}"
                xs, Ws = leaf(x), leaf(W[lo:hi])
                out = fd.policy_loss(xs, Ws, tok, old, adv, mask=m, loss_type=lt,
                                     importance_sampling_level=level, chunk_size=3)
                xp, Wp = leaf(x), leaf(W)
                sp = fusedce.policy_loss(xp, Wp, tok, old, adv, mask=m, loss_type=lt,
                                         importance_sampling_level=level)
                _same_outputs(out, sp, tag)
                if lt == "vespo" and B:
                    # an empty sequence's weight: log w = 0, phi = e^(lam + k 0 - lam e^0) = 1
                    close(out[1]["vespo/phi_seq_mean"], torch.tensor(1.0, dtype=torch.float64), f"{tag} phi")
                g, gp = grads_of(out[0], xs, Ws), grads_of(sp[0], xp, Wp)
                close(g[0], gp[0], f"{tag} grad input")
                close(g[1], gp[1][lo:hi], f"{tag} grad weight shard")


def _error_of(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the error itself is what is compared
        return e
    return None


@check
def preference_bad_target_named(c):
    """An out-of-range kept target of preference_loss / kto_loss (>= V, negative, or -100 when
    ignore_index is something else; shifted too; kto's kl_target) is refused on the sharded path
    with the single-process error: the argument's name (target, kl_target) and the value given,
    checked against the GLOBAL vocabulary."""
    V, H = 13, 4
    W = randn(V, H, seed=41)
    lo, hi = c.cuts(V)
    x = randn(2, 3, H, seed=42)
    good = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(43))
    labels, rl = torch.tensor([True, False]), randn(2, seed=44) - 5
    for bad in (V, V + 3, -5, -100):
        tgt = good.clone()
        tgt[1, 1] = bad
        calls = {
            "preference": lambda W_, **k: fusedce.preference_loss(x, W_, tgt, loss_type="orpo", ignore_index=-1, **k),
            "preference shift": lambda W_, **k: fusedce.preference_loss(x, W_, tgt, loss_type="cpo", ignore_index=-1,
                                                                        shift=True, **k),
            "kto": lambda W_, **k: fusedce.kto_loss(x, W_, tgt, labels, ref_logps=rl, kl=0.1, ignore_index=-1, **k),
            "kto kl_target": lambda W_, **k: fusedce.kto_loss(x, W_, good, labels, ref_logps=rl, kl_input=x,
                                                              kl_target=tgt, ref_kl_logps=rl, ignore_index=-1, **k),
        }
        for name, call in calls.items():
            single = _error_of(lambda: call(W))
            sharded = _error_of(lambda: call(W[lo:hi], process_group=dist.group.WORLD))
            assert single is not None, f"{name} target {bad}: not refused by the single-process call"
            assert type(sharded) is type(single) and str(sharded) == str(single), \
                f"{name} target {bad}: sharded {sharded!r} != single-process {single!r}"


@check
def vocab_start_refused_by_name(c):
    """vocab_start that is not an int (a float such as 9.5, a string, a bool, a tensor) was
    truncated or parsed by int() and used silently; one given without process_group was ignored.
    Every public function refuses both by name, on every rank alike (before any collective)."""
    V, H = 13, 4
    W = randn(V, H, seed=51)
    lo, hi = c.cuts(V)
    x, x3 = randn(4, H, seed=52), randn(2, 2, H, seed=52)
    t = torch.tensor([0, 3, 12, 7])
    t2 = t.reshape(2, 2)
    calls = {
        "linear_cross_entropy": lambda W_, **k: fusedce.linear_cross_entropy(x, W_, t, **k),
        "cross_entropy": lambda W_, **k: fusedce.cross_entropy(x @ W_.T, t, **k),
        "token_logprobs": lambda W_, **k: fusedce.token_logprobs(x, W_, t, **k),
        "token_statistics": lambda W_, **k: fusedce.token_statistics(x, W_, t, **k),
        "distillation_loss": lambda W_, **k: fusedce.distillation_loss(x, W_, t, teacher_logits=x @ W_.T, **k),
        "policy_loss": lambda W_, **k: fusedce.policy_loss(x3, W_, t2, None, torch.ones(2, dtype=torch.float64), **k),
        "preference_loss": lambda W_, **k: fusedce.preference_loss(x3, W_, t2, loss_type="orpo", **k),
        "kto_loss": lambda W_, **k: fusedce.kto_loss(x3, W_, t2, torch.tensor([True, False]), loss_type="apo_zero_unpaired",
                                                     ref_logps=torch.zeros(2, dtype=torch.float64), **k),
    }
    for name, call in calls.items():
        for bad in (lo + 0.5, float(lo), str(lo), torch.tensor(lo), True, -1):
            e = _error_of(lambda: call(W[lo:hi], process_group=dist.group.WORLD, vocab_start=bad))
            assert isinstance(e, (TypeError, ValueError)) and "vocab_start" in str(e), \
                f"{name} vocab_start={bad!r}: {e!r}"
        e = _error_of(lambda: call(W, vocab_start=0))
        assert isinstance(e, ValueError) and "vocab_start" in str(e) and "process_group" in str(e), \
            f"{name} vocab_start without process_group: {e!r}"
        call(W[lo:hi], process_group=dist.group.WORLD, vocab_start=lo)  # a valid one still works


@check
def every_field_value_and_gradient(c):
    """linear_cross_entropy sharded (odd V, uneven slices, vocab_start given and derived, 3-D and
    empty inputs) equals the single-process call field by field: loss, lse, predicted, accuracy,
    z_loss, entropy, and the gradient of each differentiable field separately (input, weight and
    bias shards), for each reduction with smoothing + class weights + z-loss + softcap +
    logit_scale + bias, a class-id ignore_index, and the entropy term."""
    V, H = 13, 4
    x, W, b, cw, t = _ce_problem(V=V, N=6, H=H, seed=60, ignore=(1,))
    lo, hi = c.cuts(V)
    opts = [dict(label_smoothing=0.1, cw=True, z_loss=0.05, softcap=2.0, logit_scale=0.8, bias=True),
            dict(ignore_index=4, z_loss=0.02), dict(entropy_coef=0.1, return_entropy=True, cw=True)]
    inputs = [(x.reshape(2, 3, H), t.reshape(2, 3)), (torch.zeros(0, 3, H, dtype=torch.float64),
                                                      torch.zeros(0, 3, dtype=torch.long))]
    n = 0
    for red in ("mean", "sum", "none"):
        for opt in opts:
            for xx, tt in inputs:
                n += 1
                kw = {k: v for k, v in opt.items() if k not in ("cw", "bias")}
                if "ignore_index" in kw:
                    tt = torch.where(tt == -100, torch.full_like(tt, kw["ignore_index"]), tt)
                cwf, bf = (cw if opt.get("cw") else None), (b if opt.get("bias") else None)
                tag = f"{red} {opt} N={tt.numel()}"
                xs, Ws = leaf(xx), leaf(W[lo:hi])
                bs = None if bf is None else leaf(bf[lo:hi])
                out = fd.linear_cross_entropy(xs, Ws, tt, linear_bias=bs, weight=None if cwf is None else cwf[lo:hi],
                                              reduction=red, return_stats=True, chunk_size=4,
                                              vocab_start=lo if n % 2 else None, **kw)
                xp, Wp = leaf(xx), leaf(W)
                bp = None if bf is None else leaf(bf)
                sp = fusedce.linear_cross_entropy(xp, Wp, tt, linear_bias=bp, weight=cwf, reduction=red,
                                                  return_stats=True, **kw)
                for f in ("loss", "lse", "accuracy", "z_loss"):
                    close(getattr(out, f), getattr(sp, f), f"{tag} {f}")
                assert torch.equal(out.predicted, sp.predicted), f"{tag} predicted"
                assert (out.entropy is None) == (sp.entropy is None), f"{tag} entropy returned"
                with fusedce.allow_second_backward():
                    for f in ("loss", "lse", "z_loss", "entropy"):
                        if getattr(sp, f) is None:
                            continue
                        up = randn(*getattr(sp, f).shape, seed=61)
                        g = grads_of((getattr(out, f) * up).sum(), *[v for v in (xs, Ws, bs) if v is not None],
                                     retain=True)
                        gp = grads_of((getattr(sp, f) * up).sum(), *[v for v in (xp, Wp, bp) if v is not None],
                                      retain=True)
                        close(g[0], gp[0], f"{tag} d{f}/d input")
                        close(g[1], gp[1][lo:hi], f"{tag} d{f}/d weight shard")
                        if bs is not None:
                            close(g[2], gp[2][lo:hi], f"{tag} d{f}/d bias shard")


# ---------------------------------------------------------------------------------------------
# The spawned groups
# ---------------------------------------------------------------------------------------------


def _worker(rank, world, init_file, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    run_rank(CHECKS, Ctx(rank, world), rank, result_dir)


@pytest.fixture(scope="module", params=[2, 3], ids=["gloo-2", "gloo-3"])
def group_results(request):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo is not available")
    return run_checks(_worker, (request.param,), request.param, CHECKS)


@pytest.mark.parametrize("name", list(CHECKS))
def test_sharded_matches_single_process(group_results, name):
    failures = {r: m for r, m in group_results[name].items() if m != "ok"}
    assert not failures, "\n".join(f"rank {r}:\n{m}" for r, m in failures.items())
