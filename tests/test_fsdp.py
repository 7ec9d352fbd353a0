"""fusedce inside data-parallel wrappers: FSDP2 (``fully_shard``) and DDP, 2 gloo ranks on the CPU.

Each rank holds different tokens. Every check compares fusedce with the same model run without
fusedce in the same layout (the patched transformers forward with ``skip_logits=False`` runs the
stock code through the same module calls; the public API against ``F.cross_entropy`` on
``head(hidden)``): the loss on each rank and the gradient of every parameter after the wrapper's
reduction, fp32 at a tight tolerance (bf16 tolerance under a bf16 MixedPrecisionPolicy). The
checks of the Trainer-style accumulation (uneven tokens, num_items_in_batch summed over the ranks)
and of fusedce's TRL head compare instead against the float64 single-process gradient of the
materialized logits of every rank's batch. A head made tensor-parallel by transformers
(``tp_plan``) is refused by the patched forward with the reason.

The fused loss runs inside the head module's call, so FSDP2 gathers the head's weight before it
and reduces its gradient after; a recomputing backward (per-token upstream gradient) must find the
weight gathered again after ``reshard_after_forward=True`` freed it. A DTensor weight given to a
public function without ``process_group`` is refused (never taken for a vocabulary shard).

One process group is spawned once (module-scoped fixture); every rank runs every check and
reports per check, as tests/test_distributed.py does.
"""

from __future__ import annotations

import datetime
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import close, run_checks, run_rank  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORLD = 2
F32 = dict(rtol=2e-5, atol=1e-6)
BF16 = dict(rtol=4e-3, atol=1e-3)  # measured: loss 2e-5, gradients 1e-3 apart (bf16 logits in the stock head)

CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def full(g):
    """A gradient as one full tensor (FSDP2 leaves sharded DTensor gradients)."""
    from torch.distributed.tensor import DTensor

    return g.full_tensor() if isinstance(g, DTensor) else g


def grads(model):
    return {n: full(p.grad).detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def compare_grads(g0, g1, tol, what):
    assert g0 and set(g0) == set(g1), f"{what}: gradients for {sorted(set(g0) ^ set(g1))}"
    for n in g0:
        close(g1[n], g0[n], tol, f"{what}: gradient of {n}")


# ---------------------------------------------------------------------------------------------
# Hugging Face models patched by fusedce.integrations.transformers.apply
# ---------------------------------------------------------------------------------------------


def _tiny_llama(**overrides):
    import transformers

    import fusedce.integrations.transformers as fhf
    from fusedce.integrations.transformers import _tiny

    transformers.logging.set_verbosity_error()
    model = _tiny.tiny_model(transformers.LlamaForCausalLM, seed=0, **overrides)
    assert fhf.apply(model), fhf.audit()
    return model


def _step(model, ids, labels, fused):
    """(loss, gradients after the wrapper's reduction, output) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    kw = {} if fused else {"skip_logits": False}
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **kw)
    assert (out.logits is None) == fused, "the fused path returns no logits, the stock path does"
    out.loss.backward()
    return out.loss.detach(), grads(model)


def _hf_fsdp2(c, layout, reshard=True, bf16=False):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from fusedce.integrations.transformers import _tiny

    model = _tiny_llama(tie_word_embeddings=layout == "tied")
    kw = dict(mesh=c.mesh, reshard_after_forward=reshard)
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if layout != "root":
        for layer in model.model.layers:
            fully_shard(layer, **kw)
    if layout == "head":
        fully_shard(model.lm_head, **kw)
    if layout == "tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
        fully_shard([model.model.embed_tokens, model.lm_head], **kw)
    fully_shard(model, **kw)
    ids, labels = _tiny.batch(seed=10 + c.rank)  # different tokens on each rank
    tol = BF16 if bf16 else F32
    l0, g0 = _step(model, ids, labels, fused=False)
    l1, g1 = _step(model, ids, labels, fused=True)
    close(l1, l0, tol, "loss")
    compare_grads(g0, g1, tol, layout)
    l2, g2 = _step(model, ids, labels, fused=True)  # the wrapper's state survived the fused step
    close(l2, l1, F32, "second fused step")
    compare_grads(g1, g2, F32, "second fused step")
    other = [torch.zeros_like(l1) for _ in range(c.world)]
    dist.all_gather(other, l1)
    assert other[0].item() != other[1].item(), "the ranks' losses must differ (different tokens)"


@check
def fsdp2_root_only(c):
    _hf_fsdp2(c, "root")


@check
def fsdp2_per_layer_units(c):
    _hf_fsdp2(c, "layers")


@check
def fsdp2_head_own_unit(c):
    _hf_fsdp2(c, "head")


@check
def fsdp2_tied_head_and_embedding_grouped(c):
    _hf_fsdp2(c, "tied")


@check
def fsdp2_no_reshard_after_forward(c):
    _hf_fsdp2(c, "head", reshard=False)


@check
def fsdp2_bf16_mixed_precision(c):
    _hf_fsdp2(c, "head", bf16=True)


@check
def fsdp1_head_own_unit(c):
    """FSDP1 (FullyShardedDataParallel): decoder layers and lm_head each wrapped, then the root;
    the flat parameters' views are what the head's forward passes to F.linear."""
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from fusedce.integrations.transformers import _tiny

    model = _tiny_llama()
    head = model.lm_head
    policy = functools.partial(lambda_auto_wrap_policy,
                               lambda_fn=lambda m: m is head or isinstance(m, LlamaDecoderLayer))
    model = FSDP(model, auto_wrap_policy=policy, device_id=torch.device("cpu"))
    assert type(model.module.lm_head) is FSDP
    ids, labels = _tiny.batch(seed=30 + c.rank)
    runs = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        kw = {} if fused else {"skip_logits": False}
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **kw)
        assert (out.logits is None) == fused
        out.loss.backward()
        # each rank holds its shard of the flat parameters' reduced gradients: gather them whole
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        parts = [torch.zeros_like(g) for _ in range(c.world)]
        dist.all_gather(parts, g)
        runs.append((out.loss.detach(), torch.cat(parts)))
    close(runs[1][0], runs[0][0], F32, "loss")
    close(runs[1][1], runs[0][1], F32, "flat gradients")


@check
def ddp_no_sync_accumulation(c):
    """Two micro-batches, the first under no_sync(): the accumulated, all-reduced gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fusedce.integrations.transformers import _tiny

    model = DDP(_tiny_llama())
    batches = [_tiny.batch(seed=20 + 2 * c.rank + i) for i in range(2)]
    runs = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        losses = []
        for i, (ids, labels) in enumerate(batches):
            kw = {} if fused else {"skip_logits": False}
            ctx = model.no_sync() if i == 0 else _null()
            with ctx:
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **kw)
                assert (out.logits is None) == fused
                (out.loss / 2).backward()
            losses.append(out.loss.detach())
        runs.append((torch.stack(losses), grads(model.module)))
    close(runs[1][0], runs[0][0], F32, "losses")
    compare_grads(runs[0][1], runs[1][1], F32, "ddp")
    # the gradients were all-reduced: the same on every rank
    g = runs[1][1]["lm_head.weight"]
    other = [torch.zeros_like(g) for _ in range(c.world)]
    dist.all_gather(other, g)
    close(other[1 - c.rank], g, dict(rtol=0.0, atol=0.0), "all-reduced lm_head gradient")


def _trl_model(tied, family):
    import transformers

    transformers.logging.set_verbosity_error()
    common = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
                  initializer_range=0.2, tie_word_embeddings=tied)
    cfg = (transformers.Gemma2Config(head_dim=8, final_logit_softcapping=1.5, **common) if family == "gemma2"
           else transformers.LlamaConfig(**common))
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).double()


def _trl_data(rank):
    g = torch.Generator().manual_seed(50 + rank)
    B, T = (2, 9) if rank == 0 else (3, 6)  # uneven tokens per rank
    ids = torch.randint(4, 40, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels, torch.randn(B, T - 1, generator=g, dtype=torch.float64)


def _trl_objective(log_probs, entropy, mask, adv, n):
    # GRPO-like: per-token upstream gradients (the recomputing backward) and an entropy term
    return -(log_probs * adv).sum() / n + 0.1 * (entropy * mask).sum() / n


def _trl_truth(m, batches, temperature, n):
    """Every parameter's gradient of _trl_objective over all ranks' batches, from the
    materialized logits of the (float64) model m in one process."""
    total = 0
    for ids, lab, adv in batches:
        lsm = (m(input_ids=ids).logits[:, :-1] / temperature).log_softmax(-1)
        t = lab[:, 1:]
        mask = t != -100
        lp = lsm.gather(-1, t.clamp(min=0)[..., None])[..., 0] * mask
        total = total + _trl_objective(lp, -(lsm.exp() * lsm).sum(-1) * mask, mask, adv, n)
    total.backward()
    return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


@check
def trl_head_fsdp2_and_ddp(c):
    """fusedce's TRL fused head (fusedce.integrations.trl.add_fused_lm_head) under FSDP2 (root only,
    per-layer units, the head its own unit, a tied head grouped with the embedding) and DDP, uneven
    tokens per rank, a per-token objective: every parameter's reduced gradient equals the float64
    single-process truth on the materialized logits of every rank's batch. (TRL 1.16's own head
    takes full_tensor() of a head that is its own FSDP2 unit and misses the data-parallel reduction:
    its lm_head gradient is off by 0.3 on this case.)"""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fusedce.integrations.trl as ftrl

    temperature = 0.7
    tol = dict(rtol=1e-10, atol=1e-12)
    for family in ("llama", "gemma2"):
        for tied in (False, True):
            m = _trl_model(tied, family)
            batches = [_trl_data(r) for r in range(c.world)]
            n = float(sum((lab[:, 1:] != -100).sum() for _, lab, _ in batches))
            want = _trl_truth(m, batches, temperature, n)
            for layout in ("root", "layers", "tied-group" if tied else "head", "ddp"):
                what = f"{family} tied={tied} {layout}"
                m = _trl_model(tied, family)
                ftrl.add_fused_lm_head(m, temperature=temperature, outputs=("log_probs", "entropy"))
                if layout == "ddp":
                    wrapped = DDP(m)
                else:
                    if layout != "root":
                        for layer in m.model.layers:
                            fully_shard(layer, mesh=c.mesh)
                    if layout == "head":
                        fully_shard(m.lm_head, mesh=c.mesh)
                    if layout == "tied-group":
                        fully_shard([m.model.embed_tokens, m.lm_head], mesh=c.mesh)
                    wrapped = fully_shard(m, mesh=c.mesh)
                ids, lab, adv = batches[c.rank]
                out = wrapped(input_ids=ids, labels=lab, fused_lm_head=True)
                # x world: the data-parallel reduction averages, n counts every rank's tokens
                (_trl_objective(out.log_probs, out.entropy, out.label_mask, adv, n) * c.world).backward()
                compare_grads(want, grads(m), tol, what)


@check
def hf_tensor_parallel_head_refused_by_name(c):
    """A head made tensor-parallel by transformers (from_pretrained(tp_plan="auto"): its weight a
    Shard(0) DTensor that no data-parallel wrapper gathers, and output hooks that expect logits)
    is not folded by the patched forward: the error says so and names the way out
    (skip_logits=False runs the stock forward, which is then equal to the unpatched model's)."""
    import shutil
    import tempfile

    import transformers

    import fusedce.integrations.transformers as fhf
    from fusedce.integrations.transformers import _tiny

    transformers.logging.set_verbosity_error()
    # transformers reads the launcher's variables (torchrun sets them) to place the shards
    env = dict(RANK=str(c.rank), WORLD_SIZE=str(c.world), LOCAL_RANK=str(c.rank), LOCAL_WORLD_SIZE=str(c.world))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        # saved by rank 0 (save_pretrained writes on the main process only), loaded by every rank
        tmp = [tempfile.mkdtemp() if c.rank == 0 else None]
        dist.broadcast_object_list(tmp, src=0)
        if c.rank == 0:
            _tiny.tiny_model(transformers.LlamaForCausalLM).save_pretrained(tmp[0])
        dist.barrier()
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp[0], tp_plan="auto", device_mesh=c.mesh)
        dist.barrier()
        if c.rank == 0:
            shutil.rmtree(tmp[0])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    model.train()
    from torch.distributed.tensor import DTensor

    assert isinstance(model.lm_head.weight, DTensor)
    ids, labels = _tiny.batch(seed=5)  # the same tokens on both ranks (tensor parallelism)
    stock = model(input_ids=ids, labels=labels).loss
    fhf.apply(model)
    with pytest.raises(RuntimeError) as e:
        model(input_ids=ids, labels=labels)
    msg = str(e.value)
    assert "tensor-parallel" in msg and "skip_logits=False" in msg, msg
    assert "the transformers integration does so" not in msg, msg
    out = model(input_ids=ids, labels=labels, skip_logits=False)
    close(out.loss, stock, dict(rtol=0.0, atol=0.0), "stock forward after the refusal")


def _uneven_batches(rank):
    """Two micro-batches per rank, of different lengths and sizes on each rank; rank 1's second
    one has no label at all (it still joins the synchronising backward)."""
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for i, T in enumerate([(12, 9), (5, 14)][rank]):
        ids = torch.randint(4, 200, (2 if rank == 0 else 3, T), generator=g)
        labels = ids.clone()
        labels[0, : T // 2] = -100
        if rank == 1 and i == 1:
            labels[:] = -100
        out.append((ids, labels))
    return out


@check
def hf_uneven_tokens_num_items_accumulation(c):
    """The patched forward as the HF Trainer drives it with average_tokens_across_devices: uneven
    tokens per rank, num_items_in_batch = every rank's shifted labels counted (a float tensor, as
    the Trainer divides it), loss x world, gradient accumulation (DDP no_sync / FSDP2
    set_requires_gradient_sync(False)), an all-ignored micro-batch; tied and untied, the head in
    the root's unit or its own. Every parameter's reduced gradient equals the float64
    single-process gradient of sum(CE) / N over all micro-batches of all ranks."""
    import transformers
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fusedce.integrations.transformers as fhf
    from fusedce.integrations.transformers import _tiny

    transformers.logging.set_verbosity_error()
    tol = dict(rtol=1e-10, atol=1e-12)

    def model(tied):
        return _tiny.tiny_model(transformers.LlamaForCausalLM, seed=0, tie_word_embeddings=tied).double()

    mine = _uneven_batches(c.rank)
    n = sum(lab[..., 1:].ne(-100).sum() for _, lab in mine)
    dist.all_reduce(n)
    n = n / 1  # the Trainer divides by tp * cp * sp: a float tensor
    for tied in (False, True):
        m = model(tied)
        total = 0
        for ids, lab in [b for r in range(c.world) for b in _uneven_batches(r)]:
            logits = m(input_ids=ids).logits
            t = F.pad(lab, (0, 1), value=-100)[:, 1:]
            total = total + F.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="sum") / n
        total.backward()
        want = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
        for layout in ("ddp", "fsdp2", "fsdp2-head-unit"):
            m = model(tied)
            fhf.apply(m)
            if layout == "ddp":
                wrapped = DDP(m)
            else:
                for layer in m.model.layers:
                    fully_shard(layer, mesh=c.mesh)
                if layout == "fsdp2-head-unit":
                    fully_shard([m.model.embed_tokens, m.lm_head] if tied else m.lm_head, mesh=c.mesh)
                wrapped = fully_shard(m, mesh=c.mesh)
            for i, (ids, lab) in enumerate(mine):
                last = i == len(mine) - 1
                if layout == "ddp":
                    ctx = _null() if last else wrapped.no_sync()
                else:
                    wrapped.set_requires_gradient_sync(last)
                    ctx = _null()
                with ctx:
                    out = wrapped(input_ids=ids, attention_mask=torch.ones_like(ids), labels=lab,
                                  num_items_in_batch=n)
                    assert out.logits is None
                    (out.loss * c.world).backward()
            compare_grads(want, grads(m), tol, f"tied={tied} {layout}")


@check
def peft_modules_to_save_head_fsdp2(c):
    """A PEFT head in modules_to_save (ModulesToSaveWrapper, the trainable copy scaled so that the
    wrong head would show) under FSDP2: root only, per-layer units, and the wrapper its own unit
    (fully_shard renames its class FSDPModulesToSaveWrapper): loss and every gradient equal the
    stock forward's in the same layout."""
    import peft
    import transformers
    from torch.distributed.fsdp import fully_shard

    import fusedce.integrations.transformers as fhf
    from fusedce.integrations.transformers import _tiny

    transformers.logging.set_verbosity_error()
    ids, labels = _tiny.batch(seed=10 + c.rank)
    for layout in ("root", "layers", "head"):
        runs = []
        for fused in (False, True):
            lora = peft.get_peft_model(_tiny.tiny_model(transformers.LlamaForCausalLM), peft.LoraConfig(
                r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False))
            base = lora.get_base_model()
            with torch.no_grad():
                base.lm_head.modules_to_save["default"].weight.mul_(1.5)
            if fused:
                fhf.apply(lora)
            if layout != "root":
                for layer in base.model.layers:
                    fully_shard(layer, mesh=c.mesh)
            if layout == "head":
                fully_shard(base.lm_head, mesh=c.mesh)
            fully_shard(base, mesh=c.mesh)
            out = lora(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
            assert (out.logits is None) == fused
            out.loss.backward()
            runs.append((out.loss.detach(), grads(lora)))
        (l0, g0), (l1, g1) = runs
        close(l1, l0, F32, f"{layout}: loss")
        compare_grads(g0, g1, F32, layout)
        assert "base_model.model.lm_head.modules_to_save.default.weight" in g1


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------
# The public API with an FSDP2-sharded nn.Linear head
# ---------------------------------------------------------------------------------------------

H, V, N = 8, 19, 12


def _head_model(c, reshard=True):
    """body (Linear H->H) and head (Linear H->V with bias), each its own FSDP2 unit, under a root."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)  # the same full parameters on every rank before sharding
    root = torch.nn.Module()
    root.body = torch.nn.Linear(H, H)
    root.head = torch.nn.Linear(H, V)
    fully_shard(root.body, mesh=c.mesh, reshard_after_forward=False)  # the backward gathers only the head's
    fully_shard(root.head, mesh=c.mesh, reshard_after_forward=reshard)
    fully_shard(root, mesh=c.mesh)
    return root


def _data(c):
    g = torch.Generator().manual_seed(100 + c.rank)
    x = torch.randn(N, H, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    t[::5] = -100
    up = torch.rand(N, generator=g)  # a per-token upstream gradient
    return x, t, up


def _run_head(root, x, stock, fused):
    root.zero_grad(set_to_none=True)
    h = root.body(x)
    if fused is None:
        out = stock(root.head(h))
    else:
        out = fused(root.head, h)
    return out


@check
def public_head_loss_fsdp2(c):
    """fusedce.integrations.head_loss on an FSDP2-sharded head: mean (the gradient from the
    forward) and per-token losses (the recomputing backward) equal F.cross_entropy on head(h);
    with reshard_after_forward=True the head is resharded after the forward and gathered again
    before its recomputing backward."""
    import fusedce
    from collectives import CollectiveCounter
    from fusedce.integrations import head_loss
    from torch.distributed.tensor import DTensor

    x, t, up = _data(c)
    cases = {
        "mean": (lambda z: F.cross_entropy(z, t, label_smoothing=0.1),
                 lambda m, h: head_loss(m, h, t, label_smoothing=0.1), None),
        "none": (lambda z: F.cross_entropy(z, t, reduction="none"),
                 lambda m, h: head_loss(m, h, t, reduction="none"), up),
        "token_logprobs": (lambda z: torch.log_softmax(z, -1).gather(-1, t.clamp(min=0)[:, None])[:, 0] * (t >= 0),
                           lambda m, h: head_loss(m, h, t, function=fusedce.token_logprobs), up),
    }
    for reshard in (True, False):
        root = _head_model(c, reshard)
        for name, (stock, fused, weights) in cases.items():
            res = []
            for which in (None, fused):
                with CollectiveCounter() as cc:
                    out = _run_head(root, x, stock, which)
                    if reshard and which is not None:
                        # resharded after the forward: the module holds its DTensor shard again
                        assert isinstance(root.head.weight, DTensor), type(root.head.weight)
                    cc.take()
                    (out if weights is None else (out * weights).sum()).backward()
                    gathers = sum(n.startswith("all_gather") for n in cc.take())
                res.append((out.detach(), grads(root), gathers))
            (o0, g0, n0), (o1, g1, n1) = res
            what = f"{name} reshard={reshard}"
            close(o1, o0, F32, what)
            compare_grads(g0, g1, F32, what)
            assert n1 == n0, f"{what}: {n1} all-gathers in backward, stock {n0}"
            assert n1 == (1 if reshard else 0), f"{what}: {n1} all-gathers of the head in backward"


@check
def dtensor_weight_needs_process_group(c):
    """A DTensor weight (FSDP2's Shard(0) over the data-parallel mesh) given to a public function
    without process_group is refused with an error naming the argument and the way out; its
    full_tensor() gives the loss of the full weight. With process_group= a Shard(0) DTensor is a
    vocabulary shard."""
    import fusedce

    root = _head_model(c)
    x, t, _ = _data(c)
    h = root.body(x).detach()
    w, b = root.head.weight, root.head.bias
    calls = {
        "linear_cross_entropy": (lambda: fusedce.linear_cross_entropy(h, w, t), "linear_weight"),
        "linear_cross_entropy bias": (lambda: fusedce.linear_cross_entropy(h, w.full_tensor(), t, linear_bias=b),
                                      "linear_bias"),
        "token_logprobs": (lambda: fusedce.token_logprobs(h, w, t), "linear_weight"),
        "distillation_loss": (lambda: fusedce.distillation_loss(h, w.full_tensor(), t, teacher_input=h,
                                                                teacher_weight=w), "teacher_weight"),
        "policy_loss": (lambda: fusedce.policy_loss(h[None], w, t.clamp(min=0)[None], None, torch.ones(1)),
                        "linear_weight"),
        "cross_entropy": (lambda: fusedce.cross_entropy(w, t[:V]), "input"),
    }
    for name, (fn, arg) in calls.items():
        with pytest.raises(ValueError) as e:
            fn()
        msg = str(e.value)
        assert f"{arg} is a DTensor" in msg and "process_group" in msg and "head_loss" in msg, (name, msg)
    wf, bf = w.full_tensor().detach(), b.full_tensor().detach()
    close(fusedce.linear_cross_entropy(h, wf, t, linear_bias=bf), F.cross_entropy(h @ wf.T + bf, t), F32,
          "full_tensor() weight")
    # with process_group= the same kind of DTensor is a vocabulary shard (tensor parallelism):
    # input and target the same on every rank, the gradient back to the DTensor
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(5)  # the same on every rank
    xs, W = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    ts = torch.randint(0, V, (N,), generator=g)
    Wd = torch.nn.Parameter(distribute_tensor(W, c.mesh, [Shard(0)]))
    loss = fusedce.linear_cross_entropy(xs, Wd, ts, process_group=c.mesh.get_group())
    loss.backward()
    Wr = W.clone().requires_grad_()
    ref = F.cross_entropy(xs @ Wr.T, ts)
    ref.backward()
    close(loss, ref, F32, "vocab-parallel DTensor loss")
    close(Wd.grad.full_tensor(), Wr.grad, F32, "vocab-parallel DTensor weight grad")


def _plain_head():
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, H, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    t[::4] = -100
    return head, x, t


@pytest.mark.parametrize("replaced_linear", [False, True], ids=["builtin-F.linear", "replaced-F.linear"])
def test_head_loss_single_process(monkeypatch, replaced_linear):
    """head_loss equals F.cross_entropy(head(x)) (value and gradients), also when a library has
    replaced F.linear by a Python function (as DeepSpeed ZeRO-3 does); the override is per thread:
    another thread calling the head meanwhile gets its logits."""
    import threading

    from fusedce.integrations import head_loss
    from fusedce.integrations._head import call_head

    if replaced_linear:
        builtin = torch.nn.functional.linear
        monkeypatch.setattr(torch.nn.functional, "linear", lambda i, w, b=None: builtin(i, w, b))
    head, x, t = _plain_head()
    for kw in (dict(), dict(reduction="sum", label_smoothing=0.2), dict(reduction="none")):
        xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        head.zero_grad(set_to_none=True)
        loss = head_loss(head, xs, t, **kw)
        up = torch.linspace(0.5, 1.5, N) if kw.get("reduction") == "none" else torch.tensor(1.0)
        (loss * up).sum().backward()
        g1 = (xs.grad, head.weight.grad.clone(), head.bias.grad.clone())
        head.zero_grad(set_to_none=True)
        ref = F.cross_entropy(head(xr), t, **kw)
        (ref * up).sum().backward()
        close(loss, ref, F32, f"{kw} loss")
        for a, b, n in zip(g1, (xr.grad, head.weight.grad, head.bias.grad), ("input", "weight", "bias")):
            close(a, b, F32, f"{kw} grad {n}")

    seen = {}

    def other_thread():
        seen["out"] = head(x)  # no override in this thread: the logits

    def compute(xx, w, b):
        th = threading.Thread(target=other_thread)
        th.start()
        th.join()
        return torch.zeros(())

    with torch.no_grad():
        out = call_head(head, x, compute)
        assert out.shape == () and seen["out"].shape == (N, V)
        close(seen["out"], head(x), dict(rtol=0.0, atol=0.0), "the other thread's logits")


def test_head_loss_autocast_and_errors():
    """Under CPU autocast the operands are cast as F.linear casts them (bf16); a head whose
    forward never calls F.linear with its weight, a non-module head and a linear_bias argument are
    refused."""
    import fusedce
    from fusedce.integrations import head_loss

    head, x, t = _plain_head()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head_loss(head, x, t)
    expect = fusedce.linear_cross_entropy(x.bfloat16(), head.weight.bfloat16(), t,
                                          linear_bias=head.bias.bfloat16())
    close(loss, expect, dict(rtol=0.0, atol=0.0), "autocast bf16")

    class NotLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(V, H))

        def forward(self, x):
            return x @ self.weight.T

    with pytest.raises(RuntimeError, match="did not reach torch.nn.functional.linear"):
        head_loss(NotLinear(), x, t)
    with pytest.raises(TypeError, match="head must be a torch.nn.Module"):
        head_loss(head.weight, x, t)
    with pytest.raises(TypeError, match="linear_bias"):
        head_loss(head, x, t, linear_bias=head.bias)


def test_accelerate_cpu_offload_hooks():
    """accelerate's cpu_offload keeps the weights on the meta device and loads them in each
    module's pre-forward hook: the fused loss, computed inside the head's call, sees them loaded
    (the same loss as the model before offloading)."""
    pytest.importorskip("transformers")
    accelerate = pytest.importorskip("accelerate")
    from fusedce.integrations.transformers import _tiny

    model = _tiny_llama()
    ids, labels = _tiny.batch()
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    with torch.no_grad():
        stock = model(**kw, skip_logits=False).loss
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        assert model.lm_head.weight.device.type == "meta"
        out = model(**kw)
    assert out.logits is None
    close(out.loss, stock, F32, "loss under cpu_offload")


# ---------------------------------------------------------------------------------------------
# The spawned group
# ---------------------------------------------------------------------------------------------


class Ctx:
    def __init__(self, rank, world):
        from torch.distributed.device_mesh import init_device_mesh

        self.rank, self.world = rank, world
        self.mesh = init_device_mesh("cpu", (world,))


def _worker(rank, world, init_file, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    run_rank(CHECKS, Ctx(rank, world), rank, result_dir)


@pytest.fixture(scope="module")
def group_results():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo is not available")
    pytest.importorskip("transformers")
    return run_checks(_worker, (WORLD,), WORLD, CHECKS)


@pytest.mark.parametrize("name", list(CHECKS))
def test_fsdp(group_results, name):
    failures = {r: m for r, m in group_results[name].items() if m != "ok"}
    assert not failures, "\n".join(f"rank {r}:\n{m}" for r, m in failures.items())
