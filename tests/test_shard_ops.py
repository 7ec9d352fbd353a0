"""The vocab-parallel term ops (fusedce::shard_partials, shard_jsd, shard_finish, shard_backward_)
on shards of ONE logits matrix in one process (no collectives: the partials are stacked as the
all-gather would stack them), term family by term family, against the float64 definitions of
fusedce/reference.py and against fusedce::loss's own outputs on the whole vocabulary.

Per problem: partials on each shard -> [k, N, kParts] -> finish (with the upstream gradients of
token_loss / lse / entropy / logprob) -> (for the JSD: shard_jsd on each shard, summed, a second
finish) -> shard_backward_ on each shard; the rows are compared output by output and the
concatenated shard gradients with the autograd of sum(upstream * outputs) of the reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from accuracy import HALF_DTYPES, assert_close
from fusedce import _extension, reference
from fusedce._op_args import TermOptions

_ops = torch.ops.fusedce
_L = _extension.load_extension().shard_layout()
PART, ROW, COEF = _L["parts"], _L["rows"], _L["coefs"]
ROW_COLS = {"token_loss": "kTokenLoss", "lse": "kLse", "entropy": "kEntropy", "logprob": "kLogprob",
            "mean_logit": "kMeanLogit", "log_sum_sq": "kLogSumSq", "wt": "kWeightAtTarget"}
MASKED = torch.iinfo(torch.int64).min  # the policy's ignore marker (as fusedce.terms.policy_loss)

DTYPES = [
    torch.float64,   # every formula exact (1e-9): the merge of the ranks loses nothing
    torch.float32,   # the tight float32 budget with float32 partials between the ops
    torch.bfloat16,  # the training dtype: logits read and gradients written in bfloat16, judged
                     # by accuracy.py's error budget against the same-dtype eager reference
]
CUTS = {
    1: (0, 23),         # one rank: the finish alone must equal the single-process row
    2: (0, 9, 23),      # two uneven shards
    3: (0, 4, 15, 23),  # three uneven shards: the merge of more than two, the argmax rule
}
N, V = 12, 23  # V not a multiple of anything the shards could align to


def _final(raw, scale, cap):
    return reference.final_logits(raw, scale, cap)


# --------------------------------------------------------------------------------------------
# The term families: the op arguments and the reference rows of each
# --------------------------------------------------------------------------------------------


def _problem(family, device, dtype):
    """(op arguments, reference(raw, teacher) -> dict of per-row outputs, upstream names)."""
    t = torch.randint(0, V, (N,))
    raw = torch.randn(N, V, dtype=torch.float64) * 2
    args = dict(cw=None, teacher=None, ignore_index=-100, softcap=0.0, logit_scale=1.0,
                finish={}, terms=TermOptions(), tensors={})
    valid = torch.ones(N, dtype=torch.bool)
    valid[[1, 6]] = False  # ignored rows: no loss, no gradient through the loss, still lse/entropy
    neg_inf_row = False
    if family in ("ce", "entropy"):
        cw = torch.rand(V, dtype=torch.float64) + 0.5  # class weights: w_t from the owning shard
        args.update(cw=cw, softcap=4.0 if family == "ce" else 0.0, logit_scale=1.3)
        if family == "ce":
            # smoothing (needs the merged sum w z, sum w and V) + z-loss + softcap + logit_scale
            args["finish"] = dict(label_smoothing=0.1, z_loss=1e-2)
        else:
            # the entropy term (weighted per token) and the entropy output's own upstream;
            # a row that is -inf on the whole first shard (that rank adds nothing to it)
            ew = torch.rand(N, dtype=torch.float64) + 0.5
            args["terms"] = TermOptions(entropy_coef=0.3, want_entropy=True)
            args["tensors"] = dict(entropy_weights=ew)
            neg_inf_row = True
        ups = ("g_token_loss", "g_lse", "g_entropy")

        def ref(r, tb, eps=args["finish"].get("label_smoothing", 0.0), zl=args["finish"].get("z_loss", 0.0)):
            w = cw.to(r.dtype)
            cap = args["softcap"] or None
            out = reference.cross_entropy(r, target, weight=w, reduction="none", label_smoothing=eps,
                                          z_loss=zl, softcap=cap, logit_scale=args["logit_scale"], dtype=None)
            ent = reference.entropy(r, logit_scale=args["logit_scale"], softcap=cap, dtype=None)
            tok = out.token_loss
            if family == "entropy":
                tok = tok + torch.where(vmask, 0.3 * args["tensors"]["entropy_weights"].to(r.dtype) * ent,
                                        torch.zeros_like(ent))
            lp = torch.log_softmax(_final(r, args["logit_scale"], cap), -1).gather(-1, safe[:, None])[:, 0]
            return dict(token_loss=tok, lse=out.lse, entropy=ent,
                        logprob=torch.where(vmask, lp, torch.zeros_like(lp)),
                        wt=torch.where(vmask, w[safe], torch.zeros_like(lp)))
    elif family in ("logprobs", "statistics"):
        # token_logprobs / token_statistics: ce_weight 0, the temperature folded into softcap and
        # logit_scale as fusedce.terms._head_knobs does; statistics add the two moments
        T, cap = (0.7, None) if family == "logprobs" else (1.5, 5.0)
        args.update(softcap=0.0 if cap is None else cap / T, logit_scale=1.2 / T)
        stats = family == "statistics"
        args["terms"] = TermOptions(ce_weight=0.0, want_entropy=True, want_logprob=True,
                                    want_mean_logit=stats, want_log_sum_sq=stats)
        neg_inf_row = not stats  # the moments of a -inf row are -inf / nan in both: not compared
        ups = ("g_logprob", "g_entropy")

        def ref(r, tb):
            s = reference.token_statistics(r, torch.where(vmask, tgt, torch.full_like(tgt, -100)),
                                           temperature=T, logit_scale=1.2, softcap=cap, dtype=None)
            z = _final(r, 1.2, cap) / T
            lse = torch.logsumexp(z, -1)
            out = dict(token_loss=torch.zeros_like(lse), lse=lse, entropy=s["entropy"],
                       logprob=s["logprobs"])
            if stats:
                out.update(mean_logit=s["mean_logits"], log_sum_sq=s["log_sum_sq_probs"])
            return out
    elif family in ("forward_kl", "reverse_kl", "jsd"):
        # distillation at T != 1 with a CE part (smoothing, z-loss) and the entropy term: every
        # partial column (student and teacher sums, their cross sums) and the JSD's second pass
        kind = {"forward_kl": 1, "reverse_kl": 2, "jsd": 3}[family]
        T, beta = 2.0, 0.3
        teacher = torch.randn(N, V, dtype=torch.float64) * 2
        args.update(teacher=teacher, logit_scale=1.1)
        args["finish"] = dict(label_smoothing=0.1, z_loss=1e-2)
        args["terms"] = TermOptions(ce_weight=0.5, entropy_coef=0.05, distill=kind, distill_weight=0.7,
                                    distill_beta=beta, distill_temperature=T)
        ups = ("g_token_loss",)

        def ref(r, tb):
            z = _final(r, 1.1, None)
            d = reference.distillation_token_loss(z, tb, kind=family, beta=beta, temperature=T, dtype=None)
            ce = reference.cross_entropy(z, tgt, reduction="none", label_smoothing=0.1, dtype=None)
            ent = reference.entropy(z, dtype=None)
            tok = 0.7 * d + 0.5 * ce.token_loss + 1e-2 * ce.lse ** 2 + 0.05 * ent
            return dict(token_loss=torch.where(vmask, tok, torch.zeros_like(tok)), lse=ce.lse, entropy=ent)
    else:
        # the token-level policy objective of each policy_kind, with the KL term (k3, and k3 x
        # ratio with the bias correction), per-token policy weights and entropy weights, masked rows
        loss_type, bias_kl = {"policy_clipped": ("dapo", True), "policy_clipped_delta": ("dapo", False),
                              "policy_cispo": ("cispo", True), "policy_sapo": ("sapo", True)}[family]
        delta = 1.1 if family == "policy_clipped_delta" else None
        T = 0.8
        args.update(ignore_index=MASKED, logit_scale=1.0 / T)
        old = torch.randn(N, dtype=torch.float64) * 0.3 - 3.0  # ratios on both sides of the clip
        adv = torch.randn(N, dtype=torch.float64)
        refl = torch.randn(N, dtype=torch.float64) * 0.3 - 3.0
        pw = torch.rand(N, dtype=torch.float64) + 0.5
        ew = torch.rand(N, dtype=torch.float64)
        args["terms"] = TermOptions(
            ce_weight=0.0, want_entropy=True, want_logprob=True, entropy_coef=-0.02, epsilon_low=0.2,
            epsilon_high=0.28, kl_beta=0.04, policy_kind={"cispo": 1, "sapo": 2}.get(loss_type, 0),
            policy_delta=0.0 if delta is None else delta, kl_bias_correction=bias_kl)
        args["tensors"] = dict(old_logprobs=old, advantages=adv, ref_logprobs=refl, policy_weights=pw,
                               entropy_weights=ew)
        neg_inf_row = True
        ups = ("g_token_loss", "g_logprob", "g_entropy")

        def ref(r, tb):
            dt = r.dtype
            _, per_token, lp, ent = reference.policy_loss(
                r[None], tgt[None], old[None].to(dt), adv[None].to(dt), mask=vmask[None].to(dt),
                ref_logprobs=refl[None].to(dt), beta=0.04, epsilon_low=0.2, epsilon_high=0.28,
                temperature=T, loss_type=loss_type, use_bias_correction_kl=bias_kl, delta=delta,
                importance_sampling_ratio=pw[None].to(dt), dtype=None)
            tok = per_token[0] - 0.02 * ew.to(dt) * ent[0]
            zero = torch.zeros_like(tok)
            return dict(token_loss=torch.where(vmask, tok, zero), entropy=ent[0],
                        logprob=torch.where(vmask, lp[0], zero))
    if neg_inf_row:
        raw[3, : CUTS[2][1]] = -math.inf  # the whole first shard of the 2- and 3-rank cuts
        t[3] = V - 1
    tgt = t.clone()
    vmask = valid
    safe = t
    target = torch.where(valid, t, torch.full_like(t, args["ignore_index"]))
    # the inputs rounded to the dtype first: the truth is computed on what the op reads
    raw = raw.to(dtype)
    if args["teacher"] is not None:
        args["teacher"] = args["teacher"].to(dtype)
    return raw, target, args, ref, ups


FAMILIES = [
    "ce", "entropy", "logprobs", "statistics", "forward_kl", "reverse_kl", "jsd",
    "policy_clipped", "policy_clipped_delta", "policy_cispo", "policy_sapo",
]


def _run_shards(raw, target, cuts, args, upstream):
    """partials -> stacked [k, N, kParts] -> finish (-> shard_jsd, finish) -> backward_ per shard.
    Returns (rows, coefs, the shards' gradients concatenated)."""
    knobs = dict(ignore_index=args["ignore_index"], softcap=args["softcap"], logit_scale=args["logit_scale"])
    packed = args["terms"].pack()
    acc = torch.float64 if raw.dtype == torch.float64 else torch.float32
    dev = raw.device
    cw, tb = args["cw"], args["teacher"]

    def sl(x, a, b):
        return None if x is None else x[..., a:b].to(dev).contiguous()

    shards = list(zip(cuts[:-1], cuts[1:]))
    parts = [_ops.shard_partials(raw[:, a:b].contiguous(), target, a, sl(cw, a, b), sl(tb, a, b),
                                 **knobs, **packed) for a, b in shards]
    stacked = torch.stack(parts)
    fin = dict(ignore_index=args["ignore_index"], **args["finish"],
               **{k: v.to(dev, acc) for k, v in args["tensors"].items()},
               **{k: v.to(dev, acc) for k, v in upstream.items()}, **packed)
    rows, coefs = _ops.shard_finish(stacked, target, None, **fin)
    if args["terms"].distill == 3:
        jsd = sum(_ops.shard_jsd(raw[:, a:b].contiguous(), sl(tb, a, b), coefs, softcap=args["softcap"],
                                 logit_scale=args["logit_scale"], **packed) for a, b in shards)
        rows, coefs = _ops.shard_finish(stacked, target, jsd, **fin)
    grads = []
    for a, b in shards:
        g = raw[:, a:b].clone()
        _ops.shard_backward_(g, target, a, coefs, sl(cw, a, b), sl(tb, a, b), **knobs, **packed)
        grads.append(g)
    return rows, coefs, torch.cat(grads, 1)


def _reference(ref, raw, teacher, ups, dtype):
    """The reference rows and the gradient of sum(upstream * rows) w.r.t. the raw logits, in
    `dtype` (float64: the truth; None: the input's dtype, the eager budget of half dtypes)."""
    r = raw.detach().cpu()
    r = (r.double() if dtype == torch.float64 else r).requires_grad_()
    tb = None if teacher is None else (teacher.cpu().double() if dtype == torch.float64 else teacher.cpu())
    out = ref(r, tb)
    total = sum((out[_UP_ROW[name]] * u.to(r.dtype)).sum() for name, u in ups.items())
    (g,) = torch.autograd.grad(total, r)
    return {k: v.detach() for k, v in out.items()}, g


_UP_ROW = {"g_token_loss": "token_loss", "g_lse": "lse", "g_entropy": "entropy", "g_logprob": "logprob"}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", sorted(CUTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_shard_ops_against_reference(device, dtype, k, family):
    raw, target, args, ref, up_names = _problem(family, device, dtype)
    raw, target = raw.to(device), target.to(device)
    ups = {name: torch.randn(N, dtype=torch.float64) for name in up_names}
    rows, coefs, grad = _run_shards(raw, target, CUTS[k], args, ups)
    assert rows.shape == (N, ROW["kRows"]) and coefs.shape == (N, COEF["kCoefs"])
    truth, truth_g = _reference(ref, raw, args["teacher"], ups, torch.float64)
    eager = eager_g = None
    if dtype in HALF_DTYPES:
        eager, eager_g = _reference(ref, raw, args["teacher"], ups, None)
    for name, t in truth.items():
        assert_close(rows[:, ROW[ROW_COLS[name]]], t, dtype, eager=None if eager is None else eager[name],
                     what=f"{family} k={k}: {name}")
    assert_close(grad, truth_g, dtype, eager=eager_g, what=f"{family} k={k}: d/d logits")

    # fusedce::loss on the whole vocabulary (hidden = the logits, weight = I: the same logits
    # exactly): the same rows, and the same gradient of sum(g * token_loss). Rows with a -inf
    # logit are left out of this comparison only (hidden @ I makes them -inf * 0 = nan).
    fin = torch.isfinite(raw).all(-1)
    valid = target != args["ignore_index"]
    gt = ups.get("g_token_loss")
    out = _ops.loss(
        raw, torch.eye(V, dtype=dtype, device=device), target, None,
        None if args["cw"] is None else args["cw"].to(device), None if gt is None else gt.to(device),
        ignore_index=args["ignore_index"], softcap=args["softcap"], logit_scale=args["logit_scale"],
        grad_mask=[gt is not None, False, False], **args["finish"],
        **args["terms"]._replace(want_entropy=True, want_logprob=True,
                                 teacher_logits=args["teacher"] if args["teacher"] is None else args["teacher"].to(device),
                                 **{n: v.to(device) for n, v in args["tensors"].items()}).pack())
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, i in (("token_loss", 1), ("lse", 2), ("entropy", 4), ("logprob", 5)):
        a, b = rows[:, ROW[ROW_COLS[name]]], out[i]
        assert_close(a[fin], b[fin], acc, what=f"{family} k={k}: {name} vs fusedce::loss")
    # the argmax: the smallest global id among the ranks at the global maximum, as the op's
    pred = rows[:, ROW["kPredicted"]].long()
    assert torch.equal(pred[fin].cpu(), out[3][fin].cpu()), f"{family} k={k}: predicted"
    if family == "statistics":
        assert_close(rows[:, ROW["kMeanLogit"]], out[9], acc, what="mean_logit vs fusedce::loss")
        assert_close(rows[:, ROW["kLogSumSq"]], out[10], acc, what="log_sum_sq vs fusedce::loss")
    if gt is not None and dtype not in HALF_DTYPES:
        # only the token_loss upstream: recompute the shards with that one
        _, _, g_only = _run_shards(raw, target, CUTS[k], args, {"g_token_loss": gt})
        assert_close(g_only[fin], out[6][fin], acc, what=f"{family} k={k}: d(g token_loss)/d logits vs fusedce::loss")
    assert torch.all(rows[~valid, ROW["kTokenLoss"]] == 0)
    assert torch.all(rows[~valid, ROW["kPredicted"]] == -1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_shard_ops_empty_shard(device, dtype):
    """A rank whose shard is empty (V_local = 0) adds nothing: the same rows and gradient as
    without it (its argmax candidate can never win, its maxima are -inf)."""
    raw, target, args, ref, up_names = _problem("entropy", device, dtype)
    raw, target = raw.to(device), target.to(device)
    ups = {name: torch.randn(N, dtype=torch.float64) for name in up_names}
    rows, _, grad = _run_shards(raw, target, (0, 9, 9, 23), args, ups)
    rows2, _, grad2 = _run_shards(raw, target, (0, 9, 23), args, ups)
    torch.testing.assert_close(rows, rows2)
    torch.testing.assert_close(grad, grad2)


def test_shard_finish_out_of_range_target(device):
    """A target that is not ignore_index and outside [0, V) (owned by no rank): NaN token loss,
    log-probability and gradient on that row, as the single-process CUDA op without validation;
    every other row unchanged."""
    raw, target, args, ref, up_names = _problem("entropy", device, torch.float64)
    raw, target = raw.to(device), target.to(device)
    ups = {name: torch.randn(N, dtype=torch.float64) for name in up_names}
    rows, _, grad = _run_shards(raw, target, CUTS[2], args, ups)
    bad = target.clone()
    bad[0] = V  # one past the vocabulary
    bad[2] = -5  # negative, not ignore_index
    rows_b, _, grad_b = _run_shards(raw, bad, CUTS[2], args, ups)
    for i in (0, 2):
        assert math.isnan(rows_b[i, ROW["kTokenLoss"]]) and math.isnan(rows_b[i, ROW["kLogprob"]])
        assert torch.isnan(grad_b[i]).all()
    keep = torch.ones(N, dtype=torch.bool, device=device)
    keep[[0, 2]] = False
    torch.testing.assert_close(rows_b[keep], rows[keep])
    torch.testing.assert_close(grad_b[keep], grad[keep])


def test_shard_ops_partials_columns(device):
    """The partials' bookkeeping columns: w_t and z_t only on the owning shard, the shard's
    class-weight sum and width on every row, -inf maxima of an all -inf shard row."""
    raw = torch.randn(4, 10, dtype=torch.float64, device=device)
    raw[1] = -math.inf
    cw = torch.rand(10, dtype=torch.float64, device=device) + 0.5
    t = torch.tensor([12, 3, -100, 15], device=device)
    p = _ops.shard_partials(raw, t, 10, cw)
    assert p.shape == (4, PART["kParts"])
    assert torch.equal(p[:, PART["kWt"]].cpu(), torch.tensor([cw[2], 0, 0, cw[5]], dtype=torch.float64))
    assert p[0, PART["kZt"]] == raw[0, 2] and p[1, PART["kZt"]] == 0
    assert torch.allclose(p[:, PART["kWsum"]], cw.sum().expand(4))
    assert torch.all(p[:, PART["kV"]] == 10)
    assert p[1, PART["kM"]] == -math.inf and p[1, PART["kS"]] == 0
    assert torch.equal(p[:, PART["kArgmax"]].cpu(), (raw.argmax(-1) + 10).double().cpu())


def test_shard_ops_bad_arguments(device):
    """Misuse gets an error that names the argument."""
    raw = torch.randn(4, 6, device=device)
    t = torch.tensor([0, 1, 2, 3], device=device)
    p = _ops.shard_partials(raw, t, 0)
    with pytest.raises(RuntimeError, match="partials"):
        _ops.shard_finish(p[:, :5], t)
    with pytest.raises(RuntimeError, match="target"):
        _ops.shard_finish(p, t[:3])
    with pytest.raises(RuntimeError, match="jsd"):
        _ops.shard_finish(p, t, torch.zeros(4, 2, device=device))
    with pytest.raises(RuntimeError, match="g_entropy"):
        _ops.shard_finish(p, t, g_entropy=torch.zeros(3, device=device))
    _, coefs = _ops.shard_finish(p, t)
    with pytest.raises(RuntimeError, match="coefs"):
        _ops.shard_backward_(raw.clone(), t, 0, coefs[:, :3])
    with pytest.raises(RuntimeError, match="vocab_start"):
        _ops.shard_partials(raw, t, -1)
    with pytest.raises(RuntimeError, match="term_floats"):
        _ops.shard_partials(raw, t, 0, term_floats=[1.0])
    with pytest.raises(RuntimeError, match="teacher"):
        _ops.shard_partials(raw, t, 0, **TermOptions(distill=1).pack())
    with pytest.raises(RuntimeError, match="distill"):
        _ops.shard_jsd(raw, raw, coefs, **TermOptions(distill=1).pack())


def test_shard_ops_opcheck(device):
    """The fake kernels and the schemas agree with the kernels (shapes, dtypes, the in-place
    write of shard_backward_)."""
    raw = torch.randn(5, 7, dtype=torch.float64, device=device)
    tb = torch.randn(5, 7, dtype=torch.float64, device=device)
    t = torch.tensor([0, 3, -100, 9, 10], device=device)
    cw = torch.rand(7, dtype=torch.float64, device=device)
    jsd = TermOptions(distill=3, distill_temperature=2.0, want_entropy=True).pack()
    torch.library.opcheck(_ops.shard_partials.default, (raw, t, 4, cw, tb), jsd)
    p = _ops.shard_partials(raw, t, 4, cw, tb, **jsd)
    g = torch.rand(5, dtype=torch.float64, device=device)
    # the partials of two ranks ([0, 4) and [4, 11)), so that every target is in the vocabulary
    # (an out-of-range one is NaN, and NaN never compares equal)
    p0 = _ops.shard_partials(raw[:, :4], t, 0, cw[:4], tb[:, :4], **jsd)
    both = torch.stack([p0, p])
    torch.library.opcheck(_ops.shard_finish.default, (both, t, None, g, g), jsd)
    rows, coefs = _ops.shard_finish(both, t, None, g, **jsd)
    torch.library.opcheck(_ops.shard_jsd.default, (raw, tb, coefs), jsd)
    torch.library.opcheck(_ops.shard_backward_.default, (raw.clone(), t, 4, coefs, cw, tb), jsd)
