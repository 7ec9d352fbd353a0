"""The raw ops (torch.ops.fusedce.*) against the float64 reference, output by output.

The public functions are tested elsewhere; here each schema output is checked on its own, so that a
backend (CPU, CUDA) that gets one output wrong is caught at the op, with the samples every other
test uses.
"""

import pytest
import torch

from accuracy import assert_close
from fusedce import reference
from samples import CASE_NAMES, sample

DTYPES = [
    torch.float64,  # exactness
    torch.float32,  # tight float32 tolerance
]


def _reference_for_raw(hidden, weight, target, bias, class_weight, scalars):
    """Reference token_loss / lse / predicted, and its autograd, for raw-op arguments."""
    softcap = scalars["softcap"] or None
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    cw = None if class_weight is None else class_weight.double()
    ref = reference.linear_cross_entropy(
        h, w, target, linear_bias=b, weight=cw, reduction="none",
        ignore_index=scalars["ignore_index"], label_smoothing=scalars["label_smoothing"],
        z_loss=scalars["z_loss"], softcap=softcap, logit_scale=scalars["logit_scale"])
    return ref, (h, w, b)


SCALAR_NAMES = ("ignore_index", "label_smoothing", "z_loss", "softcap", "logit_scale")


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_loss_op_outputs(device, dtype, case):
    """loss, token_loss, lse, predicted and the forward-computed gradients of `loss`."""
    (x, w, t), kw = sample(device, dtype, case, op="fusedce::loss", requires_grad=True)
    x, w = x.detach(), w.detach()  # the raw op, not its autograd
    scalars = {k: kw[k] for k in SCALAR_NAMES}
    out = torch.ops.fusedce.loss(x, w, t, **kw)
    loss, token_loss, lse, predicted, _, _, gh, gw, gb = out
    ref, (h, wr, br) = _reference_for_raw(x, w, t, kw["bias"], kw["class_weight"], scalars)

    scale = 1.0 if kw["grad_scale"] is None else float(kw["grad_scale"])
    want_loss = ref.token_loss.sum() * scale
    assert_close(loss, want_loss, dtype, what=f"{case} loss")
    assert_close(token_loss, ref.token_loss, dtype, what=f"{case} token_loss")
    assert_close(lse, ref.lse, dtype, what=f"{case} lse")
    assert torch.equal(predicted.cpu(), ref.predicted.cpu()), f"{case} predicted"
    leaves = [h, wr] + ([br] if br is not None else [])
    want = torch.autograd.grad(want_loss, leaves)
    assert_close(gh, want[0], dtype, what=f"{case} grad_hidden")
    assert_close(gw, want[1], dtype, what=f"{case} grad_weight")
    if br is not None:
        assert_close(gb, want[2], dtype, what=f"{case} grad_bias")


@pytest.mark.parametrize("case", CASE_NAMES)
def test_loss_op_grad_mask_off_returns_empty(device, case):
    """Gradients not requested come back empty (no [V, H] work or memory)."""
    (x, w, t), kw = sample(device, torch.float64, case, op="fusedce::loss")
    kw = {**kw, "grad_mask": [False, False, False]}
    *_, gh, gw, gb = torch.ops.fusedce.loss(x, w, t, **kw)
    assert gh.numel() == 0 and gw.numel() == 0 and gb.numel() == 0


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_loss_backward_op(device, dtype, case):
    """loss_backward with random grad_token_loss and grad_lse = autograd of the reference."""
    args, kw = sample(device, dtype, case, op="fusedce::loss_backward")
    x, w, t, b, cw, lse, g_tok = args
    scalars = {k: kw[k] for k in SCALAR_NAMES}
    gh, gw, gb = torch.ops.fusedce.loss_backward(*args, **kw)
    ref, (h, wr, br) = _reference_for_raw(x, w, t, b, cw, scalars)
    total = (ref.token_loss * g_tok.double()).sum() + (ref.lse * kw["grad_lse"].double()).sum()
    leaves = [h, wr] + ([br] if br is not None else [])
    want = torch.autograd.grad(total, leaves)
    assert_close(gh, want[0], dtype, what=f"{case} grad_hidden")
    assert_close(gw, want[1], dtype, what=f"{case} grad_weight")
    if br is not None:
        assert_close(gb, want[2], dtype, what=f"{case} grad_bias")


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_ops(device, dtype, case):
    """cross_entropy's outputs, and both backward ops (out of place and in place) agree with the
    reference's autograd and with each other."""
    (logits, t), kw = sample(device, dtype, case, op="fusedce::cross_entropy")
    token_loss, lse, predicted = torch.ops.fusedce.cross_entropy(logits, t, **kw)
    z = logits.detach().double().requires_grad_()
    cw = None if kw["class_weight"] is None else kw["class_weight"].double()
    scalars = {k: kw[k] for k in SCALAR_NAMES}
    ref = reference.cross_entropy(z, t, weight=cw, reduction="none",
                                  **dict(scalars, softcap=scalars["softcap"] or None))
    assert_close(token_loss, ref.token_loss, dtype, what=f"{case} token_loss")
    assert_close(lse, ref.lse, dtype, what=f"{case} lse")
    assert torch.equal(predicted.cpu(), ref.predicted.cpu()), f"{case} predicted"

    bargs, bkw = sample(device, dtype, case, op="fusedce::cross_entropy_backward")
    g_tok = bargs[4]
    (want,) = torch.autograd.grad((ref.token_loss * g_tok.double()).sum()
                                  + (ref.lse * bkw["grad_lse"].double()).sum(), (z,))
    grad = torch.ops.fusedce.cross_entropy_backward(*bargs, **bkw)
    assert_close(grad, want, dtype, what=f"{case} cross_entropy_backward")
    buf = bargs[0].clone()
    torch.ops.fusedce.cross_entropy_backward_(buf, *bargs[1:], **bkw)
    assert torch.equal(buf, grad), f"{case}: in-place and out-of-place backward differ"


@pytest.mark.parametrize("case", CASE_NAMES)
def test_scale_op(device, case):
    (buf, scale), _ = sample(device, torch.float32, case, op="fusedce::scale_")
    want = buf * scale
    torch.ops.fusedce.scale_(buf, scale)
    torch.testing.assert_close(buf, want, rtol=0, atol=0)
