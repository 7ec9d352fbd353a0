"""The definition of "correct": every term on materialized logits, in float64 by default.

Tests and benchmarks compare fusedce against these functions. They are written from the
definitions, not from the kernels, and favour clarity over speed and memory.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ReferenceOutput(NamedTuple):
    loss: torch.Tensor  # reduced (or per-token for reduction="none")
    token_loss: torch.Tensor  # [...], 0 at ignored positions
    lse: torch.Tensor  # [...]
    predicted: torch.Tensor  # [...], int64, -1 at ignored positions
    accuracy: torch.Tensor  # scalar
    z_loss: torch.Tensor  # the z-loss part of `loss` (same reduction)


def final_logits(logits: torch.Tensor, logit_scale: float = 1.0, softcap: float | None = None):
    """logit_scale first, then softcap (Cohere / Granite / Gemma2-3 order)."""
    z = logits * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def shift_labels(target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """HF causal shift: position t predicts target t+1; the last position is ignored."""
    pad = torch.full_like(target[..., :1], ignore_index)
    return torch.cat([target[..., 1:], pad], dim=-1)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    num_items_in_batch=None,
    shift: bool = False,
    dtype: torch.dtype | None = torch.float64,
) -> ReferenceOutput:
    """Reference of every term on logits [..., V] (computed in `dtype`; None keeps the input's).

    Per non-ignored token i with target t and class weights w (1 when not given):
        token_loss = w[t] * ((1 - eps) * (lse - z[t]) + z_loss * lse**2)
                     + eps / V * sum_c w[c] * (lse - z[c])
    which is torch.nn.functional.cross_entropy's definition plus the z-loss, weighted by the
    token's class weight like the CE itself. "mean" divides the sum by sum_i w[t_i] over
    non-ignored tokens (the count without class weights), or by num_items_in_batch when given.
    """
    if shift:
        target = shift_labels(target, ignore_index)
    if dtype is not None:
        logits = logits.to(dtype)
    V = logits.shape[-1]
    z = final_logits(logits, logit_scale, softcap).reshape(-1, V)
    t = target.reshape(-1)
    valid = t != ignore_index
    t_safe = torch.where(valid, t, torch.zeros_like(t))
    w = torch.ones(V, dtype=z.dtype, device=z.device) if weight is None else weight.to(z)

    lse = torch.logsumexp(z, dim=-1)
    logp = z - lse[:, None]
    nll = -logp.gather(1, t_safe[:, None])[:, 0]
    wt = w[t_safe] * valid.to(z.dtype)
    ce_tok = wt * (1 - label_smoothing) * nll
    if label_smoothing > 0:  # (not 0 * sum: a masked -inf logit would make that 0 * inf = nan)
        smooth = -(logp * w).sum(-1)  # sum_c w[c] * (lse - z[c])
        ce_tok = ce_tok + valid.to(z.dtype) * (label_smoothing / V) * smooth
    z_tok = wt * z_loss * lse**2
    token_loss = ce_tok + z_tok

    predicted = torch.where(valid, z.argmax(-1), torch.full_like(t, -1))
    n_valid = valid.sum()
    accuracy = ((predicted == t) & valid).sum().to(z.dtype) / n_valid.to(z.dtype)

    shape = target.shape
    if reduction == "none":
        loss, zl = token_loss, z_tok
    elif reduction == "sum" or num_items_in_batch is not None:
        denom = 1.0 if num_items_in_batch is None else num_items_in_batch
        loss, zl = token_loss.sum() / denom, z_tok.sum() / denom
    elif reduction == "mean":
        # As torch: an all-ignored (or empty) batch gives a nan loss and zero gradients.
        denom = wt.sum()
        safe = torch.where(denom > 0, denom, torch.ones_like(denom))
        nan = torch.where(denom > 0, torch.zeros_like(denom), torch.full_like(denom, float("nan")))
        loss, zl = token_loss.sum() / safe + nan, z_tok.sum() / safe + nan
    else:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if reduction == "none":
        loss, zl = loss.reshape(shape), zl.reshape(shape)
    return ReferenceOutput(
        loss, token_loss.reshape(shape), lse.reshape(shape), predicted.reshape(shape), accuracy, zl
    )


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    dtype: torch.dtype | None = torch.float64,
    **kwargs,
) -> ReferenceOutput:
    """Materializes logits = input @ linear_weight.T + linear_bias, then `cross_entropy`."""
    if dtype is not None:
        input, linear_weight = input.to(dtype), linear_weight.to(dtype)
        linear_bias = None if linear_bias is None else linear_bias.to(dtype)
    logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
    return cross_entropy(logits, target, dtype=dtype, **kwargs)
