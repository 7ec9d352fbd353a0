"""What the single-process functions (functional.py, terms.py) and the vocab-parallel layer
(_parallel.py) both use: the LossOutput type, the causal label shift, the routing rule (is this a
vocab-parallel call?) and the policy-loss metrics. It sits below both (it imports only _checks), so
neither path imports the other for them."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.autograd import forward_ad

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


def _rows(x: torch.Tensor, H: int) -> torch.Tensor:
    """x [..., H] as the op's [N, H]. A 2-D input is passed as it is: a reshape to its own shape
    is still a view, which on the autograd path is one more graph node per call (a forward op and
    a backward one), all fixed cost at the small sizes that are bound by host time."""
    return x if x.dim() == 2 else x.reshape(-1, H)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """t as [N] (a 1-D tensor as it is, for the same reason as _rows)."""
    return t if t.dim() == 1 else t.reshape(-1)


def _shaped(y: torch.Tensor, shape) -> torch.Tensor:
    """A per-token output [N] in the targets' shape (as it is when that is already its shape)."""
    return y if y.shape == shape else y.reshape(shape)


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


def _policy_parts(lp, old, adv, ref, m, isr, level, opts):
    """TRL's coef_1 (after two-sided clipping for the clipped types: TRL's clip metrics read that
    one), per-token KL and VESPO's phi, from log-probabilities lp [B, T] (with or without grad)."""
    old = lp.detach() if old is None else old
    log_ratio = lp - old
    if level == "token":
        coef = torch.exp(log_ratio)
    else:
        coef = torch.exp((log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0))
    parts = {"coef_1": coef, "log_ratio": log_ratio}
    if opts["beta"] != 0.0:
        d = ref - lp
        kl = torch.exp(d) - d - 1
        parts["kl"] = kl * coef if opts["use_bias_correction_kl"] else kl
    if opts["loss_type"] == "vespo":
        with torch.no_grad():
            kp, lpos, kn, lneg = opts["vespo"]
            lower = math.log(1e-8)
            seq = (torch.clamp(log_ratio.detach(), -20.0, 20.0) * m).sum(-1, keepdim=True)
            if isr is not None:
                seq = seq + torch.clamp(torch.log(isr), lower, 20.0).sum(-1, keepdim=True)
            log_w = torch.clamp(seq, lower, 20.0)
            nonneg = adv >= 0  # [B, T] advantages give per-token weights, as TRL's broadcast
            k = torch.where(nonneg, torch.full_like(log_w, kp), torch.full_like(log_w, kn))
            lam = torch.where(nonneg, torch.full_like(log_w, lpos), torch.full_like(log_w, lneg)).clamp(min=1e-4)
            parts["phi"] = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    if opts["loss_type"] in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo") and opts["delta"] is not None:
        parts["coef_1_clamped"] = torch.clamp(coef, max=opts["delta"])
    return parts


def _as(x, dtype: torch.dtype):
    """x in dtype; a tensor already of that dtype as it is, None as None (a no-op .to is still a
    dispatch, and policy_loss and the recomputing backward make several per call)."""
    return x if x is None or x.dtype == dtype else x.to(dtype)


def _count_needs_grad(n) -> bool:
    """Whether num_items_in_batch `n` is a tensor that carries a derivative: one that requires
    grad (under torch.vmap the batched wrapper says False and the tensor it wraps tells), or a
    dual tensor of forward-mode AD. No dispatch: the common path (a plain tensor or a number)
    must cost nothing."""
    if not isinstance(n, torch.Tensor):
        return False
    if torch.is_grad_enabled():
        if n.requires_grad:
            return True
        if not torch.compiler.is_compiling():
            u = n
            while torch._C._functorch.is_functorch_wrapped_tensor(u):
                u = torch._C._functorch.get_unwrapped(u)
                if u.requires_grad:
                    return True
    return getattr(forward_ad, "_current_level", -1) >= 0 and forward_ad.unpack_dual(n).tangent is not None


def _detached_count(n):
    """num_items_in_batch for the fused ops, which precompute their gradients with 1 / n and
    return none for n: detached when it carries a derivative (_count_gradient then gives the
    loss its derivative w.r.t. n), as it is otherwise (no dispatch on the common path)."""
    return n.detach() if _count_needs_grad(n) else n


def _count_gradient(loss, n, rest=None):
    """`loss` (its part `loss - rest` divided by num_items_in_batch `n`, computed with n
    detached) with the derivative w.r.t. n of that division, -(loss - rest) / n, where n carries
    one (_count_needs_grad); otherwise `loss` itself, no op added. The value is unchanged:
    n.detach() / n is exactly 1 (x / x for a finite x != 0), and 1 - that exactly 0; the other
    gradients are too (the factor is 1, `rest` is detached)."""
    if not _count_needs_grad(n):
        return loss
    # A CPU 0-d tensor mixes with any device; not under vmap, where the batched count is [B] there.
    if n.device != loss.device and (n.device.type != "cpu"
                                    or torch._C._functorch.is_functorch_wrapped_tensor(n)):
        n = n.to(loss.device)
    one = (n.detach() / n).reshape(()).to(loss.dtype)
    out = loss * one
    if rest is not None:
        out = out + rest.detach().to(loss.dtype) * (1 - one)
    return out


def _nograd(x: torch.Tensor) -> torch.Tensor:
    """x without gradient: detached only when it requires grad (a detach is a dispatch, and most
    per-token arguments never require grad)."""
    return x.detach() if x.requires_grad else x


def _policy_metrics(lp, ent, m, advantages, parts, opts):
    """The metric dict, with TRL 1.16's definitions where TRL logs the same name (local values:
    TRL also reduces them over processes). Computed in a few batched ops (stacked masked means,
    both per-sequence clip fractions from the same per-sequence sums, both extremes at once, no
    view or conversion that is a no-op): they run on every policy_loss call, and at RL sizes a
    call is bound by its host time."""
    dt = lp.dtype
    adv = _as(advantages, dt)
    a = adv.unsqueeze(1) if adv.dim() == 1 else adv
    coef = parts["coef_1"]
    # TRL tells a per-sequence value by its shape [B, 1]; with T = 1 a per-token value has that
    # shape too (and TRL would drop its mask): the level decides here.
    seq = opts["level"] == "sequence"
    metrics, pending = {}, []

    def gmean(name, x):  # TRL's global_masked_mean (one value per sequence at the sequence level)
        if seq and x.shape[1] == 1:
            metrics[name] = x.sum() / max(x.shape[0], 1)
        else:
            pending.append((name, x))

    lt = opts["loss_type"]
    c = parts.get("coef_1_clamped", coef)
    low = ((c < 1 - opts["epsilon_low"]) & (a < 0)).to(dt)
    high = ((c > 1 + opts["epsilon_high"]) & (a > 0)).to(dt)
    gmean("clip_ratio/low_mean", low)
    gmean("clip_ratio/high_mean", high)
    gmean("clip_ratio/region_mean", torch.maximum(low, high))
    gmean("ratio/mean", coef)
    pending += [("entropy", ent), ("logprob/mean", lp)]
    if lt == "cispo":
        gmean("cispo_clip_ratio", ((coef > opts["epsilon_high"]) & (a > 0)).to(dt))
    if lt == "vespo":
        phi = parts["phi"]
        # TRL's phi has the advantages' shape: one per sequence for [B] advantages.
        if advantages.dim() == 1:
            if phi.shape[1]:
                metrics["vespo/phi_seq_mean"] = phi[:, 0].sum() / max(phi.shape[0], 1)
            else:
                # T = 0: no token carries the sequences' phi; an empty sequence has log w = 0,
                # so phi = e^(lam + k 0 - lam e^0) = 1 whatever (k, lam)
                metrics["vespo/phi_seq_mean"] = torch.full((), float(phi.shape[0] > 0), dtype=dt, device=lp.device)
        else:
            gmean("vespo/phi_seq_mean", phi)
    if opts["beta"] != 0.0:
        gmean("kl", parts["kl"])
    # every masked mean from one product: per-sequence sums S [k, B], then (sum over sequences) /
    # count for each x; low and high lead `pending` at the token level, so S's first two rows
    # are also their per-sequence sums
    m_seq = m.sum(-1)
    count = m_seq.sum().clamp(min=1)
    S = (torch.stack([x if x.shape == m.shape else x.expand_as(m) for _, x in pending]) * m).sum(-1)
    means = S.sum(-1) / count
    metrics.update(zip((name for name, _ in pending), means.unbind()))

    # TRL's masked_seq_mean per sequence (nan for a sequence without tokens, as TRL), then the
    # extreme over sequences ignoring nan (nan when every sequence is nan)
    if seq and low.shape[1] == 1:
        per_seq = torch.stack([low.squeeze(1), high.squeeze(1)])
    else:
        per_seq = S[:2] / m_seq
    bad = torch.isnan(per_seq)
    if per_seq.shape[-1] == 0:
        # no sequence (B = 0): no extreme, as when every sequence is empty (a shape test on the
        # host, not a read of the device; min/max of nothing would raise)
        ext = torch.full((2,), math.nan, dtype=dt, device=lp.device)
    else:
        # rows: (min, max) of (low, high); the diagonal is (min of low, max of high)
        ext = torch.stack((torch.where(bad, math.inf, per_seq).amin(-1),
                           torch.where(bad, -math.inf, per_seq).amax(-1))).diagonal()
    low_min, high_max = torch.where(bad.all(-1), math.nan, ext).unbind()
    metrics["clip_ratio/low_min"] = low_min
    metrics["clip_ratio/high_max"] = high_max

    big = torch.finfo(dt).max
    valid = (m != 0) if not seq else torch.ones_like(coef, dtype=torch.bool)
    cb = coef.expand_as(valid) if coef.shape != valid.shape else coef
    if valid.numel() == 0:
        # no token (B = 0 or T = 0): the values of a batch whose every token is masked
        metrics["ratio/min"] = torch.full((), big, dtype=dt, device=lp.device)
        metrics["ratio/max"] = torch.full((), -big, dtype=dt, device=lp.device)
    else:
        metrics["ratio/min"] = torch.where(valid, cb, big).min()
        metrics["ratio/max"] = torch.where(valid, cb, -big).max()
    metrics["advantages/mean"] = adv.mean()
    metrics["advantages/std"] = adv.std() if adv.numel() > 1 else torch.zeros((), dtype=dt, device=lp.device)
    return metrics
