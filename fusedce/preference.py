"""Offline preference objectives (DPO and its hinge / IPO variants, ORPO, CPO, SimPO; KTO on
unpaired data) on the head ``input @ linear_weight.T``, with TRL 1.16's definitions.

Every objective here is a function of per-sequence log-probability sums (and token counts). Those
come from one fusedce pass per model (:func:`fusedce.token_logprobs`, or
:func:`fusedce.token_statistics` when the mean-logit metrics are wanted), whose recomputing
backward turns the gradient of the few per-sequence scalars into exact gradients of the head: no
logits are materialized and no second pass over the vocabulary is made. The float64 definitions
are fusedce.reference.preference_loss and fusedce.reference.kto_loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import (
    _check_vocab_start,
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
from . import _parallel
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


def _checked_vocab(target, linear_weight, process_group):
    """The vocabulary to check the completion targets against, None where no host check is made:
    on the sharded path the GLOBAL one (the row ops would only see the -100 / -101 mapping below
    and name their own `tokens` argument)."""
    if not host_target_check(target.device):
        return None
    if process_group is None:
        return linear_weight.shape[0]
    return _parallel.global_vocab(linear_weight, process_group)


def _completion_tokens(target, ignore_index, shift, vocab, name):
    """(keep, tokens): the scored positions and the ids token_logprobs takes (-100 where ignored);
    `vocab` None: no host check here (_checked_vocab)."""
    keep = _not_ignored(target, ignore_index)
    if shift:
        keep = torch.cat([keep[:, 1:], torch.zeros_like(keep[:, :1])], dim=1)
        target = torch.cat([target[:, 1:], target[:, :1]], dim=1)
    # token_logprobs ignores -100; any other ignore_index is mapped onto it. A kept -100 (when
    # ignore_index is something else) is a bad class id like any other, never an ignored position:
    # checked here where a host read is allowed, else mapped to -101, which token_logprobs refuses
    # (or, on CUDA outside validation mode, turns into a NaN loss).
    # Not while compiling: check_global_targets skips it there anyway, and its message formatted
    # with a symbolic ignore_index (one that changes between calls) fails fullgraph tracing.
    if vocab is not None and not torch.compiler.is_compiling():
        check_global_targets(target.reshape(-1), vocab, keep.reshape(-1), 0,
                             f"{name} (shifted)" if shift else name,
                             f" and is not ignore_index ({ignore_index})")
    kept_ids = torch.where(target == -100, torch.full_like(target, -101), target)
    return keep, torch.where(keep, kept_ids, torch.full_like(target, -100))


def preference_loss(input, linear_weight, target, *, loss_type="sigmoid", beta=0.1,
                    ref_input=None, ref_weight=None, ref_logps=None, linear_bias=None,
                    ref_bias=None, ignore_index=-100, label_smoothing=0.0, cpo_alpha=1.0,
                    simpo_gamma=0.5, shift=False, temperature=1.0, softcap=None, logit_scale=1.0,
                    chunk_size=None, memory_budget=None, process_group=None, vocab_start=None, reduce_grad_input=True):
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
    TRL. KTO (unpaired data, a KL estimate from mismatched pairs) is :func:`kto_loss`. The three
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
    :func:`fusedce.token_logprobs`; both heads sharded alike. ``chunk_size``, ``memory_budget``:
    as :func:`fusedce.token_logprobs`, for each head's pass.
    """
    _check_autodiff("preference_loss", input, linear_weight, linear_bias)
    _check_vocab_start(vocab_start, process_group)
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

    keep, tokens = _completion_tokens(target, ignore_index, shift,
                                      _checked_vocab(target, linear_weight, process_group), "target")
    knobs = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale, chunk_size=chunk_size,
                 memory_budget=memory_budget)
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


KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def _check_ref_head(ref_input, ref_weight, ref_bias, input, linear_weight, process_group, name):
    """ref_input ([N, T, Hr], the rows of ``input``'s counterpart ``name``) against ref_weight."""
    _check_tensor(ref_input, name)
    if ref_input.dim() != 3 or ref_input.shape[:2] != input.shape[:2]:
        raise ValueError(f"fusedce: {name} must have shape [{input.shape[0]}, {input.shape[1]}, Hr] "
                         f"(like the rows it scores), got {tuple(ref_input.shape)}")
    _check_head(ref_input, ref_weight, ref_bias, name, "ref_weight", vocab_shard=process_group is not None)
    _check_device(ref_input, name, input, "input")
    if ref_weight.shape[0] != linear_weight.shape[0]:
        raise ValueError(f"fusedce: ref_weight has vocabulary {ref_weight.shape[0]} but linear_weight has {linear_weight.shape[0]}; they must match")


def _check_sums(x, n, name, input):
    _check_tensor(x, name)
    _check_float(x, name)
    if x.shape != (n,):
        raise ValueError(f"fusedce: {name} must have shape ({n},) (one log-prob sum per row), got {tuple(x.shape)}")
    _check_device(x, name, input, "input")


def kto_loss(input, linear_weight, target, preference_labels, *, loss_type="kto", beta=0.1,
             ref_input=None, ref_weight=None, ref_logps=None, linear_bias=None, ref_bias=None,
             kl=None, kl_input=None, kl_target=None, ref_kl_input=None, ref_kl_logps=None,
             desirable_weight=1.0, undesirable_weight=1.0, ignore_index=-100, shift=False,
             temperature=1.0, softcap=None, logit_scale=1.0, chunk_size=None, memory_budget=None, process_group=None,
             vocab_start=None, reduce_grad_input=True):
    """KTO (unpaired preferences) on the head ``input @ linear_weight.T`` (+ ``linear_bias``), with
    TRL 1.16's KTOTrainer definition.

    ``input`` [N, T, H], ``target`` [N, T] as :func:`preference_loss` (``ignore_index`` on prompt
    and padding, ``shift`` for HF-style labels), but the rows are unpaired: ``preference_labels``
    [N] (bool) marks each one desirable (True) or undesirable. With r = beta * (s - ref), s the
    per-sequence log-prob sum and ref the same under the reference model, the loss is the mean over
    the N rows of ``desirable_weight`` * l_d for desirable rows and ``undesirable_weight`` * l_u
    for undesirable ones:

    - "kto": l_d = 1 - sigmoid(r - beta z), l_u = 1 - sigmoid(beta z - r), z the KL reference
      point (no gradient);
    - "apo_zero_unpaired": l_d = 1 - sigmoid(r), l_u = sigmoid(r) (no KL term).

    The reference model (both types need it): ``ref_input`` [N, T, Hr] + ``ref_weight`` [V, Hr]
    (+ ``ref_bias``), run under no_grad, or the precomputed sums ``ref_logps`` [N]. The KL
    reference point of "kto" (exactly one form): ``kl``, given (a number or a one-element tensor,
    e.g. TRL's ``kl``, already averaged over data-parallel processes; used as given), or computed
    as TRL does from mismatched completions: ``kl_input`` [M, T', H] + ``kl_target`` [M, T'] (the
    policy, under no_grad) and their reference, ``ref_kl_input`` [M, T', Hr] (with ``ref_weight``)
    or ``ref_kl_logps`` [M] (with ``ref_logps``): z = max(mean(s_kl - ref_kl), 0) over this batch
    (TRL averages it over processes first: pass ``kl`` for that). ``temperature``, ``softcap``,
    ``logit_scale`` apply to every head; ``process_group`` (with ``vocab_start``,
    ``reduce_grad_input``): vocab-parallel, as :func:`fusedce.token_logprobs`, every head sharded
    alike. ``chunk_size``, ``memory_budget``: as :func:`fusedce.token_logprobs`, for each head's pass.

    Returns (loss, metrics), metrics 0-d tensors without a host sync, named as TRL logs them:
    kl, rewards/chosen, rewards/rejected, rewards/margins, logps/chosen, logps/rejected (means over
    the desirable / undesirable rows, nan where the batch has none: TRL skips logging then),
    logits/chosen, logits/rejected (the mean logit over the vocabulary, averaged over their
    completion tokens), entropy (averaged over every completion token), all from the same pass;
    and, to aggregate over processes as TRL does (sum of sums over sum of counts),
    rewards/chosen_sum, rewards/rejected_sum, logps/chosen_sum, logps/rejected_sum, count/chosen,
    count/rejected. TRL's num_tokens (it counts prompt tokens) and aux_loss (the model's router
    loss) are not the head's and are left out.
    """
    _check_autodiff("kto_loss", input, linear_weight, linear_bias)
    _check_vocab_start(vocab_start, process_group)
    _check_tensor(input, "input")
    if input.dim() != 3:
        raise ValueError(f"fusedce: input must have shape [N, T, H], got {tuple(input.shape)}")
    _check_head(input, linear_weight, linear_bias, vocab_shard=process_group is not None)
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"fusedce: loss_type must be one of {KTO_LOSS_TYPES}, got {loss_type!r}")
    beta = _check_positive(beta, "beta")
    _check_target(target, input.shape[:-1], input, "input")
    N = input.shape[0]
    _check_tensor(preference_labels, "preference_labels")
    if preference_labels.dtype != torch.bool:
        raise TypeError(f"fusedce: preference_labels must be a bool tensor (True: desirable), got {preference_labels.dtype}")
    if preference_labels.shape != (N,):
        raise ValueError(f"fusedce: preference_labels must have shape ({N},) (one per row of input), got {tuple(preference_labels.shape)}")
    _check_device(preference_labels, "preference_labels", input, "input")
    dw = _check_finite(desirable_weight, "desirable_weight")
    uw = _check_finite(undesirable_weight, "undesirable_weight")
    if dw < 0 or uw < 0:
        bad = "desirable_weight" if dw < 0 else "undesirable_weight"
        raise ValueError(f"fusedce: {bad} must be >= 0, got {dw if dw < 0 else uw!r}")
    ignore_index = _check_ignore_index(ignore_index)
    if not isinstance(shift, bool):
        raise TypeError(f"fusedce: shift must be a bool, got {shift!r}")

    if ref_bias is not None and ref_weight is None:
        raise ValueError("fusedce: ref_bias goes with ref_input + ref_weight")
    if (ref_logps is None) == (ref_weight is None):
        raise ValueError(f"fusedce: loss_type={loss_type!r} needs the reference as ref_input + ref_weight, or as ref_logps [N] (exactly one)")
    if ref_weight is not None:
        if ref_input is None:
            raise ValueError("fusedce: ref_weight needs ref_input [N, T, Hr]")
        _check_ref_head(ref_input, ref_weight, ref_bias, input, linear_weight, process_group, "ref_input")
    elif ref_input is not None:
        raise ValueError("fusedce: ref_input needs ref_weight [V, Hr]")
    else:
        _check_sums(ref_logps, N, "ref_logps", input)

    kl_args = dict(kl_input=kl_input, kl_target=kl_target, ref_kl_input=ref_kl_input, ref_kl_logps=ref_kl_logps)
    if loss_type == "apo_zero_unpaired":
        given = [k for k, v in dict(kl=kl, **kl_args).items() if v is not None]
        if given:
            raise ValueError(f"fusedce: loss_type='apo_zero_unpaired' has no KL term; drop {', '.join(given)}")
    elif kl is not None:
        given = [k for k, v in kl_args.items() if v is not None]
        if given:
            raise ValueError(f"fusedce: kl is given; drop {', '.join(given)} (the inputs to compute it from)")
        if isinstance(kl, torch.Tensor):
            _check_float(kl, "kl")
            if kl.numel() != 1 or kl.dim() > 1:
                raise ValueError(f"fusedce: kl must be a number or a one-element tensor (the batch's KL estimate), got shape {tuple(kl.shape)}")
            _check_device(kl, "kl", input, "input")
        else:
            kl = _check_finite(kl, "kl")
    else:
        if kl_input is None or kl_target is None:
            raise ValueError("fusedce: loss_type='kto' needs the KL reference point: kl, or kl_input + kl_target "
                             "(the mismatched completions) with ref_kl_input or ref_kl_logps")
        _check_tensor(kl_input, "kl_input")
        if kl_input.dim() != 3:
            raise ValueError(f"fusedce: kl_input must have shape [M, T', H], got {tuple(kl_input.shape)}")
        _check_head(kl_input, linear_weight, linear_bias, "kl_input", vocab_shard=process_group is not None)
        _check_device(kl_input, "kl_input", input, "input")
        _check_target(kl_target, kl_input.shape[:-1], kl_input, "kl_input", "kl_target")
        if ref_weight is not None:
            if ref_kl_logps is not None or ref_kl_input is None:
                raise ValueError("fusedce: with ref_input + ref_weight, the KL completions' reference is ref_kl_input [M, T', Hr] (not ref_kl_logps)")
            _check_ref_head(ref_kl_input, ref_weight, ref_bias, kl_input, linear_weight, process_group, "ref_kl_input")
        else:
            if ref_kl_input is not None or ref_kl_logps is None:
                raise ValueError("fusedce: with ref_logps, the KL completions' reference is ref_kl_logps [M] (not ref_kl_input)")
            _check_sums(ref_kl_logps, kl_input.shape[0], "ref_kl_logps", input)

    vocab = _checked_vocab(target, linear_weight, process_group)
    keep, tokens = _completion_tokens(target, ignore_index, shift, vocab, "target")
    knobs = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale, chunk_size=chunk_size,
                 memory_budget=memory_budget)
    out = token_statistics(input, linear_weight, tokens, linear_bias=linear_bias, outputs=("entropy", "mean_logits"),
                           process_group=process_group, vocab_start=vocab_start,
                           reduce_grad_input=reduce_grad_input, **knobs)
    lp = out.logprobs
    acc = lp.dtype
    m = keep.to(acc)
    sums = lp.sum(-1)  # ignored tokens already carry log-prob 0
    with torch.no_grad():
        if ref_logps is None:
            ref = _sequence_logps(ref_input, ref_weight, ref_bias, tokens, knobs, False, process_group,
                                  vocab_start)[0].sum(-1)
        else:
            ref = ref_logps.to(acc)
        if loss_type == "kto" and kl is None:
            _, kl_tokens = _completion_tokens(kl_target, ignore_index, shift, vocab, "kl_target")
            s_kl = _sequence_logps(kl_input, linear_weight, linear_bias, kl_tokens, knobs, False,
                                   process_group, vocab_start)[0].sum(-1)
            if ref_kl_logps is None:
                r_kl = _sequence_logps(ref_kl_input, ref_weight, ref_bias, kl_tokens, knobs, False,
                                       process_group, vocab_start)[0].sum(-1)
            else:
                r_kl = ref_kl_logps.to(acc)
            kl = (s_kl - r_kl).mean().clamp(min=0)
        elif isinstance(kl, torch.Tensor):
            kl = kl.detach().to(acc).reshape(())
        elif kl is None:
            kl = torch.zeros((), dtype=acc, device=lp.device)
        else:
            kl = torch.full((), kl, dtype=acc, device=lp.device)
    ref = ref.detach()
    desirable = preference_labels
    logratio = sums - ref
    if loss_type == "kto":
        l_d = 1 - torch.sigmoid(beta * (logratio - kl))
        l_u = 1 - torch.sigmoid(beta * (kl - logratio))
    else:
        l_d = 1 - torch.sigmoid(beta * logratio)
        l_u = torch.sigmoid(beta * logratio)
    loss = torch.where(desirable, dw * l_d, uw * l_u).mean()

    with torch.no_grad():
        d, u = desirable.to(acc), (~desirable).to(acc)
        rewards = beta * logratio.detach()
        s = sums.detach()
        zero = torch.zeros((), dtype=acc, device=lp.device)
        n_d, n_u = d.sum(), u.sum()
        sum_rc, sum_rr = torch.where(desirable, rewards, zero).sum(), torch.where(desirable, zero, rewards).sum()
        sum_lc, sum_lr = torch.where(desirable, s, zero).sum(), torch.where(desirable, zero, s).sum()
        ml = out.mean_logits.to(acc) * m
        tok_d, tok_u = (m * d[:, None]), (m * u[:, None])
        metrics = {
            "kl": kl,
            "rewards/chosen": sum_rc / n_d,
            "rewards/rejected": sum_rr / n_u,
            "rewards/margins": sum_rc / n_d - sum_rr / n_u,
            "logps/chosen": sum_lc / n_d,
            "logps/rejected": sum_lr / n_u,
            "logits/chosen": (ml * tok_d).sum() / tok_d.sum(),
            "logits/rejected": (ml * tok_u).sum() / tok_u.sum(),
            "entropy": (out.entropy.detach().to(acc) * m).sum() / m.sum(),
            "rewards/chosen_sum": sum_rc,
            "rewards/rejected_sum": sum_rr,
            "logps/chosen_sum": sum_lc,
            "logps/rejected_sum": sum_lr,
            "count/chosen": n_d,
            "count/rejected": n_u,
        }
    return loss, metrics
