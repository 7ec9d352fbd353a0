# untracked A/B probe: synced CE-on-logits fwd+bwd (median of 40, CUDA events) and the host time of the
# forward call and of backward() (perf_counter medians), bf16; `python ce_ab.py TAG`.
import sys, time, statistics, torch, fusedce
tag = sys.argv[1]
for N, V in [(2048, 128256), (8192, 32768), (8192, 128256)]:
    z0 = torch.randn(N, V, device="cuda", dtype=torch.bfloat16) * 3
    t = torch.randint(0, V, (N,), device="cuda")
    res = []
    for inplace in (False, True):
        z = z0.clone().requires_grad_()
        for _ in range(5):
            z.grad = None; fusedce.cross_entropy(z, t, inplace_backward=inplace).backward()
        torch.cuda.synchronize()
        ts, hf, hb = [], [], []
        for _ in range(40):
            z.grad = None
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); h0 = time.perf_counter()
            loss = fusedce.cross_entropy(z, t, inplace_backward=inplace)
            h1 = time.perf_counter(); loss.backward(); h2 = time.perf_counter()
            b.record(); b.synchronize()
            ts.append(a.elapsed_time(b)); hf.append((h1 - h0) * 1e6); hb.append((h2 - h1) * 1e6)
        res.append(f"{'in ' if inplace else 'out'} {statistics.median(ts):.3f} ms (host fwd {statistics.median(hf):.0f} us, bwd {statistics.median(hb):.0f} us)")
    print(f"{tag} {N}x{V}: " + " | ".join(res), flush=True)
    del z0, z
