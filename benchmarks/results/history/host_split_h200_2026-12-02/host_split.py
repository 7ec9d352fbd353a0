"""Host time per call on CUDA, split by layer: the C++ op alone (no grad), the op through torch's
custom-op autograd wrapper, the public function; forward and backward; eager for comparison."""
import json, statistics, sys, time
import torch, torch.nn.functional as F
import fusedce

dev = "cuda"
torch.manual_seed(0)
REPS = 60


def host(fn, pre=None):
    ts = []
    for i in range(REPS + 20):
        args = pre() if pre else None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(args)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        if i >= 20:
            ts.append((t1 - t0) * 1e6)
    return round(statistics.median(ts), 1)


res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
       "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
op_ce = torch.ops.fusedce.cross_entropy
for N, V in ((8, 32000), (2048, 128256)):
    lg = (torch.randn(N, V, device=dev) * 2).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev)
    lg0 = lg.detach()
    r = {}
    r["op_nograd_fwd"] = host(lambda _: op_ce(lg0, t, None, -100, 0.0, 0.0, 0.0, 1.0, False, True))
    r["op_autograd_fwd"] = host(lambda _: op_ce(lg, t, None, -100, 0.0, 0.0, 0.0, 1.0, False, True))
    r["fn_fwd"] = host(lambda _: fusedce.cross_entropy(lg, t))
    r["eager_fwd"] = host(lambda _: F.cross_entropy(lg.float(), t))
    r["fn_bwd"] = host(lambda l: l.backward(), lambda: fusedce.cross_entropy(lg, t))
    r["op_bwd"] = host(lambda l: l[3].backward(), lambda: op_ce(lg, t, None, -100, 0.0, 0.0, 0.0, 1.0, False, True))
    r["eager_bwd"] = host(lambda l: l.backward(), lambda: F.cross_entropy(lg.float(), t))
    res[f"ce_{N}x{V}"] = r
    print(f"ce {N}x{V}", r, flush=True)

for N, H, V in ((128, 1024, 32000), (128, 4096, 128256)):
    x = (torch.randn(N, H, device=dev) * 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, H, device=dev) * 0.05).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev)
    r = {}
    r["fn_fwd"] = host(lambda _: fusedce.linear_cross_entropy(x, w, t))
    with torch.no_grad():
        r["fn_fwd_nograd"] = host(lambda _: fusedce.linear_cross_entropy(x, w, t))
    r["eager_fwd"] = host(lambda _: F.cross_entropy(F.linear(x, w).float(), t))
    r["fn_bwd"] = host(lambda l: l.backward(), lambda: fusedce.linear_cross_entropy(x, w, t))
    r["eager_bwd"] = host(lambda l: l.backward(), lambda: F.cross_entropy(F.linear(x, w).float(), t))
    # one synced step each, median
    def step(f):
        ts = []
        for i in range(60):
            torch.cuda.synchronize(); t0 = time.perf_counter(); f(); torch.cuda.synchronize()
            if i >= 10: ts.append((time.perf_counter() - t0) * 1e3)
        return round(statistics.median(ts), 3)
    r["fn_step_ms"] = step(lambda: fusedce.linear_cross_entropy(x, w, t).backward())
    r["eager_step_ms"] = step(lambda: F.cross_entropy(F.linear(x, w).float(), t).backward())
    res[f"lce_{N}x{H}x{V}"] = r
    print(f"lce {N}x{H}x{V}", r, flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
