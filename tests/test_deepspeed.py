"""fusedce under DeepSpeed ZeRO-3 on the CPU (DS_ACCELERATOR=cpu, gloo), 1 and 2 processes.

ZeRO-3 partitions every parameter: outside its module's forward ``lm_head.weight`` is a [0]-shaped
placeholder, gathered by the module's forward pre-hook and released by its post-hook (here with
no reuse or prefetch, so it really is released), gathered again before the module's backward.
DeepSpeed also replaces ``torch.nn.functional.linear`` by its own memory-efficient linear.

Every check compares fusedce with the same engine run without fusedce (the patched transformers
forward with ``skip_logits=False`` runs the stock code; the public API against ``F.cross_entropy``
on ``head(hidden)``): the loss on each rank and every parameter's full gradient after ZeRO's
reduction, fp32. A per-token loss (a recomputing backward) must find the head's weight gathered
again; a placeholder given straight to a public function is refused by name.

Needs ``deepspeed`` (``DS_BUILD_OPS=0 pip install deepspeed``); skipped without it.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import socket
import sys

import pytest
import torch
import torch.nn.functional as F
from ranks import close, run_checks, run_rank  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

F32 = dict(rtol=2e-5, atol=1e-6)
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def _config():
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": 3,
            # every parameter partitioned and released right after its module's forward
            "stage3_param_persistence_threshold": 0,
            "stage3_max_live_parameters": 0,
            "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": 0,
        },
    }


def _engine(model):
    import deepspeed

    # lr=0: step() only clears the gradients, the parameters stay as they are for the next run
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_config())
    return engine


def _full_grads(engine, model):
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for n, p in model.named_parameters():
        g = safe_get_full_grad(p)
        assert g is not None, f"no gradient for {n}"
        out[n] = g.detach().clone()
    return out


def _compare(runs, what):
    (l0, g0), (l1, g1) = runs
    close(l1, l0, F32, f"{what}: loss")
    assert set(g0) == set(g1)
    for n in g0:
        close(g1[n], g0[n], F32, f"{what}: gradient of {n}")


def _released(p, what):
    assert p.numel() == 0 and tuple(p.ds_shape) != (0,), \
        f"{what}: expected the ZeRO-3 placeholder, got shape {tuple(p.shape)}"


@check
def patched_transformers_model(c):
    """A tiny Llama patched by fusedce.integrations.transformers.apply, untied and tied."""
    import transformers

    import fusedce.integrations.transformers as fhf
    from fusedce.integrations.transformers import _tiny

    transformers.logging.set_verbosity_error()
    for tied in (False, True):
        model = _tiny.tiny_model(transformers.LlamaForCausalLM, seed=0, tie_word_embeddings=tied)
        assert fhf.apply(model)
        engine = _engine(model)
        _released(model.lm_head.weight, "before the forward")
        ids, labels = _tiny.batch(seed=10 + c.rank)  # different tokens on each rank
        runs = []
        for fused in (False, True):
            kw = {} if fused else {"skip_logits": False}
            out = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **kw)
            assert (out.logits is None) == fused
            engine.backward(out.loss)
            runs.append((out.loss.detach(), _full_grads(engine, model)))
            engine.step()
        _compare(runs, f"tied={tied}")


class _Net(torch.nn.Module):
    H, V = 8, 19

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(self.H, self.H)
        self.head = torch.nn.Linear(self.H, self.V)

    def forward(self, x, t, fused, reduction):
        from fusedce.integrations import head_loss

        h = self.body(x)
        if fused:
            return head_loss(self.head, h, t, reduction=reduction, label_smoothing=0.1)
        return F.cross_entropy(self.head(h), t, reduction=reduction, label_smoothing=0.1)


@check
def public_head_loss(c):
    """fusedce.integrations.head_loss on a ZeRO-3 head: mean (gradient from the forward) and a
    per-token loss with a per-token upstream gradient (the recomputing backward), the head's
    weight released between the forward and the backward."""
    net = _Net()
    engine = _engine(net)
    g = torch.Generator().manual_seed(100 + c.rank)
    x = torch.randn(12, _Net.H, generator=g)
    t = torch.randint(0, _Net.V, (12,), generator=g)
    t[::5] = -100
    up = torch.rand(12, generator=g)
    for reduction in ("mean", "none"):
        runs = []
        for fused in (False, True):
            out = engine(x, t, fused, reduction)
            _released(net.head.weight, f"{reduction}: after the forward")
            engine.backward(out if reduction == "mean" else (out * up).sum())
            runs.append((out.detach(), _full_grads(engine, net)))
            engine.step()
        _compare(runs, reduction)


@check
def placeholder_refused(c):
    """The [0]-shaped placeholder given to a public function: an error naming the argument."""
    import fusedce

    net = _Net()
    _engine(net)
    w, b = net.head.weight, net.head.bias
    _released(w, "outside the forward")
    h = torch.randn(3, _Net.H)
    t = torch.zeros(3, dtype=torch.long)
    full = torch.randn(_Net.V, _Net.H)
    calls = {
        "linear_cross_entropy": (lambda: fusedce.linear_cross_entropy(h, w, t), "linear_weight"),
        "linear_bias": (lambda: fusedce.linear_cross_entropy(h, full, t, linear_bias=b), "linear_bias"),
        "token_logprobs": (lambda: fusedce.token_logprobs(h, w, t), "linear_weight"),
    }
    for name, (fn, arg) in calls.items():
        with pytest.raises(ValueError) as e:
            fn()
        msg = str(e.value)
        assert f"{arg} is a DeepSpeed ZeRO-3 partitioned parameter" in msg and "head_loss" in msg, (name, msg)


@check
def trl_head_zero3(c):
    """fusedce's TRL fused head (fusedce.integrations.trl.add_fused_lm_head, added before the engine
    is built, as TRL's trainers do) on a ZeRO-3 engine: uneven tokens per rank, a per-token
    (GRPO-like) objective with an entropy term (the recomputing backward, the head's weight
    released in between), tied and untied: every parameter's full gradient equals the float64
    single-process gradient of the materialized logits of every rank's batch."""
    import transformers

    import fusedce.integrations.trl as ftrl

    transformers.logging.set_verbosity_error()
    temperature = 0.7

    def make(tied):
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, initializer_range=0.2,
            tie_word_embeddings=tied))

    # the batches, the GRPO-like objective and its float64 truth of test_fsdp's TRL-head checks
    from test_fsdp import _trl_data as data, _trl_objective as objective, _trl_truth

    for tied in (False, True):
        m = make(tied).double()
        batches = [data(r) for r in range(c.world)]
        n = float(sum((lab[:, 1:] != -100).sum() for _, lab, _ in batches))
        want = _trl_truth(m, batches, temperature, n)

        model = make(tied)
        ftrl.add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
        engine = _engine(model)
        _released(model.lm_head.weight, "before the forward")
        ids, lab, adv = batches[c.rank]
        out = engine(input_ids=ids, labels=lab, fused_lm_head=True)
        _released(model.lm_head.weight, "after the forward")
        # x world: ZeRO averages the ranks' gradients, n counts every rank's tokens
        engine.backward(objective(out.log_probs, out.entropy, out.label_mask, adv.float(), n) * c.world)
        got = _full_grads(engine, model)
        assert set(got) == set(want), set(got) ^ set(want)
        for k in want:
            close(got[k], want[k], F32, f"tied={tied}: gradient of {k}")
        engine.step()


def _worker(rank, world, port, _init_file, result_dir):  # DeepSpeed rendezvous by env, not file
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import deepspeed
    import deepspeed.comm.torch as ds_torch

    # DeepSpeed's CPU shared-memory all-reduce is a C++ extension compiled at the first
    # init_distributed (minutes); gloo does the collectives without it.
    ds_torch.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))

    class Ctx:
        pass

    c = Ctx()
    c.rank, c.world = rank, world
    run_rank(CHECKS, c, rank, result_dir)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[1, 2], ids=["1-process", "2-processes"])
def group_results(request):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (DS_BUILD_OPS=0 pip install deepspeed)")
    pytest.importorskip("transformers")
    world = request.param
    return run_checks(_worker, (world, _free_port()), world, CHECKS)


@pytest.mark.parametrize("name", list(CHECKS))
def test_deepspeed_zero3(group_results, name):
    failures = {r: m for r, m in group_results[name].items() if m != "ok"}
    assert not failures, "\n".join(f"rank {r}:\n{m}" for r, m in failures.items())
