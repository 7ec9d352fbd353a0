"""Property test of every public function on both paths: single process and 2-rank vocab-parallel.

Hypothesis draws a function's shapes, an option combination and a seed for the tensor values
(and, for the error tests, one invalid argument). Each drawn case is run

- single-process: ``fusedce.<fn>(...)`` on the full head / logits, in this process;
- vocab-parallel: ``fusedce.<fn>(..., process_group=WORLD)`` on 2 gloo ranks, each holding an
  uneven contiguous vocabulary shard (the split point is drawn, an empty shard included), with
  ``vocab_start`` given or derived;

and both are checked against fusedce/reference.py in float64 on the CPU: every returned value
and the gradient of every differentiable input (a shard's gradient is the matching slice of the
reference gradient) under a random upstream gradient. For an invalid argument both paths must
raise, the same exception type, with a message that names the argument.

Spawning a process group is slow, so ONE pool of 2 ranks (a module fixture) serves every drawn
example of every test: the case (plain Python data, the tensors are rebuilt from its seed) goes
to both ranks over a queue and each sends back what happened. A hung collective (the ranks
disagreeing) is reported for that case and the pool is respawned.

Example counts are bounded and derandomized; a failure prints the drawn case, which reproduces
it through ``evaluate(case, None)`` (single process) or the pool.
"""

from __future__ import annotations

import datetime
import math
import os
import queue
import re
import shutil
import sys
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("hypothesis")  # in the test extras; a bare GPU machine may lack it

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fusedce  # noqa: E402
from accuracy import assert_close  # noqa: E402
from fusedce import reference as ref  # noqa: E402

F64 = torch.float64
WORLD = 2
FUNCTIONS = ("linear_cross_entropy", "cross_entropy", "token_logprobs", "distillation_loss", "policy_loss")


def _settings(n):
    # No shrinking: a failing case is printed as drawn (it reproduces as is), and shrinking
    # through the process group (a hang costs the gloo timeout) would unbound the run time.
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


# ---------------------------------------------------------------------------------------------
# Strategies: a case is a plain dict (it crosses process boundaries); tensors come from its seed.
# ---------------------------------------------------------------------------------------------

SOFTCAPS = [None, 1.0, 2.0, 30.0]
SCALES = [1.0, 0.5, 3.0, -0.7]

# Each invalid argument: (the argument its error must name, the functions it applies to).
# "target" is "tokens" for the functions whose argument has that name.
HEAD = ("linear_cross_entropy", "token_logprobs", "distillation_loss", "policy_loss")
TARGETED = FUNCTIONS
CE_TERMS = ("linear_cross_entropy", "cross_entropy", "distillation_loss")
TEMPERED = ("token_logprobs", "distillation_loss", "policy_loss")
INVALID = {
    "target_oob_high": ("target", TARGETED),
    "target_oob_neg": ("target", TARGETED),
    "target_float": ("target", TARGETED),
    "target_shape": ("target", TARGETED),
    "softcap_zero": ("softcap", FUNCTIONS),
    "softcap_neg": ("softcap", FUNCTIONS),
    "softcap_nan": ("softcap", FUNCTIONS),
    "softcap_inf": ("softcap", FUNCTIONS),
    "logit_scale_nan": ("logit_scale", FUNCTIONS),
    "logit_scale_inf": ("logit_scale", FUNCTIONS),
    "weight_dtype": ("linear_weight", HEAD),
    "weight_hidden": ("linear_weight", HEAD),
    "input_int": ("input", FUNCTIONS),
    "bias_shape": ("linear_bias", HEAD),
    "bias_dtype": ("linear_bias", HEAD),
    "chunk_zero": ("chunk_size", HEAD),
    "z_loss_neg": ("z_loss", CE_TERMS),
    "z_loss_nan": ("z_loss", CE_TERMS),
    "ls_gt1": ("label_smoothing", CE_TERMS),
    "ls_neg": ("label_smoothing", CE_TERMS),
    "ls_nan": ("label_smoothing", CE_TERMS),
    "reduction_bad": ("reduction", CE_TERMS),
    "cw_shape": ("weight", ("linear_cross_entropy", "cross_entropy")),
    "cw_int": ("weight", ("linear_cross_entropy", "cross_entropy")),
    "num_items_zero": ("num_items_in_batch", ("linear_cross_entropy", "cross_entropy")),
    "num_items_neg": ("num_items_in_batch", ("linear_cross_entropy", "cross_entropy")),
    "num_items_nan": ("num_items_in_batch", ("linear_cross_entropy", "cross_entropy")),
    "entropy_coef_nan": ("entropy_coef", ("linear_cross_entropy", "distillation_loss", "policy_loss")),
    "temperature_zero": ("temperature", TEMPERED),
    "temperature_neg": ("temperature", TEMPERED),
    "temperature_nan": ("temperature", TEMPERED),
    "kind_bad": ("kind", ("distillation_loss",)),
    "beta_jsd_out": ("beta", ("distillation_loss",)),
    "beta_nan": ("beta", ("distillation_loss", "policy_loss")),
    "distill_weight_neg": ("distill_weight", ("distillation_loss",)),
    "distill_weight_nan": ("distill_weight", ("distillation_loss",)),
    "ce_weight_neg": ("ce_weight", ("distillation_loss",)),
    "ce_weight_nan": ("ce_weight", ("distillation_loss",)),
    "teacher_both": ("teacher_logits", ("distillation_loss",)),
    "teacher_none": ("teacher_logits", ("distillation_loss",)),
    "teacher_logits_shape": ("teacher_logits", ("distillation_loss",)),
    "loss_type_bad": ("loss_type", ("policy_loss",)),
    "eps_low_gt1": ("epsilon_low", ("policy_loss",)),
    "eps_high_neg": ("epsilon_high", ("policy_loss",)),
    "eps_low_nan": ("epsilon_low", ("policy_loss",)),
    "max_len_zero": ("max_completion_length", ("policy_loss",)),
    "beta_no_ref": ("ref_logprobs", ("policy_loss",)),
    "old_shape": ("old_logprobs", ("policy_loss",)),
    "adv_shape": ("advantages", ("policy_loss",)),
    "mask_shape": ("mask", ("policy_loss",)),
    "input_2d": ("input", ("policy_loss",)),
    "token_minus1_in_mask": ("target", ("policy_loss",)),
}
TOKENS_NAMED = ("token_logprobs", "policy_loss")  # their target argument is called `tokens`


def expected_name(fn, mutation):
    name = INVALID[mutation][0]
    return "tokens" if name == "target" and fn in TOKENS_NAMED else name


@st.composite
def cases(draw, fn, invalid=None, empty_shard=False):
    """A case of `fn`; `invalid` names one invalid argument (a key of INVALID); `empty_shard`:
    one rank holds no vocabulary (V < world with a DTensor's torch.chunk layout), else both
    ranks hold an uneven non-empty shard."""
    c = dict(fn=fn, seed=draw(st.integers(0, 2**31 - 1)), invalid=invalid)
    if empty_shard:
        V = draw(st.integers(1, 4))
        split = draw(st.sampled_from([0, V]))
    else:
        V = draw(st.integers(2, 16))
        split = draw(st.integers(1, V - 1))
    c.update(V=V, H=draw(st.integers(1, 6)), split=split,
             vocab_start=draw(st.booleans()), chunk_size=draw(st.sampled_from([None, 1, 3, 7])),
             softcap=draw(st.sampled_from(SOFTCAPS)), logit_scale=draw(st.sampled_from(SCALES)),
             bias=draw(st.booleans()))
    lo_n = 1 if invalid else 0
    if fn == "policy_loss":
        c.update(B=draw(st.integers(1, 3)), T=draw(st.integers(1, 5)))
    else:
        c.update(N=draw(st.integers(lo_n, 12)), batched=draw(st.booleans()))
    # the entropy options: drawn for valid cases only (an invalid case mutates one other argument)
    if fn in ("linear_cross_entropy", "cross_entropy"):
        c.update(reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                 ignore_index=draw(st.sampled_from([-100, 0, -1, 2**40])),
                 label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),
                 z_loss=draw(st.sampled_from([0.0, 1e-2])),
                 class_weight=draw(st.sampled_from([None, "positive", "negative", "mixed"])),
                 target_dtype=draw(st.sampled_from(["int64", "int32"])),
                 ignore_fraction=draw(st.sampled_from([0.0, 0.3, 1.0])),
                 return_stats=draw(st.booleans()), lse_grad=draw(st.booleans()))
        if c["class_weight"] == "mixed" and c["reduction"] == "mean":
            c["class_weight"] = "positive"  # a mean over weights of both signs can divide by ~0
        c["num_items"] = None
        if c["reduction"] != "none":
            c["num_items"] = draw(st.sampled_from([None, None, 3, 2.5, "tensor"]))
        if fn == "linear_cross_entropy":
            c.update(shift=draw(st.booleans()), entropy_coef=0.0, return_entropy=False)
            if not invalid and draw(st.booleans()):
                c.update(entropy_coef=draw(st.sampled_from([0.0, 0.1, -0.05])),
                         return_entropy=draw(st.booleans()))
        else:
            c.update(inplace_backward=draw(st.booleans()))
    elif fn == "token_logprobs":
        c.update(temperature=draw(st.sampled_from([1.0, 0.7, 2.0])), return_entropy=draw(st.booleans()),
                 pad_fraction=draw(st.sampled_from([0.0, 0.3])))
    elif fn == "distillation_loss":
        kind = draw(st.sampled_from(["forward_kl", "reverse_kl", "jsd"]))
        c.update(kind=kind, beta=draw(st.sampled_from([0.2, 0.5, 0.8])) if kind == "jsd" else 0.5,
                 temperature=draw(st.sampled_from([1.0, 0.7, 2.0])),
                 distill_weight=draw(st.sampled_from([1.0, 0.5])),
                 ce_weight=draw(st.sampled_from([0.0, 0.3])),
                 ignore_index=draw(st.sampled_from([-100, 0])),
                 reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                 teacher=draw(st.sampled_from(["logits", "weight", "weight_bias"])),
                 Ht=draw(st.integers(1, 5)),
                 label_smoothing=draw(st.sampled_from([0.0, 0.1])),
                 z_loss=draw(st.sampled_from([0.0, 1e-2])),
                 ignore_fraction=draw(st.sampled_from([0.0, 0.3, 1.0])), entropy_coef=0.0)
        if not invalid and draw(st.booleans()):
            c["entropy_coef"] = draw(st.sampled_from([0.05, -0.1]))
    else:
        c.update(old=draw(st.booleans()), adv_1d=draw(st.booleans()),
                 mask=draw(st.sampled_from([None, "float", "bool"])),
                 beta=draw(st.sampled_from([0.0, 0.04])),
                 epsilon_low=draw(st.sampled_from([0.2, 0.1])),
                 epsilon_high=draw(st.sampled_from([0.2, 0.28])),
                 temperature=draw(st.sampled_from([1.0, 0.7])),
                 loss_type=draw(st.sampled_from(["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo",
                                                  "vespo", "luspo"])),
                 entropy_coef=draw(st.sampled_from([0.0, 0.01])),
                 max_completion_length=draw(st.sampled_from([None, 8])))
    return c


def sharded_supported(c):
    """Every option of every drawn function runs sharded (entropy_coef and return_entropy
    included), so every valid case is checked on both paths."""
    return True


# ---------------------------------------------------------------------------------------------
# Building a case: full float64 tensors, which of them are sharded on the vocabulary, the call
# and the reference.
# ---------------------------------------------------------------------------------------------


class Spec:
    """tensors: name -> full tensor; vdim: name -> vocabulary dim of a sharded tensor; grad: the
    names differentiated; kwargs: scalar options; call(L, kw) -> {output: tensor};
    reference(R) -> {output: tensor} (R: the full tensors, float64 leaves); diff: outputs that
    carry a gradient."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _lead(c):
    if c["fn"] == "policy_loss":
        return (c["B"], c["T"])
    N = c["N"]
    return (2, N // 2) if c["batched"] and N % 2 == 0 else (N,)


def _targets(g, c, lead, V, ignore_index, fraction, dtype=torch.int64):
    t = torch.randint(0, V, lead, generator=g)
    drop = torch.rand(lead, generator=g) < fraction
    info = torch.iinfo(dtype)
    if info.min <= ignore_index <= info.max:
        t = torch.where(drop, torch.full_like(t, ignore_index), t)
    return t.to(dtype)


def _class_weight(g, kind, V):
    w = torch.rand(V, generator=g, dtype=F64) + 0.1
    if kind == "negative":
        return -w
    if kind == "mixed":
        return w * torch.where(torch.rand(V, generator=g) < 0.4, -1.0, 1.0).to(F64)
    return w


def _num_items(value):
    return torch.tensor(3.0, dtype=F64) if value == "tensor" else value


def _reduce_like_ce(tok, valid_w, reduction, num_items):
    """sum / mean (by the class-weighted count) / num_items_in_batch of per-token values."""
    if reduction == "none":
        return tok
    if num_items is not None:
        return tok.sum() / float(num_items)
    if reduction == "sum":
        return tok.sum()
    return tok.sum() / valid_w.sum()


def build(c):
    g = torch.Generator().manual_seed(c["seed"])
    V, H = c["V"], c["H"]
    lead = _lead(c)
    T = {}
    vdim = {}
    T["input"] = torch.randn(*lead, H, generator=g, dtype=F64)
    T["linear_weight"] = torch.randn(V, H, generator=g, dtype=F64) * H**-0.5 * 2
    vdim["linear_weight"] = 0
    if c["bias"]:
        T["linear_bias"] = torch.randn(V, generator=g, dtype=F64) * 0.5
        vdim["linear_bias"] = 0
    head = dict(softcap=c["softcap"], logit_scale=c["logit_scale"])
    fn = c["fn"]

    def final(R, bias=True):
        z = torch.nn.functional.linear(R["input"], R["linear_weight"], R.get("linear_bias") if bias else None)
        return ref.final_logits(z, c["logit_scale"], c["softcap"])

    if fn in ("linear_cross_entropy", "cross_entropy"):
        tdtype = torch.int32 if c["target_dtype"] == "int32" else torch.int64
        T["target"] = _targets(g, c, lead, V, c["ignore_index"], c["ignore_fraction"], tdtype)
        if c["class_weight"]:
            T["weight"] = _class_weight(g, c["class_weight"], V)
            vdim["weight"] = 0
        kw = dict(reduction=c["reduction"], ignore_index=c["ignore_index"],
                  label_smoothing=c["label_smoothing"], z_loss=c["z_loss"],
                  num_items_in_batch=_num_items(c["num_items"]), return_stats=c["return_stats"], **head)
        diff = ["loss"] + (["lse"] if c["return_stats"] and c["lse_grad"] else [])
        if fn == "linear_cross_entropy":
            kw.update(shift=c["shift"], chunk_size=c["chunk_size"])
            if c["entropy_coef"] or c["return_entropy"]:
                kw.update(entropy_coef=c["entropy_coef"], return_entropy=c["return_entropy"])
            grad = ["input", "linear_weight"] + (["linear_bias"] if c["bias"] else [])
            positional = ("input", "linear_weight", "target")
        else:
            # the logits are the input: 3x wider than the head's, the head itself is not passed
            T["input"] = (torch.nn.functional.linear(T["input"], T["linear_weight"], T.get("linear_bias")) * 3).detach()
            vdim = {"input": -1, **({"weight": 0} if "weight" in T else {})}
            T.pop("linear_weight")
            T.pop("linear_bias", None)
            kw.update(inplace_backward=c["inplace_backward"])
            grad = ["input"]
            positional = ("input", "target")
        if c["return_stats"] and fn == "linear_cross_entropy" and c["return_entropy"]:
            diff.append("entropy")

        def call(L, kw):
            out = getattr(fusedce, fn)(*[L[k] for k in positional], **kw,
                                       **{k: L[k] for k in ("linear_bias", "weight") if k in L})
            if not kw.get("return_stats"):
                return {"loss": out}
            res = dict(loss=out.loss, lse=out.lse, predicted=out.predicted, accuracy=out.accuracy,
                       z_loss=out.z_loss)
            if kw.get("return_entropy"):
                res["entropy"] = out.entropy
            return res

        def reference(R):
            logits = R["input"] if fn == "cross_entropy" else torch.nn.functional.linear(
                R["input"], R["linear_weight"], R.get("linear_bias"))
            t = R["target"].long()  # the reference compares targets with ignore_index exactly
            num = None if c["num_items"] is None else float(_num_items(c["num_items"]))
            r = ref.cross_entropy(logits, t, weight=R.get("weight"), reduction=c["reduction"],
                                  ignore_index=c["ignore_index"], label_smoothing=c["label_smoothing"],
                                  z_loss=c["z_loss"], num_items_in_batch=num,
                                  shift=c.get("shift", False), **head)
            loss = r.loss
            if c.get("entropy_coef"):
                tt = ref.shift_labels(t, c["ignore_index"]) if c["shift"] else t
                valid = (tt != c["ignore_index"]).to(F64)
                w = R.get("weight")
                vw = valid if w is None else w[torch.where(tt != c["ignore_index"], tt, 0)] * valid
                ent = ref.entropy(logits, logit_scale=c["logit_scale"], softcap=c["softcap"])
                loss = loss + _reduce_like_ce(c["entropy_coef"] * ent * valid, vw, c["reduction"], num)
            if not c["return_stats"]:
                return {"loss": loss}
            res = dict(loss=loss, lse=r.lse, predicted=r.predicted, accuracy=r.accuracy, z_loss=r.z_loss)
            if c.get("return_entropy"):
                res["entropy"] = ref.entropy(logits, logit_scale=c["logit_scale"], softcap=c["softcap"])
            return res

        return Spec(tensors=T, vdim=vdim, grad=grad, kwargs=kw, call=call, reference=reference, diff=diff)

    if fn == "token_logprobs":
        t = torch.randint(0, V, lead, generator=g)
        pad = torch.rand(lead, generator=g) < c["pad_fraction"]
        T["target"] = torch.where(pad, torch.full_like(t, -100), t)
        kw = dict(temperature=c["temperature"], return_entropy=c["return_entropy"],
                  chunk_size=c["chunk_size"], **head)

        def call(L, kw):
            out = fusedce.token_logprobs(L["input"], L["linear_weight"], L["target"],
                                         linear_bias=L.get("linear_bias"), **kw)
            return dict(logprobs=out[0], entropy=out[1]) if kw["return_entropy"] else dict(logprobs=out)

        def reference(R):
            t = R["target"]
            padded = t == -100
            lp, ent = ref.token_logprobs(final(R), torch.where(padded, 0, t), temperature=c["temperature"])
            lp = torch.where(padded, torch.zeros_like(lp), lp)  # HF's padding label: 0, no gradient
            return dict(logprobs=lp, entropy=ent) if c["return_entropy"] else dict(logprobs=lp)

        diff = ["logprobs"] + (["entropy"] if c["return_entropy"] else [])
        grad = ["input", "linear_weight"] + (["linear_bias"] if c["bias"] else [])
        return Spec(tensors=T, vdim=vdim, grad=grad, kwargs=kw, call=call, reference=reference, diff=diff)

    if fn == "distillation_loss":
        T["target"] = _targets(g, c, lead, V, c["ignore_index"], c["ignore_fraction"])
        Ht = c["Ht"]
        if c["teacher"] == "logits":
            T["teacher_logits"] = torch.randn(*lead, V, generator=g, dtype=F64) * 2
            vdim["teacher_logits"] = -1
        else:
            T["teacher_input"] = torch.randn(*lead, Ht, generator=g, dtype=F64)
            T["teacher_weight"] = torch.randn(V, Ht, generator=g, dtype=F64) * Ht**-0.5 * 2
            vdim["teacher_weight"] = 0
            if c["teacher"] == "weight_bias":
                T["teacher_bias"] = torch.randn(V, generator=g, dtype=F64)
                vdim["teacher_bias"] = 0
        kw = dict(kind=c["kind"], beta=c["beta"], temperature=c["temperature"],
                  distill_weight=c["distill_weight"], ce_weight=c["ce_weight"],
                  ignore_index=c["ignore_index"], reduction=c["reduction"],
                  label_smoothing=c["label_smoothing"], z_loss=c["z_loss"],
                  chunk_size=c["chunk_size"], **head)
        if c["entropy_coef"]:
            kw["entropy_coef"] = c["entropy_coef"]
        teacher_names = ("teacher_logits", "teacher_input", "teacher_weight", "teacher_bias")

        def call(L, kw):
            return {"loss": fusedce.distillation_loss(
                L["input"], L["linear_weight"], L["target"], linear_bias=L.get("linear_bias"),
                **{k: L[k] for k in teacher_names if k in L}, **kw)}

        def reference(R):
            zs = final(R)
            tl = R.get("teacher_logits")
            if tl is None:
                tl = torch.nn.functional.linear(R["teacher_input"], R["teacher_weight"], R.get("teacher_bias"))
            t = R["target"]
            valid = t != c["ignore_index"]
            d = ref.distillation_token_loss(zs, tl, kind=c["kind"], beta=c["beta"], temperature=c["temperature"])
            ce = ref.cross_entropy(zs, t, reduction="none", ignore_index=c["ignore_index"],
                                   label_smoothing=c["label_smoothing"])
            tok = c["distill_weight"] * d + c["ce_weight"] * ce.token_loss + c["z_loss"] * ce.lse**2
            if c["entropy_coef"]:
                tok = tok + c["entropy_coef"] * ref.entropy(zs)
            tok = torch.where(valid, tok, torch.zeros_like(tok))
            if c["reduction"] == "none":
                return {"loss": tok}
            if c["reduction"] == "sum":
                return {"loss": tok.sum()}
            return {"loss": tok.sum() / valid.sum()}

        grad = ["input", "linear_weight"] + (["linear_bias"] if c["bias"] else [])
        return Spec(tensors=T, vdim=vdim, grad=grad, kwargs=kw, call=call, reference=reference, diff=["loss"])

    # policy_loss
    B, Tn = lead
    T["target"] = torch.randint(0, V, lead, generator=g)
    with torch.no_grad():
        lp0, _ = ref.token_logprobs(final(T), T["target"], temperature=c["temperature"])
    if c["old"]:
        T["old_logprobs"] = lp0 + torch.randn(lead, generator=g, dtype=F64) * 0.4
    T["advantages"] = torch.randn((B,) if c["adv_1d"] else lead, generator=g, dtype=F64)
    if c["mask"]:
        m = torch.rand(lead, generator=g) < 0.7
        T["mask"] = m if c["mask"] == "bool" else m.to(F64)
    if c["beta"]:
        T["ref_logprobs"] = lp0 + torch.randn(lead, generator=g, dtype=F64) * 0.3
    kw = dict(beta=c["beta"], epsilon_low=c["epsilon_low"], epsilon_high=c["epsilon_high"],
              temperature=c["temperature"], loss_type=c["loss_type"], entropy_coef=c["entropy_coef"],
              max_completion_length=c["max_completion_length"], chunk_size=c["chunk_size"], **head)

    def call(L, kw):
        loss, metrics = fusedce.policy_loss(
            L["input"], L["linear_weight"], L["target"], L.get("old_logprobs"), L["advantages"],
            mask=L.get("mask"), ref_logprobs=L.get("ref_logprobs"), linear_bias=L.get("linear_bias"), **kw)
        return dict(loss=loss, **{k: metrics[k] for k in _POLICY_METRICS if k in metrics})

    def reference(R):
        loss, _, lp, ent = ref.policy_loss(
            final(R), R["target"], R.get("old_logprobs"), R["advantages"], mask=R.get("mask"),
            ref_logprobs=R.get("ref_logprobs"), beta=c["beta"], epsilon_low=c["epsilon_low"],
            epsilon_high=c["epsilon_high"], temperature=c["temperature"], loss_type=c["loss_type"],
            entropy_coef=c["entropy_coef"], max_completion_length=c["max_completion_length"])
        m = torch.ones(lead, dtype=F64) if R.get("mask") is None else R["mask"].to(F64)
        count = m.sum().clamp(min=1)
        old = R.get("old_logprobs")
        ratio = torch.ones_like(lp) if old is None else torch.exp(lp - old)
        a = R["advantages"][:, None].expand(lead) if R["advantages"].dim() == 1 else R["advantages"]
        low = (ratio < 1 - c["epsilon_low"]) & (a < 0)
        high = (ratio > 1 + c["epsilon_high"]) & (a > 0)
        out = {"loss": loss, "logprob/mean": (lp * m).sum() / count, "entropy": (ent * m).sum() / count,
               "ratio/mean": (ratio * m).sum() / count,
               "clip_ratio/region_mean": ((low | high).to(F64) * m).sum() / count}
        if c["beta"]:
            d = R["ref_logprobs"] - lp
            # TRL 1.16's default use_bias_correction_kl: the KL weighted by the ratio
            out["kl"] = ((torch.exp(d) - d - 1) * ratio * m).sum() / count
        return {k: v.detach() if k != "loss" else v for k, v in out.items()}

    grad = ["input", "linear_weight"] + (["linear_bias"] if c["bias"] else [])
    return Spec(tensors=T, vdim=vdim, grad=grad, kwargs=kw, call=call, reference=reference, diff=["loss"])


_POLICY_METRICS = ("logprob/mean", "entropy", "ratio/mean", "clip_ratio/region_mean", "kl")


# ---------------------------------------------------------------------------------------------
# Invalid arguments: applied to the tensors as this path passes them (after sharding), so a
# wrong shape is wrong on every rank.
# ---------------------------------------------------------------------------------------------


def mutate(c, L, kw):
    m = c["invalid"]
    fn, V = c["fn"], c["V"]
    t = L["target"]
    if m in ("target_oob_high", "target_oob_neg", "token_minus1_in_mask"):
        t = t.clone()
        bad = V if m == "target_oob_high" else (-2 if m == "target_oob_neg" else -1)
        t.view(-1)[-1] = bad
        L["target"] = t
        kw.pop("shift", None)  # the shift would drop the first label of a length-1 row
        if "mask" in L:
            L["mask"] = L["mask"].clone()
            L["mask"].view(-1)[-1] = 1  # the bad token is inside the mask
    elif m == "target_float":
        L["target"] = t.to(F64)
    elif m == "target_shape":
        L["target"] = torch.cat([t.reshape(-1), t.reshape(-1)[:1]])
    elif m.startswith("softcap_"):
        kw["softcap"] = {"zero": 0.0, "neg": -1.0, "nan": math.nan, "inf": math.inf}[m[8:]]
    elif m.startswith("logit_scale_"):
        kw["logit_scale"] = math.nan if m.endswith("nan") else math.inf
    elif m == "weight_dtype":
        L["linear_weight"] = L["linear_weight"].float()
    elif m == "weight_hidden":
        W = L["linear_weight"]
        L["linear_weight"] = torch.cat([W, torch.zeros(W.shape[0], 1, dtype=W.dtype)], 1)
    elif m == "input_int":
        L["input"] = L["input"].round().long()
    elif m == "bias_shape":
        b = L.get("linear_bias", torch.zeros(L["linear_weight"].shape[0], dtype=F64))
        L["linear_bias"] = torch.cat([b, b.new_zeros(1)])
    elif m == "bias_dtype":
        L["linear_bias"] = L.get("linear_bias", torch.zeros(L["linear_weight"].shape[0], dtype=F64)).float()
    elif m == "chunk_zero":
        kw["chunk_size"] = 0
    elif m.startswith("z_loss_"):
        kw["z_loss"] = -0.1 if m.endswith("neg") else math.nan
    elif m.startswith("ls_"):
        kw["label_smoothing"] = {"gt1": 1.5, "neg": -0.1, "nan": math.nan}[m[3:]]
    elif m == "reduction_bad":
        kw["reduction"] = "avg"
    elif m == "cw_shape":
        w = L.get("weight", torch.ones(L["input"].shape[-1] if fn == "cross_entropy" else L["linear_weight"].shape[0], dtype=F64))
        L["weight"] = torch.cat([w, w.new_ones(1)])
    elif m == "cw_int":
        n = L["input"].shape[-1] if fn == "cross_entropy" else L["linear_weight"].shape[0]
        L["weight"] = torch.ones(n, dtype=torch.int64)
    elif m.startswith("num_items_"):
        kw["reduction"] = "sum"
        kw["num_items_in_batch"] = {"zero": 0, "neg": -4, "nan": math.nan}[m[10:]]
    elif m == "entropy_coef_nan":
        kw["entropy_coef"] = math.nan
    elif m.startswith("temperature_"):
        kw["temperature"] = {"zero": 0.0, "neg": -1.0, "nan": math.nan}[m[12:]]
    elif m == "kind_bad":
        kw["kind"] = "kl"
    elif m == "beta_jsd_out":
        kw.update(kind="jsd", beta=1.0)
    elif m == "beta_nan":
        kw["beta"] = math.nan
    elif m in ("distill_weight_neg", "ce_weight_neg", "distill_weight_nan", "ce_weight_nan"):
        kw[m.rsplit("_", 1)[0]] = -0.5 if m.endswith("neg") else math.nan
    elif m == "teacher_both":
        if "teacher_logits" in L:
            L["teacher_input"] = L["input"].detach()
            L["teacher_weight"] = L["linear_weight"].detach()
        else:
            L["teacher_logits"] = torch.zeros(*L["input"].shape[:-1], L["linear_weight"].shape[0], dtype=F64)
    elif m == "teacher_none":
        for k in ("teacher_logits", "teacher_input", "teacher_weight", "teacher_bias"):
            L.pop(k, None)
    elif m == "teacher_logits_shape":
        for k in ("teacher_input", "teacher_weight", "teacher_bias"):
            L.pop(k, None)
        L["teacher_logits"] = torch.zeros(*L["input"].shape[:-1], L["linear_weight"].shape[0] + 1, dtype=F64)
    elif m == "loss_type_bad":
        kw["loss_type"] = "ppo"
    elif m == "eps_low_gt1":
        kw["epsilon_low"] = 1.5
    elif m == "eps_high_neg":
        kw["epsilon_high"] = -0.1
    elif m == "eps_low_nan":
        kw["epsilon_low"] = math.nan
    elif m == "max_len_zero":
        kw["max_completion_length"] = 0
    elif m == "beta_no_ref":
        kw["beta"] = 0.1
        L.pop("ref_logprobs", None)
    elif m == "old_shape":
        L["old_logprobs"] = torch.zeros(L["target"].shape[0], L["target"].shape[1] + 1, dtype=F64)
    elif m == "adv_shape":
        L["advantages"] = torch.zeros(L["target"].shape[0] + 1, dtype=F64)
    elif m == "mask_shape":
        L["mask"] = torch.ones(L["target"].shape[0], L["target"].shape[1] + 1, dtype=F64)
    elif m == "input_2d":
        L["input"] = L["input"].reshape(-1, L["input"].shape[-1])
    else:  # pragma: no cover
        raise AssertionError(f"unknown mutation {m}")


# ---------------------------------------------------------------------------------------------
# Running a case on one path and checking it
# ---------------------------------------------------------------------------------------------


def _layout(c, shard):
    """(lo, hi) of this path's vocabulary slice: the whole vocabulary single-process."""
    if shard is None:
        return 0, c["V"]
    rank, _ = shard
    return (0, c["split"]) if rank == 0 else (c["split"], c["V"])


def _upstream(c, name, like):
    g = torch.Generator().manual_seed(c["seed"] + 1 + sum(map(ord, name)))
    if like.dim() == 0:
        return torch.rand((), generator=g, dtype=F64) + 0.5
    return torch.randn(like.shape, generator=g, dtype=F64)


def _grads(outs, diff, leaves, c, ref_side):
    """Gradients of sum_k <upstream_k, out_k> over the differentiable outputs. A NaN scalar (the
    mean over no token) has zero gradients (torch's convention; the reference's 0/0 is NaN)."""
    ys, us = [], []
    for k in diff:
        y = outs.get(k)
        if y is None or not y.requires_grad:
            continue
        if ref_side and y.dim() == 0 and math.isnan(float(y.detach())):
            continue
        ys.append(y)
        us.append(_upstream(c, k, y).to(y.dtype))
    names = list(leaves)
    if not ys:
        return {k: torch.zeros_like(v) for k, v in leaves.items()}
    gs = torch.autograd.grad(ys, [leaves[k] for k in names], us, allow_unused=True)
    return {k: torch.zeros_like(leaves[k]) if gv is None else gv for k, gv in zip(names, gs)}


def evaluate(c, shard):
    """Run case `c` on one path (shard None: single process; (rank, world): vocab-parallel on the
    initialized default group). Returns ("error", type name, message) when the call (or its
    backward) raised, else ("ok", [mismatches against the reference])."""
    spec = build(c)
    lo, hi = _layout(c, shard)
    L = {}
    for k, v in spec.tensors.items():
        d = spec.vdim.get(k)
        L[k] = v if d is None else v.narrow(d % v.dim(), lo, hi - lo).clone()
    kw = dict(spec.kwargs)
    if shard is not None:
        kw["process_group"] = dist.group.WORLD
        if c["vocab_start"]:
            kw["vocab_start"] = lo
    if c["invalid"]:
        mutate(c, L, kw)
    for k in spec.grad:
        if k in L and L[k].is_floating_point():
            L[k] = L[k].detach().clone().requires_grad_(True)
    leaves = {k: L[k] for k in spec.grad if k in L and L[k].requires_grad}
    try:
        out = spec.call(L, kw)
        grads = _grads(out, spec.diff, leaves, c, False)
    except Exception as e:  # noqa: BLE001 - what was raised is the result
        return ("error", type(e).__name__, f"{e}")
    if c["invalid"]:
        return ("ok", [])

    R = {k: (v.detach().clone().requires_grad_(True) if k in spec.grad else v) for k, v in spec.tensors.items()}
    expect = spec.reference(R)
    ref_grads = _grads(expect, spec.diff, {k: R[k] for k in spec.grad}, c, True)
    problems = []

    def check(fn_, *a, what):
        try:
            fn_(*a)
        except AssertionError as e:
            problems.append(f"{what}: {str(e)[:600]}")

    for k, v in expect.items():
        got = out.get(k)
        if got is None:
            problems.append(f"output {k}: missing")
        elif k == "predicted":
            if not torch.equal(got, v):
                problems.append(f"output predicted: {got.tolist()} != {v.tolist()}")
        else:
            check(lambda a=got, b=v, k=k: _close(a, b, k), what=f"output {k}")
    for k, gv in grads.items():
        d = spec.vdim.get(k)
        want = ref_grads[k] if d is None else ref_grads[k].narrow(d % ref_grads[k].dim(), lo, hi - lo)
        check(lambda a=gv, b=want, k=k: _close(a, b, f"grad {k}"), what=f"grad {k}")
    return ("ok", problems)


def _close(a, b, what):
    assert a.dtype == b.dtype or b.dtype == torch.int64, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert_close(a, b, F64, what=what)


# ---------------------------------------------------------------------------------------------
# The pool of 2 gloo ranks
# ---------------------------------------------------------------------------------------------


def _healthy(world):
    """Whether the group still works after a case: one rank may have raised while the other
    waited in a collective (then timed out and closed the connection)."""
    try:
        x = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
        dist.all_reduce(x)
        return bool(torch.equal(x, torch.tensor([1.0, 2.0, 3.0], dtype=F64) * world))
    except Exception:  # noqa: BLE001
        return False


def _worker(rank, world, init_file, qin, qout):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=15))
    try:
        while True:
            c = qin.get()
            if c is None:
                break
            try:
                res = evaluate(c, (rank, world))
            except Exception:  # noqa: BLE001 - the checking itself broke: report it
                res = ("ok", [f"the check raised:\n{traceback.format_exc()}"])
            qout.put((rank, res, _healthy(world)))
    finally:
        dist.destroy_process_group()


class Pool:
    """2 gloo ranks waiting for cases; respawned when they stop agreeing (a hang)."""

    def __init__(self):
        self.procs = []
        self._start()

    def _start(self):
        ctx = mp.get_context("spawn")
        self.tmp = tempfile.mkdtemp(prefix="fusedce_props_")
        init = os.path.join(self.tmp, "init")
        self.qin = [ctx.Queue() for _ in range(WORLD)]
        self.qout = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(r, WORLD, init, self.qin[r], self.qout), daemon=True)
                      for r in range(WORLD)]
        for p in self.procs:
            p.start()

    def close(self):
        for q in self.qin:
            q.put(None)
        for p in self.procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _restart(self):
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._start()

    def run(self, c, timeout=60):
        for q in self.qin:
            q.put(c)
        res, ok = {}, True
        while len(res) < WORLD:
            try:
                r, out, healthy = self.qout.get(timeout=timeout)
            except queue.Empty:
                self._restart()
                return [("hang", "", f"no answer from rank(s) {sorted(set(range(WORLD)) - set(res))} in {timeout} s")] * WORLD
            res[r] = out
            ok = ok and healthy
        if not ok or len({x[0] for x in res.values()}) > 1:
            self._restart()  # the ranks disagreed: their collectives may no longer match
        return [res[r] for r in range(WORLD)]


@pytest.fixture(scope="module")
def pool():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo is not available")
    p = Pool()
    yield p
    p.close()


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------


def _names(msg, name):
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", msg) is not None


def _fmt(res):
    return f"{res[0]}: {res[1]} {res[2]}" if res[0] != "ok" else f"ok {res[1]}"


def _check_valid(pool, c):
    problems = []
    single = evaluate(c, None)
    if single[0] != "ok":
        problems.append(f"single process raised {single[1]}: {single[2]}")
    else:
        problems += [f"single process: {p}" for p in single[1]]
    if sharded_supported(c):
        for r, res in enumerate(pool.run(c)):
            if res[0] != "ok":
                problems.append(f"rank {r} raised {res[1]}: {res[2]}")
            else:
                problems += [f"rank {r}: {p}" for p in res[1]]
    assert not problems, f"case {c}\n" + "\n".join(problems)


@pytest.mark.parametrize("fn", FUNCTIONS)
@_settings(40)
@given(data=st.data())
def test_valid_both_paths(pool, fn, data):
    """Values and gradients equal the float64 reference, single process and vocab-parallel."""
    _check_valid(pool, data.draw(cases(fn)))


@pytest.mark.parametrize("fn", FUNCTIONS)
@_settings(2)
@given(data=st.data())
def test_valid_empty_shard(pool, fn, data):
    """The same with one rank holding no vocabulary (a Shard(0) DTensor with V < world)."""
    _check_valid(pool, data.draw(cases(fn, empty_shard=True)))


INVALID_PAIRS = [(fn, m) for fn in FUNCTIONS for m in INVALID if fn in INVALID[m][1]]


@pytest.mark.parametrize("fn,mutation", INVALID_PAIRS)
@_settings(3)
@given(data=st.data())
def test_invalid_both_paths(pool, fn, mutation, data):
    """An invalid argument: both paths raise the same exception type, naming the argument."""
    c = data.draw(cases(fn, invalid=mutation))
    name = expected_name(fn, mutation)
    problems = []
    single = evaluate(c, None)
    if single[0] != "error":
        problems.append(f"single process accepted it ({_fmt(single)})")
    elif not _names(single[2], name):
        problems.append(f"single process: the {single[1]} does not name {name!r}: {single[2]}")
    for r, res in enumerate(pool.run(c)):
        if res[0] != "error":
            problems.append(f"rank {r} accepted it ({_fmt(res)})")
            continue
        if single[0] == "error" and res[1] != single[1]:
            problems.append(f"rank {r} raised {res[1]}, single process {single[1]}: {res[2]}")
        if not _names(res[2], name):
            problems.append(f"rank {r}: the {res[1]} does not name {name!r}: {res[2]}")
    assert not problems, f"case {c} (invalid {mutation}: {name})\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# Fixed cases: what this suite found, kept as plain regression tests (each is a reproducer).
# ---------------------------------------------------------------------------------------------

_BASE = dict(seed=7, invalid=None, V=5, H=3, split=2, vocab_start=False, chunk_size=None,
             softcap=None, logit_scale=1.0, bias=False, N=6, batched=False)
DEFAULTS = {
    "linear_cross_entropy": dict(_BASE, fn="linear_cross_entropy", reduction="mean", ignore_index=-100,
                                 label_smoothing=0.0, z_loss=0.0, class_weight=None, target_dtype="int64",
                                 ignore_fraction=0.0, return_stats=True, lse_grad=False, num_items=None,
                                 shift=False, entropy_coef=0.0, return_entropy=False),
    "cross_entropy": dict(_BASE, fn="cross_entropy", reduction="mean", ignore_index=-100,
                          label_smoothing=0.0, z_loss=0.0, class_weight=None, target_dtype="int64",
                          ignore_fraction=0.0, return_stats=True, lse_grad=False, num_items=None,
                          inplace_backward=False),
    "distillation_loss": dict(_BASE, fn="distillation_loss", kind="forward_kl", beta=0.5,
                              temperature=1.0, distill_weight=1.0, ce_weight=0.3, ignore_index=-100,
                              reduction="mean", teacher="logits", Ht=2, label_smoothing=0.0,
                              z_loss=0.0, ignore_fraction=0.0, entropy_coef=0.0),
}


def fixed_case(fn, **overrides):
    c = dict(DEFAULTS[fn])
    c.update(overrides)
    return c


def test_reference_negative_class_weights_match_torch():
    """reference.cross_entropy's mean divides by the class-weighted count also when it is
    negative (torch does); it is nan only when no token counts (it was nan for any sum <= 0)."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 5, generator=g, dtype=F64)
    t = torch.tensor([0, 1, 2, 3, 4, -100])
    for w in (-(torch.rand(5, generator=g, dtype=F64) + 0.1), torch.rand(5, generator=g, dtype=F64) + 0.1):
        r = ref.cross_entropy(z, t, weight=w)
        assert_close(r.loss, torch.nn.functional.cross_entropy(z, t, weight=w), F64, what="mean loss")
    assert torch.isnan(ref.cross_entropy(z, torch.full_like(t, -100), weight=-w).loss)


@pytest.mark.parametrize("fn,teacher", [("cross_entropy", None), ("distillation_loss", "logits")])
@pytest.mark.parametrize("split", [0, 5])
def test_empty_vocabulary_shard(pool, fn, teacher, split):
    """A rank holding no vocabulary: the sharded logits (and teacher logits) were reshaped with
    -1 over a zero-size last dimension ("cannot reshape tensor of 0 elements")."""
    _check_valid(pool, fixed_case(fn, split=split, **({"teacher": teacher} if teacher else {})))


@pytest.mark.parametrize("N,ignore_fraction", [(0, 0.0), (6, 1.0)])
@pytest.mark.parametrize("teacher", ["logits", "weight"])
def test_sharded_distillation_mean_over_no_token(pool, N, ignore_fraction, teacher):
    """The sharded distillation_loss's mean over no token (empty or all ignored): nan loss as
    single-process and torch, and zero gradients (they were 0 / 0 = nan)."""
    _check_valid(pool, fixed_case("distillation_loss", N=N, ignore_fraction=ignore_fraction, teacher=teacher))


@pytest.mark.parametrize("bad", [5, 7, -3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_out_of_range_target_with_class_weights_names_target(bad, reduction):
    """linear_cross_entropy with class weights looked w[target] up for the mean's denominator (and
    the statistics) before the op's range check: an IndexError that does not name `target`."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, generator=g, dtype=F64)
    W = torch.randn(5, 4, generator=g, dtype=F64)
    cw = torch.rand(5, generator=g, dtype=F64) + 0.1
    t = torch.tensor([0, 1, bad])
    for kw in (dict(), dict(return_stats=True)):
        with pytest.raises(RuntimeError, match=r"\btarget\b"):
            fusedce.linear_cross_entropy(x, W, t, weight=cw, reduction=reduction, **kw)
        with pytest.raises(RuntimeError, match=r"\btarget\b"):
            fusedce.cross_entropy(x @ W.T, t, weight=cw, reduction=reduction, **kw)


# Valid cases the draws reach only by luck, kept explicit: (name, function, overrides).
FIXED_VALID = [
    ("negative_class_weights_mean_linear", "linear_cross_entropy", dict(class_weight="negative")),
    ("negative_class_weights_mean_logits", "cross_entropy", dict(class_weight="negative")),
    ("int32_target_ignore_index_beyond_int32", "linear_cross_entropy",
     dict(target_dtype="int32", ignore_index=2**40)),
    ("int32_target_ignore_index_beyond_int32_logits", "cross_entropy",
     dict(target_dtype="int32", ignore_index=2**40)),
    ("int32_target_ignore_index_beyond_int32_shift", "linear_cross_entropy",
     dict(target_dtype="int32", ignore_index=2**40, shift=True, batched=True)),
]


@pytest.mark.parametrize("fn,overrides", [pytest.param(f, o, id=n) for n, f, o in FIXED_VALID])
def test_fixed_valid_cases(pool, fn, overrides):
    _check_valid(pool, fixed_case(fn, **overrides))
