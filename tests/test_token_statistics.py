"""Per-token statistics from the one softmax pass (the fields of TRL's FusedCausalLMOutput):
fusedce.token_statistics and the op's want_mean_logit / want_log_sum_sq outputs, against
fusedce/reference.py's float64 token_statistics: values, the gradients of log-probs and entropy,
the metrics' lack of gradient, vocabulary tiles, other terms in the same call, opcheck."""

from __future__ import annotations

import pytest
import torch

import fusedce
from accuracy import HALF_DTYPES, assert_close
from fusedce import reference
from fusedce._op_args import op_kwargs
from test_terms import DTYPES, _check, _leaves

_ops = torch.ops.fusedce


def _ref_stats(x, w, b, tok, dtype, **kw):
    logits = torch.nn.functional.linear(x, w, b)
    return reference.token_statistics(logits, tok.to(logits.device), dtype=dtype, **kw)


def _metric_close(got, x, w, b, tok, name, dtype, kw):
    """A non-differentiable float output against float64 truth (and, for half inputs, the eager
    same-dtype reference as the budget)."""
    truth = _ref_stats(x.detach().double().cpu(), w.detach().double().cpu(),
                       None if b is None else b.detach().double().cpu(), tok.cpu(), torch.float64, **kw)
    eager = None
    if dtype in HALF_DTYPES:
        eager = _ref_stats(x.detach(), w.detach(), None if b is None else b.detach(), tok, None, **kw)[name]
    assert_close(got, truth[name], dtype, eager=eager, what=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])  # TRL's sampling temperature
@pytest.mark.parametrize("head", ["plain", "bias", "scale_softcap"])  # Gemma / Cohere-style heads
def test_token_statistics(device, dtype, temperature, head):
    B, T, H, V = 2, 5, 8, 29
    x, w, b = _leaves(device, dtype, (B, T, H), (V, H), (V,))
    tok = torch.randint(0, V, (B, T), device=device)
    tok[1, -1] = -100  # a padding label: log-prob 0 and is_top1 False; the rest defined there too
    bias = b if head == "bias" else None
    kw = dict(softcap=4.0, logit_scale=1.3) if head == "scale_softcap" else {}
    rkw = dict(temperature=temperature, **kw)

    def fused(x, w, b):
        s = fusedce.token_statistics(x, w, tok, linear_bias=b if head == "bias" else None,
                                     temperature=temperature, **kw)
        return s.logprobs, s.entropy

    def ref(x, w, b, dtype):
        r = _ref_stats(x, w, b if head == "bias" else None, tok, dtype, **rkw)
        return r["logprobs"], r["entropy"]

    # log-probs and entropy: values and exact gradients (TRL differentiates both)
    _check(fused, ref, [x, w, b], dtype, f"token_statistics T={temperature} {head}")

    s = fusedce.token_statistics(x, w, tok, linear_bias=bias, temperature=temperature, **kw)
    for name in ("mean_logits", "log_sum_sq_probs"):
        got = getattr(s, name)
        assert not got.requires_grad, f"{name} is a metric: no gradient (as in TRL)"
        _metric_close(got, x, w, bias, tok, name, dtype, rkw)
    truth = _ref_stats(x.detach().double().cpu(), w.detach().double().cpu(),
                       None if bias is None else bias.detach().double().cpu(), tok.cpu(),
                       torch.float64, **rkw)
    assert s.is_top1.dtype == torch.bool
    # Rows whose two largest logits are closer than the input dtype resolves may rank them either
    # way (the logits themselves are rounded to it): judged everywhere else.
    z = torch.nn.functional.linear(x.detach().double().cpu(), w.detach().double().cpu(),
                                   None if bias is None else bias.detach().double().cpu())
    top2 = z.topk(2, dim=-1).values
    resolved = (top2[..., 0] - top2[..., 1]) > 8 * torch.finfo(dtype).eps * z.abs().amax(-1)
    assert torch.equal(s.is_top1.cpu()[resolved], truth["is_top1"][resolved])
    assert not bool(s.is_top1[1, -1])


def test_token_statistics_top1_hits(device):
    """is_top1 where the label is the argmax (the random labels above rarely are), including a tie
    with an earlier class (the first maximum wins, as torch.argmax and TRL)."""
    N, H, V = 6, 4, 11
    x = torch.randn(N, H, dtype=torch.float64, device=device)
    w = torch.randn(V, H, dtype=torch.float64, device=device)
    w[7] = w[3]  # classes 3 and 7 always tie
    logits = x @ w.T
    tok = logits.argmax(-1)
    tok[0] = (tok[0] + 1) % V  # not the argmax
    tok[1] = -100
    s = fusedce.token_statistics(x, w, tok, outputs=("is_top1",))
    want = reference.token_statistics(logits, tok)["is_top1"]
    assert torch.equal(s.is_top1.cpu(), want.cpu())
    assert bool(s.is_top1[2:].all()) and not bool(s.is_top1[0]) and not bool(s.is_top1[1])
    tie = torch.tensor([7], device=device)
    xt = x[:1].clone()
    wt = w.clone()
    wt[3] = wt[7] = xt[0] * 10  # 3 and 7 are the maxima: the label 7 is not the first one
    s = fusedce.token_statistics(xt, wt, tie, outputs=("is_top1",))
    assert not bool(s.is_top1[0])
    s = fusedce.token_statistics(xt, wt, tie - 4, outputs=("is_top1",))
    assert bool(s.is_top1[0])


def test_token_statistics_outputs_and_errors(device):
    x, w = torch.randn(3, 4, device=device), torch.randn(9, 4, device=device)
    tok = torch.tensor([1, 2, -100], device=device)
    s = fusedce.token_statistics(x, w, tok, outputs=())
    assert s.entropy is None and s.mean_logits is None and s.log_sum_sq_probs is None and s.is_top1 is None
    assert s.logprobs.shape == (3,) and float(s.logprobs[2]) == 0.0
    with pytest.raises(ValueError, match="outputs"):
        fusedce.token_statistics(x, w, tok, outputs=("mean_logit",))
    with pytest.raises(ValueError, match="temperature"):
        fusedce.token_statistics(x, w, tok, temperature=0.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("vocab_chunk_size", [0, 4])  # whole rows; vocabulary tiles (CPU merges sums)
def test_op_statistics_beside_other_terms(device, dtype, vocab_chunk_size):
    """The op's new outputs: defined at every row, the same whether or not other terms (CE,
    z-loss, smoothing, entropy bonus, policy loss) share the call, empty when not requested, and
    the other outputs unchanged by asking for them."""
    N, H, V = 7, 5, 13
    x = torch.randn(N, H, dtype=dtype, device=device)
    w = torch.randn(V, H, dtype=dtype, device=device)
    t = torch.randint(0, V, (N,), device=device)
    t[3] = -100
    kw = dict(softcap=3.0, logit_scale=0.8, vocab_chunk_size=vocab_chunk_size)
    truth = reference.token_statistics((x @ w.T).double().cpu(), t.cpu(), softcap=3.0, logit_scale=0.8)
    others = [
        dict(),  # the stats alone
        dict(label_smoothing=0.1, z_loss=1e-3),  # the CE's terms
        dict(ce_weight=0.0, want_logprob=True, want_entropy=True, entropy_coef=-0.01,
             advantages=torch.randn(N, dtype=dtype, device=device)),
    ]
    for extra in others:
        out = _ops.loss(x, w, t, **op_kwargs(want_mean_logit=True, want_log_sum_sq=True, **kw, **extra))
        assert_close(out[9], truth["mean_logits"], dtype, what=f"mean_logit {extra}")
        assert_close(out[10], truth["log_sum_sq_probs"], dtype, what=f"log_sum_sq {extra}")
        plain = _ops.loss(x, w, t, **op_kwargs(**kw, **extra))
        assert plain[9].numel() == 0 and plain[10].numel() == 0
        for i in (0, 1, 2, 3):
            assert_close(out[i], plain[i], dtype, what=f"output {i} with the statistics on")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_opcheck_statistics(device, dtype):
    x = torch.randn(5, 3, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(7, 3, dtype=dtype, device=device, requires_grad=True)
    t = torch.tensor([0, 3, -100, 6, 2], device=device)
    for kwargs in (dict(want_mean_logit=True, want_log_sum_sq=True, want_logprob=True, ce_weight=0.0),
                   dict(want_mean_logit=True, want_entropy=True),
                   dict(want_log_sum_sq=True, grad_mask=[True, True, False])):
        torch.library.opcheck(_ops.loss.default, (x, w, t), op_kwargs(**kwargs))


def test_gradcheck_with_statistics(device):
    """Gradients of log-probs and entropy are unchanged when the metrics share the call."""
    x = torch.randn(5, 3, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.tensor([0, 3, -100, 6, 2], device=device)

    def f(x, w):
        s = fusedce.token_statistics(x, w, t, temperature=0.6)
        return s.logprobs, s.entropy

    assert torch.autograd.gradcheck(f, (x, w))


def test_compile_token_statistics(device):
    x, w = _leaves(device, torch.float32, (2, 4, 8), (13, 8))
    tok = torch.randint(0, 13, (2, 4), device=device)

    def f(x, w):
        s = fusedce.token_statistics(x, w, tok, temperature=0.9)
        return s.logprobs.sum() + s.entropy.sum(), s.mean_logits, s.log_sum_sq_probs, s.is_top1

    eager = f(x, w)
    compiled = torch.compile(f, fullgraph=True)(x, w)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_token_statistics_errors_name_tokens(device):
    """token_statistics' argument is `tokens` (as token_logprobs'): a bad dtype, shape or class id
    is reported under that name, not as the op's `target`."""
    x, w = torch.randn(2, 3, 4, device=device), torch.randn(9, 4, device=device)
    with pytest.raises(TypeError, match=r"^fusedce: tokens "):
        fusedce.token_statistics(x, w, torch.zeros(2, 3, device=device))
    with pytest.raises(ValueError, match=r"^fusedce: tokens "):
        fusedce.token_statistics(x, w, torch.zeros(2, 4, dtype=torch.long, device=device))
    bad = torch.tensor([[1, 9, 2], [0, 1, 2]], device=device)
    with fusedce.validate_targets(), pytest.raises(RuntimeError, match=r"^fusedce: tokens\["):
        fusedce.token_statistics(x, w, bad)
