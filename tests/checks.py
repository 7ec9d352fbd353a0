"""Run fusedce and the float64 reference on the same inputs and compare values and gradients.

Shared by the per-function tests, the module tests and the property test, so that "correct" is
checked the same way everywhere.
"""

from __future__ import annotations

import math

import torch

import fusedce
from accuracy import assert_close, eager_cross_entropy, eager_linear_cross_entropy, loss_dtype
from fusedce import reference
from samples import semantic_kwargs


def random_upstream(loss: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random upstream gradient: N(0, 1) per token for reduction='none', else a scalar in
    [0.5, 1.5) so that 'backward scales the precomputed gradients' is actually exercised."""
    if loss.dim() == 0:
        g = torch.rand((), generator=generator, dtype=torch.float64) + 0.5
    else:
        g = torch.randn(loss.shape, generator=generator, dtype=torch.float64)
    return g.to(dtype=loss.dtype, device=loss.device)


def _leaves(named: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in named.items() if isinstance(v, torch.Tensor) and v.requires_grad}


def _grads(loss, leaves: dict, upstream) -> dict:
    if not leaves:
        return {}
    gs = torch.autograd.grad(loss, list(leaves.values()), upstream, allow_unused=True)
    return {k: (torch.zeros_like(v) if g is None else g) for (k, v), g in zip(leaves.items(), gs)}


def _truth_grads(loss, leaves, upstream):
    """Reference gradients; a NaN scalar loss (mean over no token) has zero gradients, as in
    torch.nn.functional.cross_entropy (the reference's 0/0 would give NaN)."""
    if loss.dim() == 0 and math.isnan(float(loss.detach())):
        return {k: torch.zeros_like(v) for k, v in leaves.items()}
    return _grads(loss, leaves, upstream.double())


def _float64_copies(named):
    return {k: (v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor)
                and v.is_floating_point() else v) for k, v in named.items()}


def check_linear_cross_entropy(args, kwargs, dtype, *, upstream=None, generator=None, what=""):
    """fusedce.linear_cross_entropy(*args, **kwargs) vs the float64 reference: the loss (dtype and
    value), and the gradients of every input that requires grad under a random upstream gradient.
    Returns the fused result (loss or LossOutput) for further checks."""
    x, w, t = args
    named = dict(input=x, linear_weight=w, linear_bias=kwargs.get("linear_bias"))
    out = fusedce.linear_cross_entropy(x, w, t, **kwargs)
    loss = out.loss if kwargs.get("return_stats") else out
    assert loss.dtype == loss_dtype(dtype), f"{what}: loss dtype {loss.dtype}"
    assert loss.device == x.device
    if upstream is None:
        upstream = random_upstream(loss, generator)
    got = _grads(loss, _leaves(named), upstream)

    ref_named = _float64_copies(named)
    ref_kwargs = {k: v for k, v in semantic_kwargs(kwargs).items() if k != "linear_bias"}
    ref_kwargs = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in ref_kwargs.items()}
    ref = reference.linear_cross_entropy(ref_named["input"], ref_named["linear_weight"], t,
                                         linear_bias=ref_named["linear_bias"], **ref_kwargs)
    truth = _truth_grads(ref.loss, _leaves(ref_named), upstream)

    eager, eager_grads = None, {}
    if dtype not in (torch.float32, torch.float64):
        e_named = {k: (v.detach().clone().requires_grad_(v.requires_grad)
                       if isinstance(v, torch.Tensor) else v) for k, v in named.items()}
        e_kwargs = {k: v for k, v in ref_kwargs.items()}
        if "weight" in kwargs and kwargs["weight"] is not None:
            e_kwargs["weight"] = kwargs["weight"]
        eager = eager_linear_cross_entropy(e_named["input"], e_named["linear_weight"], t,
                                           linear_bias=e_named["linear_bias"], **e_kwargs)
        eager_grads = _grads(eager, _leaves(e_named), upstream.to(eager.dtype))

    assert_close(loss, ref.loss, dtype, eager=eager, what=f"{what} loss")
    for name, g in truth.items():
        assert_close(got[name], g, dtype, eager=eager_grads.get(name), what=f"{what} grad {name}")
    return out, ref


def check_cross_entropy(args, kwargs, dtype, *, upstream=None, generator=None, what=""):
    """fusedce.cross_entropy(*args, **kwargs) vs the float64 reference, values and the gradient
    of the logits. Returns (fused result, reference output, gradient of the logits)."""
    logits, t = args
    out = fusedce.cross_entropy(logits, t, **kwargs)
    loss = out.loss if kwargs.get("return_stats") else out
    assert loss.dtype == loss_dtype(dtype), f"{what}: loss dtype {loss.dtype}"
    if upstream is None:
        upstream = random_upstream(loss, generator)
    # Read before backward: inplace_backward overwrites the logits.
    ref_logits = logits.detach().double().clone().requires_grad_(logits.requires_grad)
    eager_logits = logits.detach().clone().requires_grad_(logits.requires_grad)
    got = _grads(loss, _leaves(dict(input=logits)), upstream)

    ref_kwargs = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in semantic_kwargs(kwargs).items() if k != "inplace_backward"}
    ref = reference.cross_entropy(ref_logits, t, **ref_kwargs)
    truth = _truth_grads(ref.loss, _leaves(dict(input=ref_logits)), upstream)

    eager, eager_grads = None, {}
    if dtype not in (torch.float32, torch.float64):
        e_kwargs = dict(ref_kwargs)
        if kwargs.get("weight") is not None:
            e_kwargs["weight"] = kwargs["weight"]
        eager = eager_cross_entropy(eager_logits, t, **e_kwargs)
        eager_grads = _grads(eager, _leaves(dict(input=eager_logits)), upstream.to(eager.dtype))

    assert_close(loss, ref.loss, dtype, eager=eager, what=f"{what} loss")
    if "input" in truth:
        assert_close(got["input"], truth["input"], dtype, eager=eager_grads.get("input"),
                     what=f"{what} grad input")
    return out, ref, got.get("input")


def check_stats(out, ref, dtype, what=""):
    """The LossOutput fields against the reference's."""
    assert isinstance(out, fusedce.LossOutput), type(out)
    assert out.lse.shape == ref.lse.shape and out.predicted.shape == ref.predicted.shape
    assert out.predicted.dtype == torch.int64, out.predicted.dtype
    assert dtype in (torch.float32, torch.float64), "statistics are checked in float32/float64"
    tol_dtype = dtype
    assert_close(out.lse, ref.lse, tol_dtype, what=f"{what} lse")
    assert torch.equal(out.predicted.cpu(), ref.predicted.cpu()), f"{what} predicted\n{out.predicted}\n{ref.predicted}"
    assert out.accuracy.dim() == 0
    assert_close(out.accuracy, ref.accuracy, tol_dtype, what=f"{what} accuracy")
    assert_close(out.z_loss, ref.z_loss, tol_dtype, what=f"{what} z_loss")


def opcheck(op, args, kwargs):
    """torch.library.opcheck, with its AOTAutograd comparison NaN-aware.

    opcheck compares eager and AOT-traced outputs with torch.testing.assert_close, whose default
    counts NaN != NaN; the mean over no token (`loss` with mean=True and nothing to average) is NaN
    by contract, as in F.cross_entropy. For such a sample the same AOT check (the function opcheck
    runs, with its gradients) compares with equal_nan=True, and every other opcheck test runs
    as usual; a sample without a NaN output takes plain opcheck.
    """
    import functools

    from torch.testing._internal.optests import aot_autograd_check

    out = op(*pytree_clone(args), **pytree_clone(kwargs))
    outs = out if isinstance(out, (tuple, list)) else (out,)
    has_nan = any(isinstance(o, torch.Tensor) and o.is_floating_point() and bool(torch.isnan(o).any())
                  for o in outs)
    if not has_nan:
        torch.library.opcheck(op, args, kwargs)
        return
    torch.library.opcheck(op, args, kwargs,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

    def func(*a, **k):
        a, k = pytree_clone((a, k))
        return op(*a, **k)

    aot_autograd_check(func, args, kwargs, dynamic=True, check_gradients="auto",
                       assert_equals_fn=functools.partial(torch.testing.assert_close, equal_nan=True))


def pytree_clone(tree):
    """Every tensor of `tree` cloned (an op may write into its inputs)."""
    from torch.utils import _pytree as pytree

    return pytree.tree_map_only(torch.Tensor, torch.clone, tree)
