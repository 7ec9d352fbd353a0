"""memory_budget= (fusedce/_budget.py): the chunking a budget picks, that it is the chunking the C++
ops then run, that the results do not depend on it, its errors, and the parameter on every public
entry. The CUDA peak-memory bound is checked at the end (skipped without CUDA)."""

import inspect
import itertools
from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fusedce
from fusedce import _budget, distributed as fusedce_distributed
from fusedce._budget import ChunkPlan, chunk_rows, driver_row_bytes, plan, row_bytes
from test_chunk_budget import driver, run  # noqa: F401  (the compiled csrc/chunk_budget.h)

MiB = 1 << 20
CPU_DRIVER_BUDGET = 64 * MiB  # csrc/cpu/loss_cpu.cpp kTileBudgetBytes


def logits_tiles(fn, H):
    """(rows, cols) of every logits GEMM the ops ran inside fn(): aten::mm / addmm of a [rows, H]
    chunk by a [H, cols] weight tile (H chosen distinct from every other size of the call)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    tiles = []
    for e in prof.events():
        if e.name not in ("aten::mm", "aten::addmm"):
            continue
        shapes = [s for s in e.input_shapes if len(s) == 2]
        if len(shapes) >= 2 and shapes[0][1] == H and shapes[1][0] == H:
            tiles.append((shapes[0][0], shapes[1][1]))
    assert tiles, "no logits GEMM seen"
    return tiles


def expected_rows(n, c):
    """The chunk heights of n rows in chunks of c."""
    return sorted({min(c, n - r0) for r0 in range(0, n, c)})


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


# ---------------------------------------------------------------------------------------------
# The accounting mirrors the drivers
# ---------------------------------------------------------------------------------------------


def test_chunk_rows_matches_header(driver):  # noqa: F811
    cases = list(itertools.product(
        [1, 37, 63, 64, 65, 300, 4097, 8192, 100003],
        [7, 4096, 64 * MiB, 1000 * MiB],
        [2, 24, 4096, 256512, 1 << 30],
        [0, 1]))
    got = run(driver, [(n, 0, b, pr, bal, 1, 0) for n, b, pr, bal in cases])
    assert [g[0] for g in got] == [chunk_rows(n, b, pr, bool(bal)) for n, b, pr, bal in cases]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n,V,vcs", [(300, 70001, None), (4000, 20001, 9000)])
def test_cpu_driver_row_bytes_match_its_choice(dtype, n, V, vcs):
    # The CPU driver's own choice at its own budget (no chunk_size): the chunks it runs are the
    # ones chunk_rows gives for driver_row_bytes, so the Python mirror counts what the driver does.
    H = 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, H, generator=g).to(dtype)
    w = torch.randn(V, H, generator=g).to(dtype)
    t = torch.randint(0, V, (n,), generator=g)
    tiles = logits_tiles(lambda: fusedce.linear_cross_entropy(x, w, t, vocab_chunk_size=vcs), H)
    c = chunk_rows(n, CPU_DRIVER_BUDGET, driver_row_bytes("cpu", dtype, V, H, vcs or 0), False)
    assert c < n, "the case must chunk"
    assert sorted({r for r, _ in tiles}) == expected_rows(n, c)
    assert max(col for _, col in tiles) == (vcs or V)
    # the terms path (token_logprobs) counts the same bytes on the CPU
    tiles = logits_tiles(lambda: fusedce.token_logprobs(x, w, t), H)
    c = chunk_rows(n, CPU_DRIVER_BUDGET, driver_row_bytes("cpu", dtype, V, H, terms=True), False)
    assert sorted({r for r, _ in tiles}) == expected_rows(n, c)


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def test_plan_llama_shape():
    # bf16 8192 x 4096 x 128256 on CUDA: a whole row is 256512 bytes; 64 MiB holds 261 rows,
    # >= FAST_MIN_ROWS, so fast mode, balanced to 32 chunks of 256 rows
    bf = torch.bfloat16
    assert plan(64 * MiB, 8192, "cuda", bf, 128256, 4096) == ChunkPlan(256, 0, 256 * 256512)
    assert plan(1024 * MiB, 8192, "cuda", bf, 128256, 4096) == ChunkPlan(4096, 0, 4096 * 256512)
    assert plan(4096 * MiB, 8192, "cuda", bf, 128256, 4096) == ChunkPlan(8192, 0, 8192 * 256512)
    # 32 MiB holds 130 whole rows: tiles of 128256 classes at most, 1024 rows aimed at. A tiled row
    # counts its tile (bf16), the float32 grad_input row (16 KiB) and 24 bytes of softmax state.
    p = plan(32 * MiB, 8192, "cuda", bf, 128256, 4096)
    assert p.vocab_chunk_size == (32 * MiB // 1024 - 4 * 4096 - 24) // 2 // 128 * 128
    assert p.chunk_size == 1024 and p.bytes <= 32 * MiB
    # without a gradient of the input there is no float32 row: wider tiles
    q = plan(32 * MiB, 8192, "cuda", bf, 128256, 4096, need_grad_input=False)
    assert q.vocab_chunk_size > p.vocab_chunk_size


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_plan_invariants(device_type, dtype):
    for n, V, H, terms in itertools.product([1, 37, 1000, 8191], [129, 1001, 50257], [24, 4096],
                                            [False, True]):
        kw = dict(terms=terms)
        minimum = _budget.minimum_budget(device_type, dtype, V, H, **kw)
        whole = row_bytes(device_type, dtype, V, H, 0, **kw)
        for budget in sorted({minimum, minimum + 1, 3 * minimum + 5, whole * 50 + 7, whole * 300,
                              whole * 10**4, 7 * MiB + 3}):
            if budget < minimum:
                continue
            p = plan(budget, n, device_type, dtype, V, H, **kw)
            assert 1 <= p.chunk_size <= n
            assert p.bytes <= budget, (n, V, H, budget, p)
            assert p.bytes == p.chunk_size * row_bytes(device_type, dtype, V, H, p.vocab_chunk_size, **kw)
            if p.vocab_chunk_size:
                assert not terms
                assert p.vocab_chunk_size % 128 == 0 and 128 <= p.vocab_chunk_size < V
                assert budget // whole < min(n, _budget.FAST_MIN_ROWS)  # whole rows would not do
            else:
                assert terms or budget // whole >= min(n, _budget.FAST_MIN_ROWS)
        with pytest.raises(ValueError, match=f"memory_budget={minimum - 1} .* minimum of {minimum}"):
            plan(minimum - 1, n, device_type, dtype, V, H, **kw)


def test_plan_without_n_is_n_free():
    # a symbolic N (torch.compile(dynamic=True)): the plan must not depend on it
    p = plan(64 * MiB, None, "cuda", torch.bfloat16, 128256, 4096)
    assert p.vocab_chunk_size == 0 and p.chunk_size == 256  # 261 rows, down to a multiple of 64


# ---------------------------------------------------------------------------------------------
# Results do not depend on the budget; the ops run the planned chunks
# ---------------------------------------------------------------------------------------------


def _lce_case(device, dtype=torch.float64, n=37, H=24, V=1001, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(device=device, dtype=dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(device=device, dtype=dtype) if bias else None
    t = torch.randint(0, V, (n,), generator=g)
    t[::5] = -100
    return x, w, b, t.to(device)


def _budgets(device_type, dtype, n, V, H):
    """Budgets that give one chunk, chunks of whole rows (n > FAST_MIN_ROWS), vocabulary tiles
    (wide and narrow) and the minimum."""
    whole = row_bytes(device_type, dtype, V, H, 0)
    out = [10**12, whole * (_budget.FAST_MIN_ROWS + 4) + 11, whole * 6,
           3 * row_bytes(device_type, dtype, V, H, 256) + 5]
    if n < 100:  # one-row chunks of the narrowest tile: thousands of GEMMs for more rows
        out.append(_budget.minimum_budget(device_type, dtype, V, H))
    plans = [plan(b, n, device_type, dtype, V, H) for b in out]
    assert plans[0] == ChunkPlan(n, 0, n * whole)
    assert sum(1 for p in plans if p.vocab_chunk_size) == len(out) - 2, plans
    if n > _budget.FAST_MIN_ROWS + 4:
        assert not plans[1].vocab_chunk_size and plans[1].chunk_size < n, plans
    return out


@pytest.mark.parametrize("reduction,n", [("mean", 37), ("none", 37), ("mean", 300)])
def test_linear_cross_entropy_equals_default(device, reduction, n):
    H, V = 24, 1001
    x, w, b, t = _lce_case(device, n=n, H=H, V=V)
    up = torch.randn(n, dtype=torch.float64, device=device) if reduction == "none" else None

    def grads(**kw):
        fx, fw, fb = leaves(x, w, b)
        out = fusedce.linear_cross_entropy(fx, fw, t, linear_bias=fb, reduction=reduction,
                                           label_smoothing=0.1, z_loss=1e-3, return_stats=True, **kw)
        (out.loss if up is None else out.loss @ up).backward()
        return [out.loss, out.lse, out.predicted, fx.grad, fw.grad, fb.grad]

    want = grads()
    for budget in _budgets(device, torch.float64, n, V, H):
        p = plan(budget, n, device, torch.float64, V, H)
        tiles = logits_tiles(lambda: grads(memory_budget=budget), H) if device == "cpu" else None
        if tiles is not None:
            assert sorted({r for r, _ in tiles}) == expected_rows(n, p.chunk_size), (budget, p)
            assert max(c for _, c in tiles) == (p.vocab_chunk_size or V), (budget, p)
        got = grads(memory_budget=budget)
        for a, e in zip(got, want):
            # float64: only the order of the sums over chunks / tiles differs
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-13, msg=lambda m: f"budget {budget} {p}: {m}")


def test_linear_cross_entropy_half_within_error_budget(device):
    # bf16 through a vocabulary-tiling budget: checked against the float64 reference like any call
    from checks import check_linear_cross_entropy

    n, H, V = 19, 40, 777
    x, w, b, t = _lce_case(device, dtype=torch.bfloat16, n=n, H=H, V=V)
    x.requires_grad_()
    w.requires_grad_()
    budget = 2 * row_bytes(device, torch.bfloat16, V, H, 256)
    assert plan(budget, n, device, torch.bfloat16, V, H).vocab_chunk_size
    check_linear_cross_entropy((x, w, t), dict(memory_budget=budget), torch.bfloat16, what="budget")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_errors(device):
    n, H, V = 37, 24, 1001
    x, w, _, t = _lce_case(device, n=n, H=H, V=V)
    f = fusedce.linear_cross_entropy
    for bad in (0, -5, 1.5, True, "1GiB"):
        with pytest.raises(ValueError, match="memory_budget must be a positive int"):
            f(x, w, t, memory_budget=bad)
    minimum = _budget.minimum_budget(device, torch.float64, V, H, need_grad_input=False)
    with pytest.raises(ValueError, match=rf"memory_budget={minimum - 1} bytes .*minimum of {minimum} bytes"):
        f(x, w, t, memory_budget=minimum - 1)
    f(x, w, t, memory_budget=minimum)  # exactly the minimum runs
    for kw in (dict(chunk_size=4), dict(vocab_chunk_size=256), dict(low_memory=True)):
        with pytest.raises(ValueError, match=f"memory_budget.*{next(iter(kw))}"):
            f(x, w, t, memory_budget=1 << 30, **kw)
    # whole rows only where terms beyond the CE run: the minimum is one row of V
    whole = row_bytes(device, torch.float64, V, H, 0, need_grad_input=False, terms=True)
    with pytest.raises(ValueError, match=f"minimum of {whole} bytes .*whole vocabulary rows"):
        fusedce.token_logprobs(x, w, t.clamp(min=0), memory_budget=whole - 1)
    with pytest.raises(ValueError, match="minimum .*whole vocabulary rows"):
        f(x, w, t, entropy_coef=0.1, memory_budget=whole - 1)
    with pytest.raises(ValueError, match="memory_budget.*chunk_size"):
        fusedce.token_logprobs(x, w, t.clamp(min=0), memory_budget=1 << 30, chunk_size=3)


def test_refused_with_process_group(tmp_path):
    # The vocab-parallel layer chunks tokens only, from its own budget: refused there, by name,
    # through the public functions (a 1-rank gloo group).
    from test_preference import _one_rank_gloo

    x, w, _, t = _lce_case("cpu", n=6, H=24, V=300, bias=False)
    with _one_rank_gloo(tmp_path) as dist:
        for fn in (fusedce.linear_cross_entropy, fusedce.token_logprobs,
                   fusedce_distributed.linear_cross_entropy):
            with pytest.raises(ValueError, match="memory_budget is not supported with process_group"):
                fn(x, w, t.clamp(min=0), memory_budget=1 << 20, process_group=dist.group.WORLD)


# ---------------------------------------------------------------------------------------------
# Every public entry
# ---------------------------------------------------------------------------------------------

ENTRIES = [fusedce.linear_cross_entropy, fusedce.token_logprobs, fusedce.token_statistics,
           fusedce.distillation_loss, fusedce.policy_loss, fusedce.preference_loss, fusedce.kto_loss]


def test_signatures():
    for fn in ENTRIES:
        p = inspect.signature(fn).parameters.get("memory_budget")
        assert p is not None and p.default is None and p.kind is p.KEYWORD_ONLY, fn.__name__
    # both modules take their knobs from _LossKnobs (LinearCrossEntropyLoss through **knobs)
    assert "memory_budget" in inspect.signature(fusedce.nn.FusedLMHeadLoss).parameters
    assert fusedce.nn.LinearCrossEntropyLoss(4, 5, memory_budget=123).memory_budget == 123


def _entry_calls(device):
    """name -> (fn(memory_budget) -> tensors to compare, tensors whose grads to compare, N, terms,
    teacher) for each public entry, on float64 inputs with B x T = 6 x 5 tokens."""
    B, T, H, V = 6, 5, 24, 1001
    g = torch.Generator().manual_seed(3)
    d = dict(dtype=torch.float64, device=device)
    x = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(**d).requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(**d).requires_grad_()
    tok = torch.randint(0, V, (B, T), generator=g).to(device)
    tok[:, 0] = -100
    tl = torch.randn(B, T, V, generator=g, dtype=torch.float64).to(**d)
    tw = torch.randn(V, H, generator=g, dtype=torch.float64).to(**d)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64).to(**d)
    adv = torch.randn(B, generator=g, dtype=torch.float64).to(**d)
    labels = torch.tensor([True, False, True, True, False, False], device=device)
    mod = fusedce.nn.LinearCrossEntropyLoss(H, V, dtype=torch.float64, device=device)
    lm = fusedce.nn.FusedLMHeadLoss

    def first(out):
        return list(out) if isinstance(out, (tuple, list)) else [out]

    calls = {
        "linear_cross_entropy": (lambda mb: [fusedce.linear_cross_entropy(x, w, tok, memory_budget=mb)], False, None),
        "linear_cross_entropy+entropy": (lambda mb: [fusedce.linear_cross_entropy(
            x, w, tok, entropy_coef=0.1, memory_budget=mb)], True, None),
        "token_logprobs": (lambda mb: first(fusedce.token_logprobs(
            x, w, tok, return_entropy=True, memory_budget=mb)), True, None),
        "token_statistics": (lambda mb: [o for o in fusedce.token_statistics(
            x, w, tok, outputs=("entropy", "mean_logits"), memory_budget=mb) if o is not None], True, None),
        "distillation_loss(logits)": (lambda mb: [fusedce.distillation_loss(
            x, w, tok, teacher_logits=tl, memory_budget=mb)], True, "logits"),
        "distillation_loss(head)": (lambda mb: [fusedce.distillation_loss(
            x, w, tok, teacher_weight=tw, kind="jsd", memory_budget=mb)], True, "head"),
        "policy_loss": (lambda mb: [fusedce.policy_loss(
            x, w, tok.clamp(min=0), old, adv, memory_budget=mb)[0]], True, None),
        "preference_loss": (lambda mb: list(fusedce.preference_loss(
            x, w, tok, loss_type="orpo", memory_budget=mb)[:1]), True, None),
        "kto_loss": (lambda mb: list(fusedce.kto_loss(
            x, w, tok, labels, ref_input=x.detach(), ref_weight=tw, kl=0.0,
            memory_budget=mb)[:1]), True, None),
        "nn.LinearCrossEntropyLoss": (lambda mb: [_with_budget(mod, mb)(x, tok)], False, None),
        "nn.FusedLMHeadLoss": (lambda mb: [lm(memory_budget=mb)(x, w, tok)], False, None),
    }
    return calls, (x, w, mod.linear.weight), B * T, H, V


def _with_budget(mod, mb):
    mod.memory_budget = mb
    return mod


@pytest.mark.parametrize("name", [
    "linear_cross_entropy", "linear_cross_entropy+entropy", "token_logprobs", "token_statistics",
    "distillation_loss(logits)", "distillation_loss(head)", "policy_loss", "preference_loss",
    "kto_loss", "nn.LinearCrossEntropyLoss", "nn.FusedLMHeadLoss"])
def test_every_entry(device, name):
    calls, params, n, H, V = _entry_calls(device)
    fn, terms, teacher = calls[name]

    def run_once(mb):
        for p in params:
            p.grad = None
        outs = fn(mb)
        sum(o.double().sum() for o in outs if o.is_floating_point() and o.requires_grad).backward()
        return [o.detach() for o in outs] + [p.grad for p in params if p.grad is not None]

    want = run_once(None)
    # four rows of whole vocabulary (with the teacher's chunk where it is computed): several
    # chunks, or (plain CE, N < FAST_MIN_ROWS) vocabulary tiles
    per_row = row_bytes(device, torch.float64, V, H, 0, terms=terms, teacher=teacher)
    budget = 4 * per_row + 3
    p = plan(budget, n, device, torch.float64, V, H, terms=terms, teacher=teacher)
    if terms:
        assert p.chunk_size == 4 and p.vocab_chunk_size == 0
    else:
        assert p.vocab_chunk_size  # (the CUDA accounting then fits all 30 rows in one chunk)
    if device == "cpu":
        tiles = logits_tiles(lambda: run_once(budget), H)
        # every pass (the reference / KL heads' too) in chunks of at most the plan's rows
        assert max(r for r, _ in tiles) == p.chunk_size, tiles
        assert max(c for _, c in tiles) == (p.vocab_chunk_size or V), tiles
    got = run_once(budget)
    assert len(got) == len(want)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# CUDA: the peak memory of one fwd+bwd stays within the budget plus the unavoidable buffers
# ---------------------------------------------------------------------------------------------

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
# The budget bounds the buffers that scale with the chunk; the call also allocates a few
# fixed-size tensors (the mean's denominator and scale, the loss, per-row scalars of a kernel's
# launch): this allowance, a small fraction of the smallest budget tested, covers them.
FIXED_SLACK = 2 * MiB


@CUDA
# 64 MiB .. 2 GiB keep whole rows at this shape (64 MiB holds 261 of them); 32 and 16 MiB tile
@pytest.mark.parametrize("budget_mib", [16, 32, 64, 128, 256, 512, 1024, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_cuda_peak_within_budget(budget_mib, dtype):
    N, H, V = 8192, 4096, 128256
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    x = (torch.randn(N, H, device=dev, generator=g) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=dev, generator=g) * H**-0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    budget = budget_mib * MiB

    def step():
        fusedce.linear_cross_entropy(x, w, t, memory_budget=budget).backward()

    step()  # warm-up: the cuBLAS workspace and the caching allocator's first blocks
    x.grad = w.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    # what stays or is returned: grad_input [N, H], grad_weight [V, H] (input dtype), the
    # per-token outputs of the op (loss and lse in float32, predicted int64)
    unavoidable = N * H * x.element_size() + V * H * w.element_size() + N * (4 + 4 + 8)
    p = plan(budget, N, dev, dtype, V, H)
    assert p.bytes <= budget and bool(p.vocab_chunk_size) == (budget_mib < 64)
    assert peak <= budget + unavoidable + FIXED_SLACK, (
        f"peak {peak / MiB:.1f} MiB > budget {budget_mib} MiB + unavoidable "
        f"{unavoidable / MiB:.1f} MiB + {FIXED_SLACK / MiB:.0f} MiB (plan {p})")


@CUDA
@pytest.mark.parametrize("tiled", [False, True])
def test_cuda_driver_row_bytes_match_its_choice(monkeypatch, tiled):
    # The CUDA driver's own choice at a budget set through its environment variable: the rows it
    # runs are chunk_rows(driver_row_bytes), balanced.
    N, H, V, vcs = 5000, 40, 100003, 8192
    dev = "cuda"
    x = torch.randn(N, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(V, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, V, (N,), device=dev)
    mib = 64 if not tiled else 8  # 64 MiB: 335 whole rows, >= FAST_MIN_ROWS, < N
    monkeypatch.setenv("FUSEDCE_LOWMEM_BUDGET_MB" if tiled else "FUSEDCE_CHUNK_BUDGET_MB", str(mib))
    kw = dict(vocab_chunk_size=vcs) if tiled else {}
    tiles = logits_tiles(lambda: fusedce.linear_cross_entropy(x, w, t, **kw).backward(), H)
    c = chunk_rows(N, mib * MiB, driver_row_bytes("cuda", torch.bfloat16, V, H, vcs if tiled else 0), True)
    assert c < N
    assert sorted({r for r, _ in tiles}) == expected_rows(N, c)
    # and a memory_budget of the same bytes plans the same rows where it counts the same bytes
    if not tiled:
        assert plan(mib * MiB, N, dev, torch.bfloat16, V, H).chunk_size == c


def test_counter_helper_sees_chunks():
    # the profiler helper itself: an explicit chunk_size shows up as that many rows
    x, w, _, t = _lce_case("cpu", n=10, H=24, V=300, bias=False)
    tiles = logits_tiles(lambda: fusedce.linear_cross_entropy(x, w, t, chunk_size=3), 24)
    assert Counter(r for r, _ in tiles) == Counter({3: 3, 1: 1})


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiles(dynamic):
    # The plan is Python arithmetic on the shapes: traced without a graph break, and under dynamic
    # shapes without depending on the symbolic N (the plan is then N-free; the op clamps to N).
    torch._dynamo.reset()
    x, w, _, t = _lce_case("cpu", n=37, H=24, V=1001, bias=False)
    budget = 6 * row_bytes("cpu", torch.float64, 1001, 24, 0)

    def f(x, w, t):
        return fusedce.linear_cross_entropy(x, w, t, memory_budget=budget)

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for n in (37, 29):
        fx, fw = leaves(x[:n], w)
        want = f(fx, fw, t[:n])
        want.backward()
        cx, cw = leaves(x[:n], w)
        got = compiled(cx, cw, t[:n])
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(cx.grad, fx.grad, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(cw.grad, fw.grad, rtol=1e-12, atol=1e-13)


def test_empty_input(device):
    # N = 0: any valid budget plans one (empty) chunk; the same values as the default call
    x = torch.randn(0, 8, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(300, 8, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device=device)
    for reduction in ("sum", "mean"):
        got = fusedce.linear_cross_entropy(x, w, t, reduction=reduction, memory_budget=1 << 20)
        want = fusedce.linear_cross_entropy(x, w, t, reduction=reduction)
        torch.testing.assert_close(got, want, equal_nan=True)
