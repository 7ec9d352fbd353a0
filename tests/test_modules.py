"""fusedce.nn.LinearCrossEntropyLoss and fusedce.nn.FusedLMHeadLoss: against the reference, and
against torch.nn.LinearCrossEntropyLoss holding the same weights."""

import pytest
import torch

import fusedce
from checks import check_linear_cross_entropy

OPTIONS = {
    "defaults": dict(),  # the constructor defaults
    "sum_bias": dict(reduction="sum", bias=True),  # the module's own bias parameter
    "none": dict(reduction="none"),  # per-token output through the module
    "weight_smoothing": dict(weight="w", label_smoothing=0.1, ignore_index=3),  # torch's knobs
    "extras": dict(z_loss=1e-2, softcap=3.0, logit_scale=0.5, chunk_size=2),  # fusedce's knobs
}
TORCH_OPTIONS = ["defaults", "sum_bias", "none", "weight_smoothing"]  # what torch's module has

H, V = 6, 13


def _knobs(options, device):
    kw = dict(OPTIONS[options])
    if kw.get("weight") == "w":
        kw["weight"] = torch.rand(V, dtype=torch.float64, device=device) + 0.5
    return kw


def _batch(device, ignore_index=-100):
    x = torch.randn(2, 5, H, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, V, (2, 5), device=device)
    t[0, 0] = ignore_index
    return x, t


@pytest.mark.parametrize("options", list(OPTIONS))
def test_linear_cross_entropy_loss_vs_reference(device, options):
    kw = _knobs(options, device)
    module = fusedce.nn.LinearCrossEntropyLoss(H, V, device=device, dtype=torch.float64, **kw)
    assert isinstance(module.linear, torch.nn.Linear)
    assert module.linear.weight.shape == (V, H)
    x, t = _batch(device, kw.get("ignore_index", -100))

    # The module's value and gradients (input, linear.weight, linear.bias) are those of the
    # functional call on its parameters, which is checked against the reference.
    loss = module(x, t)
    up = torch.randn(loss.shape, dtype=torch.float64, device=device)
    loss.backward(up)
    fkw = {k: v for k, v in kw.items() if k != "bias"}
    if module.linear.bias is not None:
        fkw["linear_bias"] = module.linear.bias.detach().clone().requires_grad_()
    w = module.linear.weight.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    check_linear_cross_entropy((xr, w, t), fkw, torch.float64, upstream=up, what=options)
    ref_loss = fusedce.linear_cross_entropy(xr, w, t, **fkw)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    grads = torch.autograd.grad((ref_loss * up).sum(), [xr, w] + (
        [fkw["linear_bias"]] if "linear_bias" in fkw else []))
    torch.testing.assert_close(x.grad, grads[0], rtol=0, atol=0)
    torch.testing.assert_close(module.linear.weight.grad, grads[1], rtol=0, atol=0)
    if module.linear.bias is not None:
        torch.testing.assert_close(module.linear.bias.grad, grads[2], rtol=0, atol=0)


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyLoss"),
                    reason="torch.nn.LinearCrossEntropyLoss is new in torch 2.13")
@pytest.mark.parametrize("options", TORCH_OPTIONS)
def test_linear_cross_entropy_loss_vs_torch_module(device, options):
    """Same constructor, same state_dict, same values and gradients as torch's module."""
    kw = _knobs(options, device)
    ours = fusedce.nn.LinearCrossEntropyLoss(H, V, device=device, dtype=torch.float64, **kw)
    theirs = torch.nn.LinearCrossEntropyLoss(H, V, device=device, dtype=torch.float64, **kw)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())

    x, t = _batch(device, kw.get("ignore_index", -100))
    x, t = x.reshape(-1, H), t.reshape(-1)  # torch's module takes [N, H] inputs
    xa = x.detach().clone().requires_grad_()
    xb = x.detach().clone().requires_grad_()
    a, b = ours(xa, t), theirs(xb, t)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    up = torch.randn(a.shape, dtype=torch.float64, device=device)
    a.backward(up)
    b.backward(up)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-12)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("options", list(OPTIONS))
def test_fused_lm_head_loss_vs_reference(device, options):
    """FusedLMHeadLoss: the model owns the head; the module only holds the loss knobs."""
    kw = _knobs(options, device)
    with_bias = kw.pop("bias", False)
    module = fusedce.nn.FusedLMHeadLoss(**kw)
    assert not list(module.parameters()), "the loss module must not own parameters"
    x, t = _batch(device, kw.get("ignore_index", -100))
    w = (torch.randn(V, H, dtype=torch.float64, device=device) * H**-0.5).requires_grad_()
    b = torch.randn(V, dtype=torch.float64, device=device, requires_grad=True) if with_bias else None

    loss = module(x, w, t, b)
    up = torch.randn(loss.shape, dtype=torch.float64, device=device)
    got = torch.autograd.grad((loss * up).sum(), [x, w] + ([b] if with_bias else []))
    fkw = dict(kw, linear_bias=None if b is None else b.detach().clone().requires_grad_())
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    check_linear_cross_entropy((xr, wr, t), fkw, torch.float64, upstream=up, what=options)
    ref_loss = fusedce.linear_cross_entropy(xr, wr, t, **fkw)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    want = torch.autograd.grad((ref_loss * up).sum(), [xr, wr] + (
        [fkw["linear_bias"]] if with_bias else []))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_module_training_matches_eager_training(device):
    """Twenty SGD steps of a tiny model with the loss module follow the same trajectory (losses
    and final parameters) as the same model trained with F.linear + F.cross_entropy."""
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(32, 16), torch.nn.Tanh())
        head = fusedce.nn.LinearCrossEntropyLoss(16, 32, bias=True, label_smoothing=0.1)
        return model.to(device, torch.float64), head.to(device, torch.float64)

    tokens = torch.randint(0, 32, (4, 12), device=device)
    labels = tokens.roll(-1, dims=1)
    trajectories = []
    for fused in (True, False):
        model, head = make()
        opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.5)
        losses = []
        for _ in range(20):
            opt.zero_grad()
            hidden = model(tokens)
            if fused:
                loss = head(hidden, labels)
            else:
                logits = torch.nn.functional.linear(hidden, head.linear.weight, head.linear.bias)
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), labels.reshape(-1),
                                                         label_smoothing=0.1)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        trajectories.append((losses, [p.detach() for p in head.parameters()]))
    (fused_losses, fused_params), (eager_losses, eager_params) = trajectories
    assert fused_losses[-1] < fused_losses[0]  # it trains
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(eager_losses),
                               rtol=1e-9, atol=1e-12)
    for a, b in zip(fused_params, eager_params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
