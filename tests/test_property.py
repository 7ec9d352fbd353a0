"""Property test: random shapes and random option combinations, fusedce vs the float64 reference.

Hypothesis draws the shapes (N 0..40, H 1..16, V 1..300), the options, and a seed for the tensor
values; the same comparison as the hand-written tests (tests/checks.py) then runs in float64.
The example count is bounded and derandomized so the suite stays fast and every run is the same;
a failure prints the drawn example, which reproduces it.
"""

import pytest
import torch

pytest.importorskip("hypothesis")  # in the test extras; a bare GPU machine may lack it

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from checks import check_cross_entropy, check_linear_cross_entropy, check_stats  # noqa: E402

SETTINGS = settings(
    max_examples=100,
    deadline=None,  # the first example includes one-time setup; time is bounded by the count
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # `device` is per test, not per example
)


@st.composite
def problems(draw):
    """(N, H, V) and a full set of public keyword arguments."""
    N = draw(st.integers(0, 40))
    H = draw(st.integers(1, 16))
    V = draw(st.integers(1, 300))
    options = dict(
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        ignore_index=draw(st.sampled_from([-100, 0])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),
        z_loss=draw(st.sampled_from([0.0, 1e-2])),
        softcap=draw(st.sampled_from([None, 2.0, 30.0])),
        logit_scale=draw(st.sampled_from([1.0, 0.5, 3.0])),
    )
    if options["reduction"] != "none" and draw(st.booleans()):
        options["num_items_in_batch"] = draw(st.integers(1, 64))
    extras = dict(
        bias=draw(st.booleans()),
        class_weight=draw(st.booleans()),
        ignore_fraction=draw(st.sampled_from([0.0, 0.3, 1.0])),
        leading=draw(st.sampled_from(["flat", "batched"])),
        shift=draw(st.booleans()),
        chunk_size=draw(st.sampled_from([None, 1, 7])),
        vocab_chunk_size=draw(st.sampled_from([None, 1, 16, 129])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    return N, H, V, options, extras


def _tensors(device, N, H, V, options, extras):
    g = torch.Generator().manual_seed(extras["seed"])
    lead = (2, N // 2) if extras["leading"] == "batched" and N % 2 == 0 else (N,)
    x = torch.randn(*lead, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * H**-0.5
    t = torch.randint(0, V, lead, generator=g)
    drop = torch.rand(lead, generator=g) < extras["ignore_fraction"]
    t = torch.where(drop, torch.full_like(t, options["ignore_index"]), t)
    kwargs = dict(options)
    if extras["bias"]:
        kwargs["linear_bias"] = torch.randn(V, generator=g, dtype=torch.float64).to(device)
    if extras["class_weight"]:
        kwargs["weight"] = (torch.rand(V, generator=g, dtype=torch.float64) + 0.1).to(device)
    return x.to(device), w.to(device), t.to(device), kwargs


@SETTINGS
@given(problem=problems())
def test_linear_cross_entropy_property(device, problem):
    N, H, V, options, extras = problem
    x, w, t, kwargs = _tensors(device, N, H, V, options, extras)
    x.requires_grad_()
    w.requires_grad_()
    if "linear_bias" in kwargs:
        kwargs["linear_bias"].requires_grad_()
    kwargs.update(shift=extras["shift"], chunk_size=extras["chunk_size"],
                  vocab_chunk_size=extras["vocab_chunk_size"], return_stats=True)
    upstream_rng = torch.Generator().manual_seed(extras["seed"] + 1)  # reproducible per example
    out, ref = check_linear_cross_entropy((x, w, t), kwargs, torch.float64,
                                          generator=upstream_rng, what=str(problem))
    check_stats(out, ref, torch.float64, what=str(problem))


@SETTINGS
@given(problem=problems())
def test_cross_entropy_property(device, problem):
    N, H, V, options, extras = problem
    x, w, t, kwargs = _tensors(device, N, H, V, options, extras)
    kwargs.pop("linear_bias", None)
    logits = (x @ w.t() * 3).requires_grad_()  # wider logits than the linear case
    kwargs.update(return_stats=True, inplace_backward=extras["shift"])
    upstream_rng = torch.Generator().manual_seed(extras["seed"] + 1)  # reproducible per example
    out, ref, _ = check_cross_entropy((logits, t), kwargs, torch.float64,
                                      generator=upstream_rng, what=str(problem))
    check_stats(out, ref, torch.float64, what=str(problem))

