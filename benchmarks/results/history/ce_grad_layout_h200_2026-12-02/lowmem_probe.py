# low-memory mode (recomputing backward, vocabulary tiles: the gradient kernel runs per tile) and
# memory_budget, fwd+bwd, CUDA events, median of 10; `python lowmem_probe.py TAG`
import sys, torch, fusedce
def med(f, n=10):
    for _ in range(2): f()
    ts = []
    for _ in range(n):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(); a.record(); f(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts) // 2]
tag = sys.argv[1]
g = torch.Generator(device="cuda").manual_seed(0)
for N, H, V in [(8192, 4096, 128256), (8192, 2304, 256000)]:
    x = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16, generator=g) / H ** 0.5).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    res = []
    for name, kw in [("lowmem vt8192", dict(low_memory=True, vocab_chunk_size=8192)),
                     ("lowmem vt16384", dict(low_memory=True, vocab_chunk_size=16384)),
                     ("budget 256MiB", dict(memory_budget=256 << 20)),
                     ("fast", {})]:
        def step():
            x.grad = None; w.grad = None
            fusedce.linear_cross_entropy(x, w, t, **kw).backward()
        res.append(f"{name} {med(step):.3f}")
    print(f"{tag} {N}x{H}x{V}: " + " | ".join(res), flush=True)
    del x, w
