"""Whole training steps on CUDA: torch.compile(mode="reduce-overhead") and a hand-captured CUDA graph.

The fused loss must live inside the graphs users build around it: the forward (chunk loop, no
host sync while capturing), the backward (the in-place scale of the forward-computed gradients,
reading the upstream gradient on the device) and the optimizer step, replayed with new data.

Each graphed step is compared with one eager step taken from the same parameters (not whole
trajectories: over several SGD steps a tiny model amplifies the last-bit differences between
cuBLAS algorithms chosen inside and outside a graph, which says nothing about fusedce).
"""

import copy

import pytest
import torch

import fusedce

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

V, H, T, B = 1000, 64, 33, 4  # V not a multiple of 8; T odd (shifted labels)
LR = 0.5


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Parameter(torch.randn(V, H, generator=g) * 0.1)
        self.mlp = torch.nn.Linear(H, H)
        self.lm_head = torch.nn.Parameter(torch.randn(V, H, generator=g) * H**-0.5)

    def forward(self, tokens):
        h = torch.nn.functional.gelu(self.mlp(self.embed[tokens]))
        return fusedce.linear_cross_entropy(h, self.lm_head, tokens, shift=True, z_loss=1e-4,
                                            chunk_size=37)  # several chunks, a partial last one


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (B, T), generator=g).cuda() for _ in range(n)]


def _sgd_step(model, forward, tokens):
    """loss = forward(tokens), its backward, then plain SGD on model's parameters."""
    for p in model.parameters():
        p.grad = None
    loss = forward(tokens)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    return loss


def _eager_step(model, tokens):
    """One eager SGD step on a copy of `model`: (loss, parameters after the step)."""
    twin = copy.deepcopy(model)
    loss = _sgd_step(twin, twin, tokens)
    return loss.detach(), [p.detach() for p in twin.parameters()]


def _assert_step(loss, model, want):
    want_loss, want_params = want
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), want_params):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_compile_reduce_overhead_training():
    """torch.compile(fullgraph=True, mode="reduce-overhead"): the forward and its AOT-compiled
    backward run as CUDA graphs (after the warm-up calls), around the custom ops."""
    torch._dynamo.reset()
    model = TinyLM().cuda()
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    for tokens in _batches(6, seed=1):  # warm-up, recording, then replays
        want = _eager_step(model, tokens)
        torch.compiler.cudagraph_mark_step_begin()
        loss = _sgd_step(model, compiled, tokens)
        _assert_step(loss.detach().clone(), model, want)


def test_cuda_graph_training_step():
    """A whole step (forward, backward, optimizer) captured once with torch.cuda.graph, then replayed
    on new token batches copied into the static input."""
    model = TinyLM().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    batches = _batches(5, seed=2)
    static_tokens = batches[0].clone()
    # Warm up on a side stream (allocator, cuBLAS workspaces), without touching the parameters.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            opt.zero_grad(set_to_none=False)
            model(static_tokens).backward()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    snapshot = copy.deepcopy(model.state_dict())
    with torch.cuda.graph(graph):
        static_loss = model(static_tokens)
        static_loss.backward()
        opt.step()
    model.load_state_dict(snapshot)  # capturing recorded the step without running it

    for tokens in batches:
        want = _eager_step(model, tokens)
        static_tokens.copy_(tokens)
        for p in model.parameters():
            p.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        _assert_step(static_loss.detach().clone(), model, want)
