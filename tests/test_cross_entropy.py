"""fusedce.cross_entropy (given logits) against the float64 reference: values and gradients of
every option, statistics, gradients through lse, and the in-place backward."""

import math

import pytest
import torch
import torch.nn.functional as F

import fusedce
from checks import check_cross_entropy, check_stats
from fusedce import reference
from samples import CASE_NAMES, sample

FLOAT_DTYPES = [
    torch.float64,  # exactness
    torch.float32,  # the common full-precision dtype, tight tolerance
]


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_case_values_and_grads(device, dtype, case):
    args, kwargs = sample(device, dtype, case, op="cross_entropy", requires_grad=True)
    check_cross_entropy(args, kwargs, dtype, what=case)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_case_return_stats(device, case):
    args, kwargs = sample(device, torch.float64, case, op="cross_entropy", requires_grad=True)
    out, ref, _ = check_cross_entropy(args, {**kwargs, "return_stats": True}, torch.float64,
                                      what=case)
    check_stats(out, ref, torch.float64, what=case)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_case_inplace_backward(device, case):
    """inplace_backward=True: the same gradient, and the logits now hold that gradient."""
    args, kwargs = sample(device, torch.float64, case, op="cross_entropy", requires_grad=True)
    logits = args[0]
    before = logits.detach().clone()
    _, _, grad = check_cross_entropy(args, {**kwargs, "inplace_backward": True}, torch.float64,
                                     what=case)
    torch.testing.assert_close(logits.detach(), grad, rtol=0, atol=0)
    if grad.numel() and grad.ne(0).any():
        assert not torch.equal(logits.detach(), before), "the logits storage was not overwritten"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])  # each reduction's upstream grad
def test_inplace_backward_inside_a_model(device, reduction):
    """The real use: logits from a projection, CE with inplace_backward, gradients flow on to
    the projection's input and weight exactly; the logits buffer ends up holding d(loss)/d(logits)."""
    N, H, V = 9, 6, 17
    h = torch.randn(N, H, dtype=torch.float64, device=device, requires_grad=True)
    W = torch.randn(V, H, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, V, (N,), device=device)
    t[4] = -100
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2, softcap=5.0)
    logits = h @ W.t()
    logits.retain_grad()
    loss = fusedce.cross_entropy(logits, t, inplace_backward=True, **kw)
    up = torch.randn(loss.shape, dtype=torch.float64, device=device)
    loss.backward(up)

    hr, Wr = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    lr = hr @ Wr.t()
    lr.retain_grad()
    ref = reference.cross_entropy(lr, t, **kw).loss
    ref.backward(up)
    torch.testing.assert_close(h.grad, hr.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(W.grad, Wr.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(logits.detach(), lr.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("lead", [(12,), (3, 4)], ids=["2d", "3d"])
def test_inplace_backward_leaf_gradient_is_the_logits_storage(device, lead):
    """inplace_backward's contract is no [N, V] allocation: for leaf logits (benchmarks/compare.py's
    use, a detached head) the .grad autograd stores is the logits' own storage, not a copy. A 2-D
    input passed to the op as the leaf itself (no view between) makes AccumulateGrad clone it."""
    V = 7
    logits = torch.randn(*lead, V, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, V, lead, device=device)
    lr = logits.detach().clone().requires_grad_()
    reference.cross_entropy(lr, t).loss.backward()
    fusedce.cross_entropy(logits, t, inplace_backward=True).backward()
    torch.testing.assert_close(logits.grad, lr.grad, rtol=1e-9, atol=1e-12)
    assert logits.grad.data_ptr() == logits.data_ptr(), "the gradient is a new [N, V] buffer"


@pytest.mark.parametrize("lead", [(6,), (2, 3)], ids=["2d", "3d"])
def test_inplace_backward_expanded_logits(device, lead):
    """Logits broadcast from one row (stride 0 over the tokens, e.g. a learned prior expanded to
    the batch) cannot hold a per-token gradient: with inplace_backward the backward must still
    return the exact gradient (out of place), not fail on the overlapping write."""
    V = 5
    row = torch.randn(*(1 for _ in lead), V, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, V, lead, device=device)
    t.view(-1)[1] = -100
    kw = dict(label_smoothing=0.1, z_loss=1e-2)
    rr = row.detach().clone().requires_grad_()
    reference.cross_entropy(rr.expand(*lead, V), t, **kw).loss.backward()
    fusedce.cross_entropy(row.expand(*lead, V), t, inplace_backward=True, **kw).backward()
    torch.testing.assert_close(row.grad, rr.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("view", ["unfold", "as_strided"])
def test_inplace_backward_partly_overlapping_logits(device, view):
    """Logits whose rows share some elements (sliding windows: unfold, as_strided with a row stride
    below the row length) are no stride-0 broadcast (torch cannot tell their overlap: TooHard),
    but an in-place gradient would still overwrite one token's gradient with another's: the
    backward must return the exact gradient, out of place."""
    N, V = 4, 5
    flat = torch.randn(2 * N + V, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, V, (N,), device=device)

    def windows(b):
        return b.unfold(0, V, 1)[:N] if view == "unfold" else b.as_strided((N, V), (2, 1))

    rr = flat.detach().clone().requires_grad_()
    reference.cross_entropy(windows(rr), t).loss.backward()
    fusedce.cross_entropy(windows(flat), t, inplace_backward=True).backward()
    torch.testing.assert_close(flat.grad, rr.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("view", ["column_slice", "transposed"])
def test_inplace_backward_strided_logits_stay_in_place(device, view):
    """Non-contiguous logits whose elements are distinct (a column slice, a transpose) keep the
    in-place gradient: it is written into the caller's storage and is exact."""
    N, V = 4, 5
    base = torch.randn(N, V + 2, dtype=torch.float64, device=device) if view == "column_slice" \
        else torch.randn(V, N, dtype=torch.float64, device=device)
    base.requires_grad_()
    t = torch.randint(0, V, (N,), device=device)

    def logits_of(b):
        return b[:, 1:V + 1] if view == "column_slice" else b.t()

    rr = base.detach().clone().requires_grad_()
    want = torch.autograd.grad(reference.cross_entropy(logits_of(rr), t).loss, rr)[0]
    lg = logits_of(base)
    (g,) = torch.autograd.grad(fusedce.cross_entropy(lg, t, inplace_backward=True), lg)
    assert g.data_ptr() == lg.data_ptr(), "the gradient is a new buffer"
    torch.testing.assert_close(g, logits_of(want), rtol=1e-9, atol=1e-12)


def test_inplace_backward_second_backward_raises(device):
    """After the in-place backward the logits are gone: using the graph again must fail loudly."""
    logits = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    x = logits * 1.0
    t = torch.randint(0, 5, (4,), device=device)
    loss = fusedce.cross_entropy(x, t, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


def test_backward_twice_without_inplace(device):
    """Without inplace_backward the backward recomputes from the saved logits: reusable."""
    logits = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, 5, (4,), device=device)
    loss = fusedce.cross_entropy(logits, t, label_smoothing=0.1)
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    loss.backward()
    torch.testing.assert_close(logits.grad, 2 * first)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])  # lse is per-token in all three
def test_gradient_through_lse(device, reduction):
    """lse of return_stats is differentiable: a loss mixing the CE and lse (an explicit z-loss, a
    distillation term) gets the exact gradient."""
    N, V = 7, 11
    logits = torch.randn(N, V, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, V, (N,), device=device)
    t[0] = -100
    kw = dict(reduction=reduction, label_smoothing=0.05, softcap=4.0, logit_scale=1.5)
    out = fusedce.cross_entropy(logits, t, return_stats=True, **kw)
    g_lse = torch.randn(N, dtype=torch.float64, device=device)
    up = torch.randn(out.loss.shape, dtype=torch.float64, device=device)
    (got,) = torch.autograd.grad((out.loss * up).sum() + (out.lse * g_lse).sum(), (logits,))

    lr = logits.detach().clone().requires_grad_()
    ref = reference.cross_entropy(lr, t, **kw)
    (want,) = torch.autograd.grad((ref.loss * up).sum() + (ref.lse * g_lse).sum(), (lr,))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "N,V",
    [
        (3, 50257),  # GPT-2 vocabulary: a long odd row
        (1, 7),  # one token
        (5, 1),  # one class: loss exactly 0
        (0, 9),  # no token
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])  # all reduction paths
def test_odd_sizes(device, N, V, reduction):
    logits = torch.randn(N, V, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, V, (N,), device=device)
    check_cross_entropy((logits, t), dict(reduction=reduction, z_loss=1e-3), torch.float64,
                        what=f"N={N} V={V}")


def test_noncontiguous_logits(device):
    """Strided logits: every other column of a bigger buffer, and a column-major buffer."""
    t = torch.randint(0, 13, (6,), device=device)
    wide = torch.randn(6, 26, dtype=torch.float64, device=device, requires_grad=True)
    col_major = torch.randn(13, 6, dtype=torch.float64, device=device, requires_grad=True)
    for logits in (wide[:, ::2], col_major.t()):
        assert not logits.is_contiguous()
        check_cross_entropy((logits, t), dict(label_smoothing=0.1, z_loss=1e-2), torch.float64,
                            what=f"strides {logits.stride()}")


def test_matches_torch_cross_entropy(device):
    """Drop-in: the same call as torch.nn.functional.cross_entropy, same values and gradients."""
    logits = torch.randn(2, 5, 13, dtype=torch.float64, device=device)
    t = torch.randint(0, 13, (2, 5), device=device)
    t[0, 1] = -100
    cw = torch.rand(13, dtype=torch.float64, device=device) + 0.5
    for reduction in ("mean", "sum", "none"):
        kw = dict(weight=cw, reduction=reduction, label_smoothing=0.1)
        a = logits.clone().requires_grad_()
        b = logits.clone().requires_grad_()
        got = fusedce.cross_entropy(a, t, **kw)
        want = F.cross_entropy(b.reshape(-1, 13), t.reshape(-1), **kw)
        want = want.reshape(2, 5) if reduction == "none" else want
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        up = torch.randn(got.shape, dtype=torch.float64, device=device)
        got.backward(up)
        want.backward(up)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


HALF_OPTIONS = {
    "mean": dict(),  # the plain call
    "sum": dict(reduction="sum"),  # larger gradients
    "none": dict(reduction="none"),  # per-token upstream gradient
    "weight_smoothing": dict(label_smoothing=0.1, weight="w"),  # torch's trickiest CE terms
}


@pytest.mark.parametrize("options", list(HALF_OPTIONS), ids=list(HALF_OPTIONS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)  # both half types
def test_half_precision_error_budget(device, dtype, options):
    N, V = 48, 1000
    kwargs = dict(HALF_OPTIONS[options])
    logits = (torch.randn(N, V, device=device) * 2).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device=device)
    t[::7] = -100
    if kwargs.get("weight") == "w":
        kwargs["weight"] = (torch.rand(V, device=device) + 0.5).to(dtype)
    check_cross_entropy((logits, t), kwargs, dtype, what=f"{dtype} {options}")


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float64,  # the exact path (its own exp code on CUDA)
        torch.float32,  # the fast path
    ],
    ids=str,
)
def test_masked_classes_minus_inf(device, dtype):
    """-inf logits (masked or padded classes) contribute exp(-inf) = 0, wherever they sit in the
    row: at its start (before any finite value was seen), in the middle, or filling whole vectors."""
    N, V = 6, 300
    logits = torch.randn(N, V, dtype=torch.float64)
    logits[:, :2] = -math.inf  # the first elements of every row: the running max is still -inf
    logits[1, :40] = -math.inf  # several whole 16-byte vectors
    logits[2, 100:] = -math.inf  # the whole tail
    logits[3, ::3] = -math.inf  # scattered
    target = torch.randint(50, 100, (N,))
    target[3] = 52  # a finite logit in the scattered row (52 % 3 != 0)
    x = logits.to(dtype).to(device).clone().requires_grad_()  # its own leaf (not `logits`)
    out = fusedce.cross_entropy(x, target.to(device), reduction="sum", z_loss=1e-3,
                                return_stats=True)
    out.loss.backward()
    xr = logits.clone().requires_grad_()
    ref = reference.cross_entropy(xr, target, reduction="sum", z_loss=1e-3)
    ref.loss.backward()
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.double().cpu(), ref.loss, **tol)
    torch.testing.assert_close(out.lse.double().cpu(), ref.lse, **tol)
    torch.testing.assert_close(x.grad.double().cpu(), xr.grad, **tol)


@pytest.mark.parametrize("inplace", [False, True])  # both backward ops read the op's 1/d
def test_mean_with_zero_total_weight(device, inplace):
    """Class weights that sum to 0 over the non-ignored targets: the mean is 0 / 0 = NaN, as in
    F.cross_entropy, and the gradients are zero, as for a mean over no token and as
    linear_cross_entropy gives (the op's 1/d is 0 when d == 0); a mean over some weight is finite."""
    V, H = 7, 5
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, H, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(V, H, generator=g, dtype=torch.float64).to(device)
    cw = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 2.0, 1.0], dtype=torch.float64, device=device)
    t = torch.tensor([1, 2, -100, 2], device=device)
    logits = (hidden @ w.t()).requires_grad_()
    z = logits * 1 if inplace else logits
    loss = fusedce.cross_entropy(z, t, weight=cw, inplace_backward=inplace)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.count_nonzero(logits.grad) == 0
    x, W = hidden.clone().requires_grad_(), w.clone().requires_grad_()
    lin = fusedce.linear_cross_entropy(x, W, t, weight=cw)
    lin.backward()
    assert torch.isnan(lin) and torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(W.grad) == 0
    t2 = torch.tensor([1, 5, -100, 2], device=device)  # one target of weight 2: d = 2
    logits2 = (hidden @ w.t()).requires_grad_()
    loss2 = fusedce.cross_entropy(logits2, t2, weight=cw)
    loss2.backward()
    z2 = logits2.detach().clone().requires_grad_()
    ref = F.cross_entropy(z2, t2, weight=cw)
    ref.backward()
    torch.testing.assert_close(loss2, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(logits2.grad, z2.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("which", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("batch", ["all_ignored", "zero_total_weight"])
def test_stats_z_loss_mean_over_no_weight_has_zero_gradients(device, which, batch):
    """return_stats with a mean over no weight (every target ignored, or class weights summing to
    0): loss and LossOutput.z_loss are NaN, as F.cross_entropy's mean, and the gradients through
    both are zero (the reference's convention, and what `loss` itself gives). z_loss's mean divided
    z_tok.sum() by d = 0, so its backward was 0 / 0 = NaN at every logit: a step backpropagating
    loss + lse + z_loss together got NaN gradients from an empty batch."""
    V, H = 7, 5
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(4, H, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(V, H, generator=g, dtype=torch.float64).to(device)
    if batch == "all_ignored":
        t, cw = torch.full((4,), -100, device=device), None
    else:
        t = torch.tensor([1, 2, -100, 2], device=device)
        cw = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 2.0, 1.0], dtype=torch.float64, device=device)
    up = torch.randn(4, generator=g, dtype=torch.float64).to(device)
    if which == "cross_entropy":
        leaf = (hidden @ w.t()).requires_grad_()
        out = fusedce.cross_entropy(leaf, t, weight=cw, z_loss=1e-2, return_stats=True)
    else:
        leaf = hidden.clone().requires_grad_()
        out = fusedce.linear_cross_entropy(leaf, w, t, weight=cw, z_loss=1e-2, return_stats=True)
    assert torch.isnan(out.loss) and torch.isnan(out.z_loss)
    (grad,) = torch.autograd.grad(out.loss + out.z_loss + (out.lse * up).sum(), leaf)
    # the truth: only the lse term has a gradient (d lse / d logits = softmax)
    z = (hidden @ w.t()).requires_grad_()
    (ref,) = torch.autograd.grad((torch.logsumexp(z, -1) * up).sum(), z)
    if which == "linear_cross_entropy":
        ref = ref @ w
    torch.testing.assert_close(grad, ref, rtol=1e-12, atol=1e-15)
