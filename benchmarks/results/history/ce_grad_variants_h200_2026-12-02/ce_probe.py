# CE-on-logits probe used for this A/B: fwd, the in-place backward op alone, fwd+bwd (out of place and in place) against the copy bandwidth measured in the same process, bf16; `python ce_probe.py TAG` on a CUDA machine with fusedce importable.
import sys, torch, fusedce
def med(f, n=20):
    for _ in range(3): f()
    ts = []
    for _ in range(n):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); f(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts) // 2]
tag = sys.argv[1] if len(sys.argv) > 1 else ""
for N, V in [(8192, 128256), (8192, 256000), (4096, 152064), (2048, 128256)]:
    z0 = torch.randn(N, V, device="cuda", dtype=torch.bfloat16) * 3
    t = torch.randint(0, V, (N,), device="cuda")
    dst = torch.empty_like(z0)
    cp = med(lambda: dst.copy_(z0))  # read 2 + write 2 B/elem
    bw = 4 * N * V / (cp * 1e-3)
    floor = 6 * N * V / bw * 1e3
    z = z0.clone().requires_grad_()
    fwd = med(lambda: fusedce.cross_entropy(z, t))
    def fb_out():
        z.grad = None; fusedce.cross_entropy(z, t).backward()
    zi = z0.clone().requires_grad_()
    def fb_in():
        zi.grad = None; fusedce.cross_entropy(zi, t, inplace_backward=True).backward()
    fbo = med(fb_out); fbi = med(fb_in)
    lse = torch.zeros(N, device="cuda"); g = torch.full((N,), 1.0 / N, device="cuda")
    bwd_op = med(lambda: torch.ops.fusedce.cross_entropy_backward_(z0, t, None, lse, g))
    print(f"{tag} {N}x{V}: copy {bw/1e12:.2f} TB/s | fwd {fwd:.3f} ms ({fwd/(2*N*V/bw*1e3):.3f}x of 2B) "
          f"| bwd_ op {bwd_op:.3f} ms ({bwd_op/(4*N*V/bw*1e3):.3f}x of 4B) | fwd+bwd out {fbo:.3f} ({fbo/floor:.3f}x) in {fbi:.3f} ({fbi/floor:.3f}x)", flush=True)
    del z0, dst, z, zi
