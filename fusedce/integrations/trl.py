"""fusedce in TRL's trainers (trl >= 1.16).

    import fusedce.integrations.trl as ftrl
    ftrl.install()        # before building the trainer
    trainer = GRPOTrainer(...)   # SFTTrainer, DPOTrainer, RLOOTrainer, KTOTrainer, ...
    ftrl.uninstall()      # trainers built afterwards use TRL's own head again

or ``FUSEDCE_PATCH_TRL=1`` in the environment: ``import fusedce`` calls ``install(lazy=True)``
(TRL is patched when it is imported, not imported by fusedce).

TRL 1.16 gives every trainer a fused LM head: ``trl.trainer.utils.add_fused_lm_head(model, ...)``
replaces ``model.forward`` so that ``model(..., labels=..., fused_lm_head=True)`` returns a
``FusedCausalLMOutput`` (per-token log-probs under the trainer's temperature, entropy,
log_sum_sq_probs, mean_logits, is_top1, label_mask, the MoE auxiliary loss) instead of logits.
install() swaps ``add_fused_lm_head`` for fusedce's: the same fields with TRL's semantics (every
per-token field 0 where the label is -100, ``shift_labels`` scored unshifted, ``num_items_in_batch``
dividing the loss, ``cast_lm_head_to_fp32``), computed by one fusedce softmax pass per token
(:func:`fusedce.token_statistics`) through the head module's own call, so that FSDP2/FSDP1,
DeepSpeed ZeRO-3 and offload hooks gather the head's weight for the forward and again for the
recomputing backward. A tensor-parallel head (a DTensor weight that no FSDP2 hook gathers) is
computed beside its call from the gathered weight, as TRL's head computes every head; a PEFT adapter
on the head is refused by name. Log-probs and entropy have exact gradients; mean_logits,
log_sum_sq_probs and is_top1 are metrics without gradient, as in TRL.

Which integration a TRL user wants: this one. TRL's trainers compute their training loss through
``fused_lm_head=True``, which calls the backbone and the head directly and never the model's
``forward``; so :mod:`fusedce.integrations.transformers` (``apply``/``install``) does not reach
TRL's training loss. The two compose: ``transformers.install()`` (class-level) beside this one is
harmless (it only affects calls with labels outside the fused head), and ``transformers.apply(model)``
before the trainer is built is kept as the forward used outside the fused head. Calling
``transformers.apply(model)`` on a model whose forward TRL has already replaced (after building the
trainer) would drop TRL's fused head; it raises a ValueError saying so.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import threading
import types
import warnings
from contextlib import nullcontext

import torch

from ..terms import token_statistics
from ._head import _cast_like_linear, call_head
from ._import_hook import PostImportHook

__all__ = ["install", "uninstall", "installed", "add_fused_lm_head", "is_trl_fused_forward"]

_TESTED = "1.16"  # the TRL minor version whose add_fused_lm_head contract this replicates
_UTILS = "trl.trainer.utils"
_FIELDS = ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1",
           "label_mask", "aux_loss")
_LOCK = threading.RLock()
_ORIGINAL = None  # TRL's add_fused_lm_head, while installed
_INSTALLED = False


# ---------------------------------------------------------------------------------------------
# The head's logit transforms, from the model's config
# ---------------------------------------------------------------------------------------------


def _head_transforms(text_config):
    """(logit_scale, softcap) of the final logits softcap * tanh(logit_scale * a / softcap), as
    TRL reads them from the config: the first multiplier found among the names models use for it
    (Granite-style ``logits_scaling`` divides, except for HyperCLOVA X, which multiplies), then the
    Gemma-style ``final_logit_softcapping``."""
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text_config, name, None)
        if value is not None:
            scale = float(value)
            break
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        s = float(text_config.logits_scaling)
        scale = s if getattr(text_config, "model_type", None) == "hyperclovax" else 1.0 / s
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return (1.0 if scale is None else scale), (None if softcap is None else float(softcap))


def _aux_loss(model, text_config, backbone_outputs, attention_mask):
    """The MoE load-balancing loss as the model's own forward computes it (transformers' Mixtral
    function, which the MoE families share)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(text_config, "num_experts", None)
    if num_experts is None:
        num_experts = getattr(model, "num_experts")
    top_k = getattr(text_config, "num_experts_per_tok", None)
    if top_k is None:
        top_k = getattr(model, "num_experts_per_tok")
    return load_balancing_loss_func(backbone_outputs.router_logits, num_experts, top_k, attention_mask)


# ---------------------------------------------------------------------------------------------
# fusedce's add_fused_lm_head
# ---------------------------------------------------------------------------------------------


def _is_dtensor(t) -> bool:
    if t is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _is_fsdp2(module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, FSDPModule)


def is_trl_fused_forward(forward) -> bool:
    """Whether ``forward`` (a model's instance ``forward``) is a fused-head forward installed by
    TRL's add_fused_lm_head or by fusedce's."""
    func = getattr(forward, "__func__", forward)
    if getattr(func, "_fusedce_trl", False):
        return True
    code = getattr(func, "__code__", None)
    return (code is not None and code.co_name == "_fused_forward"
            and str(getattr(code, "co_filename", "")).replace("\\", "/").endswith("trl/trainer/utils.py"))


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple = ("log_probs",)) -> None:
    """fusedce's drop-in for ``trl.trainer.utils.add_fused_lm_head`` (same arguments, same
    ``FusedCausalLMOutput``); install() puts it in TRL's place."""
    from trl.trainer.utils import FusedCausalLMOutput

    names = {"log_probs": "logprobs", "entropy": "entropy", "log_sum_sq_probs": "log_sum_sq_probs",
             "mean_logits": "mean_logits", "is_top1": "is_top1"}
    unknown = [o for o in outputs if o not in names]
    if unknown:
        raise ValueError(f"fusedce: add_fused_lm_head outputs must be among {tuple(names)}, got {unknown}")
    wanted = tuple(names[o] for o in outputs if o != "log_probs")
    temperature = float(temperature)
    original_forward = model.forward
    text_config = model.config.get_text_config()
    logit_scale, softcap = _head_transforms(text_config)
    backbone_attr = "base_model"
    if text_config is not model.config:
        import transformers
        from packaging.version import Version

        # Before transformers 5 a vision-language model's language backbone is `model`.
        if Version(transformers.__version__) < Version("5.0.0"):
            backbone_attr = "model"

    # Keep the original signature: `generate` validates its model kwargs against it.
    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return original_forward(*args, **kwargs)

        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        # Looked up per call: FSDP and PEFT replace the backbone and the head after patching.
        backbone_outputs = getattr(self, backbone_attr)(*args, **kwargs)
        hidden = backbone_outputs.last_hidden_state
        if shift_labels is None:
            hidden, target = hidden[:, :-1], labels[:, 1:]
        else:
            target = shift_labels
        head = self.get_output_embeddings()
        if hasattr(head, "base_layer"):
            # A PEFT adapter on the head adds to the linear layer's output: not one F.linear.
            raise ValueError(
                f"fusedce: the LM head is a {type(head).__module__}.{type(head).__qualname__} (an "
                "adapter on the head): fusedce's TRL head folds a plain linear head only. Leave the "
                "head out of the adapter's target_modules, or build this trainer without "
                "fusedce.integrations.trl.install() (TRL's own head reads lm_head.weight and "
                "ignores the adapter).")
        # device_map may leave the backbone's output on another device than the head.
        device = head.weight.device
        hidden, target = hidden.to(device), target.to(device)
        mask = target != -100
        # Only the scored positions go through the head (one host sync, as TRL's own head on GPU);
        # under torch.compile every position is scored instead (shapes stay static).
        compact = not torch.compiler.is_compiling()
        if compact:
            rows, tokens = hidden[mask], target[mask]
        else:
            rows, tokens = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
        ctx = nullcontext()
        if cast_lm_head_to_fp32:
            rows = rows.float()
            ctx = torch.autocast(device.type, enabled=False)

        def compute(x, w, b):
            # Still a DTensor inside the head's call (a tensor-parallel head, not FSDP, which
            # gathers it): the whole head, as TRL's head takes it; the gradient flows back to the
            # shards through the DTensor.
            x, w, b = (t.full_tensor() if _is_dtensor(t) else t for t in (x, w, b))
            if cast_lm_head_to_fp32:
                # float32 even where a wrapper's hook cast the head's input down (an FSDP2
                # MixedPrecisionPolicy on a head unit): the rows as given.
                x = rows
            # The projection runs in the dtype of its input (autocast's, or float32 with
            # cast_lm_head_to_fp32), the weight cast to it as TRL's head casts it.
            w = w if w.dtype == x.dtype else w.to(x.dtype)
            b = b if b is None or b.dtype == x.dtype else b.to(x.dtype)
            return token_statistics(x, w, tokens, linear_bias=b, temperature=temperature,
                                    outputs=wanted, softcap=softcap, logit_scale=logit_scale)

        with ctx:
            if _is_dtensor(head.weight) and not _is_fsdp2(head):
                # A tensor-parallel head (its weight a DTensor that no FSDP hook gathers, and hooks
                # that expect logits out of its call): computed beside the call from the gathered
                # weight, as TRL's head does.
                stats = compute(*_cast_like_linear(rows, head.weight, head.bias))
            else:
                stats = call_head(head, rows, compute)

        def place(x):
            if x is None:
                return None
            if compact:
                # masked_scatter keeps the output connected to the graph even when no label is
                # valid, so an all-masked microbatch still has a (zero) gradient.
                return x.new_zeros(mask.shape).masked_scatter(mask, x)
            return x.view(mask.shape).masked_fill(~mask, 0)

        log_probs = place(stats.logprobs)
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / denom
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _aux_loss(self, text_config, backbone_outputs, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(
            loss=loss, log_probs=log_probs, entropy=place(stats.entropy),
            log_sum_sq_probs=place(stats.log_sum_sq_probs), mean_logits=place(stats.mean_logits),
            is_top1=place(stats.is_top1), label_mask=mask, aux_loss=aux_loss)

    forward._fusedce_trl = True
    model.forward = types.MethodType(forward, model)


add_fused_lm_head._fusedce_trl = True


# ---------------------------------------------------------------------------------------------
# install / uninstall
# ---------------------------------------------------------------------------------------------


def _check_contract(utils) -> None:
    """The TRL pieces this replaces must be there, with the fields it fills."""
    import dataclasses

    import trl
    from packaging.version import Version

    if not hasattr(utils, "add_fused_lm_head") or not hasattr(utils, "FusedCausalLMOutput"):
        raise RuntimeError(
            f"fusedce.integrations.trl: trl {trl.__version__} has no trl.trainer.utils."
            "add_fused_lm_head / FusedCausalLMOutput (TRL's fused LM head, trl >= 1.16); "
            "nothing is patched")
    fields = {f.name for f in dataclasses.fields(utils.FusedCausalLMOutput)}
    missing = [f for f in _FIELDS if f not in fields]
    if missing:
        raise RuntimeError(f"fusedce.integrations.trl: trl {trl.__version__}'s FusedCausalLMOutput "
                           f"lacks {missing}; nothing is patched")
    v = Version(trl.__version__)
    if f"{v.major}.{v.minor}" != _TESTED:
        warnings.warn(f"fusedce.integrations.trl replicates add_fused_lm_head of trl {_TESTED}; "
                      f"trl {trl.__version__} is installed (its fields are present: patching)",
                      stacklevel=3)


def _trl_modules():
    return [m for n, m in list(sys.modules.items())
            if m is not None and (n == "trl" or n.startswith("trl."))]


def _patch(utils) -> None:
    global _ORIGINAL
    with _LOCK:
        current = utils.add_fused_lm_head
        if current is add_fused_lm_head:
            return
        _check_contract(utils)
        _ORIGINAL = current
        # Trainer modules imported earlier hold their own reference (from .utils import ...).
        for module in _trl_modules():
            if module.__dict__.get("add_fused_lm_head") is current:
                setattr(module, "add_fused_lm_head", add_fused_lm_head)


def _after_import(module):
    if _INSTALLED:
        try:
            _patch(module)
        except RuntimeError as e:  # a TRL without the fused head: leave it stock, say so
            warnings.warn(str(e), stacklevel=2)


# Patches trl.trainer.utils when it is imported (install(lazy=True)).
_FINDER = PostImportHook(lambda name: name == _UTILS, _after_import)


def install(lazy: bool = False) -> None:
    """Make every TRL trainer built from now on compute its fused LM head with fusedce.

    Imports ``trl.trainer.utils`` and patches it now; with ``lazy=True`` (the environment switch)
    TRL is patched when it is first imported (now, if it already is). Raises ImportError when TRL is
    not installed, RuntimeError when it has no fused LM head (trl < 1.16)."""
    global _INSTALLED
    with _LOCK:
        if importlib.util.find_spec("trl") is None:
            raise ImportError("fusedce.integrations.trl.install(): trl is not installed (pip install trl)")
        _INSTALLED = True
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
        if _UTILS in sys.modules or not lazy:
            try:
                _patch(importlib.import_module(_UTILS))
            except Exception:
                _uninstall_locked()
                raise


def _uninstall_locked() -> None:
    global _INSTALLED, _ORIGINAL
    _INSTALLED = False
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    if _ORIGINAL is not None:
        for module in _trl_modules():
            if module.__dict__.get("add_fused_lm_head") is add_fused_lm_head:
                setattr(module, "add_fused_lm_head", _ORIGINAL)
    _ORIGINAL = None


def uninstall() -> None:
    """Give TRL its own add_fused_lm_head back. Models already patched (trainers already built)
    keep fusedce's head."""
    with _LOCK:
        _uninstall_locked()


def installed() -> bool:
    """Whether install() is in effect."""
    return _INSTALLED
