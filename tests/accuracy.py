"""How close is close enough: tolerances against float64 truth, per dtype.

The truth is fusedce/reference.py run in float64 on the same (already rounded) inputs.

- float64 and float32: fixed tight tolerances, relative to the tensor's largest magnitude, plus 4
  ulps of the dtype at unit scale (for values whose exact value is 0). float32 allows 1e-5, a few
  times what eager float32 PyTorch itself is off by on our shapes (measured: at most ~4e-6 for
  grad_input at V=50257, ~1e-7 for the loss). float64 allows 1e-9: any float32 accumulation
  hidden in a float64 path (errors ~1e-7) fails it.
- bfloat16 / float16: an error budget. The fused result may be off the truth by at most
  BUDGET_MARGIN times what the same-dtype eager PyTorch path (F.linear + F.cross_entropy in that
  dtype) is off by, plus one unit of rounding of the dtype at the tensor's scale (so that an eager
  result that happens to be exact does not demand the impossible).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedce import reference

TIGHT = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
}
HALF_DTYPES = (torch.bfloat16, torch.float16)
BUDGET_MARGIN = 2.0


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the returned loss: float32 for half inputs, else the input's dtype."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def _scale(truth: torch.Tensor) -> float:
    finite = truth[torch.isfinite(truth)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def assert_close(actual, truth, dtype, *, eager=None, what="value"):
    """`actual` (computed from `dtype` inputs) against the float64 `truth`.

    For half dtypes `eager` (the same quantity from the same-dtype eager PyTorch path) sets the
    budget. NaNs must be at the same places (the all-ignored mean is NaN, as in torch).
    """
    assert actual is not None, f"{what}: no result (gradient missing?)"
    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    a, t = actual.detach().double().cpu(), truth.detach().double().cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(t)), f"{what}: NaN pattern differs\n{a}\n{t}"
    scale = _scale(t)
    if dtype in TIGHT:
        tol = TIGHT[dtype]
        # Plus a few units of rounding at unit scale: a quantity whose exact value is 0 (say the
        # gradient of a one-class softmax) comes out as +-1e-16, not as 0.
        atol = tol * scale + 4 * torch.finfo(dtype).eps
        torch.testing.assert_close(
            a, t, rtol=tol, atol=atol, equal_nan=True, msg=lambda m: f"{what} ({dtype}): {m}"
        )
        return
    assert eager is not None, "half dtypes are judged against the eager path: pass eager="
    mask = ~torch.isnan(t)
    err = float((a - t)[mask].abs().max()) if mask.any() else 0.0
    e = eager.detach().double().cpu()
    err_eager = float((e - t)[mask].abs().max()) if mask.any() else 0.0
    allowed = BUDGET_MARGIN * err_eager + torch.finfo(dtype).eps * scale
    assert err <= allowed, (
        f"{what} ({dtype}): max error {err:.3g} vs float64 truth exceeds the budget {allowed:.3g} "
        f"(eager {dtype} error {err_eager:.3g}, scale {scale:.3g})"
    )


_EAGER_CE_KWARGS = {"weight", "reduction", "ignore_index", "label_smoothing"}


def eager_linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, **kwargs):
    """The same-dtype eager PyTorch path: F.linear, then F.cross_entropy in the input's dtype.

    Options F.cross_entropy does not have (z_loss, softcap, ...) go through the reference run in
    the input's dtype instead of float64 (the same eager ops a user would write).
    """
    logits = F.linear(input, linear_weight, linear_bias)
    return eager_cross_entropy(logits, target, **kwargs)


def eager_cross_entropy(logits, target, **kwargs):
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if set(kwargs) <= _EAGER_CE_KWARGS:
        V = logits.shape[-1]
        w = kwargs.pop("weight", None)
        w = None if w is None else w.to(logits.dtype)
        loss = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1).long(), weight=w, **kwargs)
        return loss.reshape(target.shape) if kwargs.get("reduction") == "none" else loss
    return reference.cross_entropy(logits, target, dtype=None, **kwargs).loss
