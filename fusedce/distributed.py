"""Vocab-parallel (tensor-parallel) head losses: fusedce's public functions with the LM head's weight
sharded over the vocabulary and the process group defaulting to the whole world.

    import fusedce.distributed as fd
    loss = fd.linear_cross_entropy(hidden, w_shard, labels, vocab_start=rank * V_local)

Each function is the public one of the same name (fusedce.linear_cross_entropy, ...) called with
``process_group=WORLD`` when none is given: the same argument checks, then the vocab-parallel
layer (fusedce/_parallel.py, which describes the communication). ``fusedce.<fn>(...,
process_group=group)`` is the same call.
"""

from __future__ import annotations

from . import functional, terms
from ._parallel import WORLD

__all__ = ["WORLD", "linear_cross_entropy", "cross_entropy", "token_logprobs", "token_statistics",
           "distillation_loss", "policy_loss"]


def linear_cross_entropy(input, linear_weight, target, *, process_group=None, **kwargs):
    """:func:`fusedce.linear_cross_entropy` with the head sharded over the vocabulary.

    ``linear_weight`` [V_local, H] (or a Shard(0) DTensor), ``linear_bias`` and ``weight`` (class
    weights) [V_local] are this rank's shard; ``input`` and ``target`` (global ids) are the same on
    every rank. The result (loss, or LossOutput) is the same on every rank. ``vocab_chunk_size`` and
    ``low_memory`` are accepted for signature compatibility; the sharded path tiles tokens only
    (``chunk_size`` rows at a time; ``memory_budget`` is refused here).
    ``process_group`` None: the default group (or a DTensor weight's mesh).
    """
    return functional.linear_cross_entropy(input, linear_weight, target, process_group=WORLD if process_group is None else process_group, **kwargs)


def cross_entropy(input, target, *, process_group=None, **kwargs):
    """:func:`fusedce.cross_entropy` on a logits shard ``input`` [..., V_local] (a Shard(-1) /
    last-dim split of the logits; a DTensor is not unwrapped here). Its gradient is local: the
    backward has no collective. ``inplace_backward`` is accepted and ignored."""
    return functional.cross_entropy(input, target, process_group=WORLD if process_group is None else process_group, **kwargs)


def token_logprobs(input, linear_weight, tokens, *, process_group=None, **kwargs):
    """:func:`fusedce.token_logprobs` with W sharded over the vocabulary. Both outputs are
    differentiable (a recomputing pass in backward: one collective per chunk, one for grad_input)."""
    return terms.token_logprobs(input, linear_weight, tokens, process_group=WORLD if process_group is None else process_group, **kwargs)


def token_statistics(input, linear_weight, tokens, *, process_group=None, **kwargs):
    """:func:`fusedce.token_statistics` with W sharded over the vocabulary: the metrics' partials
    travel in the same one collective per chunk as the log-probabilities'."""
    return terms.token_statistics(input, linear_weight, tokens, process_group=WORLD if process_group is None else process_group, **kwargs)


def distillation_loss(input, linear_weight, target, *, process_group=None, **kwargs):
    """:func:`fusedce.distillation_loss` with the student's head (and the teacher's: a weight shard
    [V_local, H_t] with ``teacher_input`` (default: ``input``), or a logits shard
    ``teacher_logits`` [..., V_local]) sharded over the vocabulary. kind="jsd" takes a second
    (small) collective per chunk; see fusedce/_parallel.py."""
    return terms.distillation_loss(input, linear_weight, target, process_group=WORLD if process_group is None else process_group, **kwargs)


def policy_loss(input, linear_weight, tokens, old_logprobs, advantages, *, process_group=None, **kwargs):
    """:func:`fusedce.policy_loss` (TRL GRPOTrainer's clipped objective) with the head sharded over
    the vocabulary; (loss, metrics) with the single-process function's metrics."""
    return terms.policy_loss(input, linear_weight, tokens, old_logprobs, advantages,
                             process_group=WORLD if process_group is None else process_group, **kwargs)
