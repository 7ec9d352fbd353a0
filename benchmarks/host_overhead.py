"""Host time of one fwd+bwd call of each public function on tiny tensors, against eager PyTorch.

    python -m benchmarks host_overhead [--device cpu|cuda|all] [--calls 200] [--repeats 15]

The shapes are tiny (N=8 tokens, H=16, V=32 by default), so what is timed is the fixed cost of a
call: argument checks, the op dispatch, torch's custom-op autograd wrapper, allocations and the
backward's bookkeeping, not the math. On CUDA the GPU work of a call is a few microseconds, so a
loop of calls without a host synchronization runs at the speed of the host; the loop is timed
between two synchronizations (wall time) and divided by the number of calls. On the CPU the clock
is the CPU time of the calling thread (time.thread_time), with one intra-op thread: the work of
the call itself, not the time other processes of a shared machine take. Each number is the
minimum over `repeats` loops of the mean per call (the least disturbed loop).

Methods (each a full fwd+bwd step, gradients of input and weight):
  eager                 F.cross_entropy(x @ w.T, t)
  eager_logprobs        log_softmax(x @ w.T).gather(t), summed
  linear_cross_entropy  fusedce.linear_cross_entropy(x, w, t) (mean)
  token_logprobs        fusedce.token_logprobs(x, w, t), summed
  token_statistics      fusedce.token_statistics(x, w, t) with every output (what the TRL
                        integration's head computes per call), log-probs summed
  policy_loss           fusedce.policy_loss(x, w, tokens, old_logprobs, advantages) (GRPO)
  cross_entropy         fusedce.cross_entropy(x @ w.T, t) (CE on given logits, mean)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import fusedce


def _steps(device, N, H, V):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, H, generator=g).to(device).requires_grad_()
    w = torch.randn(V, H, generator=g).to(device).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g).to(device)
    B, T = 2, N // 2
    x3 = x.detach().reshape(B, T, H).requires_grad_()
    tok = t.reshape(B, T)
    old = (torch.randn(B, T, generator=g) - 3.0).to(device)
    adv = torch.randn(B, generator=g).to(device)

    def eager():
        F.cross_entropy(x @ w.T, t).backward()

    def eager_logprobs():
        (x @ w.T).log_softmax(-1).gather(1, t[:, None]).sum().backward()

    def linear_cross_entropy():
        fusedce.linear_cross_entropy(x, w, t).backward()

    def token_logprobs():
        fusedce.token_logprobs(x, w, t).sum().backward()

    def token_statistics():
        fusedce.token_statistics(x, w, t).logprobs.sum().backward()

    def policy_loss():
        fusedce.policy_loss(x3, w, tok, old, adv)[0].backward()

    def cross_entropy():
        fusedce.cross_entropy(x @ w.T, t).backward()

    return [eager, eager_logprobs, linear_cross_entropy, token_logprobs, token_statistics,
            policy_loss, cross_entropy]


def host_us(step, device, calls, repeats):
    """Minimum over `repeats` loops of the mean host time per call, in microseconds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # CPU: the CPU time of this thread (what the call costs, whatever else the machine runs);
    # CUDA: wall time, so that a call that waits for the GPU shows it.
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    for _ in range(max(10, calls // 10)):
        step()
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = clock()
        for _ in range(calls):
            step()
        sync()
        best = min(best, (clock() - t0) / calls)
    return best * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="all", help="cpu, cuda or all (cuda when available)")
    p.add_argument("--calls", type=int, default=200, help="calls per timed loop")
    p.add_argument("--repeats", type=int, default=15, help="timed loops; the minimum is reported")
    p.add_argument("--shape", default="8x16x32", help="N x H x V")
    args = p.parse_args(argv)
    N, H, V = (int(s) for s in args.shape.split("x"))
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d != "cuda" or torch.cuda.is_available()]
    torch.set_num_threads(1)
    fix = "on" if fusedce.build_info()["torch_fill_defaults_fix"] else "off"
    print(f"host time per fwd+bwd call, us (N={N}, H={H}, V={V}; fusedce {fusedce.__version__}, "
          f"torch {torch.__version__}, linear fill_defaults {fix})")
    for name in devices:
        device = torch.device(name)
        results = {step.__name__: host_us(step, device, args.calls, args.repeats)
                   for step in _steps(device, N, H, V)}
        eager = results["eager"]
        for method, us in results.items():
            print(f"  {name:5s} {method:22s} {us:8.1f} us  ({us / eager:5.2f}x eager)")


if __name__ == "__main__":
    main()
