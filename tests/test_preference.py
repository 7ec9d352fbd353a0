"""fusedce.preference_loss against fusedce.reference.preference_loss (float64, materialized
logits), and against TRL's own loss functions where TRL exposes them."""

import contextlib
import types

import pytest
import torch

import fusedce
from fusedce import reference

from accuracy import assert_close

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "orpo", "cpo", "simpo")
WITH_REF = ("sigmoid", "hinge", "ipo")


def _batch(B=3, T=7, H=5, V=11, dtype=torch.float64, device="cpu", seed=0, ignore_index=-100,
           empty_row=None, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1 if bias else None
    y = torch.randint(0, V, (2 * B, T), generator=g)
    # a prompt of 1-3 tokens and right padding of 0-2, different per row
    for i in range(2 * B):
        p = 1 + i % 3
        pad = i % 2 + (i % 3 == 2)
        y[i, :p] = ignore_index
        if pad:
            y[i, T - pad:] = ignore_index
    if empty_row is not None:
        y[empty_row] = ignore_index
    xr = torch.randn(2 * B, T, H + 1, generator=g, dtype=torch.float64)
    wr = torch.randn(V, H + 1, generator=g, dtype=torch.float64) * 0.5
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), y.to(device), cast(xr), cast(wr)


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def _check(loss_type, dtype, device, ref_mode="hidden", empty_row=None, ignore_index=-100,
           temperature=1.0, softcap=None, logit_scale=1.0, **kw):
    x, w, b, y, xr, wr = _batch(dtype=dtype, device=device, empty_row=empty_row, ignore_index=ignore_index)
    fx, fw, fb = _leaves(x, w, b)
    rx, rw, rb = _leaves(x.double(), w.double(), b.double())
    knobs = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    ref_kw, fref_kw = {}, {}
    if loss_type in WITH_REF:
        ref_logits = xr.double() @ wr.double().T
        if ref_mode == "hidden":
            fref_kw = dict(ref_input=xr, ref_weight=wr)
            ref_kw = dict(ref_logits=ref_logits)
        else:
            lp = reference.token_logprobs(
                reference.final_logits(ref_logits, logit_scale, softcap), torch.where(y == ignore_index, 0, y),
                temperature=temperature)[0]
            given = (lp * (y != ignore_index)).sum(-1)
            fref_kw = dict(ref_logps=given.to(dtype))
            ref_kw = dict(ref_logps=given)
    loss, metrics = fusedce.preference_loss(fx, fw, y, loss_type=loss_type, linear_bias=fb,
                                            ignore_index=ignore_index, **fref_kw, **knobs, **kw)
    want, want_metrics = reference.preference_loss(rx @ rw.T + rb, y, loss_type=loss_type,
                                                   ignore_index=ignore_index, **ref_kw, **knobs, **kw)
    return _same_as_reference(loss, metrics, want, want_metrics, ((fx, rx), (fw, rw), (fb, rb)), dtype)


def _same_as_reference(loss, metrics, want, want_metrics, leaves, dtype):
    """fusedce's loss, metrics (0-d, no grad; NaN where the reference has NaN: a group the batch
    does not hold) and the gradients of (input, linear_weight, bias) equal the float64 reference's."""
    assert_close(loss, want, dtype, what="loss")
    assert set(metrics) == set(want_metrics), (sorted(metrics), sorted(want_metrics))
    for k, v in metrics.items():
        assert v.dim() == 0 and not v.requires_grad, k
        if torch.isnan(want_metrics[k]):
            assert torch.isnan(v), k
        else:
            assert_close(v, want_metrics[k], dtype, what=k)
    loss.backward()
    want.backward()
    for (got, exp), name in zip(leaves, ("input", "linear_weight", "bias")):
        assert_close(got.grad, exp.grad, dtype, what=f"grad {name}")
    return loss, metrics


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_values_and_gradients(loss_type, dtype, device):
    _check(loss_type, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss_type", WITH_REF)
def test_reference_as_logps(loss_type, device):
    _check(loss_type, torch.float64, device, ref_mode="logps")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss_type", ["sigmoid", "cpo", "simpo"])
def test_label_smoothing(loss_type, device):
    _check(loss_type, torch.float64, device, label_smoothing=0.2, beta=0.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_knobs_and_other_ignore_index(loss_type, device):
    # softcap, logit_scale and temperature apply to the policy and the reference head alike
    _check(loss_type, torch.float64, device, ignore_index=-1, temperature=0.7, softcap=3.0,
           logit_scale=1.3, beta=0.5, cpo_alpha=0.5, simpo_gamma=1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "cpo", "simpo"])
def test_all_ignored_row(loss_type, device):
    # A rejected row without completion tokens: log-prob sum 0, count clamped to 1 (TRL's clamp).
    # (ORPO's log(1 - exp(0)) is -inf for such a row, in TRL as here, so it is left out.)
    loss, _ = _check(loss_type, torch.float64, device, empty_row=4)
    assert torch.isfinite(loss)


def test_odd_sizes():
    x, w, b, y, xr, wr = _batch(B=1, T=1, H=3, V=2)
    y[:] = torch.tensor([[1], [0]])
    loss, m = fusedce.preference_loss(x, w, y, ref_input=xr, ref_weight=wr)
    want, wm = reference.preference_loss(x @ w.T, y, ref_logits=xr @ wr.T)
    torch.testing.assert_close(loss, want)
    x, w, b, y, xr, wr = _batch(B=5, T=13, H=17, V=29, seed=3)
    loss, _ = fusedce.preference_loss(x, w, y, loss_type="orpo", linear_bias=b, chunk_size=3)
    want, _ = reference.preference_loss(x @ w.T + b, y, loss_type="orpo")
    torch.testing.assert_close(loss, want)


def test_shift_matches_aligned_labels():
    x, w, b, y, xr, wr = _batch()
    hf = torch.cat([torch.full_like(y[:, :1], -100), y[:, :-1]], dim=1)  # HF labels: one step later
    a, ma = fusedce.preference_loss(x, w, y, ref_input=xr, ref_weight=wr)
    # the last position of the aligned target has no HF label, so drop it from the comparison
    y2 = y.clone()
    y2[:, -1] = -100
    hf2 = torch.cat([torch.full_like(y2[:, :1], -100), y2[:, :-1]], dim=1)
    a2, _ = fusedce.preference_loss(x, w, y2, ref_input=xr, ref_weight=wr)
    s2, _ = fusedce.preference_loss(x, w, hf2, ref_input=xr, ref_weight=wr, shift=True)
    torch.testing.assert_close(s2, a2)
    assert hf.shape == y.shape and not torch.equal(a, a2)


def test_reference_under_no_grad():
    x, w, b, y, xr, wr = _batch()
    xr.requires_grad_(True)
    wr.requires_grad_(True)
    loss, _ = fusedce.preference_loss(x.requires_grad_(True), w, y, ref_input=xr, ref_weight=wr)
    loss.backward()
    assert xr.grad is None and wr.grad is None and x.grad is not None


@contextlib.contextmanager
def _one_rank_gloo(tmp_path):
    """A 1-rank gloo group (unless one is already up), for the sharded route on one process."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo is not available")
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield dist
    finally:
        if started:
            dist.destroy_process_group()


def test_logits_metrics_under_process_group(tmp_path):
    # One rank here (the sharded checks over 2 and 3 gloo ranks are in test_distributed.py).
    with _one_rank_gloo(tmp_path) as dist:
        x, w, b, y, xr, wr = _batch()
        for lt in LOSS_TYPES:
            kw = dict(ref_input=xr, ref_weight=wr) if lt in WITH_REF else {}
            loss, m = fusedce.preference_loss(x, w, y, loss_type=lt, linear_bias=b,
                                              process_group=dist.group.WORLD, **kw)
            want, wm = reference.preference_loss(x @ w.T + b, y, loss_type=lt,
                                                 **({"ref_logits": xr @ wr.T} if kw else {}))
            torch.testing.assert_close(loss, want)
            assert set(m) == set(wm), sorted(m)  # logits/* too: the sharded pass has the mean logit
            for k, v in m.items():
                torch.testing.assert_close(v, wm[k], msg=k)


def test_trl_cpo_and_orpo_losses():
    """TRL's CPOTrainer.cpo_loss and ORPOTrainer.odds_ratio_loss, called unbound on the same
    per-sequence log-probs. (DPOTrainer 1.16 computes its loss inline in _compute_loss, which
    needs a model and a trainer, so DPO is checked against the reference only.)"""
    pytest.importorskip("trl")
    try:
        from trl.experimental.cpo.cpo_trainer import CPOTrainer
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    except ImportError as e:  # pragma: no cover - a TRL without the experimental trainers
        pytest.skip(f"TRL's experimental CPO/ORPO trainers are not importable: {e}")
    x, w, b, y, xr, wr = _batch(seed=5)
    B = x.shape[0] // 2
    lp = reference.token_logprobs(x @ w.T + b, torch.where(y == -100, 0, y))[0] * (y != -100)
    n = (y != -100).sum(-1).clamp(min=1)
    s, a = lp.sum(-1), lp.sum(-1) / n
    nll = -s[:B].sum() / (y[:B] != -100).sum()
    for lt, beta, ls, alpha, gamma in (("sigmoid", 0.2, 0.0, 1.0, 0.5), ("sigmoid", 0.2, 0.1, 0.5, 0.5),
                                       ("simpo", 0.4, 0.0, 0.0, 0.8), ("simpo", 0.4, 0.2, 1.0, 0.3)):
        self = types.SimpleNamespace(alpha=0.0, beta=beta, loss_type=lt, simpo_gamma=gamma,
                                     label_smoothing=ls, accelerator=types.SimpleNamespace(device="cpu"))
        x_ = s if lt == "sigmoid" else a
        losses, cr, rr = CPOTrainer.cpo_loss(self, x_[:B], x_[B:])
        trl_loss = losses.mean() + alpha * nll
        ours, m = fusedce.preference_loss(x, w, y, linear_bias=b, loss_type="cpo" if lt == "sigmoid" else "simpo",
                                          beta=beta, label_smoothing=ls, cpo_alpha=alpha, simpo_gamma=gamma)
        torch.testing.assert_close(ours, trl_loss)
        torch.testing.assert_close(m["rewards/chosen"], cr.mean())
        torch.testing.assert_close(m["rewards/rejected"], rr.mean())
    self = types.SimpleNamespace(beta=0.3, accelerator=types.SimpleNamespace(device="cpu"))
    losses, cr, rr, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(self, a[:B].float(), a[B:].float())
    ours, m = fusedce.preference_loss(x.float(), w.float(), y, linear_bias=b.float(), loss_type="orpo", beta=0.3)
    torch.testing.assert_close(ours, (nll - losses.mean()).float())
    torch.testing.assert_close(m["log_odds_ratio"], log_odds_ratio)
    torch.testing.assert_close(m["log_odds_chosen"], log_odds_chosen)
    torch.testing.assert_close(m["rewards/chosen"], cr.mean())


@pytest.mark.parametrize("device", DEVICES)
def test_half_input(device):
    x, w, b, y, xr, wr = _batch(dtype=torch.bfloat16, device=device)
    loss, m = fusedce.preference_loss(x, w, y, ref_input=xr, ref_weight=wr, linear_bias=b)
    want, _ = reference.preference_loss((x.double() @ w.double().T + b.double()), y,
                                        ref_logits=xr.double() @ wr.double().T)
    # the eager path: bf16 logits from F.linear, the rest in float32 (as TRL upcasts)
    eager, _ = reference.preference_loss(torch.nn.functional.linear(x, w, b), y,
                                         ref_logits=torch.nn.functional.linear(xr, wr), dtype=torch.float32)
    assert loss.dtype == torch.float32 and m["logps/chosen"].dtype == torch.float32
    assert_close(loss, want, torch.bfloat16, eager=eager, what="loss")


def _bad(**over):
    x, w, b, y, xr, wr = _batch()
    kw = dict(input=x, linear_weight=w, target=y, ref_input=xr, ref_weight=wr)
    kw.update(over)
    kw = {k: v for k, v in kw.items() if v is not _DROP}
    return fusedce.preference_loss(kw.pop("input"), kw.pop("linear_weight"), kw.pop("target"), **kw)


_DROP = object()


@pytest.mark.parametrize("over,exc,needle", [
    (dict(input=torch.zeros(5, 3, 5, dtype=torch.float64), target=torch.zeros(5, 3, dtype=torch.long)), ValueError, "odd batch"),
    (dict(input=torch.zeros(6, 5, dtype=torch.float64)), ValueError, "input must have shape"),
    (dict(target=torch.zeros(6, 6, dtype=torch.long)), ValueError, "target must have shape"),
    (dict(linear_weight=torch.zeros(11, 4, dtype=torch.float64)), ValueError, "linear_weight"),
    (dict(loss_type="dpo"), ValueError, "loss_type"),
    (dict(linear_weight=[[0.0]]), TypeError, "linear_weight"),
    (dict(linear_bias=torch.zeros(10, dtype=torch.float64)), ValueError, "linear_bias"),
    (dict(beta=0.0), ValueError, "beta"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(beta=float("nan")), ValueError, "beta"),
    (dict(label_smoothing=0.5), ValueError, "label_smoothing"),
    (dict(loss_type="hinge", label_smoothing=0.1), ValueError, "label_smoothing"),
    (dict(cpo_alpha=-1.0, loss_type="cpo", ref_input=_DROP, ref_weight=_DROP), ValueError, "cpo_alpha"),
    (dict(simpo_gamma=float("inf"), loss_type="simpo", ref_input=_DROP, ref_weight=_DROP), ValueError, "simpo_gamma"),
    (dict(ref_input=_DROP, ref_weight=_DROP), ValueError, "ref_logps"),
    (dict(ref_logps=torch.zeros(6, dtype=torch.float64)), ValueError, "exactly one"),
    (dict(ref_input=_DROP, ref_weight=_DROP, ref_logps=torch.zeros(5, dtype=torch.float64)), ValueError, "ref_logps"),
    (dict(ref_input=_DROP, ref_weight=_DROP, ref_logps=torch.zeros(6, dtype=torch.long)), TypeError, "ref_logps"),
    (dict(ref_input=_DROP), ValueError, "ref_input"),
    (dict(ref_input=torch.zeros(6, 6, 6, dtype=torch.float64)), ValueError, "ref_input"),
    (dict(ref_weight=torch.zeros(11, 3, dtype=torch.float64)), ValueError, "ref_input"),
    (dict(ref_weight=torch.zeros(12, 6, dtype=torch.float64)), ValueError, "ref_weight has vocabulary"),
    (dict(ref_weight=torch.zeros(11, 6, dtype=torch.float32)), TypeError, "ref_weight"),
    (dict(ref_bias=torch.zeros(11, dtype=torch.float64), ref_input=_DROP, ref_weight=_DROP,
          ref_logps=torch.zeros(6, dtype=torch.float64)), ValueError, "ref_bias"),
    (dict(loss_type="orpo"), ValueError, "no reference"),
    (dict(target=torch.zeros(6, 7, dtype=torch.float32)), TypeError, "target"),
    (dict(shift=1), TypeError, "shift"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
])
def test_bad_input_names_the_argument(over, exc, needle):
    with pytest.raises(exc, match=needle):
        _bad(**over)


def test_exported():
    assert "preference_loss" in fusedce.__all__ and fusedce.preference_loss is not None


@pytest.mark.parametrize("loss_type", WITH_REF)
def test_trl_dpo_compute_loss(loss_type):
    """TRL's DPOTrainer._compute_loss, called unbound with a stand-in trainer and a stand-in model
    that returns TRL's fused-head outputs (float64 reference log-probs and mean logits of the same
    head): its loss and every logged metric that fusedce returns agree."""
    pytest.importorskip("trl")
    from collections import defaultdict

    from trl.trainer.dpo_trainer import DPOTrainer

    x, w, b, y, xr, wr = _batch(seed=7)
    logits = x @ w.T + b
    keep = y != -100
    lp = reference.token_logprobs(logits, torch.where(keep, y, 0))[0] * keep
    ref_given = (reference.token_logprobs(xr @ wr.T, torch.where(keep, y, 0))[0] * keep).sum(-1)
    two_b, T = y.shape
    # TRL's batch: input_ids [2B, T + 1] whose position t + 1 is scored by the hidden state t
    input_ids = torch.zeros(two_b, T + 1, dtype=torch.long)
    input_ids[:, 1:] = torch.where(keep, y, 0)
    completion_mask = torch.zeros(two_b, T + 1, dtype=torch.long)
    completion_mask[:, 1:] = keep.long()
    fused = types.SimpleNamespace(
        log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=logits.mean(-1),
        is_top1=logits.argmax(-1) == y, log_sum_sq_probs=torch.zeros_like(lp), aux_loss=None)
    model = lambda **kw: fused  # noqa: E731
    identity = lambda t: t  # noqa: E731
    B = two_b // 2
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=0.3, label_smoothing=0.0, use_weighting=False, _tp_size=1,
        _total_train_tokens=0, _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity))
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), completion_mask=completion_mask,
                  ref_chosen_logps=ref_given[:B], ref_rejected_logps=ref_given[B:])
    trl_loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    ours, m = fusedce.preference_loss(x, w, y, linear_bias=b, loss_type=loss_type, beta=0.3, ref_logps=ref_given)
    torch.testing.assert_close(ours, trl_loss)
    logged = trainer._metrics["train"]
    for k, v in m.items():
        assert k in logged, k
        torch.testing.assert_close(v.item(), logged[k][-1], rtol=1e-9, atol=1e-12, msg=k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss_type", ["sigmoid", "orpo"])
def test_compile_fullgraph(loss_type, device):
    x, w, b, y, xr, wr = _batch(dtype=torch.float32, device=device)
    kw = dict(ref_input=xr, ref_weight=wr) if loss_type in WITH_REF else {}

    def step(x, w):
        loss, metrics = fusedce.preference_loss(x, w, y, loss_type=loss_type, linear_bias=b, **kw)
        return loss, metrics["rewards/margins"]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x, w = _leaves(x, w)
    (l1, m1), (l2, m2) = step(x, w), compiled(x, w)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(m1, m2)
    g1 = torch.autograd.grad(step(x, w)[0], (x, w))
    g2 = torch.autograd.grad(compiled(x, w)[0], (x, w))
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("which", ["preference_loss", "kto_loss"])
def test_compile_fullgraph_changing_ignore_index(which):
    """An ignore_index passed to the compiled step and changing between calls is a symbolic int:
    the target check's message, formatted with it before the (skipped while compiling) check,
    failed fullgraph=True ("BUILD_STRING type error") where eager takes any ignore_index."""
    torch._dynamo.reset()
    labels = torch.tensor(LABELINGS["mixed"])

    def step(x, w, y, ignore_index):
        if which == "preference_loss":
            return fusedce.preference_loss(x, w, y, loss_type="orpo", ignore_index=ignore_index,
                                           shift=True)[0]
        return fusedce.kto_loss(x, w, y, labels, loss_type="apo_zero_unpaired", ref_logps=ref,
                                ignore_index=ignore_index, shift=True)[0]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for ignore_index in (-100, -1, 11):
        x, w, _, y, _, _ = _batch(ignore_index=ignore_index, bias=False)
        ref = torch.linspace(-9.0, -4.0, x.shape[0], dtype=torch.float64)
        x, w = _leaves(x, w)
        got = compiled(x, w, y, ignore_index)
        want = step(x, w, y, ignore_index)
        torch.testing.assert_close(got, want)
        for a, c in zip(torch.autograd.grad(got, (x, w)), torch.autograd.grad(want, (x, w))):
            torch.testing.assert_close(a, c)


@pytest.mark.parametrize("device", DEVICES)
def test_reference_bias(device):
    x, w, b, y, xr, wr = _batch(device=device, seed=11)
    rb = torch.randn(w.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(12)).to(device)
    loss, m = fusedce.preference_loss(x, w, y, loss_type="hinge", beta=0.7, linear_bias=b,
                                      ref_input=xr, ref_weight=wr, ref_bias=rb)
    want, wm = reference.preference_loss(x @ w.T + b, y, loss_type="hinge", beta=0.7, ref_logits=xr @ wr.T + rb)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(m["rewards/chosen"], wm["rewards/chosen"])
    without, _ = fusedce.preference_loss(x, w, y, loss_type="hinge", beta=0.7, linear_bias=b, ref_input=xr, ref_weight=wr)
    assert not torch.allclose(loss, without)


def test_kept_minus_100_is_not_ignored_with_another_ignore_index():
    """With ignore_index=-1, a target of -100 at a kept position is an out-of-range class id (an
    error naming target), not a silently ignored token."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 8, generator=g)
    w = torch.randn(11, 8, generator=g)
    t = torch.randint(0, 11, (4, 5), generator=g)
    t[:, 0] = -1
    t[1, 3] = -100
    ref_logps = torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"target\[8\] = -100 is outside \[0, 11\)"):
        fusedce.preference_loss(x, w, t, ignore_index=-1, ref_logps=ref_logps)
    t[1, 3] = -1
    loss, _ = fusedce.preference_loss(x, w, t, ignore_index=-1, ref_logps=ref_logps)
    assert torch.isfinite(loss)


# ---- KTO (unpaired): fusedce.kto_loss against reference.kto_loss and TRL's KTOTrainer ----

LABELINGS = {
    "mixed": [True, False, False, True, True, False],
    "all_desirable": [True] * 6,
    "all_undesirable": [False] * 6,
}


def _kl_batch(M=5, T=6, H=5, V=11, seed=21, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, T, H, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (M, T), generator=g)
    y[:, :2] = -100
    y[1, -1] = -100
    # a sharper reference head on these rows: its log-probs of the tokens are lower than the
    # policy's, so the KL estimate is positive and survives TRL's clamp at 0
    xr = 2 * torch.randn(M, T, H + 1, generator=g, dtype=torch.float64)
    return x.to(device, dtype), y.to(device), xr.to(device, dtype)


def _kto_check(loss_type="kto", dtype=torch.float64, device="cpu", labeling="mixed", ref_mode="hidden",
               kl_mode="inputs", empty_row=None, ignore_index=-100, **kw):
    x, w, b, y, xr, wr = _batch(dtype=dtype, device=device, empty_row=empty_row, ignore_index=ignore_index)
    labels = torch.tensor(LABELINGS[labeling], device=device)
    fx, fw, fb = _leaves(x, w, b)
    rx, rw, rb = _leaves(x.double(), w.double(), b.double())
    knobs = {k: kw.pop(k) for k in ("temperature", "softcap", "logit_scale") if k in kw}
    f_kw, r_kw = dict(kw), dict(kw)
    ref_logits = xr.double() @ wr.double().T

    def sums(logits, tgt):
        keep = tgt != ignore_index
        lp = reference.token_logprobs(reference.final_logits(logits, knobs.get("logit_scale", 1.0), knobs.get("softcap")),
                                      torch.where(keep, tgt, 0), temperature=knobs.get("temperature", 1.0))[0]
        return (lp * keep).sum(-1)

    if ref_mode == "hidden":
        f_kw.update(ref_input=xr, ref_weight=wr)
        r_kw.update(ref_logits=ref_logits)
    else:
        given = sums(ref_logits, y)
        f_kw.update(ref_logps=given.to(dtype))
        r_kw.update(ref_logps=given)
    if loss_type == "kto":
        if kl_mode == "given":
            f_kw.update(kl=torch.tensor([0.3], dtype=dtype, device=device))
            r_kw.update(kl=0.3)
        else:
            kx, ky, kxr = _kl_batch(device=device, dtype=dtype, H=x.shape[-1])
            if ignore_index != -100:
                ky = torch.where(ky == -100, ignore_index, ky)
            f_kw.update(kl_input=kx, kl_target=ky)
            r_kw.update(kl_logits=kx.double() @ w.double().T + b.double(), kl_target=ky)
            kref = kxr.double() @ wr.double().T
            if ref_mode == "hidden":
                f_kw.update(ref_kl_input=kxr)
                r_kw.update(ref_kl_logits=kref)
            else:
                given = sums(kref, ky)
                f_kw.update(ref_kl_logps=given.to(dtype))
                r_kw.update(ref_kl_logps=given)
    loss, metrics = fusedce.kto_loss(fx, fw, y, labels, loss_type=loss_type, linear_bias=fb,
                                     ignore_index=ignore_index, **knobs, **f_kw)
    want, wm = reference.kto_loss(rx @ rw.T + rb, y, labels, loss_type=loss_type,
                                  ignore_index=ignore_index, **knobs, **r_kw)
    return _same_as_reference(loss, metrics, want, wm, ((fx, rx), (fw, rw), (fb, rb)), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("labeling", sorted(LABELINGS))
def test_kto_values_and_gradients(loss_type, labeling, dtype, device):
    _, m = _kto_check(loss_type, dtype, device, labeling, desirable_weight=1.3, undesirable_weight=0.7, beta=0.4)
    n_d = sum(LABELINGS[labeling])
    assert m["count/chosen"].item() == n_d and m["count/rejected"].item() == 6 - n_d
    assert torch.isnan(m["rewards/margins"]).item() == (n_d in (0, 6))
    if loss_type == "apo_zero_unpaired":
        assert m["kl"].item() == 0.0
    else:
        assert m["kl"].item() > 0.5  # computed from the KL completions, not clamped to 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ref_mode,kl_mode", [("logps", "inputs"), ("logps", "given"), ("hidden", "given")])
def test_kto_reference_and_kl_forms(ref_mode, kl_mode, device):
    _, m = _kto_check("kto", torch.float64, device, ref_mode=ref_mode, kl_mode=kl_mode)
    if kl_mode == "given":
        assert m["kl"].item() == pytest.approx(0.3)
    else:
        assert m["kl"].item() > 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_kto_ignored_tokens_knobs_and_empty_row(device):
    # another ignore_index, a row without completion tokens (sum 0), softcap / scale / temperature
    # on every head (the KL completions' too)
    loss, m = _kto_check("kto", torch.float64, device, empty_row=4, ignore_index=-1, temperature=0.7,
                         softcap=3.0, logit_scale=1.3, beta=0.5)
    assert torch.isfinite(loss)


def test_kto_kl_clamped_and_kl_is_a_constant():
    # The computed reference point is max(mean, 0) and carries no gradient: a policy far below the
    # reference on the KL completions gives z = 0, the same loss as apo_zero_unpaired.
    x, w, b, y, xr, wr = _batch(seed=4)
    labels = torch.tensor(LABELINGS["mixed"])
    kx, ky, kxr = _kl_batch(H=x.shape[-1])
    big = dict(ref_input=xr, ref_weight=wr, ref_kl_input=kxr * 0)
    ref_kl_logps = torch.zeros(kx.shape[0], dtype=torch.float64)  # log p <= 0: mean(s - 0) < 0 -> 0
    l1, m1 = fusedce.kto_loss(x, w, y, labels, ref_logps=torch.zeros(6, dtype=torch.float64),
                              kl_input=kx, kl_target=ky, ref_kl_logps=ref_kl_logps)
    l2, _ = fusedce.kto_loss(x, w, y, labels, ref_logps=torch.zeros(6, dtype=torch.float64),
                             loss_type="apo_zero_unpaired")
    assert m1["kl"].item() == 0.0
    torch.testing.assert_close(l1, l2)
    fx, fw = _leaves(x, w)
    loss, _ = fusedce.kto_loss(fx, fw, y, labels, kl_input=kx, kl_target=ky, **big)
    loss.backward()  # the KL pass runs under no_grad: the same gradients as with z given
    fx2, fw2 = _leaves(x, w)
    kl = fusedce.kto_loss(x, w, y, labels, kl_input=kx, kl_target=ky, **big)[1]["kl"]
    loss2, _ = fusedce.kto_loss(fx2, fw2, y, labels, kl=kl, ref_input=xr, ref_weight=wr)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(fw.grad, fw2.grad)
    torch.testing.assert_close(fx.grad, fx2.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_kto_half_input(device):
    x, w, b, y, xr, wr = _batch(dtype=torch.bfloat16, device=device)
    labels = torch.tensor(LABELINGS["mixed"], device=device)
    loss, m = fusedce.kto_loss(x, w, y, labels, ref_input=xr, ref_weight=wr, linear_bias=b, kl=0.1)
    want, _ = reference.kto_loss(x.double() @ w.double().T + b.double(), y, labels,
                                 ref_logits=xr.double() @ wr.double().T, kl=0.1)
    eager, _ = reference.kto_loss(torch.nn.functional.linear(x, w, b), y, labels,
                                  ref_logits=torch.nn.functional.linear(xr, wr), kl=0.1, dtype=torch.float32)
    assert loss.dtype == torch.float32 and m["logps/chosen"].dtype == torch.float32
    assert_close(loss, want, torch.bfloat16, eager=eager, what="loss")


@pytest.mark.parametrize("device", DEVICES)
def test_kto_compile_fullgraph(device):
    x, w, b, y, xr, wr = _batch(dtype=torch.float32, device=device)
    labels = torch.tensor(LABELINGS["mixed"], device=device)
    kx, ky, kxr = _kl_batch(device=device, dtype=torch.float32)

    def step(x, w):
        loss, metrics = fusedce.kto_loss(x, w, y, labels, linear_bias=b, ref_input=xr, ref_weight=wr,
                                         kl_input=kx, kl_target=ky, ref_kl_input=kxr)
        return loss, metrics["kl"], metrics["rewards/margins"]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x, w = _leaves(x, w)
    for a, c in zip(step(x, w), compiled(x, w)):
        torch.testing.assert_close(a, c)
    g1 = torch.autograd.grad(step(x, w)[0], (x, w))
    g2 = torch.autograd.grad(compiled(x, w)[0], (x, w))
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c)


def test_kto_under_process_group(tmp_path):
    # One rank here: every pass (policy, reference, KL completions) takes the sharded route.
    with _one_rank_gloo(tmp_path) as dist:
        x, w, b, y, xr, wr = _batch()
        labels = torch.tensor(LABELINGS["mixed"])
        kx, ky, kxr = _kl_batch()
        loss, m = fusedce.kto_loss(x, w, y, labels, linear_bias=b, ref_input=xr, ref_weight=wr,
                                   kl_input=kx, kl_target=ky, ref_kl_input=kxr, process_group=dist.group.WORLD)
        want, wm = reference.kto_loss(x @ w.T + b, y, labels, ref_logits=xr @ wr.T, kl_logits=kx @ w.T + b,
                                      kl_target=ky, ref_kl_logits=kxr @ wr.T)
        torch.testing.assert_close(loss, want)
        assert set(m) == set(wm)
        for k, v in m.items():
            torch.testing.assert_close(v, wm[k], msg=k)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("labeling", ["mixed", "all_desirable"])
def test_trl_kto_compute_loss(loss_type, labeling):
    """TRL's KTOTrainer._compute_loss, called unbound with a stand-in trainer (precomputed
    reference log-probs, as precompute_ref_log_probs=True) and a stand-in model returning TRL's
    fused-head outputs for the batch and for the mismatched KL completions: its loss and every
    logged metric that fusedce also returns agree."""
    pytest.importorskip("trl")
    from collections import defaultdict

    from trl.trainer.kto_trainer import KTOTrainer

    x, w, b, y, xr, wr = _batch(seed=9)
    kx, ky, kxr = _kl_batch(M=6, T=7, seed=10)
    labels = torch.tensor(LABELINGS[labeling])

    def fused_outputs(h, tgt):
        logits = h @ w.T + b
        keep = tgt != -100
        logp = torch.log_softmax(logits, -1)
        lp = logp.gather(-1, torch.where(keep, tgt, 0).unsqueeze(-1)).squeeze(-1) * keep
        return types.SimpleNamespace(log_probs=lp, entropy=-(logp.exp() * logp).sum(-1), mean_logits=logits.mean(-1),
                                     aux_loss=None)

    def ref_sums(hr, tgt):
        keep = tgt != -100
        return (reference.token_logprobs(hr @ wr.T, torch.where(keep, tgt, 0))[0] * keep).sum(-1)

    def trl_ids(tgt):  # TRL's input_ids [N, T + 1]: position t + 1 is scored by the hidden state t
        keep = tgt != -100
        ids = torch.zeros(tgt.shape[0], tgt.shape[1] + 1, dtype=torch.long)
        ids[:, 1:] = torch.where(keep, tgt, 0)
        mask = torch.zeros_like(ids)
        mask[:, 1:] = keep.long()
        return ids, mask

    ids, cmask = trl_ids(y)
    kl_ids, kl_cmask = trl_ids(ky)
    main_out, kl_out = fused_outputs(x, y), fused_outputs(kx, ky)
    model = lambda **kw: kl_out if kw["input_ids"] is kl_ids else main_out  # noqa: E731
    identity = lambda t: t  # noqa: E731
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), aux_loss_enabled=False, precompute_ref_logps=True,
        calculate_KL=loss_type == "kto", loss_type=loss_type, beta=0.3, desirable_weight=1.5,
        undesirable_weight=0.8, _tp_size=1, _total_train_tokens=0,
        _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity))
    trainer._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(trainer, model, batch)
    ref_given, ref_kl_given = ref_sums(xr, y), ref_sums(kxr, ky)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=cmask, label=labels,
                  ref_logps=ref_given)
    if loss_type == "kto":
        inputs.update(KL_input_ids=kl_ids, KL_attention_mask=torch.ones_like(kl_ids),
                      KL_completion_mask=kl_cmask, ref_KL_logps=ref_kl_given)
    trl_loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    kw = dict(kl_input=kx, kl_target=ky, ref_kl_logps=ref_kl_given) if loss_type == "kto" else {}
    ours, m = fusedce.kto_loss(x, w, y, labels, linear_bias=b, loss_type=loss_type, beta=0.3,
                               desirable_weight=1.5, undesirable_weight=0.8, ref_logps=ref_given, **kw)
    torch.testing.assert_close(ours, trl_loss)
    if loss_type == "kto":
        assert m["kl"].item() > 0.5  # TRL's clamp at 0 did not hide the KL term
    logged = trainer._metrics["train"]
    compared = [k for k in m if k in logged]
    assert {"kl", "rewards/chosen", "logps/chosen", "logits/chosen", "entropy"} <= set(compared), sorted(logged)
    for k in compared:
        torch.testing.assert_close(m[k].item(), logged[k][-1], rtol=1e-9, atol=1e-12, msg=k)
    for k in logged:  # what TRL logs that fusedce leaves out: not the head's
        assert k in m or k in ("num_tokens", "aux_loss"), k
    if labeling == "all_desirable":
        assert "rewards/rejected" not in logged and torch.isnan(m["rewards/rejected"])


def _kto_bad(**over):
    x, w, b, y, xr, wr = _batch()
    kx, ky, kxr = _kl_batch()
    kw = dict(input=x, linear_weight=w, target=y, preference_labels=torch.tensor(LABELINGS["mixed"]),
              ref_input=xr, ref_weight=wr, kl_input=kx, kl_target=ky, ref_kl_input=kxr)
    kw.update(over)
    kw = {k: v for k, v in kw.items() if v is not _DROP}
    return fusedce.kto_loss(kw.pop("input"), kw.pop("linear_weight"), kw.pop("target"),
                            kw.pop("preference_labels"), **kw)


_NO_KL = dict(kl_input=_DROP, kl_target=_DROP, ref_kl_input=_DROP)


@pytest.mark.parametrize("over,exc,needle", [
    (dict(input=torch.zeros(6, 5, dtype=torch.float64)), ValueError, "input must have shape"),
    (dict(target=torch.zeros(6, 6, dtype=torch.long)), ValueError, "target must have shape"),
    (dict(loss_type="sigmoid"), ValueError, "loss_type"),
    (dict(beta=0.0), ValueError, "beta"),
    (dict(preference_labels=torch.ones(6, dtype=torch.long)), TypeError, "preference_labels"),
    (dict(preference_labels=torch.ones(5, dtype=torch.bool)), ValueError, "preference_labels"),
    (dict(preference_labels=[True] * 6), TypeError, "preference_labels"),
    (dict(desirable_weight=-1.0), ValueError, "desirable_weight"),
    (dict(undesirable_weight=float("nan")), ValueError, "undesirable_weight"),
    (dict(ref_input=_DROP, ref_weight=_DROP), ValueError, "ref_logps"),
    (dict(ref_logps=torch.zeros(6, dtype=torch.float64)), ValueError, "exactly one"),
    (dict(ref_input=_DROP), ValueError, "ref_input"),
    (dict(ref_input=_DROP, ref_weight=_DROP, ref_logps=torch.zeros(5, dtype=torch.float64),
          ref_kl_input=_DROP, ref_kl_logps=torch.zeros(5, dtype=torch.float64)), ValueError, "ref_logps"),
    (dict(ref_weight=torch.zeros(12, 6, dtype=torch.float64)), ValueError, "ref_weight has vocabulary"),
    (dict(ref_bias=torch.zeros(11, dtype=torch.float64), ref_input=_DROP, ref_weight=_DROP,
          ref_logps=torch.zeros(6, dtype=torch.float64)), ValueError, "ref_bias"),
    (dict(**_NO_KL), ValueError, "KL reference point: kl"),
    (dict(kl=0.1), ValueError, "drop kl_input, kl_target, ref_kl_input"),
    (dict(kl=torch.zeros(3, dtype=torch.float64), **_NO_KL), ValueError, "kl must be"),
    (dict(kl=torch.zeros((), dtype=torch.long), **_NO_KL), TypeError, "kl must"),
    (dict(kl=float("inf"), **_NO_KL), ValueError, "kl must"),
    (dict(loss_type="apo_zero_unpaired"), ValueError, "no KL term; drop kl_input"),
    (dict(loss_type="apo_zero_unpaired", kl=0.0, **_NO_KL), ValueError, "no KL term; drop kl"),
    (dict(kl_target=_DROP), ValueError, "kl_input \\+ kl_target"),
    (dict(kl_input=torch.zeros(5, 6, dtype=torch.float64)), ValueError, "kl_input must have shape"),
    (dict(kl_input=torch.zeros(5, 6, 4, dtype=torch.float64)), ValueError, "kl_input"),
    (dict(kl_target=torch.zeros(5, 7, dtype=torch.long)), ValueError, "kl_target must have shape"),
    (dict(kl_target=torch.zeros(5, 6, dtype=torch.float32)), TypeError, "kl_target"),
    (dict(ref_kl_input=_DROP), ValueError, "ref_kl_input"),
    (dict(ref_kl_input=torch.zeros(5, 6, 5, dtype=torch.float64)), ValueError, "ref_kl_input"),
    (dict(ref_kl_input=torch.zeros(4, 6, 6, dtype=torch.float64)), ValueError, "ref_kl_input must have shape"),
    (dict(ref_input=_DROP, ref_weight=_DROP, ref_logps=torch.zeros(6, dtype=torch.float64)), ValueError, "ref_kl_logps"),
    (dict(ref_input=_DROP, ref_weight=_DROP, ref_logps=torch.zeros(6, dtype=torch.float64), ref_kl_input=_DROP,
          ref_kl_logps=torch.zeros(4, dtype=torch.float64)), ValueError, "ref_kl_logps must have shape"),
    (dict(shift=1), TypeError, "shift"),
])
def test_kto_bad_input_names_the_argument(over, exc, needle):
    with pytest.raises(exc, match=needle):
        _kto_bad(**over)


def test_kto_exported():
    assert "kto_loss" in fusedce.__all__ and fusedce.kto_loss is fusedce.preference.kto_loss


def test_kto_shift_matches_aligned_labels():
    # shift=True applies to target and kl_target alike (both HF-style labels)
    x, w, b, y, xr, wr = _batch()
    kx, ky, kxr = _kl_batch(M=6, T=7)
    labels = torch.tensor(LABELINGS["mixed"])
    y[:, -1] = -100
    ky[:, -1] = -100
    hf = lambda t: torch.cat([torch.full_like(t[:, :1], -100), t[:, :-1]], dim=1)  # noqa: E731
    kw = dict(ref_input=xr, ref_weight=wr, kl_input=kx, ref_kl_input=kxr, chunk_size=4)
    a, ma = fusedce.kto_loss(x, w, y, labels, kl_target=ky, **kw)
    s, ms = fusedce.kto_loss(x, w, hf(y), labels, kl_target=hf(ky), shift=True, **kw)
    torch.testing.assert_close(s, a)
    torch.testing.assert_close(ms["kl"], ma["kl"])
    assert ma["kl"].item() > 0.5
