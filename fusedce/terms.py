"""Public functions of the terms beyond the CE: token log-probabilities, distillation and the
GRPO-family policy loss. Each is one call of torch.ops.fusedce.loss with the matching flags, so
every term shares the row's single softmax pass with the others (and with CE, z-loss, softcap
and logit_scale when asked), and the gradient of the reduced loss is computed in that same pass.
fusedce/reference.py holds the float64 definitions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._op_args import TermOptions
from ._checks import (
    _check_vocab_start,
    _check_autodiff,
    _check_chunk,
    _check_device,
    _check_finite,
    _check_float,
    _check_head,
    _check_ignore_index,
    _check_label_smoothing,
    _check_nonnegative,
    _check_num_items,
    _check_positive,
    _check_reduction,
    _check_softcap,
    _check_target,
    _check_tensor,
    check_global_targets,
    host_target_check,
)
from . import _budget, _parallel
from ._shared import _as, _count_gradient, _count_needs_grad, _flat, _nograd, _policy_metrics, _policy_parts, _rows, _shaped, _sharded

_ops = torch.ops.fusedce
_DISTILL_KINDS = {"forward_kl": 1, "reverse_kl": 2, "jsd": 3}


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32



def _head_knobs(softcap, logit_scale, temperature=1.0):
    """The op's (softcap, logit_scale) for final logits softcap * tanh(logit_scale * a / softcap)
    divided by a temperature T: (softcap / T) * tanh((logit_scale / T) * a / (softcap / T)) is
    the same function, so T folds into both."""
    _check_softcap(softcap)
    _check_finite(logit_scale, "logit_scale")
    return dict(softcap=0.0 if softcap is None else float(softcap) / temperature,
                logit_scale=float(logit_scale) / temperature)


def _grad_mask(*tensors):
    track = torch.is_grad_enabled()
    return [track and t is not None and t.requires_grad for t in tensors]


def _per_token(x, name, shape, ref, ref_name):
    _check_tensor(x, name)
    _check_float(x, name)
    if x.shape != shape:
        raise ValueError(f"fusedce: {name} must have shape {tuple(shape)} (like {ref_name}), got {tuple(x.shape)}")
    _check_device(x, name, ref, ref_name)
    return x.reshape(-1)


# ---------------------------------------------------------------------------------------------
# Token log-probabilities
# ---------------------------------------------------------------------------------------------


def token_logprobs(input, linear_weight, tokens, *, linear_bias=None, temperature=1.0,
                   return_entropy=False, softcap=None, logit_scale=1.0, chunk_size=None,
                   memory_budget=None, process_group=None, vocab_start=None, reduce_grad_input=True):
    """log softmax(logits / temperature)[tokens] per token, logits = input @ linear_weight.T (+ bias),
    never materialized. input [..., H], tokens [...] -> logprobs [...] (float32 for half inputs),
    and the entropy of that softmax per token when ``return_entropy``. Positions whose token is
    -100 (HF's padding label) get log-probability 0. Exact gradients for any upstream gradient
    of either output (a recomputing backward pass). ``process_group``: vocab-parallel, as
    :func:`fusedce.linear_cross_entropy`. ``memory_budget`` (bytes, exclusive with chunk_size):
    as :func:`fusedce.linear_cross_entropy`'s, in whole vocabulary rows (at least one)."""
    _check_autodiff("token_logprobs", input, linear_weight, linear_bias)
    sharded = _sharded(process_group, linear_weight=linear_weight, linear_bias=linear_bias)
    _check_vocab_start(vocab_start, process_group)
    V, H = _check_head(input, linear_weight, linear_bias, vocab_shard=process_group is not None)
    _check_target(tokens, input.shape[:-1], input, "input", name="tokens")
    temperature = _check_positive(temperature, "temperature")
    _check_chunk(chunk_size, "chunk_size")
    chunk_size, _ = _budget.resolve(memory_budget, input, linear_weight, chunk_size=chunk_size,
                                    process_group=process_group, terms=True)
    knobs = _head_knobs(softcap, logit_scale, temperature)
    if sharded:
        return _parallel._token_logprobs(
            input, linear_weight, tokens, process_group=process_group, vocab_start=vocab_start,
            linear_bias=linear_bias, temperature=temperature, return_entropy=return_entropy,
            softcap=softcap, logit_scale=logit_scale, chunk_size=chunk_size,
            reduce_grad_input=reduce_grad_input)
    shape = tokens.shape
    if host_target_check(tokens.device):
        # The op's own check would name `target`; this one names the argument (free on the CPU,
        # on CUDA only where a host read is allowed: see _checks.host_target_check).
        flat = _flat(tokens)
        check_global_targets(flat, V, flat != -100, 0, "tokens", " and is not -100")
    out = _ops.loss(
        _rows(input, H), linear_weight, _flat(tokens), linear_bias,
        ignore_index=-100, chunk_size=chunk_size or 0, **knobs,
        **TermOptions(ce_weight=0.0, want_entropy=bool(return_entropy), want_logprob=True).pack(),
    )
    logprobs = _shaped(out[5], shape)
    if return_entropy:
        return logprobs, _shaped(out[4], shape)
    return logprobs


_STAT_NAMES = ("logprobs", "entropy", "mean_logits", "log_sum_sq_probs", "is_top1")


class TokenStatistics(NamedTuple):
    """Per-token outputs of :func:`token_statistics` (None where not requested)."""
    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    mean_logits: torch.Tensor | None
    log_sum_sq_probs: torch.Tensor | None
    is_top1: torch.Tensor | None


def token_statistics(input, linear_weight, tokens, *, linear_bias=None, temperature=1.0,
                     outputs=_STAT_NAMES, softcap=None, logit_scale=1.0, chunk_size=None,
                     memory_budget=None, process_group=None, vocab_start=None, reduce_grad_input=True):
    """Per-token statistics of softmax(logits / temperature), logits = input @ linear_weight.T
    (+ bias), all from one softmax pass over the vocabulary (never materialized):

    - ``logprobs``: log-probability of ``tokens`` (0 where the token is -100), always computed;
    - ``entropy``: entropy of the distribution;
    - ``mean_logits``: mean over the vocabulary of the final logits (after logit_scale, softcap
      and the temperature);
    - ``log_sum_sq_probs``: log sum_c p_c^2;
    - ``is_top1``: whether the token is the (first) argmax; False where the token is -100.

    ``outputs`` names the extra ones wanted (TRL's ``add_fused_lm_head`` names); the others are
    None. ``logprobs`` and ``entropy`` have exact gradients (a recomputing backward);
    ``mean_logits``, ``log_sum_sq_probs`` and ``is_top1`` are metrics without gradient (as in TRL).
    Float outputs are float32 for half inputs. input [..., H], tokens [...] -> each [...].
    ``process_group``, ``memory_budget``: as :func:`fusedce.token_logprobs`."""
    _check_autodiff("token_statistics", input, linear_weight, linear_bias)
    unknown = set(outputs) - set(_STAT_NAMES)
    if unknown:
        raise ValueError(f"fusedce: outputs must be among {_STAT_NAMES}, got {sorted(unknown)}")
    sharded = _sharded(process_group, linear_weight=linear_weight, linear_bias=linear_bias)
    _check_vocab_start(vocab_start, process_group)
    V, H = _check_head(input, linear_weight, linear_bias, vocab_shard=process_group is not None)
    _check_target(tokens, input.shape[:-1], input, "input", name="tokens")
    temperature = _check_positive(temperature, "temperature")
    _check_chunk(chunk_size, "chunk_size")
    chunk_size, _ = _budget.resolve(memory_budget, input, linear_weight, chunk_size=chunk_size,
                                    process_group=process_group, terms=True)
    knobs = _head_knobs(softcap, logit_scale, temperature)
    if sharded:
        return TokenStatistics(*_parallel._token_statistics(
            input, linear_weight, tokens, process_group=process_group, vocab_start=vocab_start,
            linear_bias=linear_bias, temperature=temperature, outputs=tuple(outputs),
            softcap=softcap, logit_scale=logit_scale, chunk_size=chunk_size,
            reduce_grad_input=reduce_grad_input))
    shape = tokens.shape
    want = set(outputs)
    flat = _flat(tokens)
    if host_target_check(tokens.device):
        # as token_logprobs: the error names this function's argument, not the op's `target`
        check_global_targets(flat, V, flat != -100, 0, "tokens", " and is not -100")
    out = _ops.loss(
        _rows(input, H), linear_weight, flat, linear_bias,
        ignore_index=-100, chunk_size=chunk_size or 0, **knobs,
        **TermOptions(ce_weight=0.0, want_entropy="entropy" in want, want_logprob=True,
                      want_mean_logit="mean_logits" in want,
                      want_log_sum_sq="log_sum_sq_probs" in want).pack(),
    )
    # predicted is -1 at ignored rows, so an ignored token is never the top-1.
    is_top1 = _shaped(out[3] == flat, shape) if "is_top1" in want else None
    return TokenStatistics(
        _shaped(out[5], shape),
        _shaped(out[4], shape) if "entropy" in want else None,
        _shaped(out[9], shape) if "mean_logits" in want else None,
        _shaped(out[10], shape) if "log_sum_sq_probs" in want else None,
        is_top1,
    )


# ---------------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------------


def distillation_loss(input, linear_weight, target, *, teacher_input=None, teacher_weight=None,
                      teacher_logits=None, kind="forward_kl", beta=0.5, temperature=1.0,
                      distill_weight=1.0, ce_weight=0.0, ignore_index=-100, reduction="mean",
                      linear_bias=None, teacher_bias=None, label_smoothing=0.0, z_loss=0.0,
                      softcap=None, logit_scale=1.0, chunk_size=None, entropy_coef=0.0,
                      memory_budget=None, process_group=None, vocab_start=None, reduce_grad_input=True):
    """Knowledge distillation of the student head ``input @ linear_weight.T`` toward a teacher,
    without materializing either's logits whole.

    Per token whose target is not ignore_index:
        distill_weight * D(r, q) + ce_weight * CE(student logits, target) (+ z_loss, smoothing)
    with q = softmax(student / temperature), r = softmax(teacher / temperature) and D one of
    ``kind``: "forward_kl" KL(r || q), "reverse_kl" KL(q || r), "jsd" the generalized
    Jensen-Shannon divergence beta KL(r || m) + (1 - beta) KL(q || m), m = beta r + (1 - beta) q
    (0 < beta < 1; TRL's GKD and Liger's JSD convention). No temperature**2 factor.
    ``entropy_coef`` adds entropy_coef * H(softmax(student logits)) per token, from the same pass.

    The teacher is given as ``teacher_logits`` [..., V], or as ``teacher_input`` [..., Ht] +
    ``teacher_weight`` [V, Ht] (+ ``teacher_bias``), whose logits are computed chunk by chunk
    beside the student's. Gradients flow to the student only. "mean" divides by the number of
    non-ignored tokens (nan when there are none, as torch's cross entropy). ``process_group``:
    vocab-parallel, the teacher's weight / logits sharded like the student's. ``memory_budget``:
    as :func:`fusedce.token_logprobs`, counting the teacher's logits chunk too (a
    ``teacher_logits`` of another dtype than ``input`` is converted whole, outside the budget).
    """
    _check_autodiff("distillation_loss", input, linear_weight, linear_bias)
    sharded = _sharded(process_group, linear_weight=linear_weight, linear_bias=linear_bias,
                       teacher_weight=teacher_weight)
    _check_vocab_start(vocab_start, process_group)
    # Every argument is checked before the call is routed: both paths refuse the same input.
    V, H = _check_head(input, linear_weight, linear_bias, vocab_shard=process_group is not None)
    _check_target(target, input.shape[:-1], input, "input")
    if kind not in _DISTILL_KINDS:
        raise ValueError(f"fusedce: kind must be one of {tuple(_DISTILL_KINDS)}, got {kind!r}")
    _check_reduction(reduction)
    temperature = _check_positive(temperature, "temperature")
    _check_finite(beta, "beta")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"fusedce: beta must be in (0, 1) for kind='jsd' (the limits are 'forward_kl' and 'reverse_kl'), got {beta!r}")
    # The same limits as linear_cross_entropy's: a negative weight would turn the loss into a
    # quantity to maximize, which no distillation recipe means.
    _check_nonnegative(distill_weight, "distill_weight")
    _check_nonnegative(ce_weight, "ce_weight")
    _check_label_smoothing(label_smoothing)
    _check_nonnegative(z_loss, "z_loss")
    _check_finite(entropy_coef, "entropy_coef")
    _check_chunk(chunk_size, "chunk_size")
    ignore_index = _check_ignore_index(ignore_index)
    knobs = _head_knobs(softcap, logit_scale)
    if teacher_logits is None and teacher_weight is not None and teacher_input is None:
        teacher_input = input  # self-distillation from the same hidden states (a second head)
    if (teacher_logits is None) == (teacher_input is None):
        raise ValueError("fusedce: give the teacher as teacher_logits, or as teacher_weight (+ teacher_input, default input) (exactly one)")
    lead = input.shape[:-1]
    if teacher_logits is not None:
        _check_tensor(teacher_logits, "teacher_logits")
        _check_float(teacher_logits, "teacher_logits")
        if teacher_logits.shape != (*lead, V):
            raise ValueError(f"fusedce: teacher_logits must have shape {(*lead, V)}, got {tuple(teacher_logits.shape)}")
        _check_device(teacher_logits, "teacher_logits", input, "input")
        if teacher_weight is not None or teacher_bias is not None:
            raise ValueError("fusedce: teacher_weight/teacher_bias go with teacher_input, not with teacher_logits")
        teacher = dict(teacher_logits=teacher_logits.detach().reshape(teacher_logits.shape[:-1].numel(), V))
    else:
        if teacher_weight is None:
            raise ValueError("fusedce: teacher_input needs teacher_weight [V, Ht]")
        Vt, Ht = _check_head(teacher_input, teacher_weight, teacher_bias, "teacher_input",
                             "teacher_weight", vocab_shard=process_group is not None)
        if Vt != V:
            raise ValueError(f"fusedce: teacher_weight has {Vt} classes but linear_weight has {V}")
        if teacher_input.shape[:-1] != lead:
            raise ValueError(f"fusedce: teacher_input must have leading shape {tuple(lead)} (like input), got {tuple(teacher_input.shape)}")
        teacher = dict(
            teacher_hidden=teacher_input.detach().reshape(-1, Ht),
            teacher_weight=teacher_weight.detach(),
            teacher_bias=None if teacher_bias is None else teacher_bias.detach(),
        )
    chunk_size, _ = _budget.resolve(
        memory_budget, input, linear_weight, chunk_size=chunk_size, process_group=process_group,
        terms=True, teacher="logits" if teacher_logits is not None else "head")
    if sharded:
        return _parallel._distillation_loss(
            input, linear_weight, target, teacher_input=teacher_input,
            teacher_weight=teacher_weight, teacher_logits=teacher_logits, kind=kind, beta=beta,
            temperature=temperature, distill_weight=distill_weight, ce_weight=ce_weight,
            ignore_index=ignore_index, reduction=reduction, linear_bias=linear_bias,
            teacher_bias=teacher_bias, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, logit_scale=logit_scale, process_group=process_group,
            vocab_start=vocab_start, chunk_size=chunk_size, reduce_grad_input=reduce_grad_input,
            entropy_coef=entropy_coef)

    shape = target.shape
    flat_target = _flat(target)
    grad_mask = _grad_mask(input, linear_weight, linear_bias) if reduction != "none" else [False] * 3
    # mean: the op divides by the number of non-ignored tokens itself (nan when there is none:
    # every ignored token's loss is 0, and 0 / 0), with zero gradients then.
    out = _ops.loss(
        _rows(input, H), linear_weight, flat_target, linear_bias, None, None,
        ignore_index=ignore_index, label_smoothing=float(label_smoothing), z_loss=float(z_loss),
        grad_mask=grad_mask, chunk_size=chunk_size or 0, mean=reduction == "mean", **knobs,
        **TermOptions(ce_weight=float(ce_weight), entropy_coef=float(entropy_coef),
                      distill=_DISTILL_KINDS[kind], distill_weight=float(distill_weight),
                      distill_beta=float(beta), distill_temperature=temperature,
                      **teacher).pack(),
    )
    if reduction == "none":
        return _shaped(out[1], shape)
    return out[0]


# ---------------------------------------------------------------------------------------------
# Policy gradient (GRPO family)
# ---------------------------------------------------------------------------------------------


_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo")
_POLICY_KIND = {"cispo": 1, "sapo": 2}  # the op's policy_kind; every other type: 0 (clipped)


def _policy_weights(m, loss_type, max_completion_length, num_items, gas):
    """Per-token weights of the aggregation TRL 1.16's GRPOTrainer applies for `loss_type`
    (including its division by the gradient-accumulation steps for the locally normalized types)."""
    B, T = m.shape
    if loss_type in ("grpo", "sapo"):
        return m / (m.sum(-1, keepdim=True).clamp(min=1) * B) / gas
    if loss_type == "bnpo":
        return m / m.sum().clamp(min=1) / gas
    if loss_type == "dr_grpo":
        return m / (B * (T if max_completion_length is None else max_completion_length)) / gas
    if loss_type == "luspo":
        return m / B / gas
    return m / (m.sum().clamp(min=1) if num_items is None else num_items)


def _all_kept(flat_tokens, kept):
    """The kept rows for a target check: every row when there is no mask."""
    return torch.ones_like(flat_tokens, dtype=torch.bool) if kept is None else kept


def _masked_targets(flat_tokens, kept, ignore: int):
    """The op's targets: the tokens, with `ignore` where the mask drops a position (the tokens
    as they are without a mask)."""
    if kept is None:
        return flat_tokens
    return torch.where(kept, flat_tokens, torch.full_like(flat_tokens, ignore))


def _positive_finite(x) -> bool:
    """A number (not a bool) in (0, inf). A chained comparison, not math.isfinite: under
    torch.compile an int that changes between calls (or dynamic=True) is a symbolic int, which
    math.isfinite cannot take (fullgraph=True failed). False for nan."""
    return (not isinstance(x, bool) and isinstance(x, (int, float, torch.SymInt, torch.SymFloat))
            and 0 < x < math.inf)


def _check_number_or_scalar(x, name, ref, acc):
    """A positive number, or a one-element tensor (on ref's device, or a CPU scalar copied there):
    a device tensor's value is never brought to the host (a CPU one, already there, is checked).
    Returns a float or a 0-d acc tensor."""
    if torch.is_tensor(x):
        if x.numel() != 1:
            raise ValueError(f"fusedce: {name} must be a number or a one-element tensor, got shape {tuple(x.shape)}")
        if x.dtype == torch.bool:
            raise ValueError(f"fusedce: {name} must be a count, got a bool tensor")
        if x.device.type != "cpu":
            _check_device(x, name, ref, "input")
        else:  # on the host already: a count <= 0 or not finite refused as linear_cross_entropy does
            _check_num_items(x, name)
        return x.detach().reshape(()).to(device=ref.device, dtype=acc)
    if not _positive_finite(x):
        raise ValueError(f"fusedce: {name} must be a positive finite number or a one-element tensor, got {x!r}")
    return float(x)


def policy_loss(input, linear_weight, tokens, old_logprobs, advantages, *, mask=None,
                ref_logprobs=None, beta=0.0, epsilon_low=0.2, epsilon_high=None, temperature=1.0,
                loss_type="dapo", entropy_coef=0.0, max_completion_length=None, linear_bias=None,
                softcap=None, logit_scale=1.0, chunk_size=None, memory_budget=None,
                process_group=None, vocab_start=None, reduce_grad_input=True,
                importance_sampling_level="token",
                use_bias_correction_kl=True, delta=None, sapo_temperature_pos=1.0,
                sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                vespo_k_neg=3.0, vespo_lambda_neg=2.0, importance_sampling_ratio=None,
                num_items_in_batch=None, gradient_accumulation_steps=1):
    """The policy objective of TRL 1.16's ``GRPOTrainer`` on the head ``input @ linear_weight.T``
    (``_compute_loss``; the names and defaults are ``GRPOConfig``'s: ``epsilon_low`` is its
    ``epsilon``, ``epsilon_high=None`` means ``epsilon_low``, ``max_completion_length`` None
    means T). fusedce/reference.py holds the float64 definition.

    input [B, T, H], tokens / old_logprobs / mask / ref_logprobs [B, T], advantages [B, T] or
    [B]. logp = log softmax(logits / temperature)[token]; old_logprobs None: logp detached
    (ratio 1, TRL's on-policy case). coef_1 = exp(logp - old) per token
    (``importance_sampling_level="token"``) or exp of the masked mean over the sequence of
    (logp - old) (``"sequence"``, GSPO; its gradient reaches every token of the sequence).

    Per token, by ``loss_type``:

    - "grpo", "bnpo", "dr_grpo", "dapo", "luspo": -min(c1 A, clip(coef_1, 1 - epsilon_low,
      1 + epsilon_high) A), c1 = min(coef_1, ``delta``) when ``delta`` is given (two-sided
      clipping), else coef_1;
    - "cispo": -min(coef_1, epsilon_high) A logp, the capped ratio without gradient (TRL uses
      epsilon_high itself as the cap: pass e.g. epsilon_high=5.0, as ScaleRL recommends);
    - "sapo": -4 / tau sigmoid(tau (coef_1 - 1)) A, tau = ``sapo_temperature_pos`` where A > 0,
      else ``sapo_temperature_neg`` (the value given; TRL's ``torch.where`` of two floats rounds
      them to float32, so its 1.05 is float32(1.05): a relative difference near 1e-7);
    - "vespo": -phi A logp, phi = e^lam w^k e^(-lam w) per sequence without gradient, w the
      sequence's ratio exp(sum_t m (logp - old)) (log clamped to [log 1e-8, 20] as TRL), (k, lam)
      = (``vespo_k_pos``, ``vespo_lambda_pos``) where A >= 0 else the ``_neg`` pair.

    ``importance_sampling_ratio`` ([B, T] or [B], no gradient): TRL's vLLM correction; it
    multiplies the policy part (not the KL); for "vespo" it enters w instead (times its product).
    Plus ``beta`` * k3, k3 = exp(ref - logp) - (ref - logp) - 1, times coef_1 (which keeps its
    gradient) when ``use_bias_correction_kl`` (TRL's default).

    Aggregation over ``mask`` m: "grpo" and "sapo" mean over sequences of per-sequence means,
    "bnpo" sum / sum(m), "dr_grpo" sum / (B * max_completion_length), "luspo" mean over
    sequences of per-sequence sums, each divided by ``gradient_accumulation_steps`` (as TRL
    divides them by its current accumulation steps); "cispo", "dapo", "vespo" sum /
    ``num_items_in_batch``: the caller's global normalizer (a number or a one-element tensor;
    a device tensor is never read on the host, a CPU one must be > 0 and finite). TRL's is ``max(num_items_in_batch, 1) / num_processes *
    gradient_accumulation_steps / steps_per_generation``; default max(sum(m), 1), the local count.
    The other types ignore ``num_items_in_batch``, and these three ignore
    ``gradient_accumulation_steps`` in their policy term (TRL's normalizer carries it), as in TRL.
    The entropy bonus is TRL's: - ``entropy_coef`` * sum(H m) / max(sum(m), 1) /
    ``gradient_accumulation_steps``, H the entropy of softmax(logits / temperature), whatever the
    loss type. TRL's ``top_entropy_quantile`` and ``off_policy_mask_threshold`` are not offered
    (a quantile over the gathered entropies); fold such a mask into ``mask`` and
    ``importance_sampling_ratio`` yourself.

    Paths: token-level "grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo" run in one pass
    over the vocabulary with the gradient computed in it. ``importance_sampling_level="sequence"``
    and "vespo" need the whole sequence's log-probabilities before any token's gradient is known:
    they take the log-probabilities and entropies from one pass (with a recomputing backward, as
    :func:`token_logprobs`) and do the rest on [B, T] tensors in PyTorch.

    Returns (loss, metrics): 0-d tensors, no host sync: clip_ratio/low_mean, clip_ratio/high_mean,
    clip_ratio/region_mean, clip_ratio/low_min, clip_ratio/high_max (TRL's, for the clipped types;
    over sequences at the sequence level), cispo_clip_ratio ("cispo"), vespo/phi_seq_mean
    ("vespo"), ratio/mean, ratio/min, ratio/max (of coef_1), kl (when beta != 0; TRL's, with the
    bias correction), entropy, logprob/mean, advantages/mean, advantages/std. TRL's are the
    local values (TRL also reduces over processes). ``process_group``: vocab-parallel, as
    :func:`fusedce.linear_cross_entropy`. ``memory_budget``: as :func:`fusedce.token_logprobs`.
    """
    _check_autodiff("policy_loss", input, linear_weight, linear_bias)
    sharded = _sharded(process_group, linear_weight=linear_weight, linear_bias=linear_bias)
    _check_vocab_start(vocab_start, process_group)
    # Every argument is checked before the call is routed: both paths refuse the same input.
    V, H = _check_head(input, linear_weight, linear_bias, vocab_shard=process_group is not None)
    if input.dim() != 3:
        raise ValueError(f"fusedce: input must have shape [B, T, H], got {tuple(input.shape)}")
    lead = input.shape[:-1]
    _check_target(tokens, lead, input, "input", name="tokens")
    if loss_type not in _LOSS_TYPES:
        raise ValueError(f"fusedce: loss_type must be one of {_LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"fusedce: importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    temperature = _check_positive(temperature, "temperature")
    if epsilon_high is None:
        epsilon_high = epsilon_low
    for name, value in (("beta", beta), ("epsilon_low", epsilon_low), ("epsilon_high", epsilon_high),
                        ("entropy_coef", entropy_coef), ("vespo_k_pos", vespo_k_pos),
                        ("vespo_lambda_pos", vespo_lambda_pos), ("vespo_k_neg", vespo_k_neg),
                        ("vespo_lambda_neg", vespo_lambda_neg)):
        _check_finite(value, name)
    if not 0.0 <= epsilon_low <= 1.0 or epsilon_high < 0:
        raise ValueError(f"fusedce: epsilon_low must be in [0, 1] and epsilon_high >= 0, got {epsilon_low!r}, {epsilon_high!r}")
    if delta is not None:
        delta = _check_positive(delta, "delta")
    sapo_temperature_pos = _check_positive(sapo_temperature_pos, "sapo_temperature_pos")
    sapo_temperature_neg = _check_positive(sapo_temperature_neg, "sapo_temperature_neg")
    if not isinstance(use_bias_correction_kl, bool):
        raise ValueError(f"fusedce: use_bias_correction_kl must be a bool, got {use_bias_correction_kl!r}")
    if max_completion_length is not None and (isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int) or max_completion_length < 1):
        raise ValueError(f"fusedce: max_completion_length must be a positive int or None, got {max_completion_length!r}")
    _check_chunk(chunk_size, "chunk_size")
    chunk_size, _ = _budget.resolve(memory_budget, input, linear_weight, chunk_size=chunk_size,
                                    process_group=process_group, terms=True)
    knobs = _head_knobs(softcap, logit_scale, temperature)
    B, T = lead
    acc = _acc(input)
    gas = gradient_accumulation_steps
    if not _positive_finite(gas):
        raise ValueError(f"fusedce: gradient_accumulation_steps must be a positive number, got {gas!r}")
    num_items = None if num_items_in_batch is None else _check_number_or_scalar(
        num_items_in_batch, "num_items_in_batch", input, acc)
    old = None if old_logprobs is None else _nograd(_per_token(old_logprobs, "old_logprobs", lead, input, "tokens"))
    _check_tensor(advantages, "advantages")
    _check_float(advantages, "advantages")
    advantages_arg = advantages
    if advantages.shape == (B,):
        advantages = advantages[:, None].expand(B, T)
    adv = _nograd(_per_token(advantages, "advantages", lead, input, "tokens"))
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError("fusedce: beta != 0 needs ref_logprobs")
    ref = None if ref_logprobs is None else _nograd(_per_token(ref_logprobs, "ref_logprobs", lead, input, "tokens"))
    isr = None
    if importance_sampling_ratio is not None:
        _check_tensor(importance_sampling_ratio, "importance_sampling_ratio")
        _check_float(importance_sampling_ratio, "importance_sampling_ratio")
        if importance_sampling_ratio.shape not in (lead, (B,), (B, 1)):
            raise ValueError(f"fusedce: importance_sampling_ratio must have shape {tuple(lead)} or ({B},), got {tuple(importance_sampling_ratio.shape)}")
        _check_device(importance_sampling_ratio, "importance_sampling_ratio", input, "input")
        isr = importance_sampling_ratio.detach().to(acc).reshape(B, -1)  # [B, T] or [B, 1]
    if mask is None:
        m = torch.ones(lead, dtype=acc, device=input.device)
    else:
        _check_tensor(mask, "mask")
        if mask.shape != lead:
            raise ValueError(f"fusedce: mask must have shape {tuple(lead)} (like tokens), got {tuple(mask.shape)}")
        _check_device(mask, "mask", input, "input")
        m = mask.to(acc)
    opts = dict(loss_type=loss_type, beta=float(beta), epsilon_low=float(epsilon_low),
                epsilon_high=float(epsilon_high), delta=delta, use_bias_correction_kl=use_bias_correction_kl,
                sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
                vespo=(float(vespo_k_pos), float(vespo_lambda_pos), float(vespo_k_neg), float(vespo_lambda_neg)),
                entropy_coef=float(entropy_coef), max_completion_length=max_completion_length,
                num_items=num_items, gas=gas, level=importance_sampling_level)

    def with_count_gradient(loss, metrics):
        # The normalizer divides the policy part only (KL included), not TRL's entropy bonus,
        # whose value the metric "entropy" (the same masked mean) gives.
        if loss_type not in ("cispo", "dapo", "vespo") or not _count_needs_grad(num_items_in_batch):
            return loss, metrics  # no op added
        rest = None if entropy_coef == 0.0 else metrics["entropy"] * (-float(entropy_coef) / gas)
        return _count_gradient(loss, num_items_in_batch, rest), metrics
    flat_tokens = _as(_flat(tokens), torch.long)
    # Without a mask every token is kept: its tokens are the op's targets as they are (no select).
    kept = None if mask is None else _flat(m) != 0
    two_pass = importance_sampling_level == "sequence" or loss_type == "vespo"
    if two_pass:
        if sharded:
            # Masked positions carry HF's padding label there (log-probability 0, no gradient); a
            # kept -100 is no class id: -101 makes token_logprobs refuse it (NaN where no host
            # check is allowed), never a silent log-probability 0.
            kept_tokens = torch.where(flat_tokens == -100, torch.full_like(flat_tokens, -101), flat_tokens)
            masked_tokens = (kept_tokens if kept is None else
                             torch.where(kept, kept_tokens, torch.full_like(flat_tokens, -100))).reshape(lead)
            lp, ent = _parallel._token_logprobs(
                input, linear_weight, masked_tokens, process_group=process_group,
                vocab_start=vocab_start, linear_bias=linear_bias, temperature=temperature,
                return_entropy=True, softcap=softcap, logit_scale=logit_scale,
                chunk_size=chunk_size, reduce_grad_input=reduce_grad_input)
        else:
            if host_target_check(flat_tokens.device):
                check_global_targets(flat_tokens, V, _all_kept(flat_tokens, kept), 0,
                                     "tokens (flattened)", " where mask != 0")
            ignore = torch.iinfo(torch.int64).min
            target = _masked_targets(flat_tokens, kept, ignore)
            out = _ops.loss(input.reshape(-1, H), linear_weight, target, linear_bias,
                            ignore_index=ignore, chunk_size=chunk_size or 0, **knobs,
                            **TermOptions(ce_weight=0.0, want_entropy=True, want_logprob=True).pack())
            lp, ent = out[5].reshape(lead), out[4].reshape(lead)
        # the [B, T] arguments as given (checked above), in the log-probabilities' dtype
        old2 = None if old is None else _as(_nograd(old_logprobs), lp.dtype)
        ref2 = None if ref is None else _as(_nograd(ref_logprobs), lp.dtype)
        mt = _as(m, lp.dtype)
        loss, parts = _policy_torch(lp, ent, old2, _as(_nograd(advantages), lp.dtype), ref2, mt, isr, opts)
        with torch.no_grad():
            metrics = _policy_metrics(lp.detach(), ent.detach(), mt, advantages_arg, parts, opts)
        return with_count_gradient(loss, metrics)
    weights = _policy_weights(m, loss_type, max_completion_length, num_items, gas)
    ent_w = None
    if entropy_coef != 0.0:
        # The op multiplies each token's loss (entropy term included) by `weights`; TRL's bonus is
        # a plain masked mean, so the entropy term gets weight (its weight) / (the loss type's).
        want = m / m.sum().clamp(min=1) / gas
        ent_w = torch.where(weights != 0, want / torch.where(weights != 0, weights, torch.ones_like(weights)),
                            torch.zeros_like(weights)).reshape(-1)
    pw = None if isr is None else isr.expand(B, T).reshape(-1)
    if sharded:
        return with_count_gradient(*_parallel._policy_loss(
            input, linear_weight, tokens, old_logprobs, advantages_arg, mask=mask, m=m,
            ref_logprobs=ref_logprobs, temperature=temperature, weights=weights, ent_w=ent_w, pw=pw,
            linear_bias=linear_bias, softcap=softcap, logit_scale=logit_scale,
            process_group=process_group, vocab_start=vocab_start, chunk_size=chunk_size,
            reduce_grad_input=reduce_grad_input, opts=opts))
    if host_target_check(flat_tokens.device):
        # Every kept token must be a class id; the error names policy_loss's own arguments (where
        # no host read is allowed, the op's kernels make such a token's loss NaN instead).
        check_global_targets(flat_tokens, V, _all_kept(flat_tokens, kept), 0, "tokens (flattened)",
                             " where mask != 0")
    # Masked tokens are ignored rows: no loss, no gradient, no work beyond the shared statistics.
    # The marker is the one int64 no vocabulary reaches, so a kept token of any other value
    # (-1, -100, ...) is a class id to check, never taken for a masked position.
    ignore = torch.iinfo(torch.int64).min
    target = _masked_targets(flat_tokens, kept, ignore)
    out = _ops.loss(
        input.reshape(-1, H), linear_weight, target, linear_bias, None, weights.reshape(-1),
        ignore_index=ignore, grad_mask=_grad_mask(input, linear_weight, linear_bias),
        chunk_size=chunk_size or 0, **knobs,
        **TermOptions(ce_weight=0.0, want_entropy=True, want_logprob=True,
                      entropy_coef=-float(entropy_coef), old_logprobs=old, advantages=adv,
                      ref_logprobs=ref if beta != 0.0 else None, epsilon_low=float(epsilon_low),
                      epsilon_high=float(epsilon_high), kl_beta=float(beta), policy_weights=pw,
                      entropy_weights=ent_w, policy_kind=_POLICY_KIND.get(loss_type, 0),
                      policy_delta=0.0 if delta is None else float(delta),
                      kl_bias_correction=bool(use_bias_correction_kl),
                      sapo_temperature_pos=float(sapo_temperature_pos),
                      sapo_temperature_neg=float(sapo_temperature_neg)).pack(),
    )
    loss = out[0]
    with torch.no_grad():
        lp = out[5].reshape(lead)
        mt = _as(m, lp.dtype)
        # the [B, T] arguments as given (checked above); the advantages only enter a comparison
        # with 0 here (VESPO's sign), so they keep their dtype
        parts = _policy_parts(lp, None if old is None else _as(_nograd(old_logprobs), lp.dtype),
                              _nograd(advantages), None if ref is None else _as(_nograd(ref_logprobs), lp.dtype),
                              mt, isr, "token", opts)
        metrics = _policy_metrics(lp, out[4].reshape(lead), mt, advantages_arg, parts, opts)
    return with_count_gradient(loss, metrics)


def _policy_torch(lp, ent, old, adv, ref, m, isr, opts):
    """The two-pass path: TRL's objective on [B, T] log-probabilities and entropies that carry
    their gradient (the op's recomputing backward takes it to the head)."""
    lt = opts["loss_type"]
    parts = _policy_parts(lp, old, adv, ref, m, isr, opts["level"], opts)
    coef = parts["coef_1"]
    if lt == "cispo":
        per_token = -torch.clamp(coef, max=opts["epsilon_high"]).detach() * adv * lp
    elif lt == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, opts["sapo_temperature_pos"]),
                          torch.full_like(adv, opts["sapo_temperature_neg"]))
        per_token = -torch.sigmoid(tau * (coef - 1)) * 4 / tau * adv
    elif lt == "vespo":
        per_token = -parts["phi"] * adv * lp
    else:
        c2 = torch.clamp(coef, 1 - opts["epsilon_low"], 1 + opts["epsilon_high"])
        c1 = parts.get("coef_1_clamped", coef)
        per_token = -torch.minimum(c1 * adv, c2 * adv)
    if isr is not None and lt != "vespo":
        per_token = per_token * isr
    if opts["beta"] != 0.0:
        per_token = per_token + opts["beta"] * parts["kl"]
    B = lp.shape[0]
    gas, num_items = opts["gas"], opts["num_items"]
    pm = per_token * m
    if lt in ("grpo", "sapo"):
        loss = (pm.sum(-1) / m.sum(-1).clamp(min=1.0)).mean() / gas
    elif lt == "bnpo":
        loss = pm.sum() / m.sum().clamp(min=1.0) / gas
    elif lt == "dr_grpo":
        L = lp.shape[1] if opts["max_completion_length"] is None else opts["max_completion_length"]
        loss = pm.sum() / (B * L) / gas
    elif lt == "luspo":
        loss = pm.sum(-1).mean() / gas
    else:
        loss = pm.sum() / (m.sum().clamp(min=1.0) if num_items is None else num_items)
    if opts["entropy_coef"] != 0.0:
        loss = loss - opts["entropy_coef"] * ((ent * m).sum() / m.sum().clamp(min=1.0) / gas)
    return loss, {k: v.detach() for k, v in parts.items()}
