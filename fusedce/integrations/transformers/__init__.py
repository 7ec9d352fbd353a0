"""fusedce in Hugging Face transformers' causal language models.

    import fusedce.integrations.transformers as fhf
    fhf.apply(model)      # one model instance (a PeftModel too: its base model)
    fhf.install()         # every *ForCausalLM / *ForConditionalGeneration class, now and imported later
    fhf.audit()           # what was patched, refused (and why), failed

or ``FUSEDCE_PATCH_TRANSFORMERS=1`` in the environment: ``import fusedce`` calls install()
(``FUSEDCE_PATCH_TRANSFORMERS=verified``: install(verified_only=True)).

Verified classes: ``verified.json`` lists the classes that tests/test_transformers_sweep.py
patched and checked against their stock forward (loss and every parameter's gradient) for one
transformers version; the sweep fails if the list and its result differ. audit() marks each
patched class ``verified`` when it is on that list for the installed version; with
``verified_only=True`` install() and apply() patch only those (the others stay stock, refused with
that reason).

A patched forward is the stock forward's own code with the head call, the recognised logit
transforms (scale, division, softcap), the loss call and the returned logits swapped for fusedce's
(see ``_analysis``). It takes the fused path when labels are given in training (or when
``skip_logits=True`` is passed, as the HF Trainer/TRL may do): the head module is called on its input
(so that FSDP / ZeRO-3 / offload hooks gather its weight) and the weight and bias its forward passes
to ``F.linear`` go to ``fusedce.linear_cross_entropy`` with the shift, ``shift_labels``, ``ignore_index`` and
``num_items_in_batch`` of transformers' ``ForCausalLMLoss``, and the output has ``logits=None``.
The stock path runs, unchanged, when labels are None, in eval (unless ``skip_logits=True``), when
``logits_to_keep`` is set, when ``skip_logits=False`` is passed, or when the model's
``loss_function`` is not transformers' ForCausalLMLoss. A tensor-parallel head (``tp_plan``: its
weight still a DTensor inside its call) is not folded: the fused path raises, naming
``skip_logits=False``.
"""

from __future__ import annotations

import functools
import json
import os
import inspect
import sys
import threading
import types

from .._import_hook import PostImportHook
from ..trl import is_trl_fused_forward
from . import _analysis
from ._analysis import FusedState, Refused

__all__ = ["apply", "install", "uninstall", "audit", "patch_class", "verified_classes", "Refused"]

# class key ("transformers.models.llama.modeling_llama.LlamaForCausalLM") -> record
_PATCHED: dict[str, dict] = {}
_REFUSED: dict[str, str] = {}
_FAILED: dict[str, str] = {}
_FUSED: dict[type, types.FunctionType] = {}  # class -> patched forward (cache; also used by apply)
_LOCK = threading.RLock()
_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "GenerationDecoder",
                   "ModelWithLMHead")


def _key(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@functools.lru_cache(maxsize=None)
def _manifest() -> tuple[str, frozenset]:
    with open(os.path.join(os.path.dirname(__file__), "verified.json")) as f:
        m = json.load(f)
    return m["transformers_version"], frozenset(m["classes"])


def verified_classes() -> frozenset:
    """Names of the classes the sweep verified for the installed transformers version (empty for
    another version)."""
    import transformers

    version, classes = _manifest()
    return classes if transformers.__version__ == version else frozenset()


def _make_forward(cls):
    """The patched forward of cls (cached) or raise Refused."""
    if cls in _FUSED:
        return _FUSED[cls]
    orig = _analysis.original_forward(cls)
    inner, plan = _analysis.analyse(cls)
    sig = inspect.signature(orig)
    from transformers.loss.loss_utils import ForCausalLMLoss

    @functools.wraps(orig)
    def forward(self, *args, **kwargs):
        skip_logits = kwargs.pop("skip_logits", None)
        try:
            bound = sig.bind(self, *args, **kwargs)
        except TypeError:
            return inner(self, *args, **kwargs)  # let the stock code raise its own error
        arguments = bound.arguments
        labels = arguments.get("labels")
        keep = arguments.get("logits_to_keep", 0)
        fused = (self.training and labels is not None) if skip_logits is None else bool(skip_logits)
        if fused and labels is None:
            raise ValueError("fusedce: skip_logits=True needs labels (the logits are not computed)")
        if fused and not (isinstance(keep, int) and keep == 0):
            fused = False  # logits_to_keep set: the caller wants logits
        if fused and self.loss_function is not ForCausalLMLoss:
            _analysis.warn_once(f"fusedce: {type(self).__name__}.loss_function is not transformers' "
                                "ForCausalLMLoss; the stock forward runs")
            fused = False
        state = FusedState(fused)
        out = inner(self, *args, _fce_state=state, **kwargs)
        if fused and not state.loss_done:
            raise RuntimeError(f"fusedce: {type(self).__name__}'s patched forward did not reach its loss")
        return out

    forward.__signature__ = sig
    forward._fusedce_original = orig
    forward._fusedce_plan = {"head": plan.head_attr, "transforms": plan.transforms}
    _FUSED[cls] = forward
    return forward


def _is_candidate(cls) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return (isinstance(cls, type) and issubclass(cls, PreTrainedModel)
            and cls.__name__.endswith(_CLASS_SUFFIXES))


def analyse_class(cls):
    """Record cls as patchable, refused or failed; return the patched forward or None."""
    key = _key(cls)
    with _LOCK:
        try:
            fwd = _make_forward(cls)
        except Refused as e:
            _REFUSED[key] = str(e)
            return None
        except Exception as e:  # noqa: BLE001  (a bug here must leave the class stock, and be listed)
            _FAILED[key] = f"{type(e).__name__}: {e}"
            return None
        _PATCHED[key] = fwd._fusedce_plan
        return fwd


def _refuse_unverified(cls) -> bool:
    """With verified_only: a class off the verified list is refused (stays stock); True if so."""
    if cls.__name__ in verified_classes():
        return False
    import transformers

    key = _key(cls)
    with _LOCK:
        _PATCHED.pop(key, None)
        _REFUSED[key] = (f"not on fusedce's verified list for transformers {transformers.__version__} "
                         f"(verified_only=True; the list is for {_manifest()[0]})")
    return True


def patch_class(cls, verified_only: bool = False) -> bool:
    """Replace cls.forward by its fused twin if cls is understood (and, with verified_only, on the
    verified list); True if patched."""
    fwd = analyse_class(cls)
    if fwd is None or (verified_only and _refuse_unverified(cls)):
        return False
    if cls.__dict__.get("forward") is not fwd:
        cls.forward = fwd
    return True


def _patch_module(module) -> None:
    for obj in list(vars(module).values()):
        if isinstance(obj, type) and obj.__module__ == module.__name__ and _is_candidate(obj):
            patch_class(obj, _VERIFIED_ONLY)


def _is_modeling_module(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "transformers" and parts[1] == "models" \
        and parts[3].startswith("modeling_")


def _after_import(module):
    if _INSTALLED:
        _patch_module(module)


_INSTALLED = False
_VERIFIED_ONLY = False
# Patches transformers' modeling modules when they are imported.
_FINDER = PostImportHook(_is_modeling_module, _after_import)


def install(verified_only: bool = False) -> dict:
    """Patch every candidate class of the transformers modeling modules imported now, and (by an
    import hook) of those imported later; with verified_only, only the classes on the verified list
    for the installed transformers version. Returns audit()."""
    global _INSTALLED, _VERIFIED_ONLY
    with _LOCK:
        _INSTALLED = True
        _VERIFIED_ONLY = verified_only
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
        for name, module in list(sys.modules.items()):
            if module is not None and _is_modeling_module(name):
                _patch_module(module)
    return audit()


def uninstall() -> None:
    """Restore the stock forwards of the classes install() patched and remove the import hook."""
    global _INSTALLED
    with _LOCK:
        _INSTALLED = False
        if _FINDER in sys.meta_path:
            sys.meta_path.remove(_FINDER)
        for name, module in list(sys.modules.items()):
            if module is not None and _is_modeling_module(name):
                for obj in list(vars(module).values()):
                    if isinstance(obj, type) and obj.__module__ == module.__name__:
                        f = obj.__dict__.get("forward")
                        if f is not None and hasattr(f, "_fusedce_original"):
                            _restore(obj, f)


def _restore(cls, patched):
    orig = patched._fusedce_original
    # the class either defined this forward itself or inherited it: find which
    for base in cls.__mro__[1:]:
        if "forward" in base.__dict__:
            inherited = base.__dict__["forward"]
            inherited = getattr(inherited, "_fusedce_original", inherited)
            if inherited is orig:
                del cls.forward
                return
            break
    cls.forward = orig


def apply(model, verified_only: bool = False):
    """Patch one model instance (its forward only; the class is untouched). Accepts a PeftModel: its
    base model is patched; a head in ``modules_to_save`` is the copy PEFT's wrapper calls (the original
    with the adapters disabled); a LoRA (or any other adapter) on the head is refused with ValueError. Raises
    ValueError naming the reason when the class is refused (with verified_only, also when it is not
    on the verified list). Returns the model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if is_trl_fused_forward(base.__dict__.get("forward")):
        # Replacing it would drop TRL's fused head: the trainer's fused_lm_head=True calls would
        # then return plain logits ('CausalLMOutputWithPast' object has no attribute 'log_probs').
        raise ValueError(
            f"fusedce: this {type(base).__name__}'s forward is TRL's fused LM head "
            "(add_fused_lm_head, installed when a TRL trainer is built); apply() would replace it. "
            "For TRL trainers call fusedce.integrations.trl.install() (or set FUSEDCE_PATCH_TRL=1) "
            "before building the trainer, instead of transformers.apply() after it.")
    cls = type(base)
    fwd = analyse_class(cls)
    if fwd is not None and verified_only and _refuse_unverified(cls):
        fwd = None
    if fwd is None:
        key = _key(cls)
        raise ValueError(f"fusedce: {cls.__name__} is not patched: "
                         f"{_REFUSED.get(key) or _FAILED.get(key)}")
    head = getattr(base, fwd._fusedce_plan["head"])
    try:
        _analysis._linear_of(head)
    except RuntimeError as e:
        raise ValueError(str(e)) from None
    base.forward = types.MethodType(fwd, base)
    return model


def audit(all_models: bool = False) -> dict:
    """What this process patched (JSON-safe):

    {"transformers_version": str, "installed": bool, "verified": int,
     "patched": {class: {"head": attr, "transforms": [...], "verified": bool}},
     "refused": {class: reason}, "failed": {class: error}}

    "verified" (per class): on the list of classes tests/test_transformers_sweep.py checked against
    the stock forward for the installed transformers version; the top-level count is of those.

    Classes are keyed by module and name. With all_models=True every class of transformers'
    causal-LM and image-text-to-text auto mappings is analysed first (imported, not patched unless
    install() was called)."""
    import transformers

    if all_models:
        for cls in _mapping_classes():
            analyse_class(cls)
    ok = verified_classes()
    with _LOCK:
        patched = {k: {**v, "verified": k.rsplit(".", 1)[-1] in ok} for k, v in sorted(_PATCHED.items())}
        return {
            "transformers_version": transformers.__version__,
            "installed": _INSTALLED,
            "verified": sum(v["verified"] for v in patched.values()),
            "patched": patched,
            "refused": dict(sorted(_REFUSED.items())),
            "failed": dict(sorted(_FAILED.items())),
        }


def _mapping_classes():
    import transformers
    from transformers.models.auto import modeling_auto as ma

    names = list(dict.fromkeys(list(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
                               + list(getattr(ma, "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", {}).values())))
    out = []
    for n in names:
        try:
            out.append(getattr(transformers, n))
        except Exception:  # noqa: BLE001  (a model needing an absent dependency)
            continue
    return out
