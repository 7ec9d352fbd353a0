"""Where the time of a terms call goes: CUDA kernel totals (torch.profiler) of CE alone vs the
CE + z-loss + entropy + forward-KL call of bench_terms, same shape. Prints two tables.

    python -m benchmarks profile [--shape N H V]
"""

import argparse

import torch

import fusedce


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", type=int, nargs=3, default=(8192, 4096, 128256))
    a = p.parse_args()
    N, H, V = a.shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(N, H, device="cuda", generator=g) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(V, H, device="cuda", generator=g) * H**-0.5).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    tl = torch.randn(N, V, device="cuda", generator=g).bfloat16()
    cases = {
        "ce": lambda: fusedce.linear_cross_entropy(x, w, t),
        "ce+z+entropy+kl": lambda: fusedce.distillation_loss(
            x, w, t, teacher_logits=tl, ce_weight=1.0, z_loss=1e-4, entropy_coef=0.01),
    }
    for name, fn in cases.items():
        for _ in range(3):
            fn().backward()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn().backward()
            torch.cuda.synchronize()
        print(f"== {name} (5 steps)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=70))


if __name__ == "__main__":
    main()
