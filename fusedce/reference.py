"""The definition of "correct": every term on materialized logits, in float64 by default.

Tests and benchmarks compare fusedce against these functions. They are written from the
definitions, not from the kernels, and favour clarity over speed and memory.
"""

from __future__ import annotations

import math
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
        # As torch: an all-ignored (or empty) batch gives a nan loss and zero gradients. "No
        # token" is not "denom <= 0": class weights may be negative (torch then divides by a
        # negative sum and returns a value).
        denom = wt.sum()
        some = valid.any()
        safe = torch.where(some, denom, torch.ones_like(denom))
        nan = torch.where(some, torch.zeros_like(denom), torch.full_like(denom, float("nan")))
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


# ---------------------------------------------------------------------------------------------
# One-pass terms beyond the CE: entropy, token log-probabilities, distillation, policy gradient.
# ---------------------------------------------------------------------------------------------


def entropy(logits: torch.Tensor, *, logit_scale: float = 1.0, softcap: float | None = None,
            dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """Entropy -sum_j p_j log p_j of p = softmax(final logits), per token."""
    if dtype is not None:
        logits = logits.to(dtype)
    logp = torch.log_softmax(final_logits(logits, logit_scale, softcap), dim=-1)
    return -_xlogy_exp(logp, logp)


def _xlogy_exp(la, lb):
    """sum_j exp(la_j) * lb_j with 0 where exp(la_j) = 0 (a masked -inf logit counts 0, as in the
    limit), written so that autograd's gradient there is 0 too (not 0 * inf = nan)."""
    masked = la == float("-inf")
    la_s = torch.where(masked, torch.zeros_like(la), la)
    lb_s = torch.where(masked, torch.zeros_like(lb), lb)
    return torch.where(masked, torch.zeros_like(la), la_s.exp() * lb_s).sum(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0,
                   dtype: torch.dtype | None = torch.float64):
    """(log softmax(logits / temperature)[token], entropy of that softmax), per token."""
    if dtype is not None:
        logits = logits.to(dtype)
    z = logits / temperature
    logp = torch.log_softmax(z, dim=-1)
    lp = logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return lp, entropy(z, dtype=None)


def token_statistics(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0,
                     logit_scale: float = 1.0, softcap: float | None = None,
                     ignore_index: int = -100, dtype: torch.dtype | None = torch.float64) -> dict:
    """Per-token statistics of p = softmax(z), z = final_logits(logits) / temperature (TRL's
    FusedCausalLMOutput fields, before its masking):
      logprobs          log p[token], 0 where token == ignore_index
      entropy           -sum_c p_c log p_c
      mean_logits       sum_c z_c / V
      log_sum_sq_probs  log sum_c p_c^2
      is_top1           token == argmax_c z_c (the first maximum), False where ignored"""
    if dtype is not None:
        logits = logits.to(dtype)
    z = final_logits(logits, logit_scale, softcap) / temperature
    logp = torch.log_softmax(z, dim=-1)
    tokens = tokens.long()
    valid = tokens != ignore_index
    safe = torch.where(valid, tokens, torch.zeros_like(tokens))
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return {
        "logprobs": torch.where(valid, lp, torch.zeros_like(lp)),
        "entropy": -_xlogy_exp(logp, logp),
        "mean_logits": z.mean(-1),
        "log_sum_sq_probs": torch.logsumexp(2 * logp, dim=-1),
        "is_top1": valid & (z.argmax(-1) == safe),
    }


def distillation_token_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                            kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                            dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """Per-token divergence between teacher r = softmax(teacher/T) and student q = softmax(student/T).

    forward_kl = KL(r || q); reverse_kl = KL(q || r); jsd = beta KL(r || m) + (1 - beta) KL(q || m)
    with m = beta r + (1 - beta) q (TRL's generalized JSD: beta -> 0 is forward KL, beta -> 1 reverse).
    No T**2 factor.
    """
    if dtype is not None:
        student_logits, teacher_logits = student_logits.to(dtype), teacher_logits.to(dtype)
    lq = torch.log_softmax(student_logits / temperature, dim=-1)
    lr = torch.log_softmax(teacher_logits / temperature, dim=-1)

    def kl(la, lb):  # KL(a || b) from log-probabilities, 0 * log 0 = 0
        return _xlogy_exp(la, la) - _xlogy_exp(la, lb)

    if kind == "forward_kl":
        return kl(lr, lq)
    if kind == "reverse_kl":
        return kl(lq, lr)
    if kind == "jsd":
        lm = torch.logsumexp(torch.stack([lr + math.log(beta), lq + math.log1p(-beta)]), dim=0)
        return beta * kl(lr, lm) + (1 - beta) * kl(lq, lm)
    raise ValueError(f"kind must be 'forward_kl', 'reverse_kl' or 'jsd', got {kind!r}")


def distillation_loss(student_logits, teacher_logits, target, *, kind="forward_kl", beta=0.5,
                      temperature=1.0, distill_weight=1.0, ce_weight=0.0, ignore_index=-100,
                      reduction="mean", dtype=torch.float64) -> torch.Tensor:
    """distill_weight * divergence (tempered) + ce_weight * CE(student logits at T = 1, target),
    over tokens whose target is not ignore_index; mean over those tokens (nan when none)."""
    d = distillation_token_loss(student_logits, teacher_logits, kind=kind, beta=beta,
                                temperature=temperature, dtype=dtype)
    ce = cross_entropy(student_logits, target, reduction="none", ignore_index=ignore_index,
                       dtype=dtype).token_loss
    valid = target != ignore_index
    tok = torch.where(valid, distill_weight * d + ce_weight * ce, torch.zeros_like(d))
    if reduction == "none":
        return tok
    if reduction == "sum":
        return tok.sum()
    return tok.sum() / valid.sum()


_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo")


def vespo_gamma_weights(advantages, log_ratio, mask, importance_sampling_ratio=None, *, k_pos=2.0,
                        lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0):
    """VESPO's per-sequence weight phi(w) = e^lambda w^k e^(-lambda w) (phi(1) = 1), w the
    sequence's importance ratio exp(sum_t m (logp - old)) (times the product of the caller's
    per-token importance-sampling ratios), each log clamped as TRL 1.16 does; no gradient.
    advantages [B, 1], log_ratio and mask [B, T] -> [B, 1]."""
    with torch.no_grad():
        lower = math.log(1e-8)
        seq = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
        if importance_sampling_ratio is not None:
            seq = seq + torch.clamp(torch.log(importance_sampling_ratio), lower, 20.0).sum(-1, keepdim=True)
        log_w = torch.clamp(seq, lower, 20.0)
        w = torch.exp(log_w)
        nonneg = advantages >= 0
        k = torch.where(nonneg, torch.full_like(log_w, k_pos), torch.full_like(log_w, k_neg))
        lam = torch.where(nonneg, torch.full_like(log_w, lambda_pos), torch.full_like(log_w, lambda_neg)).clamp(min=1e-4)
        return torch.exp(lam + k * log_w - lam * w).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def policy_loss(logits, tokens, old_logprobs, advantages, *, mask=None, ref_logprobs=None,
                beta=0.0, epsilon_low=0.2, epsilon_high=None, temperature=1.0, loss_type="dapo",
                entropy_coef=0.0, max_completion_length=None, importance_sampling_level="token",
                use_bias_correction_kl=True, delta=None, sapo_temperature_pos=1.0,
                sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                vespo_lambda_neg=2.0, importance_sampling_ratio=None, num_items_in_batch=None,
                gradient_accumulation_steps=1, dtype=torch.float64):
    """TRL 1.16 GRPOTrainer._compute_loss on logits [B, T, V], tokens/old/mask [B, T],
    advantages [B, T] or [B], importance_sampling_ratio [B, T] or [B] (the vLLM correction: it
    multiplies the policy part; vespo takes it into its gamma weights instead). Returns
    (loss, per_token_loss, logprobs, entropy); per_token_loss has TRL's shape and excludes the
    entropy bonus.

    coef_1 = exp(logp - old) per token ("token") or exp(masked mean over the sequence of
    (logp - old)) ("sequence"); KL k3 = exp(ref - logp) - (ref - logp) - 1, times coef_1 when
    use_bias_correction_kl. Policy part: clipped (grpo, bnpo, dr_grpo, dapo, luspo)
    -min(min(coef_1, delta) A, clip(coef_1, 1 - eps_low, 1 + eps_high) A); cispo
    -min(coef_1, eps_high).detach() A logp; sapo -4/tau sigmoid(tau (coef_1 - 1)) A; vespo
    -phi A logp. Aggregation (mask m): grpo/sapo mean over sequences of per-sequence means; bnpo
    sum m l / sum m; dr_grpo sum m l / (B * max_completion_length (default T)); luspo mean over
    sequences of sum_t m l; those divided by gradient_accumulation_steps; cispo/dapo/vespo
    sum m l / num_items_in_batch (default max(sum m, 1)). Entropy bonus:
    - entropy_coef * sum(H m) / max(sum m, 1) / gradient_accumulation_steps.
    """
    lp, ent = token_logprobs(logits, tokens, temperature=temperature, dtype=dtype)
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    old = lp.detach() if old_logprobs is None else old_logprobs.to(lp.dtype)
    adv = advantages.to(lp.dtype)
    if adv.dim() == 1:
        adv = adv[:, None]
    m = torch.ones_like(lp) if mask is None else mask.to(lp.dtype)
    isr = None
    if importance_sampling_ratio is not None:
        isr = importance_sampling_ratio.to(lp.dtype)
        if isr.dim() == 1:
            isr = isr[:, None]
    B, T = lp.shape
    log_ratio = lp - old
    if importance_sampling_level == "token":
        log_w = log_ratio
    elif importance_sampling_level == "sequence":
        log_w = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    coef_1 = torch.exp(log_w)
    if beta != 0.0:
        d = ref_logprobs.to(lp.dtype) - lp
        kl = torch.exp(d) - d - 1
        if use_bias_correction_kl:
            kl = kl * coef_1
    if loss_type == "cispo":
        per_token = -torch.clamp(coef_1, max=epsilon_high).detach() * adv * lp
    elif loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    elif loss_type == "sapo":
        # (TRL's torch.where of two Python floats makes them float32, the default dtype: 1.05
        # becomes 1.0499999523. The definition keeps the value given.)
        tau = torch.where(adv > 0, torch.full_like(adv, sapo_temperature_pos), torch.full_like(adv, sapo_temperature_neg))
        per_token = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * adv
    elif loss_type == "vespo":
        phi = vespo_gamma_weights(adv, log_ratio, m, isr, k_pos=vespo_k_pos, lambda_pos=vespo_lambda_pos,
                                  k_neg=vespo_k_neg, lambda_neg=vespo_lambda_neg)
        per_token = -phi * adv * lp
    else:
        raise ValueError(f"loss_type must be one of {_LOSS_TYPES}, got {loss_type!r}")
    if isr is not None and loss_type != "vespo":
        per_token = per_token * isr
    if beta != 0.0:
        per_token = per_token + beta * kl
    gas = gradient_accumulation_steps
    if loss_type in ("grpo", "sapo"):
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean() / gas
    elif loss_type == "bnpo":
        loss = (per_token * m).sum() / m.sum().clamp(min=1.0) / gas
    elif loss_type == "dr_grpo":
        L = T if max_completion_length is None else max_completion_length
        loss = (per_token * m).sum() / (per_token.size(0) * L) / gas
    elif loss_type == "luspo":
        loss = (per_token * m).sum(-1).mean() / gas
    else:
        n = m.sum().clamp(min=1.0) if num_items_in_batch is None else num_items_in_batch
        loss = (per_token * m).sum() / n
    if entropy_coef != 0.0:
        loss = loss - entropy_coef * ((ent * m).sum() / m.sum().clamp(min=1.0) / gas)
    return loss, per_token, lp, ent


def preference_loss(logits, target, *, loss_type="sigmoid", beta=0.1, ref_logits=None,
                    ref_logps=None, ignore_index=-100, label_smoothing=0.0, cpo_alpha=1.0,
                    simpo_gamma=0.5, temperature=1.0, logit_scale=1.0, softcap=None,
                    dtype=torch.float64):
    """Pairwise preference losses of TRL 1.16 (DPOTrainer sigmoid / hinge / ipo, ORPOTrainer,
    CPOTrainer sigmoid and simpo) on materialized logits [2B, T, V] (B chosen rows, then B
    rejected), target [2B, T] aligned with the logits. Returns (loss, metrics) as
    fusedce.preference_loss (the NLL is the mean CE over the non-ignored chosen tokens)."""
    def seq(lg):
        z = final_logits(lg.to(dtype), logit_scale, softcap) / temperature
        logp = torch.log_softmax(z, dim=-1)
        keep = target != ignore_index
        safe = torch.where(keep, target, torch.zeros_like(target)).long()
        tok = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * keep
        mean_logit = (z.mean(-1) * keep)
        return tok.sum(-1), keep.sum(-1).to(dtype), mean_logit

    s, n, mean_logit = seq(logits)
    B = s.shape[0] // 2
    c, r = slice(0, B), slice(B, 2 * B)
    a = s / n.clamp(min=1)
    nll = -s[c].sum() / n[c].sum()
    logsig = torch.nn.functional.logsigmoid
    metrics = {}

    def cdpo(x):
        return -(1 - label_smoothing) * logsig(beta * x) - label_smoothing * logsig(-beta * x)

    if loss_type in ("sigmoid", "hinge", "ipo"):
        ref = seq(ref_logits)[0] if ref_logps is None else ref_logps.to(dtype)
        d = s - ref
        if loss_type == "sigmoid":
            per = cdpo(d[c] - d[r])
        elif loss_type == "hinge":
            per = torch.clamp(1 - beta * (d[c] - d[r]), min=0)
        else:
            dn = d / n.clamp(min=1)
            per = (dn[c] - dn[r] - 1 / (2 * beta)) ** 2
        loss = per.mean()
        rewards, logps = beta * d, s
    elif loss_type == "orpo":
        # log odds(y) = log p - log(1 - p) with p = exp(mean token log-prob)
        odds = lambda x: x - torch.log(1 - torch.exp(x))  # noqa: E731
        log_odds = odds(a[c]) - odds(a[r])
        loss = nll - beta * logsig(log_odds).mean()
        rewards, logps = beta * a, a
        metrics = {"log_odds_ratio": logsig(log_odds).mean(), "log_odds_chosen": log_odds.mean()}
    elif loss_type in ("cpo", "simpo"):
        x = s if loss_type == "cpo" else a
        margin = x[c] - x[r] - (simpo_gamma / beta if loss_type == "simpo" else 0.0)
        loss = cdpo(margin).mean() + cpo_alpha * nll
        rewards, logps = beta * x, x
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    keep = (target != ignore_index).to(dtype)
    metrics.update({
        "rewards/chosen": rewards[c].mean(),
        "rewards/rejected": rewards[r].mean(),
        "rewards/accuracies": (rewards[c] > rewards[r]).to(dtype).mean(),
        "rewards/margins": (rewards[c] - rewards[r]).mean(),
        "logps/chosen": logps[c].mean(),
        "logps/rejected": logps[r].mean(),
        "logits/chosen": mean_logit[c].sum() / keep[c].sum(),
        "logits/rejected": mean_logit[r].sum() / keep[r].sum(),
    })
    if loss_type in ("orpo", "cpo", "simpo"):
        metrics["nll_loss"] = nll
    return loss, metrics


def kto_loss(logits, target, preference_labels, *, loss_type="kto", beta=0.1, ref_logits=None,
             ref_logps=None, kl=None, kl_logits=None, kl_target=None, ref_kl_logits=None,
             ref_kl_logps=None, desirable_weight=1.0, undesirable_weight=1.0, ignore_index=-100,
             temperature=1.0, logit_scale=1.0, softcap=None, dtype=torch.float64):
    """TRL 1.16's KTOTrainer loss ("kto", "apo_zero_unpaired") on materialized logits [N, T, V],
    target [N, T] aligned with the logits, preference_labels [N] bool (True: desirable). The
    reference as ref_logits or ref_logps [N]; the KL reference point of "kto" given (kl) or from
    the mismatched completions (kl_logits + kl_target, with ref_kl_logits or ref_kl_logps):
    max(mean(policy sum - reference sum), 0), no gradient. Returns (loss, metrics) as
    fusedce.kto_loss: TRL's per-group means (nan for an empty group, which TRL does not log) and
    the sums and counts."""
    def seq(lg, tgt):
        z = final_logits(lg.to(dtype), logit_scale, softcap) / temperature
        logp = torch.log_softmax(z, dim=-1)
        keep = tgt != ignore_index
        safe = torch.where(keep, tgt, torch.zeros_like(tgt)).long()
        tok = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * keep
        ent = -(logp.exp() * logp).sum(-1)
        return tok.sum(-1), keep, z.mean(-1), ent

    logps, keep, mean_logit, ent = seq(logits, target)
    ref = seq(ref_logits, target)[0] if ref_logps is None else ref_logps.to(dtype)
    ref = ref.detach()
    if loss_type == "kto":
        if kl is None:
            with torch.no_grad():
                s_kl = seq(kl_logits, kl_target)[0]
                r_kl = seq(ref_kl_logits, kl_target)[0] if ref_kl_logps is None else ref_kl_logps.to(dtype)
                kl = (s_kl - r_kl).mean().clamp(min=0)
        kl = torch.as_tensor(kl, dtype=dtype, device=logits.device).detach().reshape(())
    else:
        kl = torch.zeros((), dtype=dtype, device=logits.device)
    labels = preference_labels.bool()
    chosen_idx, rejected_idx = labels.nonzero().view(-1), (~labels).nonzero().view(-1)
    chosen_logps, rejected_logps = logps[chosen_idx], logps[rejected_idx]
    chosen_logratios = chosen_logps - ref[chosen_idx]
    rejected_logratios = rejected_logps - ref[rejected_idx]
    sig = torch.sigmoid
    if loss_type == "kto":  # eq. (7) of the KTO paper, as TRL writes it
        chosen_losses = 1 - sig(beta * (chosen_logratios - kl))
        rejected_losses = 1 - sig(beta * (kl - rejected_logratios))
    elif loss_type == "apo_zero_unpaired":
        chosen_losses = 1 - sig(beta * chosen_logratios)
        rejected_losses = sig(beta * rejected_logratios)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    loss = losses.nanmean()
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    n_c, n_r = len(chosen_idx), len(rejected_idx)
    nan = torch.tensor(float("nan"), dtype=dtype, device=logits.device)
    mean = lambda x, n: x.sum() / n if n else nan  # noqa: E731
    ml = mean_logit.detach() * keep
    k = keep.to(dtype)
    metrics = {
        "kl": kl,
        "rewards/chosen": mean(chosen_rewards, n_c),
        "rewards/rejected": mean(rejected_rewards, n_r),
        "logps/chosen": mean(chosen_logps.detach(), n_c),
        "logps/rejected": mean(rejected_logps.detach(), n_r),
        "logits/chosen": ml[chosen_idx].sum() / k[chosen_idx].sum(),
        "logits/rejected": ml[rejected_idx].sum() / k[rejected_idx].sum(),
        "entropy": (ent.detach() * k).sum() / k.sum(),
        "rewards/chosen_sum": chosen_rewards.sum(),
        "rewards/rejected_sum": rejected_rewards.sum(),
        "logps/chosen_sum": chosen_logps.detach().sum(),
        "logps/rejected_sum": rejected_logps.detach().sum(),
        "count/chosen": torch.tensor(float(n_c), dtype=dtype, device=logits.device),
        "count/rejected": torch.tensor(float(n_r), dtype=dtype, device=logits.device),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics
