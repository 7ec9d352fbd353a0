# untracked probe: kernel timeline of one synced CE-on-logits fwd+bwd step (fusedce out/in place, Liger),
# from a torch.profiler chrome trace: each kernel's start relative to the step's CPU start, its duration, gaps.
import sys, json, os, torch, statistics, tempfile
import fusedce
from torch.profiler import profile, ProfilerActivity, record_function
try:
    from liger_kernel.transformers.functional import liger_cross_entropy
except Exception:
    liger_cross_entropy = None
def steps(N, V):
    z0 = torch.randn(N, V, device="cuda", dtype=torch.bfloat16) * 3
    t = torch.randint(0, V, (N,), device="cuda")
    z = z0.clone().requires_grad_(); zi = z0.clone().requires_grad_()
    def out():
        z.grad = None; fusedce.cross_entropy(z, t).backward()
    def inp():
        zi.grad = None; fusedce.cross_entropy(zi, t, inplace_backward=True).backward()
    fns = {"fusedce_out": out, "fusedce_in": inp}
    if liger_cross_entropy is not None:
        zl = z0.clone().requires_grad_()
        def lig():
            zl.grad = None; liger_cross_entropy(zl, t).backward()
        fns["liger"] = lig
    return fns
for spec in sys.argv[1:]:
    N, V = (int(v) for v in spec.split("x"))
    for name, fn in steps(N, V).items():
        for _ in range(5): fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(15):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for i in range(3):
                torch.cuda.synchronize()
                with record_function(f"STEP{i}"):
                    fn()
                torch.cuda.synchronize()
        f = tempfile.mktemp(suffix=".json"); p.export_chrome_trace(f)
        ev = json.load(open(f))["traceEvents"]; os.remove(f)
        st = sorted([e for e in ev if e.get("name", "").startswith("STEP") and e.get("ph") == "X" and e.get("cat") == "user_annotation"], key=lambda e: e["ts"])
        ks = sorted([e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("ph") == "X"], key=lambda e: e["ts"])
        print(f"== {N}x{V} {name}: synced step median {statistics.median(ts):.3f} ms (min {min(ts):.3f})")
        s = st[-1]; t0 = s["ts"]; nxt = float("inf")
        mine = [k for k in ks if k["ts"] >= t0 and k["ts"] < t0 + 1e5][:40]
        last_end = t0; busy = 0
        for k in mine:
            print(f"   start {k['ts']-t0:9.1f} us  dur {k['dur']:8.1f}  gap {k['ts']-last_end:7.1f}  {k['name'][:90]}")
            last_end = k["ts"] + k["dur"]; busy += k["dur"]
        print(f"   step CPU range {s['dur']:.1f} us; kernels {len(mine)}, busy {busy:.1f} us, first kernel at {mine[0]['ts']-t0:.1f} us, last end {last_end-t0:.1f} us")
