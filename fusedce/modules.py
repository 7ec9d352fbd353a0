"""nn.Module wrappers of the public functions."""

from __future__ import annotations

import torch

from . import functional as F


class _LossKnobs(torch.nn.Module):
    """The loss options shared by both modules; class weights are a buffer as in torch's losses.
    The chunking knobs (chunk_size, vocab_chunk_size, low_memory, memory_budget) are
    :func:`fusedce.linear_cross_entropy`'s."""

    def __init__(self, *, reduction="mean", weight=None, ignore_index=-100, label_smoothing=0.0,
                 z_loss=0.0, softcap=None, logit_scale=1.0, chunk_size=None,
                 vocab_chunk_size=None, fp32_grad_accum=False, low_memory=False, shift=False,
                 memory_budget=None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = -100 if ignore_index is None else ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.chunk_size = chunk_size
        self.vocab_chunk_size = vocab_chunk_size
        self.fp32_grad_accum = fp32_grad_accum
        self.low_memory = low_memory
        self.memory_budget = memory_budget
        self.shift = shift

    def _loss(self, hidden, lm_weight, target, lm_bias, num_items_in_batch, return_stats):
        return F.linear_cross_entropy(
            hidden, lm_weight, target, linear_bias=lm_bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            logit_scale=self.logit_scale, num_items_in_batch=num_items_in_batch,
            shift=self.shift, return_stats=return_stats, chunk_size=self.chunk_size,
            vocab_chunk_size=self.vocab_chunk_size, fp32_grad_accum=self.fp32_grad_accum,
            low_memory=self.low_memory, memory_budget=self.memory_budget,
        )

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, logit_scale={self.logit_scale}")


class LinearCrossEntropyLoss(_LossKnobs):
    """Owns its projection like torch.nn.LinearCrossEntropyLoss (parameter ``linear.weight``).

    forward(input [..., in_features], target [...]) -> loss.
    """

    def __init__(self, in_features: int, num_classes: int, *, bias: bool = False, device=None,
                 dtype=None, **knobs):
        super().__init__(**knobs)
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)

    def forward(self, input, target, *, num_items_in_batch=None, return_stats=False):
        return self._loss(input, self.linear.weight, target, self.linear.bias, num_items_in_batch,
                          return_stats)


class FusedLMHeadLoss(_LossKnobs):
    """For a model that already owns its head: forward(hidden, lm_head_weight, target, lm_head_bias)."""

    def forward(self, hidden, lm_head_weight, target, lm_head_bias=None, *,
                num_items_in_batch=None, return_stats=False):
        return self._loss(hidden, lm_head_weight, target, lm_head_bias, num_items_in_batch,
                          return_stats)
