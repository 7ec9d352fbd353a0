"""What the single-process functions (functional.py, terms.py) and the vocab-parallel layer
(_parallel.py) both use: the LossOutput type, the causal label shift, the routing rule (is this a
vocab-parallel call?) and the policy-loss metrics. It sits below both (it imports only _checks), so
neither path imports the other for them."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import _fits


class LossOutput(NamedTuple):
    """What `return_stats=True` returns.

    loss: the loss as `reduction` asks. lse: per-token logsumexp of the final logits, shaped like
    the target. predicted: per-token argmax of the final logits, -1 at ignored positions.
    accuracy: fraction of non-ignored tokens whose argmax equals the target (nan when none).
    z_loss: the z-loss part of `loss`, reduced the same way.
    entropy: per-token entropy of softmax(final logits), shaped like the target (differentiable);
    None unless asked for (``return_entropy=True``), since it takes the general row kernel.
    `loss` and `lse` are differentiable for every reduction (a gradient through lse is exact,
    computed by a recomputing pass only when one flows).
    """

    loss: torch.Tensor
    lse: torch.Tensor
    predicted: torch.Tensor
    accuracy: torch.Tensor
    z_loss: torch.Tensor
    entropy: torch.Tensor | None = None


def _shift(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """HF causal shift on the labels: position t predicts t+1, the last position is ignored."""
    if target.dim() == 0 or target.shape[-1] == 0:
        return target
    if not _fits(target.dtype, ignore_index):
        target = target.long()  # an int32 target padded with an ignore_index it cannot hold
    pad = torch.full_like(target[..., :1], ignore_index)
    return torch.cat([target[..., 1:], pad], dim=-1)


def _sharded(process_group, **tensors) -> bool:
    """Vocab-parallel call: only when the caller gives a process group. A DTensor without one is
    refused rather than guessed at: FSDP2 shards a weight on dim 0 for data parallelism (each rank
    holds different tokens), which looks like a vocabulary shard but is not one."""
    if process_group is not None:
        return True
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    for name, t in tensors.items():
        if isinstance(t, DTensor):
            raise ValueError(
                f"fusedce: {name} is a DTensor (placements {tuple(t.placements)}) and process_group "
                "is None. fusedce takes a DTensor as a vocabulary shard (tensor parallelism) only when "
                "process_group= names that group. A weight sharded for data parallelism (FSDP2's "
                "fully_shard) must be gathered by its wrapper: compute the loss through the head "
                "module with fusedce.integrations.head_loss(head, input, target, ...) (the "
                f"transformers integration does so), or pass {name}.full_tensor() yourself (its "
                "gradient then follows DTensor's rules: each rank keeps its slice of its own "
                "gradient, with no data-parallel reduction).")
    return False


def _policy_metrics(lp, ent, old, adv, ref, m, advantages, beta, eps_low, eps_high):
    lead = lp.shape
    ratio = torch.ones_like(lp) if old is None else torch.exp(lp - old.reshape(lead).to(lp))
    a = adv.reshape(lead).to(lp)
    count = m.sum().clamp(min=1)

    def mean(x):
        return (x * m).sum() / count

    valid = m != 0
    big = torch.finfo(lp.dtype).max
    low = (ratio < 1 - eps_low) & (a < 0)
    high = (ratio > 1 + eps_high) & (a > 0)
    # The six masked means in one reduction (a handful of small ops per call instead of ~20).
    means = ((torch.stack([low.to(lp), high.to(lp), (low | high).to(lp), ratio, ent, lp])
              * m).flatten(1).sum(1) / count).unbind()
    metrics = {
        "clip_ratio/low_mean": means[0],
        "clip_ratio/high_mean": means[1],
        "clip_ratio/region_mean": means[2],
        "ratio/mean": means[3],
        "ratio/min": torch.where(valid, ratio, big).min(),
        "ratio/max": torch.where(valid, ratio, -big).max(),
        "entropy": means[4],
        "logprob/mean": means[5],
        "advantages/mean": advantages.to(lp).mean(),
        "advantages/std": advantages.to(lp).std() if advantages.numel() > 1 else torch.zeros((), dtype=lp.dtype, device=lp.device),
    }
    if beta != 0.0:
        d = ref.reshape(lead).to(lp) - lp
        metrics["kl"] = mean(torch.exp(d) - d - 1)
    return metrics
