"""Raw torch.ops.fusedce.* on CUDA against fusedce/reference.py (float64) and the CPU ops.

Standalone GPU correctness test of the CUDA backend (the main suite is parametrized by device too).
Skipped where CUDA is absent. Errors are measured as ||out - ref|| / ||ref|| against float64 truth
computed from the same (already rounded) inputs, with budgets per dtype.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import fusedce  # noqa: F401  (registers torch.ops.fusedce.*, their fake kernels and autograd)
from fusedce import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

ops = torch.ops.fusedce
DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# relative-error budgets (values / gradients) by dtype
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-3, 2.5e-2), torch.float16: (1e-3, 5e-3),
       torch.float64: (1e-10, 1e-9)}


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite values in the fused result"
    d = (a - b).norm()
    n = b.norm()
    return (d / n).item() if n > 0 else d.item()


def make(n, h, v, dtype, *, scale=1.0, seed=0, ignore_frac=0.1, bias=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale).to(dtype).to(DEV)
    weight = (torch.randn(v, h, generator=g) / math.sqrt(h)).to(dtype).to(DEV)
    target = torch.randint(0, v, (n,), generator=g)
    if ignore_frac > 0:
        target[torch.rand(n, generator=g) < ignore_frac] = -100
    b = (torch.randn(v, generator=g) * 0.1).to(dtype).to(DEV) if bias else None
    return hidden, weight, target.to(DEV), b


def ref_loss_and_grads(hidden, weight, target, bias, cw, gs, grad_lse=None, gtok=None, **kw):
    """float64 reference of token_loss, lse and the grads of sum(gs*token_loss [+ gl*lse])."""
    h = hidden.detach().double().cpu().requires_grad_(True)
    w = weight.detach().double().cpu().requires_grad_(True)
    b = None if bias is None else bias.detach().double().cpu().requires_grad_(True)
    out = reference.linear_cross_entropy(
        h, w, target.cpu(), linear_bias=b, weight=None if cw is None else cw.double().cpu(),
        reduction="none", **kw)
    if gtok is None:
        obj = out.token_loss.sum() * gs
    else:
        obj = (out.token_loss * gtok.double().cpu()).sum()
    if grad_lse is not None:
        obj = obj + (out.lse * grad_lse.double().cpu()).sum()
    params = [h, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(obj, params, allow_unused=True)
    logits = torch.nn.functional.linear(h.detach(), w.detach(), None if b is None else b.detach())
    z = reference.final_logits(logits, kw.get("logit_scale", 1.0), kw.get("softcap"))
    return out, grads, z


def op_kwargs(kw):
    return dict(ignore_index=-100, label_smoothing=kw.get("label_smoothing", 0.0),
                z_loss=kw.get("z_loss", 0.0), softcap=kw.get("softcap") or 0.0,
                logit_scale=kw.get("logit_scale", 1.0))


def check_predicted(pred, z, target, dtype):
    pred, target = pred.cpu(), target.cpu()
    valid = target != -100
    assert (pred[~valid] == -1).all()
    if valid.any():
        zv = z[valid]
        p = pred[valid]
        assert ((p >= 0) & (p < z.shape[1])).all()
        picked = zv.gather(1, p[:, None])[:, 0]
        tol = {torch.float32: 1e-4, torch.float64: 1e-9}.get(dtype, 5e-2)
        assert (picked >= zv.max(1).values - tol * (1 + zv.abs().max(1).values)).all()


CASES = {
    "plain": dict(n=64, h=32, v=1000, kw={}),
    "v50257": dict(n=17, h=40, v=50257, kw={}),
    "v7": dict(n=33, h=16, v=7, kw={}),
    "n1": dict(n=1, h=24, v=300, kw={}),
    "h13": dict(n=20, h=13, v=129, kw={}),
    "softcap_zloss": dict(n=48, h=32, v=3001, kw=dict(softcap=5.0, z_loss=1e-3, logit_scale=1.7)),
    "cw_ls": dict(n=40, h=32, v=777, kw=dict(label_smoothing=0.1), cw=True),
    "bias": dict(n=30, h=16, v=513, kw={}, bias=True),
    "all_ignored": dict(n=9, h=16, v=100, kw={}, ignore_frac=1.0),
    "chunks": dict(n=100, h=32, v=2000, kw=dict(label_smoothing=0.05, z_loss=1e-4), chunk=7),
    "tiled": dict(n=70, h=32, v=5003, kw=dict(softcap=10.0, label_smoothing=0.1), chunk=16,
                  vchunk=1000, cw=True, bias=True),
    "tiled_f32acc": dict(n=50, h=24, v=3000, kw={}, vchunk=256, f32acc=True),
    # vocabulary tiles long enough for the gradient's segment kernel (col0 > 0; 2 segments per
    # 4500-column tile in bf16/fp16, 3 in fp32; the last tile, 1007 columns, a warp tile in half)
    "tiled_long": dict(n=40, h=32, v=10007, kw=dict(softcap=10.0, label_smoothing=0.1,
                                                    z_loss=1e-4), chunk=16, vchunk=4500, cw=True,
                       bias=True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_loss_vs_reference(case, dtype):
    c = CASES[case]
    hidden, weight, target, bias = make(c["n"], c["h"], c["v"], dtype,
                                        ignore_frac=c.get("ignore_frac", 0.1), bias=c.get("bias"))
    cw = (torch.rand(c["v"], device=DEV) + 0.5) if c.get("cw") else None
    gs = torch.tensor(0.37, device=DEV)
    kw = c["kw"]
    out = ops.loss(hidden, weight, target, bias, cw, gs, grad_mask=[True, True, bias is not None],
                   chunk_size=c.get("chunk", 0), vocab_chunk_size=c.get("vchunk", 0),
                   fp32_grad_accum=c.get("f32acc", False), **op_kwargs(kw))
    loss, tok, lse, pred, _, _, gh, gw, gb, *_ = out
    torch.cuda.synchronize()
    ref, grads, z = ref_loss_and_grads(hidden, weight, target, bias, cw, 0.37, **kw)
    vt, gt = TOL[dtype]
    assert loss.dim() == 0 and tok.dtype == torch.float32 and pred.dtype == torch.long
    assert rel(tok, ref.token_loss) < vt
    assert rel(lse, ref.lse) < vt
    assert abs(loss.item() - 0.37 * ref.token_loss.sum().item()) <= vt * (
        1 + abs(0.37 * ref.token_loss.sum().item()))
    check_predicted(pred, z, target, dtype)
    # float16: the gradients computed in the forward are float32 (tests/test_fp16_loss_scale.py)
    gdt = torch.float32 if dtype == torch.float16 else dtype
    assert gh.dtype == gdt and gw.dtype == gdt
    if c.get("ignore_frac", 0.1) >= 1.0:
        assert gh.abs().max().item() == 0 and gw.abs().max().item() == 0
    else:
        assert rel(gh, grads[0]) < gt
        assert rel(gw, grads[1]) < gt
    if bias is not None:
        assert rel(gb, grads[2]) < gt
    else:
        assert gb.numel() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_loss_no_grad_and_mask(dtype):
    hidden, weight, target, _ = make(40, 32, 600, dtype)
    out = ops.loss(hidden, weight, target)
    assert all(t.numel() == 0 for t in out[4:])
    ref, _, _ = ref_loss_and_grads(hidden, weight, target, None, None, 1.0)
    assert rel(out[1], ref.token_loss) < TOL[dtype][0]
    out2 = ops.loss(hidden, weight, target, grad_mask=[False, True, False])
    assert out2[6].numel() == 0 and out2[7].shape == weight.shape and out2[8].numel() == 0
    assert rel(out2[1], out[1]) < 1e-6


def test_loss_n0():
    hidden = torch.empty(0, 16, device=DEV, dtype=torch.bfloat16)
    weight = torch.randn(50, 16, device=DEV, dtype=torch.bfloat16)
    target = torch.empty(0, dtype=torch.long, device=DEV)
    loss, tok, lse, pred, _, _, gh, gw, gb, *_ = ops.loss(hidden, weight, target, grad_mask=[True, True, True])
    assert loss.item() == 0 and tok.numel() == 0 and gh.shape == (0, 16)
    assert gw.shape == weight.shape and gw.abs().max().item() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_inputs(dtype):
    big, wbig, target, _ = make(64, 64, 900, dtype)
    hidden = big[::2, :40]  # strided rows, non-multiple-of-8 width
    weight_t = torch.randn(40, 900, device=DEV).to(dtype) / 7  # weight given as a transpose
    weight = weight_t.t()
    tgt = torch.stack([target[:32], target[32:]], 1)[:, 0].to(torch.int32)  # strided int32
    out = ops.loss(hidden, weight, tgt, grad_mask=[True, True, False], label_smoothing=0.1)
    ref, grads, _ = ref_loss_and_grads(hidden, weight, tgt.long(), None, None, 1.0,
                                       label_smoothing=0.1)
    vt, gt = TOL[dtype]
    assert rel(out[1], ref.token_loss) < vt
    assert rel(out[6], grads[0]) < gt and rel(out[7], grads[1]) < gt


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# whole rows (segment kernel in half, warp in fp32), warp-width tiles, tiles of 2-3 segments
@pytest.mark.parametrize("v, vchunk", [(1500, 0), (1500, 333), (10007, 4500)])
def test_loss_backward_with_grad_lse(dtype, v, vchunk):
    hidden, weight, target, bias = make(45, 32, v, dtype, bias=True)
    cw = torch.rand(v, device=DEV) + 0.5
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=8.0)
    _, tok, lse, *_ = ops.loss(hidden, weight, target, bias, cw, **op_kwargs(kw))
    gtok = torch.randn(45, device=DEV)
    glse = torch.randn(45, device=DEV)
    gh, gw, gb = ops.loss_backward(hidden, weight, target, bias, cw, lse, gtok, glse,
                                   grad_mask=[True, True, True], chunk_size=10,
                                   vocab_chunk_size=vchunk, **op_kwargs(kw))
    _, grads, _ = ref_loss_and_grads(hidden, weight, target, bias, cw, 1.0, grad_lse=glse,
                                     gtok=gtok, **kw)
    gt = TOL[dtype][1]
    assert rel(gh, grads[0]) < gt and rel(gw, grads[1]) < gt and rel(gb, grads[2]) < gt
    # a stride-0 (expanded) upstream gradient, as autograd hands it for a sum
    gh2, _, _ = ops.loss_backward(hidden, weight, target, bias, cw, lse,
                                  torch.tensor(0.5, device=DEV).expand(45), None,
                                  grad_mask=[True, False, False], **op_kwargs(kw))
    _, grads2, _ = ref_loss_and_grads(hidden, weight, target, bias, cw, 0.5, **kw)
    assert rel(gh2, grads2[0]) < gt


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_cpu_op(dtype):
    hidden, weight, target, bias = make(37, 24, 2049, dtype, bias=True)
    cw = torch.rand(2049, device=DEV) + 0.5
    args = dict(label_smoothing=0.1, z_loss=1e-3, softcap=6.0, logit_scale=0.9,
                grad_mask=[True, True, True])
    g = ops.loss(hidden, weight, target, bias, cw, **args)
    c = ops.loss(hidden.cpu(), weight.cpu(), target.cpu(), bias.cpu(), cw.cpu(), **args)
    vt, gt = TOL[dtype]
    for i in (1, 2):
        assert rel(g[i], c[i]) < vt
    for i in (6, 7, 8):  # grad_hidden, grad_weight, grad_bias
        assert rel(g[i], c[i]) < gt


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v", [7, 1000, 50257])
def test_cross_entropy_ops(dtype, v):
    n = 65
    g = torch.Generator().manual_seed(v)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype).to(DEV)
    target = torch.randint(0, v, (n,), generator=g)
    target[::5] = -100
    target = target.to(DEV)
    cw = torch.rand(v, device=DEV) + 0.5
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0, logit_scale=1.1)
    tok, lse, pred, _, _ = ops.cross_entropy(logits, target, cw, **op_kwargs(kw))
    x = logits.double().cpu().requires_grad_(True)
    ref = reference.cross_entropy(x, target.cpu(), weight=cw.double().cpu(), reduction="none",
                                  **kw)
    vt, gt = TOL[dtype]
    assert rel(tok, ref.token_loss) < vt and rel(lse, ref.lse) < vt
    check_predicted(pred, reference.final_logits(x.detach(), 1.1, 20.0), target, dtype)
    gtok = torch.randn(n, device=DEV)
    glse = torch.randn(n, device=DEV)
    (rg,) = torch.autograd.grad((ref.token_loss * gtok.double().cpu()).sum()
                                + (ref.lse * glse.double().cpu()).sum(), x)
    grad = ops.cross_entropy_backward(logits, target, cw, lse, gtok, glse, **op_kwargs(kw))
    assert grad.dtype == dtype and rel(grad, rg) < gt
    inplace = logits.clone()
    ops.cross_entropy_backward_(inplace, target, cw, lse, gtok, glse, **op_kwargs(kw))
    assert torch.equal(inplace, grad)
    # a row-strided view is written in place too
    wide = torch.zeros(n, v + 5, device=DEV, dtype=dtype)
    view = wide[:, 3:3 + v]
    view.copy_(logits)
    ops.cross_entropy_backward_(view, target, cw, lse, gtok, glse, **op_kwargs(kw))
    assert torch.equal(view, grad) and wide[:, :3].abs().max().item() == 0
    # out of place from rows whose 16-byte alignment differs from the output's: the scalar walk
    src = torch.zeros(n, v + 5, device=DEV, dtype=dtype)[:, 1:1 + v]
    src.copy_(logits)
    assert torch.equal(ops.cross_entropy_backward(src, target, cw, lse, gtok, glse,
                                                  **op_kwargs(kw)), grad)


# The backward's long-row kernel covers a row in segments of 128 threads x 4 16-byte vectors (2 for
# double; one load per thread, 4096 bf16 / 2048 float / 512 double elements per segment), the
# scalar head in the first segment and the tail in the last. Grid: one segment past a boundary
# (4097), several segments with an odd tail (3 x 4096 + 13), and many rows of one short segment
# (1031: the warp kernel in half precision, the segment kernel in float and double). Targets sit in
# the head, the tail and on segment boundaries; ignored rows take the all-zero path. A 16-byte-
# misaligned view takes another head/tail split (and the scalar walk out of place): every route
# must give the same bits and write nothing outside the view.
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("n, v", [(7, 4097), (9, 3 * 4096 + 13), (4099, 1031)])
def test_gradient_row_segments(dtype, n, v):
    g = torch.Generator(device=DEV).manual_seed(n + v)
    logits = (torch.randn(n, v, device=DEV, generator=g) * 3).to(dtype)
    target = torch.randint(0, v, (n,), device=DEV, generator=g)
    edges = torch.tensor([0, 1, v - 1, min(511, v - 1), min(4095, v - 1), min(4096, v - 1),
                          -100], device=DEV)
    assert n >= len(edges)
    target[: len(edges)] = edges
    target[-1] = -100
    tok, lse, *_ = ops.cross_entropy(logits, target)
    gtok = torch.rand(n, device=DEV, generator=g, dtype=lse.dtype) + 0.5
    grad = ops.cross_entropy_backward(logits, target, None, lse, gtok, None)
    z = logits.double()
    ref = torch.softmax(z, -1)
    ok = target >= 0
    ref[ok.nonzero()[:, 0], target[ok]] -= 1
    ref = ref * (gtok.double() * ok)[:, None]
    assert grad.dtype == dtype and rel(grad, ref) < TOL[dtype][1]
    assert grad[-1].abs().max().item() == 0
    inplace = logits.clone()
    ops.cross_entropy_backward_(inplace, target, None, lse, gtok, None)
    assert torch.equal(inplace, grad)
    for off in (1, 3):  # rows of a wider buffer at an odd offset: heads differ from row to row
        wide = torch.zeros(n, v + 7, device=DEV, dtype=dtype)
        view = wide[:, off:off + v]
        view.copy_(logits)
        out = ops.cross_entropy_backward(view, target, None, lse, gtok, None)
        assert torch.equal(out, grad)
        ops.cross_entropy_backward_(view, target, None, lse, gtok, None)
        assert torch.equal(view, grad)
        assert wide[:, :off].abs().max().item() == 0 and wide[:, off + v:].abs().max().item() == 0


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_gradient_row_segments_grid_rows(dtype):
    """More rows than a grid dimension holds (65535), two segments each in every dtype: the rows
    past 65535 are reached by the kernel's row loop; they must equal a launch without the loop."""
    v = {2: 4096 + 9, 4: 2048 + 9, 8: 512 + 9}[torch.empty(0, dtype=dtype).element_size()]
    n = 65535 + 70
    g = torch.Generator(device=DEV).manual_seed(5)
    logits = (torch.randn(n, v, device=DEV, generator=g) * 3).to(dtype)
    target = torch.randint(0, v, (n,), device=DEV, generator=g)
    target[65535:65540] = torch.tensor([0, v - 1, -100, 1, v - 2], device=DEV)
    _, lse, *_ = ops.cross_entropy(logits, target)
    gtok = torch.rand(n, device=DEV, generator=g, dtype=lse.dtype) + 0.5
    glse = torch.randn(n, device=DEV, generator=g, dtype=lse.dtype)
    lo = 65535 - 3
    for gl in (None, glse):
        grad = ops.cross_entropy_backward(logits, target, None, lse, gtok, gl)
        for a, b in ((0, 64), (lo, n)):  # a launch of these rows alone has no row loop
            part = ops.cross_entropy_backward(logits[a:b], target[a:b], None, lse[a:b],
                                              gtok[a:b], None if gl is None else gl[a:b])
            assert torch.equal(part, grad[a:b])
        inplace = logits.clone()
        ops.cross_entropy_backward_(inplace, target, None, lse, gtok, gl)
        assert torch.equal(inplace, grad)
        z = logits[lo:].double()
        p = torch.softmax(z, -1)
        t, ok = target[lo:], target[lo:] >= 0
        ref = p.clone()
        ref[ok.nonzero()[:, 0], t[ok]] -= 1
        ref = ref * (gtok[lo:].double() * ok)[:, None]
        if gl is not None:
            ref = ref + p * gl[lo:].double()[:, None]
        assert rel(grad[lo:], ref) < TOL[dtype][1]


def test_gradient_row_segments_nan_and_zero_rows():
    """On long rows: an out-of-range target poisons its whole row (every segment) with NaN, a zero
    upstream gradient takes the all-zero path, and so does an ignored row."""
    v = 3 * 4096 + 13
    logits = (torch.randn(3, v, device=DEV) * 3).to(torch.bfloat16)
    target = torch.tensor([v + 5, 2, -100], device=DEV)
    _, lse, *_ = ops.cross_entropy(logits, target)
    grad = ops.cross_entropy_backward(logits, target, None, lse,
                                      torch.tensor([1.0, 0.0, 1.0], device=DEV), None)
    assert torch.isnan(grad[0].float()).all() and grad[1:].abs().max().item() == 0


def test_first_argmax_on_ties():
    logits = torch.zeros(3, 37, device=DEV, dtype=torch.bfloat16)
    logits[0, [5, 9, 30]] = 2.0
    logits[1, :] = 1.0
    logits[2, [36, 20]] = 3.0
    target = torch.tensor([1, 2, 3], device=DEV)
    _, _, pred, *_ = ops.cross_entropy(logits, target)
    assert pred.tolist() == [5, 0, 20]
    big = torch.zeros(2, 70000, device=DEV, dtype=torch.bfloat16)
    big[0, [60000, 1234, 50000]] = 1.0
    big[1, [69999, 40000]] = 2.0
    _, _, pred, *_ = ops.cross_entropy(big, torch.tensor([0, 0], device=DEV))
    assert pred.tolist() == [1234, 40000]


_BAD_TARGET = """
import glob, os, sys, torch
try:
    import fusedce
except Exception:
    for so in glob.glob(os.path.join(sys.argv[1], "fusedce", "_C*.so")):
        torch.ops.load_library(so)
ops = torch.ops.fusedce
h = torch.randn(10, 16, device="cuda", dtype=torch.bfloat16)
w = torch.randn(50, 16, device="cuda", dtype=torch.bfloat16)
t = torch.zeros(10, dtype=torch.long, device="cuda")
for bad, call in ((50, lambda t: ops.loss(h, w, t, grad_mask=[True, True, False])[1]),
                  (-7, lambda t: ops.cross_entropy(torch.randn(10, 50, device="cuda"), t)[0])):
    t[3] = bad
    try:
        token_loss = call(t)
        # The default path: no host check; the bad token's loss is NaN, the others finite.
        bad_nan = bool(token_loss[3].isnan())
        others = bool(torch.cat([token_loss[:3], token_loss[4:]]).isfinite().all())
        print("NAN", bad_nan and others)
    except RuntimeError as e:
        print("RAISED", "target[3]" in str(e))
torch.cuda.synchronize()  # nothing out of bounds happened before the error
print("DONE")
"""


@pytest.mark.parametrize("validate", [False, True], ids=["default", "FUSEDCE_VALIDATE"])
def test_bad_target(validate):
    """An out-of-range target: a NaN token loss by default (no host sync), the clear error naming
    the index in validation mode. In a subprocess: an error path that crashed the process must fail
    this test, not the run."""
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..")
    env = dict(os.environ)
    env.pop("FUSEDCE_VALIDATE", None)
    if validate:
        env["FUSEDCE_VALIDATE"] = "1"
    r = subprocess.run([sys.executable, "-c", _BAD_TARGET, root], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, f"crashed (rc {r.returncode}):\n{r.stdout}\n{r.stderr[-2000:]}"
    word = "RAISED" if validate else "NAN"
    assert r.stdout.split() == [word, "True", word, "True", "DONE"], r.stdout


def test_float64_supported():
    hidden, weight, target, _ = make(20, 8, 70, torch.float64)
    out = ops.loss(hidden, weight, target, grad_mask=[True, True, False], z_loss=1e-2)
    ref, grads, _ = ref_loss_and_grads(hidden, weight, target, None, None, 1.0, z_loss=1e-2)
    assert out[1].dtype == torch.float64
    assert rel(out[1], ref.token_loss) < 1e-10 and rel(out[6], grads[0]) < 1e-9


def test_cuda_graph_capture():
    hidden, weight, target, _ = make(256, 64, 5000, torch.bfloat16)
    gs = torch.tensor(1 / 200, device=DEV)
    kwargs = dict(grad_mask=[True, True, False], chunk_size=100, label_smoothing=0.1)
    eager = ops.loss(hidden, weight, target, None, None, gs, **kwargs)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            ops.loss(hidden, weight, target, None, None, gs, **kwargs)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = ops.loss(hidden, weight, target, None, None, gs, **kwargs)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, static):
        assert a.shape == b.shape and (a.numel() == 0 or rel(b, a) < 1e-2)
    # new data in the same buffers
    h2, _, t2, _ = make(256, 64, 5000, torch.bfloat16, seed=5)
    hidden.copy_(h2)
    target.copy_(t2)
    graph.replay()
    again = ops.loss(hidden, weight, target, None, None, gs, **kwargs)
    torch.cuda.synchronize()
    for a, b in zip(again, static):
        assert a.shape == b.shape and (a.numel() == 0 or rel(b, a) < 1e-2)
    assert rel(again[1], eager[1]) > 1e-3  # the replay did see the new data


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 40e9,
    reason="needs a large GPU")
def test_large_n_times_v():
    """N*V > 2^31 elements: 64-bit indexing in the row kernels and the chunk loop."""
    n, v = 16500, 131072
    assert n * v > 2**31
    g = torch.Generator(device=DEV).manual_seed(0)
    logits = torch.randn(n, v, device=DEV, dtype=torch.bfloat16, generator=g)
    target = torch.randint(0, v, (n,), device=DEV, generator=g)
    target[-1] = v - 1
    tok, lse, pred, *_ = ops.cross_entropy(logits, target)
    ref_lse = torch.cat([torch.logsumexp(c.float(), -1) for c in logits.split(2048)])
    ref_tok = ref_lse - logits.gather(1, target[:, None])[:, 0].float()
    assert rel(lse, ref_lse) < 1e-5 and rel(tok, ref_tok) < 1e-5
    assert (pred[-64:] == logits[-64:].float().argmax(-1)).all()
    gtok = torch.full((n,), 1.0 / n, device=DEV)
    ops.cross_entropy_backward_(logits, target, None, lse, gtok, None)
    last = logits[-3:].float()
    # rows of the gradient sum to 0 (softmax minus one-hot), also the last rows past 2^31
    assert last.sum(-1).abs().max().item() < 1e-6
    del logits
    torch.cuda.empty_cache()
    # the fused op over many chunks with N*V > 2^31
    hidden = torch.randn(n, 64, device=DEV, dtype=torch.bfloat16, generator=g)
    weight = torch.randn(v, 64, device=DEV, dtype=torch.bfloat16, generator=g) / 8
    out = ops.loss(hidden, weight, target, grad_mask=[True, False, False], chunk_size=4096)
    rows = slice(n - 100, n)
    ref, grads, _ = ref_loss_and_grads(hidden[rows], weight, target[rows], None, None, 1.0)
    assert rel(out[1][rows], ref.token_loss) < 2e-3
    assert rel(out[6][rows], grads[0]) < 2.5e-2


def test_opcheck():
    from torch.library import opcheck

    hidden, weight, target, bias = make(12, 16, 40, torch.float32, bias=True)
    cw = torch.rand(40, device=DEV) + 0.5
    opcheck(ops.loss.default, (hidden, weight, target, bias, cw, torch.tensor(0.5, device=DEV)),
            dict(grad_mask=[True, True, True], label_smoothing=0.1),
            test_utils=("test_schema", "test_faketensor"))
    logits = torch.randn(12, 40, device=DEV)
    opcheck(ops.cross_entropy.default, (logits, target, cw), dict(z_loss=1e-3),
            test_utils=("test_schema", "test_faketensor"))


_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_scale_(dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    before = (torch.randn(1001, device=DEV) * 3).to(dtype)  # odd length: scalar head and tail
    x = before.clone()
    ops.scale_(x, torch.tensor(1.0, device=DEV))
    assert torch.equal(x.view(_INT_VIEW[dtype]), before.view(_INT_VIEW[dtype]))  # bit for bit
    for scale in (torch.tensor(3.0, device=DEV), torch.tensor([0.25], device=DEV, dtype=torch.float64)):
        y = before.clone()
        view = y[1:]  # a storage offset: not 16-byte aligned
        ops.scale_(view, scale)
        assert torch.equal(view, (before[1:].to(acc) * scale.to(acc).reshape(())).to(dtype))
        assert torch.equal(y[:1], before[:1])
    big = torch.randn(3, 70001, device=DEV).to(dtype)  # several blocks of the grid-stride loop
    ref = (big.to(acc) * -2).to(dtype)
    ops.scale_(big, torch.tensor(-2.0, device=DEV))
    assert torch.equal(big, ref)
    nc = torch.randn(8, 6, device=DEV).to(dtype).t()  # non-contiguous: the plain multiply
    ref = nc * 2
    ops.scale_(nc, torch.tensor(2.0, device=DEV))
    assert torch.equal(nc, ref)


def test_scale_graph_and_opcheck():
    x = torch.randn(4096, device=DEV, dtype=torch.bfloat16)
    s = torch.tensor(1.0, device=DEV)
    keep = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.scale_(x, s)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(x, keep)
    s.fill_(0.5)  # the device scalar is read at run time
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(x, (keep.float() * 0.5).to(torch.bfloat16))
    from torch.library import opcheck

    opcheck(ops.scale_.default, (torch.randn(10, device=DEV), torch.tensor(2.0, device=DEV)),
            test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_long_rows(dtype):
    """Fast mode's fused pass on long rows: odd V (rows not 16-byte aligned), every feature on,
    argmax ties far apart in the row."""
    n, h, v = 24, 32, 70001
    hidden, weight, target, bias = make(n, h, v, dtype, bias=True)
    # ties: rows 0 and 1 see their maximum at two identical weight rows (first one wins), row 2
    # sees all-zero logits (argmax 0)
    hidden[2].zero_()
    for r, (j1, j2) in enumerate([(1000, 65000), (30000, 30001)]):
        weight[j1] = hidden[r] / hidden[r].float().norm().to(dtype) * 4
        weight[j2] = weight[j1]
    bias.zero_()
    target[:3] = torch.tensor([5, 6, 7], device=DEV)
    cw = torch.rand(v, device=DEV) + 0.5
    gs = torch.tensor(0.37, device=DEV)
    kw = dict(softcap=30.0, z_loss=1e-3, label_smoothing=0.1, logit_scale=1.3)
    out = ops.loss(hidden, weight, target, bias, cw, gs, grad_mask=[True, True, True],
                   **op_kwargs(kw))
    torch.cuda.synchronize()
    loss, tok, lse, pred, _, _, gh, gw, gb, *_ = out
    assert pred[:3].tolist() == [1000, 30000, 0]
    ref, grads, z = ref_loss_and_grads(hidden, weight, target, bias, cw, 0.37, **kw)
    vt, gt = TOL[dtype]
    assert rel(tok, ref.token_loss) < vt and rel(lse, ref.lse) < vt
    check_predicted(pred, z, target, dtype)
    assert rel(gh, grads[0]) < gt and rel(gw, grads[1]) < gt and rel(gb, grads[2]) < gt
    # the plain path too (no transform, no smoothing: the specialized kernels)
    plain = ops.loss(hidden, weight, target, None, None, gs, grad_mask=[True, True, False])
    ref, grads, _ = ref_loss_and_grads(hidden, weight, target, None, None, 0.37)
    assert rel(plain[1], ref.token_loss) < vt and plain[3][:3].tolist() == [1000, 30000, 0]
    assert rel(plain[6], grads[0]) < gt and rel(plain[7], grads[1]) < gt
