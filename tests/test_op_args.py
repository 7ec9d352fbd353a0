"""The packed term arguments of fusedce::loss / loss_backward (csrc/terms_args.h, fusedce/_op_args.py):
the Python table equals the compiled one, a list of the wrong length or a flag that is not 0/1 is
refused by name (never read partly), and each packed entry reaches the op at its own place."""

from __future__ import annotations

import pytest
import torch

import fusedce
from accuracy import assert_close
from fusedce import _op_args, reference
from fusedce._op_args import TermOptions, op_kwargs

_ops = torch.ops.fusedce


def test_python_layout_equals_compiled_layout():
    compiled = fusedce._C.term_layout()
    assert _op_args.layout() == {k: [tuple(e) if isinstance(e, tuple) else e for e in v]
                                 for k, v in compiled.items()}
    # the schema's tensor arguments are the layout's, followed by the two lists
    tail = [*compiled["tensors"], "term_floats", "term_ints"]
    for op in (_ops.loss, _ops.loss_backward):
        names = [a.name for a in op.default._schema.arguments]
        assert names[-len(tail):] == tail, op


def test_layout_mismatch_is_refused_at_import():
    compiled = fusedce._C.term_layout()
    swapped = dict(compiled, term_floats=[compiled["term_floats"][1], compiled["term_floats"][0],
                                          *compiled["term_floats"][2:]])
    with pytest.raises(ImportError, match="term_floats"):
        _op_args.check_layout(swapped)
    extra = dict(compiled, term_ints=[*compiled["term_ints"], ("new_flag", "bool", 0)])
    with pytest.raises(ImportError, match="term_ints"):
        _op_args.check_layout(extra)
    other_default = dict(compiled, term_floats=[("ce_weight", "double", 0.5),
                                                *compiled["term_floats"][1:]])
    with pytest.raises(ImportError, match="term_floats"):
        _op_args.check_layout(other_default)
    _op_args.check_layout(compiled)  # and the real one passes


def test_pack_defaults_are_empty():
    assert TermOptions().pack() == {}
    kw = TermOptions(want_logprob=True).pack()
    want = [int(d) for d in _op_args.INT_DEFAULTS]
    want[_op_args.WANT_LOGPROB] = 1
    assert kw == {"term_ints": want}
    t = torch.zeros(3)
    kw = TermOptions(advantages=t, kl_beta=0.1).pack()
    assert kw["advantages"] is t and "term_ints" not in kw
    want = list(_op_args.FLOAT_DEFAULTS)
    want[_op_args.FLOAT_NAMES.index("kl_beta")] = 0.1
    assert kw["term_floats"] == want
    assert TermOptions.unpack(kw["term_floats"], [], [None] * 5 + [t, None]) == TermOptions(
        advantages=t, kl_beta=0.1)


def _small(device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(7, 3, generator=g, dtype=torch.float64).to(device)
    t = torch.tensor([0, 3, -100, 6, 2], device=device)
    return x, w, t


@pytest.mark.parametrize("name", ["term_floats", "term_ints"])
@pytest.mark.parametrize("length", [1, "one_more"])
def test_wrong_length_is_refused_by_name(device, name, length):
    x, w, t = _small(device)
    full = len(_op_args.FLOAT_DEFAULTS if name == "term_floats" else _op_args.INT_DEFAULTS)
    n = full + 1 if length == "one_more" else length
    values = [0.0] * n if name == "term_floats" else [0] * n
    # the C++ op, the backward op, the fake kernel and the Python unpacking all refuse it
    with pytest.raises(RuntimeError, match=name):
        _ops.loss(x, w, t, **{name: values})
    lse = torch.zeros(5, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match=name):
        _ops.loss_backward(x, w, t, None, None, lse, lse, **{name: values})
    with pytest.raises(ValueError, match=name):
        TermOptions.unpack(values if name == "term_floats" else [],
                           values if name == "term_ints" else [])
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx, fw, ft = (mode.from_tensor(a) for a in (x, w, t))
        with pytest.raises(ValueError, match=name):
            _ops.loss(fx, fw, ft, **{name: values})


def test_flag_not_0_or_1_is_refused_by_name(device):
    x, w, t = _small(device)
    ints = list(_op_args.INT_DEFAULTS)
    ints[_op_args.WANT_LOGPROB] = 2
    with pytest.raises(RuntimeError, match="want_logprob"):
        _ops.loss(x, w, t, term_ints=ints)


def test_each_packed_entry_reaches_its_place(device):
    """Each value set alone changes what the op computes as the reference says for that name
    (a shifted layout would move it to another entry)."""
    x, w, t = _small(device)
    z = x @ w.T
    ce = reference.cross_entropy(z, t, reduction="none")
    valid = (t != -100).double()
    ent = reference.entropy(z)
    out = _ops.loss(x, w, t, **op_kwargs(ce_weight=0.25))
    assert_close(out[1], 0.25 * ce.token_loss, torch.float64, what="ce_weight")
    out = _ops.loss(x, w, t, **op_kwargs(entropy_coef=0.5))
    assert_close(out[1], ce.token_loss + 0.5 * ent * valid, torch.float64, what="entropy_coef")
    out = _ops.loss(x, w, t, **op_kwargs(want_entropy=True))
    assert_close(out[4], ent, torch.float64, what="want_entropy")
    assert out[5].numel() == out[9].numel() == out[10].numel() == 0
    out = _ops.loss(x, w, t, **op_kwargs(want_logprob=True))
    logp = torch.where(t != -100, -ce.token_loss, torch.zeros(()))
    assert_close(out[5], logp, torch.float64, what="want_logprob")
    assert out[4].numel() == out[9].numel() == out[10].numel() == 0
    stats = reference.token_statistics(z, t)
    out = _ops.loss(x, w, t, **op_kwargs(want_mean_logit=True))
    assert_close(out[9], stats["mean_logits"], torch.float64, what="want_mean_logit")
    assert out[10].numel() == 0
    out = _ops.loss(x, w, t, **op_kwargs(want_log_sum_sq=True))
    assert_close(out[10], stats["log_sum_sq_probs"], torch.float64, what="want_log_sum_sq")
    assert out[9].numel() == 0
