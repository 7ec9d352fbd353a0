"""The edges of issue 12 section 3, single process: each gives the right answer (against
torch.nn.functional / fusedce.reference in float64) or a clear error naming the argument.
The vocab-parallel side of the same edges is in tests/test_distributed.py (sharded_* checks)."""

import threading

import pytest
import torch
import torch.nn.functional as F

import fusedce
from fusedce import reference

N, H, V = 6, 4, 7


def _head(device, dtype=torch.float64, requires_grad=True):
    x = torch.randn(N, H, dtype=dtype, device=device, requires_grad=requires_grad)
    w = torch.randn(V, H, dtype=dtype, device=device, requires_grad=requires_grad)
    t = torch.randint(0, V, (N,), device=device)
    return x, w, t


# --------------------------------------------------------------------------------------------
# create_graph (double backward), forward-mode AD, torch.func
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_create_graph_raises(device, reduction):
    """A gradient penalty needs a differentiable gradient; the fused op's is not: an error naming
    create_graph, never a gradient silently detached from the graph."""
    x, w, t = _head(device)
    loss = fusedce.linear_cross_entropy(x, w, t, reduction=reduction).sum()
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(loss, (x, w), create_graph=True)


def test_cross_entropy_create_graph_raises(device):
    """Never an all-zero (or absent) second derivative."""
    z = torch.randn(N, V, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, V, (N,), device=device)
    loss = fusedce.cross_entropy(z, t)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(loss, z, create_graph=True)


def test_backward_without_create_graph_still_exact(device):
    """The create_graph check does not touch ordinary backward passes."""
    x, w, t = _head(device)
    fusedce.linear_cross_entropy(x, w, t).backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.cross_entropy(xr @ wr.T, t).backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)


def _public_calls(device):
    """Each public function as f(first tensor argument) -> a scalar."""
    x, w, t = _head(device, requires_grad=False)
    z = x @ w.T
    xb, tb = x.reshape(2, N // 2, H), t.reshape(2, N // 2)
    adv = torch.randn(2, dtype=torch.float64, device=device)
    return {
        "linear_cross_entropy": (lambda a: fusedce.linear_cross_entropy(a, w, t), x),
        "cross_entropy": (lambda a: fusedce.cross_entropy(a, t), z),
        "token_logprobs": (lambda a: fusedce.token_logprobs(a, w, t).sum(), x),
        "token_statistics": (lambda a: fusedce.token_statistics(a, w, t).logprobs.sum(), x),
        "distillation_loss": (lambda a: fusedce.distillation_loss(a, w, t, teacher_logits=z), x),
        "policy_loss": (lambda a: fusedce.policy_loss(a, w, tb, None, adv)[0], xb),
        "preference_loss": (lambda a: fusedce.preference_loss(a, w, tb, loss_type="cpo")[0], xb),
        "kto_loss": (lambda a: fusedce.kto_loss(a, w, tb, torch.tensor([True, False], device=device),
                                                 ref_logps=torch.zeros(2, dtype=a.dtype, device=device),
                                                 kl=0.0)[0], xb),
    }


FUNCTIONS = ["linear_cross_entropy", "cross_entropy", "token_logprobs", "token_statistics",
             "distillation_loss", "policy_loss", "preference_loss", "kto_loss"]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_forward_mode_ad_raises(device, name):
    """torch.func.jvp and torch.autograd.forward_ad gave a zero tangent: now an error by name.
    (token_statistics had no check: torch.func.jvp returned a tangent of 0.0 for its logprobs.)"""
    fn, a = _public_calls(device)[name]
    with pytest.raises(NotImplementedError, match=f"{name} does not support forward-mode AD"):
        torch.func.jvp(fn, (a,), (torch.ones_like(a),))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(a, torch.ones_like(a))
        with pytest.raises(NotImplementedError, match=f"{name} does not support forward-mode AD"):
            fn(dual)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_func_grad_raises(device, name):
    fn, a = _public_calls(device)[name]
    with pytest.raises(NotImplementedError, match=f"{name} does not support torch.func.grad"):
        torch.func.grad(fn)(a)


def test_vmap_is_correct(device):
    """torch.vmap batches through the ops (a per-sample loop): allowed, and exact."""
    x = torch.randn(3, 5, H, dtype=torch.float64, device=device)
    w = torch.randn(V, H, dtype=torch.float64, device=device)
    t = torch.randint(0, V, (3, 5), device=device)
    got = torch.func.vmap(lambda a, b: fusedce.linear_cross_entropy(a, w, b))(x, t)
    want = torch.stack([F.cross_entropy(x[i] @ w.T, t[i]) for i in range(3)])
    torch.testing.assert_close(got, want)
    z = x @ w.T
    got = torch.func.vmap(lambda a, b: fusedce.cross_entropy(a, b))(z, t)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("which", ["linear_cross_entropy", "distillation_loss"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("batched_weight", [False, True])
def test_vmap_gradients_reach_every_input(device, which, reduction, batched_weight):
    """Under torch.vmap a batched tensor reports requires_grad=False, so the forward computed no
    gradient for the vmapped hidden states while it did for the unbatched weight, and the backward
    then returned none for them: x.grad stayed None (the weight's was right). Every gradient must
    equal the per-sample float64 loop's."""
    B = 3
    x = torch.randn(B, 5, H, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(*((B,) if batched_weight else ()), V, H, dtype=torch.float64, device=device,
                    requires_grad=True)
    t = torch.randint(0, V, (B, 5), device=device)
    teacher = torch.randn(B, 5, V, dtype=torch.float64, device=device)

    def one(a, ww, b, tl):
        if which == "linear_cross_entropy":
            return fusedce.linear_cross_entropy(a, ww, b, reduction=reduction, z_loss=0.1)
        return fusedce.distillation_loss(a, ww, b, teacher_logits=tl, ce_weight=0.5, reduction=reduction)

    def ref(a, ww, b, tl):
        logits = a @ ww.T
        if which == "linear_cross_entropy":
            per = F.cross_entropy(logits, b, reduction="none") + 0.1 * torch.logsumexp(logits, -1) ** 2
        else:
            lq, lr = logits.log_softmax(-1), tl.log_softmax(-1)
            per = (lr.exp() * (lr - lq)).sum(-1) + 0.5 * F.cross_entropy(logits, b, reduction="none")
        return per.sum() if reduction == "sum" else per.mean()

    got = torch.func.vmap(one, in_dims=(0, 0 if batched_weight else None, 0, 0))(x, w, t, teacher)
    gx, gw = torch.autograd.grad(got.sum(), (x, w), allow_unused=True)
    want = torch.stack([ref(x[i], w[i] if batched_weight else w, t[i], teacher[i]) for i in range(B)])
    rx, rw = torch.autograd.grad(want.sum(), (x, w))
    torch.testing.assert_close(got, want)
    assert gx is not None and gw is not None, (gx is None, gw is None)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


@pytest.mark.parametrize("which", ["token_logprobs", "token_statistics", "policy_loss", "policy_loss_sequence",
                                   "preference_loss", "kto_loss"])
def test_vmap_token_functions(device, which):
    """The functions that check their tokens on the host (always on the CPU) failed under torch.vmap
    with vmap's "data-dependent control flow" error (bool() of a batched tensor). Under vmap the
    op checks each sample's targets itself; values and gradients equal the per-sample reference."""
    B, S, T = 3, 2, 4
    x = torch.randn(B, S, T, H, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, V, (B, S, T), device=device)
    old = torch.randn(B, S, T, dtype=torch.float64, device=device) - 2
    adv = torch.randn(B, S, dtype=torch.float64, device=device)
    labels = torch.tensor([True, False], device=device)
    zeros = torch.zeros(S, dtype=torch.float64, device=device)
    calls = {
        "token_logprobs": (lambda a, b, o, ad: fusedce.token_logprobs(a, w, b, temperature=0.7),
                           lambda z, b, o, ad: reference.token_logprobs(z, b, temperature=0.7)[0]),
        "token_statistics": (lambda a, b, o, ad: fusedce.token_statistics(a, w, b, outputs=("entropy",)).entropy,
                             lambda z, b, o, ad: reference.entropy(z)),
        "policy_loss": (lambda a, b, o, ad: fusedce.policy_loss(a, w, b, o, ad)[0],
                        lambda z, b, o, ad: reference.policy_loss(z, b, o, ad)[0]),
        "policy_loss_sequence": (
            lambda a, b, o, ad: fusedce.policy_loss(a, w, b, o, ad, importance_sampling_level="sequence")[0],
            lambda z, b, o, ad: reference.policy_loss(z, b, o, ad, importance_sampling_level="sequence")[0]),
        "preference_loss": (lambda a, b, o, ad: fusedce.preference_loss(a, w, b, loss_type="cpo")[0],
                            lambda z, b, o, ad: reference.preference_loss(z, b, loss_type="cpo")[0]),
        "kto_loss": (lambda a, b, o, ad: fusedce.kto_loss(a, w, b, labels, ref_logps=zeros, kl=0.1)[0],
                     lambda z, b, o, ad: reference.kto_loss(z, b, labels, ref_logps=zeros, kl=0.1)[0]),
    }
    fn, ref = calls[which]
    got = torch.func.vmap(fn)(x, t, old, adv)
    want = torch.stack([ref(x[i] @ w.T, t[i], old[i], adv[i]) for i in range(B)])
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got.sum(), (x, w)), torch.autograd.grad(want.sum(), (x, w))):
        torch.testing.assert_close(a, b)
    if device == "cpu":  # the CPU op always checks its targets
        bad = t.clone()
        bad[1, 0, 0] = V + 3
        with pytest.raises(RuntimeError, match=r"outside \[0, 7\)"):
            torch.func.vmap(fn)(x, bad, old, adv)


@pytest.mark.parametrize("which", ["linear_cross_entropy", "linear_cross_entropy_fp16", "distillation_loss",
                                   "policy_loss", "cross_entropy_inplace", "cross_entropy_inplace_none"])
def test_batched_upstream_gradients(device, which):
    """torch.autograd.grad(..., is_grads_batched=True) and jacobian(vectorize=True) run the backward
    under vmap: the in-place scaling of the precomputed gradients (fusedce::scale_, mul out=) and
    the in-place cross_entropy backward failed with "Batching rule not implemented". They must give
    one exact gradient per upstream gradient."""
    dtype = torch.float16 if which.endswith("fp16") else torch.float64
    x = torch.randn(2, 3, H, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(V, H, dtype=dtype, device=device, requires_grad=True)
    t = torch.randint(0, V, (2, 3), device=device)
    teacher = torch.randn(2, 3, V, dtype=torch.float64, device=device)
    old = torch.randn(2, 3, dtype=torch.float64, device=device) - 2
    adv = torch.tensor([1.0, -0.5], dtype=torch.float64, device=device)
    fn = {
        "linear_cross_entropy": lambda a, b: fusedce.linear_cross_entropy(a, b, t, z_loss=0.1),
        "linear_cross_entropy_fp16": lambda a, b: fusedce.linear_cross_entropy(a, b, t),
        "distillation_loss": lambda a, b: fusedce.distillation_loss(a, b, t, teacher_logits=teacher),
        "policy_loss": lambda a, b: fusedce.policy_loss(a, b, t, old, adv)[0],
        "cross_entropy_inplace": lambda a, b: fusedce.cross_entropy(a @ b.T, t, inplace_backward=True),
        "cross_entropy_inplace_none": lambda a, b: fusedce.cross_entropy(a @ b.T, t, inplace_backward=True,
                                                                         reduction="none"),
    }[which]
    shape = fn(x, w).shape
    ups = torch.randn(3, *shape, dtype=torch.float32 if dtype == torch.float16 else dtype, device=device)
    got = torch.autograd.grad(fn(x, w), (x, w), ups, is_grads_batched=True)
    for k in range(3):
        want = torch.autograd.grad(fn(x, w), (x, w), ups[k])
        for a, b in zip(got, want):
            torch.testing.assert_close(a[k], b)
    if dtype == torch.float64:
        jac = torch.autograd.functional.jacobian(fn, (x, w), vectorize=True)
        basis = torch.eye(shape.numel(), dtype=dtype, device=device)
        for k in range(shape.numel()):  # row k: a fresh forward and one backward each
            want = torch.autograd.grad(fn(x, w), (x, w), basis[k].reshape(shape))
            for a, b in zip(jac, want):
                torch.testing.assert_close(a.reshape(shape.numel(), *b.shape)[k], b)


@pytest.mark.parametrize("n_grad", [False, True])
@pytest.mark.parametrize("which", ["linear_cross_entropy", "cross_entropy", "policy_loss"])
def test_vmap_over_num_items_in_batch(device, which, n_grad):
    """A CPU num_items_in_batch is read on the host with .item() (checked > 0 on a CPU loss, taken
    as a float for a CUDA one), which vmap refuses for a batched tensor ("We don't support vmap
    over calling .item()"). Batched over num_items_in_batch, each sample's loss is its sum / its
    count; a count that requires grad gets d(sum / n)/dn (the batched wrapper's requires_grad is
    False: the tensor it wraps tells)."""
    B = 3
    x = torch.randn(B, 2, 3, H, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, V, (B, 2, 3), device=device)
    old = torch.randn(B, 2, 3, dtype=torch.float64, device=device) - 2
    adv = torch.randn(B, 2, dtype=torch.float64, device=device)
    ns = torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64, requires_grad=n_grad)  # on the CPU, as HF passes it

    def one(a, b, o, ad, n):
        if which == "linear_cross_entropy":
            return fusedce.linear_cross_entropy(a, w, b, num_items_in_batch=n)
        if which == "cross_entropy":
            return fusedce.cross_entropy(a @ w.T, b, num_items_in_batch=n)
        return fusedce.policy_loss(a, w, b, o, ad, loss_type="dapo", num_items_in_batch=n)[0]

    def ref(i):
        if which == "policy_loss":
            return reference.policy_loss(x[i] @ w.T, t[i], old[i], adv[i], loss_type="dapo",
                                         num_items_in_batch=ns[i])[0]
        return F.cross_entropy((x[i] @ w.T).reshape(-1, V), t[i].reshape(-1), reduction="sum") / ns[i]

    got = torch.func.vmap(one)(x, t, old, adv, ns)
    want = torch.stack([ref(i) for i in range(B)])
    torch.testing.assert_close(got, want)
    wrt = (x, w, ns) if n_grad else (x, w)
    for a, b in zip(torch.autograd.grad(got.sum(), wrt, allow_unused=True), torch.autograd.grad(want.sum(), wrt)):
        assert a is not None
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------
# ignore_index against the target dtype, ignore_index range, H = 0
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [False, True])
def test_int32_target_with_ignore_index_outside_int32(device, shift):
    """An int32 target cannot hold 2**40: nothing is ignored, and the mean divides by every
    token (it divided by a count taken from a wrapped comparison)."""
    x, w, t = _head(device, requires_grad=False)
    big = 2**40
    got = fusedce.linear_cross_entropy(x, w, t.to(torch.int32), ignore_index=big, shift=shift,
                                       return_stats=True)
    want = reference.linear_cross_entropy(x, w, t, ignore_index=big, shift=shift)
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(got.accuracy, want.accuracy)
    torch.testing.assert_close(got.loss, want.loss)
    z = x @ w.T
    got_ce = fusedce.cross_entropy(z, t.to(torch.int32), ignore_index=big)
    torch.testing.assert_close(got_ce, F.cross_entropy(z, t, ignore_index=-(2**62)))
    got_d = fusedce.distillation_loss(x, w, t.to(torch.int32), teacher_logits=z * 0.5, ignore_index=big)
    torch.testing.assert_close(got_d, fusedce.distillation_loss(x, w, t, teacher_logits=z * 0.5, ignore_index=big))


@pytest.mark.parametrize("which", ["linear_cross_entropy", "cross_entropy", "distillation_loss"])
@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 1.5, "x"])
def test_ignore_index_not_int64(device, which, value):
    x, w, t = _head(device, requires_grad=False)
    call = {
        "linear_cross_entropy": lambda: fusedce.linear_cross_entropy(x, w, t, ignore_index=value),
        "cross_entropy": lambda: fusedce.cross_entropy(x @ w.T, t, ignore_index=value),
        "distillation_loss": lambda: fusedce.distillation_loss(x, w, t, teacher_logits=x @ w.T, ignore_index=value),
    }[which]
    with pytest.raises((ValueError, TypeError), match="ignore_index"):
        call()


@pytest.mark.parametrize("which", ["linear_cross_entropy", "token_logprobs", "distillation_loss", "policy_loss"])
def test_hidden_size_zero(device, which):
    x = torch.randn(2, 3, 0, dtype=torch.float64, device=device)
    w = torch.randn(V, 0, dtype=torch.float64, device=device)
    t = torch.randint(0, V, (2, 3), device=device)
    call = {
        "linear_cross_entropy": lambda: fusedce.linear_cross_entropy(x, w, t),
        "token_logprobs": lambda: fusedce.token_logprobs(x, w, t),
        "distillation_loss": lambda: fusedce.distillation_loss(x, w, t, teacher_logits=torch.zeros(2, 3, V, dtype=x.dtype, device=device)),
        "policy_loss": lambda: fusedce.policy_loss(x, w, t, None, torch.ones(2, dtype=x.dtype, device=device)),
    }[which]
    with pytest.raises(ValueError, match="H = 0"):
        call()


# --------------------------------------------------------------------------------------------
# Negative class weights
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["negative_sum", "zero_sum"])
def test_negative_class_weights_equal_torch(device, case):
    """Class weights summing below zero over the targets were nan in linear_cross_entropy (a
    `denominator > 0` guard); now F.cross_entropy's value and gradients. Summing to exactly 0:
    F's sum / 0 (here -inf), like fusedce.cross_entropy."""
    x, w, t = _head(device)
    if case == "negative_sum":
        cw = -torch.rand(V, dtype=torch.float64, device=device) - 0.1
    else:
        t = torch.tensor([2, 0, -100, -100, -100, -100], device=device)
        cw = torch.zeros(V, dtype=torch.float64, device=device)
        cw[2], cw[0] = 1.0, -1.0
    loss = fusedce.linear_cross_entropy(x, w, t, weight=cw)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    want = F.cross_entropy(xr @ wr.T, t, weight=cw)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(fusedce.cross_entropy((x @ w.T).detach(), t, weight=cw), want.detach())
    if case == "negative_sum":
        loss.backward()
        want.backward()
        torch.testing.assert_close(x.grad, xr.grad)
        torch.testing.assert_close(w.grad, wr.grad)


# --------------------------------------------------------------------------------------------
# policy_loss tokens, distillation_loss argument limits
# --------------------------------------------------------------------------------------------


def _policy(device):
    x = torch.randn(2, 3, H, dtype=torch.float64, device=device)
    w = torch.randn(V, H, dtype=torch.float64, device=device)
    tok = torch.randint(0, V, (2, 3), device=device)
    old = torch.randn(2, 3, dtype=torch.float64, device=device) - 2
    adv = torch.randn(2, dtype=torch.float64, device=device)
    return x, w, tok, old, adv


@pytest.mark.parametrize("bad", [-1, -100, V, 10**12])
def test_policy_loss_kept_token_out_of_range(bad):
    """A kept (mask != 0) token of -1 was taken for a masked one; any kept token outside [0, V)
    is an error naming policy_loss's own arguments (tokens, mask), not target / ignore_index.
    On the CPU, which always checks (a CUDA call checks on the host only where allowed:
    fusedce._checks.host_target_check)."""
    x, w, tok, old, adv = _policy("cpu")
    tok[0, 1] = bad
    with pytest.raises(RuntimeError, match=r"tokens.*outside \[0, 7\).*mask") as err:
        fusedce.policy_loss(x, w, tok, old, adv)
    assert "ignore_index" not in str(err.value) and "target" not in str(err.value)


def test_policy_loss_masked_tokens_may_be_anything(device):
    """Padding outside the mask (-1, -100, V) is not read: the loss equals the reference's with
    those positions holding a valid id."""
    x, w, tok, old, adv = _policy(device)
    mask = torch.ones(2, 3, dtype=torch.float64, device=device)
    mask[0, 2] = mask[1, 0] = mask[1, 1] = 0
    padded = tok.clone()
    padded[0, 2], padded[1, 0], padded[1, 1] = -1, -100, V
    got, _ = fusedce.policy_loss(x, w, padded, old, adv, mask=mask)
    want = reference.policy_loss(x @ w.T, tok, old, adv, mask=mask)[0]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name,value", [("z_loss", -1.0), ("label_smoothing", 1.5), ("label_smoothing", -0.1),
                                        ("distill_weight", -1.0), ("ce_weight", -0.5)])
def test_distillation_loss_limits_as_linear_cross_entropy(device, name, value):
    x, w, t = _head(device, requires_grad=False)
    with pytest.raises(ValueError, match=name):
        fusedce.distillation_loss(x, w, t, teacher_logits=x @ w.T, **{name: value})
    if name in ("z_loss", "label_smoothing"):  # the very same error as linear_cross_entropy's
        with pytest.raises(ValueError) as lce:
            fusedce.linear_cross_entropy(x, w, t, **{name: value})
        with pytest.raises(ValueError) as dl:
            fusedce.distillation_loss(x, w, t, teacher_logits=x @ w.T, **{name: value})
        assert str(lce.value) == str(dl.value)


def test_token_logprobs_softcap_zero_and_float_tokens(device):
    x, w, t = _head(device, requires_grad=False)
    with pytest.raises(ValueError, match="softcap"):
        fusedce.token_logprobs(x, w, t, softcap=0.0)
    with pytest.raises(TypeError, match="tokens"):
        fusedce.token_logprobs(x, w, t.double())


# --------------------------------------------------------------------------------------------
# torch.compile with an int num_items_in_batch that changes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["linear_cross_entropy", "cross_entropy"])
@pytest.mark.parametrize("dynamic", [None, True])
def test_compile_changing_int_num_items_in_batch(which, dynamic):
    """math.isfinite on the traced int failed ("torch.* op returned non-Tensor") under
    fullgraph=True, on the second value (None) or on every call (dynamic=True)."""
    torch._dynamo.reset()
    x, w, t = _head("cpu")

    def f(x, w, n):
        if which == "linear_cross_entropy":
            return fusedce.linear_cross_entropy(x, w, t, num_items_in_batch=n, return_stats=True)
        return fusedce.cross_entropy(x @ w.T, t, num_items_in_batch=n, return_stats=True)

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for n in (3, 5, 11):
        got = compiled(x, w, n)
        gx, gw = torch.autograd.grad(got.loss, (x, w))
        want = reference.linear_cross_entropy(x, w, t, num_items_in_batch=n)
        rx, rw = torch.autograd.grad(want.loss, (x, w))
        torch.testing.assert_close(got.loss, want.loss)
        torch.testing.assert_close(got.z_loss, want.z_loss)
        torch.testing.assert_close(gx, rx)
        torch.testing.assert_close(gw, rw)


@pytest.mark.parametrize("option", ["num_items_in_batch", "gradient_accumulation_steps"])
@pytest.mark.parametrize("dynamic", [None, True])
def test_compile_policy_loss_changing_int_count(option, dynamic):
    """policy_loss's int num_items_in_batch and gradient_accumulation_steps went through
    math.isfinite, which a traced int cannot take: fullgraph=True failed ("torch.* op returned
    non-Tensor") on the second value (None) or on every call (dynamic=True)."""
    torch._dynamo.reset()
    B, T = 2, 3
    x = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))
    old = -torch.rand(B, T, dtype=torch.float64)
    adv = torch.randn(B, dtype=torch.float64)
    loss_type = "dapo" if option == "num_items_in_batch" else "grpo"

    def f(x, w, n):
        return fusedce.policy_loss(x, w, tokens, old, adv, loss_type=loss_type, **{option: n})[0]

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for n in (3, 5, 11):
        got = compiled(x, w, n)
        want = reference.policy_loss(x @ w.T, tokens, old, adv, loss_type=loss_type, **{option: n})[0]
        torch.testing.assert_close(got, want)
        for g, r in zip(torch.autograd.grad(got, (x, w)), torch.autograd.grad(want, (x, w))):
            torch.testing.assert_close(g, r)


@pytest.mark.parametrize("name", ["linear_cross_entropy", "distillation_loss", "policy_loss"])
def test_second_backward_error_names_the_function(device, name):
    """The second-backward error of distillation_loss and policy_loss said "the same
    linear_cross_entropy loss": it names the function the caller called."""
    x = torch.randn(2, 3, H, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, V, (2, 3), device=device)
    loss = {
        "linear_cross_entropy": lambda: fusedce.linear_cross_entropy(x, w, t),
        "distillation_loss": lambda: fusedce.distillation_loss(
            x, w, t, teacher_logits=torch.randn(2, 3, V, dtype=torch.float64, device=device)),
        "policy_loss": lambda: fusedce.policy_loss(x, w, t, None, torch.ones(2, dtype=torch.float64, device=device))[0],
    }[name]()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=f"second backward through the same {name} loss"):
        loss.backward()


# --------------------------------------------------------------------------------------------
# allow_second_backward is per thread
# --------------------------------------------------------------------------------------------


def test_allow_second_backward_is_per_thread(device):
    """One thread inside allow_second_backward() does not let another thread's second backward
    through (it silently reused in-place-scaled gradients before), and its own still works."""
    entered, leave = threading.Event(), threading.Event()
    errors = []

    def other():
        try:
            x, w, t = _head(device)
            loss = fusedce.linear_cross_entropy(x, w, t)
            with fusedce.allow_second_backward():
                entered.set()
                first = torch.autograd.grad(loss * 2.0, (x, w), retain_graph=True)
                second = torch.autograd.grad(loss * 3.0, (x, w), retain_graph=True)
                for a, b in zip(first, second):
                    torch.testing.assert_close(b, 1.5 * a)
                leave.wait(timeout=60)
        except Exception as e:  # noqa: BLE001 - reported to the main thread
            errors.append(e)
            entered.set()

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert entered.wait(timeout=60)
        x, w, t = _head(device)
        loss = fusedce.linear_cross_entropy(x, w, t)
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="second backward"):
            loss.backward()
    finally:
        leave.set()
        thread.join()
    assert not errors, errors


# --------------------------------------------------------------------------------------------
# num_items_in_batch as a tensor that requires grad
# --------------------------------------------------------------------------------------------


_NUM_ITEMS_CASES = [
    "linear_cross_entropy", "linear_cross_entropy_stats", "linear_cross_entropy_terms",
    "linear_cross_entropy_low_memory", "cross_entropy", "cross_entropy_stats",
    "LinearCrossEntropyLoss", "FusedLMHeadLoss",
    "sharded_linear_cross_entropy", "sharded_linear_cross_entropy_stats", "sharded_cross_entropy",
    "sharded_cross_entropy_stats",
    "policy_loss_dapo", "policy_loss_cispo_entropy", "policy_loss_vespo_entropy",
    "policy_loss_sequence_entropy", "policy_loss_grpo", "sharded_policy_loss_dapo_entropy",
]


@pytest.mark.parametrize("requires_grad", [True, False], ids=["n_grad", "n_plain"])
@pytest.mark.parametrize("case", _NUM_ITEMS_CASES)
def test_num_items_in_batch_tensor_gradient(device, case, requires_grad, tmp_path):
    """The documented loss is sum / num_items_in_batch; a float tensor that requires grad gets
    d(sum / n)/dn (-sum / n**2), as autograd on the materialized float64 definition gives it, on
    every path (the fused ops precompute their gradients with 1 / n, whose own gradient they do
    not return). A plain tensor keeps its value and the other gradients unchanged."""
    import contextlib

    B, T = 2, 3
    x = torch.randn(B, T, H, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, V, (B, T), device=device)
    t[0, 1] = -100
    old = torch.randn(B, T, dtype=torch.float64, device=device) - 2
    adv = torch.randn(B, T, dtype=torch.float64, device=device)
    mask = torch.ones(B, T, device=device)
    mask[1, 2] = 0
    n = torch.tensor([4.5] if case == "cross_entropy" else 4.5, dtype=torch.float64, device=device)
    n.requires_grad_(requires_grad)
    sharded = case.startswith("sharded_")
    ce = dict(z_loss=0.01, label_smoothing=0.1)
    stats = case.endswith("_stats")

    def fused(x, w, n, group):
        pg = dict(process_group=group) if sharded else {}
        name = case.removeprefix("sharded_").removesuffix("_stats")
        if name == "linear_cross_entropy":
            out = fusedce.linear_cross_entropy(x, w, t, num_items_in_batch=n, return_stats=stats, **ce, **pg)
        elif name == "linear_cross_entropy_terms":
            out = fusedce.linear_cross_entropy(x, w, t, num_items_in_batch=n, entropy_coef=0.3,
                                               return_stats=True, return_entropy=True, **ce)
        elif name == "linear_cross_entropy_low_memory":
            out = fusedce.linear_cross_entropy(x, w, t, num_items_in_batch=n, low_memory=True,
                                               vocab_chunk_size=3, chunk_size=2, **ce)
        elif name == "cross_entropy":
            out = fusedce.cross_entropy(x @ w.T, t, num_items_in_batch=n, return_stats=stats, **ce, **pg)
        elif name in ("LinearCrossEntropyLoss", "FusedLMHeadLoss"):
            if name == "FusedLMHeadLoss":
                out = fusedce.nn.FusedLMHeadLoss(**ce)(x, w, t, num_items_in_batch=n, return_stats=True)
            else:
                mod = fusedce.nn.LinearCrossEntropyLoss(H, V, dtype=torch.float64, device=device, **ce)
                with torch.no_grad():
                    mod.linear.weight.copy_(w)
                # the module's own parameter stands in for w: its gradient is copied back below
                out = mod(x, t, num_items_in_batch=n)
                fused.module = mod
        else:
            kw = dict(mask=mask, num_items_in_batch=n, **pg)
            if name == "policy_loss_dapo":
                kw.update(loss_type="dapo")
            elif name == "policy_loss_cispo_entropy":
                kw.update(loss_type="cispo", entropy_coef=0.2, epsilon_high=5.0)
            elif name == "policy_loss_vespo_entropy":
                kw.update(loss_type="vespo", entropy_coef=0.2)
            elif name == "policy_loss_sequence_entropy":
                kw.update(loss_type="dapo", importance_sampling_level="sequence", entropy_coef=0.2)
            elif name == "policy_loss_grpo":  # ignores num_items_in_batch: no gradient reaches it
                kw.update(loss_type="grpo")
            elif name == "policy_loss_dapo_entropy":
                kw.update(loss_type="dapo", entropy_coef=0.2, beta=0.1, ref_logprobs=old + 0.3)
            return [fusedce.policy_loss(x, w, t.clamp(min=0), old, adv, **kw)[0]], kw
        return ([out.loss, out.z_loss] if isinstance(out, tuple) else [out]), None

    def truth(x, w, n, kw):
        logits = x @ w.T
        if kw is not None:
            kw = {k: v for k, v in kw.items() if k != "process_group"}
            return [reference.policy_loss(logits, t.clamp(min=0), old, adv, **kw)[0]]
        r = reference.cross_entropy(logits, t, num_items_in_batch=n.reshape(()), **ce)
        out = [r.loss]
        if case == "linear_cross_entropy_terms":
            valid = (t != -100).to(logits.dtype)
            out = [r.loss + 0.3 * (reference.entropy(logits) * valid).sum() / n, r.z_loss]
        elif stats or case == "FusedLMHeadLoss":
            out.append(r.z_loss)
        return out

    ctx = contextlib.nullcontext(None)
    if sharded:
        import torch.distributed as dist

        if device != "cpu" or not dist.is_available() or not dist.is_gloo_available():
            pytest.skip("a one-rank gloo group on the CPU")
        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
        ctx = contextlib.ExitStack()
        if owned:
            ctx.callback(dist.destroy_process_group)
        group = dist.group.WORLD
    else:
        group = None
    with ctx:
        got, kw = fused(x, w, n, group)
    want = truth(x, w, n, kw)
    inputs = (x, w, n) if requires_grad else (x, w)

    def grads(y, wrt):
        g = torch.autograd.grad(y, wrt, allow_unused=True, retain_graph=True)
        return [torch.zeros_like(i) if gi is None else gi for gi, i in zip(g, wrt)]

    torch.testing.assert_close(got[0], want[0])
    if case == "LinearCrossEntropyLoss":
        mod = fused.module
        g = grads(got[0], (x, mod.linear.weight, n) if requires_grad else (x, mod.linear.weight))
    else:
        g = grads(got[0], inputs)
    for name, a, b in zip(("input", "weight", "num_items_in_batch"), g, grads(want[0], inputs)):
        torch.testing.assert_close(a, b, msg=f"{case} gradient of the loss w.r.t. {name}")
    if len(got) > 1:  # LossOutput.z_loss: the z-loss part, also divided by n
        torch.testing.assert_close(got[1], want[1])
        if requires_grad:
            torch.testing.assert_close(grads(got[1], (n,))[0], grads(want[1], (n,))[0],
                                       msg=f"{case} gradient of LossOutput.z_loss w.r.t. num_items_in_batch")


@pytest.mark.parametrize("which", ["linear_cross_entropy", "cross_entropy", "policy_loss", "policy_loss_sequence"])
def test_forward_ad_dual_num_items_in_batch(device, which):
    """A dual num_items_in_batch (forward-mode AD; the other arguments plain) gets the tangent of
    sum / n, -sum / n**2 * dn, not a tangent silently dropped by the fused op."""
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(2, 3, H, dtype=torch.float64, device=device)
    w = torch.randn(V, H, dtype=torch.float64, device=device)
    t = torch.randint(0, V, (2, 3), device=device)
    old = torch.randn(2, 3, dtype=torch.float64, device=device) - 2
    adv = torch.randn(2, 3, dtype=torch.float64, device=device)
    kw = dict(importance_sampling_level="sequence") if which == "policy_loss_sequence" else {}

    def f(n):
        if which == "linear_cross_entropy":
            return fusedce.linear_cross_entropy(x, w, t, num_items_in_batch=n)
        if which == "cross_entropy":
            return fusedce.cross_entropy(x @ w.T, t, num_items_in_batch=n)
        return fusedce.policy_loss(x, w, t, old, adv, num_items_in_batch=n, entropy_coef=0.2, **kw)[0]

    def truth(n):
        if which.startswith("policy_loss"):
            return reference.policy_loss(x @ w.T, t, old, adv, num_items_in_batch=n, entropy_coef=0.2, **kw)[0]
        return reference.cross_entropy(x @ w.T, t, num_items_in_batch=n).loss

    n0 = torch.tensor(3.5, dtype=torch.float64, device=device)
    dn = torch.tensor(0.7, dtype=torch.float64, device=device)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(f(fwAD.make_dual(n0, dn)))
        want = fwAD.unpack_dual(truth(fwAD.make_dual(n0, dn)))
    torch.testing.assert_close(got.primal, want.primal)
    assert got.tangent is not None
    torch.testing.assert_close(got.tangent, want.tangent)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("which", ["linear_cross_entropy", "cross_entropy"])
def test_sharded_stats_beside_an_out_of_range_target(device, which, reduction, monkeypatch, tmp_path):
    """Where no host check is made (a default CUDA call; simulated here on a one-rank gloo group)
    the vocab-parallel path makes an out-of-range target's loss NaN. Its statistics must not
    report plausible numbers beside it, as on one process (functional._stats): LossOutput.z_loss
    NaN (at that token for reduction='none'; the other tokens' values kept) and accuracy NaN."""
    import torch.distributed as dist

    from fusedce import _parallel

    if device != "cpu" or not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("a one-rank gloo group on the CPU")
    monkeypatch.setattr(_parallel, "host_target_check", lambda dev: False)
    x = torch.randn(4, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64)
    t = torch.tensor([1, V + 2, 2, -100])
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        kw = dict(z_loss=0.1, return_stats=True, reduction=reduction, process_group=dist.group.WORLD)
        if which == "linear_cross_entropy":
            out = fusedce.linear_cross_entropy(x, w, t, **kw)
        else:
            out = fusedce.cross_entropy(x @ w.T, t, **kw)
    finally:
        if owned:
            dist.destroy_process_group()
    assert out.loss.isnan().any()
    assert out.accuracy.isnan()
    if reduction == "none":
        ok = reference.cross_entropy(x @ w.T, t.clamp(max=V - 1), z_loss=0.1, reduction="none").z_loss
        assert out.z_loss[1].isnan()
        torch.testing.assert_close(out.z_loss[[0, 2, 3]], ok[[0, 2, 3]])
    else:
        assert out.z_loss.isnan()
