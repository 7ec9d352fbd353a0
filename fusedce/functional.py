"""The public functions: argument checking, reductions and named outputs over the C++ ops.

Positional order and keyword names follow torch.nn.functional.linear_cross_entropy and
torch.nn.functional.cross_entropy where they overlap, so fusedce is a drop-in replacement.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import NamedTuple

import torch

from . import ops as _ops_py

_ops = torch.ops.fusedce
_REDUCTIONS = ("mean", "sum", "none")

# The vocabulary tile of the low-memory mode (low_memory=True): with the token chunk the backend
# derives from its 64 MiB budget, the logits tile and its gradient stay within that budget.
LOW_MEMORY_VOCAB_TILE = 8192


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


@contextlib.contextmanager
def allow_second_backward():
    """Backward passes run inside this block leave the gradients computed in the forward intact,
    so the graph may be backpropagated through again (gradcheck, retain_graph=True). Costs one
    more weight-sized buffer per backward; outside the block a second backward is an error."""
    previous = _ops_py._second_backward_allowed
    _ops_py._second_backward_allowed = True
    try:
        yield
    finally:
        _ops_py._second_backward_allowed = previous


# ---------------------------------------------------------------------------------------------
# Argument checks: each error names the public argument.
# ---------------------------------------------------------------------------------------------


def _check_tensor(x, name: str):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fusedce: {name} must be a torch.Tensor, got {type(x).__name__}")


def _check_float(x: torch.Tensor, name: str):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"fusedce: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_device(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str):
    if x.device != ref.device:
        raise ValueError(f"fusedce: {name} is on {x.device} but {ref_name} is on {ref.device}")


def _check_finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise ValueError(f"fusedce: {name} must be a finite number, got {value!r}")
    # A chained comparison rather than math.isfinite: it also traces under
    # torch.compile(dynamic=True), where the knob may be a symbolic float. False for nan.
    if not -math.inf < value < math.inf:
        raise ValueError(f"fusedce: {name} must be a finite number, got {value!r}")
    return value


def _check_scalars(reduction, label_smoothing, z_loss, softcap, logit_scale):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"fusedce: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _check_finite(label_smoothing, "label_smoothing")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"fusedce: label_smoothing must be in [0, 1], got {label_smoothing}")
    _check_finite(z_loss, "z_loss")
    if z_loss < 0:
        raise ValueError(f"fusedce: z_loss must be >= 0, got {z_loss}")
    if softcap is not None:
        _check_finite(softcap, "softcap")
        if softcap <= 0:
            raise ValueError(f"fusedce: softcap must be > 0 (or None for no softcap), got {softcap}")
    _check_finite(logit_scale, "logit_scale")


def _check_target(target, leading: torch.Size, ref: torch.Tensor, ref_name: str):
    _check_tensor(target, "target")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"fusedce: target must hold int64 or int32 class indices, got {target.dtype}")
    if target.shape != leading:
        raise ValueError(
            f"fusedce: target must have shape {tuple(leading)} (the leading dimensions of "
            f"{ref_name}), got {tuple(target.shape)}"
        )
    _check_device(target, "target", ref, ref_name)


def _check_class_weight(weight, vocab: int, ref: torch.Tensor, ref_name: str):
    if weight is None:
        return
    _check_tensor(weight, "weight")
    _check_float(weight, "weight")
    if weight.shape != (vocab,):
        raise ValueError(f"fusedce: weight (class weights) must have shape ({vocab},), got {tuple(weight.shape)}")
    _check_device(weight, "weight", ref, ref_name)
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("fusedce: weight (class weights) cannot require grad: the loss is not differentiated with respect to it")


def _check_head(input, linear_weight, linear_bias, input_name="input", weight_name="linear_weight"):
    """input [..., H], linear_weight [V, H], linear_bias [V]: returns (V, H)."""
    _check_tensor(input, input_name)
    _check_tensor(linear_weight, weight_name)
    _check_float(input, input_name)
    _check_float(linear_weight, weight_name)
    if input.dim() < 1:
        raise ValueError(f"fusedce: {input_name} must have shape [..., H], got a 0-d tensor")
    if linear_weight.dim() != 2:
        raise ValueError(f"fusedce: {weight_name} must be 2-D [V, H], got shape {tuple(linear_weight.shape)}")
    V, H = linear_weight.shape
    if input.shape[-1] != H:
        raise ValueError(
            f"fusedce: {input_name} has hidden size {input.shape[-1]} but {weight_name} is "
            f"{tuple(linear_weight.shape)} (expected [V, {input.shape[-1]}])"
        )
    if V == 0:
        raise ValueError(f"fusedce: {weight_name} must have at least one row (V > 0)")
    if input.dtype != linear_weight.dtype:
        raise TypeError(f"fusedce: {input_name} is {input.dtype} but {weight_name} is {linear_weight.dtype}; they must match")
    _check_device(linear_weight, weight_name, input, input_name)
    if linear_bias is not None:
        bias_name = weight_name.replace("weight", "bias")
        _check_tensor(linear_bias, bias_name)
        if linear_bias.shape != (V,):
            raise ValueError(f"fusedce: {bias_name} must have shape ({V},), got {tuple(linear_bias.shape)}")
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"fusedce: {bias_name} is {linear_bias.dtype} but {input_name} is {input.dtype}")
        _check_device(linear_bias, bias_name, input, input_name)
    return V, H


def _check_num_items(num_items_in_batch):
    if num_items_in_batch is None:
        return
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"fusedce: num_items_in_batch must be a single number, got shape {tuple(num_items_in_batch.shape)}"
            )
        # A CUDA value is not read back (that would synchronize); a CPU one is checked.
        if num_items_in_batch.device.type == "cpu" and not torch.compiler.is_compiling():
            value = num_items_in_batch.item()
        else:
            return
    else:
        value = num_items_in_batch
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"fusedce: num_items_in_batch must be > 0, got {value!r}")


def _check_chunk(value, name: str):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"fusedce: {name} must be a positive int or None, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Reductions, shared by both functions.
# ---------------------------------------------------------------------------------------------


def _shift(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """HF causal shift on the labels: position t predicts t+1, the last position is ignored."""
    if target.dim() == 0 or target.shape[-1] == 0:
        return target
    pad = torch.full_like(target[..., :1], ignore_index)
    return torch.cat([target[..., 1:], pad], dim=-1)


def _token_weights(target: torch.Tensor, ignore_index: int, weight, dtype) -> torch.Tensor:
    """w[t_i] at non-ignored tokens, 0 elsewhere: the weights of the mean's denominator.
    Computed only where needed (mean, statistics): a few small kernels per call otherwise."""
    valid = target != ignore_index
    if weight is None:
        return valid.to(dtype)
    # Clamped: an out-of-range target must reach the op's range check (which names `target`),
    # not fail here as an IndexError of this lookup.
    safe = torch.where(valid, target, torch.zeros_like(target)).clamp(0, weight.shape[0] - 1)
    return weight.to(dtype)[safe] * valid.to(dtype)


def _divisor(num_items_in_batch, like: torch.Tensor):
    if isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch.to(device=like.device, dtype=like.dtype).reshape(())
    return float(num_items_in_batch)


def _stats(loss, lse, predicted, target, ignore_index, weight, z_loss, reduction, num_items, denom,
           shape, entropy=None):
    """The statistics of LossOutput from the per-token values the op returned."""
    valid = target != ignore_index
    tok_w = _token_weights(target, ignore_index, weight, lse.dtype)
    n_valid = valid.sum()
    accuracy = ((predicted == target) & valid).sum().to(lse.dtype) / n_valid.to(lse.dtype)
    z_tok = tok_w * (z_loss * lse * lse)
    if reduction == "none":
        z_part = z_tok.reshape(shape)
    elif num_items is not None:
        z_part = z_tok.sum() / _divisor(num_items, z_tok)
    elif reduction == "sum":
        z_part = z_tok.sum()
    else:
        z_part = z_tok.sum() / denom
    return LossOutput(loss, lse.reshape(shape), predicted.reshape(shape), accuracy, z_part,
                      None if entropy is None else entropy.reshape(shape))


def _sharded(process_group, *tensors) -> bool:
    """Vocab-parallel call: a process group given, or a weight held as a DTensor."""
    if process_group is not None:
        return True
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in tensors if t is not None)


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
    ``fp32_grad_accum`` accumulates the weight gradient in float32 on CUDA (the CPU always does).
    ``entropy_coef`` adds entropy_coef * H (the entropy of the softmax) per non-ignored token,
    reduced like the CE (negative: an entropy bonus). ``return_entropy`` (with ``return_stats``)
    also returns the per-token entropy (``LossOutput.entropy``), from the same pass; plain
    ``return_stats`` keeps the CE's own row kernel.

    Vocab-parallel (fusedce/distributed.py): with ``process_group`` (or a DTensor weight sharded on
    the vocabulary) ``linear_weight`` / ``linear_bias`` / ``weight`` are this rank's vocabulary
    shard starting at global id ``vocab_start`` (None: derived from the shards), ``input`` and
    ``target`` (global ids) are the same on every rank; one collective per chunk.
    ``reduce_grad_input=False`` leaves the input gradient as this rank's partial sum.
    """
    if _sharded(process_group, linear_weight, linear_bias):
        if entropy_coef != 0.0 or return_entropy:
            raise NotImplementedError("fusedce: entropy_coef / return_entropy are not sharded yet "
                                      "(process_group); use token_logprobs(..., return_entropy=True)")
        from . import distributed

        return distributed.linear_cross_entropy(
            input, linear_weight, target, process_group=process_group, vocab_start=vocab_start,
            linear_bias=linear_bias, weight=weight, reduction=reduction,
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, logit_scale=logit_scale, num_items_in_batch=num_items_in_batch,
            shift=shift, return_stats=return_stats, chunk_size=chunk_size,
            vocab_chunk_size=vocab_chunk_size, fp32_grad_accum=fp32_grad_accum,
            low_memory=low_memory, reduce_grad_input=reduce_grad_input,
        )
    V, H = _check_head(input, linear_weight, linear_bias)
    _check_target(target, input.shape[:-1], input, "input")
    _check_class_weight(weight, V, input, "input")
    _check_scalars(reduction, label_smoothing, z_loss, softcap, logit_scale)
    _check_finite(entropy_coef, "entropy_coef")
    _check_num_items(num_items_in_batch)
    _check_chunk(chunk_size, "chunk_size")
    _check_chunk(vocab_chunk_size, "vocab_chunk_size")
    ignore_index = -100 if ignore_index is None else ignore_index
    if low_memory and vocab_chunk_size is None:
        vocab_chunk_size = LOW_MEMORY_VOCAB_TILE

    if shift:
        target = _shift(target, ignore_index)
    shape = target.shape
    hidden = input.reshape(-1, H)
    flat_target = target.reshape(-1)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32

    # The gradient scale of the final scalar is known before the pass: the forward computes the
    # gradients themselves and the backward only multiplies them by the upstream gradient.
    denom = None
    grad_scale = None
    if reduction != "none":
        if num_items_in_batch is not None:
            grad_scale = 1.0 / torch.as_tensor(num_items_in_batch, dtype=acc, device=input.device).reshape(())
        elif reduction == "mean":
            denom = _token_weights(flat_target, ignore_index, weight, acc).sum()
            grad_scale = torch.where(denom > 0, 1.0 / denom, torch.zeros_like(denom))
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
        fp32_grad_accum=bool(fp32_grad_accum), entropy_coef=float(entropy_coef),
        want_entropy=bool(return_stats and return_entropy),
    )
    loss, token_loss, lse, predicted, entropy = out[0], out[1], out[2], out[3], out[4]
    if reduction == "none":
        loss = token_loss.reshape(shape)
    elif denom is not None:
        # An all-ignored (or empty) batch: nan like torch.nn.functional.cross_entropy, zero grads.
        loss = loss + torch.where(denom > 0, torch.zeros_like(denom), torch.full_like(denom, math.nan))
    if not return_stats:
        return loss
    return _stats(loss, lse, predicted, flat_target, ignore_index, weight, z_loss, reduction,
                  num_items_in_batch, denom, shape, entropy if return_entropy else None)


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
):
    """The same terms as :func:`linear_cross_entropy` on given logits ``input`` [..., V].

    One online-softmax pass per row in forward; the backward reads each logit once and writes its
    gradient once. ``inplace_backward=True`` writes that gradient into ``input``'s storage (the
    logits are garbage after backward; no [N, V] allocation). With ``process_group``, ``input`` is
    this rank's vocabulary shard of the logits [..., V_local] (fusedce/distributed.py).
    """
    if _sharded(process_group, input):
        from . import distributed

        return distributed.cross_entropy(
            input, target, process_group=process_group, vocab_start=vocab_start, weight=weight,
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap, logit_scale=logit_scale,
            num_items_in_batch=num_items_in_batch, return_stats=return_stats,
            inplace_backward=inplace_backward,
        )
    _check_tensor(input, "input")
    _check_float(input, "input")
    if input.dim() < 1:
        raise ValueError("fusedce: input (logits) must have shape [..., V], got a 0-d tensor")
    V = input.shape[-1]
    if V == 0:
        raise ValueError("fusedce: input (logits) must have at least one class (V > 0)")
    _check_target(target, input.shape[:-1], input, "input")
    _check_class_weight(weight, V, input, "input")
    _check_scalars(reduction, label_smoothing, z_loss, softcap, logit_scale)
    _check_num_items(num_items_in_batch)
    ignore_index = -100 if ignore_index is None else ignore_index

    shape = target.shape
    logits = input.reshape(-1, V)
    flat_target = target.reshape(-1)
    token_loss, lse, predicted = _ops.cross_entropy(
        logits, flat_target, weight, ignore_index=ignore_index,
        label_smoothing=float(label_smoothing), z_loss=float(z_loss),
        softcap=0.0 if softcap is None else float(softcap), logit_scale=float(logit_scale),
        inplace_backward=bool(inplace_backward),
    )
    denom = None
    if reduction == "none":
        loss = token_loss.reshape(shape)
    elif num_items_in_batch is not None:
        loss = token_loss.sum() / _divisor(num_items_in_batch, token_loss)
    elif reduction == "sum":
        loss = token_loss.sum()
    else:
        denom = _token_weights(flat_target, ignore_index, weight, token_loss.dtype).sum()
        loss = token_loss.sum() / denom
    if not return_stats:
        return loss
    return _stats(loss, lse, predicted, flat_target, ignore_index, weight, z_loss, reduction,
                  num_items_in_batch, denom, shape)
