"""fusedce in Hugging Face transformers: focused tests of the patched forward (tiny random-init
models, fp32, CPU; no download). Every comparison is against the same model's stock forward: the
loss and the gradient of every parameter (fusedce.integrations.transformers._tiny.compare)."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fusedce.integrations.transformers as fhf  # noqa: E402
from fusedce.integrations.transformers import _tiny  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
transformers.logging.set_verbosity_error()


def _both(cls, ids=None, labels=None, model=None, **overrides):
    """(stock run, patched run, model): the same tiny model through the stock and the patched forward."""
    model = model if model is not None else _tiny.tiny_model(cls, **overrides)
    fwd = fhf.analyse_class(cls)
    assert fwd is not None, fhf.audit()["refused"].get(fhf._key(cls))
    if ids is None:
        ids, labels = _tiny.batch()
    return _tiny.run(model, fwd._fusedce_original, ids, labels), _tiny.run(model, fwd, ids, labels), model


def _assert_same(cls, **kw):
    stock, fused, model = _both(cls, **kw)
    assert fused[2].logits is None, "the fused path must not return logits"
    assert _tiny.compare(stock, fused) is None, _tiny.compare(stock, fused)
    return stock, fused, model


# Head transforms at non-default values: each value is folded into the fused op (softcap or
# logit_scale); a default value (1, or a softcap of 30 on tiny logits) would not show a wrong fold.
TRANSFORMS = [
    ("Gemma2ForCausalLM", {"final_logit_softcapping": 0.5}, ["softcap"]),  # tanh saturates at 0.5
    ("CohereForCausalLM", {"logit_scale": 0.25}, ["scale"]),  # logits * logit_scale
    ("GraniteForCausalLM", {"logits_scaling": 4.0}, ["scale"]),  # logits / logits_scaling
    ("FalconH1ForCausalLM", {"lm_head_multiplier": 3.0}, ["scale"]),  # logits * lm_head_multiplier
    ("MiniCPM3ForCausalLM", {"dim_model_base": 8}, []),  # hidden / (hidden_size / dim_model_base) = hidden / 4
    ("Gemma3ForCausalLM", {"final_logit_softcapping": 0.5}, ["softcap"]),
]


@pytest.mark.parametrize("name,overrides,transforms", TRANSFORMS, ids=[t[0] for t in TRANSFORMS])
def test_head_transform_folded(name, overrides, transforms):
    cls = getattr(transformers, name)
    stock, _, _ = _assert_same(cls, **overrides)
    assert fhf.audit()["patched"][fhf._key(cls)]["transforms"] == transforms
    # the value matters: the default-config loss differs, so the comparison above is not vacuous
    default, _, _ = _both(cls)
    assert abs(default[0].item() - stock[0].item()) > 1e-4


# Heads with a bias (Phi, GPT-J): the bias goes to the op; Phi's bias is zero-initialised, so it is
# randomised first (a zero bias would not show a missing one).
@pytest.mark.parametrize("name", ["PhiForCausalLM", "GPTJForCausalLM"])
def test_head_with_bias(name):
    cls = getattr(transformers, name)
    model = _tiny.tiny_model(cls)
    assert model.lm_head.bias is not None
    with torch.no_grad():
        model.lm_head.bias.normal_()
    _, fused, _ = _assert_same(cls, model=model)
    assert fused[1]["lm_head.bias"].abs().max() > 0


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tied_and_untied_head(tied):
    cls = transformers.LlamaForCausalLM
    model = _tiny.tiny_model(cls, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    _assert_same(cls, model=model)


def test_shift_labels():
    # shift_labels (context parallelism, TRL) replace the shift: token t is scored against shift_labels[t]
    ids, labels = _tiny.batch()
    shift = torch.roll(labels, -1, 1)
    shift[:, -1] = -100
    shift[1, 5] = -100
    cls = transformers.Qwen2ForCausalLM
    model = _tiny.tiny_model(cls)
    fwd = fhf.analyse_class(cls)
    stock = _tiny.run(model, fwd._fusedce_original, ids, labels, shift_labels=shift)
    fused = _tiny.run(model, fwd, ids, labels, shift_labels=shift)
    assert _tiny.compare(stock, fused) is None
    plain = _tiny.run(model, fwd, ids, labels)  # shift_labels differ from the shifted labels at [1, 5]
    assert abs(plain[0].item() - fused[0].item()) > 1e-6


def test_flat_labels():
    # ForCausalLMLoss shifts the labels along their own last dimension and pairs them with the
    # flattened logits: labels given flat [B*T] make the last token of one row score the first
    # label of the next. The fused path must pair them the same way, not per row of input_ids.
    ids, labels = _tiny.batch()
    labels = labels.reshape(-1)
    cls = transformers.LlamaForCausalLM
    model = _tiny.tiny_model(cls)
    fwd = fhf.analyse_class(cls)
    stock = _tiny.run(model, fwd._fusedce_original, ids, labels)
    fused = _tiny.run(model, fwd, ids, labels)
    assert _tiny.compare(stock, fused) is None, _tiny.compare(stock, fused)
    per_row = _tiny.run(model, fwd, ids, labels.reshape(ids.shape))
    assert abs(per_row[0].item() - stock[0].item()) > 1e-6  # the two pairings differ on this batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.int16], ids=str)
@pytest.mark.parametrize("which", ["labels", "shift_labels"])
def test_label_dtype_checked(dtype, which):
    # The stock loss refuses labels that are not class indices ("expected target dtype to be
    # Long"); the fused path must not turn them into indices (a float or boolean tensor passed as
    # labels by mistake would train on truncated values): a TypeError naming the argument. int32
    # labels are class indices: the same loss and gradients as int64.
    cls = transformers.LlamaForCausalLM
    model = _tiny.tiny_model(cls)
    fwd = fhf.analyse_class(cls)
    ids, labels = _tiny.batch()
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    kw = {"labels": labels} if which == "labels" else {"labels": labels, "shift_labels": shifted}
    with pytest.raises(TypeError, match=f"{which} must hold int64 or int32"):
        fwd(model, input_ids=ids, **{**kw, which: kw[which].clamp(min=0).to(dtype)})
    stock = _tiny.run(model, fwd._fusedce_original, ids, **kw)
    kw[which] = kw[which].int()
    fused = _tiny.run(model, fwd, ids, **kw)
    assert _tiny.compare(stock, fused) is None, _tiny.compare(stock, fused)


@pytest.mark.parametrize("num_items", [7, torch.tensor(7)], ids=["int", "tensor"])
def test_num_items_in_batch(num_items):
    # sum / num_items_in_batch (gradient accumulation): 7 is not the batch's own count of tokens
    cls = transformers.LlamaForCausalLM
    model = _tiny.tiny_model(cls)
    fwd = fhf.analyse_class(cls)
    ids, labels = _tiny.batch()
    stock = _tiny.run(model, fwd._fusedce_original, ids, labels, num_items_in_batch=num_items)
    fused = _tiny.run(model, fwd, ids, labels, num_items_in_batch=num_items)
    assert _tiny.compare(stock, fused) is None
    mean = _tiny.run(model, fwd, ids, labels)
    valid = (labels[:, 1:] != -100).sum().item()
    assert fused[0].item() == pytest.approx(mean[0].item() * valid / 7, rel=1e-5)


@pytest.mark.parametrize("name", ["MixtralForCausalLM", "Qwen3MoeForCausalLM"])
def test_moe_router_aux_loss(name):
    cls = getattr(transformers, name)
    stock, fused, model = _assert_same(cls, output_router_logits=True, router_aux_loss_coef=0.5)
    assert fused[2].aux_loss is not None
    without = _tiny.run(model, fhf.analyse_class(cls), *_tiny.batch(), output_router_logits=False)
    expected = without[0].item() + 0.5 * fused[2].aux_loss.item()
    assert fused[0].item() == pytest.approx(expected, rel=1e-5)


def test_multimodal_conditional_generation():
    # Llava, Qwen2-VL, Gemma3: the text head of a *ForConditionalGeneration, on text input
    for name in ["LlavaForConditionalGeneration", "Gemma3ForConditionalGeneration",
                 "Qwen2VLForConditionalGeneration"]:
        cls = getattr(transformers, name)
        fwd = fhf.analyse_class(cls)
        assert fwd is not None, (name, fhf.audit()["refused"].get(fhf._key(cls)))
    for name in ["LlavaForConditionalGeneration", "Gemma3ForConditionalGeneration"]:
        _assert_same(getattr(transformers, name))


# --- when the stock path runs -----------------------------------------------------------------


@pytest.fixture
def llama():
    cls = transformers.LlamaForCausalLM
    model = _tiny.tiny_model(cls)
    fhf.apply(model)
    return model


def test_stock_path_cases(llama):
    ids, labels = _tiny.batch()
    V = llama.config.vocab_size
    # labels in training: fused
    assert llama(input_ids=ids, labels=labels).logits is None
    # no labels: logits
    assert llama(input_ids=ids).logits.shape == (2, ids.shape[1], V)
    # logits_to_keep: the caller wants the last logits (scored here against shift_labels of that length)
    out = llama(input_ids=ids, labels=labels, logits_to_keep=1, shift_labels=labels[:, -1:])
    assert out.logits.shape == (2, 1, V) and out.loss is not None
    # skip_logits=False in training: the stock path with logits and loss
    out = llama(input_ids=ids, labels=labels, skip_logits=False)
    assert out.logits.shape == (2, ids.shape[1], V) and out.loss is not None
    # eval (the Trainer's evaluation with compute_metrics needs logits)
    llama.eval()
    out = llama(input_ids=ids, labels=labels)
    assert out.logits is not None and out.loss is not None
    # skip_logits=True forces the fused path in eval
    assert llama(input_ids=ids, labels=labels, skip_logits=True).logits is None
    with pytest.raises(ValueError, match="skip_logits=True needs labels"):
        llama(input_ids=ids, skip_logits=True)


def test_stock_path_equals_stock(llama):
    ids, labels = _tiny.batch()
    llama.eval()
    stock = type(llama).forward(llama, input_ids=ids, labels=labels)
    patched = llama(input_ids=ids, labels=labels)
    torch.testing.assert_close(patched.logits, stock.logits, rtol=0, atol=0)
    torch.testing.assert_close(patched.loss, stock.loss, rtol=0, atol=0)


def test_return_dict_false(llama):
    ids, labels = _tiny.batch()
    out = llama(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and out[0].ndim == 0  # (loss, ...) with the None logits left out


def test_signature_and_generate(llama):
    import inspect

    stock = inspect.signature(transformers.LlamaForCausalLM.forward)
    assert list(inspect.signature(llama.forward).parameters.values()) == list(stock.parameters.values())[1:]
    assert any(p.kind is p.VAR_KEYWORD for p in inspect.signature(llama.forward).parameters.values())
    llama.eval()
    ids, _ = _tiny.batch()
    out = llama.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7)


def test_custom_loss_function_runs_stock(llama):
    ids, labels = _tiny.batch()
    llama.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().mean()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = llama(input_ids=ids, labels=labels)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, out.logits.float().mean())


# --- refusals ---------------------------------------------------------------------------------


class UnknownOpForCausalLM(transformers.LlamaForCausalLM):
    """Does something between the head and the loss that fusedce does not know."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden_states = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        logits = self.lm_head(hidden_states)
        logits = logits + 1.0
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


REFUSALS = [
    ("BartForCausalLM", "its own CrossEntropyLoss"),  # unshifted CE, not self.loss_function
    ("RobertaForCausalLM", "not an nn.Linear"),  # the head is dense + gelu + norm + decoder
    ("T5ForConditionalGeneration", "encoder-decoder"),
    ("ChameleonForConditionalGeneration", "unrecognised statement"),  # masks image-token logits
    ("InklingForCausalLM", "beyond its logits argument"),  # vocab truncated, vocab_size from logits
]


@pytest.mark.parametrize("name,reason", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refused_with_reason(name, reason):
    cls = getattr(transformers, name)
    assert fhf.analyse_class(cls) is None
    assert reason in fhf.audit()["refused"][fhf._key(cls)]
    assert not fhf.patch_class(cls)
    assert not hasattr(cls.forward, "_fusedce_original")


def test_refused_unknown_transform():
    cls = UnknownOpForCausalLM
    assert fhf.analyse_class(cls) is None
    reason = fhf.audit()["refused"][fhf._key(cls)]
    assert "logits + 1.0" in reason
    model = cls(_tiny.tiny_config(transformers.LlamaForCausalLM))
    with pytest.raises(ValueError, match="UnknownOpForCausalLM is not patched.*logits \\+ 1.0"):
        fhf.apply(model)


def test_audit_is_json_safe():
    fhf.analyse_class(transformers.LlamaForCausalLM)
    fhf.analyse_class(transformers.BartForCausalLM)
    a = json.loads(json.dumps(fhf.audit()))
    assert a["transformers_version"] == transformers.__version__
    assert set(a) == {"transformers_version", "installed", "verified", "patched", "refused", "failed"}
    # "verified": on the shipped list, which is for one transformers version (5.23.0)
    listed = transformers.__version__ == fhf._manifest()[0]
    assert a["patched"]["transformers.models.llama.modeling_llama.LlamaForCausalLM"] == {
        "head": "lm_head", "transforms": [], "verified": listed}


# --- install(), the import hook, the environment variable --------------------------------------

_INSTALL_SCRIPT = r"""
import sys, json
import fusedce.integrations.transformers as fhf
from transformers import LlamaForCausalLM               # imported before install()
assert "transformers.models.opt.modeling_opt" not in sys.modules
fhf.install()
assert hasattr(LlamaForCausalLM.forward, "_fusedce_original")
from transformers import OPTForCausalLM, BartForCausalLM  # imported after: the hook patches them
assert hasattr(OPTForCausalLM.forward, "_fusedce_original")
assert not hasattr(BartForCausalLM.forward, "_fusedce_original")
a = fhf.audit()
assert a["installed"] and "transformers.models.bart.modeling_bart.BartForCausalLM" in a["refused"]
fhf.uninstall()
assert not hasattr(LlamaForCausalLM.forward, "_fusedce_original")
assert not hasattr(OPTForCausalLM.forward, "_fusedce_original")
print("ok")
"""

_ENV_SCRIPT = r"""
import sys
import fusedce
assert "transformers" not in sys.modules or %s
from transformers import MistralForCausalLM
print(hasattr(MistralForCausalLM.forward, "_fusedce_original"))
"""


def _python(script, **env):
    e = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=e, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def test_install_and_import_hook():
    assert _python(_INSTALL_SCRIPT) == "ok"


def test_environment_variable():
    # set: install() at import; unset: transformers is not even imported by fusedce
    assert _python(_ENV_SCRIPT % "True", FUSEDCE_PATCH_TRANSFORMERS="1") == "True"
    env = {k: v for k, v in os.environ.items() if k != "FUSEDCE_PATCH_TRANSFORMERS"}
    r = subprocess.run([sys.executable, "-c", _ENV_SCRIPT % "False"], cwd=REPO, capture_output=True, text=True,
                       env=dict(env, PYTHONPATH=REPO), timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]


# --- PEFT -------------------------------------------------------------------------------------


def test_peft_lora_on_backbone():
    peft = pytest.importorskip("peft")
    cls = transformers.LlamaForCausalLM
    ids, labels = _tiny.batch()
    runs = []
    for patched in (False, True):
        model = _tiny.tiny_model(cls)
        lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False))
        if patched:
            fhf.apply(lora)
        runs.append(_tiny.run(lora, lambda m, **kw: m(**kw), ids, labels))
    assert runs[1][2].logits is None and runs[0][2].logits is not None
    assert _tiny.compare(runs[0], runs[1]) is None
    assert any("lora_A" in n for n in runs[1][1])


def test_peft_lora_on_head_refused():
    peft = pytest.importorskip("peft")
    model = _tiny.tiny_model(transformers.LlamaForCausalLM)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="not a plain torch.nn.Linear"):
        fhf.apply(lora)
    # installed on the class, the fused path refuses loudly at the forward
    base = lora.get_base_model()
    base.forward = fhf.analyse_class(type(base)).__get__(base)
    with pytest.raises(RuntimeError, match="not a plain torch.nn.Linear"):
        lora(input_ids=_tiny.batch()[0], labels=_tiny.batch()[1])


@pytest.mark.parametrize("how", ["apply", "class"])
def test_peft_modules_to_save_head(how):
    # modules_to_save=["lm_head"] (the usual LoRA setup when tokens are added): PEFT wraps the head
    # in a ModulesToSaveWrapper whose forward calls a trainable copy of the nn.Linear; the fused loss
    # must train that copy (the original stays frozen), and with the adapters disabled (a DPO-style
    # reference pass) the original head, as the stock forward does.
    peft = pytest.importorskip("peft")
    cls = transformers.LlamaForCausalLM
    ids, labels = _tiny.batch()
    runs = []
    for patched in (False, True):
        model = _tiny.tiny_model(cls)
        lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                          modules_to_save=["lm_head"], init_lora_weights=False))
        base = lora.get_base_model()
        with torch.no_grad():  # the copy differs from the original: using the wrong one shows
            base.lm_head.modules_to_save["default"].weight.mul_(1.5)
        if patched:
            if how == "apply":
                fhf.apply(lora)
            else:  # what install() does: the class's forward
                base.forward = fhf.analyse_class(type(base)).__get__(base)
        run = _tiny.run(lora, lambda m, **kw: m(**kw), ids, labels)
        with lora.disable_adapter(), torch.no_grad():
            off = lora(input_ids=ids, labels=labels, skip_logits=True) if patched else lora(input_ids=ids, labels=labels)
        runs.append((run, off.loss))
    (stock, stock_off), (fused, fused_off) = runs
    assert fused[2].logits is None
    assert _tiny.compare(stock, fused) is None, _tiny.compare(stock, fused)
    assert "base_model.model.lm_head.modules_to_save.default.weight" in fused[1]
    assert not any("original_module" in n for n in fused[1])
    assert fused_off.item() == pytest.approx(stock_off.item(), rel=1e-5)
    assert abs(fused_off.item() - fused[0].item()) > 1e-3  # the disabled pass used the other head


@pytest.mark.parametrize("modules", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]], ids="+".join)
def test_peft_modules_to_save_tied_head(modules):
    # A tied model with modules_to_save and ensure_weight_tying=True: PEFT's head copy is an
    # nn.Linear(V, H) whose weight is replaced by the [V, H] embedding copy (its out_features says
    # H): the fused loss must score V classes and send the head's gradient to the shared copy,
    # summed with the embedding's own.
    peft = pytest.importorskip("peft")
    cls = transformers.LlamaForCausalLM
    ids, labels = _tiny.batch()
    runs = []
    for patched in (False, True):
        lora = peft.get_peft_model(_tiny.tiny_model(cls, tie_word_embeddings=True), peft.LoraConfig(
            r=4, target_modules=["q_proj"], modules_to_save=modules, ensure_weight_tying=True,
            init_lora_weights=False))
        with torch.no_grad():  # the copies differ from the originals: using the wrong one shows
            for name, p in lora.named_parameters():
                if "modules_to_save" in name:
                    p.mul_(1.5)
        if patched:
            fhf.apply(lora)
        runs.append(_tiny.run(lora, lambda m, **kw: m(**kw), ids, labels))
    stock, fused = runs
    assert fused[2].logits is None
    assert _tiny.compare(stock, fused) is None, _tiny.compare(stock, fused)
    assert any("modules_to_save" in n for n in fused[1])


# --- the HF Trainer and torch.compile ----------------------------------------------------------


def _trainer_losses(patched, tmp_path):
    cls = transformers.LlamaForCausalLM
    model = _tiny.tiny_model(cls)
    if patched:
        fhf.apply(model)
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(16):  # different lengths: num_items_in_batch differs between micro-batches
        n = 6 + int(torch.randint(0, 10, (1,), generator=g))
        ids = torch.randint(4, 200, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})

    def collate(feats):
        n = max(len(f["input_ids"]) for f in feats)
        ids = torch.tensor([f["input_ids"] + [0] * (n - len(f["input_ids"])) for f in feats])
        labels = torch.tensor([f["labels"] + [-100] * (n - len(f["labels"])) for f in feats])
        return {"input_ids": ids, "labels": labels, "attention_mask": (labels != -100).long()}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / ("p" if patched else "s")), per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-2, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    assert trainer.model_accepts_loss_kwargs  # the signature (with **kwargs) is what the Trainer saw
    before = model.lm_head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, model.lm_head.weight)  # it trained
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], model.state_dict()


def test_trainer_gradient_accumulation(tmp_path):
    stock, stock_weights = _trainer_losses(False, tmp_path)
    fused, fused_weights = _trainer_losses(True, tmp_path)
    assert len(stock) == 4
    assert fused == pytest.approx(stock, rel=1e-4)
    for name, w in stock_weights.items():  # and the same weights after 4 AdamW steps
        torch.testing.assert_close(fused_weights[name], w, rtol=1e-4, atol=1e-5)


def test_torch_compile_training_step():
    cls = transformers.LlamaForCausalLM
    model = _tiny.tiny_model(cls)
    fhf.apply(model)
    fwd = fhf.analyse_class(cls)
    ids, labels = _tiny.batch()
    stock = _tiny.run(model, fwd._fusedce_original, ids, labels)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    model.zero_grad(set_to_none=True)
    out = compiled(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    out.loss.backward()
    assert out.logits is None
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert _tiny.compare(stock, (out.loss.detach(), grads, out)) is None


def test_audit_marks_verified_and_verified_only():
    """audit() marks the classes of the shipped verified list; install(verified_only=True) and
    apply(verified_only=True) patch only those and refuse the others with that reason."""
    import transformers

    listed = fhf.verified_classes()
    if transformers.__version__ != fhf._manifest()[0]:
        assert listed == frozenset()
        return
    assert "LlamaForCausalLM" in listed and len(listed) >= 100
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    fhf.apply(transformers.LlamaForCausalLM(cfg), verified_only=True)
    a = fhf.audit()
    rec = [v for k, v in a["patched"].items() if k.endswith(".LlamaForCausalLM")]
    assert rec and rec[0]["verified"] is True and a["verified"] >= 1
    json.dumps(a)

    class MyLlamaForCausalLM(transformers.LlamaForCausalLM):  # same forward, not on the list
        pass

    with pytest.raises(ValueError, match="verified list"):
        fhf.apply(MyLlamaForCausalLM(cfg), verified_only=True)
    fhf.apply(MyLlamaForCausalLM(cfg))  # understood from its source: patched without the flag
    assert fhf.audit()["patched"][fhf._key(MyLlamaForCausalLM)]["verified"] is False


def test_generate_tokens_equal_stock():
    # the patched forward without labels is the stock code: greedy tokens identical, in eval and
    # in train mode (generation inside a training loop, as GRPO-style trainers do)
    cls = transformers.LlamaForCausalLM
    model = _tiny.tiny_model(cls).eval()
    prompt = _tiny.batch()[0][:, :4]
    stock = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    fhf.apply(model)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), stock)
    model.train()
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), stock)


def test_left_padding_masked_row_and_checkpointing():
    # left padding (masked, labels -100 there), a row without any label, gradient checkpointing
    # on the backbone: the fused loss and every gradient equal the stock forward's
    cls = transformers.Gemma2ForCausalLM
    model = _tiny.tiny_model(cls, final_logit_softcapping=0.5)
    model.gradient_checkpointing_enable()
    fwd = fhf.analyse_class(cls)
    ids, labels = _tiny.batch(batch=3)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    labels[0, :4] = -100
    labels[2] = -100
    runs = []
    for f in (fwd._fusedce_original, fwd):
        model.zero_grad(set_to_none=True)
        out = f(model, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(13))
        out.loss.backward()
        runs.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.grad is not None}, out))
    assert runs[1][2].logits is None
    assert _tiny.compare(*runs) is None, _tiny.compare(*runs)
