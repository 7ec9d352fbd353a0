"""fusedce.linear_cross_entropy against the float64 reference: values and gradients of every
option, their combinations, odd sizes, chunking, statistics and the autograd contract."""

import math

import pytest
import torch

import fusedce
from checks import check_linear_cross_entropy, check_stats
from fusedce import reference
from samples import CASE_NAMES, sample, semantic_kwargs

FLOAT_DTYPES = [
    torch.float64,  # exactness: any float32 shortcut inside a float64 path shows up here
    torch.float32,  # the common full-precision training dtype, with its own tight tolerance
]


# --------------------------------------------------------------------------------------------
# Every shared sample case (tests/samples.py says why each one is there).
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_case_values_and_grads(device, dtype, case):
    args, kwargs = sample(device, dtype, case, requires_grad=True)
    check_linear_cross_entropy(args, kwargs, dtype, what=case)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_case_return_stats(device, case):
    args, kwargs = sample(device, torch.float64, case, requires_grad=True)
    out, ref = check_linear_cross_entropy(args, {**kwargs, "return_stats": True}, torch.float64,
                                          what=case)
    check_stats(out, ref, torch.float64, what=case)


# --------------------------------------------------------------------------------------------
# Odd sizes.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "N,H,V",
    [
        (3, 8, 50257),  # GPT-2 vocabulary: odd, not a multiple of any tile or vector width
        (1, 1, 7),  # one token, hidden size 1, tiny odd vocabulary
        (5, 3, 1),  # one class: lse = z[0], the loss is exactly 0 (and so are the CE gradients)
        (17, 5, 2),  # two classes, more tokens than a small chunk
        (0, 4, 9),  # no token at all
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])  # all three reduction paths
def test_odd_sizes(device, N, H, V, reduction):
    x = torch.randn(N, H, dtype=torch.float64, device=device, requires_grad=True)
    w = (torch.randn(V, H, dtype=torch.float64, device=device) * H**-0.5).requires_grad_()
    b = torch.randn(V, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, V, (N,), device=device)
    check_linear_cross_entropy((x, w, t), dict(linear_bias=b, reduction=reduction),
                               torch.float64, what=f"N={N} H={H} V={V}")


def test_large_vocab_float32_with_options(device):
    """V = 50257 in float32 with every term on: the online sums over a long row stay accurate."""
    N, H, V = 4, 16, 50257
    x = torch.randn(N, H, device=device, requires_grad=True)
    w = (torch.randn(V, H, device=device) * H**-0.5).requires_grad_()
    t = torch.tensor([0, V - 1, -100, 12345], device=device)  # first, last, ignored, middle
    kwargs = dict(label_smoothing=0.1, z_loss=1e-3, softcap=30.0, logit_scale=2.0,
                  weight=torch.rand(V, device=device) + 0.5, reduction="sum")
    out, ref = check_linear_cross_entropy((x, w, t), {**kwargs, "return_stats": True},
                                          torch.float32, what="V=50257")
    check_stats(out, ref, torch.float32, what="V=50257")


# --------------------------------------------------------------------------------------------
# Chunking: any chunk / tile size gives the same result.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunk_size",
    [
        1,  # every token its own chunk
        3,  # several chunks and a partial last one (10 tokens)
        None,  # the default, chosen from the memory budget (one chunk here)
    ],
)
@pytest.mark.parametrize(
    "vocab_chunk_size",
    [
        None,  # whole rows
        1,  # one class per tile: the degenerate online merge
        7,  # several tiles over V = 23 and a partial last one
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])  # forward-computed vs recomputed grads
def test_chunk_and_tile_sizes(device, chunk_size, vocab_chunk_size, reduction):
    N, H, V = 10, 6, 23
    x = torch.randn(N, H, dtype=torch.float64, device=device, requires_grad=True)
    w = (torch.randn(V, H, dtype=torch.float64, device=device) * H**-0.5).requires_grad_()
    b = torch.randn(V, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, V, (N,), device=device)
    t[2] = -100
    kwargs = dict(linear_bias=b, reduction=reduction, chunk_size=chunk_size,
                  vocab_chunk_size=vocab_chunk_size, label_smoothing=0.1, z_loss=1e-2,
                  softcap=2.0, weight=torch.rand(V, dtype=torch.float64, device=device) + 0.5,
                  return_stats=True)
    out, ref = check_linear_cross_entropy((x, w, t), kwargs, torch.float64,
                                          what=f"chunk={chunk_size} tile={vocab_chunk_size}")
    check_stats(out, ref, torch.float64)


@pytest.mark.parametrize("reduction", ["mean", "none"])  # forward-computed vs recomputed grads
def test_low_memory_mode(device, reduction):
    """low_memory=True (vocabulary tiles, logits recomputed per tile for the gradient) with a
    vocabulary spanning several default tiles and a partial last one."""
    N, H, V = 9, 5, 2 * fusedce.functional.LOW_MEMORY_VOCAB_TILE + 77
    x = torch.randn(N, H, dtype=torch.float64, device=device, requires_grad=True)
    w = (torch.randn(V, H, dtype=torch.float64, device=device) * H**-0.5).requires_grad_()
    t = torch.randint(0, V, (N,), device=device)
    t[0] = -100
    out, ref = check_linear_cross_entropy(
        (x, w, t), dict(low_memory=True, reduction=reduction, z_loss=1e-3, return_stats=True),
        torch.float64, what="low_memory")
    check_stats(out, ref, torch.float64)


@pytest.mark.parametrize("fp32_grad_accum", [False, True])  # both accumulation modes
def test_fp32_grad_accum_float32(device, fp32_grad_accum):
    N, H, V = 40, 8, 37
    x = torch.randn(N, H, device=device, requires_grad=True)
    w = (torch.randn(V, H, device=device) * H**-0.5).requires_grad_()
    t = torch.randint(0, V, (N,), device=device)
    check_linear_cross_entropy(
        (x, w, t), dict(chunk_size=4, fp32_grad_accum=fp32_grad_accum, reduction="sum"),
        torch.float32, what=f"fp32_grad_accum={fp32_grad_accum}")


# --------------------------------------------------------------------------------------------
# Half precision: an error budget against the same-dtype eager PyTorch path.
# --------------------------------------------------------------------------------------------

HALF_OPTIONS = {
    "mean": dict(),  # the plain training call
    "sum": dict(reduction="sum"),  # no 1/n: larger gradients, larger absolute errors
    "none": dict(reduction="none"),  # the recomputing backward in half precision
    "weight_smoothing_ignore": dict(label_smoothing=0.1, weight="w"),  # torch's trickiest CE terms
    "chunked_fp32_accum": dict(chunk_size=4, fp32_grad_accum=True),  # many chunks, fp32 sums
}


@pytest.mark.parametrize("options", list(HALF_OPTIONS), ids=list(HALF_OPTIONS))
@pytest.mark.parametrize(
    "dtype",
    [
        torch.bfloat16,  # the LLM training dtype
        torch.float16,  # the other half type (narrow range: the loss must not overflow)
    ],
    ids=str,
)
def test_half_precision_error_budget(device, dtype, options):
    N, H, V = 48, 32, 1000
    kwargs = dict(HALF_OPTIONS[options])
    x = torch.randn(N, H, device=device).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=device) * H**-0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device=device)
    t[::7] = -100
    if kwargs.get("weight") == "w":
        kwargs["weight"] = (torch.rand(V, device=device) + 0.5).to(dtype)
    check_linear_cross_entropy((x, w, t), kwargs, dtype, what=f"{dtype} {options}")


# --------------------------------------------------------------------------------------------
# Autograd contract.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])  # the two forward-computed-gradient paths
def test_second_backward_raises(device, reduction):
    x = torch.randn(4, 3, device=device, requires_grad=True)
    w = torch.randn(5, 3, device=device, requires_grad=True)
    t = torch.randint(0, 5, (4,), device=device)
    loss = fusedce.linear_cross_entropy(x, w, t, reduction=reduction)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward"):
        loss.backward()


@pytest.mark.parametrize("reduction", ["mean", "sum"])  # the two forward-computed-gradient paths
def test_allow_second_backward(device, reduction):
    """Inside fusedce.allow_second_backward() the graph can be backpropagated through again, and
    every backward gives the same (exact) gradients."""
    x = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, 5, (4,), device=device)
    loss = fusedce.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction)
    with fusedce.allow_second_backward():
        first = torch.autograd.grad(loss * 2.0, (x, w, b), retain_graph=True)
        second = torch.autograd.grad(loss * 3.0, (x, w, b), retain_graph=True)
    for a, c in zip(first, second):
        torch.testing.assert_close(c, 1.5 * a, rtol=1e-12, atol=0)
    ref = reference.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction).loss
    for a, r in zip(first, torch.autograd.grad(ref * 2.0, (x, w, b))):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)


def test_reduction_none_backward_twice_accumulates(device):
    """reduction='none' recomputes in backward: a retained graph can be used again, exactly."""
    x = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, 5, (4,), device=device)
    loss = fusedce.linear_cross_entropy(x, w, t, reduction="none")
    g = torch.randn(4, dtype=torch.float64, device=device)
    loss.backward(g, retain_graph=True)
    first = (x.grad.clone(), w.grad.clone())
    loss.backward(g)
    torch.testing.assert_close(x.grad, 2 * first[0])
    torch.testing.assert_close(w.grad, 2 * first[1])


@pytest.mark.parametrize(
    "reduction",
    [
        "none",  # per-token path: everything recomputed in backward
        "mean",  # gradients of the scalar precomputed in forward, lse's part recomputed on top
        "sum",  # same, without the 1/denominator scale
    ],
)
def test_gradient_through_lse_and_loss(device, reduction):
    """A loss built from the reduced loss and the per-token lse (e.g. an explicit z-loss term or
    a logging-only regularizer) gets exact gradients for every reduction: lse is never a
    silently non-differentiable statistic."""
    N, H, V = 6, 4, 9
    x = torch.randn(N, H, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, V, (N,), device=device)
    t[1] = -100
    kw = dict(reduction=reduction, label_smoothing=0.1, softcap=3.0, z_loss=1e-2)
    out = fusedce.linear_cross_entropy(x, w, t, linear_bias=b, return_stats=True, **kw)
    g_lse = torch.randn(N, dtype=torch.float64, device=device)
    total = out.loss.sum() + (out.lse * g_lse).sum()
    got = torch.autograd.grad(total, (x, w, b))

    xr, wr, br = (v.detach().clone().requires_grad_() for v in (x, w, b))
    ref = reference.linear_cross_entropy(xr, wr, t, linear_bias=br, **kw)
    want = torch.autograd.grad(ref.loss.sum() + (ref.lse * g_lse).sum(), (xr, wr, br))
    for name, a, e in zip(("input", "linear_weight", "linear_bias"), got, want):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")


def test_scalar_backward_does_not_recompute(device):
    """The training case (mean loss, backward of the scalar alone) must only scale the gradients
    computed in the forward: no loss_backward (a second pass of GEMMs) in eager or compiled."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    w = torch.randn(11, 5, device=device, requires_grad=True)

    def step(x, t):
        return fusedce.linear_cross_entropy(x, w, t, z_loss=1e-3)

    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        loss = fn(torch.randn(8, 5, device=device, requires_grad=True),
                  torch.randint(0, 11, (8,), device=device))
        with CountOps() as ops:
            loss.backward()
        assert not any("loss_backward" in op for op in ops.seen), ops.seen


def test_gradient_through_lse_and_loss_reduction_none(device):
    """With reduction='none' the statistics come from the differentiable per-token path: a loss
    built from both the token losses and lse (e.g. an explicit z-loss) gets exact gradients."""
    N, H, V = 6, 4, 9
    x = torch.randn(N, H, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, V, (N,), device=device)
    t[1] = -100
    kw = dict(reduction="none", label_smoothing=0.1, softcap=3.0, z_loss=1e-2)
    out = fusedce.linear_cross_entropy(x, w, t, linear_bias=b, return_stats=True, **kw)
    g_loss, g_lse = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    total = (out.loss * g_loss.to(device)).sum() + (out.lse * g_lse.to(device)).sum()
    got = torch.autograd.grad(total, (x, w, b))

    xr, wr, br = (v.detach().clone().requires_grad_() for v in (x, w, b))
    ref = reference.linear_cross_entropy(xr, wr, t, linear_bias=br, **kw)
    ref_total = (ref.loss * g_loss.to(device)).sum() + (ref.lse * g_lse.to(device)).sum()
    want = torch.autograd.grad(ref_total, (xr, wr, br))
    for name, a, e in zip(("input", "linear_weight", "linear_bias"), got, want):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "needs",
    [
        ("linear_weight",),  # frozen trunk: only the head trains
        ("input",),  # frozen head (LoRA-style / tied embeddings trained elsewhere)
        ("input", "linear_bias"),  # bias without the weight
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])  # forward-computed and recomputed paths
def test_partial_requires_grad(device, needs, reduction):
    N, H, V = 7, 5, 11
    x = torch.randn(N, H, dtype=torch.float64, device=device)
    w = torch.randn(V, H, dtype=torch.float64, device=device) * H**-0.5
    b = torch.randn(V, dtype=torch.float64, device=device)
    for name, v in (("input", x), ("linear_weight", w), ("linear_bias", b)):
        v.requires_grad_(name in needs)
    t = torch.randint(0, V, (N,), device=device)
    check_linear_cross_entropy((x, w, t), dict(linear_bias=b, reduction=reduction, z_loss=1e-2),
                               torch.float64, what=f"needs={needs}")


def test_no_grad_mode(device):
    """Evaluation under torch.no_grad: the value only, no graph."""
    args, kwargs = sample(device, torch.float64, "everything", requires_grad=True)
    with torch.no_grad():
        loss = fusedce.linear_cross_entropy(*args, **kwargs)
    assert loss.grad_fn is None
    sem = {k: v for k, v in semantic_kwargs(kwargs).items() if k != "linear_bias"}
    ref = reference.linear_cross_entropy(args[0].detach(), args[1].detach(), args[2],
                                         linear_bias=kwargs["linear_bias"].detach(), **sem)
    torch.testing.assert_close(loss, ref.loss, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("reduction", ["mean", "none"])  # forward-computed and recomputed grads
def test_run_to_run_deterministic(device, reduction):
    """The same inputs give bitwise the same loss and gradients, with many chunks and threads
    (reproducible training)."""
    N, H, V = 700, 16, 5000
    x = torch.randn(N, H, device=device, requires_grad=True)
    w = torch.randn(V, H, device=device, requires_grad=True)
    t = torch.randint(0, V, (N,), device=device)
    runs = []
    for _ in range(3):
        loss = fusedce.linear_cross_entropy(x, w, t, reduction=reduction, chunk_size=64)
        runs.append((loss.detach(),) + torch.autograd.grad(loss, (x, w), torch.ones_like(loss)))
    for run in runs[1:]:
        for a, b, name in zip(run, runs[0], ("loss", "grad input", "grad linear_weight")):
            assert torch.equal(a, b), f"{name} differs between identical runs"


def test_shift_equals_shifted_labels(device):
    """shift=True is exactly the HF causal shift done by hand on the labels."""
    x = torch.randn(2, 5, 4, dtype=torch.float64, device=device)
    w = torch.randn(9, 4, dtype=torch.float64, device=device)
    t = torch.randint(0, 9, (2, 5), device=device)
    shifted = torch.cat([t[:, 1:], torch.full_like(t[:, :1], -100)], dim=1)
    for reduction in ("mean", "none"):
        a = fusedce.linear_cross_entropy(x, w, t, shift=True, reduction=reduction)
        b = fusedce.linear_cross_entropy(x, w, shifted, reduction=reduction)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The last position predicts nothing: its per-token loss is 0.
    assert (fusedce.linear_cross_entropy(x, w, t, shift=True, reduction="none")[:, -1] == 0).all()


def test_num_items_in_batch_is_sum_over_it(device):
    """HF gradient accumulation: sum / num_items_in_batch, whatever `reduction` says (not none)."""
    x = torch.randn(6, 4, dtype=torch.float64, device=device)
    w = torch.randn(9, 4, dtype=torch.float64, device=device)
    t = torch.randint(0, 9, (6,), device=device)
    t[0] = -100
    total = fusedce.linear_cross_entropy(x, w, t, reduction="sum")
    for n in (7, torch.tensor(7, device=device), torch.tensor(7.0, device=device)):
        for reduction in ("mean", "sum"):
            got = fusedce.linear_cross_entropy(x, w, t, reduction=reduction, num_items_in_batch=n)
            torch.testing.assert_close(got, total / 7, rtol=1e-12, atol=0)


def test_ignore_index_none_means_default(device):
    """torch.nn.functional.linear_cross_entropy spells the default ignore_index as None."""
    x = torch.randn(5, 4, dtype=torch.float64, device=device)
    w = torch.randn(6, 4, dtype=torch.float64, device=device)
    t = torch.tensor([1, -100, 2, 3, -100], device=device)
    torch.testing.assert_close(
        fusedce.linear_cross_entropy(x, w, t, ignore_index=None),
        reference.linear_cross_entropy(x, w, t).loss, rtol=1e-9, atol=1e-9)


@pytest.mark.skipif(not hasattr(torch.nn.functional, "linear_cross_entropy"),
                    reason="torch.nn.functional.linear_cross_entropy is new in torch 2.13")
def test_matches_torch_linear_cross_entropy(device):
    """Drop-in: the same positional call as torch.nn.functional.linear_cross_entropy."""
    x = torch.randn(9, 8, dtype=torch.float64, device=device)
    w = torch.randn(13, 8, dtype=torch.float64, device=device)
    b = torch.randn(13, dtype=torch.float64, device=device)
    cw = torch.rand(13, dtype=torch.float64, device=device) + 0.5
    t = torch.randint(0, 13, (9,), device=device)
    t[3] = -100
    for reduction in ("mean", "sum", "none"):
        kw = dict(linear_bias=b, weight=cw, reduction=reduction, label_smoothing=0.1)
        torch.testing.assert_close(
            fusedce.linear_cross_entropy(x, w, t, **kw),
            torch.nn.functional.linear_cross_entropy(x, w, t, ignore_index=-100, **kw),
            rtol=1e-9, atol=1e-9)


def test_loss_dtype_follows_input(device):
    for dtype, want in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                        (torch.bfloat16, torch.float32), (torch.float16, torch.float32)):
        x = torch.randn(3, 4, device=device).to(dtype)
        w = torch.randn(5, 4, device=device).to(dtype)
        t = torch.randint(0, 5, (3,), device=device)
        for reduction in ("mean", "none"):
            out = fusedce.linear_cross_entropy(x, w, t, reduction=reduction, return_stats=True)
            assert out.loss.dtype == want, (dtype, reduction, out.loss.dtype)
            assert out.predicted.dtype == torch.int64


def test_upstream_gradient_scales(device):
    """backward scales the forward-computed gradients by the upstream gradient exactly."""
    x = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, 6, (5,), device=device)
    g1 = torch.autograd.grad(fusedce.linear_cross_entropy(x, w, t), (x, w))
    g3 = torch.autograd.grad(3.0 * fusedce.linear_cross_entropy(x, w, t), (x, w))
    for a, b in zip(g1, g3):
        torch.testing.assert_close(b, 3.0 * a, rtol=1e-12, atol=0)


def test_random_upstream_reduction_none_every_case(device):
    """reduction='none' on every sample case with a random per-token upstream gradient."""
    for case in CASE_NAMES:
        args, kwargs = sample(device, torch.float64, case, requires_grad=True)
        kwargs = {**kwargs, "reduction": "none"}
        g = torch.Generator().manual_seed(len(case))
        loss_shape = reference.shift_labels(args[2]).shape
        up = torch.randn(loss_shape, generator=g, dtype=torch.float64).to(device)
        check_linear_cross_entropy(args, kwargs, torch.float64, upstream=up, what=case)


@pytest.mark.parametrize("reduction", ["mean", "none"])  # forward-computed vs recomputed grads
def test_minus_inf_bias_masks_classes(device, reduction):
    """A -inf bias masks classes (e.g. a padded vocabulary): exactly as if they were absent, the
    first class included (the running max is still -inf when it is read)."""
    N, H, V = 7, 5, 40
    x = torch.randn(N, H, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.zeros(V, dtype=torch.float64, device=device)
    b[:3] = -math.inf
    b[30:] = -math.inf
    b.requires_grad_()
    t = torch.randint(3, 30, (N,), device=device)
    out, ref = check_linear_cross_entropy(
        (x, w, t), dict(linear_bias=b, reduction=reduction, z_loss=1e-3, return_stats=True),
        torch.float64, what="-inf bias")
    check_stats(out, ref, torch.float64)
