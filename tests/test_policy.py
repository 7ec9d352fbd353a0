"""policy_loss at TRL 1.16 parity: every loss type x token/sequence importance sampling x
use_bias_correction_kl, with two-sided clipping, vLLM importance-sampling ratios, the entropy bonus,
the global normalizer and gradient accumulation, against the float64 definition
(fusedce/reference.py, values and gradients), and against TRL's own GRPOTrainer._compute_loss
(loss, gradients and logged metrics)."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

import fusedce
from fusedce import reference
from test_terms import DTYPES, _check, _leaves, policy_pair

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo"]
B, T, H, V = 3, 7, 9, 37  # odd sizes


def _batch(device, x, w, temperature, *, per_token_adv):
    """Tokens, old/ref log-probs with ratios on both sides of every clip bound, advantages of both
    signs, a mask with an empty and a partial row, importance-sampling ratios with exact zeros."""
    tok = torch.randint(0, V, (B, T), device=device)
    with torch.no_grad():
        lp0, _ = reference.token_logprobs(x.double() @ w.double().T, tok, temperature=temperature)
    shift = torch.linspace(-0.6, 0.6, B * T, dtype=torch.float64).reshape(B, T).to(device)
    old = (lp0 + shift).to(torch.float32)
    ref_lp = (lp0 + 0.3 * torch.randn(B, T, dtype=torch.float64, device=device)).to(torch.float32)
    if per_token_adv:
        adv = torch.randn(B, T, device=device)
    else:
        adv = torch.tensor([1.0, -0.7, 0.4], device=device)
    mask = torch.ones(B, T, device=device, dtype=torch.long)
    mask[0, 5:] = 0
    mask[1, :] = 0  # an empty sequence
    isr = torch.rand(B, T, device=device) * 1.5
    isr[2, 1] = 0.0
    return tok, old, ref_lp, adv, mask, isr


def _options(name, isr, device):
    if name == "plain":
        return {}
    if name == "no_kl":
        # No reference term (beta = 0: the KL path off) at temperature 1 (the logits as they are).
        return dict(beta=0.0, temperature=1.0)
    # Everything at once: two-sided clipping that bites (ratios reach 1.8), vLLM IS ratios, the
    # entropy bonus, gradient accumulation and a global normalizer given as a device tensor.
    return dict(delta=1.4, importance_sampling_ratio=isr, entropy_coef=0.05,
                gradient_accumulation_steps=3,
                num_items_in_batch=torch.tensor(11.5, device=device))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("bias_kl", [True, False], ids=["biaskl", "nobiaskl"])
@pytest.mark.parametrize("options", ["plain", "all", "no_kl"])
def test_policy_vs_reference(device, dtype, loss_type, level, bias_kl, options):
    if options == "no_kl" and bias_kl is False:
        pytest.skip("without the KL term the bias correction changes nothing")
    if dtype != torch.float64 and (bias_kl is False or options == "plain"):
        pytest.skip("float32/bfloat16: the everything-on and the no-KL configurations per loss type "
                    "and level are enough")
    kw = dict(beta=0.04, temperature=0.8)
    kw.update(_options(options, None, device) if options == "no_kl" else {})
    x, w = _leaves(device, dtype, (B, T, H), (V, H))
    tok, old, ref_lp, adv, mask, isr = _batch(device, x, w, kw["temperature"],
                                              per_token_adv=options == "all")
    kw.update(mask=mask, ref_logprobs=ref_lp, loss_type=loss_type,
              importance_sampling_level=level, use_bias_correction_kl=bias_kl,
              epsilon_high=1.3 if loss_type == "cispo" else 0.28)
    if options == "all":
        kw.update(_options(options, isr, device))

    _check(*policy_pair(tok, old, adv, kw), [x, w], dtype,
           f"policy {loss_type} {level} bias_kl={bias_kl} {options}")


@pytest.mark.parametrize("loss_type", ["grpo", "cispo", "sapo", "vespo"])
def test_policy_defaults_and_on_policy(device, loss_type):
    """old_logprobs=None (TRL's on-policy case: ratio 1, still differentiable), TRL's defaults
    (use_bias_correction_kl=True, epsilon_high=None -> epsilon_low), an advantage of 0."""
    x, w = _leaves(device, torch.float64, (2, 5, 8), (13, 8))
    tok = torch.randint(0, 13, (2, 5), device=device)
    adv = torch.tensor([0.5, 0.0], dtype=torch.float64, device=device)
    ref_lp = torch.randn(2, 5, dtype=torch.float64, device=device) - 2.5
    loss, metrics = fusedce.policy_loss(x, w, tok, None, adv, loss_type=loss_type, beta=0.1,
                                        ref_logprobs=ref_lp)
    g = torch.autograd.grad(loss, (x, w))
    x2, w2 = x.detach().cpu().requires_grad_(), w.detach().cpu().requires_grad_()
    truth = reference.policy_loss(x2 @ w2.T, tok.cpu(), None, adv.cpu(), loss_type=loss_type,
                                  beta=0.1, ref_logprobs=ref_lp.cpu())[0]
    g2 = torch.autograd.grad(truth, (x2, w2))
    torch.testing.assert_close(loss.cpu(), truth, rtol=1e-9, atol=1e-12)
    for a, b in zip(g, g2):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)
    assert metrics["ratio/mean"].item() == 1.0


def test_policy_bad_options(device):
    x, w = _leaves(device, torch.float64, (2, 4, 8), (13, 8))
    tok = torch.randint(0, 13, (2, 4), device=device)
    adv = torch.zeros(2, device=device, dtype=torch.float64)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        fusedce.policy_loss(x, w, tok, None, adv, importance_sampling_level="seq")
    with pytest.raises(ValueError, match="delta"):
        fusedce.policy_loss(x, w, tok, None, adv, delta=0.0)
    with pytest.raises(ValueError, match="sapo_temperature_neg"):
        fusedce.policy_loss(x, w, tok, None, adv, loss_type="sapo", sapo_temperature_neg=-1.0)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        fusedce.policy_loss(x, w, tok, None, adv, num_items_in_batch=torch.ones(2, device=device))
    with pytest.raises(ValueError, match="num_items_in_batch"):
        fusedce.policy_loss(x, w, tok, None, adv, num_items_in_batch=0)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        fusedce.policy_loss(x, w, tok, None, adv, gradient_accumulation_steps=0)


@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "vespo"])
@pytest.mark.parametrize("value", [0.0, -3.0, float("nan"), float("inf")], ids=["0", "-3", "nan", "inf"])
def test_policy_num_items_tensor_not_positive(device, loss_type, value):
    """A CPU num_items_in_batch tensor (HF Trainer passes one) that is 0, negative or not finite
    divides the loss by it: -3 gave a plausible negated loss, 0 a nan. Its value is on the host,
    so it is checked, as linear_cross_entropy checks it."""
    x, w = _leaves(device, torch.float64, (2, 4, 8), (13, 8))
    tok = torch.randint(0, 13, (2, 4), device=device)
    adv = torch.randn(2, device=device, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        fusedce.policy_loss(x, w, tok, None, adv, loss_type=loss_type,
                            num_items_in_batch=torch.tensor(value))


def test_policy_num_items_bool_tensor(device):
    """A bool tensor is no count (True would divide by 1); the number True is refused already."""
    x, w = _leaves(device, torch.float64, (2, 4, 8), (13, 8))
    tok = torch.randint(0, 13, (2, 4), device=device)
    adv = torch.randn(2, device=device, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        fusedce.policy_loss(x, w, tok, None, adv, num_items_in_batch=torch.tensor(True, device=device))
    with pytest.raises(ValueError, match="importance_sampling_ratio"):
        fusedce.policy_loss(x, w, tok, None, adv, importance_sampling_ratio=torch.ones(3, device=device))
    with pytest.raises(ValueError, match="use_bias_correction_kl"):
        fusedce.policy_loss(x, w, tok, None, adv, use_bias_correction_kl=None)


# --------------------------------------------------------------------------------------------
# Parity with TRL's own code
# --------------------------------------------------------------------------------------------


def _trl_stub(GRPOTrainer, *, loss_type, level, bias_kl, beta, epsilon, epsilon_high, delta,
              entropy_coef, gas, spg, use_vllm, lp_fn, max_completion_length):
    """A stand-in `self` carrying exactly the attributes GRPOTrainer._compute_loss reads; the
    model's log-probabilities come from materialized logits (lp_fn) with autograd."""
    args = types.SimpleNamespace(
        use_bias_correction_kl=bias_kl, delta=delta, sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
        vespo_lambda_neg=2.0, steps_per_generation=spg, entropy_target=0.0)
    accel = types.SimpleNamespace(
        num_processes=1, sync_gradients=True, gather=lambda t: t, gather_for_metrics=lambda t: t,
        reduce=lambda t, reduction="sum": t)
    metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda model, *a, **k: (*lp_fn(), None),
        get_gamma_weights=GRPOTrainer.get_gamma_weights, get_high_entropy_mask=None,
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask, aux_loss_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level,
        beta=beta, args=args, loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon_high,
        use_vllm=use_vllm, vllm_importance_sampling_correction=use_vllm,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=gas,
        accelerator=accel, max_completion_length=max_completion_length,
        _entropy_bonus_enabled=entropy_coef != 0.0, use_adaptive_entropy=False,
        entropy_coef=entropy_coef, _metrics=metrics)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("variant", ["defaults", "options"])
def test_policy_matches_trl(loss_type, level, variant):
    """"defaults": GRPOConfig's defaults (use_bias_correction_kl=True, epsilon_high=None, no
    entropy bonus). "options": the plain KL, delta, vLLM IS ratios, the entropy bonus, gradient
    accumulation 2 with steps_per_generation 4 and a global token count."""
    trl = pytest.importorskip("trl")
    from trl import GRPOTrainer

    Bt, Tt, Ht, Vt = 3, 6, 8, 29
    temperature = 0.9
    x = torch.randn(Bt, Tt, Ht, dtype=torch.float64, requires_grad=True)
    w = torch.randn(Vt, Ht, dtype=torch.float64, requires_grad=True)
    tok = torch.randint(0, Vt, (Bt, Tt))
    with torch.no_grad():
        lp0 = torch.log_softmax(x @ w.T / temperature, -1).gather(-1, tok[..., None])[..., 0]
    old = lp0 + torch.linspace(-0.5, 0.5, Bt * Tt, dtype=torch.float64).reshape(Bt, Tt)
    ref_lp = lp0 + 0.3 * torch.randn(Bt, Tt, dtype=torch.float64)
    adv = torch.tensor([0.8, -1.1, 0.3], dtype=torch.float64)
    mask = torch.ones(Bt, Tt, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, :] = 0
    isr = torch.rand(Bt, Tt, dtype=torch.float64) * 1.5
    opt = variant == "options"
    gas, spg, beta = (2, 4, 0.05) if opt else (1, 1, 0.04)
    epsilon, epsilon_high = 0.2, (1.3 if loss_type == "cispo" else (0.28 if opt else None))
    delta = 1.3 if opt else None
    entropy_coef = 0.07 if opt else 0.0
    num_items = mask.sum().to(torch.float64) + (3.0 if opt else 0.0)  # a "global" count

    def lp_fn():
        logits = (x @ w.T).reshape(Bt, Tt, Vt) / temperature
        logp = torch.log_softmax(logits, -1)
        return logp.gather(-1, tok[..., None])[..., 0], -(logp.exp() * logp).sum(-1)

    stub = _trl_stub(GRPOTrainer, loss_type=loss_type, level=level, bias_kl=not opt, beta=beta,
                     epsilon=epsilon, epsilon_high=epsilon_high if epsilon_high is not None else epsilon,
                     delta=delta, entropy_coef=entropy_coef, gas=gas, spg=spg, use_vllm=opt,
                     lp_fn=lp_fn, max_completion_length=Tt + 2)
    inputs = {"prompt_ids": torch.zeros(Bt, 0, dtype=torch.long),
              "prompt_mask": torch.zeros(Bt, 0, dtype=torch.long), "completion_ids": tok,
              "completion_mask": mask, "advantages": adv, "old_per_token_logps": old,
              "ref_per_token_logps": ref_lp, "num_items_in_batch": num_items}
    if opt:
        inputs["importance_sampling_ratio"] = isr
    trl_loss = GRPOTrainer._compute_loss(stub, None, inputs)
    trl_grads = torch.autograd.grad(trl_loss, (x, w))

    # The caller's translation of TRL's normalizer and options (see policy_loss's docstring).
    normalizer = num_items.clamp(min=1.0) / 1 * gas / spg
    # TRL's torch.where(advantages > 0, 1.0, 1.05) makes SAPO's temperatures float32 (the default
    # dtype): the temperature TRL applies is float32(1.05), 2e-8 away from 1.05.
    sapo = {"sapo_temperature_pos": float(torch.tensor(1.0, dtype=torch.float32)),
            "sapo_temperature_neg": float(torch.tensor(1.05, dtype=torch.float32))}
    loss, metrics = fusedce.policy_loss(
        x, w, tok, old, adv, mask=mask, ref_logprobs=ref_lp, beta=beta, epsilon_low=epsilon,
        epsilon_high=epsilon_high, temperature=temperature, loss_type=loss_type,
        entropy_coef=entropy_coef, max_completion_length=Tt + 2, importance_sampling_level=level,
        delta=delta, importance_sampling_ratio=isr if opt else None, num_items_in_batch=normalizer,
        **({"use_bias_correction_kl": False} if opt else {}),
        gradient_accumulation_steps=gas, **sapo)
    grads = torch.autograd.grad(loss, (x, w))
    torch.testing.assert_close(loss, trl_loss, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, trl_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    logged = stub._metrics["train"]
    common = set(logged) & set(metrics)
    expected = {"entropy", "kl"}
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        expected |= {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                     "clip_ratio/low_min", "clip_ratio/high_max"}
    elif loss_type == "cispo":
        expected.add("cispo_clip_ratio")
    elif loss_type == "vespo":
        expected.add("vespo/phi_seq_mean")
    assert expected <= common, sorted(expected - common)
    for name in sorted(common):
        got, want = metrics[name].item(), logged[name][-1]
        # TRL takes the clip fractions in float32 (bool.float()); the rest in the inputs' float64.
        rel = 1e-6 if "clip" in name else 1e-9
        assert (math.isnan(got) and math.isnan(want)) or math.isclose(got, want, rel_tol=rel, abs_tol=1e-12), (name, got, want)

