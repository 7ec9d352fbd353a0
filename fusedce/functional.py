"""The public functions: argument checks (fusedce/_checks.py, before any routing), reductions and
named outputs over the C++ ops or the vocab-parallel layer.

Positional order and keyword names follow torch.nn.functional.linear_cross_entropy and
torch.nn.functional.cross_entropy where they overlap, so fusedce is a drop-in replacement.
"""

from __future__ import annotations

import contextlib

import torch

from . import _budget, _parallel
from . import ops as _ops_py
from ._shared import LossOutput, _count_gradient, _detached_count, _flat, _rows, _shaped, _sharded, _shift  # noqa: F401  (LossOutput: public here too)
from ._op_args import TermOptions

_ops = torch.ops.fusedce

# The vocabulary tile of the low-memory mode (low_memory=True): with the token chunk the backend
# derives from its 64 MiB budget, the logits tile and its gradient stay within that budget.
LOW_MEMORY_VOCAB_TILE = 8192


@contextlib.contextmanager
def allow_second_backward():
    """Backward passes run inside this block leave the gradients computed in the forward intact,
    so the graph may be backpropagated through again (gradcheck, retain_graph=True). Costs one
    more weight-sized buffer per backward; outside the block a second backward is an error.
    Per thread: it covers the backward passes this thread runs while inside it, and those of the
    graphs this thread built (a CUDA backward runs on autograd's device thread); other threads
    are not affected. Both paths (single-process and sharded)."""
    cell = _ops_py.second_backward_cell()  # this thread's only: other threads are unaffected
    previous = cell[0]
    cell[0] = True
    try:
        yield
    finally:
        cell[0] = previous


from ._checks import (  # noqa: E402,F401  (re-exported: older imports name them here)
    _check_autodiff,
    _check_chunk,
    _check_class_weight,
    _check_device,
    _check_finite,
    _check_float,
    _check_head,
    _check_ignore_index,
    _check_num_items,
    _check_scalars,
    _check_target,
    _check_tensor,
    _fits,
    _not_ignored,
    _check_vocab_start,
)


# ---------------------------------------------------------------------------------------------
# Reductions, shared by both functions.
# ---------------------------------------------------------------------------------------------


def _token_weights(target: torch.Tensor, ignore_index: int, weight, dtype) -> torch.Tensor:
    """w[t_i] at non-ignored tokens, 0 elsewhere: the weights of the mean's denominator.
    Computed only where needed (mean, statistics): a few small kernels per call otherwise."""
    valid = _not_ignored(target, ignore_index)
    if weight is None:
        return valid.to(dtype)
    # Out-of-range targets too are never used as an index: the op makes their loss NaN instead
    # (fusedce/validation.py), so their weight here does not matter.
    usable = valid & (target >= 0) & (target < weight.shape[0])
    safe = torch.where(usable, target, torch.zeros_like(target))
    return weight.to(dtype)[safe] * valid.to(dtype)


def _denominator(target: torch.Tensor, ignore_index: int, weight, dtype) -> torch.Tensor:
    """The mean's denominator: the sum of _token_weights; unweighted, the same float sum of the
    0/1 mask in one op instead of a cast and a sum."""
    if weight is None:
        return _not_ignored(target, ignore_index).sum(dtype=dtype)
    return _token_weights(target, ignore_index, weight, dtype).sum()


def _divisor(num_items_in_batch, device: torch.device, dtype: torch.dtype):
    """num_items_in_batch as a float, or as a 0-d tensor on `device`. A tensor already there is
    never read back (a CUDA one <= 0 gives an inf / nan loss: it cannot be checked without a host
    sync). A CPU tensor for a CUDA loss is read on the host (no device sync) rather than copied:
    a pageable host-to-device copy synchronizes."""
    if isinstance(num_items_in_batch, torch.Tensor):
        if (num_items_in_batch.device != device and num_items_in_batch.device.type == "cpu"
                and not torch.compiler.is_compiling()
                and not torch._C._functorch.is_functorch_wrapped_tensor(num_items_in_batch)):
            return float(num_items_in_batch.item())
        return num_items_in_batch.to(device=device, dtype=dtype).reshape(())
    return float(num_items_in_batch)


def _over_count(s: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """s / num_items_in_batch with the count's derivative where it carries one. The count is
    divided by detached and its gradient added after (_count_gradient): a CPU count for a CUDA
    loss is read as a number by _divisor, which would drop it."""
    d = _divisor(_detached_count(num_items_in_batch), s.device, s.dtype)
    return _count_gradient(s / d, num_items_in_batch)


def _stats(loss, lse, predicted, target, ignore_index, weight, z_loss, reduction, num_items, denom,
           shape, vocab, entropy=None):
    """The statistics of LossOutput from the per-token values the op returned."""
    valid = _not_ignored(target, ignore_index)
    tok_w = _token_weights(target, ignore_index, weight, lse.dtype)
    n_valid = valid.sum()
    accuracy = ((predicted == target) & valid).sum().to(lse.dtype) / n_valid.to(lse.dtype)
    z_tok = tok_w * (z_loss * lse * lse)
    # A target outside [0, V) reaches here only off the CPU without validation (the CPU raises): the
    # op made that token's loss NaN, and the statistics must not report plausible numbers beside
    # it (its z part would count weight[0], the accuracy a miss). Checked on the device, no sync.
    if lse.device.type != "cpu":
        bad = valid & ((target < 0) | (target >= vocab))
        nan = torch.full((), float("nan"), dtype=lse.dtype, device=lse.device)
        z_tok = torch.where(bad, nan, z_tok)
        accuracy = torch.where(bad.any(), nan, accuracy)
    if reduction == "none":
        z_part = z_tok.reshape(shape)
    elif num_items is not None:
        z_part = _over_count(z_tok.sum(), num_items)
    elif reduction == "sum":
        z_part = z_tok.sum()
    else:
        # A mean over no weight (d == 0) keeps its value (nan, or +-inf) but, like `loss`, has
        # zero gradients: z_tok.sum() / 0 would send 0 / 0 = nan into every logit's gradient.
        s = z_tok.sum()
        some = denom != 0
        z_part = torch.where(some, s / torch.where(some, denom, torch.ones_like(denom)),
                             (s / denom).detach())
    return LossOutput(loss, lse.reshape(shape), predicted.reshape(shape), accuracy, z_part,
                      None if entropy is None else entropy.reshape(shape))


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift: bool = False,
    return_stats: bool = False,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    fp32_grad_accum: bool = False,
    low_memory: bool = False,
    memory_budget: int | None = None,
    entropy_coef: float = 0.0,
    return_entropy: bool = False,
    process_group=None,
    vocab_start: int | None = None,
    reduce_grad_input: bool = True,
):
    """Cross entropy of ``input @ linear_weight.T + linear_bias`` without materializing the logits.

    input [..., H], linear_weight [V, H], target [...] (int64/int32 class indices). Equals
    ``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` plus the extra
    terms: z_loss * lse**2 per non-ignored token (weighted like the CE), logit_scale then softcap
    applied to the logits, the HF causal shift of the labels (``shift=True``), sum divided by
    ``num_items_in_batch`` when given (HF gradient-accumulation semantics).

    The loss is float32 for half inputs. With ``return_stats=True`` a :class:`LossOutput`.
    ``chunk_size`` (tokens per chunk) defaults to a size chosen from a memory budget (fast mode:
    ~1 GiB of logits chunk on CUDA). ``low_memory=True`` tiles the vocabulary too (tiles of
    ``vocab_chunk_size``, default LOW_MEMORY_VOCAB_TILE) and recomputes the logits of each tile
    for the gradient: tens of MiB of transient memory for ~1/3 more GEMM work.
    ``memory_budget`` (bytes) picks both instead: the most the call may hold for its logits chunk
    and the buffers that scale with it (not the inputs, outputs or gradients: grad_weight [V, H]
    and grad_input [N, H] come on top; fusedce/_budget.py lists what is and is not counted).
    Whole vocabulary rows while the budget holds a few hundred of them (fast mode, fewer rows
    per chunk = more read-modify-writes of grad_weight), else vocabulary tiles with the logits
    recomputed for the gradient (~1/3 more GEMM work). A budget below one token row of a
    128-class tile (of whole rows with ``entropy_coef`` / ``return_entropy``) is refused, and so
    is ``memory_budget`` together with ``chunk_size``, ``vocab_chunk_size``, ``low_memory=True``
    or ``process_group``. The results equal the default call's up to the order of the float sums.
    ``fp32_grad_accum`` accumulates the weight gradient in float32 on CUDA (the CPU always does).
    ``entropy_coef`` adds entropy_coef * H (the entropy of the softmax) per non-ignored token,
    reduced like the CE (negative: an entropy bonus). ``return_entropy`` (with ``return_stats``)
    also returns the per-token entropy (``LossOutput.entropy``), from the same pass; plain
    ``return_stats`` keeps the CE's own row kernel.

    Vocab-parallel (fusedce/_parallel.py): with ``process_group`` (and only then: a DTensor
    weight without it is refused) ``linear_weight`` / ``linear_bias`` / ``weight`` are this rank's
    vocabulary shard (or a Shard(0) DTensor over that group's mesh) starting at global id
    ``vocab_start`` (None: derived from the shards), ``input`` and ``target`` (global ids) are the
    same on every rank; one collective per chunk.
    ``reduce_grad_input=False`` leaves the input gradient as this rank's partial sum.
    """
    _check_autodiff("linear_cross_entropy", input, linear_weight, linear_bias)
    # First: a DTensor without process_group is refused by name before any shape check reads
    # its global shape.
    sharded = _sharded(process_group, linear_weight=linear_weight, linear_bias=linear_bias)
    _check_vocab_start(vocab_start, process_group)
    # Every argument is checked before the call is routed: both paths refuse the same input.
    V, H = _check_head(input, linear_weight, linear_bias, vocab_shard=process_group is not None)
    _check_target(target, input.shape[:-1], input, "input")
    _check_class_weight(weight, V, input, "input")
    _check_scalars(reduction, label_smoothing, z_loss, softcap, logit_scale)
    _check_finite(entropy_coef, "entropy_coef")
    _check_num_items(num_items_in_batch)
    _check_chunk(chunk_size, "chunk_size")
    _check_chunk(vocab_chunk_size, "vocab_chunk_size")
    ignore_index = _check_ignore_index(ignore_index)
    chunk_size, vocab_chunk_size = _budget.resolve(
        memory_budget, input, linear_weight, chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size, low_memory=low_memory, process_group=process_group,
        terms=memory_budget is not None and (entropy_coef != 0 or bool(return_stats and return_entropy)))
    if sharded:
        return _parallel._linear_cross_entropy(
            input, linear_weight, target, process_group=process_group, vocab_start=vocab_start,
            linear_bias=linear_bias, weight=weight, reduction=reduction,
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, logit_scale=logit_scale, num_items_in_batch=num_items_in_batch,
            shift=shift, return_stats=return_stats, chunk_size=chunk_size,
            fp32_grad_accum=fp32_grad_accum, reduce_grad_input=reduce_grad_input,
            entropy_coef=entropy_coef, return_entropy=return_entropy,
        )
    if low_memory and vocab_chunk_size is None:
        vocab_chunk_size = LOW_MEMORY_VOCAB_TILE

    if shift:
        target = _shift(target, ignore_index)
    shape = target.shape
    hidden = _rows(input, H)
    flat_target = _flat(target)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32

    # The gradient scale of the final scalar is known before the pass: the forward computes the
    # gradients themselves and the backward only multiplies them by the upstream gradient.
    # A mean (without num_items_in_batch) is the op's own (mean=True): it computes the
    # denominator on the device and divides, F.cross_entropy's sum / 0 included (nan or +-inf,
    # with zero gradients), in two launches instead of ~10 small ops here.
    grad_scale = None
    mean = reduction == "mean" and num_items_in_batch is None
    if reduction != "none" and num_items_in_batch is not None:
        d = _divisor(_detached_count(num_items_in_batch), input.device, acc)
        # a fill, not torch.as_tensor(number, device=...): that is a synchronizing copy
        grad_scale = 1.0 / d if isinstance(d, torch.Tensor) else torch.full((), 1.0 / d, dtype=acc, device=input.device)
    track = torch.is_grad_enabled() and reduction != "none"
    grad_mask = [
        track and input.requires_grad,
        track and linear_weight.requires_grad,
        track and linear_bias is not None and linear_bias.requires_grad,
    ]
    out = _ops.loss(
        hidden, linear_weight, flat_target, linear_bias, weight, grad_scale,
        ignore_index=ignore_index, label_smoothing=float(label_smoothing), z_loss=float(z_loss),
        softcap=0.0 if softcap is None else float(softcap), logit_scale=float(logit_scale),
        grad_mask=grad_mask, chunk_size=chunk_size or 0, vocab_chunk_size=vocab_chunk_size or 0,
        fp32_grad_accum=bool(fp32_grad_accum), mean=mean,
        **TermOptions(entropy_coef=float(entropy_coef),
                      want_entropy=bool(return_stats and return_entropy)).pack(),
    )
    loss, token_loss, lse, predicted, entropy = out[0], out[1], out[2], out[3], out[4]
    if reduction == "none":
        loss = _shaped(token_loss, shape)
    elif grad_scale is not None:
        loss = _count_gradient(loss, num_items_in_batch)
    if not return_stats:
        return loss
    denom = _denominator(flat_target, ignore_index, weight, acc) if mean else None
    return _stats(loss, lse, predicted, flat_target, ignore_index, weight, z_loss, reduction,
                  num_items_in_batch, denom, shape, V, entropy if return_entropy else None)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    return_stats: bool = False,
    inplace_backward: bool = False,
    process_group=None,
    vocab_start: int | None = None,
    chunk_size: int | None = None,
):
    """The same terms as :func:`linear_cross_entropy` on given logits ``input`` [..., V].

    One online-softmax pass per row in forward; the backward reads each logit once and writes its
    gradient once. ``inplace_backward=True`` writes that gradient into ``input``'s storage (the
    logits are garbage after backward; no [N, V] allocation; logits whose elements share
    memory, such as an expanded row, get their gradient out of place). With ``process_group``, ``input`` is
    this rank's vocabulary shard of the logits [..., V_local] (fusedce/_parallel.py), processed
    ``chunk_size`` rows at a time (the single-process op reads each row once and takes no chunk).
    """
    _check_autodiff("cross_entropy", input)
    sharded = _sharded(process_group, input=input)  # first: see linear_cross_entropy
    _check_vocab_start(vocab_start, process_group)
    _check_tensor(input, "input")
    _check_float(input, "input")
    if input.dim() < 1:
        raise ValueError("fusedce: input (logits) must have shape [..., V], got a 0-d tensor")
    V = input.shape[-1]
    if V == 0 and process_group is None:  # an empty shard of the logits is valid (_check_head)
        raise ValueError("fusedce: input (logits) must have at least one class (V > 0)")
    _check_target(target, input.shape[:-1], input, "input")
    _check_class_weight(weight, V, input, "input")
    _check_scalars(reduction, label_smoothing, z_loss, softcap, logit_scale)
    _check_num_items(num_items_in_batch)
    _check_chunk(chunk_size, "chunk_size")
    ignore_index = _check_ignore_index(ignore_index)
    if sharded:
        return _parallel._cross_entropy(
            input, target, process_group=process_group, vocab_start=vocab_start, weight=weight,
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap, logit_scale=logit_scale,
            num_items_in_batch=num_items_in_batch, return_stats=return_stats,
            chunk_size=chunk_size,
        )

    shape = target.shape
    # The in-place backward returns the logits' own buffer as their gradient. Through a view (the
    # reshape) AccumulateGrad takes it as .grad as it is; given the leaf itself it would clone it,
    # the [N, V] allocation inplace_backward exists to avoid.
    logits = input.reshape(-1, V) if inplace_backward else _rows(input, V)
    flat_target = _flat(target)
    # A plain mean is the op's own (mean=True): one launch after the pass, where the denominator,
    # the sum and the division as PyTorch ops were ~7 launches and dispatches per call, forward
    # and backward (host time that a synced step waits for).
    mean = reduction == "mean" and num_items_in_batch is None
    # positional, in schema order (_ops_py._CROSS_ENTROPY_ARGS): keywords cost a lookup per call
    token_loss, lse, predicted, mean_loss, _ = _ops.cross_entropy(
        logits, flat_target, weight, ignore_index, float(label_smoothing), float(z_loss),
        0.0 if softcap is None else float(softcap), float(logit_scale), bool(inplace_backward),
        mean,
    )
    denom = None
    if reduction == "none":
        loss = _shaped(token_loss, shape)
    elif num_items_in_batch is not None:
        loss = _over_count(token_loss.sum(), num_items_in_batch)
    elif reduction == "sum":
        loss = token_loss.sum()
    else:
        loss = mean_loss
        if return_stats:  # the statistics' z-loss mean divides by the same d
            denom = _denominator(flat_target, ignore_index, weight, token_loss.dtype)
    if not return_stats:
        return loss
    return _stats(loss, lse, predicted, flat_target, ignore_index, weight, z_loss, reduction,
                  num_items_in_batch, denom, shape, input.shape[-1])
