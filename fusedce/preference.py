"""Offline preference objectives (DPO and its hinge / IPO variants, ORPO, CPO, SimPO) on the head
``input @ linear_weight.T``, with TRL 1.16's definitions.

Every objective here is a function of per-sequence log-probability sums (and token counts). Those
come from one fusedce pass per model (:func:`fusedce.token_logprobs`, or
:func:`fusedce.token_statistics` when the mean-logit metrics are wanted), whose recomputing
backward turns the gradient of the few per-sequence scalars into exact gradients of the head: no
logits are materialized and no second pass over the vocabulary is made. The float64 definitions
are fusedce.reference.preference_loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import (
    check_global_targets,
    host_target_check,
    _check_autodiff,
    _check_device,
    _check_finite,
    _check_float,
    _check_head,
    _check_ignore_index,
    _check_positive,
    _check_target,
    _check_tensor,
    _not_ignored,
)
from .terms import token_logprobs, token_statistics

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "orpo", "cpo", "simpo")
_WITH_REFERENCE = ("sigmoid", "hinge", "ipo")
_SMOOTHED = ("sigmoid", "cpo", "simpo")


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, switching form at -log 2 where each one loses precision."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _sequence_logps(input, weight, bias, tokens, knobs, stats, process_group, vocab_start,
                    reduce_grad_input=True):
    """Per-token log-probs (0 at -100) and, when ``stats``, the per-token mean logits, one pass."""
    if stats:
        out = token_statistics(input, weight, tokens, linear_bias=bias, outputs=("mean_logits",),
                               process_group=process_group, vocab_start=vocab_start,
                               reduce_grad_input=reduce_grad_input, **knobs)
        return out.logprobs, out.mean_logits
    lp = token_logprobs(input, weight, tokens, linear_bias=bias, process_group=process_group,
                        vocab_start=vocab_start, reduce_grad_input=reduce_grad_input, **knobs)
    return lp, None


def preference_loss(input, linear_weight, target, *, loss_type="sigmoid", beta=0.1,
                    ref_input=None, ref_weight=None, ref_logps=None, linear_bias=None,
                    ref_bias=None, ignore_index=-100, label_smoothing=0.0, cpo_alpha=1.0,
                    simpo_gamma=0.5, shift=False, temperature=1.0, softcap=None, logit_scale=1.0,
                    chunk_size=None, process_group=None, vocab_start=None, reduce_grad_input=True):
    """A pairwise preference loss on the head ``input @ linear_weight.T`` (+ ``linear_bias``).

    ``input`` [2B, T, H]: the B chosen sequences first, then their B rejected counterparts (TRL's
    and Liger's concatenated batch). ``target`` [2B, T]: the completion tokens, ``ignore_index``
    on the prompt and padding, aligned with ``input`` (position t scores target t). ``shift=True``
    takes HF-style labels instead (position t scores target t+1, as linear_cross_entropy's
    ``shift``). With s_c, s_r the per-sequence sums of log p(token) over non-ignored tokens,
    n_c, n_r their token counts, a_* = s_* / max(n_*, 1), and d_* = s_* - ref_* (ref_* the same
    sums under the reference model), the mean over the B pairs of:

    - "sigmoid" (DPO): -(1 - ls) log sigmoid(beta (d_c - d_r)) - ls log sigmoid(-beta (d_c - d_r)),
      ls = ``label_smoothing`` (conservative DPO; 0, TRL 1.16's DPO sigmoid, by default);
    - "hinge": relu(1 - beta (d_c - d_r));
    - "ipo": (d_c / max(n_c, 1) - d_r / max(n_r, 1) - 1 / (2 beta))^2 (TRL's length normalization);
    - "orpo": the chosen NLL - beta log sigmoid(log_odds), log_odds = (a_c - a_r)
      - (log(1 - exp a_c) - log(1 - exp a_r)) (TRL's ORPOTrainer, average log-probs);
    - "cpo": -(1 - ls) log sigmoid(beta (s_c - s_r)) - ls log sigmoid(-beta (s_c - s_r))
      + ``cpo_alpha`` * the chosen NLL (TRL's CPOTrainer, loss_type="sigmoid");
    - "simpo": as "cpo" with a_c - a_r - simpo_gamma / beta in place of s_c - s_r (TRL's
      CPOTrainer, loss_type="simpo"; cpo_alpha=0 is the SimPO paper's loss).

    The chosen NLL is the mean token cross entropy over the non-ignored chosen tokens (nan when
    there are none, as torch's cross entropy). A row without completion tokens has a log-prob sum
    of 0 and a count clamped to 1 (TRL's clamp); under "orpo" its log(1 - exp(0)) is -inf, as in
    TRL. KTO (unpaired data, a KL estimate from mismatched pairs) is not offered here. The three
    DPO types need the reference: ``ref_input`` [2B, T, Hr] + ``ref_weight`` [V, Hr] (+
    ``ref_bias``), run under no_grad, or the precomputed sums ``ref_logps`` [2B] (same order);
    the others take none. ``temperature``, ``softcap``, ``logit_scale`` apply to both heads.

    Returns (loss, metrics), metrics 0-d tensors without a host sync, named as TRL logs them:
    rewards/chosen, rewards/rejected (beta * d_* for the DPO types, beta * the policy log-probs
    (averages for orpo and simpo) otherwise), rewards/accuracies, rewards/margins, logps/chosen,
    logps/rejected (sums; averages for orpo and simpo), logits/chosen, logits/rejected (mean over
    the non-ignored tokens of the mean logit over the vocabulary, as TRL's DPOTrainer (its
    CPO/ORPO trainers average over every position, prompt and padding too)), nll_loss (orpo, cpo, simpo),
    log_odds_ratio (the mean of log sigmoid(log_odds)) and log_odds_chosen (the mean of log_odds)
    for orpo. ``process_group`` (with ``vocab_start``, ``reduce_grad_input``): vocab-parallel, as
    :func:`fusedce.token_logprobs`; both heads sharded alike.
    """
    _check_autodiff("preference_loss", input, linear_weight, linear_bias)
    _check_tensor(input, "input")
    if input.dim() != 3:
        raise ValueError(f"fusedce: input must have shape [2B, T, H] (B chosen rows, then B rejected), got {tuple(input.shape)}")
    if input.shape[0] % 2 != 0:
        raise ValueError(f"fusedce: input must hold 2B rows (B chosen, then B rejected), got an odd batch of {input.shape[0]}")
    _check_head(input, linear_weight, linear_bias, vocab_shard=process_group is not None)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"fusedce: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    beta = _check_positive(beta, "beta")
    _check_target(target, input.shape[:-1], input, "input")
    ignore_index = _check_ignore_index(ignore_index)
    ls = _check_finite(label_smoothing, "label_smoothing")
    if not 0.0 <= ls < 0.5:
        raise ValueError(f"fusedce: label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if ls != 0.0 and loss_type not in _SMOOTHED:
        raise ValueError(f"fusedce: label_smoothing applies to loss_type in {_SMOOTHED}, not {loss_type!r}")
    cpo_alpha = _check_finite(cpo_alpha, "cpo_alpha")
    if cpo_alpha < 0:
        raise ValueError(f"fusedce: cpo_alpha must be >= 0, got {cpo_alpha!r}")
    simpo_gamma = _check_finite(simpo_gamma, "simpo_gamma")
    if not isinstance(shift, bool):
        raise TypeError(f"fusedce: shift must be a bool, got {shift!r}")
    two_b, T = target.shape
    B = two_b // 2
    needs_ref = loss_type in _WITH_REFERENCE
    if ref_bias is not None and ref_weight is None:
        raise ValueError("fusedce: ref_bias goes with ref_input + ref_weight")
    if needs_ref:
        if (ref_logps is None) == (ref_weight is None):
            raise ValueError(f"fusedce: loss_type={loss_type!r} needs the reference as ref_input + ref_weight, or as ref_logps [2B] (exactly one)")
        if ref_weight is not None and ref_input is None:
            raise ValueError("fusedce: ref_weight needs ref_input [2B, T, Hr]")
    elif ref_input is not None or ref_weight is not None or ref_logps is not None:
        raise ValueError(f"fusedce: loss_type={loss_type!r} uses no reference model; drop ref_input/ref_weight/ref_logps")
    if ref_input is not None and ref_weight is None:
        raise ValueError("fusedce: ref_input needs ref_weight [V, Hr]")
    if ref_logps is not None:
        _check_tensor(ref_logps, "ref_logps")
        _check_float(ref_logps, "ref_logps")
        if ref_logps.shape != (two_b,):
            raise ValueError(f"fusedce: ref_logps must have shape ({two_b},) (one sum per row of input), got {tuple(ref_logps.shape)}")
        _check_device(ref_logps, "ref_logps", input, "input")
    if ref_input is not None:
        _check_tensor(ref_input, "ref_input")
        if ref_input.dim() != 3 or ref_input.shape[:2] != input.shape[:2]:
            raise ValueError(f"fusedce: ref_input must have shape [{two_b}, {T}, Hr] (like input), got {tuple(ref_input.shape)}")
        # Named here: token_logprobs would call them input / linear_weight.
        _check_head(ref_input, ref_weight, ref_bias, "ref_input", "ref_weight",
                    vocab_shard=process_group is not None)
        _check_device(ref_input, "ref_input", input, "input")
        if ref_weight.shape[0] != linear_weight.shape[0]:
            raise ValueError(f"fusedce: ref_weight has vocabulary {ref_weight.shape[0]} but linear_weight has {linear_weight.shape[0]}; they must match")

    keep = _not_ignored(target, ignore_index)
    if shift:
        keep = torch.cat([keep[:, 1:], torch.zeros_like(keep[:, :1])], dim=1)
        target = torch.cat([target[:, 1:], target[:, :1]], dim=1)
    # token_logprobs ignores -100; any other ignore_index is mapped onto it. A kept -100 (when
    # ignore_index is something else) is a bad class id like any other, never an ignored position:
    # checked here where a host read is allowed, else mapped to -101, which token_logprobs refuses
    # (or, on CUDA outside validation mode, turns into a NaN loss).
    if process_group is None and host_target_check(target.device):
        check_global_targets(target.reshape(-1), linear_weight.shape[0], keep.reshape(-1), 0,
                             "target (shifted)" if shift else "target",
                             f" and is not ignore_index ({ignore_index})")
    kept_ids = torch.where(target == -100, torch.full_like(target, -101), target)
    tokens = torch.where(keep, kept_ids, torch.full_like(target, -100))
    knobs = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale, chunk_size=chunk_size)
    stats = True  # the policy's mean logits (logits/* metrics), from the same pass
    lp, mean_logits = _sequence_logps(input, linear_weight, linear_bias, tokens, knobs, stats,
                                      process_group, vocab_start, reduce_grad_input)
    acc = lp.dtype
    m = keep.to(acc)
    sums = lp.sum(-1)  # ignored tokens already carry log-prob 0
    counts = m.sum(-1)
    avgs = sums / counts.clamp(min=1)
    if needs_ref:
        if ref_logps is None:
            with torch.no_grad():
                ref_lp, _ = _sequence_logps(ref_input, ref_weight, ref_bias, tokens, knobs, False,
                                            process_group, vocab_start)
            ref = ref_lp.sum(-1)
        else:
            ref = ref_logps.detach().to(acc)
    chosen, rejected = slice(0, B), slice(B, two_b)
    nll = -sums[chosen].sum() / counts[chosen].sum()

    def smoothed(z):
        loss = -F.logsigmoid(beta * z)
        if ls != 0.0:
            loss = (1 - ls) * loss - ls * F.logsigmoid(-beta * z)
        return loss

    extra = {}
    if needs_ref:
        ratio = sums - ref
        delta = ratio[chosen] - ratio[rejected]
        if loss_type == "sigmoid":
            per_pair = smoothed(delta)
        elif loss_type == "hinge":
            per_pair = torch.relu(1 - beta * delta)
        else:
            norm = ratio / counts.clamp(min=1)
            per_pair = (norm[chosen] - norm[rejected] - 1 / (2 * beta)) ** 2
        loss = per_pair.mean()
        rewards, logps = beta * ratio.detach(), sums.detach()
    elif loss_type == "orpo":
        log_odds = (avgs[chosen] - avgs[rejected]) - (_log1mexp(avgs[chosen]) - _log1mexp(avgs[rejected]))
        log_sig = F.logsigmoid(log_odds)
        loss = nll - beta * log_sig.mean()
        rewards, logps = beta * avgs.detach(), avgs.detach()
        extra = {"log_odds_ratio": log_sig.detach().mean(), "log_odds_chosen": log_odds.detach().mean()}
    else:
        x = sums if loss_type == "cpo" else avgs
        z = x[chosen] - x[rejected]
        if loss_type == "simpo":
            z = z - simpo_gamma / beta
        loss = smoothed(z).mean() + cpo_alpha * nll
        rewards, logps = beta * x.detach(), x.detach()

    with torch.no_grad():
        r_c, r_r = rewards[chosen], rewards[rejected]
        metrics = {
            "rewards/chosen": r_c.mean(),
            "rewards/rejected": r_r.mean(),
            "rewards/accuracies": (r_c > r_r).to(acc).mean(),
            "rewards/margins": (r_c - r_r).mean(),
            "logps/chosen": logps[chosen].mean(),
            "logps/rejected": logps[rejected].mean(),
        }
        if mean_logits is not None:
            ml = mean_logits.to(acc) * m
            metrics["logits/chosen"] = ml[chosen].sum() / counts[chosen].sum()
            metrics["logits/rejected"] = ml[rejected].sum() / counts[rejected].sum()
        if loss_type in ("orpo", "cpo", "simpo"):
            metrics["nll_loss"] = nll.detach()
        metrics.update(extra)
    return loss, metrics
