"""No host synchronization in any default CUDA path, and out-of-range targets without one.

1. A whole training step (forward and backward) of every public function, with the options a
   training loop uses, runs under torch.cuda.set_sync_debug_mode("error"): any .item(), .nonzero(),
   synchronizing copy or stream sync raises. A tensor num_items_in_batch on the device (what HF
   transformers passes) is part of it.
2. The same step captured once with torch.cuda.graph and replayed on new data equals the eager step
   on that data (a host sync would break the capture; a value read on the host at capture time
   would be frozen into the graph and differ on replay).
3. Out-of-range targets: on CUDA, by default, a NaN loss (and NaN gradients) instead of a host-side
   check; the clear error in validation mode (fusedce.validate_targets(), FUSEDCE_VALIDATE=1) on
   CUDA and always on the CPU (fusedce/validation.py).

The warm-up call before each checked step keeps one-time initialization (cuBLAS handles and
workspaces, module loading) out of the check: the per-call cost is what is asserted.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import fusedce

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

N, H, V = 48, 32, 1003  # V not a multiple of 8
B, T = 4, 12  # [B, T] batches (shift, policy loss)


@contextlib.contextmanager
def sync_is_error():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@dataclass
class Case:
    params: list  # leaves whose .grad the step fills
    step: Callable[[], tuple]  # forward + backward; returns the outputs to compare
    feeds: list = field(default_factory=list)  # (static tensor, fresh value maker) for replays


def _head(dev, lead=(N,), bias=False):
    x = torch.randn(*lead, H, device=dev).requires_grad_()
    w = (torch.randn(V, H, device=dev) * H**-0.5).requires_grad_()
    b = (torch.randn(V, device=dev) * 0.1).requires_grad_() if bias else None
    return x, w, b


def _targets(dev, shape=(N,)):
    def fresh():
        t = torch.randint(0, V, shape, device=dev)
        return torch.where(torch.rand(shape, device=dev) < 0.2, torch.full_like(t, -100), t)

    return fresh(), fresh


def _randn_like(x):
    return lambda: torch.randn_like(x)


def _num_items(dev):
    n = torch.full((), 29, dtype=torch.int64, device=dev)  # HF: an int64 tensor on the device
    return n, lambda: torch.randint(20, 40, (), device=dev)


def _lce(dev, *, reduction="mean", num_items=False, bias=False, stats=False, **kw):
    x, w, b = _head(dev, bias=bias)
    t, fresh_t = _targets(dev)
    feeds = [(x, _randn_like(x)), (t, fresh_t)]
    ni = None
    if num_items:
        ni, fresh_n = _num_items(dev)
        feeds.append((ni, fresh_n))
    g = torch.randn(N, device=dev)

    def step():
        out = fusedce.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction,
                                           num_items_in_batch=ni, return_stats=stats, **kw)
        if stats:
            loss = out.loss
            extra = (out.lse, out.predicted, out.accuracy, out.z_loss)
            if out.entropy is not None:
                extra += (out.entropy,)
        else:
            loss, extra = out, ()
        (loss * g).sum().backward() if reduction == "none" else loss.backward()
        return (loss.detach(),) + tuple(e.detach() for e in extra)

    return Case([p for p in (x, w, b) if p is not None], step, feeds)


def _lce_shift(dev):
    x, w, _ = _head(dev, lead=(B, T))
    t, fresh_t = _targets(dev, (B, T))
    ni, fresh_n = _num_items(dev)

    def step():
        loss = fusedce.linear_cross_entropy(x, w, t, shift=True, softcap=15.0, logit_scale=0.8,
                                            z_loss=1e-4, label_smoothing=0.1, num_items_in_batch=ni)
        loss.backward()
        return (loss.detach(),)

    return Case([x, w], step, [(x, _randn_like(x)), (t, fresh_t), (ni, fresh_n)])


def _lce_entropy(dev):
    x, w, _ = _head(dev)
    t, fresh_t = _targets(dev)

    def step():
        out = fusedce.linear_cross_entropy(x, w, t, entropy_coef=-0.01, return_stats=True,
                                           return_entropy=True)
        (out.loss + 0.1 * out.entropy.mean()).backward()
        return out.loss.detach(), out.entropy.detach(), out.accuracy

    return Case([x, w], step, [(x, _randn_like(x)), (t, fresh_t)])


def _lce_class_weight(dev):
    x, w, _ = _head(dev)
    t, fresh_t = _targets(dev)
    cw = torch.rand(V, device=dev) + 0.5

    def step():
        loss = fusedce.linear_cross_entropy(x, w, t, weight=cw, label_smoothing=0.05)
        loss.backward()
        return (loss.detach(),)

    return Case([x, w], step, [(x, _randn_like(x)), (t, fresh_t)])


def _ce(dev, *, reduction="mean", num_items=False, inplace=False, stats=False):
    z = (torch.randn(N, V, device=dev) * 2).requires_grad_()
    t, fresh_t = _targets(dev)
    ni = None
    feeds = [(z, _randn_like(z)), (t, fresh_t)]
    if num_items:
        ni, fresh_n = _num_items(dev)
        feeds.append((ni, fresh_n))
    g = torch.randn(N, device=dev)

    def step():
        # an in-place backward overwrites its input: give it an intermediate, fresh per call
        src = z * 1.0 if inplace else z
        out = fusedce.cross_entropy(src, t, reduction=reduction, num_items_in_batch=ni,
                                    return_stats=stats, inplace_backward=inplace, softcap=20.0)
        loss = out.loss if stats else out
        (loss * g).sum().backward() if reduction == "none" else loss.backward()
        extra = (out.lse.detach(), out.accuracy) if stats else ()
        return (loss.detach(),) + extra

    return Case([z], step, feeds)


def _token_logprobs(dev):
    x, w, _ = _head(dev)
    t, fresh_t = _targets(dev)
    g = torch.randn(N, device=dev)

    def step():
        lp, ent = fusedce.token_logprobs(x, w, t, temperature=0.9, return_entropy=True)
        ((lp * g).sum() + ent.mean()).backward()
        return lp.detach(), ent.detach()

    return Case([x, w], step, [(x, _randn_like(x)), (t, fresh_t)])


def _distill(dev, *, teacher_logits, kind):
    x, w, _ = _head(dev)
    t, fresh_t = _targets(dev)
    feeds = [(x, _randn_like(x)), (t, fresh_t)]
    if teacher_logits:
        tl = torch.randn(N, V, device=dev) * 2
        teacher = dict(teacher_logits=tl)
        feeds.append((tl, _randn_like(tl)))
    else:
        tx = torch.randn(N, 24, device=dev)
        tw = torch.randn(V, 24, device=dev) * 24**-0.5
        teacher = dict(teacher_input=tx, teacher_weight=tw)
        feeds.append((tx, _randn_like(tx)))

    def step():
        loss = fusedce.distillation_loss(x, w, t, kind=kind, temperature=2.0, ce_weight=0.5,
                                         **teacher)
        loss.backward()
        return (loss.detach(),)

    return Case([x, w], step, feeds)


def _policy(dev, **options):
    x, w, _ = _head(dev, lead=(B, T))
    tok = torch.randint(0, V, (B, T), device=dev)
    old = -torch.rand(B, T, device=dev) * 5 - 4
    ref = old + torch.randn(B, T, device=dev) * 0.1
    adv = torch.randn(B, device=dev)
    mask = (torch.rand(B, T, device=dev) < 0.8).to(torch.float32)
    if options.pop("trl_options", False):
        # TRL 1.16's options: vLLM IS ratios, the global normalizer as a device tensor, delta
        options.update(importance_sampling_ratio=torch.rand(B, T, device=dev),
                       num_items_in_batch=torch.tensor(30.0, device=dev), delta=1.5,
                       gradient_accumulation_steps=2)
    kw = dict(dict(beta=0.04, entropy_coef=0.01, loss_type="grpo"), **options)

    def step():
        loss, metrics = fusedce.policy_loss(x, w, tok, old, adv, mask=mask, ref_logprobs=ref, **kw)
        loss.backward()
        return (loss.detach(),) + tuple(metrics[k] for k in sorted(metrics))

    feeds = [(x, _randn_like(x)), (tok, lambda: torch.randint(0, V, (B, T), device=dev)),
             (adv, _randn_like(adv)), (old, lambda: -torch.rand(B, T, device=dev) * 5 - 4)]
    return Case([x, w], step, feeds)


def _preference(dev, loss_type):
    x, w, b = _head(dev, lead=(B, T), bias=True)  # B = 4 rows: 2 chosen, then 2 rejected
    prompt = torch.arange(T, device=dev) < 3

    def labels():
        y = torch.randint(0, V, (B, T), device=dev)
        return y.masked_fill(prompt | (torch.rand(B, T, device=dev) < 0.2), -100)

    y = labels()
    ref = {}
    feeds = [(x, _randn_like(x)), (y, labels)]
    if loss_type == "sigmoid":
        xr = torch.randn(B, T, H, device=dev)
        ref = dict(ref_input=xr, ref_weight=w.detach() * 0.9)
        feeds.append((xr, _randn_like(xr)))

    def step():
        loss, metrics = fusedce.preference_loss(x, w, y, loss_type=loss_type, linear_bias=b, **ref)
        loss.backward()
        return (loss.detach(),) + tuple(metrics[k] for k in sorted(metrics))

    return Case([x, w, b], step, feeds)


def _kto(dev, kl_given=False):
    x, w, b = _head(dev, lead=(B, T), bias=True)
    prompt = torch.arange(T, device=dev) < 3
    desirable = torch.tensor([True, False, False, True], device=dev)  # both groups: finite metrics

    def labels():
        y = torch.randint(0, V, (B, T), device=dev)
        return y.masked_fill(prompt | (torch.rand(B, T, device=dev) < 0.2), -100)

    y, ky = labels(), labels()
    xr, kx, kxr = (torch.randn(B, T, H, device=dev) for _ in range(3))
    feeds = [(x, _randn_like(x)), (y, labels), (ky, labels), (xr, _randn_like(xr)), (kx, _randn_like(kx)),
             (kxr, _randn_like(kxr))]
    if kl_given:  # TRL's kl: a one-element tensor on the device
        kl = torch.full((1,), 0.2, device=dev)
        extra = dict(kl=kl)
        feeds.append((kl, lambda: torch.rand(1, device=dev)))
    else:
        extra = dict(kl_input=kx, kl_target=ky, ref_kl_input=kxr)

    def step():
        loss, metrics = fusedce.kto_loss(x, w, y, desirable, linear_bias=b, ref_input=xr,
                                         ref_weight=w.detach() * 0.9, undesirable_weight=1.2, **extra)
        loss.backward()
        return (loss.detach(),) + tuple(metrics[k] for k in sorted(metrics))

    return Case([x, w, b], step, feeds)


def _module(dev):
    mod = fusedce.nn.LinearCrossEntropyLoss(H, V, bias=True, device=dev, z_loss=1e-4)
    x = torch.randn(N, H, device=dev).requires_grad_()
    t, fresh_t = _targets(dev)
    ni, fresh_n = _num_items(dev)

    def step():
        loss = mod(x, t, num_items_in_batch=ni)
        loss.backward()
        return (loss.detach(),)

    return Case([x, mod.linear.weight, mod.linear.bias], step,
                [(x, _randn_like(x)), (t, fresh_t), (ni, fresh_n)])


def _head_module(dev):
    mod = fusedce.nn.FusedLMHeadLoss(reduction="sum", softcap=10.0)
    x, w, b = _head(dev, bias=True)
    t, fresh_t = _targets(dev)

    def step():
        loss = mod(x, w, t, b)
        loss.backward()
        return (loss.detach(),)

    return Case([x, w, b], step, [(x, _randn_like(x)), (t, fresh_t)])


CASES = {
    "lce_mean_num_items_tensor": lambda d: _lce(d, num_items=True),
    "lce_mean": lambda d: _lce(d, z_loss=1e-4),
    "lce_sum_bias": lambda d: _lce(d, reduction="sum", bias=True),
    "lce_none": lambda d: _lce(d, reduction="none"),
    "lce_return_stats": lambda d: _lce(d, stats=True, z_loss=1e-4),
    "lce_shift_softcap": _lce_shift,
    "lce_entropy": _lce_entropy,
    "lce_class_weight": _lce_class_weight,
    "lce_low_memory": lambda d: _lce(d, low_memory=True, vocab_chunk_size=256, num_items=True),
    "lce_chunks": lambda d: _lce(d, chunk_size=20),
    "ce_mean": lambda d: _ce(d),
    "ce_num_items_tensor": lambda d: _ce(d, num_items=True),
    "ce_sum_stats": lambda d: _ce(d, reduction="sum", stats=True),
    "ce_none": lambda d: _ce(d, reduction="none"),
    "ce_inplace_backward": lambda d: _ce(d, inplace=True),
    "token_logprobs": _token_logprobs,
    "distill_teacher_logits": lambda d: _distill(d, teacher_logits=True, kind="forward_kl"),
    "distill_teacher_head_jsd": lambda d: _distill(d, teacher_logits=False, kind="jsd"),
    "policy_loss": _policy,
    "policy_loss_trl_options": lambda d: _policy(d, loss_type="dapo", trl_options=True),
    "policy_loss_sapo": lambda d: _policy(d, loss_type="sapo", trl_options=True),
    "policy_loss_sequence": lambda d: _policy(d, importance_sampling_level="sequence", trl_options=True),
    "policy_loss_vespo": lambda d: _policy(d, loss_type="vespo", trl_options=True),
    "preference_dpo_ref_head": lambda d: _preference(d, "sigmoid"),
    "preference_orpo": lambda d: _preference(d, "orpo"),
    "kto_kl_from_completions": _kto,
    "kto_kl_given": lambda d: _kto(d, kl_given=True),
    "module_linear_ce": _module,
    "module_head_loss": _head_module,
}


def _zero_grads(case):
    for p in case.params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        else:
            p.grad.zero_()


def _refresh(case):
    for static, fresh in case.feeds:
        with torch.no_grad():
            static.copy_(fresh())


# --------------------------------------------------------------------------------------------
# 1. No host sync
# --------------------------------------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("name", list(CASES))
def test_training_step_has_no_host_sync(name):
    case = CASES[name]("cuda")
    _zero_grads(case)
    case.step()  # warm-up: one-time initialization
    torch.cuda.synchronize()
    for _ in range(2):
        _refresh(case)
        _zero_grads(case)
        with sync_is_error():
            outs = case.step()
        torch.cuda.synchronize()
        for o in outs:  # a real step: finite values and gradients
            assert torch.isfinite(o.float()).all(), name
        for p in case.params:
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@CUDA
def test_sync_detector_is_live():
    """The check above can fail: a .item() under the same mode raises."""
    x = torch.ones(2, device="cuda")
    with pytest.raises(RuntimeError):
        with sync_is_error():
            x.sum().item()


@CUDA
def test_validation_mode_does_sync():
    """The opt-in check is the one place that reads the targets back (it is opt-in for that)."""
    x, w, _ = _head("cuda")
    t, _ = _targets("cuda")
    fusedce.linear_cross_entropy(x, w, t)  # warm-up
    with fusedce.validate_targets(), pytest.raises(RuntimeError):
        with sync_is_error():
            fusedce.linear_cross_entropy(x, w, t)


# --------------------------------------------------------------------------------------------
# 2. CUDA graphs
# --------------------------------------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("name", list(CASES))
def test_training_step_cuda_graph_equals_eager(name):
    torch.manual_seed(1)
    case = CASES[name]("cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (allocator, cuBLAS)
        for _ in range(2):
            _zero_grads(case)
            case.step()
    torch.cuda.current_stream().wait_stream(side)
    _zero_grads(case)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outs = case.step()

    for _ in range(3):  # new data each replay: nothing may have been frozen at capture time
        _refresh(case)
        _zero_grads(case)
        graph.replay()
        torch.cuda.synchronize()
        got = [o.clone() for o in static_outs]
        got_grads = [p.grad.clone() for p in case.params]
        _zero_grads(case)
        want = case.step()
        torch.cuda.synchronize()
        for i, (g, e) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, equal_nan=False,
                                       msg=lambda m, i=i: f"{name}: output {i}: {m}")
        for i, (g, p) in enumerate(zip(got_grads, case.params)):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, i=i: f"{name}: grad of param {i}: {m}")


# --------------------------------------------------------------------------------------------
# 3. Out-of-range targets
# --------------------------------------------------------------------------------------------

BAD = [V, -1, 2**40]  # just past the end, negative (not ignore_index), far out
BAD_AT = 5


def _bad_call(which, dev, bad, reduction="mean"):
    """One call with target[BAD_AT] = bad; returns (loss or per-token values, leaves)."""
    torch.manual_seed(3)
    x, w, _ = _head(dev)
    t = torch.randint(0, V, (N,), device=dev)
    t[BAD_AT] = bad
    if which == "linear_cross_entropy":
        out = fusedce.linear_cross_entropy(x, w, t, reduction=reduction)
    elif which == "cross_entropy":
        z = (x.detach() @ w.detach().T).requires_grad_()
        out = fusedce.cross_entropy(z, t, reduction=reduction)
        return out, [z]
    elif which == "token_logprobs":
        out = fusedce.token_logprobs(x, w, t)
        if reduction != "none":
            out = out.sum()
    elif which == "distillation_loss":
        out = fusedce.distillation_loss(x, w, t, teacher_logits=torch.randn(N, V, device=dev),
                                        ce_weight=0.5, reduction=reduction)
    elif which == "policy_loss":
        tok = t.reshape(B, T)
        old = -torch.rand(B, T, device=dev) - 5
        out, _ = fusedce.policy_loss(x.reshape(B, T, H).detach().requires_grad_(), w, tok, old,
                                     torch.randn(B, device=dev))
    else:
        raise AssertionError(which)
    return out, [x, w]


WHICH = ["linear_cross_entropy", "cross_entropy", "token_logprobs", "distillation_loss",
         "policy_loss"]


@CUDA
@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("bad", BAD)
def test_out_of_range_target_gives_nan_on_cuda(which, bad):
    """No host check by default: the loss is NaN (never a finite silent value), and so are the
    gradients (a GradScaler skips the step). The path is the one the no-sync tests above run: no
    host branch depends on the target values."""
    loss, leaves = _bad_call(which, "cuda", bad)
    loss.backward()
    torch.cuda.synchronize()
    assert torch.isnan(loss).all(), f"{which}: loss {loss}"
    for p in leaves:
        if p.grad is not None:
            assert torch.isnan(p.grad).any(), which


@CUDA
@pytest.mark.parametrize("which", ["linear_cross_entropy", "cross_entropy", "token_logprobs",
                                   "distillation_loss"])
def test_out_of_range_target_nan_only_at_that_token(which):
    """Per token: NaN exactly at the bad token, the others as with that token ignored."""
    per_tok, _ = _bad_call(which, "cuda", V, reduction="none")
    nan = torch.isnan(per_tok.detach())
    assert nan[BAD_AT] and nan.sum() == 1, which
    ref, _ = _bad_call(which, "cuda", -100, reduction="none")
    keep = torch.arange(N, device="cuda") != BAD_AT
    torch.testing.assert_close(per_tok.detach()[keep], ref.detach()[keep])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("bad", BAD)
def test_out_of_range_target_error_in_validation_mode(device, which, bad):
    # Each function names its own argument: token_logprobs' and policy_loss' are `tokens`.
    arg = "tokens" if which in ("token_logprobs", "policy_loss") else "target"
    with fusedce.validate_targets():
        with pytest.raises(RuntimeError, match=rf"{arg}( \(flattened\))?\[{BAD_AT}\] = {bad} is outside \[0, {V}\)"):
            _bad_call(which, device, bad)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_out_of_range_target_error_with_env(device, monkeypatch):
    monkeypatch.setenv("FUSEDCE_VALIDATE", "1")
    assert fusedce.validation.validation_enabled()
    with pytest.raises(RuntimeError, match=rf"target\[{BAD_AT}\] = {V} is outside"):
        _bad_call("linear_cross_entropy", device, V)
    monkeypatch.setenv("FUSEDCE_VALIDATE", "0")
    assert not fusedce.validation.validation_enabled()


def test_cpu_always_checks():
    """The CPU reads the targets for free: the error does not need validation mode."""
    assert not fusedce.validation.validation_enabled()
    with pytest.raises(RuntimeError, match=rf"target\[{BAD_AT}\] = -1 is outside"):
        _bad_call("cross_entropy", "cpu", -1)


def test_validate_targets_nests_and_restores():
    assert not fusedce.validation.validation_enabled()
    with fusedce.validate_targets():
        with fusedce.validate_targets():
            assert fusedce.validation.validation_enabled()
        assert fusedce.validation.validation_enabled()
    assert not fusedce.validation.validation_enabled()
    with pytest.raises(KeyError):
        with fusedce.validate_targets():
            raise KeyError("inside")
    assert not fusedce.validation.validation_enabled()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_validation_mode_accepts_valid_targets(device):
    """Validation changes nothing for good input (ignore_index included)."""
    torch.manual_seed(4)
    x, w, _ = _head(device)
    t, _ = _targets(device)
    plain = fusedce.linear_cross_entropy(x, w, t)
    with fusedce.validate_targets():
        checked = fusedce.linear_cross_entropy(x, w, t)
    assert math.isfinite(plain.item())
    torch.testing.assert_close(checked, plain, rtol=0, atol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_class_weights_with_out_of_range_target_do_not_index_out_of_bounds(device):
    """The mean's denominator looks the class weight of each target up: an out-of-range one must
    not be used as an index there either (a device-side assert on CUDA)."""
    x, w, _ = _head(device)
    t = torch.randint(0, V, (N,), device=device)
    t[BAD_AT] = V + 7
    cw = torch.rand(V, device=device) + 0.5
    if device == "cpu":
        with pytest.raises(RuntimeError, match="target"):
            fusedce.linear_cross_entropy(x, w, t, weight=cw)
        return
    loss = fusedce.linear_cross_entropy(x, w, t, weight=cw)
    torch.cuda.synchronize()
    assert torch.isnan(loss)


@CUDA
@pytest.mark.parametrize("which", ["linear_cross_entropy", "cross_entropy"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_out_of_range_target_statistics_are_nan(which, weighted, reduction):
    """return_stats beside a NaN loss: the z-loss part and the accuracy are NaN too (at the bad
    token for reduction='none'), never the plausible numbers a weight[0] lookup or a counted miss
    would give; the other tokens' values are those of the call with that token ignored."""
    torch.manual_seed(5)
    x, w, _ = _head("cuda")
    t = torch.randint(0, V, (N,), device="cuda")
    cw = torch.rand(V, device="cuda") + 0.5 if weighted else None

    def call(tt):
        if which == "cross_entropy":
            z = x.detach() @ w.detach().T
            return fusedce.cross_entropy(z, tt, weight=cw, z_loss=1e-3, reduction=reduction,
                                         return_stats=True)
        return fusedce.linear_cross_entropy(x, w, tt, weight=cw, z_loss=1e-3, reduction=reduction,
                                            return_stats=True)

    bad_t = t.clone()
    bad_t[BAD_AT] = V + 3
    out = call(bad_t)
    torch.cuda.synchronize()
    assert torch.isnan(out.accuracy)
    if reduction == "none":
        nan = torch.isnan(out.z_loss.detach())
        assert nan[BAD_AT] and nan.sum() == 1
        ign = t.clone()
        ign[BAD_AT] = -100
        ref = call(ign)
        keep = torch.arange(N, device="cuda") != BAD_AT
        torch.testing.assert_close(out.z_loss.detach()[keep], ref.z_loss.detach()[keep])
    else:
        assert torch.isnan(out.z_loss)
    good = call(t)
    assert torch.isfinite(good.z_loss).all() and torch.isfinite(good.accuracy)
