"""The raw ops (torch.ops.fusedce.*) against the float64 reference, output by output.

The public functions are tested elsewhere; here each schema output is checked on its own, so that a
backend (CPU, CUDA) that gets one output wrong is caught at the op, with the samples every other
test uses.
"""

import pytest
import torch

from accuracy import assert_close
from fusedce import reference
from samples import CASE_NAMES, mean_denominator, sample

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
    loss, token_loss, lse, predicted, _, _, gh, gw, gb, *_ = out
    ref, (h, wr, br) = _reference_for_raw(x, w, t, kw["bias"], kw["class_weight"], scalars)

    if kw["mean"]:
        # the op's own mean: sum / d (nan or +-inf when d == 0), gradients of sum * (1/d or 0)
        d = mean_denominator(t, kw["class_weight"], kw["ignore_index"], w.shape[0])
        scale = 1.0 / d if d != 0 else 0.0
        assert_close(loss, ref.token_loss.sum() / torch.tensor(d, dtype=torch.float64), dtype,
                     what=f"{case} loss")
    else:
        scale = 1.0 if kw["grad_scale"] is None else float(kw["grad_scale"])
        assert_close(loss, ref.token_loss.sum() * scale, dtype, what=f"{case} loss")
    want_loss = ref.token_loss.sum() * scale
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
    _, _, _, _, _, _, gh, gw, gb, *_ = torch.ops.fusedce.loss(x, w, t, **kw)
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
    token_loss, lse, predicted, loss, grad_scale = torch.ops.fusedce.cross_entropy(logits, t, **kw)
    z = logits.detach().double().requires_grad_()
    cw = None if kw["class_weight"] is None else kw["class_weight"].double()
    scalars = {k: kw[k] for k in SCALAR_NAMES}
    ref = reference.cross_entropy(z, t, weight=cw, reduction="none",
                                  **dict(scalars, softcap=scalars["softcap"] or None))
    assert_close(token_loss, ref.token_loss, dtype, what=f"{case} token_loss")
    assert_close(lse, ref.lse, dtype, what=f"{case} lse")
    assert torch.equal(predicted.cpu(), ref.predicted.cpu()), f"{case} predicted"
    if kw["mean"]:
        # the op's own mean: sum / d (nan or +-inf when d == 0) and 1 / d (0 when d == 0)
        d = mean_denominator(t, kw["class_weight"], kw["ignore_index"], logits.shape[-1])
        assert loss.shape == () and grad_scale.shape == ()
        assert_close(loss, ref.token_loss.sum() / torch.tensor(d, dtype=torch.float64), dtype,
                     what=f"{case} loss")
        assert_close(grad_scale, torch.tensor(1.0 / d if d != 0 else 0.0, dtype=torch.float64),
                     dtype, what=f"{case} grad_scale")
    else:
        assert loss.shape == (0,) and grad_scale.shape == (0,), f"{case}: no mean, empty outputs"

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


# --------------------------------------------------------------------------------------------
# The vocab-parallel building blocks on shards of one logits matrix.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16], ids=str)
@pytest.mark.parametrize("bounds", [(0, 9, 23), (0, 0, 23), (0, 23, 23)])  # uneven; an empty shard
def test_shard_ops(device, dtype, bounds):
    """shard_stats on each shard, combined as fusedce/_parallel.py does, gives the reference lse,
    target logit and argmax; shard_grad_ with a smoothed, class-weighted mean CE's coefficients
    gives the reference gradient of the logits, shard by shard."""
    N, V, eps, zl = 11, bounds[-1], 0.1, 1e-2
    kw = dict(softcap=4.0, logit_scale=1.3)
    raw = (torch.randn(N, V, dtype=torch.float64) * 2).to(device, dtype)
    t = torch.randint(0, V, (N,), device=device)
    t[1] = -100
    cw = torch.rand(V, dtype=torch.float64, device=device) + 0.5
    shards = list(zip(bounds[:-1], bounds[1:]))
    stats = [torch.ops.fusedce.shard_stats(raw[:, a:b].contiguous(), t, a, cw[a:b], **kw)
             for a, b in shards]
    G = torch.stack(stats).double()
    M = G[..., 0].amax(0)
    lse = M + torch.log((G[..., 1] * torch.exp(G[..., 0] - M)).sum(0))
    z64 = raw.double().requires_grad_()
    ref = reference.cross_entropy(z64, t, weight=cw, label_smoothing=eps, z_loss=zl,
                                  reduction="mean", **kw)
    tight = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(lse, ref.lse.detach(), tight, what="lse")
    valid = t != -100
    zt = G[..., 3].sum(0)
    z = reference.final_logits(raw.double(), kw["logit_scale"], kw["softcap"])
    assert_close(zt[valid], z[valid, t[valid]], tight, what="target logit")
    best = torch.where(G[..., 0] == M, G[..., 5], torch.full_like(G[..., 5], float("inf"))).amin(0)
    assert torch.equal(best.long().cpu(), z.argmax(-1).cpu())
    # the mean CE's per-row coefficients (as fusedce/_parallel.py forms them)
    wt = G[..., 4].sum(0) * valid
    a = valid / wt.sum()
    coef_p = a * (wt * (1 - eps + 2 * zl * lse) + eps / V * cw.sum())
    coef_t, coef_w = a * wt * (1 - eps), a * eps / V
    (g_ref,) = torch.autograd.grad(ref.loss, z64)
    for (lo, hi) in shards:
        g = raw[:, lo:hi].clone()
        torch.ops.fusedce.shard_grad_(g, t, lo, cw[lo:hi], lse, coef_p, coef_t, coef_w, **kw)
        if dtype == torch.bfloat16:  # the gradient is rounded to bfloat16 once
            torch.testing.assert_close(g.double(), g_ref[:, lo:hi], rtol=1e-2, atol=2e-3 * g_ref.abs().max().item())
        else:
            assert_close(g, g_ref[:, lo:hi], tight, what=f"grad of shard [{lo}, {hi})")


def test_shard_ops_opcheck(device):
    raw = torch.randn(5, 7, dtype=torch.float64, device=device)
    t = torch.tensor([0, 3, -100, 9, 12], device=device)
    cw = torch.rand(7, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.fusedce.shard_stats.default, (raw, t, 4, cw), {"softcap": 2.0})
    v = torch.rand(5, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.fusedce.shard_grad_.default, (raw.clone(), t, 4, cw, v, v, v, v),
                          {"logit_scale": 0.5})


@pytest.mark.parametrize(
    "target_dtype,ignore_index,weighted,ignored",
    [
        (torch.int64, -100, False, "some"),  # the plain mean: the count of non-ignored tokens
        (torch.int64, 3, True, "some"),  # weighted; an ignore_index that is also a class id
        (torch.int32, 2**40, False, "none"),  # int32 targets against an int64-only ignore_index
        (torch.int64, -100, True, "all"),  # d == 0: nan loss, zero gradients on both paths
    ],
)
def test_mean_scale_same_on_both_backward_paths(device, target_dtype, ignore_index, weighted, ignored):
    """`loss` with mean=True: the gradients computed in the forward (grad_mask on, the mean's scale
    from the device kernel) equal the recomputing backward's (grad_mask off, the scale recomputed
    from the saved target in fusedce/ops.py), and both the float64 reference's."""
    g = torch.Generator().manual_seed(7)
    N, H, V = 9, 5, 8
    x = torch.randn(N, H, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(V, H, generator=g, dtype=torch.float64).to(device)
    t = torch.randint(0, V, (N,), generator=g)
    if ignored == "some":
        t[::3] = ignore_index if -(2**31) <= ignore_index < 2**31 else t[::3]
    elif ignored == "all":
        t[:] = ignore_index
    t = t.to(target_dtype).to(device)
    cw = (torch.rand(V, generator=g, dtype=torch.float64) + 0.5).to(device) if weighted else None
    grads = []
    for mask in ([True, True, False], [False, False, False]):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = torch.ops.fusedce.loss(xl, wl, t, None, cw, ignore_index=ignore_index,
                                      grad_mask=mask, mean=True)[0]
        loss.backward()
        grads.append((loss.detach(), xl.grad, wl.grad))
    d = mean_denominator(t, cw, ignore_index, V)
    h, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = reference.linear_cross_entropy(h, wr, t.long(), weight=cw, reduction="none",
                                         ignore_index=ignore_index)
    want = torch.autograd.grad(ref.token_loss.sum() * (1.0 / d if d != 0 else 0.0), (h, wr))
    for loss, gx, gw in grads:
        assert_close(loss, ref.token_loss.sum() / torch.tensor(d, dtype=torch.float64), torch.float64,
                     what="loss")
        assert_close(gx, want[0], torch.float64, what="grad_hidden")
        assert_close(gw, want[1], torch.float64, what="grad_weight")


def test_mean_recomputed_scale_rounds_class_weights_like_the_op():
    """The recomputing backward's mean scale uses the class weights as the op does (rounded to the
    accumulation dtype, then summed in double): float64 weights with float32 inputs, where summing
    the unrounded weights moves 1/d by one float32 ulp (255 tokens of a weight 1 + 5.9e-8)."""
    from fusedce.ops import _mean_grad_scale

    cw = torch.tensor([1 + 5.9e-8, 1.0, 1.0], dtype=torch.float64)
    t = torch.zeros(255, dtype=torch.int64)
    d = torch.tensor(float(cw.to(torch.float32)[0].double() * 255), dtype=torch.float64).to(torch.float32)
    want = torch.ones((), dtype=torch.float32) / d
    got = _mean_grad_scale(t, cw, -100, 3, torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, want), (got.item(), want.item())
    unrounded = (torch.ones((), dtype=torch.float64) / (cw[0] * 255)).to(torch.float32)
    assert not torch.equal(unrounded, want)  # the case does tell the two apart


def _op_calls(tree, names):
    """(node, op name) of every call torch.ops.fusedce.<name>(...) (through an alias `ops` /
    `_ops`, or spelled out) whose result is unpacked into a tuple in an assignment."""
    import ast
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
            continue
        f = node.value.func
        if not (isinstance(f, ast.Attribute) and f.attr in names):
            continue
        base = f.value
        if not ((isinstance(base, ast.Name) and base.id in ("ops", "_ops"))
                or (isinstance(base, ast.Attribute) and base.attr == "fusedce")):
            continue
        yield node, f.attr


def test_every_caller_unpacks_the_ops_outputs_as_the_schema_has_them():
    """fusedce::cross_entropy grew two outputs (loss, grad_scale): a caller that still unpacks
    three fails at run time with 'too many values to unpack' (benchmarks/floor.py's CE step did,
    on the GPU only). Every tuple unpacking of a fusedce op's result in fusedce/, benchmarks/ and
    tests/ must take as many values as the schema returns (or use a starred rest), and every
    keyword it passes must be an argument of the schema."""
    import ast
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    schemas = {name: getattr(torch.ops.fusedce, name).default._schema
               for name in ("cross_entropy", "cross_entropy_backward", "loss", "loss_backward")}
    bad, seen = [], 0
    for folder in ("fusedce", "benchmarks", "tests"):
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node, name in _op_calls(tree, schemas):
                seen += 1
                schema = schemas[name]
                where = f"{path.relative_to(root)}:{node.lineno} ({name})"
                for tgt in node.targets:
                    if (isinstance(tgt, ast.Tuple)
                            and not any(isinstance(e, ast.Starred) for e in tgt.elts)
                            and len(tgt.elts) != len(schema.returns)):
                        bad.append(f"{where}: unpacks {len(tgt.elts)}, returns {len(schema.returns)}")
                args = {a.name for a in schema.arguments}
                bad += [f"{where}: keyword {k.arg!r} is not in the schema"
                        for k in node.value.keywords if k.arg is not None and k.arg not in args]
    assert seen > 0, "found no call of a fusedce op to check"
    assert not bad, bad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n", [1023, 1025, 5003])
def test_cross_entropy_mean_many_tokens(device, dtype, weighted, n):
    """fusedce::cross_entropy's mean=True over more tokens than mean_after_kernel's one block of
    1024 threads has (each thread sums several, then the two block sums share one shared-memory
    array): loss = sum(token_loss) / d and grad_scale = 1 / d against float64, and the gradient of
    the loss equals token_loss.sum() / d's."""
    V = 5
    g = torch.Generator().manual_seed(n)
    logits = (torch.randn(n, V, generator=g, dtype=torch.float64) * 3).to(dtype).to(device)
    t = torch.randint(0, V, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.3] = -100
    t = t.to(device)
    cw = (torch.rand(V, generator=g, dtype=torch.float64) + 0.5).to(device) if weighted else None
    z = logits.requires_grad_()
    tok, _, _, loss, gs = torch.ops.fusedce.cross_entropy(z, t, cw, z_loss=1e-3, mean=True)
    d = mean_denominator(t, cw, -100, V)
    assert d > 0
    want = tok.detach().double().sum() / d  # the op's own token losses: checks the sums alone
    # float64 sums of up to 5003 terms in different orders: a few 1e-14 apart
    rtol = 1e-6 if tok.dtype == torch.float32 else 1e-13
    torch.testing.assert_close(loss.double(), want, rtol=rtol, atol=0)
    torch.testing.assert_close(gs.double(), torch.tensor(1.0 / d, dtype=torch.float64, device=device),
                               rtol=rtol, atol=0)
    (got,) = torch.autograd.grad(loss * 3.0, z)
    z2 = logits.detach().clone().requires_grad_()
    tok2 = torch.ops.fusedce.cross_entropy(z2, t, cw, z_loss=1e-3)[0]
    (ref,) = torch.autograd.grad(tok2.sum() * (3.0 / d), z2)
    # 3 * (1 / d) against 3 / d: the last float32 bit, so at most one ulp of the logits' dtype
    rtol, atol = {torch.float64: (1e-12, 1e-15), torch.float32: (1e-5, 1e-7),
                  torch.bfloat16: (2.0 ** -7, 1e-7)}[dtype]
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
