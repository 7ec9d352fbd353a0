"""float16 under a GradScaler-style loss scale (issue 12 section 2).

Mixed-precision training in float16 multiplies the loss by a scale S (GradScaler: 2^16 at first)
before backward and divides the gradients by S afterwards, so that small gradients do not underflow
in fp16. The fused losses compute the gradients of a mean/sum loss in the forward, before S exists:
if they were rounded to fp16 there, a mean's 1/N would push d(loss)/d(logits) and the GEMM outputs
into fp16's subnormals (or to 0) and no later S could bring the lost bits back.

The check, per gradient: the unscaled fusedce gradient (grad / S) is off the float64 truth
(fusedce/reference.py) by at most MARGIN times what eager fp16 PyTorch is off by at the same S
(F.linear in fp16, the loss on logits.float(), backward of loss * S), plus a quarter unit of fp16
rounding at the gradient's scale; and for a matrix, the median over its rows of the row's relative
error is at most MARGIN times eager's (the rows of rare tokens in grad_weight are far below the
largest gradient: a max error does not see them lose their bits). The shapes make (p - y)/N fall below fp16's smallest normal
(2^-14): N >= 4096 tokens, V >= 8192 classes, a head weight of std 0.01-0.02 (initialization).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedce
from fusedce import reference

SCALES = (1.0, 2.0**8, 2.0**16)
MARGIN = 1.5
# The part of the budget that does not scale with eager's error: a quarter of fp16's unit of
# rounding at the gradient's largest magnitude (accuracy.py's budget allows a whole unit, which
# would hide the subnormal rounding this file is about on the CPU, where only the outputs were
# rounded in fp16).
SLACK = torch.finfo(torch.float16).eps / 4

# (N, V, H, std of the head weight) per device. On the CPU (which rounds only the outputs to fp16)
# a smaller weight makes grad_input ~1e-5, below fp16's smallest normal. CUDA: Llama's vocabulary,
# whose probabilities (~2^-17) are subnormal in fp16 unless scaled up (the fp16 gradient of the
# logits the kernels write).
SHAPES = {"cpu": (4096, 8192, 128, 0.01), "cuda": (8192, 128256, 1024, 0.02)}


def _err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float((x.double() - truth).abs().max())


def _check(what: str, got: torch.Tensor, eager: torch.Tensor, truth: torch.Tensor, S: float):
    """got / eager: the scaled fp16 gradients; truth: the unscaled float64 gradient."""
    assert got.dtype == eager.dtype, f"{what}: dtype {got.dtype}, eager {eager.dtype}"
    got, eager = got.to(truth.device).double() / S, eager.to(truth.device).double() / S
    slack = SLACK * float(truth.abs().max())
    if not torch.isfinite(eager).all():
        # Eager overflowed (a sum at a large S): GradScaler skips the step and halves S. fusedce
        # may overflow too (same outcome) or stay finite, but then it must be right.
        if torch.isfinite(got).all():
            assert _err(got, truth) <= 4 * slack, f"{what}: finite but off by {_err(got, truth):.3g}"
        return
    assert torch.isfinite(got).all(), f"{what}: non-finite where eager fp16 is finite"
    err, err_eager = _err(got, truth), _err(eager, truth)
    allowed = MARGIN * err_eager + slack
    assert err <= allowed, (
        f"{what} (S={S:g}): max error {err:.3g} vs float64 exceeds {allowed:.3g} "
        f"(eager fp16 {err_eager:.3g}, scale {float(truth.abs().max()):.3g})"
    )
    if truth.dim() == 2:
        row, row_eager = _row_err(got, truth), _row_err(eager, truth)
        assert row <= MARGIN * row_eager + 2**-20, (
            f"{what} (S={S:g}): median row relative error {row:.3g} exceeds {MARGIN} x eager's "
            f"{row_eager:.3g}")


def _row_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    norm = truth.norm(dim=-1)
    keep = norm > 0
    return float(((x - truth).norm(dim=-1)[keep] / norm[keep]).median())


class _Problem:
    """One set of fp16 inputs per device, its float64 gradients and eager's, computed once."""

    def __init__(self, device: str):
        N, V, H, std = SHAPES[device]
        g = torch.Generator().manual_seed(12)
        self.x = (torch.randn(N, H, generator=g) * 4).half().to(device)
        self.w = (torch.randn(V, H, generator=g) * std).half().to(device)
        self.b = (torch.randn(V, generator=g) * 0.02).half().to(device)
        t = torch.randint(0, V, (N,), generator=g)
        t[torch.rand(N, generator=g) < 0.1] = -100  # padding
        self.t = t.to(device)
        self.count = int((t != -100).sum())
        self.num_items = 2 * self.count  # two micro-batches of gradient accumulation
        # float64 gradients of the sum (on the device); the other reductions divide it exactly.
        xd, wd, bd = (v.detach().double().requires_grad_() for v in (self.x, self.w, self.b))
        ref = reference.linear_cross_entropy(xd, wd, self.t, linear_bias=bd, reduction="sum")
        self.truth_sum = torch.autograd.grad(ref.loss, (xd, wd, bd))
        self._eager = {}

    def denom(self, reduction: str) -> float:
        return {"mean": self.count, "sum": 1, "num_items": self.num_items}[reduction]

    def truth(self, reduction: str):
        return tuple(g / self.denom(reduction) for g in self.truth_sum)

    def kwargs(self, reduction: str) -> dict:
        if reduction == "num_items":
            return dict(reduction="sum", num_items_in_batch=self.num_items)
        return dict(reduction=reduction)

    def leaves(self):
        return tuple(v.detach().clone().requires_grad_() for v in (self.x, self.w, self.b))

    def eager(self, reduction: str, S: float):
        key = (reduction, S)
        if key not in self._eager:
            x, w, b = self.leaves()
            logits = F.linear(x, w, b).float()
            if reduction == "num_items":
                loss = F.cross_entropy(logits, self.t, reduction="sum") / self.num_items
            else:
                loss = F.cross_entropy(logits, self.t, reduction=reduction)
            self._eager[key] = torch.autograd.grad(loss * S, (x, w, b))
        return self._eager[key]


_PROBLEMS: dict[str, _Problem] = {}


@pytest.fixture
def problem(device):
    if device not in _PROBLEMS:
        _PROBLEMS[device] = _Problem(device)
    return _PROBLEMS[device]


@pytest.mark.parametrize("fp32_grad_accum", [False, True])
@pytest.mark.parametrize("S", SCALES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "num_items"])
def test_linear_cross_entropy_fp16_loss_scale(problem, device, reduction, S, fp32_grad_accum):
    x, w, b = problem.leaves()
    loss = fusedce.linear_cross_entropy(x, w, problem.t, linear_bias=b,
                                        fp32_grad_accum=fp32_grad_accum, **problem.kwargs(reduction))
    assert loss.dtype == torch.float32
    got = torch.autograd.grad(loss * S, (x, w, b))
    for name, gv, ev, tv in zip(("grad_input", "grad_weight", "grad_bias"), got,
                                problem.eager(reduction, S), problem.truth(reduction)):
        _check(f"{name} ({reduction}, fp32_grad_accum={fp32_grad_accum})", gv, ev, tv, S)


@pytest.mark.parametrize("S", SCALES)
def test_linear_cross_entropy_fp16_loss_scale_chunked(problem, device, S):
    """Several token chunks (and vocabulary tiles: the low-memory path, whose forward computes the
    gradients in a second pass over the tiles) accumulate into the same float32 gradients."""
    truth = problem.truth("mean")
    eager = problem.eager("mean", S)
    for kw in (dict(chunk_size=1000), dict(low_memory=True, vocab_chunk_size=3000, chunk_size=1500)):
        x, w, b = problem.leaves()
        loss = fusedce.linear_cross_entropy(x, w, problem.t, linear_bias=b, **kw)
        got = torch.autograd.grad(loss * S, (x, w, b))
        for name, gv, ev, tv in zip(("grad_input", "grad_weight", "grad_bias"), got, eager, truth):
            _check(f"{name} {kw}", gv, ev, tv, S)


def test_fp16_loss_and_lse(problem, device):
    """A gradient through the loss (computed in the forward, float32) and one through the lse
    (recomputed in backward) are summed in float32 and rounded to fp16 once."""
    S, c = 2.0**16, 0.05  # a z-loss-like weight: the lse part is not negligible
    x, w, b = problem.leaves()
    out = fusedce.linear_cross_entropy(x, w, problem.t, linear_bias=b, return_stats=True)
    got = torch.autograd.grad((out.loss + c * (out.lse**2).mean()) * S, (x, w, b))
    xd, wd, bd = (v.detach().double().requires_grad_() for v in (problem.x, problem.w, problem.b))
    ref = reference.linear_cross_entropy(xd, wd, problem.t, linear_bias=bd)
    truth = torch.autograd.grad(ref.loss + c * (ref.lse**2).mean(), (xd, wd, bd))
    ex, ew, eb = problem.leaves()
    logits = F.linear(ex, ew, eb).float()
    eloss = F.cross_entropy(logits, problem.t) + c * (torch.logsumexp(logits, -1) ** 2).mean()
    eager = torch.autograd.grad(eloss * S, (ex, ew, eb))
    for name, gv, ev, tv in zip(("grad_input", "grad_weight", "grad_bias"), got, eager, truth):
        _check(name, gv, ev, tv, S)


_CACHE: dict = {}


def _cached(key, fn):
    """Inputs, float64 truth and eager gradients shared by a test's parametrizations."""
    if key not in _CACHE:
        _CACHE[key] = fn()
    return _CACHE[key]


@pytest.mark.parametrize("S", SCALES)
def test_cross_entropy_fp16_loss_scale(device, S):
    """fusedce.cross_entropy on given fp16 logits computes its gradient in backward, from the
    true upstream gradient: as accurate as eager under any scale."""
    def setup():
        N, V = 4096, 4096
        g = torch.Generator().manual_seed(3)
        logits = (torch.randn(N, V, generator=g) * 2).half().to(device)
        t = torch.randint(0, V, (N,), generator=g).to(device)
        ld = logits.cpu().double().requires_grad_()
        return logits, t, torch.autograd.grad(reference.cross_entropy(ld, t.cpu()).loss, ld)[0]

    def eager():
        e = logits.clone().requires_grad_()
        return torch.autograd.grad(F.cross_entropy(e.float(), t) * S, e)[0]

    logits, t, truth = _cached(("ce", device), setup)
    a = logits.clone().requires_grad_()
    got = torch.autograd.grad(fusedce.cross_entropy(a, t) * S, a)[0]
    _check("grad_logits", got, _cached(("ce", device, S), eager), truth, S)


@pytest.mark.parametrize("S", SCALES)
def test_policy_loss_fp16_loss_scale(device, S):
    """policy_loss passes per-token gradient weights (GRPO: 1 / (sequence length * B)) to the
    fused op: the terms kernel's gradients under the same float32 treatment."""
    B, T, V, H = 8, 512, 4096, 128

    def setup():
        g = torch.Generator().manual_seed(5)
        x = (torch.randn(B, T, H, generator=g) * 4).half().to(device)
        w = (torch.randn(V, H, generator=g) * 0.01).half().to(device)
        tokens = torch.randint(0, V, (B, T), generator=g).to(device)
        old = (-torch.rand(B, T, generator=g) * 2 - 8).to(device)
        adv = torch.randn(B, generator=g).to(device)
        mask = (torch.rand(B, T, generator=g) < 0.9).to(device)
        xd, wd = x.cpu().double().requires_grad_(), w.cpu().double().requires_grad_()
        rloss = reference.policy_loss(F.linear(xd, wd).reshape(B, T, V), tokens.cpu(), old.cpu(),
                                      adv.cpu(), mask=mask.cpu())[0]
        return (x, w, tokens, old, adv, mask), torch.autograd.grad(rloss, (xd, wd))

    def eager():
        xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
        eloss = reference.policy_loss(F.linear(xe, we).float(), tokens, old, adv, mask=mask,
                                      dtype=None)[0]
        return torch.autograd.grad(eloss * S, (xe, we))

    (x, w, tokens, old, adv, mask), truth = _cached(("policy", device), setup)
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = fusedce.policy_loss(xf, wf, tokens, old, adv, mask=mask)
    got = torch.autograd.grad(loss * S, (xf, wf))
    for name, gv, ev, tv in zip(("grad_input", "grad_weight"), got,
                                _cached(("policy", device, S), eager), truth):
        _check(name, gv, ev, tv, S)


@pytest.mark.parametrize("S", SCALES)
def test_distillation_loss_fp16_loss_scale(device, S):
    N, V, H = 4096, 4096, 128
    kw = dict(kind="forward_kl", ce_weight=0.5)

    def setup():
        g = torch.Generator().manual_seed(7)
        x = (torch.randn(N, H, generator=g) * 4).half().to(device)
        w = (torch.randn(V, H, generator=g) * 0.01).half().to(device)
        teacher = (torch.randn(N, V, generator=g) * 2).half().to(device)
        t = torch.randint(0, V, (N,), generator=g).to(device)
        xd, wd = x.cpu().double().requires_grad_(), w.cpu().double().requires_grad_()
        rloss = reference.distillation_loss(F.linear(xd, wd), teacher.cpu(), t.cpu(), **kw)
        return (x, w, teacher, t), torch.autograd.grad(rloss, (xd, wd))

    def eager():
        xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
        eloss = reference.distillation_loss(F.linear(xe, we).float(), teacher.float(), t,
                                            dtype=None, **kw)
        return torch.autograd.grad(eloss * S, (xe, we))

    (x, w, teacher, t), truth = _cached(("distill", device), setup)
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fusedce.distillation_loss(xf, wf, t, teacher_logits=teacher, **kw)
    got = torch.autograd.grad(loss * S, (xf, wf))
    for name, gv, ev, tv in zip(("grad_input", "grad_weight"), got,
                                _cached(("distill", device, S), eager), truth):
        _check(name, gv, ev, tv, S)


# --------------------------------------------------------------------------------------------
# The float32 gradient outputs of a float16 `loss` under opcheck and torch.compile.
# --------------------------------------------------------------------------------------------


def test_opcheck_loss_fp16(device):
    """The fake kernel's dtypes of the forward-computed gradients (float32 for float16 inputs) match
    the real op's, with and without gradients requested."""
    from checks import opcheck
    from samples import CASE_NAMES, sample_inputs

    n = 0
    for requires_grad in (True, False):
        for args, kwargs in sample_inputs(device, torch.float16, "fusedce::loss",
                                          requires_grad=requires_grad):
            out = torch.ops.fusedce.loss(*args, **kwargs)
            for grad, want, x in zip(out[6:], kwargs["grad_mask"], (args[0], args[1], kwargs["bias"])):
                if want and x is not None:
                    assert grad.dtype == torch.float32 and grad.shape == x.shape
            try:
                opcheck(torch.ops.fusedce.loss.default, args, kwargs)
            except Exception as e:
                raise AssertionError(f"opcheck fusedce::loss (fp16) failed on {CASE_NAMES[n % len(CASE_NAMES)]}: {e}") from e
            n += 1
    assert n == 2 * len(CASE_NAMES)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fp16_loss_scale(device, dynamic):
    """torch.compile(fullgraph=True) of the scaled fp16 loss: the gradients (float16, rounded once
    from float32) equal eager fusedce's."""
    N, V, H = 64, 300, 32
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(N, H, generator=g)).half().to(device)
    w = (torch.randn(V, H, generator=g) * 0.05).half().to(device)
    b = (torch.randn(V, generator=g) * 0.05).half().to(device)
    t = torch.randint(0, V, (N,), generator=g).to(device)
    S = 2.0**12

    def step(x, w, b):
        return fusedce.linear_cross_entropy(x, w, t, linear_bias=b) * S

    def grads(fn):
        leaves = [v.clone().requires_grad_() for v in (x, w, b)]
        fn(*leaves).backward()
        return [v.grad for v in leaves]

    want = grads(step)
    got = grads(torch.compile(step, fullgraph=True, dynamic=dynamic))
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), got, want):
        assert a.dtype == torch.float16, f"{name}: {a.dtype}"
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_vocab_parallel_fp16_loss_scale(tmp_path):
    """The vocab-parallel path (fusedce/_parallel.py) divides its forward-computed weight gradient
    by the mean's denominator too: float32 for float16 weights (one gloo rank; the chunk loop and
    the accumulation are those of every rank)."""
    import torch.distributed as dist
    import fusedce.distributed as fd

    N, V, H = 4096, 8192, 128
    g = torch.Generator().manual_seed(13)
    x = (torch.randn(N, H, generator=g) * 4).half()
    w = (torch.randn(V, H, generator=g) * 0.01).half()
    t = torch.randint(0, V, (N,), generator=g)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    truth = torch.autograd.grad(reference.linear_cross_entropy(xd, wd, t).loss, (xd, wd))
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        for S in SCALES:
            xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
            got = torch.autograd.grad(fd.linear_cross_entropy(xs, ws, t, process_group=group, chunk_size=1024) * S,
                                      (xs, ws))
            xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
            eager = torch.autograd.grad(F.cross_entropy(F.linear(xe, we).float(), t) * S, (xe, we))
            for name, gv, ev, tv in zip(("grad_input", "grad_weight"), got, eager, truth):
                _check(f"vocab-parallel {name}", gv, ev, tv, S)
    finally:
        if owned:
            dist.destroy_process_group()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [
    dict(),
    # Class weights above 1 and logit_scale above 1 enter the fp16 path's gradient normalization
    # (the bound that keeps the logits' gradient in range); a sum (no grad_scale at all) once came
    # out scaled by the largest class weight on CUDA.
    dict(weight="big", logit_scale=2.5, label_smoothing=0.1, z_loss=1e-3),
    dict(weight="big", softcap=5.0),
], ids=["plain", "weights_scale", "weights_softcap"])
def test_fp16_every_option_against_reference(device, reduction, options):
    """Every fp16 gradient path (with and without a grad_scale) against float64, at a size where
    fp16's rounding is the only error: the same budget as every other half-precision test."""
    from accuracy import assert_close, eager_linear_cross_entropy

    g = torch.Generator().manual_seed(11)
    N, H, V = 96, 40, 1031
    x = torch.randn(N, H, generator=g).to(device, torch.float16).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.2).to(device, torch.float16).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g).to(device)
    t[::7] = -100
    kw = dict(options)
    if kw.get("weight") == "big":
        kw["weight"] = (torch.rand(V, generator=g) * 3 + 0.25).to(device)
    loss = fusedce.linear_cross_entropy(x, w, t, reduction=reduction, **kw)
    up = torch.randn(loss.shape, generator=g).to(device) if reduction == "none" else None
    got = torch.autograd.grad(loss, (x, w), up)

    xd, wd = (v.detach().double().requires_grad_() for v in (x, w))
    ref_kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref = reference.linear_cross_entropy(xd, wd, t, reduction=reduction, **ref_kw).loss
    truth = torch.autograd.grad(ref, (xd, wd), None if up is None else up.double())
    xe, we = (v.detach().clone().requires_grad_() for v in (x, w))
    eager_loss = eager_linear_cross_entropy(xe, we, t, reduction=reduction, **kw)
    eager = torch.autograd.grad(eager_loss.float(), (xe, we), None if up is None else up.float())
    assert_close(loss, ref, torch.float16, eager=eager_loss, what=f"loss {reduction} {options}")
    for name, a, tr, e in zip(("grad_input", "grad_weight"), got, truth, eager):
        assert_close(a, tr, torch.float16, eager=e, what=f"{name} {reduction} {options}")
