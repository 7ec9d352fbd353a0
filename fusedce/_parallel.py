"""The vocab-parallel layer behind the public functions (fusedce.functional, fusedce.terms, and
fusedce.distributed, whose functions default the group to the whole world): the LM head's weight is
sharded over the vocabulary. It imports neither functional nor terms: they check the arguments and
call the entry points at the end of this file.

Every rank holds a contiguous slice [vocab_start, vocab_start + V_local) of the vocabulary
(``linear_weight`` [V_local, H], ``linear_bias`` / class weights [V_local], teacher weight the same
way, or a logits shard [..., V_local]); ``input`` and the targets are the same on every rank and
targets are global vocabulary ids. Shards may be uneven. A DTensor weight sharded on dim 0
(``Shard(0)`` on a 1-D mesh) is accepted: its local shard and the mesh's group are used and the
gradient flows back to the DTensor.

Communication (torch.distributed: gloo on CPU, NCCL on GPU)
-----------------------------------------------------------
Forward: tokens are processed in chunks. Per chunk each rank computes its local logits
(``hidden_chunk @ W_local.T + b_local``, in the input dtype) and the row kernels reduce them to
per-row partials packed in ONE [C, K] tensor, gathered with ONE ``all_gather_single``
(``all_gather_into_tensor``) per chunk. No softmax math is written here. The partials come from
fusedce::shard_stats for the plain CE (its tuned row kernel; gradient by shard_grad_) and from
fusedce::shard_partials for every other term (entropy, log-probs and the token statistics,
distillation, the token-level policy objective; gradient by shard_backward_, JSD by shard_jsd):
the row math of csrc/cpu/terms.h and kernels/terms_kernels.cu split at the per-row scalars
(columns: csrc/shard_layout.h). fusedce::shard_finish merges the ranks' partials as the
single-process kernels merge the tiles of one row and computes every per-row value and gradient
coefficient, for every kind, so both paths compute every term with the same code.

Why a gather rather than all-reduces: the max and the sums combine differently (the sums must be
rescaled by exp(m_rank - m_global)), so an all-reduce formulation needs a MAX all-reduce before the
SUM all-reduce(s) can start (Megatron: 3 all-reduces, max / sum-exp / target logit; Cut
Cross-Entropy 3 + 1; Liger 3). Gathering the raw partials costs one latency for K * C * world
numbers, and K is a handful, so for the chunk sizes used (thousands of rows) it is a few hundred KB:
the collective is latency-bound and one beats three. Every rank then runs the same shard_finish.

Exception, stated plainly: the generalized JSD (``distillation_loss(kind="jsd")``) needs
sum_j m_j log m_j with m = beta r + (1 - beta) q, which depends on both *global* log-sum-exps
element by element and cannot be written from first-pass partials; it takes a second small
collective per chunk (an all-reduce of shard_jsd's [C, 2]). Forward and reverse KL need only one.

Gradients (reduction "mean"/"sum", and the policy loss): the gradient of the final scalar is known
during the forward, so each chunk's d(loss)/d(logits) is formed right away from the global
statistics: grad_weight_local += dlogits.T @ hidden_chunk and grad_bias_local are local (no
collective), the partial grad_input = dlogits @ W_local is summed over ranks by ONE all-reduce in
backward, after being scaled by the upstream gradient (``reduce_grad_input=False`` returns the
partial instead, for a sequence-parallel layout that reduces it itself). Per-token outputs that
carry a gradient (reduction="none", token log-probabilities, the per-token lse) are differentiated
by a recomputing pass in backward: one collective per chunk again, plus the one for grad_input.

Vocabulary offsets: ``vocab_start`` is this rank's first global id. Given, nothing is exchanged
for it (the global V that label smoothing needs travels with the partials). A DTensor weight's
offset follows from its global shape (torch.chunk's layout) without communication. Otherwise the
local sizes are all-gathered once per call: one small setup collective per call, not per chunk,
whose result (the offset) stays on the device: the targets are shifted there (`_local_ids`).
It is not cached, on purpose: any cache key is rank-local (the local size, a tensor's identity), so
a cache could hit on one rank and miss on another (uneven shards: rank 0's V_local of one layout is
rank 1's of another), and the ranks' collectives would stop matching - a hang or a crash.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import ops as _ops_py
from ._checks import check_global_targets, host_target_check
from ._op_args import TermOptions
from ._shared import LossOutput, _count_gradient, _count_needs_grad, _policy_metrics, _policy_parts, _shift

# Transient budget for the [chunk, V_local] float32 buffers (about four of them live per chunk).
_BUDGET_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}


# ---------------------------------------------------------------------------------------------
# Groups, layout, collectives
# ---------------------------------------------------------------------------------------------

def _unwrap(x, group):
    """(local tensor, group, vocab_start or None): a DTensor sharded on dim 0 of a 1-D mesh gives
    its local shard, the mesh's group and its offset (torch.chunk's layout, known locally); a plain
    tensor passes through."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover
        return x, group, None
    if isinstance(x, DTensor):
        mesh = x.device_mesh
        if mesh.ndim != 1 or tuple(x.placements) != (Shard(0),):
            raise ValueError(
                "fusedce.distributed: a DTensor weight must be sharded on the vocabulary dimension "
                f"(placements (Shard(0),) on a 1-D mesh), got {tuple(x.placements)} on a {mesh.ndim}-D mesh"
            )
        local = x.to_local()
        V, world, coord = x.shape[0], mesh.size(), mesh.get_local_rank()
        step = -(-V // world)  # DTensor's Shard(0) splits like torch.chunk
        start = min(coord * step, V)
        if local.shape[0] != min(step, V - start):
            raise ValueError(f"fusedce.distributed: unexpected DTensor shard layout (local {tuple(local.shape)} of {tuple(x.shape)})")
        return local, (mesh.get_group() if group is None else group), start
    return x, group, None


def _unwrap_all(w, group, vocab_start):
    w, group, start = _unwrap(w, group)
    return w, group, (start if vocab_start is None else vocab_start)


def _group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fusedce.distributed: torch.distributed is not initialized")
    group = dist.group.WORLD if group is None else group
    return group, dist.get_rank(group), dist.get_world_size(group)


def _vocab_start(group, rank, world, v_local, device, vocab_start):
    """This rank's first global vocabulary id: given (an int), or from all ranks' local sizes as a
    0-dim int64 tensor on the device (one small all_gather per call, never read on the host: a
    cache keyed by anything rank-local could hit on one rank and miss on another, and the ranks'
    collectives would then no longer match). A tensor offset reaches the row ops through
    `_local_ids`: targets shifted on the device, the ops called at offset 0."""
    if vocab_start is not None:
        return int(vocab_start)
    # torch.full, not torch.tensor: a fill kernel, where a copy from host memory would synchronize
    sizes = _gather(torch.full((1,), v_local, dtype=torch.int64, device=device), group, world)
    return sizes[:rank].sum()


def global_vocab(weight, process_group) -> int:
    """The global vocabulary of a sharded head, read on the host: a DTensor's global shape, else
    the sum of the shards' sizes (one small all-reduce). For the callers that check targets
    against it before the row ops run (preference.py); every rank calls it alike."""
    local, group, start = _unwrap(weight, _group(process_group))
    if start is not None:
        return int(weight.shape[0])
    group, _, _ = _group_info(group)
    n = torch.full((1,), local.shape[0], dtype=torch.int64, device=local.device)
    dist.all_reduce(n, group=group)
    return int(n.item())


def _local_ids(P, tgt, ignore_index):
    """(targets, vocab_start, ignore_index) for the row ops, which use the last two only to find
    the class a row's target is on this shard: as given with an int offset; with a device offset
    (`_vocab_start`), the targets shifted by it, offset 0, and ignored rows marked -1 (a shifted
    valid target may equal ignore_index when ignore_index is a class id; one that equals -1 lies
    outside this shard, as an ignored target does)."""
    if isinstance(P.v0, int):
        return tgt, P.v0, ignore_index
    return torch.where(tgt == ignore_index, torch.full_like(tgt, -1), tgt - P.v0), 0, -1


def _global_ids(P, ids):
    """Adds a device offset (`_vocab_start`) to shard-local class ids (float columns)."""
    return ids if isinstance(P.v0, int) else ids + P.v0.to(ids.dtype)


def _gather(x, group, world):
    """ONE collective: the [C, K] partials of every rank, as [world, C, K]."""
    x = x.contiguous()
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)  # the concatenated form (gloo does not take the stacked one)
    return out.view((world,) + tuple(x.shape))


# ---------------------------------------------------------------------------------------------
# The problem description and the chunk loop
# ---------------------------------------------------------------------------------------------


class _Problem:
    """Everything the chunk loop needs; `kind` is "ce", "lp", "distill" or "policy"."""

    def __init__(self, **kw):
        self.owners = []  # per chunk of the forward's loop: how many ranks own each row's target
        self.__dict__.update(kw)


def _default_chunk(P, n_rows):
    if P.chunk_size:
        return max(1, min(P.chunk_size, max(n_rows, 1)))
    # The row kernels work on the one [C, V_local] logits chunk in the input dtype (as the
    # single-GPU op, which fills the same budget): large chunks, few collectives. Distillation
    # holds the teacher's chunk beside it, in the accumulation dtype.
    src = P.logits if P.logits is not None else P.W
    per_row = max(P.v_local, 1) * src.element_size()
    if P.kind == "distill":
        per_row += max(P.v_local, 1) * (8 if P.acc == torch.float64 else 4)
    budget = _BUDGET_BYTES.get(P.device.type, _BUDGET_BYTES["cpu"])
    return max(1, min(max(n_rows, 1), budget // per_row))


_OUT_DTYPE_MM = [True]


def _mm_acc(a, b, acc):
    """a @ b in the accumulation dtype: a half-precision GEMM with float32 output on CUDA
    (torch.mm(..., out_dtype=), where the installed torch has it), else the GEMM then a cast."""
    if a.dtype in (torch.float16, torch.bfloat16) and a.is_cuda and _OUT_DTYPE_MM[0]:
        try:
            return torch.mm(a, b, out_dtype=acc)
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_MM[0] = False
    return torch.mm(a, b).to(acc)


def _teacher_raw(P, lo, hi):
    """The teacher's local raw logits of rows [lo, hi) in the accumulation dtype."""
    if P.t_logits is not None:
        return P.t_logits[lo:hi].to(P.acc)
    h, W = P.t_hidden[lo:hi], P.t_W
    r = _mm_acc(h.to(W.dtype), W.t(), P.acc)
    return r if P.t_b is None else r + P.t_b.to(P.acc)


def _raw_native(P, lo, hi, writable):
    """Local raw logits of rows [lo, hi) in the input dtype (contiguous); a private copy when the
    gradient will overwrite them and they are the caller's logits."""
    if P.logits is not None:
        x = P.logits[lo:hi]
        return x.clone(memory_format=torch.contiguous_format) if writable else x.contiguous()
    h = P.hidden[lo:hi]
    W = P.W
    if h.dtype != W.dtype:
        h = h.to(W.dtype)
    if P.b is not None:
        return torch.addmm(P.b.to(W.dtype), h, W.t())
    return torch.mm(h, W.t())


def _gather_parts(P, parts):
    """The chunk's ONE gather of the term ops' [C, kParts] partials, as [world, C, kParts]. Their
    kV columns sum to the global vocabulary (kept in P.v_global), which no rank knows alone and
    against which `_check_targets` checks the targets once the loop is done."""
    G = _gather(parts, P.group, P.world)
    P.v_global = G[:, :1, _PART["kV"]].sum(0).to(torch.int64)
    if not getattr(P, "targets_checked", False):
        # How many ranks own each row's target (w_t != 0 where a rank owns it): more than one, or
        # none, means the ranks' [vocab_start, vocab_start + V_local) ranges overlap or leave a gap,
        # which _check_targets reports. Read from the gather every rank holds: no collective, and
        # every rank reaches the same verdict.
        P.owners.append((G[:, :, _PART["kWt"]] != 0).sum(0))
    return G


def _check_targets(P):
    """The single-process op's target range check on the sharded path, against the GLOBAL
    vocabulary, once per call (after the forward's chunk loop: an out-of-range target is owned by
    no rank, so the loop read nothing out of bounds meanwhile). Every rank holds the same targets
    and sizes, so every rank raises the same error and no collective is left unmatched. Where no
    host read is allowed (a default CUDA call, see _checks.host_target_check) the bad rows are
    kept in P.bad instead and `_poison` makes the results NaN, as the single-process kernels do."""
    tgt = P.target
    if P.kind == "policy":
        valid, name, desc = P.kept, "tokens (flattened)", " where mask != 0"
    elif P.kind == "lp":
        valid, name, desc = tgt != -100, "tokens", " and is not -100"
    else:
        valid, name, desc = tgt != P.ignore_index, "target", f" and is not ignore_index ({P.ignore_index})"
    if host_target_check(tgt.device):
        check_global_targets(tgt, P.v_global, valid, 0, name, desc)
    else:
        P.bad = valid & ((tgt < 0) | (tgt >= P.v_global))
    _check_layout(P, tgt, valid, name)


def _check_layout(P, tgt, valid, name):
    """Each in-range target must be owned by exactly one rank: given vocab_start values whose
    ranges overlap (a target on two shards: its logit counted twice) or leave a gap (a target on
    none) would otherwise give a wrong loss silently. A target none owns is only known wrong
    without class weights (a class weight of 0 hides its owner). Ranges in another order than the
    ranks' are a valid tiling. Targets that differ between the ranks (a misuse too) show the same
    way. Host check as _check_targets (else NaN through `_poison`)."""
    owners = getattr(P, "owners", None)
    if not owners or tgt.numel() == 0 or torch.compiler.is_compiling():
        return
    owners = torch.cat(owners)
    P.owners = []  # not kept for the backward
    fixed = valid & (tgt >= 0) & (tgt < P.v_global)
    wrong = owners > 1 if getattr(P, "w", None) is not None else owners != 1
    wrong = fixed & wrong
    if host_target_check(tgt.device):
        if tgt.is_cuda and torch.cuda.is_current_stream_capturing():
            return
        if bool(wrong.any()):
            i = int(wrong.nonzero()[0, 0])
            raise ValueError(
                f"fusedce.distributed: {name}[{i}] = {int(tgt[i])} lies on {int(owners[i])} ranks' "
                "shards: the ranks' ranges [vocab_start, vocab_start + V_local) must cover the "
                "vocabulary without overlap or gap (check vocab_start), and every rank must pass "
                f"the same {name}")
    else:
        P.bad = P.bad | wrong


def _poison(P):
    """NaN where a target was out of range (no host check made), else 0: added to the loss and
    to every gradient, so a reduced loss is NaN and a GradScaler skips the step."""
    bad = getattr(P, "bad", None)
    if bad is None:
        return None
    zero = torch.zeros((), dtype=P.acc, device=bad.device)
    return torch.where(bad.any(), torch.full_like(zero, math.nan), zero)


def _chunk(P, lo, hi, coefs, grads):
    """One chunk: local partials, ONE gather (two collectives for JSD), the per-row outputs, and,
    when `grads` is given, the local gradient contributions with per-row upstream `coefs`."""
    if P.kind == "ce" and not _want_ent(P):
        return _chunk_ce(P, lo, hi, coefs, grads)
    return _chunk_terms(P, lo, hi, coefs, grads)


def _chunk_ce(P, lo, hi, coefs, grads):
    """The plain CE: its partials and its in-place gradient on the tuned CE row kernels
    (fusedce::shard_stats / shard_grad_, one read and one write of the shard's logits in the
    input dtype), the merge and every per-row value in shard_finish, as for the other terms."""
    op = getattr(P, "op", None) or _term_op(P)
    ops = torch.ops.fusedce
    knobs = op["knobs"]
    tgt = P.target[lo:hi]
    lg = _raw_native(P, lo, hi, writable=grads is not None)
    ltgt, v0, lii = _local_ids(P, tgt, P.ignore_index)
    st = ops.shard_stats(lg, ltgt, v0, P.w, ignore_index=lii, softcap=knobs["softcap"],
                         logit_scale=knobs["logit_scale"])
    G = _gather_parts(P, _ce_parts(P, st))
    fin = dict(ignore_index=P.ignore_index, **op["finish"], **op["fwd"])
    if grads is not None:
        fin.update({name: c for name, c in zip(_UPSTREAM["ce"], coefs) if c is not None})
    rows, cf = ops.shard_finish(G, tgt, None, **fin)
    out = _term_outputs(P, rows, tgt, grads is None)
    del out["ent"]  # not computed on this path (no entropy partial)
    if grads is None:
        return out
    c = cf.t().contiguous()  # one row per coefficient: contiguous [C] vectors for shard_grad_
    ops.shard_grad_(lg, ltgt, v0, P.w, c[_COEF["kCoefLse"]], c[_COEF["kCoefP"]], c[_COEF["kCoefT"]],
                    c[_COEF["kCoefW"]], ignore_index=lii, softcap=knobs["softcap"],
                    logit_scale=knobs["logit_scale"])
    _accumulate(P, lo, hi, lg, grads)
    return out


def _ce_parts(P, st):
    """shard_stats' [C, 6] columns (max, sum-exp, sum w z, z_t, w_t, argmax) placed in the term
    ops' [C, kParts] layout, the sums no CE reads left 0 (the teacher's max -inf: no teacher),
    with the shard's class-weight sum and width: what shard_partials would write for the plain CE.
    Slices, not an index list, so that nothing is copied from the host."""
    parts = st.new_zeros((st.shape[0], _PART["kParts"]))
    parts[:, _PART["kM"]:_PART["kS"] + 1] = st[:, 0:2]
    parts[:, _PART["kWz"]:_PART["kArgmax"] + 1] = st[:, 2:6]
    if not isinstance(P.v0, int):
        parts[:, _PART["kArgmax"]] = _global_ids(P, parts[:, _PART["kArgmax"]])
    parts[:, _PART["kMy"]] = -math.inf
    parts[:, _PART["kWsum"]] = P.w.sum().to(st.dtype) if P.w is not None else float(P.v_local)
    parts[:, _PART["kV"]] = float(P.v_local)
    return parts


# Columns of the term ops' packed tensors (csrc/shard_layout.h).
_PART = _ops_py._SHARD_LAYOUT["parts"]
_ROW = _ops_py._SHARD_LAYOUT["rows"]
_COEF = _ops_py._SHARD_LAYOUT["coefs"]
# _ce_parts copies shard_stats' columns as two slices: the layout must keep them adjacent.
assert (_PART["kS"] == _PART["kM"] + 1 and
        [_PART[k] for k in ("kWz", "kZt", "kWt", "kArgmax")] == list(range(_PART["kWz"], _PART["kWz"] + 4))), \
    "csrc/shard_layout.h: kM, kS and kWz, kZt, kWt, kArgmax must stay adjacent (fusedce._parallel._ce_parts)"
# The term ops' upstream arguments, in the order of each kind's differentiable rows (_row_names).
_UPSTREAM = {"ce": ("g_token_loss", "g_lse", "g_entropy"), "lp": ("g_logprob", "g_entropy"),
             "distill": ("g_token_loss",), "policy": ("g_token_loss",)}
_DISTILL = {"forward_kl": 1, "reverse_kl": 2, "jsd": 3}
_POLICY_KIND = {"cispo": 1, "sapo": 2}  # every other token-level type: 0, the clipped form
# The ignore marker of the policy's masked tokens: the one int64 no vocabulary reaches (as the
# single-process policy_loss), so that a kept token of any other value is a class id to check.
_MASKED = torch.iinfo(torch.int64).min


def _term_op(P):
    """The term ops' arguments of the call, built once: the same TermOptions as the
    single-process call of fusedce.functional / fusedce.terms for the same kind."""
    k = P.kind
    cap, scale = getattr(P, "softcap", None), float(getattr(P, "logit_scale", 1.0))
    softcap = 0.0 if cap is None else float(cap)
    rows = {}
    if k in ("lp", "policy"):
        # the temperature folds into both head knobs, as fusedce.terms._head_knobs does
        T = P.temperature
        softcap, scale = softcap / T, scale / T
    if k == "ce":
        opts = TermOptions(entropy_coef=float(getattr(P, "entropy_coef", 0.0)),
                           want_entropy=bool(getattr(P, "want_entropy", False)))
        stats = opts
    elif k == "lp":
        opts = TermOptions(ce_weight=0.0, want_entropy=True, want_logprob=True)
        want = getattr(P, "stats", ())
        # the metrics have no gradient: asked in the forward only
        stats = opts._replace(want_mean_logit="mean_logits" in want,
                              want_log_sum_sq="log_sum_sq_probs" in want)
    elif k == "distill":
        opts = stats = TermOptions(
            ce_weight=P.ce_weight, entropy_coef=P.entropy_coef, distill=_DISTILL[P.dkind],
            distill_weight=P.distill_weight, distill_beta=P.beta, distill_temperature=P.temperature)
    else:
        opts = stats = TermOptions(
            ce_weight=0.0, want_entropy=True, want_logprob=True, entropy_coef=-P.entropy_coef,
            epsilon_low=P.eps_low, epsilon_high=P.eps_high, kl_beta=P.beta,
            policy_kind=_POLICY_KIND.get(P.loss_type, 0),
            policy_delta=0.0 if P.delta is None else float(P.delta), kl_bias_correction=bool(P.bias_kl),
            sapo_temperature_pos=float(P.sapo[0]), sapo_temperature_neg=float(P.sapo[1]))
        rows = dict(old_logprobs=P.old, advantages=P.adv, ref_logprobs=P.ref if P.beta != 0.0 else None,
                    policy_weights=P.pw, entropy_weights=P.ent_w)
    P.op = dict(knobs=dict(ignore_index=P.ignore_index, softcap=softcap, logit_scale=scale),
                fwd=stats.pack(), bwd=opts.pack(),
                finish=dict(label_smoothing=float(getattr(P, "label_smoothing", 0.0)),
                            z_loss=float(getattr(P, "z_loss", 0.0))),
                rows={name: t for name, t in rows.items() if t is not None},
                jsd=opts.distill == 3)
    return P.op


def _chunk_terms(P, lo, hi, coefs, grads):
    """Every term beyond the plain CE on the term ops (csrc/cpu/terms.h, kernels/terms_kernels.cu):
    shard_partials on the rank's logits, ONE gather of the partials, shard_finish (the merge and
    every per-row value, the same on every rank), shard_backward_ in place for a gradient; the
    JSD adds shard_jsd and one all-reduce between two finishes."""
    op = getattr(P, "op", None) or _term_op(P)
    ops = torch.ops.fusedce
    knobs = op["knobs"]
    packed = op["fwd"] if grads is None else op["bwd"]
    tgt = P.target[lo:hi]
    lg = _raw_native(P, lo, hi, writable=grads is not None)
    tb = _teacher_raw(P, lo, hi) if P.kind == "distill" else None
    ltgt, v0, lii = _local_ids(P, tgt, knobs["ignore_index"])
    lknobs = dict(knobs, ignore_index=lii)
    parts = ops.shard_partials(lg, ltgt, v0, getattr(P, "w", None), tb, **lknobs, **packed)
    if not isinstance(P.v0, int):
        parts[:, _PART["kArgmax"]] = _global_ids(P, parts[:, _PART["kArgmax"]])
    G = _gather_parts(P, parts)
    fin = dict(ignore_index=knobs["ignore_index"], **op["finish"],
               **{name: t[lo:hi] for name, t in op["rows"].items()}, **packed)
    if grads is not None:
        fin.update({name: c for name, c in zip(_UPSTREAM[P.kind], coefs) if c is not None})
    rows, cf = ops.shard_finish(G, tgt, None, **fin)
    if op["jsd"]:
        jsd = ops.shard_jsd(lg, tb, cf, softcap=knobs["softcap"], logit_scale=knobs["logit_scale"], **packed)
        dist.all_reduce(jsd, group=P.group)  # the JSD's second collective (see the module doc)
        rows, cf = ops.shard_finish(G, tgt, jsd, **fin)
    out = _term_outputs(P, rows, tgt, grads is None)
    if grads is None:
        return out
    ops.shard_backward_(lg, ltgt, v0, cf, getattr(P, "w", None), tb, **lknobs, **packed)
    _accumulate(P, lo, hi, lg, grads)
    return out


def _term_outputs(P, rows, tgt, forward):
    """The kind's per-row outputs from shard_finish's rows."""
    col = {name: rows[:, _ROW[key]] for name, key in (
        ("token_loss", "kTokenLoss"), ("lse", "kLse"), ("ent", "kEntropy"), ("lp", "kLogprob"),
        ("wt", "kWeightAtTarget"))}
    k = P.kind
    if k == "ce":
        out = dict(token_loss=col["token_loss"], lse=col["lse"], wt=col["wt"], ent=col["ent"])
        if P.need_argmax:
            out["predicted"] = rows[:, _ROW["kPredicted"]].to(torch.long)
        return out
    if k == "distill":
        return dict(token_loss=col["token_loss"])
    if k == "policy":
        return dict(per_token=col["token_loss"], lp=col["lp"], ent=col["ent"])
    out = dict(lp=col["lp"], ent=col["ent"])
    want = getattr(P, "stats", ()) if forward else ()
    if "mean_logits" in want:
        out["mean_logits"] = rows[:, _ROW["kMeanLogit"]]
    if "log_sum_sq_probs" in want:
        out["log_sum_sq_probs"] = rows[:, _ROW["kLogSumSq"]]
    if "is_top1" in want:  # predicted is -1 at ignored rows: never a token there
        out["is_top1"] = rows[:, _ROW["kPredicted"]].to(torch.long) == tgt
    return out


def _want_ent(P):
    """The CE kind computes the entropy: for the loss's entropy_coef term or as an output."""
    return getattr(P, "want_entropy", False) or getattr(P, "entropy_coef", 0.0) != 0.0


def _accumulate(P, lo, hi, draw, grads):
    """Local gradient contributions of one chunk from d(loss)/d(raw local logits)."""
    if P.logits is not None:
        if grads.get("logits") is not None:
            grads["logits"][lo:hi] += draw.to(grads["logits"].dtype)
        return
    if grads.get("hidden") is not None:
        grads["hidden"][lo:hi] += torch.matmul(draw.to(P.W.dtype), P.W).to(grads["hidden"].dtype)
    if grads.get("W") is not None:
        gW = grads["W"]
        gW.addmm_(draw.t().to(P.hidden.dtype), P.hidden[lo:hi]) if gW.dtype == P.hidden.dtype else \
            gW.add_(torch.matmul(draw.t().to(P.hidden.dtype), P.hidden[lo:hi]).to(gW.dtype))
    if grads.get("b") is not None:
        grads["b"] += draw.sum(0, dtype=grads["b"].dtype)


def _run(P, coefs=None, need=None):
    """The chunk loop. Returns (per-row outputs over all N rows, local gradient buffers)."""
    N = P.target.shape[0]
    grads = None
    if need is not None:
        grads = {}
        if P.logits is not None:
            grads["logits"] = torch.zeros(P.logits.shape, dtype=P.acc, device=P.device) if need[3] else None
        else:
            grads["hidden"] = torch.zeros(P.hidden.shape, dtype=P.acc, device=P.device) if need[0] else None
            # float16: float32 always (as the single-process op): the forward's weight gradient is
            # divided by the mean's denominator before a loss scale exists (tests/test_fp16_loss_scale.py)
            wacc = P.acc if (P.fp32_grad_accum or P.W.dtype != torch.bfloat16) else P.W.dtype
            grads["W"] = torch.zeros(P.W.shape, dtype=wacc, device=P.device) if need[1] else None
            grads["b"] = torch.zeros(P.W.shape[0], dtype=P.acc, device=P.device) if (need[2] and P.b is not None) else None
    C = _default_chunk(P, N)
    outs = []
    for lo in range(0, N, C):
        hi = min(N, lo + C)
        cc = None if coefs is None else [None if c is None else c[lo:hi] for c in coefs]
        outs.append(_chunk(P, lo, hi, cc, grads))
    if not outs:  # no tokens: run nothing (every rank sees the same N)
        return {}, grads
    if not getattr(P, "targets_checked", False):  # the forward's loop; a recomputing one is not
        _check_targets(P)
        P.targets_checked = True
    res = {key: torch.cat([o[key] for o in outs]) for key in outs[0]}
    return res, grads


# ---------------------------------------------------------------------------------------------
# The autograd function
# ---------------------------------------------------------------------------------------------

_ROW_DIFF = {"ce": ("token_loss", "lse"), "lp": ("lp", "ent"), "distill": ("token_loss",), "policy": ()}


def _row_names(P):
    """The differentiable per-row outputs of the call (the CE kind's entropy when computed)."""
    if P.kind == "ce" and _want_ent(P):
        return _ROW_DIFF["ce"] + ("ent",)
    return _ROW_DIFF[P.kind]


class _ShardedHead(torch.autograd.Function):
    """Outputs: (loss scalar, *differentiable per-row outputs of the kind). `P.agg` are the per-row
    coefficients of the scalar loss (None: no scalar), scaled after the loop by 1 / P.divisor(out)
    (the mean's denominator may need the gathered class weight of the targets)."""

    @staticmethod
    def forward(ctx, P, hidden, W, b, logits):
        ctx.set_materialize_grads(False)
        need = [hidden is not None and ctx.needs_input_grad[1], W is not None and ctx.needs_input_grad[2],
                b is not None and ctx.needs_input_grad[3], logits is not None and ctx.needs_input_grad[4]]
        fused = P.agg is not None and any(need)
        with torch.no_grad():
            res, grads = _run(P, [P.agg] + [None] * (len(_row_names(P)) - 1) if fused else None,
                              need if fused else None)
        N = P.target.shape[0]
        if P.agg is not None:
            tok = res["per_token" if P.kind == "policy" else "token_loss"] if N else torch.zeros(0, dtype=P.acc, device=P.device)
            div = P.divisor(res)
            loss = (P.agg * tok).sum() / div
        else:
            div = None
            loss = torch.zeros((), dtype=P.acc, device=P.device)
        if fused:
            # A mean over no token is nan (as torch) with zero gradients, not 0 / 0.
            gdiv = torch.where(div != 0, div, torch.ones_like(div)) if torch.is_tensor(div) else div
            for key, g in grads.items():
                if g is not None:
                    g.div_(gdiv)
        poison = _poison(P)
        if poison is not None:
            loss = loss + poison
            for key in ("token_loss", "per_token", "lp"):
                if key in res:
                    res[key] = torch.where(P.bad, torch.full_like(res[key], math.nan), res[key])
            for g in (grads or {}).values() if fused else ():
                if g is not None:
                    g.add_(poison.to(g.dtype))
        ctx.P, ctx.need, ctx.grads, ctx.fused = P, need, grads if fused else None, fused
        ctx.allow_cell = _ops_py.second_backward_cell()
        ctx.save_for_backward(hidden, W, b, logits)
        P.res = res
        rows = tuple(res[name] if N else torch.zeros(0, dtype=P.acc, device=P.device) for name in _row_names(P))
        return (loss,) + rows

    @staticmethod
    def backward(ctx, g_loss, *g_rows):
        _ops_py.check_not_create_graph("the sharded head loss (fusedce.distributed)")
        P, need = ctx.P, ctx.need
        total = {}
        if g_loss is not None and ctx.fused:
            if ctx.grads is None:  # as the single-process op: never a silent zero gradient
                raise RuntimeError(_ops_py.SECOND_BACKWARD_ERROR.format(fn="vocab-parallel"))
            for key, g in ctx.grads.items():
                if g is not None:
                    total[key] = g * g_loss
        if any(g is not None for g in g_rows):
            coefs = [None if g is None else g.to(P.acc) for g in g_rows]
            with torch.no_grad():
                _, grads = _run(P, coefs, need)
            for key, g in grads.items():
                if g is not None:
                    total[key] = total[key] + g if key in total else g
        if not _ops_py.second_backward_allowed(ctx.allow_cell):
            ctx.grads = None  # the weight-sized buffers go now, not with the graph
        poison = _poison(P)
        if poison is not None and any(g is not None for g in g_rows):
            for key in total:
                total[key] = total[key] + poison.to(total[key].dtype)
        gh = total.get("hidden")
        if gh is not None and P.reduce_grad_input:
            dist.all_reduce(gh, group=P.group)  # the ONE collective of the backward
        hidden, W, b, logits = ctx.saved_tensors

        def cast(key, ref, i):
            if not need[i] or key not in total:
                return None
            return total[key].to(ref.dtype)

        return (None, cast("hidden", hidden, 0), cast("W", W, 1), cast("b", b, 2), cast("logits", logits, 3))


# ---------------------------------------------------------------------------------------------
# Common setup
# ---------------------------------------------------------------------------------------------


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _base(process_group, vocab_start, device, v_local):
    group, rank, world = _group_info(process_group)
    v0 = _vocab_start(group, rank, world, v_local, device, vocab_start)
    return dict(group=group, rank=rank, world=world, v0=v0, v_local=v_local, device=device)


def _ce_common(P, target, weight, reduction, ignore_index, z_loss, num_items_in_batch, return_stats, shape):
    """Runs the CE kind and builds the single-process-shaped result."""
    acc = P.acc
    N = P.target.shape[0]
    # 0-d whatever the form given (a [1] tensor too): the loss and z_loss statistic are scalars
    ni = None if num_items_in_batch is None or reduction == "none" else \
        torch.as_tensor(num_items_in_batch, dtype=acc, device=P.device).reshape(())
    if reduction == "none":
        P.agg = None
        P.divisor = None
    else:
        P.agg = torch.ones(N, dtype=acc, device=P.device)
        if ni is not None:
            # the head's gradients take 1 / n as a constant (_count_gradient adds d/dn below);
            # the z_loss statistic divides by ni itself, so its derivative w.r.t. n is its own
            ni_const = ni.detach() if _count_needs_grad(num_items_in_batch) else ni
            P.divisor = lambda res: ni_const
        elif reduction == "sum":
            P.divisor = lambda res: torch.ones((), dtype=acc, device=P.device)
        else:
            def _mean_div(res):
                d = res["wt"].sum() if N else torch.zeros((), dtype=acc, device=P.device)
                P.denom = d
                # != 0: negative class weights may sum below zero (divided by, as in torch).
                return torch.where(d != 0, d, torch.ones_like(d))
            P.divisor = _mean_div
    loss, tok, lse, *ent = _ShardedHead.apply(P, P.hidden, P.W, P.b, P.logits)
    res = P.res
    if reduction == "none":
        loss = tok.reshape(shape)
    elif reduction == "mean" and num_items_in_batch is None:
        d = P.denom
        # A zero denominator: F.cross_entropy's sum / 0 (nan for an all-ignored batch), no gradient.
        tok_sum = tok.detach().sum() if N else torch.zeros((), dtype=acc, device=P.device)
        loss = torch.where(d != 0, loss, tok_sum / d)
    elif num_items_in_batch is not None:  # the head's gradients take 1 / n as a constant
        loss = _count_gradient(loss, num_items_in_batch)
    if not return_stats:
        return loss
    flat_t = P.target
    valid = flat_t != ignore_index
    predicted = res["predicted"] if N else torch.zeros(0, dtype=torch.long, device=P.device)
    wt = res["wt"] if N else torch.zeros(0, dtype=acc, device=P.device)
    accuracy = ((predicted == flat_t) & valid).sum().to(acc) / valid.sum().to(acc)
    # differentiable through lse (its recomputing pass), as the single-process statistic
    z_tok = wt * (z_loss * lse * lse)
    bad = getattr(P, "bad", None)
    if bad is not None:
        # An out-of-range target where no host check was made (_check_targets): its loss is NaN,
        # and the statistics must not report plausible numbers beside it (its z part would count
        # weight 0, the accuracy a miss), as functional._stats. On the device, no sync.
        nan = torch.full((), math.nan, dtype=acc, device=P.device)
        z_tok = torch.where(bad, nan, z_tok)
        accuracy = torch.where(bad.any(), nan, accuracy)
    if reduction == "none":
        z_part = z_tok.reshape(shape)
    elif num_items_in_batch is not None:
        z_part = z_tok.sum() / ni
    elif reduction == "sum":
        z_part = z_tok.sum()
    else:
        # A mean over no weight keeps its value (nan, +-inf) with zero gradients, as the loss:
        # s / 0 would send 0 / 0 = nan into every gradient.
        s, d = z_tok.sum(), P.denom
        some = d != 0
        z_part = torch.where(some, s / torch.where(some, d, torch.ones_like(d)), (s / d).detach())
    entropy = ent[0].reshape(shape) if getattr(P, "want_entropy", False) else None
    return LossOutput(loss, lse.reshape(shape), predicted.reshape(shape), accuracy, z_part, entropy)


# ---------------------------------------------------------------------------------------------
# Entry points (called by the public functions once they have checked every argument)
# ---------------------------------------------------------------------------------------------


# fusedce.functional / fusedce.terms run the one argument check of fusedce/_checks.py and route a
# call with a process_group here; these check nothing but the global target range (only known once
# the shards' sizes are combined). fusedce.distributed holds the public functions whose group
# defaults to the whole world (WORLD).


class _World:
    """process_group for "the default group": routes a plain-tensor call to the sharded path."""

    def __repr__(self):
        return "fusedce.distributed.WORLD"


WORLD = _World()


def _group(process_group):
    return None if process_group is WORLD else process_group


def _linear_cross_entropy(
    input, linear_weight, target, *, process_group, vocab_start, linear_bias, weight, reduction,
    ignore_index, label_smoothing, z_loss, softcap, logit_scale, num_items_in_batch, shift,
    return_stats, chunk_size, fp32_grad_accum, reduce_grad_input, entropy_coef=0.0,
    return_entropy=False,
):
    process_group = _group(process_group)
    linear_weight, process_group, vocab_start = _unwrap_all(linear_weight, process_group, vocab_start)
    if linear_bias is not None:
        linear_bias, process_group, _ = _unwrap(linear_bias, process_group)
    if weight is not None:
        weight, process_group, _ = _unwrap(weight, process_group)
    if shift:
        target = _shift(target, ignore_index)
    shape = target.shape
    Vl, H = linear_weight.shape
    P = _Problem(kind="ce", hidden=input.reshape(-1, H), W=linear_weight, b=linear_bias, logits=None,
                 target=target.reshape(-1).long(), w=weight, ignore_index=ignore_index,
                 label_smoothing=float(label_smoothing), z_loss=float(z_loss), softcap=softcap,
                 logit_scale=float(logit_scale), need_argmax=bool(return_stats), acc=_acc_dtype(input),
                 entropy_coef=float(entropy_coef), want_entropy=bool(return_stats and return_entropy),
                 chunk_size=chunk_size, fp32_grad_accum=fp32_grad_accum, reduce_grad_input=reduce_grad_input,
                 **_base(process_group, vocab_start, input.device, Vl))
    return _ce_common(P, target, weight, reduction, ignore_index, z_loss, num_items_in_batch, return_stats, shape)


def _cross_entropy(input, target, *, process_group, vocab_start, weight, reduction, ignore_index,
                   label_smoothing, z_loss, softcap, logit_scale, num_items_in_batch, return_stats,
                   chunk_size):
    process_group = _group(process_group)
    if weight is not None:
        weight, process_group, _ = _unwrap(weight, process_group)
    shape = target.shape
    Vl = input.shape[-1]
    P = _Problem(kind="ce", hidden=None, W=None, b=None, logits=input.reshape(target.numel(), Vl),
                 target=target.reshape(-1).long(), w=weight, ignore_index=ignore_index,
                 label_smoothing=float(label_smoothing), z_loss=float(z_loss), softcap=softcap,
                 logit_scale=float(logit_scale), need_argmax=bool(return_stats), acc=_acc_dtype(input),
                 chunk_size=chunk_size, fp32_grad_accum=True, reduce_grad_input=True,
                 **_base(process_group, vocab_start, input.device, Vl))
    return _ce_common(P, target, weight, reduction, ignore_index, z_loss, num_items_in_batch, return_stats, shape)


def _token_logprobs(input, linear_weight, tokens, *, process_group, vocab_start, linear_bias,
                    temperature, return_entropy, softcap, logit_scale, chunk_size, reduce_grad_input):
    """Tokens equal to -100 get log-probability 0 (the single-process convention)."""
    process_group = _group(process_group)
    linear_weight, process_group, vocab_start = _unwrap_all(linear_weight, process_group, vocab_start)
    if linear_bias is not None:
        linear_bias, process_group, _ = _unwrap(linear_bias, process_group)
    Vl, H = linear_weight.shape
    P = _Problem(kind="lp", hidden=input.reshape(-1, H), W=linear_weight, b=linear_bias, logits=None,
                 target=tokens.reshape(-1).long(), ignore_index=-100, temperature=float(temperature),
                 softcap=None if softcap is None else float(softcap), logit_scale=float(logit_scale),
                 acc=_acc_dtype(input), chunk_size=chunk_size, fp32_grad_accum=False,
                 reduce_grad_input=reduce_grad_input, agg=None, divisor=None,
                 **_base(process_group, vocab_start, input.device, Vl))
    _, lp, ent = _ShardedHead.apply(P, P.hidden, P.W, P.b, None)
    lp, ent = lp.reshape(tokens.shape), ent.reshape(tokens.shape)
    return (lp, ent) if return_entropy else lp


def _token_statistics(input, linear_weight, tokens, *, process_group, vocab_start, linear_bias,
                      temperature, outputs, softcap, logit_scale, chunk_size, reduce_grad_input):
    """(logprobs, entropy, mean_logits, log_sum_sq_probs, is_top1) of token_statistics, None where
    not in `outputs`: the token_logprobs pass with the metrics' partials (sum z, sum e^(2(z-m)),
    the local argmax) in its one gather per chunk. logprobs and entropy carry gradients."""
    process_group = _group(process_group)
    linear_weight, process_group, vocab_start = _unwrap_all(linear_weight, process_group, vocab_start)
    if linear_bias is not None:
        linear_bias, process_group, _ = _unwrap(linear_bias, process_group)
    Vl, H = linear_weight.shape
    want = set(outputs)
    P = _Problem(kind="lp", hidden=input.reshape(-1, H), W=linear_weight, b=linear_bias, logits=None,
                 target=tokens.reshape(-1).long(), ignore_index=-100, temperature=float(temperature),
                 softcap=None if softcap is None else float(softcap), logit_scale=float(logit_scale),
                 stats=tuple(n for n in ("mean_logits", "log_sum_sq_probs", "is_top1") if n in want),
                 acc=_acc_dtype(input), chunk_size=chunk_size, fp32_grad_accum=False,
                 reduce_grad_input=reduce_grad_input, agg=None, divisor=None,
                 **_base(process_group, vocab_start, input.device, Vl))
    _, lp, ent = _ShardedHead.apply(P, P.hidden, P.W, P.b, None)
    shape = tokens.shape
    res = P.res
    N = P.target.shape[0]

    def metric(name, dtype):
        if name not in want:
            return None
        if not N:
            return torch.zeros(shape, dtype=dtype, device=input.device)
        return res[name].reshape(shape)

    return (lp.reshape(shape), ent.reshape(shape) if "entropy" in want else None,
            metric("mean_logits", P.acc), metric("log_sum_sq_probs", P.acc), metric("is_top1", torch.bool))


def _distillation_loss(input, linear_weight, target, *, teacher_input, teacher_weight, teacher_logits,
                       kind, beta, temperature, distill_weight, ce_weight, ignore_index, reduction,
                       linear_bias, teacher_bias, label_smoothing, z_loss, softcap, logit_scale,
                       process_group, vocab_start, chunk_size, reduce_grad_input, entropy_coef=0.0):
    process_group = _group(process_group)
    if linear_bias is not None:
        linear_bias, process_group, _ = _unwrap(linear_bias, process_group)
    if teacher_bias is not None:
        teacher_bias, process_group, _ = _unwrap(teacher_bias, process_group)
        teacher_bias = teacher_bias.detach()
    linear_weight, process_group, vocab_start = _unwrap_all(linear_weight, process_group, vocab_start)
    if teacher_weight is not None:
        teacher_weight, process_group, _ = _unwrap(teacher_weight, process_group)
    Vl, H = linear_weight.shape
    shape = target.shape
    t_hidden = None
    if teacher_weight is not None:
        ti = input if teacher_input is None else teacher_input
        t_hidden = ti.detach().reshape(-1, ti.shape[-1])
        teacher_weight = teacher_weight.detach()
    t_logits = None if teacher_logits is None else teacher_logits.detach().reshape(target.numel(), Vl)
    flat = target.reshape(-1).long()
    acc = _acc_dtype(input)
    valid = (flat != ignore_index).to(acc)  # int64 here: an int32 target was widened above
    P = _Problem(kind="distill", hidden=input.reshape(-1, H), W=linear_weight, b=linear_bias, logits=None,
                 t_hidden=t_hidden, t_W=teacher_weight, t_b=teacher_bias, t_logits=t_logits, target=flat,
                 ignore_index=ignore_index, temperature=float(temperature), beta=float(beta), dkind=kind,
                 softcap=None if softcap is None else float(softcap), logit_scale=float(logit_scale),
                 label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                 distill_weight=float(distill_weight), ce_weight=float(ce_weight),
                 entropy_coef=float(entropy_coef), acc=acc,
                 chunk_size=chunk_size, fp32_grad_accum=False, reduce_grad_input=reduce_grad_input,
                 **_base(process_group, vocab_start, input.device, Vl))
    if reduction == "none":
        P.agg, P.divisor = None, None
    else:
        P.agg = torch.ones_like(valid)
        d = valid.sum() if reduction == "mean" else torch.ones((), dtype=acc, device=input.device)
        P.divisor = lambda res: d
    loss, tok = _ShardedHead.apply(P, P.hidden, P.W, P.b, None)
    return tok.reshape(shape) if reduction == "none" else loss


def _policy_loss(input, linear_weight, tokens, old_logprobs, advantages, *, mask, m, ref_logprobs,
                 temperature, weights, ent_w, pw, linear_bias, softcap, logit_scale, process_group,
                 vocab_start, chunk_size, reduce_grad_input, opts):
    """The one-pass (token-level) policy loss; `weights` are the loss type's per-token weights,
    `ent_w` the entropy term's per-token multipliers of -entropy_coef and `pw` the policy part's
    (importance-sampling ratio), as policy_loss hands them to the op. Masked tokens still go
    through the shared statistics (no row skipping); kept tokens must be class ids (checked
    against the global vocabulary in the chunk loop)."""
    process_group = _group(process_group)
    linear_weight, process_group, vocab_start = _unwrap_all(linear_weight, process_group, vocab_start)
    if linear_bias is not None:
        linear_bias, process_group, _ = _unwrap(linear_bias, process_group)
    Vl, H = linear_weight.shape
    B, T = tokens.shape
    acc = _acc_dtype(input)
    adv = advantages.to(acc)
    if adv.dim() == 1:
        adv = adv[:, None].expand(B, T)
    one = torch.ones((), dtype=acc, device=input.device)
    kept = m.reshape(-1) != 0
    # masked tokens are ignored rows (no loss, no gradient), as in the single-process op
    flat = tokens.reshape(-1).long()
    target = torch.where(kept, flat, torch.full_like(flat, _MASKED))
    P = _Problem(kind="policy", hidden=input.reshape(-1, H), W=linear_weight, b=linear_bias, logits=None,
                 target=target, ignore_index=_MASKED, temperature=float(temperature),
                 softcap=None if softcap is None else float(softcap), logit_scale=float(logit_scale),
                 old=None if old_logprobs is None else old_logprobs.reshape(-1).to(acc).detach(),
                 adv=adv.reshape(-1), ref=None if ref_logprobs is None else ref_logprobs.reshape(-1).to(acc).detach(),
                 beta=opts["beta"], eps_low=opts["epsilon_low"], eps_high=opts["epsilon_high"],
                 entropy_coef=opts["entropy_coef"], agg=weights.reshape(-1).to(acc), divisor=lambda res: one,
                 kept=kept, loss_type=opts["loss_type"], delta=opts["delta"],
                 bias_kl=opts["use_bias_correction_kl"], sapo=(opts["sapo_temperature_pos"], opts["sapo_temperature_neg"]),
                 ent_w=None if ent_w is None else ent_w.to(acc), pw=None if pw is None else pw.to(acc),
                 acc=acc, chunk_size=chunk_size, fp32_grad_accum=False, reduce_grad_input=reduce_grad_input,
                 **_base(process_group, vocab_start, input.device, Vl))
    (loss,) = _ShardedHead.apply(P, P.hidden, P.W, P.b, None)
    res = P.res
    if not B * T:  # no tokens: the loop ran no chunk and returned no rows
        res = {key: torch.zeros(0, dtype=acc, device=input.device) for key in ("lp", "ent")}
    with torch.no_grad():  # the keys and definitions of the single-process policy_loss
        lp = res["lp"].reshape(B, T)
        parts = _policy_parts(lp, None if P.old is None else P.old.reshape(B, T), adv.to(lp.dtype),
                              None if P.ref is None else P.ref.reshape(B, T), m.to(lp.dtype),
                              None if pw is None else pw.reshape(B, T).to(lp.dtype), "token", opts)
        metrics = _policy_metrics(lp, res["ent"].reshape(B, T), m.to(lp.dtype), advantages, parts, opts)
    return loss, metrics
