"""Every CUDA kernel of fusedce once, on small odd shapes, for compute-sanitizer (not a pytest file):

    compute-sanitizer --tool memcheck --error-exitcode 1 python tests/cuda_sanitize_run.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/cuda_sanitize_run.py

    compute-sanitizer --tool racecheck ... python tests/cuda_sanitize_run.py float32

(racecheck stops with an internal "failed to handle a hardware exception" inside the cuBLAS kernel
of the float32-output GEMM that half inputs use in the low-memory mode, before any fusedce kernel
reports a hazard: there it runs float32 only, whose kernels share the shared-memory code.)

Covers: the fused CE row kernels (warp- and block-per-row widths, whole rows and vocabulary tiles),
the recomputing backward, CE on given logits (out of place and in place), the in-place scale, the
terms kernel (entropy, log-prob, each distillation kind, the policy loss), the shard kernels, and
targets out of range (no kernel may touch memory out of bounds). Checks values against
the float64 reference as it goes, so a clean sanitizer run is also a correct one.
"""

import sys

import torch

import fusedce
from fusedce import reference

dev = "cuda"
torch.manual_seed(0)


def close(a, b, tol, what):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
    assert err < tol, f"{what}: relative error {err:.3g}"


DTYPES = [getattr(torch, name) for name in sys.argv[1:]] or [torch.bfloat16, torch.float32]
for dtype in DTYPES:
    # the logits are rounded to the input dtype: the suite's value budgets (tests/test_cuda_ops.py TOL)
    tol = {torch.bfloat16: 3e-2, torch.float16: 1e-3}.get(dtype, 1e-4)
    for N, H, V in ((5, 24, 7), (9, 40, 1001), (3, 16, 5003)):  # warp rows, block rows, odd V
        x = torch.randn(N, H, device=dev, dtype=dtype, requires_grad=True)
        w = (torch.randn(V, H, device=dev) * H**-0.5).to(dtype).requires_grad_()
        b = torch.randn(V, device=dev, dtype=dtype, requires_grad=True)
        t = torch.randint(0, V, (N,), device=dev)
        t[0] = -100
        cw = torch.rand(V, device=dev) + 0.5
        kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0, logit_scale=1.1)
        ref = reference.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, reduction="none", **kw)
        for extra in ({}, {"vocab_chunk_size": 512}, {"chunk_size": 2}):
            loss = fusedce.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, **kw, **extra)
            loss.backward()
            tok = fusedce.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, reduction="none",
                                               **kw, **extra)
            close(tok, ref.token_loss, tol, f"token loss {dtype} {V} {extra}")
            tok.sum().backward()  # the recomputing backward
        logits = (x @ w.T).detach().requires_grad_()
        ce = fusedce.cross_entropy(logits, t, weight=cw, **kw)
        ce.backward()
        lg2 = (x @ w.T).detach().clone().requires_grad_()
        fusedce.cross_entropy(lg2 * 1, t, inplace_backward=True).backward()
        # terms kernel: entropy / log-prob, every distillation kind, the policy loss
        out = fusedce.linear_cross_entropy(x, w, t, entropy_coef=0.1, return_stats=True,
                                           return_entropy=True)
        (out.loss + out.entropy.sum()).backward()
        tl = torch.randn(N, V, device=dev, dtype=dtype)
        for kind in ("forward_kl", "reverse_kl", "jsd"):
            fusedce.distillation_loss(x, w, t, teacher_logits=tl, kind=kind, temperature=1.5,
                                      ce_weight=0.5).backward()
        fusedce.distillation_loss(x, w, t, teacher_input=x.detach(), teacher_weight=w.detach(),
                                  kind="jsd").backward()
        lp, ent = fusedce.token_logprobs(x, w, t.clamp(min=0), return_entropy=True)
        (lp.sum() + ent.sum()).backward()
        xb = x.reshape(1, N, H)
        loss, metrics = fusedce.policy_loss(xb, w, t.clamp(min=0).reshape(1, N),
                                            lp.detach().reshape(1, N) - 0.1, torch.ones(1, device=dev),
                                            ref_logprobs=lp.detach().reshape(1, N), beta=0.04)
        loss.backward()
        # shard kernels on two uneven shards
        z = (x @ w.T).detach()
        cut = V // 3
        for lo, hi in ((0, cut), (cut, V)):
            st = torch.ops.fusedce.shard_stats(z[:, lo:hi].contiguous(), t, lo, cw[lo:hi], softcap=5.0)
            g = z[:, lo:hi].contiguous()
            one = torch.ones(N, device=dev)
            torch.ops.fusedce.shard_grad_(g, t, lo, cw[lo:hi], st[:, 0], one, one, one, softcap=5.0)
        torch.cuda.synchronize()

# targets out of range (past the end, negative, far out): no out-of-bounds access in any kernel,
# a NaN loss and gradient by default, the clear error in validation mode
x = torch.randn(4, 8, device=dev, requires_grad=True)
w = torch.randn(11, 8, device=dev, requires_grad=True)
bad = torch.tensor([0, 11, -5, 2**40], device=dev)
for kw in ({}, {"reduction": "none"}, {"low_memory": True, "vocab_chunk_size": 4},
           {"entropy_coef": 0.1}, {"weight": torch.rand(11, device=dev)}):
    loss = fusedce.linear_cross_entropy(x, w, bad, **kw)
    loss.sum().backward()
    torch.cuda.synchronize()
    assert torch.isnan(loss).any() and torch.isnan(w.grad).any(), kw
    w.grad = None
z = torch.randn(4, 11, device=dev, requires_grad=True)
assert torch.isnan(fusedce.cross_entropy(z, bad))
lp = fusedce.token_logprobs(x, w, bad)
assert torch.isnan(lp[1:3]).all() and torch.isfinite(lp[0])
try:
    with fusedce.validate_targets():
        fusedce.linear_cross_entropy(x, w, bad)
except RuntimeError as e:
    assert "target[1] = 11" in str(e), e
else:
    raise AssertionError("an out-of-range target was accepted in validation mode")
torch.cuda.synchronize()
print("cuda_sanitize_run: all kernels ran")
