"""The terms beyond the CE, each against its float64 definition in fusedce/reference.py:
entropy (statistic and loss term), token log-probabilities, distillation and the policy loss;
their combinations in one call of the op; the one-pass property; opcheck and gradcheck of the op
with every term on; bad input."""

from __future__ import annotations

import math

import pytest
import torch

import fusedce
from accuracy import HALF_DTYPES, assert_close
from fusedce import reference
from fusedce._op_args import op_kwargs

DTYPES = [
    torch.float64,  # exactness of every formula (1e-9)
    torch.float32,  # the tight float32 budget
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="half dtypes are judged on CUDA (the CPU would "
        "judge the same float32 math again)")),  # the training dtype, judged by the error budget
]


def _leaves(device, dtype, *shapes, scale=None):
    out = []
    for shape in shapes:
        x = torch.randn(shape, dtype=torch.float64)
        if scale is not None:
            x = x * scale
        out.append(x.to(device=device, dtype=dtype).requires_grad_())
    return out


def _check(fused_fn, ref_fn, leaves, dtype, what, *, upstream=True):
    """fused_fn(*leaves) and ref_fn(*leaves64, dtype=...) -> a tensor (or tuple of tensors): values
    and the gradients of sum(upstream * outputs) with respect to every leaf, against float64 truth
    (and, for half dtypes, the same-dtype eager reference as the budget)."""
    outs = fused_fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(1234)
    ups = [torch.randn(o.shape, generator=gen, dtype=torch.float64) if upstream and o.dim() > 0
           else torch.ones(o.shape, dtype=torch.float64) for o in outs]
    total = sum((o * u.to(o.device, o.dtype)).sum() for o, u in zip(outs, ups))
    grads = torch.autograd.grad(total, leaves, allow_unused=True)

    def run_ref(inputs, ref_dtype):
        r = ref_fn(*inputs, dtype=ref_dtype)
        r = r if isinstance(r, tuple) else (r,)
        t = sum((o * u.to(o.device, o.dtype)).sum() for o, u in zip(r, ups))
        return r, torch.autograd.grad(t, inputs, allow_unused=True)

    truth_in = [x.detach().double().cpu().requires_grad_() for x in leaves]
    truth, truth_g = run_ref(truth_in, torch.float64)
    eager = eager_g = [None] * len(outs)
    if dtype in HALF_DTYPES:
        eager_in = [x.detach().clone().requires_grad_() for x in leaves]
        eager, eager_g = run_ref(eager_in, None)
    for i, (o, t, e) in enumerate(zip(outs, truth, eager)):
        assert_close(o, t, dtype, eager=e, what=f"{what}: output {i}")
    for i, (g, t, e) in enumerate(zip(grads, truth_g, eager_g)):
        if t is None:
            continue
        assert_close(g, t, dtype, eager=e, what=f"{what}: grad of leaf {i}")


def policy_pair(tok, old, adv, kw):
    """(fused, ref) for _check: fusedce.policy_loss(x, w, ...) and the float64 reference on the
    materialized logits x @ w.T, with the same keyword arguments."""
    def fused(x, w):
        return fusedce.policy_loss(x, w, tok, old, adv, **kw)[0]

    def ref(x, w, dtype):
        return reference.policy_loss(x @ w.T, tok.to(x.device), old.to(x.device), adv.to(x.device),
                                     **{k: (v.to(x.device) if torch.is_tensor(v) else v)
                                        for k, v in kw.items()}, dtype=dtype)[0]

    return fused, ref


# --------------------------------------------------------------------------------------------
# Entropy: a statistic of LossOutput and a loss term of linear_cross_entropy.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("entropy_coef", [0.3, -0.05])  # a penalty and a bonus
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("vocab_chunk_size", [None, 16])  # whole rows; vocabulary tiles (merged sums)
def test_entropy_term(device, dtype, entropy_coef, reduction, vocab_chunk_size):
    N, H, V = 11, 8, 37
    x, w = _leaves(device, dtype, (N, H), (V, H), scale=None)
    t = torch.randint(0, V, (N,), device=device)
    t[2] = -100
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, logit_scale=1.3)

    def fused(x, w):
        out = fusedce.linear_cross_entropy(x, w, t, reduction=reduction, entropy_coef=entropy_coef,
                                           return_stats=True, return_entropy=True,
                                           vocab_chunk_size=vocab_chunk_size,
                                           **kw)
        return out.loss, out.entropy  # the entropy statistic is differentiable too

    def ref(x, w, dtype):
        logits = x @ w.T
        tt = t.to(logits.device)
        ce = reference.cross_entropy(logits, tt, reduction="none", dtype=dtype, **kw).token_loss
        ent = reference.entropy(logits, logit_scale=kw["logit_scale"], softcap=kw["softcap"],
                                dtype=dtype)
        valid = (tt != -100).to(ent.dtype)
        tok = ce + entropy_coef * ent * valid
        loss = {"none": tok, "sum": tok.sum(), "mean": tok.sum() / valid.sum()}[reduction]
        return loss, ent

    _check(fused, ref, [x, w], dtype, f"entropy {reduction}")


# --------------------------------------------------------------------------------------------
# Token log-probabilities.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])  # plain and sampled-with-temperature RL
@pytest.mark.parametrize("bias", [False, True])  # heads with a bias
def test_token_logprobs(device, dtype, temperature, bias):
    B, T, H, V = 2, 5, 8, 29
    x, w, b = _leaves(device, dtype, (B, T, H), (V, H), (V,))
    tok = torch.randint(0, V, (B, T), device=device)
    tok[1, -1] = -100  # a padding label: log-probability 0, no gradient

    def fused(x, w, b):
        return fusedce.token_logprobs(x, w, tok, linear_bias=b if bias else None,
                                      temperature=temperature, return_entropy=True)

    def ref(x, w, b, dtype):
        logits = x @ w.T + (b if bias else 0)
        tt = tok.to(logits.device)
        lp, ent = reference.token_logprobs(logits, tt.clamp(min=0), temperature=temperature,
                                           dtype=dtype)
        return torch.where(tt == -100, torch.zeros_like(lp), lp), ent

    _check(fused, ref, [x, w, b], dtype, f"token_logprobs T={temperature}")


# --------------------------------------------------------------------------------------------
# Distillation.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("teacher", ["logits", "hidden"])  # both ways of giving the teacher
@pytest.mark.parametrize("temperature,ce_weight", [(1.0, 0.0), (2.0, 0.5)])  # pure KD; KD + CE at T != 1
@pytest.mark.parametrize("reduction", ["mean", "none"])  # forward-computed grads; recompute
def test_distillation(device, dtype, kind, teacher, temperature, ce_weight, reduction):
    N, H, Ht, V = 13, 8, 6, 37
    x, w = _leaves(device, dtype, (N, H), (V, H))
    th = torch.randn(N, Ht, dtype=torch.float64).to(device, dtype)
    tw = torch.randn(V, Ht, dtype=torch.float64).to(device, dtype)
    t = torch.randint(0, V, (N,), device=device)
    t[[0, 5]] = -100
    teacher_kw = (dict(teacher_logits=th @ tw.T) if teacher == "logits"
                  else dict(teacher_input=th, teacher_weight=tw))

    def fused(x, w):
        return fusedce.distillation_loss(x, w, t, kind=kind, beta=0.3, temperature=temperature,
                                         distill_weight=0.8, ce_weight=ce_weight,
                                         reduction=reduction, chunk_size=5, **teacher_kw)

    def ref(x, w, dtype):
        tl = (th @ tw.T).to(x.device)
        return reference.distillation_loss(x @ w.T, tl, t.to(x.device), kind=kind, beta=0.3,
                                           temperature=temperature, distill_weight=0.8,
                                           ce_weight=ce_weight, reduction=reduction, dtype=dtype)

    _check(fused, ref, [x, w], dtype, f"distillation {kind} {teacher}")


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_distillation_vocab_tiles_and_composition(device, kind):
    """The raw op with vocabulary tiles (CPU: sums merged across tiles, JSD's extra pass per tile)
    and every CE knob in the same call: z-loss, smoothing, softcap, logit_scale, class weights."""
    N, H, V = 9, 8, 23
    x, w = _leaves(device, torch.float64, (N, H), (V, H))
    tl = torch.randn(N, V, dtype=torch.float64, device=device)
    cw = torch.rand(V, dtype=torch.float64, device=device) + 0.5
    t = torch.randint(0, V, (N,), device=device)
    t[3] = -100
    kw = dict(label_smoothing=0.1, z_loss=1e-2, softcap=4.0, logit_scale=0.8)
    distill = {"forward_kl": 1, "jsd": 3}[kind]
    out = torch.ops.fusedce.loss(
        x, w, t, None, cw, None, grad_mask=[True, True, False], vocab_chunk_size=7,
        **op_kwargs(ce_weight=0.7, teacher_logits=tl, distill=distill, distill_beta=0.4,
                    distill_weight=0.6, distill_temperature=1.5, want_entropy=True,
                    entropy_coef=0.2, **kw))
    loss, gh, gw = out[0], out[6], out[7]
    x64, w64 = x.detach().requires_grad_(), w.detach().requires_grad_()
    z = reference.final_logits(x64 @ w64.T, kw["logit_scale"], kw["softcap"])
    ce = reference.cross_entropy(x64 @ w64.T, t, weight=cw, reduction="none", **kw)
    wt = torch.where(t != -100, cw[t.clamp(min=0)], torch.zeros(()))
    z_part = wt * kw["z_loss"] * ce.lse ** 2
    valid = (t != -100).double()
    d = reference.distillation_token_loss(z, tl, kind=kind, beta=0.4, temperature=1.5)
    ent = reference.entropy(z)
    tok = 0.7 * (ce.token_loss - z_part) + z_part + (0.6 * d + 0.2 * ent) * valid
    truth = tok.sum()
    g = torch.autograd.grad(truth, (x64, w64))
    assert_close(loss, truth, torch.float64, what="loss")
    assert_close(gh, g[0], torch.float64, what="grad_hidden")
    assert_close(gw, g[1], torch.float64, what="grad_weight")
    assert_close(out[4], ent, torch.float64, what="entropy")


def test_distillation_all_ignored(device):
    x, w = _leaves(device, torch.float32, (4, 8), (11, 8))
    t = torch.full((4,), -100, device=device)
    loss = fusedce.distillation_loss(x, w, t, teacher_logits=torch.randn(4, 11, device=device))
    loss.backward()
    assert math.isnan(loss.item())
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(w.grad) == 0


# --------------------------------------------------------------------------------------------
# Policy gradient (GRPO family): the metrics and the on-policy case here; the objectives' grid
# against reference.policy_loss is tests/test_policy.py.
# --------------------------------------------------------------------------------------------


def test_policy_metrics(device):
    B, T, H, V = 2, 7, 8, 19
    x, w = _leaves(device, torch.float64, (B, T, H), (V, H))
    tok = torch.randint(0, V, (B, T), device=device)
    old = torch.randn(B, T, dtype=torch.float64, device=device) - 3
    ref_lp = torch.randn(B, T, dtype=torch.float64, device=device) - 3
    adv = torch.randn(B, T, dtype=torch.float64, device=device)
    mask = (torch.rand(B, T, device=device) > 0.3).long()
    loss, metrics = fusedce.policy_loss(x, w, tok, old, adv, mask=mask, ref_logprobs=ref_lp,
                                        beta=0.1)
    _, _, lp, ent = reference.policy_loss(x @ w.T, tok, old, adv, mask=mask,
                                          ref_logprobs=ref_lp, beta=0.1)
    m = mask.double()
    r = torch.exp(lp - old)
    low, high = (r < 0.8) & (adv < 0), (r > 1.2) & (adv > 0)
    d = ref_lp - lp
    # TRL 1.16's definitions: the KL metric carries the bias correction (times the ratio, the
    # default), low_min / high_max are the extremes over sequences of per-sequence means.
    want = {
        "clip_ratio/low_mean": (low * m).sum() / m.sum(),
        "clip_ratio/high_mean": (high * m).sum() / m.sum(),
        "clip_ratio/low_min": ((low * m).sum(-1) / m.sum(-1)).min(),
        "clip_ratio/high_max": ((high * m).sum(-1) / m.sum(-1)).max(),
        "clip_ratio/region_mean": ((low | high) * m).sum() / m.sum(),
        "ratio/mean": (r * m).sum() / m.sum(),
        "ratio/min": r[mask.bool()].min(),
        "ratio/max": r[mask.bool()].max(),
        "kl": ((torch.exp(d) - d - 1) * r * m).sum() / m.sum(),
        "entropy": (ent * m).sum() / m.sum(),
        "logprob/mean": (lp * m).sum() / m.sum(),
        "advantages/mean": adv.mean(),
        "advantages/std": adv.std(),
    }
    assert set(metrics) == set(want)
    for k, v in want.items():
        assert_close(metrics[k], v.detach(), torch.float64, what=k)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("B,T", [(0, 4), (3, 0)])  # no sequence; sequences without tokens
def test_policy_empty_batch(device, B, T, level):
    """An empty batch gives a zero loss with zero gradients and the metrics of a batch without
    kept tokens (min/max over nothing would otherwise raise deep inside the metrics)."""
    x, w = _leaves(device, torch.float32, (B, T, 8), (13, 8))
    tok = torch.randint(0, 13, (B, T), device=device)
    old = torch.randn(B, T, device=device) - 2
    adv = torch.randn(B, device=device)
    loss, metrics = fusedce.policy_loss(x, w, tok, old, adv, importance_sampling_level=level)
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert loss.item() == 0.0
    assert gx.shape == x.shape and gw.shape == w.shape and not gw.any()
    big = torch.finfo(torch.float32).max
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "entropy", "logprob/mean"):
        assert metrics[name].item() == 0.0, name
    if B == 0 or level == "token":
        # no kept token: the masked means are 0, the extremes are those of an all-masked batch
        assert metrics["ratio/min"].item() == big and metrics["ratio/max"].item() == -big
        assert math.isnan(metrics["clip_ratio/low_min"].item())
        assert math.isnan(metrics["clip_ratio/high_max"].item())
    else:
        # TRL's sequence level: an empty sequence has ratio exp(0 / max(0, 1)) = 1
        assert metrics["ratio/min"].item() == metrics["ratio/max"].item() == 1.0
    if B == 0:
        assert math.isnan(metrics["advantages/mean"].item())
    else:
        torch.testing.assert_close(metrics["advantages/mean"], adv.mean())


def test_policy_without_old_logprobs(device):
    """old_logprobs=None: ratio 1 with the gradient of logp (TRL's single-update case)."""
    x, w = _leaves(device, torch.float64, (2, 4, 8), (13, 8))
    tok = torch.randint(0, 13, (2, 4), device=device)
    adv = torch.tensor([0.5, -1.0], dtype=torch.float64, device=device)
    loss, metrics = fusedce.policy_loss(x, w, tok, None, adv)
    g = torch.autograd.grad(loss, (x, w))
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    truth = reference.policy_loss(x2 @ w2.T, tok, None, adv)[0]
    g2 = torch.autograd.grad(truth, (x2, w2))
    assert_close(loss, truth, torch.float64, what="loss")
    for a, b in zip(g, g2):
        assert_close(a, b, torch.float64, what="grad")
    assert metrics["ratio/mean"].item() == 1.0


# --------------------------------------------------------------------------------------------
# One pass: several terms cost the GEMMs of plain CE and one row kernel per chunk.
# --------------------------------------------------------------------------------------------


def _profile_counts(fn, device):
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    counts = {}
    for e in prof.events():
        counts[e.name] = counts.get(e.name, 0) + 1
    return counts


def test_one_pass(device):
    """CE + z-loss + entropy + KL to given teacher logits (+ smoothing) runs exactly the GEMMs of
    plain CE (chunk by chunk: logits, grad_input, grad_weight), and on CUDA one row-kernel launch
    per chunk."""
    N, H, V, C = 40, 16, 97, 8  # 5 chunks of 8 rows
    dtype = torch.float32
    x, w = _leaves(device, dtype, (N, H), (V, H))
    t = torch.randint(0, V, (N,), device=device)
    tl = torch.randn(N, V, device=device)

    def plain():
        fusedce.linear_cross_entropy(x, w, t, chunk_size=C).backward()

    def combined():
        fusedce.distillation_loss(x, w, t, teacher_logits=tl, ce_weight=1.0, z_loss=1e-4,
                                  label_smoothing=0.1, chunk_size=C).backward()
        fusedce.linear_cross_entropy(x, w, t, z_loss=1e-4, entropy_coef=0.1,
                                     chunk_size=C).backward()

    a, b = _profile_counts(plain, device), _profile_counts(combined, device)
    gemms = ("aten::mm", "aten::addmm", "aten::addmm_")  # out= variants record as these too
    n_plain = sum(a.get(k, 0) for k in gemms)
    n_comb = sum(b.get(k, 0) for k in gemms)
    assert n_plain == 3 * (N // C), a  # logits, grad_input, grad_weight per chunk
    assert n_comb == 2 * n_plain, b  # two calls, each with the GEMMs of plain CE and no more
    if device == "cuda":  # each launch of the row kernel is one device-side event
        launches = sum(v for k, v in b.items() if "terms_kernel" in k)
        assert launches == 2 * (N // C), {k: v for k, v in b.items() if "kernel" in k}


# --------------------------------------------------------------------------------------------
# opcheck and gradcheck of the op with the terms on (the samples below feed both).
# --------------------------------------------------------------------------------------------


def term_samples(device, dtype, requires_grad):
    """(args, kwargs) of torch.ops.fusedce.loss with each group of terms on."""
    N, H, V = 5, 3, 7
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)

    x, w = r(N, H).requires_grad_(requires_grad), r(V, H).requires_grad_(requires_grad)
    t = torch.tensor([0, 3, -100, 6, 2], device=device)
    base = dict(grad_mask=[False, False, False])
    yield (x, w, t), op_kwargs(**base, want_entropy=True, want_logprob=True, entropy_coef=0.2)
    yield (x, w, t), op_kwargs(**base, ce_weight=0.5, distill=3, teacher_logits=r(N, V),
                               distill_temperature=2.0)
    yield (x, w, t), op_kwargs(**base, ce_weight=0.0, distill=2, teacher_hidden=r(N, 4),
                               teacher_weight=r(V, 4), teacher_bias=r(V))
    yield (x, w, t), op_kwargs(**base, ce_weight=0.0, want_logprob=True, want_entropy=True,
                               advantages=r(N), old_logprobs=r(N) - 2, ref_logprobs=r(N) - 2,
                               kl_beta=0.1, entropy_coef=-0.01)
    # TRL 1.16's options: SAPO with per-token policy and entropy weights and the ratio-weighted KL;
    # the clipped form with two-sided clipping; CISPO, its ratio capped everywhere (old log-probs
    # far below) so that the capped weight, a constant by definition, is one for gradcheck too.
    pol = dict(base, ce_weight=0.0, want_logprob=True, want_entropy=True, advantages=r(N),
               ref_logprobs=r(N) - 2, kl_beta=0.1, entropy_coef=-0.01, kl_bias_correction=True,
               policy_weights=r(N).abs(), entropy_weights=r(N).abs())
    yield (x, w, t), op_kwargs(**dict(pol, old_logprobs=r(N) - 2, policy_kind=2, sapo_temperature_neg=1.3))
    yield (x, w, t), op_kwargs(**dict(pol, old_logprobs=r(N) - 2, policy_delta=1.1))
    yield (x, w, t), op_kwargs(**dict(pol, old_logprobs=r(N) - 40, policy_kind=1, epsilon_high=3.0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_opcheck_terms(device, dtype):
    for args, kwargs in term_samples(device, dtype, requires_grad=True):
        torch.library.opcheck(torch.ops.fusedce.loss.default, args, kwargs)


def test_gradcheck_terms(device):
    for (x, w, t), kwargs in term_samples(device, torch.float64, requires_grad=True):
        def f(x, w):
            out = torch.ops.fusedce.loss(x, w, t, **kwargs)
            return out[1], out[2], *(o for o in out[4:6] if o.numel())
        assert torch.autograd.gradcheck(f, (x, w))


def test_compile_policy_loss(device):
    x, w = _leaves(device, torch.float32, (2, 4, 8), (13, 8))
    tok = torch.randint(0, 13, (2, 4), device=device)
    old = torch.randn(2, 4, device=device) - 2
    adv = torch.tensor([0.5, -1.0], device=device)

    def step(x, w):
        loss, metrics = fusedce.policy_loss(x, w, tok, old, adv)
        return loss, metrics["entropy"]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    (l1, e1), (l2, e2) = step(x, w), compiled(x, w)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(e1, e2)
    g1 = torch.autograd.grad(step(x, w)[0], (x, w))
    g2 = torch.autograd.grad(compiled(x, w)[0], (x, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument.
# --------------------------------------------------------------------------------------------


def test_bad_input_terms(device):
    x, w = _leaves(device, torch.float32, (2, 3, 4), (9, 4))
    tok = torch.randint(0, 9, (2, 3), device=device)
    adv = torch.zeros(2, device=device)
    with pytest.raises(ValueError, match="old_logprobs"):
        fusedce.policy_loss(x, w, tok, torch.zeros(2, 4, device=device), adv)
    with pytest.raises(ValueError, match="temperature"):
        fusedce.policy_loss(x, w, tok, None, adv, temperature=-1.0)
    with pytest.raises(ValueError, match="loss_type"):
        fusedce.policy_loss(x, w, tok, None, adv, loss_type="ppo2")
    with pytest.raises(ValueError, match="ref_logprobs"):
        fusedce.policy_loss(x, w, tok, None, adv, beta=0.1)
    with pytest.raises(ValueError, match="advantages"):
        fusedce.policy_loss(x, w, tok, None, torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="temperature"):
        fusedce.token_logprobs(x, w, tok, temperature=0.0)
    tl = torch.zeros(2, 3, 9, device=device)
    with pytest.raises(ValueError, match="kind"):
        fusedce.distillation_loss(x, w, tok, teacher_logits=tl, kind="kl")
    with pytest.raises(ValueError, match="beta"):
        fusedce.distillation_loss(x, w, tok, teacher_logits=tl, kind="jsd", beta=1.0)
    with pytest.raises(ValueError, match="teacher_logits"):
        fusedce.distillation_loss(x, w, tok, teacher_logits=torch.zeros(2, 3, 8, device=device))
    with pytest.raises(ValueError, match="exactly one"):
        fusedce.distillation_loss(x, w, tok)
    with pytest.raises(ValueError, match="teacher_weight"):
        fusedce.distillation_loss(x, w, tok, teacher_input=torch.zeros(2, 3, 5, device=device),
                                  teacher_weight=torch.zeros(8, 5, device=device))
    # the op itself names its arguments too
    x2, w2, t2 = x.reshape(-1, 4), w, tok.reshape(-1)
    with pytest.raises(RuntimeError, match="distill_temperature"):
        torch.ops.fusedce.loss(x2, w2, t2, **op_kwargs(
            distill=1, teacher_logits=torch.zeros(6, 9, device=device), distill_temperature=-2.0))
    with pytest.raises(RuntimeError, match="advantages"):
        torch.ops.fusedce.loss(x2, w2, t2, advantages=torch.zeros(5, device=device))
    with pytest.raises(RuntimeError, match="a teacher was given but distill = 0"):
        torch.ops.fusedce.loss(x2, w2, t2, teacher_logits=torch.zeros(6, 9, device=device))
    with pytest.raises(RuntimeError, match="grad_scale"):
        torch.ops.fusedce.loss(x2, w2, t2, grad_scale=torch.ones(4, device=device))


def test_masked_classes(device):
    """-inf logits (a bias masking classes out, a teacher with masked classes): exp(-inf) = 0 adds
    nothing, 0 * log 0 = 0, and nothing turns nan; values and gradients as the reference."""
    N, H, V = 6, 8, 29
    x, w = _leaves(device, torch.float64, (N, H), (V, H))
    b = torch.zeros(V, dtype=torch.float64, device=device)
    b[[0, 1, 7]] = -math.inf  # masked for the student (class 0 first: before any finite logit)
    tl = torch.randn(N, V, dtype=torch.float64, device=device)
    tl[:, [0, 1, 7, 3, 20]] = -math.inf  # the teacher masks those and two more
    t = torch.randint(8, V, (N,), device=device)

    def fused(x, w):
        return fusedce.distillation_loss(x, w, t, teacher_logits=tl, linear_bias=b, ce_weight=0.5,
                                         entropy_coef=0.1, temperature=1.5)

    def ref(x, w, dtype):
        logits = x @ w.T + b.to(x.device)
        d = reference.distillation_token_loss(logits, tl.to(x.device), temperature=1.5, dtype=dtype)
        ce = reference.cross_entropy(logits, t.to(x.device), reduction="none", dtype=dtype).token_loss
        ent = reference.entropy(logits, dtype=dtype)
        return (d + 0.5 * ce + 0.1 * ent).mean()

    _check(fused, ref, [x, w], torch.float64, "masked classes")


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_float32_wide_range(device, kind, temperature):
    """float32 runs the vectorized exp / log of csrc/cpu/vec_math.h on the CPU (a polynomial exp
    that flushes results below e^-87.3 to 0, a polynomial log): logits spread over about +-70, so
    that exp arguments reach far below -87, masked classes for the student and the teacher, a
    width that is no multiple of terms.h's 64-column blocks, every distillation kind at T = 1
    (q's exp taken from p's) and T != 1, with entropy and CE; values and gradients against
    float64 truth within the float32 budget."""
    N, H, V = 7, 16, 203
    (x,) = _leaves(device, torch.float32, (N, H))
    (w,) = _leaves(device, torch.float32, (V, H), scale=6.0)  # logits ~ N(0, 24^2)
    # Masks the divergence stays finite under (KL(r || q) needs r = 0 where q = 0, KL(q || r) the
    # converse); the JSD's are disjoint (where both vanish the float64 reference's log m = -inf
    # turns its gradient nan).
    student_mask, teacher_mask = {
        "forward_kl": ([0, 5, 64, 130], [0, 5, 64, 130, 3, 202]),
        "reverse_kl": ([0, 5, 64, 130, 3, 202], [0, 5, 64, 130]),
        "jsd": ([0, 5, 64, 130], [3, 70, 202]),
    }[kind]
    b = torch.zeros(V, dtype=torch.float32, device=device)
    b[student_mask] = -math.inf
    tl = (torch.randn(N, V, dtype=torch.float64) * 24).to(device=device, dtype=torch.float32)
    tl[:, teacher_mask] = -math.inf
    t = torch.randint(6, 64, (N,), device=device)

    def fused(x, w):
        return fusedce.distillation_loss(x, w, t, teacher_logits=tl, linear_bias=b, kind=kind,
                                         ce_weight=0.5, entropy_coef=0.1, temperature=temperature)

    def ref(x, w, dtype):
        logits = x @ w.T + b.to(x.device, x.dtype)
        d = reference.distillation_token_loss(logits, tl.to(x.device), kind=kind,
                                              temperature=temperature, dtype=dtype)
        ce = reference.cross_entropy(logits, t.to(x.device), reduction="none", dtype=dtype).token_loss
        ent = reference.entropy(logits, dtype=dtype)
        return (d + 0.5 * ce + 0.1 * ent).mean()

    _check(fused, ref, [x, w], torch.float32, f"float32 wide range ({kind}, T={temperature})")


def test_plain_stats_do_not_ask_for_entropy(device):
    """return_stats alone keeps the CE's own row kernel: no entropy is computed or returned."""
    x, w = _leaves(device, torch.float32, (4, 8), (11, 8))
    t = torch.randint(0, 11, (4,), device=device)
    assert fusedce.linear_cross_entropy(x, w, t, return_stats=True).entropy is None
    out = fusedce.linear_cross_entropy(x, w, t, return_stats=True, return_entropy=True)
    assert_close(out.entropy, reference.entropy(x.detach() @ w.detach().T), torch.float32,
                 what="entropy")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_degenerate_teacher_rows(device, dtype, kind, temperature):
    """A teacher row with every class at -inf, or with a NaN, has no distribution: that token's
    loss and its row of grad_input are NaN (never a finite value; float32 runs the CPU's
    vectorized exp / log, which must pass a NaN through), as the float64 reference's loss is; a
    partly masked row and the clean rows equal the reference (reverse KL: +inf where the teacher
    masks a class the student keeps)."""
    N, H, V = 5, 8, 131  # a width that is no multiple of the CPU's 64-column blocks
    x, w = _leaves(device, dtype, (N, H), (V, H))
    t = torch.randint(0, V, (N,), device=device)
    tl = torch.randn(N, V, dtype=dtype, device=device)
    tl[1] = -math.inf
    tl[2, :5] = -math.inf
    tl[3, 70] = math.nan
    loss = fusedce.distillation_loss(x, w, t, teacher_logits=tl, kind=kind,
                                     temperature=temperature, reduction="none")
    (gx,) = torch.autograd.grad(loss.sum(), (x,))
    want = reference.distillation_token_loss(
        (x.detach() @ w.detach().T).double(), tl.double(), kind=kind, temperature=temperature,
        dtype=torch.float64)
    for r in (1, 3):
        assert torch.isnan(want[r]), "the reference's own verdict on a degenerate row"
        assert torch.isnan(loss[r]), f"row {r}: {loss[r]}"
        assert torch.isnan(gx[r]).any(), f"row {r}'s input gradient is finite: {gx[r]}"
    keep = [0, 2, 4]
    assert_close(loss[keep].double(), want[keep], dtype, what=f"{kind} rows with a distribution")
    assert torch.isfinite(gx[[0, 4]]).all()
