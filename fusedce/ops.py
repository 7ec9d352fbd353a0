"""Fake kernels and autograd formulas of the C++ ops (schemas: csrc/fusedce.cpp). Nothing else."""

from __future__ import annotations

import threading

import torch
from torch.library import register_autograd, register_fake

from . import _op_args
from ._extension import load_extension
from ._shared import _as

_ops = torch.ops.fusedce


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_grad(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def _fake_grads(hidden, weight, bias, grad_mask, dtype=None):
    """(grad_hidden, grad_weight, grad_bias): full size where requested (in `dtype`, default the
    input's), else empty in the input's dtype (as the ops)."""
    def full(x):
        return x.new_empty(x.shape, dtype=dtype or x.dtype)

    grad_hidden = full(hidden) if grad_mask[0] else _empty_grad(hidden)
    grad_weight = full(weight) if grad_mask[1] else _empty_grad(weight)
    if bias is None:
        return grad_hidden, grad_weight, _empty_grad(hidden)
    return grad_hidden, grad_weight, full(bias) if grad_mask[2] else _empty_grad(bias)


def _precomputed_dtype(dtype: torch.dtype):
    """The dtype of the gradients `loss` computes in its forward: float32 for float16 inputs.
    They are the gradients before the upstream gradient (a GradScaler loss scale) is known, so a
    mean's 1/N would push them into fp16's subnormals; the backward scales them in float32 and
    rounds to float16 once. Other dtypes: the input's (bfloat16 has float32's exponent range)."""
    return torch.float32 if dtype == torch.float16 else None


# --------------------------------------------------------------------------------------------
# fusedce::loss
# --------------------------------------------------------------------------------------------


# The argument names of `loss` and `loss_backward` in schema order. setup_context and the backward
# read and pass the arguments by position (no per-call name lookup); the import-time check below
# makes a schema change fail loudly here instead of shifting an argument.
_CE_KNOBS = ("ignore_index", "label_smoothing", "z_loss", "softcap", "logit_scale")
_CHUNK_KNOBS = ("chunk_size", "vocab_chunk_size", "fp32_grad_accum")
_TERM_ARGS = (*_op_args.TENSOR_NAMES, "term_floats", "term_ints")
_LOSS_ARGS = ("hidden", "weight", "target", "bias", "class_weight", "grad_scale", *_CE_KNOBS,
              "grad_mask", *_CHUNK_KNOBS, "mean", *_TERM_ARGS)
_LOSS_BACKWARD_ARGS = ("hidden", "weight", "target", "bias", "class_weight", "lse",
                       "grad_token_loss", "grad_lse", "grad_entropy", "grad_logprob", *_CE_KNOBS,
                       "grad_mask", *_CHUNK_KNOBS, *_TERM_ARGS)
_CROSS_ENTROPY_ARGS = ("logits", "target", "class_weight", *_CE_KNOBS, "inplace_backward", "mean")
_CROSS_ENTROPY_BACKWARD_ARGS = ("logits", "target", "class_weight", "lse", "grad_token_loss",
                                "grad_lse", *_CE_KNOBS)


def _check_schemas():
    _op_args.check_layout(load_extension().term_layout())
    for op, names in ((_ops.loss, _LOSS_ARGS), (_ops.loss_backward, _LOSS_BACKWARD_ARGS),
                      (_ops.cross_entropy, _CROSS_ENTROPY_ARGS),
                      (_ops.cross_entropy_backward, _CROSS_ENTROPY_BACKWARD_ARGS),
                      (_ops.cross_entropy_backward_, _CROSS_ENTROPY_BACKWARD_ARGS)):
        schema_names = tuple(a.name for a in op.default._schema.arguments)
        if schema_names != names:
            raise ImportError(f"fusedce: fusedce/ops.py expects {op} to take {names}, the compiled "
                              f"schema has {schema_names}; rebuild fusedce._C")


_check_schemas()
_N_LOSS_ARGS = len(_LOSS_ARGS)


def _flag(term_ints, index: int) -> bool:
    return bool(term_ints[index]) if term_ints else bool(_op_args.INT_DEFAULTS[index])


@register_fake("fusedce::loss")
def _loss_fake(hidden, weight, target, bias=None, class_weight=None, grad_scale=None,
               ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=0.0, logit_scale=1.0,
               grad_mask=(False, False, False), chunk_size=0, vocab_chunk_size=0,
               fp32_grad_accum=False, mean=False, teacher_logits=None, teacher_hidden=None,
               teacher_weight=None, teacher_bias=None, old_logprobs=None, advantages=None,
               ref_logprobs=None, policy_weights=None, entropy_weights=None, term_floats=(),
               term_ints=()):
    if mean and grad_scale is not None:  # as the op (csrc/checks.h), also under tracing
        raise RuntimeError("fusedce: loss takes either mean=True or a grad_scale, not both")
    opts = _op_args.TermOptions.unpack(term_floats, term_ints)  # checks the lengths, as the op
    n = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    return (
        hidden.new_empty((), dtype=acc),
        hidden.new_empty((n,), dtype=acc),
        hidden.new_empty((n,), dtype=acc),
        hidden.new_empty((n,), dtype=torch.long),
        hidden.new_empty((n if opts.want_entropy else 0,), dtype=acc),
        hidden.new_empty((n if opts.want_logprob else 0,), dtype=acc),
        *_fake_grads(hidden, weight, bias, grad_mask, _precomputed_dtype(hidden.dtype)),
        hidden.new_empty((n if opts.want_mean_logit else 0,), dtype=acc),
        hidden.new_empty((n if opts.want_log_sum_sq else 0,), dtype=acc),
    )


@register_fake("fusedce::loss_backward")
def _loss_backward_fake(hidden, weight, target, bias, class_weight, lse, grad_token_loss,
                        grad_lse=None, grad_entropy=None, grad_logprob=None, ignore_index=-100,
                        label_smoothing=0.0, z_loss=0.0, softcap=0.0, logit_scale=1.0,
                        grad_mask=(True, True, True), chunk_size=0, vocab_chunk_size=0,
                        fp32_grad_accum=False, teacher_logits=None, teacher_hidden=None,
                        teacher_weight=None, teacher_bias=None, old_logprobs=None,
                        advantages=None, ref_logprobs=None, policy_weights=None,
                        entropy_weights=None, term_floats=(), term_ints=()):
    _op_args.TermOptions.unpack(term_floats, term_ints)  # checks the lengths, as the op
    return _fake_grads(hidden, weight, bias, grad_mask)


def _loss_setup_context(ctx, inputs, output):
    # inputs: every argument of `loss`, in _LOSS_ARGS order (defaults filled in).
    hidden, weight, target, bias, class_weight, grad_scale = inputs[:6]
    grad_mask = inputs[11]
    ctx.mean = inputs[15]
    term_tensors = inputs[16:16 + len(_op_args.TENSOR_NAMES)]
    term_ints = inputs[-1]
    (loss, token_loss, lse, predicted, entropy, logprob,
     grad_hidden, grad_weight, grad_bias, mean_logit, log_sum_sq_prob) = output
    ctx.set_materialize_grads(False)
    # mean_logit / log_sum_sq_prob are metrics (TRL marks them non-differentiable as well).
    ctx.mark_non_differentiable(grad_hidden, grad_weight, grad_bias, mean_logit, log_sum_sq_prob)
    # With gradients computed in the forward (grad_mask), the backward of `loss` only scales them;
    # gradients flowing into token_loss, lse, entropy or logprob (statistics used in a further
    # loss term) are still exact, through the recomputing loss_backward.
    ctx.grad_mask = tuple(grad_mask)
    ctx.precomputed = any(ctx.grad_mask)
    ctx.has_bias = bias is not None
    # loss_backward's arguments after the gradients, except grad_mask and the term tensors:
    # (ignore_index .. logit_scale), (chunk_size .. fp32_grad_accum), term_floats, term_ints.
    ctx.ce_knobs = inputs[6:11]
    ctx.chunk_knobs = inputs[12:15]
    ctx.term_lists = inputs[-2:]
    ctx.want_entropy = _flag(term_ints, _op_args.WANT_ENTROPY)
    ctx.want_logprob = _flag(term_ints, _op_args.WANT_LOGPROB)
    ctx.consumed = False
    ctx.allow_cell = second_backward_cell()
    ctx.save_for_backward(hidden, weight, target, bias, class_weight, grad_scale, lse,
                          *term_tensors, grad_hidden, grad_weight, grad_bias)


# Devices whose backend implements fusedce::scale_ (skips the multiply when the upstream gradient
# is exactly 1, as after a plain loss.backward(), without a host synchronization).
_SCALE_DEVICES = {
    d for d in ("cpu", "cuda") if torch._C._dispatch_has_kernel_for_dispatch_key("fusedce::scale_", d.upper())
}


@register_fake("fusedce::shard_stats")
def _shard_stats_fake(logits, target, vocab_start, class_weight=None, ignore_index=-100,
                      softcap=0.0, logit_scale=1.0):
    return logits.new_empty((logits.shape[0], 6), dtype=_acc_dtype(logits.dtype))


@register_fake("fusedce::shard_grad_")
def _shard_grad_fake(logits, target, vocab_start, class_weight, lse, coef_p, coef_t, coef_w=None,
                     ignore_index=-100, softcap=0.0, logit_scale=1.0):
    return None


# Column counts of the vocab-parallel term ops' packed tensors (csrc/shard_layout.h).
_SHARD_LAYOUT = load_extension().shard_layout()
_N_PARTS = _SHARD_LAYOUT["parts"]["kParts"]
_N_ROWS = _SHARD_LAYOUT["rows"]["kRows"]
_N_COEFS = _SHARD_LAYOUT["coefs"]["kCoefs"]


@register_fake("fusedce::shard_partials")
def _shard_partials_fake(logits, target, vocab_start, class_weight=None, teacher_logits=None,
                         ignore_index=-100, softcap=0.0, logit_scale=1.0, term_floats=(), term_ints=()):
    return logits.new_empty((logits.shape[0], _N_PARTS), dtype=_acc_dtype(logits.dtype))


@register_fake("fusedce::shard_jsd")
def _shard_jsd_fake(logits, teacher_logits, coefs, softcap=0.0, logit_scale=1.0, term_floats=(),
                    term_ints=()):
    return logits.new_empty((logits.shape[0], 2), dtype=_acc_dtype(logits.dtype))


@register_fake("fusedce::shard_finish")
def _shard_finish_fake(partials, target, jsd=None, g_token_loss=None, g_lse=None, g_entropy=None,
                       g_logprob=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                       old_logprobs=None, advantages=None, ref_logprobs=None, policy_weights=None,
                       entropy_weights=None, term_floats=(), term_ints=()):
    n = target.shape[0]
    return partials.new_empty((n, _N_ROWS)), partials.new_empty((n, _N_COEFS))


@register_fake("fusedce::shard_backward_")
def _shard_backward_fake(logits, target, vocab_start, coefs, class_weight=None, teacher_logits=None,
                         ignore_index=-100, softcap=0.0, logit_scale=1.0, term_floats=(), term_ints=()):
    return None


@register_fake("fusedce::scale_")
def _scale_fake(self, scale):
    return None


class _SecondBackward(threading.local):
    """Set by fusedce.allow_second_backward() in the thread that enters it: the precomputed
    gradients are then scaled out of place (one more [V, H] buffer in backward) so that the graph
    can be backpropagated through again. Per thread, so one thread's block does not change what
    another thread's backward does. `cell` is a list so a graph can keep a reference to the cell
    of the thread that built it: a CUDA backward runs on autograd's device thread, not on the
    thread inside the block, and reads the builder's cell."""

    def __init__(self):
        self.cell = [False]


_second_backward = _SecondBackward()


def second_backward_cell() -> list:
    """This thread's allow_second_backward cell ([bool])."""
    return _second_backward.cell


def second_backward_allowed(builder_cell=None) -> bool:
    """Inside allow_second_backward() in this thread, or in the thread that built the graph."""
    return _second_backward.cell[0] or (builder_cell is not None and builder_cell[0])


SECOND_BACKWARD_ERROR = (
    "fusedce: second backward through the same {fn} loss. The gradients were computed in the "
    "forward and used up by the first backward; run the forward again, use reduction='none', or "
    "run the backward passes inside `with fusedce.allow_second_backward():`."
)


def check_not_create_graph(fn: str):
    """A backward called with create_graph=True (grad mode is on inside backward only then) asks
    for gradients that are themselves differentiable: a double backward or a gradient penalty.
    The fused ops compute their gradients without an autograd graph, so refuse it by name rather
    than return a gradient silently detached from the graph (or a zero second derivative)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"fusedce: {fn} does not support create_graph=True (double backward, gradient "
            "penalties, torch.func.hessian): its gradients are not differentiable. Compute that "
            "loss with torch.nn.functional.cross_entropy on materialized logits."
        )


def _batched(g: torch.Tensor) -> bool:
    """An upstream gradient that stands for several: autograd's is_grads_batched (legacy vmap)
    or a functorch transform's wrapper."""
    return (torch._C._functorch.is_legacy_batchedtensor(g)
            or torch._C._functorch.is_functorch_wrapped_tensor(g))


def _scale(grad: torch.Tensor, needed: bool, g: torch.Tensor, dtype: torch.dtype,
           allowed: bool = False):
    """The precomputed `grad` times the upstream gradient `g`, in `dtype`; out of place when a
    second backward is `allowed`."""
    if not needed:
        return None
    # A batched upstream gradient (is_grads_batched=True, jacobian(vectorize=True): the backward
    # runs under vmap) has no batching rule for the in-place and out= products: out of place.
    # Not read while compiling (compiled autograd traces this backward): the traced path below
    # is out of place either way, and dynamo cannot trace functorch's batched-tensor queries
    # (a graph break, an error under fullgraph=True).
    batched = not torch.compiler.is_compiling() and _batched(g)
    if grad.dtype != dtype:
        # float32 gradients of a float16 forward: multiply in float32, round once. Out of place
        # (the float16 result is a new buffer anyway); one fused multiply-and-cast in eager.
        if type(grad) is torch.Tensor and not torch.compiler.is_compiling() and not batched:
            return torch.mul(grad, g.to(grad.device), out=torch.empty_like(grad, dtype=dtype))
        return (grad * g).to(dtype)
    # In eager the precomputed gradient is scaled in place: no second [V, H] buffer. Anything
    # traced (dynamo, AOTAutograd's fake/functional tensors) or a tensor subclass gets the
    # out-of-place product, which tracing handles without mutating a forward output.
    if type(grad) is torch.Tensor and not torch.compiler.is_compiling() and not allowed and not batched:
        if grad.device.type in _SCALE_DEVICES:
            # g.to(device) only when needed: a no-op .to is still a dispatch on every backward
            _ops.scale_(grad, g if g.device == grad.device else g.to(grad.device))
            return grad
        return grad.mul_(g)
    return grad * g


def _mean_grad_scale(target, class_weight, ignore_index: int, V: int, dtype):
    """The gradient scale of `loss` with mean=True (csrc/cuda/kernels/mean.cu): 1 / d, 0 when
    d == 0, d = the sum of class_weight[t] over the non-ignored targets t (1 each without class
    weights, 0 for t outside [0, V)). Only the recomputing backward needs it (the forward's
    gradients already carry it), so a few PyTorch ops here cost nothing on the common path."""
    target = target.long()  # compared as int64, as the kernels do: an int32 target never wraps
    valid = target != ignore_index
    if class_weight is None:
        d = valid.sum(dtype=torch.float64)
    else:
        usable = valid & (target >= 0) & (target < V)
        # rounded to the accumulation dtype first, as the op rounds its class weights, then
        # summed in double as the op sums: the same d to the last bit as the forward's
        w = class_weight.to(dtype).to(torch.float64)[torch.where(usable, target, torch.zeros_like(target))]
        d = (w * usable).sum()
    d = d.to(dtype)
    return torch.where(d != 0, d.reciprocal(), torch.zeros_like(d))


_DISTILL = _op_args.INT_NAMES.index("distill")
_ADVANTAGES = _op_args.TENSOR_NAMES.index("advantages")


def _public_name(term_ints, term_tensors) -> str:
    """The public function whose call made this fusedce::loss, for its error messages (only the
    ones that compute gradients in the forward: a policy or distillation term, or the CE)."""
    if term_tensors[_ADVANTAGES] is not None:
        return "policy_loss"
    if term_ints and term_ints[_DISTILL]:
        return "distillation_loss"
    return "linear_cross_entropy"


def _add(a, b):
    return b if a is None else a if b is None else a + b


def _loss_backward(ctx, grad_loss, grad_token_loss, grad_lse, _g_pred, grad_entropy,
                   grad_logprob, _g_gh, _g_gw, _g_gb, _g_mean_logit=None, _g_log_sum_sq=None):
    check_not_create_graph("the fused head loss (fusedce::loss)")
    saved = ctx.saved_tensors
    hidden, weight, target, bias, class_weight, grad_scale, lse = saved[:7]
    n_terms = len(_op_args.TENSOR_NAMES)
    term_tensors = saved[7:7 + n_terms]
    precomputed = saved[7 + n_terms:]
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[3]]
    # entropy / logprob not requested are empty outputs: a gradient for them carries nothing.
    if not ctx.want_entropy:
        grad_entropy = None
    if not ctx.want_logprob:
        grad_logprob = None
    grads = [None, None, None]
    # The gradients' dtypes (the inputs'); a float16 forward's precomputed ones are float32 and
    # stay so until any recomputed part is added (one rounding to float16, at the end).
    dtypes = [hidden.dtype, weight.dtype, hidden.dtype if bias is None else bias.dtype]
    recompute = any(x is not None for x in (grad_token_loss, grad_lse, grad_entropy, grad_logprob))
    # A gradient needed here that the forward did not compute (its input reported
    # requires_grad=False there, as a torch.vmap batched tensor does) would be dropped by the
    # scaling path: then the whole upstream gradient of `loss` goes through the recomputing pass.
    covered = all(ctx.grad_mask[i] or not need[i] for i in range(3))
    if ctx.precomputed and covered and grad_loss is not None:
        if ctx.consumed:
            raise RuntimeError(SECOND_BACKWARD_ERROR.format(fn=_public_name(ctx.term_lists[1], term_tensors)))
        allowed = second_backward_allowed(ctx.allow_cell)
        ctx.consumed = not allowed
        grads = [_scale(p, ctx.grad_mask[i] and need[i], grad_loss,
                        p.dtype if recompute else dtypes[i], allowed)
                 for i, p in enumerate(precomputed)]
        grad_loss = None  # fully accounted for

    upstream = (grad_loss, grad_token_loss, grad_lse, grad_entropy, grad_logprob)
    if any(g is not None for g in upstream):
        # The exact per-token upstream gradient of the token losses: the part through `loss`
        # (sum_i grad_scale_i * token_loss_i) plus any gradient flowing into token_loss itself.
        g = torch.zeros_like(lse) if grad_token_loss is None else _as(grad_token_loss, lse.dtype)
        if grad_loss is not None:
            if ctx.mean:
                grad_scale = _mean_grad_scale(target, class_weight, ctx.ce_knobs[0], weight.shape[0],
                                              lse.dtype)
            scale = grad_loss if grad_scale is None else grad_loss * grad_scale
            g = g + _as(scale, lse.dtype)

        acc = lse.dtype
        recomputed = _ops.loss_backward(
            hidden, weight, target, bias, class_weight, lse, g, _as(grad_lse, acc),
            _as(grad_entropy, acc), _as(grad_logprob, acc), *ctx.ce_knobs, need, *ctx.chunk_knobs,
            *term_tensors, *ctx.term_lists,
        )
        grads = [_add(a, b) if n else a for a, b, n in zip(grads, recomputed, need)]
        grads = [_as(x, dt) for x, dt in zip(grads, dtypes)]
    gh, gw, gb = grads
    # Gradients flow to the student's hidden, weight and bias only (never to the teacher).
    return (gh, gw, None, gb) + (None,) * (_N_LOSS_ARGS - 4)


register_autograd("fusedce::loss", _loss_backward, setup_context=_loss_setup_context)


# --------------------------------------------------------------------------------------------
# fusedce::cross_entropy
# --------------------------------------------------------------------------------------------


@register_fake("fusedce::cross_entropy")
def _cross_entropy_fake(logits, target, class_weight=None, ignore_index=-100, label_smoothing=0.0,
                        z_loss=0.0, softcap=0.0, logit_scale=1.0, inplace_backward=False,
                        mean=False):
    n = logits.shape[0]
    acc = _acc_dtype(logits.dtype)
    scalar = () if mean else (0,)
    return (
        logits.new_empty((n,), dtype=acc),
        logits.new_empty((n,), dtype=acc),
        logits.new_empty((n,), dtype=torch.long),
        logits.new_empty(scalar, dtype=acc),
        logits.new_empty(scalar, dtype=acc),
    )


@register_fake("fusedce::cross_entropy_backward")
def _cross_entropy_backward_fake(logits, target, class_weight, lse, grad_token_loss,
                                 grad_lse=None, ignore_index=-100, label_smoothing=0.0,
                                 z_loss=0.0, softcap=0.0, logit_scale=1.0):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@register_fake("fusedce::cross_entropy_backward_")
def _cross_entropy_backward_inplace_fake(logits, target, class_weight, lse, grad_token_loss,
                                         grad_lse=None, ignore_index=-100, label_smoothing=0.0,
                                         z_loss=0.0, softcap=0.0, logit_scale=1.0):
    return None


def _may_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of `t` may share memory. torch answers No / Yes (a stride 0) and
    TooHard for any other non-dense layout, which covers both a column slice (distinct elements)
    and sliding windows (unfold, as_strided: shared ones, which torch's own overlap check lets
    through to a silently wrong write). Sorted by stride, each dimension must step past every
    offset the smaller ones reach; otherwise the layout is taken as overlapping."""
    overlap = torch._debug_has_internal_overlap(t)  # 0 No, 1 Yes, 2 TooHard
    if overlap != 2:
        return overlap == 1
    reach = 0
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def _cross_entropy_setup_context(ctx, inputs, output):
    # inputs: every argument of `cross_entropy`, in _CROSS_ENTROPY_ARGS order.
    logits, target, class_weight = inputs[:3]
    token_loss, lse, predicted, loss, grad_scale = output
    ctx.set_materialize_grads(False)
    ctx.inplace = inputs[8]
    ctx.mean = inputs[9]
    ctx.knobs = inputs[3:8]  # the tail of cross_entropy_backward(_)'s arguments, in order
    ctx.save_for_backward(logits, target, class_weight, lse, grad_scale)


def _cross_entropy_backward(ctx, grad_token_loss, grad_lse, _g_pred, grad_loss, _g_scale):
    check_not_create_graph("cross_entropy (fusedce::cross_entropy)")
    logits, target, class_weight, lse, grad_scale = ctx.saved_tensors
    if ctx.mean and grad_loss is not None:  # without mean, loss is an empty placeholder
        # mean=True: loss = sum_i token_loss_i / d, so each token's upstream gradient gains
        # grad_loss / d; a 0-d product expanded (no [N] allocation, the kernels read stride 0).
        g_mean = (_as(grad_loss, lse.dtype) * grad_scale).expand(lse.shape)
        grad_token_loss = (g_mean if grad_token_loss is None
                           else _as(grad_token_loss, lse.dtype) + g_mean)
    if grad_token_loss is None and grad_lse is None:
        return (None,) * 10
    g = torch.zeros_like(lse) if grad_token_loss is None else _as(grad_token_loss, lse.dtype)
    g_lse = _as(grad_lse, lse.dtype)
    # In place only for one upstream gradient: a batched one (is_grads_batched=True, the backward
    # under vmap) asks for several gradients, which the logits' one buffer cannot hold. Nor can
    # logits whose elements share memory (broadcast rows, sliding windows): their gradient differs
    # per element, so it gets a buffer of its own.
    if (ctx.inplace and type(logits) is torch.Tensor and not torch.compiler.is_compiling()
            and not _batched(g) and not _may_overlap(logits)):
        # Overwrites the caller's logits (the documented contract of inplace_backward); the
        # version counter bump makes any other use of them in this graph fail loudly.
        _ops.cross_entropy_backward_(logits, target, class_weight, lse, g, g_lse, *ctx.knobs)
        # A C++ op's in-place write does not bump the version counter by itself; bumping it makes
        # a second backward (or any other saved use of these logits) fail loudly in autograd's
        # saved-tensor check instead of reading gradients as if they were logits.
        torch.autograd.graph.increment_version(logits)
        grad = logits
    else:
        grad = _ops.cross_entropy_backward(logits, target, class_weight, lse, g, g_lse,
                                           *ctx.knobs)
    return (grad,) + (None,) * 9


register_autograd("fusedce::cross_entropy", _cross_entropy_backward,
                  setup_context=_cross_entropy_setup_context)
