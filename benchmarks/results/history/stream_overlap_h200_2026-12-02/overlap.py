# Can a memory-bound kernel (the row pass's stand-in) run beside a cuBLAS GEMM on a second stream?
# Pure torch, bf16, H200. Times: A (GEMM) alone, B (memory-bound) alone, A and B on two streams.
import torch, statistics
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
dev = "cuda"
def timed(f, n=7):
    ts = []
    for _ in range(2): f()
    torch.cuda.synchronize()
    for _ in range(n):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); f(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)
s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
print(torch.cuda.get_device_name(), torch.__version__, flush=True)
for (Nc, H, V) in [(4096, 2304, 256000), (4096, 4096, 128256), (2048, 3584, 152064)]:
    x = torch.randn(Nc, H, device=dev, dtype=torch.bfloat16)
    w = torch.randn(V, H, device=dev, dtype=torch.bfloat16)
    out = torch.empty(Nc, V, device=dev, dtype=torch.bfloat16)
    g = torch.randn(Nc, V, device=dev, dtype=torch.bfloat16)  # the previous chunk's logits
    gw = torch.zeros(V, H, device=dev, dtype=torch.bfloat16)
    def gemm_logits(): torch.mm(x, w.t(), out=out)
    def gemm_gw(): gw.addmm_(g.t(), x)  # grad_W += G^T X (read-modify-write)
    def row_like(): g.mul_(1.0001)  # one read + one write of the chunk, like the gradient half
    def both(A, B):
        def f():
            cur = torch.cuda.current_stream()
            s1.wait_stream(cur); s2.wait_stream(cur)
            with torch.cuda.stream(s1): A()
            with torch.cuda.stream(s2): B()
            cur.wait_stream(s1); cur.wait_stream(s2)
        return f
    def seq(A, B):
        def f(): A(); B()
        return f
    tA, tG, tB = timed(gemm_logits), timed(gemm_gw), timed(row_like)
    print(f"{Nc}x{H}x{V}: logits GEMM {tA:.3f} ms | grad_W GEMM {tG:.3f} | row-like RW {tB:.3f}", flush=True)
    for name, A in (("logits GEMM", gemm_logits), ("grad_W GEMM", gemm_gw)):
        ts, tp = timed(seq(A, row_like)), timed(both(A, row_like))
        tA_ = tA if A is gemm_logits else tG
        print(f"   {name} + row-like: sequential {ts:.3f} | two streams {tp:.3f} | hidden {(ts - tp) / tB * 100:.0f}% of the row-like kernel", flush=True)
    del x, w, out, g, gw
    torch.cuda.empty_cache()
