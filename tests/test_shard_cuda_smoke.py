"""The CUDA vocab-parallel term ops (shard_partials, shard_jsd, shard_finish, shard_backward_) on two
shards of one logits matrix against fusedce::loss / loss_backward on the whole vocabulary, run on
the CPU in float64 with hidden = the logits and weight = the identity (so that d/d(hidden) is
d/d(logits)). Skipped without CUDA."""

import pytest
import torch

import fusedce  # noqa: F401  (registers the ops)
from fusedce import _C
from fusedce._op_args import TermOptions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

L = _C.shard_layout()
PART, ROW, COEF = L["parts"], L["rows"], L["coefs"]
N, V = 37, 1000
SHARDS = [(0, 400), (400, 1000)]
IGNORE = -100


def _case(name, g):
    """(loss keyword arguments, TermOptions without tensors, per-row tensors) of one term family."""
    kw = dict(label_smoothing=0.0, z_loss=0.0, softcap=0.0, logit_scale=1.0)
    cw = None
    rowt = {}
    teacher = None
    if name == "ce":
        kw.update(label_smoothing=0.1, z_loss=1e-3, softcap=15.0, logit_scale=1.3)
        cw = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
        opts = TermOptions(ce_weight=0.7, want_logprob=True)
    elif name == "entropy":
        rowt["entropy_weights"] = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
        opts = TermOptions(entropy_coef=-0.05, want_entropy=True)
    elif name == "logprob":
        kw.update(softcap=30.0)
        opts = TermOptions(want_logprob=True, want_entropy=True, want_mean_logit=True,
                           want_log_sum_sq=True)
    elif name in ("fkl", "rkl", "jsd"):
        kw.update(label_smoothing=0.05)
        teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
        opts = TermOptions(ce_weight=0.5, distill={"fkl": 1, "rkl": 2, "jsd": 3}[name],
                           distill_weight=0.8, distill_temperature=2.0, distill_beta=0.3)
    elif name.startswith("policy"):
        rowt["advantages"] = torch.randn(N, generator=g, dtype=torch.float64)
        rowt["old_logprobs"] = 0.3 * torch.randn(N, generator=g, dtype=torch.float64)  # + logprob
        rowt["ref_logprobs"] = 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
        kind = {"policy": 0, "policy_cispo": 1, "policy_sapo": 2}[name]
        opts = TermOptions(ce_weight=0.0, want_logprob=True, kl_beta=0.04, policy_kind=kind,
                           epsilon_low=0.2, epsilon_high=0.28 if kind != 1 else 2.0,
                           kl_bias_correction=kind == 0)
    else:
        raise AssertionError(name)
    return kw, cw, teacher, opts, rowt


def _lists(opts):
    packed = opts.pack()
    return dict(term_floats=packed.get("term_floats", []), term_ints=packed.get("term_ints", []))


CASES = ["ce", "entropy", "logprob", "fkl", "rkl", "jsd", "policy", "policy_cispo", "policy_sapo"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", CASES)
def test_shard_terms_match_whole_vocabulary(name, dtype):
    g = torch.Generator().manual_seed(CASES.index(name) + 10)
    kw, cw, teacher, opts, rowt = _case(name, g)
    # the logits (and teacher) as the device dtype holds them; the reference sees the same values
    raw = (torch.randn(N, V, generator=g, dtype=torch.float64) * 3).to(dtype).double()
    if teacher is not None:
        teacher = teacher.to(dtype).double()
    t = torch.randint(0, V, (N,), generator=g)
    t[[2, 11, 30]] = IGNORE
    if "old_logprobs" in rowt:  # ratios about 1: both sides of the clipping are reached
        lp = torch.log_softmax(raw, -1).gather(1, t.clamp(min=0)[:, None])[:, 0]
        rowt["old_logprobs"] = lp + rowt["old_logprobs"]
        rowt["ref_logprobs"] = lp + rowt["ref_logprobs"]
    up = {k: torch.randn(N, generator=g, dtype=torch.float64)
          for k in ("g_token_loss", "g_lse", "g_entropy", "g_logprob")}
    if not opts.want_entropy:
        up["g_entropy"] = torch.zeros(N, dtype=torch.float64)
    if not opts.want_logprob:
        up["g_logprob"] = torch.zeros(N, dtype=torch.float64)

    # the whole vocabulary, float64 on the CPU
    eye = torch.eye(V, dtype=torch.float64)
    full = opts._replace(teacher_logits=teacher, **rowt)
    ref = torch.ops.fusedce.loss(raw, eye, t, class_weight=cw, ignore_index=IGNORE, **kw,
                                 **full.pack())
    (grad_ref, _, _) = torch.ops.fusedce.loss_backward(
        raw, eye, t, None, cw, ref[2], up["g_token_loss"], grad_lse=up["g_lse"],
        grad_entropy=up["g_entropy"] if opts.want_entropy else None,
        grad_logprob=up["g_logprob"] if opts.want_logprob else None, ignore_index=IGNORE, **kw,
        grad_mask=[True, False, False], **full._replace(want_mean_logit=False,
                                                         want_log_sum_sq=False).pack())

    # the shards on the GPU
    dev = "cuda"
    z = raw.to(dev, dtype)
    tb = teacher.to(dev, dtype) if teacher is not None else None
    td = t.to(dev)
    cwd = cw.to(dev) if cw is not None else None
    lists = _lists(opts)
    sk = dict(softcap=kw["softcap"], logit_scale=kw["logit_scale"])
    parts = []
    for a, b in SHARDS:
        parts.append(torch.ops.fusedce.shard_partials(
            z[:, a:b].contiguous(), td, a, cwd[a:b] if cwd is not None else None,
            tb[:, a:b].contiguous() if tb is not None else None, IGNORE, **sk, **lists))
    P = torch.stack(parts)
    assert P.dtype == torch.float32 and P.shape == (2, N, PART["kParts"])
    fin = dict(ignore_index=IGNORE, label_smoothing=kw["label_smoothing"], z_loss=kw["z_loss"],
               **{k: v.to(dev) for k, v in up.items()}, **{k: v.to(dev) for k, v in rowt.items()},
               **lists)
    rows, coefs = torch.ops.fusedce.shard_finish(P, td, None, **fin)
    if opts.distill == 3:
        jsd = sum(torch.ops.fusedce.shard_jsd(z[:, a:b].contiguous(), tb[:, a:b].contiguous(),
                                              coefs, **sk, **lists) for a, b in SHARDS)
        rows, coefs = torch.ops.fusedce.shard_finish(P, td, jsd, **fin)
    grads = []
    for a, b in SHARDS:
        gs = z[:, a:b].contiguous()
        torch.ops.fusedce.shard_backward_(gs, td, a, coefs, cwd[a:b] if cwd is not None else None,
                                          tb[:, a:b].contiguous() if tb is not None else None,
                                          IGNORE, **sk, **lists)
        grads.append(gs)
    grad = torch.cat(grads, 1).double().cpu()
    rows = rows.double().cpu()

    valid = t != IGNORE
    tol = dict(rtol=1e-4, atol=1e-4)  # float32 accumulation of exactly the reference's inputs
    torch.testing.assert_close(rows[:, ROW["kTokenLoss"]], ref[1], **tol)
    torch.testing.assert_close(rows[:, ROW["kLse"]], ref[2], **tol)
    torch.testing.assert_close(rows[:, ROW["kPredicted"]].long(), ref[3])
    if opts.want_entropy:
        torch.testing.assert_close(rows[:, ROW["kEntropy"]], ref[4], **tol)
    if opts.want_logprob:
        torch.testing.assert_close(rows[:, ROW["kLogprob"]], ref[5], **tol)
    if opts.want_mean_logit:
        torch.testing.assert_close(rows[:, ROW["kMeanLogit"]], ref[9], **tol)
    if opts.want_log_sum_sq:
        torch.testing.assert_close(rows[:, ROW["kLogSumSq"]], ref[10], **tol)
    wt = cw[t.clamp(min=0)] if cw is not None else torch.ones(N, dtype=torch.float64)
    torch.testing.assert_close(rows[:, ROW["kWeightAtTarget"]], torch.where(valid, wt, 0.0), **tol)
    scale = grad_ref.abs().max().item()
    if dtype == torch.bfloat16:  # the gradient is rounded to bfloat16 once
        torch.testing.assert_close(grad, grad_ref, rtol=1e-2, atol=4e-3 * scale)
    else:
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-5 * scale)


def test_shard_terms_bad_target():
    """An out-of-range target: NaN token loss and log-prob, a NaN gradient row when an upstream
    gradient is nonzero; the lse, the entropy and the other rows stay exact."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, V, (N,), generator=g)
    t[4] = V + 3
    t[9] = -1
    opts = TermOptions(want_logprob=True, want_entropy=True, entropy_coef=0.1)
    lists = _lists(opts)
    z = raw.to("cuda", torch.float32)
    td = t.to("cuda")
    P = torch.stack([torch.ops.fusedce.shard_partials(z[:, a:b].contiguous(), td, a, None, None,
                                                      IGNORE, **lists) for a, b in SHARDS])
    gtok = torch.ones(N, device="cuda")
    rows, coefs = torch.ops.fusedce.shard_finish(P, td, None, gtok, ignore_index=IGNORE, **lists)
    rows = rows.cpu()
    bad = torch.zeros(N, dtype=torch.bool)
    bad[[4, 9]] = True
    assert rows[bad, ROW["kTokenLoss"]].isnan().all() and rows[bad, ROW["kLogprob"]].isnan().all()
    assert rows[~bad].isfinite().all() and rows[:, ROW["kLse"]].isfinite().all()
    assert (rows[bad, ROW["kPredicted"]] == -1).all()
    lse_ref = torch.logsumexp(raw, -1)
    torch.testing.assert_close(rows[:, ROW["kLse"]].double(), lse_ref, rtol=1e-5, atol=1e-5)
    grads = []
    for a, b in SHARDS:
        gs = z[:, a:b].contiguous()
        torch.ops.fusedce.shard_backward_(gs, td, a, coefs, None, None, IGNORE, **lists)
        grads.append(gs)
    grad = torch.cat(grads, 1).cpu()
    assert grad[bad].isnan().all() and grad[~bad].isfinite().all()
