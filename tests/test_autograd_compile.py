"""The ops as PyTorch sees them: opcheck (schemas, fake kernels, autograd registration, AOT
dispatch), float64 gradient checks, and torch.compile of a training step without graph breaks."""

import itertools

import pytest
import torch
import torch._dynamo.testing

import fusedce
from checks import opcheck
from samples import CASE_NAMES, OPS, sample, sample_inputs

RAW_OPS = [op for op in OPS if op.startswith("fusedce::")]
FORWARD_OPS = ("fusedce::loss", "fusedce::cross_entropy")


def _op(name):
    namespace, op = name.split("::")
    return getattr(getattr(torch.ops, namespace), op).default


# --------------------------------------------------------------------------------------------
# opcheck: every op, every sample input.
# --------------------------------------------------------------------------------------------


def test_every_registered_op_has_samples():
    """A new op in csrc/fusedce.cpp must get its samples in tests/samples.py (and so opcheck)."""
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fusedce::")}
    assert registered == set(RAW_OPS), f"ops without samples: {registered - set(RAW_OPS)}"


# The forward ops with inputs that do not / do require grad (two autograd paths of `loss`:
# gradients recomputed in the backward, or computed in the forward); the backward ops take none.
OPCHECK_CASES = [pytest.param(op, False, id=f"{op}-no_grad") for op in RAW_OPS] + [
    pytest.param(op, True, id=f"{op}-grad") for op in FORWARD_OPS
]


@pytest.mark.parametrize("op,requires_grad", OPCHECK_CASES)
@pytest.mark.parametrize(
    "dtype",
    [
        torch.float64,  # the gradcheck dtype
        torch.float32,  # the compute dtype of the float32 and half paths
    ],
    ids=str,
)
def test_opcheck(device, op, dtype, requires_grad):
    n = 0
    for args, kwargs in sample_inputs(device, dtype, op, requires_grad=requires_grad):
        try:
            opcheck(_op(op), args, kwargs)
        except Exception as e:
            raise AssertionError(f"opcheck {op} failed on sample {CASE_NAMES[n]}: {e}") from e
        n += 1
    assert n == len(CASE_NAMES)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)  # as test_opcheck
def test_opcheck_cross_entropy_inplace_backward(device, dtype):
    """cross_entropy's backward may overwrite its saved logits (inplace_backward=True)."""
    op = "fusedce::cross_entropy"
    for name, (args, kwargs) in zip(CASE_NAMES, sample_inputs(device, dtype, op, requires_grad=True)):
        try:
            # checks.opcheck: NaN-aware, the mean over no token is NaN
            opcheck(_op(op), args, {**kwargs, "inplace_backward": True})
        except Exception as e:
            raise AssertionError(f"opcheck {op} inplace_backward failed on {name}: {e}") from e


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])  # scalar and per-token shapes
def test_meta_tensors_give_shapes_and_dtypes(reduction):
    """All inputs on 'meta' run the fake kernels only: shapes and dtypes, no data."""
    x = torch.empty(2, 3, 8, device="meta", dtype=torch.bfloat16)
    w = torch.empty(11, 8, device="meta", dtype=torch.bfloat16)
    t = torch.empty(2, 3, device="meta", dtype=torch.int64)
    out = fusedce.linear_cross_entropy(x, w, t, reduction=reduction, return_stats=True)
    want = (2, 3) if reduction == "none" else ()
    assert out.loss.device.type == "meta" and out.loss.shape == want
    assert out.loss.dtype == torch.float32
    assert out.lse.shape == (2, 3) and out.predicted.shape == (2, 3)
    assert out.predicted.dtype == torch.int64
    logits = torch.empty(2, 3, 11, device="meta", dtype=torch.float16)
    ce = fusedce.cross_entropy(logits, t, reduction=reduction)
    assert ce.device.type == "meta" and ce.shape == want and ce.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Gradient checks in float64.
# --------------------------------------------------------------------------------------------


def _numerical_grads(fn, inputs, eps=1e-6):
    """Central differences of the scalar fn() with respect to each tensor of `inputs`."""
    grads = []
    with torch.no_grad():
        for inp in inputs:
            g = torch.zeros_like(inp)
            for i in itertools.product(*map(range, inp.shape)):  # works for strided inputs too
                orig = inp[i].item()
                inp[i] = orig + eps
                plus = fn().item()
                inp[i] = orig - eps
                minus = fn().item()
                inp[i] = orig
                g[i] = (plus - minus) / (2 * eps)
            grads.append(g)
    return grads


def _lce_leaves(args, kwargs):
    x, w, _ = args
    b = kwargs.get("linear_bias")
    return [x, w] + ([b] if b is not None else [])


@pytest.mark.parametrize("case", CASE_NAMES)
def test_gradcheck_linear_cross_entropy_none(device, case):
    """torch.autograd.gradcheck of input, linear_weight, linear_bias with reduction='none'
    (the exact recomputing backward, any upstream gradient), on every sample case."""
    args, kwargs = sample(device, torch.float64, case, requires_grad=True)
    kwargs = {**kwargs, "reduction": "none"}
    x, w, t = args
    has_bias = kwargs.get("linear_bias") is not None

    def fn(x, w, *b):
        kw = dict(kwargs, linear_bias=b[0]) if has_bias else kwargs
        return fusedce.linear_cross_entropy(x, w, t, **kw)

    assert torch.autograd.gradcheck(fn, tuple(_lce_leaves(args, kwargs)))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_gradcheck_linear_cross_entropy_scalar(device, case):
    """torch.autograd.gradcheck of the mean/sum path (gradients computed in the forward, scaled in
    backward). gradcheck backpropagates twice through one graph (its reentrancy check), which
    this path allows only inside fusedce.allow_second_backward(). The NaN of a mean over no
    token is compared through reduction='sum' (its zero gradients: test_linear_cross_entropy)."""
    args, kwargs = sample(device, torch.float64, case, requires_grad=True)
    if kwargs.get("reduction", "mean") == "none" or case in ("all_ignored_mean", "empty_mean"):
        kwargs = {**kwargs, "reduction": "sum"}
    t = args[2]
    has_bias = kwargs.get("linear_bias") is not None

    def fn(x, w, *b):
        kw = dict(kwargs, linear_bias=b[0]) if has_bias else kwargs
        return fusedce.linear_cross_entropy(x, w, t, **kw)

    with fusedce.allow_second_backward():
        assert torch.autograd.gradcheck(fn, tuple(_lce_leaves(args, kwargs)))


@pytest.mark.parametrize("case", ["mean", "everything"])  # plain, and every option at once
def test_gradients_by_central_differences(device, case):
    """Independent of gradcheck and of allow_second_backward: central differences of the float64
    loss against the gradients of ONE ordinary backward (the in-place scaling path)."""
    args, kwargs = sample(device, torch.float64, case, requires_grad=True)
    leaves = _lce_leaves(args, kwargs)

    def loss():
        return fusedce.linear_cross_entropy(*args, **kwargs)

    analytical = torch.autograd.grad(loss(), leaves)
    numerical = _numerical_grads(loss, leaves)
    for name, a, n in zip(("input", "linear_weight", "linear_bias"), analytical, numerical):
        torch.testing.assert_close(a, n, rtol=1e-3, atol=1e-5, msg=lambda m, k=name: f"{k}: {m}")


@pytest.mark.parametrize("case", CASE_NAMES)
def test_gradcheck_cross_entropy(device, case):
    """cross_entropy recomputes in backward: torch.autograd.gradcheck applies to every
    reduction. The NaN of a mean over no token is compared through reduction='sum'."""
    (logits, t), kwargs = sample(device, torch.float64, case, op="cross_entropy",
                                 requires_grad=True)
    if case in ("all_ignored_mean", "empty_mean"):
        kwargs = {**kwargs, "reduction": "sum"}
    assert torch.autograd.gradcheck(lambda z: fusedce.cross_entropy(z, t, **kwargs), (logits,))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_gradcheck_raw_loss_op(device, case):
    """The raw op on its recomputing path (grad_mask all False): gradients of its three
    differentiable outputs (loss, token_loss, lse) at once, i.e. loss_backward with grad_lse."""
    args, kwargs = sample(device, torch.float64, case, op="fusedce::loss", requires_grad=True)
    kwargs = {**kwargs, "grad_mask": [False, False, False]}
    x, w, t = (a.detach().requires_grad_(a.is_floating_point()) for a in args)  # leaves
    b = kwargs.pop("bias")
    leaves = (x, w) + ((b,) if b is not None else ())

    # A mean over no token (mean=True, every target ignored or N = 0) is NaN, as F.cross_entropy's,
    # with zero gradients by the same convention: no finite difference of NaN can check that, so
    # there `loss` is checked to give exactly zero gradients and gradcheck covers the other two.
    nan_mean = case in ("all_ignored_mean", "empty_mean")

    def fn(x, w, *bias):
        out = torch.ops.fusedce.loss(x, w, t, bias[0] if bias else None, **kwargs)
        return (out[1], out[2]) if nan_mean else (out[0], out[1], out[2])

    if nan_mean:
        assert kwargs["mean"]
        loss = torch.ops.fusedce.loss(x, w, t, b, **kwargs)[0]
        assert torch.isnan(loss)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_gradcheck_raw_cross_entropy_op(device, case):
    """The raw op: gradients of token_loss and lse (cross_entropy_backward with grad_lse), and of
    the mean=True loss beside them (its grad_scale folded into the per-token gradient)."""
    (logits, t), kwargs = sample(device, torch.float64, case, op="fusedce::cross_entropy",
                                 requires_grad=True)

    def fn(z):
        token_loss, lse, _, loss, _ = torch.ops.fusedce.cross_entropy(z, t, **kwargs)
        if not kwargs["mean"] or not torch.isfinite(loss):  # nan: the mean over no token
            return token_loss, lse
        return token_loss, lse, loss

    assert torch.autograd.gradcheck(fn, (logits,))


# --------------------------------------------------------------------------------------------
# torch.compile: a small model + loss training step, one graph, equal to eager.
# --------------------------------------------------------------------------------------------


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=50, hidden=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.mlp = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens):
        return torch.tanh(self.mlp(self.embed(tokens)))


def _make_step(model, **loss_kwargs):
    def step(tokens, labels):
        hidden = model(tokens)
        return fusedce.linear_cross_entropy(hidden, model.head.weight, labels, shift=True,
                                            **loss_kwargs)
    return step


def _run(step, model, tokens, upstream=None):
    """One training step's loss and the gradients of every parameter."""
    model.zero_grad(set_to_none=True)
    loss = step(tokens, tokens)
    loss.backward(upstream)
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(a, b):
    loss_a, grads_a = a
    loss_b, grads_b = b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",  # AOTAutograd tracing of forward + backward through the fake kernels
        "inductor",  # what users get from torch.compile by default
    ],
)
def test_compile_training_step_fullgraph(device, backend):
    torch._dynamo.reset()
    model = TinyLM().to(device)
    loss_kwargs = dict(z_loss=1e-3, label_smoothing=0.1, ignore_index=0)
    step = _make_step(model, **loss_kwargs)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(step, backend=counter, fullgraph=True)  # a graph break raises
    tokens = torch.randint(0, 50, (2, 9), device=device)
    _assert_same(_run(compiled, model, tokens), _run(step, model, tokens))
    assert counter.frame_count >= 1 and counter.op_count > 0


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",  # symbolic shapes through the fake kernels
        "inductor",  # symbolic shapes through inductor
    ],
)
def test_compile_dynamic_shapes_no_recompile(device, backend):
    torch._dynamo.reset()
    model = TinyLM().to(device)
    step = _make_step(model, softcap=5.0)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    frames = None
    for length in (7, 12, 20):  # three sequence lengths, one compiled graph
        tokens = torch.randint(0, 50, (3, length), device=device)
        _assert_same(_run(compiled, model, tokens), _run(step, model, tokens))
        if frames is None:
            frames = counter.frame_count
    assert counter.frame_count == frames, "a new sequence length recompiled the step"


def test_compile_reduction_none(device):
    """Per-token losses under compile: the recomputing backward with a random upstream."""
    torch._dynamo.reset()
    model = TinyLM().to(device)
    step = _make_step(model, reduction="none", z_loss=1e-2)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    tokens = torch.randint(0, 50, (2, 9), device=device)
    upstream = torch.randn(2, 9, device=device)
    _assert_same(_run(compiled, model, tokens, upstream), _run(step, model, tokens, upstream))


def test_compile_return_stats_and_num_items(device):
    """LossOutput fields and a tensor num_items_in_batch inside one graph."""
    torch._dynamo.reset()
    model = TinyLM().to(device)

    def step(tokens, labels, n):
        out = fusedce.linear_cross_entropy(model(tokens), model.head.weight, labels,
                                           num_items_in_batch=n, return_stats=True, z_loss=1e-3)
        return out.loss, out.lse, out.predicted, out.accuracy, out.z_loss

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    tokens = torch.randint(0, 50, (2, 9), device=device)
    n = torch.tensor(40, device=device)
    got, want = compiled(tokens, tokens, n), step(tokens, tokens, n)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    got[0].backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    want[0].backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-5, atol=1e-6)


def test_compile_cross_entropy(device):
    """fusedce.cross_entropy on logits inside a compiled step (including its stats)."""
    torch._dynamo.reset()
    model = TinyLM().to(device)

    def step(tokens, labels):
        logits = model.head(model(tokens))
        out = fusedce.cross_entropy(logits, labels, label_smoothing=0.1, return_stats=True)
        return out.loss + 0.01 * out.lse.pow(2).mean()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    tokens = torch.randint(0, 50, (2, 9), device=device)
    _assert_same(_run(compiled, model, tokens), _run(step, model, tokens))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_compiled_autograd_fullgraph_backward(dtype):
    """Compiled autograd traces the backward of an eager forward: the scaling of the precomputed
    gradients asked functorch whether the upstream gradient was batched, a call dynamo cannot
    trace (a graph break in every backward; an error under fullgraph=True)."""
    from torch._dynamo import compiled_autograd

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(11, 8, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    t = torch.randint(0, 11, (6,), generator=g)

    def grads(compiled):
        x.grad = w.grad = None
        for k in (1.0, 2.0):  # two accumulated backward passes
            loss = fusedce.linear_cross_entropy(x, w, t, z_loss=1e-2, num_items_in_batch=5) * k
            if compiled:
                with compiled_autograd._enable(torch.compile(backend="eager", fullgraph=True)):
                    loss.backward()
            else:
                loss.backward()
        return x.grad.clone(), w.grad.clone()

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b)
