"""fusedce.integrations.trl with TRL's real trainers on the CPU: SFTTrainer, DPOTrainer and
GRPOTrainer (generation by transformers, a Python reward) run a few steps on tiny models built from
configs (a word-level tokenizer built here, nothing from the hub), once with TRL's own fused head
and once with fusedce's; the logged losses and metrics and the parameters after the steps must be
equal within float32 tolerance. Several TRL loss types share one run where TRL allows it: DPO takes
a list of loss types, and the GRPO/SFT runs switch ``loss_type`` (and the importance-sampling
level) between steps from a callback, which TRL reads at every step."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
from packaging.version import Version  # noqa: E402

if Version(trl.__version__) < Version("1.16.0"):
    pytest.skip("TRL's fused LM head (add_fused_lm_head) needs trl >= 1.16", allow_module_level=True)

import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import fusedce.integrations.trl as ftrl  # noqa: E402
from fusedce import reference  # noqa: E402
import fusedce.integrations.transformers as fhf  # noqa: E402

WORDS = ("the a cat dog sat ran on mat red blue big small fast slow up down and or not is was "
         "he she it we they saw had has").split()
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
TIMING = ("runtime", "per_second", "step_time")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def _config(family):
    common = dict(vocab_size=len(SPECIAL) + len(WORDS) + 3,  # a few never-seen classes
                  hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    if family == "llama":
        return transformers.LlamaConfig(tie_word_embeddings=False, **common)
    if family == "gemma2":  # final_logit_softcapping, tied head
        return transformers.Gemma2Config(head_dim=8, final_logit_softcapping=1.5, **common)
    if family == "cohere":  # logit_scale, tied head
        return transformers.CohereConfig(logit_scale=0.5, **common)
    if family == "mixtral":  # MoE: the router's load-balancing loss joins the loss
        return transformers.MixtralConfig(num_local_experts=2, num_experts_per_tok=1,
                                          output_router_logits=True, router_aux_loss_coef=0.1,
                                          **common)
    raise ValueError(family)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """family -> a saved tiny model (TRL builds its reference models from a path)."""
    cache = {}

    def get(family):
        if family not in cache:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(_config(family))
            path = tmp_path_factory.mktemp(family)
            model.save_pretrained(path)
            _tokenizer().save_pretrained(path)
            cache[family] = str(path)
        return cache[family]

    return get


def _texts(n, seed, lo=3, hi=9):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


class _Schedule(TrainerCallback):
    """Sets trainer attributes (or args) before each step: several loss types in one run."""

    def __init__(self, steps, target):
        self.steps, self.target = steps, target

    def on_step_begin(self, args, state, control, **kwargs):
        for obj, name, value in self.steps[state.global_step]:
            setattr(self.target() if obj == "trainer" else args, name, value)


def _common_args(tmp_path, steps, device="cpu"):
    return dict(output_dir=str(tmp_path), max_steps=steps, logging_steps=1, report_to="none",
                save_strategy="no", use_cpu=device == "cpu", optim="sgd", learning_rate=0.5,
                lr_scheduler_type="constant", disable_tqdm=True, seed=0,
                dataloader_num_workers=0,
                # float32: TRL's configs default to bf16 autocast, under which TRL's head rounds
                # each logits tile to bf16 and fusedce's does not (test_fused_forward_autocast
                # judges both against float64 there); in float32 the two must agree tightly.
                bf16=False, fp16=False)


def _run(fused, make_trainer, schedule=None):
    """Builds a trainer (fusedce installed or not), trains; returns (log history, parameters, the
    trainer's model)."""
    if fused:
        ftrl.install()
    try:
        trainer = make_trainer()
    finally:
        if fused:
            ftrl.uninstall()  # the trainer keeps the head it was built with
    base = trainer.model
    assert ftrl.is_trl_fused_forward(base.forward)  # TRL's or fusedce's fused head is on
    assert getattr(base.forward.__func__, "_fusedce_trl", False) == fused
    if schedule is not None:
        trainer.add_callback(_Schedule(schedule, lambda: trainer))
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    params = {n: p.detach().clone() for n, p in base.named_parameters()}
    moved = sum(float((params[n] - before[n]).abs().max()) for n in params)
    assert moved > 1e-3, "the steps did not train the model (the comparison would be empty)"
    return trainer.state.log_history, params


def _tol(device):
    """float32 on both sides; on CUDA TRL's Triton kernel and fusedce's differ in exp and
    reduction order at float32 rounding, which a few SGD steps carry into the metrics."""
    return dict(rel=2e-4, abs_=2e-5) if device == "cpu" else dict(rel=2e-3, abs_=2e-4)


def _compare(stock, fused, rel=2e-4, abs_=2e-5):
    (logs_s, params_s), (logs_f, params_f) = stock, fused
    assert len(logs_s) == len(logs_f)
    compared = 0
    for step, (a, b) in enumerate(zip(logs_s, logs_f)):
        assert a.keys() == b.keys(), (step, set(a) ^ set(b))
        for k, v in a.items():
            if any(t in k for t in TIMING) or not isinstance(v, (int, float)):
                continue
            assert b[k] == pytest.approx(v, rel=rel, abs=abs_), f"step {step}: {k}: fusedce {b[k]} vs TRL {v}"
            compared += 1
    assert compared > 0
    for n, p in params_s.items():
        torch.testing.assert_close(params_f[n], p, rtol=rel, atol=abs_, msg=lambda m: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma2", "cohere", "mixtral"])
def test_sft(model_dir, tmp_path, family, device):
    from trl import SFTConfig, SFTTrainer

    path = model_dir(family)
    data = Dataset.from_dict({"text": _texts(8, 1)})
    # nll then DFT (which weights each token by its detached probability)
    schedule = [[("args", "loss_type", "nll")], [("args", "loss_type", "dft")]]

    def make():
        args = SFTConfig(**_common_args(tmp_path, 2, device), per_device_train_batch_size=2, max_length=16)
        return SFTTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(path), args=args,
                          train_dataset=data, processing_class=_tokenizer())

    stock = _run(False, make, schedule)
    fused = _run(True, make, schedule)
    assert "mean_token_accuracy" in stock[0][0] and "entropy" in stock[0][0]
    _compare(stock, fused, **_tol(device))


# ---------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type,weighting", [
    (["sigmoid", "ipo", "hinge"], False),  # loss types in one run; logits/* (mean_logits), accuracy (is_top1)
    (["apo_zero"], True),  # WPO weighting: reads log_sum_sq_probs (TRL 1.16 fails hinge + weighting: in-place on relu)
])
def test_dpo(model_dir, tmp_path, loss_type, weighting, device):
    from trl import DPOConfig, DPOTrainer

    path = model_dir("llama")
    prompts = _texts(8, 2, 2, 4)
    data = Dataset.from_dict({"prompt": prompts, "chosen": _texts(8, 3, 2, 5),
                              "rejected": _texts(8, 4, 2, 5)})

    def make():
        args = DPOConfig(**_common_args(tmp_path, 2, device), per_device_train_batch_size=2, max_length=16,
                         loss_type=loss_type, use_weighting=weighting, beta=0.5)
        return DPOTrainer(model=path, args=args, train_dataset=data, processing_class=_tokenizer())

    stock = _run(False, make)
    fused = _run(True, make)
    keys = stock[0][0]
    assert any(k.startswith("logits/") for k in keys) and any("accuracy" in k for k in keys), keys
    _compare(stock, fused, **_tol(device))


# ---------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------


def _reward(completions, **kwargs):
    return [float(len(c.split()) % 3) + 0.1 * len(c) + 0.01 * sum(map(ord, c)) % 1.0 for c in completions]


# Every TRL 1.16 loss type, one per step; sequence-level importance sampling (GSPO) for the last
# two. With num_iterations=2 the odd steps reuse the batch with a moved policy (ratios != 1): the
# clipped and reweighted objectives (grpo, cispo, vespo, GSPO) sit there.
GRPO_STEPS = [("dr_grpo", "token"), ("grpo", "token"), ("bnpo", "token"), ("cispo", "token"),
              ("sapo", "token"), ("vespo", "token"), ("dapo", "token"), ("grpo", "sequence"),
              ("luspo", "sequence")]


def test_grpo(model_dir, tmp_path, device):
    from trl import GRPOConfig, GRPOTrainer

    path = model_dir("llama")
    data = Dataset.from_dict({"prompt": _texts(32, 5, 2, 5)})
    schedule = [[("trainer", "loss_type", lt), ("trainer", "importance_sampling_level", lvl)]
                for lt, lvl in GRPO_STEPS]

    def make():
        # num_iterations=2: every other step reuses the batch with a moved policy (ratios != 1,
        # clipping active); beta > 0: a reference model (also on the fused head) and the KL term;
        # temperature != 1: the log-probs are those of the sampling distribution.
        args = GRPOConfig(**_common_args(tmp_path, len(GRPO_STEPS), device), per_device_train_batch_size=4,
                          num_generations=2, max_completion_length=5, num_iterations=2,
                          temperature=0.9, beta=0.04, epsilon=0.1)
        return GRPOTrainer(model=path, args=args, reward_funcs=_reward, train_dataset=data,
                           processing_class=_tokenizer())

    stock = _run(False, make, schedule)
    fused = _run(True, make, schedule)
    logs = stock[0]
    assert any(r.get("clip_ratio/region_mean", 0) > 0 for r in logs), "no step clipped: a weak test"
    assert any(r.get("kl", 0) > 0 for r in logs)
    _compare(stock, fused, **_tol(device))


# ---------------------------------------------------------------------------------------------
# The fused forward itself, install / uninstall, composition with the transformers integration
# ---------------------------------------------------------------------------------------------


def _tiny(family="llama"):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(_config(family))


@pytest.mark.parametrize("family", ["llama", "gemma2", "cohere", "mixtral"])
@pytest.mark.parametrize("shifted", [False, True])
def test_fused_forward_fields(device, family, shifted):
    """Every FusedCausalLMOutput field, each extra output requested, temperature, shift_labels and
    num_items_in_batch, against TRL's own head on the same model (values and gradients). On CUDA
    TRL's head is its Triton kernel on the label positions only."""
    from trl.trainer.utils import add_fused_lm_head as trl_head

    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    ids = torch.randint(4, len(SPECIAL) + len(WORDS), (3, 9), device=device)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 6:] = -100
    kw = dict(num_items_in_batch=torch.tensor(11, device=device))
    if shifted:
        kw["shift_labels"] = torch.cat([labels[:, 1:], torch.full((3, 1), -100, device=device)], dim=1)
    else:
        kw["labels"] = labels
    # fp32 on both; on CUDA the kernels' exp / reduction orders differ at float32 rounding
    tol = dict(rtol=1e-5, atol=1e-6) if device == "cpu" else dict(rtol=1e-4, atol=1e-5)
    results = []
    for head in (trl_head, ftrl.add_fused_lm_head):
        model = _tiny(family).to(device)
        head(model, temperature=0.8, outputs=outputs)
        out = model(input_ids=ids, fused_lm_head=True, **kw)
        (out.loss + out.entropy.sum() * 0.3).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, ga), (b, gb) = results
    for field in ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "aux_loss"):
        x, y = getattr(a, field), getattr(b, field)
        if x is None:
            assert y is None and field == "aux_loss" and family != "mixtral"
            continue
        torch.testing.assert_close(y.float(), x.float(), **tol, msg=lambda m: f"{field}: {m}")
    assert torch.equal(a.is_top1, b.is_top1) and torch.equal(a.label_mask, b.label_mask)
    assert b.log_sum_sq_probs.requires_grad is False and b.mean_logits.requires_grad is False
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=10 * tol["rtol"], atol=tol["atol"],
                                   msg=lambda m: f"grad {n}: {m}")
    # Not requested: None, as TRL
    model = _tiny().to(device)
    ftrl.add_fused_lm_head(model)
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert out.entropy is None and out.is_top1 is None and out.mean_logits is None
    # Without fused_lm_head the model's own forward runs (generation): logits
    assert model(input_ids=ids).logits.shape == (3, 9, model.config.vocab_size)


def test_fused_forward_autocast_and_fp32_head():
    """Under CPU autocast (bf16) the head's operands are cast to bf16 as F.linear casts them; TRL's
    head also rounds each logits tile to bf16, fusedce's keeps them in float32: against the float64
    truth on the same bf16 operands fusedce's error is no worse than TRL's. cast_lm_head_to_fp32
    runs the head in float32 outside autocast: equal to TRL's."""
    from trl.trainer.utils import add_fused_lm_head as trl_head

    ids = torch.randint(4, 30, (2, 7))
    for cast in (False, True):
        outs = []
        for head in (trl_head, ftrl.add_fused_lm_head):
            model = _tiny()
            head(model, cast_lm_head_to_fp32=cast, outputs=("log_probs", "entropy"))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs.append(model(input_ids=ids, labels=ids, fused_lm_head=True))
        a, b = outs
        if cast:
            torch.testing.assert_close(b.log_probs, a.log_probs, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(b.entropy, a.entropy, rtol=1e-5, atol=1e-5)
            continue
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            h = model.model(input_ids=ids).last_hidden_state[:, :-1]
        logits = h.to(torch.bfloat16).double() @ model.lm_head.weight.to(torch.bfloat16).double().T
        truth = reference.token_statistics(logits, ids[:, 1:])
        for field, key in (("log_probs", "logprobs"), ("entropy", "entropy")):
            err_f = float((getattr(b, field).double() - truth[key]).abs().max())
            err_t = float((getattr(a, field).double() - truth[key]).abs().max())
            assert err_f <= 1.1 * err_t + 1e-5, (field, err_f, err_t)


def test_fused_head_runs_through_the_head_call():
    """The head's forward hooks see the fused call (what FSDP/ZeRO-3 gather through), and the
    all-masked batch still has a (zero) gradient, as TRL's."""
    model = _tiny()
    ftrl.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    calls = []
    model.lm_head.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    model.lm_head.register_forward_hook(lambda m, args, out: calls.append("post"))
    ids = torch.randint(4, 30, (2, 6))
    out = model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert calls == ["pre", "post"]
    out.loss.backward()
    assert model.lm_head.weight.grad is not None
    model.zero_grad()
    out = model(input_ids=ids, labels=torch.full_like(ids, -100), fused_lm_head=True)
    assert float(out.loss.detach()) == 0.0 and not out.label_mask.any()
    out.loss.backward()
    assert float(model.lm_head.weight.grad.abs().sum()) == 0.0


def test_install_uninstall():
    import trl.trainer.dpo_trainer as dpo_mod
    import trl.trainer.grpo_trainer as grpo_mod
    import trl.trainer.utils as utils

    original = utils.add_fused_lm_head
    assert not getattr(original, "_fusedce_trl", False)
    ftrl.install()
    try:
        assert ftrl.installed()
        for m in (utils, grpo_mod, dpo_mod):
            assert m.add_fused_lm_head is ftrl.add_fused_lm_head
        ftrl.install()  # idempotent
        assert utils.add_fused_lm_head is ftrl.add_fused_lm_head
    finally:
        ftrl.uninstall()
    assert not ftrl.installed()
    for m in (utils, grpo_mod, dpo_mod):
        assert m.add_fused_lm_head is original


def test_environment_switch():
    """FUSEDCE_PATCH_TRL=1: `import fusedce` patches TRL when TRL is imported (not before)."""
    import os
    import subprocess
    import sys

    code = ("import sys, fusedce; assert 'trl' not in sys.modules; "
            "import trl.trainer.utils as u, trl.trainer.sft_trainer as s; "
            "assert getattr(u.add_fused_lm_head, '_fusedce_trl', False); "
            "assert s.add_fused_lm_head is u.add_fused_lm_head; print('ok')")
    env = dict(os.environ, FUSEDCE_PATCH_TRL="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_transformers_apply_after_trl_head_is_refused():
    """transformers.apply() on a model whose forward TRL already replaced would drop TRL's fused
    head ('CausalLMOutputWithPast' has no 'log_probs'): a ValueError naming the fix instead. Applied
    before the head is added it composes: the fused path is fusedce's, generation the model's."""
    from trl.trainer.utils import add_fused_lm_head as trl_head

    for head in (trl_head, ftrl.add_fused_lm_head):
        model = _tiny()
        head(model)
        with pytest.raises(ValueError, match="fusedce.integrations.trl.install"):
            fhf.apply(model)
    model = fhf.apply(_tiny())
    ftrl.add_fused_lm_head(model, outputs=("log_probs",))
    ids = torch.randint(4, 30, (2, 6))
    out = model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert out.log_probs.shape == (2, 5) and math.isfinite(float(out.loss))
    model.train()
    plain = model(input_ids=ids, labels=ids)  # the transformers integration's fused CE
    assert plain.logits is None
    torch.testing.assert_close(plain.loss, out.loss, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# FSDP2: fusedce's head inside the head module's call, against TRL's on the same sharded model
# ---------------------------------------------------------------------------------------------


def _full(g):
    from torch.distributed.tensor import DTensor

    return g.full_tensor() if isinstance(g, DTensor) else g


def _fsdp_worker(rank, world, init_file, result_dir):
    import datetime
    import os
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    msg = "ok"
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from trl.trainer.utils import add_fused_lm_head as trl_head

        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(10 + rank)  # different tokens on each rank
        ids = torch.randint(4, 30, (2, 7))
        labels = ids.clone()
        labels[:, :3] = -100
        def step(head, layout):
            model = _tiny()
            head(model, temperature=0.8, outputs=("log_probs", "entropy"))
            if layout == "head":  # the head its own unit: its weight is a shard outside its call
                for layer in model.model.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(model.lm_head, mesh=mesh)
            fully_shard(model, mesh=mesh, reshard_after_forward=True)
            out = model(input_ids=ids, labels=labels, fused_lm_head=True)
            # a per-token upstream gradient (entropy): fusedce's recomputing backward runs after
            # FSDP resharded the head, and must find it gathered again
            (out.loss + 0.1 * out.entropy.sum()).backward()
            return out.loss.detach(), {n: _full(p.grad).detach().clone()
                                       for n, p in model.named_parameters() if p.grad is not None}

        # The reference: TRL's head with the whole model one FSDP unit (its parameters are
        # gathered for the root's forward and its gradients reduced by FSDP like every other).
        l0, g0 = step(trl_head, "root")
        for layout in ("root", "head"):
            l1, g1 = step(ftrl.add_fused_lm_head, layout)
            torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6, msg=lambda m: f"{layout} loss: {m}")
            assert g0 and g0.keys() == g1.keys(), (layout, set(g0) ^ set(g1))
            for n in g0:
                torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"{layout} grad {n}: {m}")
        # A tensor-parallel head (vocabulary-sharded DTensor weight, gathered output): fusedce's
        # head takes the whole weight beside the call, as TRL's does; gradients reach the shards.
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        def tp_step(head):
            model = _tiny()
            head(model, temperature=0.8, outputs=("log_probs", "entropy"))
            parallelize_module(model.lm_head, mesh, ColwiseParallel(use_local_output=True))
            out = model(input_ids=ids, labels=labels, fused_lm_head=True)
            (out.loss + 0.1 * out.entropy.sum()).backward()
            return out.loss.detach(), {n: _full(p.grad).detach().clone()
                                       for n, p in model.named_parameters() if p.grad is not None}

        (l0, g0), (l1, g1) = tp_step(trl_head), tp_step(ftrl.add_fused_lm_head)
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6, msg=lambda m: f"tp loss: {m}")
        assert g0 and g0.keys() == g1.keys(), set(g0) ^ set(g1)
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"tp grad {n}: {m}")
    except Exception:  # noqa: BLE001 - reported to the test
        msg = traceback.format_exc()
    finally:
        with open(os.path.join(result_dir, f"rank{rank}"), "w") as f:
            f.write(msg)
        dist.destroy_process_group()


def test_fsdp2_fused_head():
    """FSDP2 on 2 gloo ranks: fusedce's head with the model as one unit and with the head as its
    own unit (resharded after forward, so its weight is a shard outside its call and is gathered
    again for the recomputing backward) equals TRL's head on the one-unit model: the loss of each
    rank and every gradient after FSDP's reduction."""
    import os
    import tempfile

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo is not available")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_fsdp_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        msgs = {r: open(os.path.join(tmp, f"rank{r}")).read() for r in range(2)}
    failures = {r: m for r, m in msgs.items() if m != "ok"}
    assert not failures, "\n".join(f"rank {r}:\n{m}" for r, m in failures.items())


def test_lora_on_the_head_is_refused_by_name():
    peft = pytest.importorskip("peft")
    model = _tiny()
    ftrl.add_fused_lm_head(model)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    ids = torch.randint(4, 30, (2, 6))
    with pytest.raises(ValueError, match="adapter on the head"):
        peft_model(input_ids=ids, labels=ids, fused_lm_head=True)
    # a LoRA on the body only: fine, and its adapter weights get gradients
    model = _tiny()
    ftrl.add_fused_lm_head(model)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    out = peft_model(input_ids=ids, labels=ids, fused_lm_head=True)
    out.loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0
               for n, p in peft_model.named_parameters() if "lora_" in n)
