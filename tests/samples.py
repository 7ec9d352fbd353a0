"""The ONE set of sample inputs, shared by the correctness, gradcheck and opcheck tests.

`sample_inputs(device, dtype, op=...)` yields `(args, kwargs)` for one entry point:

    "linear_cross_entropy"            fusedce.linear_cross_entropy(input, linear_weight, target, ...)
    "cross_entropy"                   fusedce.cross_entropy(logits, target, ...)
    "fusedce::loss"                   torch.ops.fusedce.loss
    "fusedce::loss_backward"          torch.ops.fusedce.loss_backward
    "fusedce::cross_entropy"          torch.ops.fusedce.cross_entropy
    "fusedce::cross_entropy_backward" torch.ops.fusedce.cross_entropy_backward
    "fusedce::cross_entropy_backward_" torch.ops.fusedce.cross_entropy_backward_
    "fusedce::scale_"                 torch.ops.fusedce.scale_ (the backward's in-place scaling of
                                      the forward-computed gradients; scale 1 is its fast exit)
    "fusedce::shard_stats"            torch.ops.fusedce.shard_stats (vocab-parallel partials)
    "fusedce::shard_grad_"            torch.ops.fusedce.shard_grad_ (vocab-parallel in-place gradient)
    "fusedce::shard_partials"         the vocab-parallel term ops (every term beyond the plain CE):
    "fusedce::shard_jsd"              partials of a shard, the JSD's second pass, the merge of the
    "fusedce::shard_finish"           ranks into rows and gradient coefficients, the in-place
    "fusedce::shard_backward_"        gradient

Every entry point sees the same cases (CASES below): the public functions with their own keyword
names, the raw ops with the flattened [N, H] / [N] tensors and the scalars that fusedce/functional.py
would pass them. Each case draws its tensors from its own seeded generator, so a case is the same
tensors in every test and on every run.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from fusedce import reference
from fusedce._op_args import TermOptions


@dataclass(frozen=True)
class Case:
    name: str
    why: str
    lead: tuple = (6,)  # leading dims of input / shape of target
    H: int = 4
    V: int = 7
    bias: bool = False
    class_weight: bool = False
    ignored: str = "none"  # "none" | "some" | "all": which targets are ignore_index
    target_dtype: torch.dtype = torch.int64
    noncontiguous: bool = False
    num_items: str | None = None  # None | "int" | "tensor"
    kwargs: dict = field(default_factory=dict)  # the remaining public keyword arguments


CASES = [
    Case("mean", "the default training call: gradients scaled by 1/(number of tokens)"),
    Case("sum", "gradients of the sum: no denominator", kwargs=dict(reduction="sum")),
    Case("none", "per-token losses: backward recomputes with the upstream gradient",
         kwargs=dict(reduction="none")),
    Case("bias_some_ignored", "bias gradient; ignored rows add nothing and leave the count",
         bias=True, ignored="some"),
    Case("all_ignored_mean", "0/0: NaN loss and zero gradients, like F.cross_entropy",
         ignored="all"),
    Case("all_ignored_sum", "nothing to sum: loss 0", ignored="all", kwargs=dict(reduction="sum")),
    Case("ignore_index_is_a_class", "an ignore_index inside [0, V) must still mean 'ignored'",
         ignored="some", kwargs=dict(ignore_index=0)),
    Case("label_smoothing", "the smoothing term touches every class of every row",
         kwargs=dict(label_smoothing=0.1)),
    Case("class_weight", "weighted CE; the mean divides by the sum of target weights",
         class_weight=True, ignored="some"),
    Case("class_weight_label_smoothing", "torch weights the smoothing term by w[c] per class",
         class_weight=True, ignored="some", kwargs=dict(label_smoothing=0.2)),
    Case("z_loss", "z_loss * lse^2 and its gradient 2 * z_loss * lse * p",
         kwargs=dict(z_loss=1e-1)),
    Case("softcap", "tanh cap small enough to bend the logits (|z| ~ 1)",
         kwargs=dict(softcap=1.5)),
    Case("logit_scale", "a scale other than 1 (Granite / Cohere)", kwargs=dict(logit_scale=0.5)),
    Case("scale_softcap_z_loss", "the order scale -> softcap, and z-loss on the capped logits",
         class_weight=True, ignored="some",
         kwargs=dict(logit_scale=2.0, softcap=3.0, z_loss=1e-2, label_smoothing=0.05)),
    Case("num_items_int", "HF gradient accumulation: sum / num_items_in_batch (a Python int)",
         ignored="some", num_items="int"),
    Case("num_items_tensor", "num_items_in_batch as a tensor, as HF Trainer passes it",
         ignored="some", num_items="tensor", kwargs=dict(reduction="sum")),
    Case("leading_dims", "input [B, T, H] with target [B, T]", lead=(2, 3)),
    Case("shift", "HF causal shift of the labels: the last position of each row is ignored",
         lead=(2, 4), kwargs=dict(shift=True)),
    Case("int32_target", "int32 targets are accepted as well as int64", ignored="some",
         target_dtype=torch.int32),
    Case("empty_mean", "N = 0: NaN like F.cross_entropy, empty gradients", lead=(0,)),
    Case("empty_sum", "N = 0 summed: 0", lead=(0,), kwargs=dict(reduction="sum")),
    Case("chunk_1", "one token per chunk: every row is its own chunk", lead=(5,),
         kwargs=dict(chunk_size=1)),
    Case("chunk_3", "chunks of 3 over 8 tokens: a partial last chunk", lead=(8,), bias=True,
         kwargs=dict(chunk_size=3, reduction="none")),
    Case("vocab_tiles", "vocabulary tiles of 3 over V = 13: online merge across tiles, partial tile",
         V=13, bias=True, class_weight=True, ignored="some",
         kwargs=dict(vocab_chunk_size=3, label_smoothing=0.1, softcap=2.0, z_loss=1e-2)),
    Case("vocab_tiles_none", "vocabulary tiles in the recomputing backward (reduction='none')",
         V=13, kwargs=dict(vocab_chunk_size=4, chunk_size=2, reduction="none")),
    Case("fp32_grad_accum", "grad_weight accumulated in float32 across chunks",
         lead=(7,), bias=True, kwargs=dict(chunk_size=2, fp32_grad_accum=True, reduction="sum")),
    Case("noncontiguous", "strided input and a transposed weight view (copied or handled)",
         bias=True, class_weight=True, noncontiguous=True, ignored="some",
         kwargs=dict(label_smoothing=0.1)),
    Case("everything", "every option at once", lead=(3, 3), H=5, V=11, bias=True,
         class_weight=True, ignored="some",
         kwargs=dict(label_smoothing=0.1, z_loss=1e-2, softcap=4.0, logit_scale=0.7, shift=True,
                     chunk_size=2, reduction="mean")),
]
CASE_NAMES = [c.name for c in CASES]

# Keyword arguments that choose how the result is computed, not what it is.
IMPLEMENTATION_KWARGS = ("chunk_size", "vocab_chunk_size", "fp32_grad_accum", "low_memory", "return_stats",
                         "memory_budget")
# Keyword arguments only the fused linear function has.
LINEAR_ONLY_KWARGS = ("linear_bias", "shift", "chunk_size", "vocab_chunk_size", "fp32_grad_accum", "low_memory",
                      "memory_budget")


def semantic_kwargs(kwargs: dict) -> dict:
    """The kwargs that define the value (what reference.py takes)."""
    return {k: v for k, v in kwargs.items() if k not in IMPLEMENTATION_KWARGS}


def _build(case: Case, device, dtype, requires_grad: bool):
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    lead, H, V = case.lead, case.H, case.V

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    x = randn(*lead, H)
    w = randn(V, H, std=H**-0.5)  # logits ~ N(0, 1): softmax neither flat nor one-hot
    if case.noncontiguous:
        x = torch.cat([x, randn(*lead, H)], dim=-1)[..., ::2]  # every other column
        w = w.t().contiguous().t()  # column-major [V, H]
        assert not x.is_contiguous() or x.numel() == 0
        assert not w.is_contiguous()
    x, w = x.to(device), w.to(device)
    ignore_index = case.kwargs.get("ignore_index", -100)
    t = torch.randint(0, V, lead, generator=g)
    if case.ignored == "some":
        drop = torch.rand(lead, generator=g) < 0.3
        drop.view(-1)[:1] = True  # at least one, and (V > 1, N > 2) at least one kept
        drop.view(-1)[-1:] = False
        t = torch.where(drop, torch.full_like(t, ignore_index), t)
    elif case.ignored == "all":
        t = torch.full_like(t, ignore_index)
    t = t.to(case.target_dtype).to(device)

    kwargs = dict(case.kwargs)
    if case.bias:
        kwargs["linear_bias"] = randn(V).to(device)
    if case.class_weight:
        kwargs["weight"] = (torch.rand(V, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(device)
    if case.num_items == "int":
        kwargs["num_items_in_batch"] = 11  # > the tokens here: other micro-batches hold the rest
    elif case.num_items == "tensor":
        kwargs["num_items_in_batch"] = torch.tensor(11, device=device)
    if requires_grad:
        x.requires_grad_(True)
        w.requires_grad_(True)
        if case.bias:
            kwargs["linear_bias"].requires_grad_(True)
    return (x, w, t), kwargs


def _as_cross_entropy(args, kwargs, requires_grad):
    """The same case on materialized logits (float64 matmul, then rounded to the dtype)."""
    x, w, t = args
    b = kwargs.get("linear_bias")
    logits = torch.nn.functional.linear(
        x.detach().double(), w.detach().double(), None if b is None else b.detach().double()
    ).to(x.dtype)
    if kwargs.get("shift"):
        t = reference.shift_labels(t, kwargs.get("ignore_index", -100))
    ce_kwargs = {k: v for k, v in kwargs.items() if k not in LINEAR_ONLY_KWARGS}
    return (logits.requires_grad_(requires_grad), t), ce_kwargs


def _scalars(kwargs):
    softcap = kwargs.get("softcap")
    return dict(
        ignore_index=kwargs.get("ignore_index", -100),
        label_smoothing=float(kwargs.get("label_smoothing", 0.0)),
        z_loss=float(kwargs.get("z_loss", 0.0)),
        softcap=0.0 if softcap is None else float(softcap),
        logit_scale=float(kwargs.get("logit_scale", 1.0)),
    )


def _flat(args, kwargs):
    """[..., H] / [...] -> [N, H] / [N], with the causal shift applied to the labels."""
    x, w, t = args
    if kwargs.get("shift"):
        t = reference.shift_labels(t, kwargs.get("ignore_index", -100))
    return x.reshape(-1, x.shape[-1]), w, t.reshape(-1)


def _grad_scale(args, kwargs):
    """What functional.py passes as (grad_scale, mean): 1/num_items_in_batch when given, the op's
    own mean (mean=True) for a plain mean, nothing for a sum."""
    x = args[0]
    num_items = kwargs.get("num_items_in_batch")
    reduction = kwargs.get("reduction", "mean")
    if reduction == "none" or num_items is None:
        return None, reduction == "mean"
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.tensor(1.0 / float(num_items), dtype=acc, device=x.device), False


def mean_denominator(target, class_weight, ignore_index, V):
    """The denominator of `loss`'s mean=True, in float64 on the CPU: the sum of the class weights of
    the non-ignored targets (1 each without class weights)."""
    t = target.long().cpu()
    valid = t != ignore_index
    if class_weight is None:
        return float(valid.sum())
    return float(class_weight.double().cpu()[t[valid]].sum())


def _raw_lse(args, kwargs):
    """The lse that the forward op saves for the backward (from the reference, in the dtype of
    the token loss)."""
    x, w, t = args
    ref = reference.linear_cross_entropy(
        x.detach(), w.detach(), t, linear_bias=None if kwargs.get("linear_bias") is None
        else kwargs["linear_bias"].detach(), **semantic_kwargs(
            {k: v for k, v in kwargs.items() if k not in ("linear_bias", "num_items_in_batch")}))
    return ref.lse.reshape(-1)


def _as_raw(op, args, kwargs, requires_grad, g):
    x, w, t = _flat(args, kwargs)
    b, cw = kwargs.get("linear_bias"), kwargs.get("weight")
    scalars = _scalars(kwargs)
    tiles = dict(chunk_size=kwargs.get("chunk_size") or 0,
                 vocab_chunk_size=kwargs.get("vocab_chunk_size") or 0,
                 fp32_grad_accum=bool(kwargs.get("fp32_grad_accum", False)))
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    N = t.shape[0]
    if op == "fusedce::loss":
        mask = [requires_grad, requires_grad, requires_grad and b is not None]
        grad_scale, mean = _grad_scale(args, kwargs)
        return (x, w, t), dict(bias=b, class_weight=cw, grad_scale=grad_scale, mean=mean,
                               grad_mask=mask, **scalars, **tiles)
    if op == "fusedce::loss_backward":
        lse = _raw_lse(args, kwargs).to(acc)
        grad_tok = torch.randn(N, generator=g, dtype=torch.float64).to(acc).to(x.device)
        grad_lse = torch.randn(N, generator=g, dtype=torch.float64).to(acc).to(x.device)
        x, w = x.detach(), w.detach()
        b = None if b is None else b.detach()
        return (x, w, t, b, cw, lse, grad_tok), dict(
            grad_lse=grad_lse, grad_mask=[True, True, b is not None], **scalars, **tiles)
    if op == "fusedce::scale_":
        # The [V, H] gradient buffer and the upstream gradient: exactly 1 (plain loss.backward(),
        # the kernel's no-op exit) in about half of the cases, a random value otherwise.
        value = float(torch.rand((), generator=g, dtype=torch.float64)) + 0.5
        if torch.rand((), generator=g) < 0.5:
            value = 1.0
        scale_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (w.detach().clone(), torch.tensor(value, dtype=scale_dtype, device=x.device)), {}
    (logits, t), _ = _as_cross_entropy(args, kwargs, requires_grad)
    logits, t = logits.reshape(-1, logits.shape[-1]), t.reshape(-1)
    if op == "fusedce::cross_entropy":
        # mean as functional.cross_entropy passes it: the op's own for a plain mean
        return (logits, t), dict(class_weight=cw, mean=_grad_scale(args, kwargs)[1], **scalars)
    lse = _raw_lse(args, kwargs).to(acc)
    grad_tok = torch.randn(N, generator=g, dtype=torch.float64).to(acc).to(x.device)
    grad_lse = torch.randn(N, generator=g, dtype=torch.float64).to(acc).to(x.device)
    if op in ("fusedce::cross_entropy_backward", "fusedce::cross_entropy_backward_"):
        return (logits.detach().clone(), t, cw, lse, grad_tok), dict(grad_lse=grad_lse, **scalars)
    if op in ("fusedce::shard_stats", "fusedce::shard_grad_"):
        # The vocab-parallel blocks on the last two thirds of the vocabulary (a shard at an offset,
        # owning some targets and not others); the scalars they take.
        v0 = logits.shape[-1] // 3
        shard = logits.detach()[:, v0:].contiguous()
        cws = None if cw is None else cw[v0:]
        knobs = dict(ignore_index=scalars["ignore_index"], softcap=scalars["softcap"],
                     logit_scale=scalars["logit_scale"])
        if op == "fusedce::shard_stats":
            return (shard, t, v0, cws), knobs
        coef_w = torch.randn(N, generator=g, dtype=torch.float64).to(acc).to(x.device)
        return (shard, t, v0, cws, lse, grad_tok, grad_lse), dict(coef_w=coef_w, **knobs)
    if op in _TERM_SHARD_OPS:
        return _as_term_shard(op, logits.detach(), t, cw, scalars, grad_tok, grad_lse, g)
    raise ValueError(f"unknown op {op!r}")


_TERM_SHARD_OPS = ("fusedce::shard_partials", "fusedce::shard_jsd", "fusedce::shard_finish",
                   "fusedce::shard_backward_")
# Every input a term op reads: the JSD (the teacher's columns and the second pass), the entropy
# term and output, the log-probability and both statistics.
_TERM_SHARD_OPTIONS = TermOptions(entropy_coef=0.1, want_entropy=True, want_logprob=True, distill=3,
                                  distill_temperature=1.5, distill_weight=0.5,
                                  want_mean_logit=True, want_log_sum_sq=True).pack()


def _as_term_shard(op, logits, t, cw, scalars, grad_tok, grad_lse, g):
    """The term ops on two shards of the case's logits ([0, V/3) and the rest, so that the merge
    sees every target in the vocabulary) with a random teacher; the coefficients that
    shard_jsd / shard_backward_ take are those of the case (computed here)."""
    ops = torch.ops.fusedce
    v0 = logits.shape[-1] // 3
    teacher = (torch.randn(logits.shape, generator=g, dtype=torch.float64) * 2).to(logits)
    knobs = dict(ignore_index=scalars["ignore_index"], softcap=scalars["softcap"],
                 logit_scale=scalars["logit_scale"])
    pk = _TERM_SHARD_OPTIONS
    bounds = ((0, v0), (v0, logits.shape[-1]))

    def cols(x, a, b):
        return None if x is None else x[..., a:b].contiguous()

    parts = torch.stack([ops.shard_partials(cols(logits, a, b), t, a, cols(cw, a, b), cols(teacher, a, b),
                                            **knobs, **pk) for a, b in bounds])
    fin = dict(ignore_index=scalars["ignore_index"], label_smoothing=scalars["label_smoothing"],
               z_loss=scalars["z_loss"], **pk)
    _, coefs = ops.shard_finish(parts, t, None, grad_tok, grad_lse, **fin)
    shard, tb, cws = cols(logits, v0, None), cols(teacher, v0, None), cols(cw, v0, None)
    if op == "fusedce::shard_partials":
        return (shard, t, v0, cws, tb), dict(**knobs, **pk)
    jsd_knobs = dict(softcap=scalars["softcap"], logit_scale=scalars["logit_scale"], **pk)
    if op == "fusedce::shard_jsd":
        return (shard, tb, coefs), jsd_knobs
    jsd = sum(ops.shard_jsd(cols(logits, a, b), cols(teacher, a, b), coefs, **jsd_knobs) for a, b in bounds)
    if op == "fusedce::shard_finish":
        return (parts, t, jsd, grad_tok, grad_lse), fin
    _, coefs = ops.shard_finish(parts, t, jsd, grad_tok, grad_lse, **fin)
    return (shard.clone(), t, v0, coefs, cws, tb), dict(**knobs, **pk)


OPS = (
    "linear_cross_entropy",
    "cross_entropy",
    "fusedce::loss",
    "fusedce::loss_backward",
    "fusedce::cross_entropy",
    "fusedce::cross_entropy_backward",
    "fusedce::cross_entropy_backward_",
    "fusedce::scale_",
    "fusedce::shard_stats",
    "fusedce::shard_grad_",
    *_TERM_SHARD_OPS,
)


def sample_inputs(device, dtype, op="linear_cross_entropy", *, requires_grad=False, case=None):
    """Yields (args, kwargs) of every case (or only the case named `case`) for `op`."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; one of {OPS}")
    for c in CASES:
        if case is not None and c.name != case:
            continue
        leaf_grad = requires_grad and op in ("linear_cross_entropy", "fusedce::loss")
        args, kwargs = _build(c, device, dtype, leaf_grad)
        if op == "linear_cross_entropy":
            yield args, kwargs
        elif op == "cross_entropy":
            yield _as_cross_entropy(args, kwargs, requires_grad)
        else:
            g = torch.Generator().manual_seed(zlib.crc32(c.name.encode()) + 1)
            yield _as_raw(op, args, kwargs, requires_grad, g)


def sample(device, dtype, case, op="linear_cross_entropy", *, requires_grad=False):
    """The (args, kwargs) of one named case."""
    (found,) = list(sample_inputs(device, dtype, op, requires_grad=requires_grad, case=case))
    return found
