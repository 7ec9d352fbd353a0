"""Every class of transformers' causal-LM auto mapping (and of the image-text-to-text mapping, for
the *ForConditionalGeneration models with a causal text head): patched and verified against its
stock forward on a tiny random-init fp32 model (loss and every parameter's gradient, text input,
labels with ignored positions, the MoE router auxiliary loss on where the config has it), or refused
with a reason. A tiny model a class cannot be built or run as (a dependency such as timm absent, a
config the generic shrink cannot make consistent) is listed, not counted as verified."""

import json
import os

import pytest

transformers = pytest.importorskip("transformers")

import fusedce.integrations.transformers as fhf  # noqa: E402
from fusedce.integrations.transformers import _tiny  # noqa: E402

transformers.logging.set_verbosity_error()

MIN_VERIFIED = 100  # the bar; 5.23 gives ~165
_RESULTS = {}


def _names():
    from transformers.models.auto import modeling_auto as ma

    return list(dict.fromkeys(list(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
                              + list(getattr(ma, "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", {}).values())))


def _check(name):
    if name in _RESULTS:
        return _RESULTS[name]
    try:
        cls = getattr(transformers, name)
    except Exception as e:  # noqa: BLE001
        _RESULTS[name] = ("not importable", f"{type(e).__name__}: {e}"[:200])
        return _RESULTS[name]
    fwd = fhf.analyse_class(cls)
    key = fhf._key(cls)
    audit = fhf.audit()
    if key in audit["failed"]:
        result = ("failed", audit["failed"][key])
    elif fwd is None:
        result = ("refused", audit["refused"][key])
    else:
        result = _tiny.verify(cls, fwd, fwd._fusedce_original)
    _RESULTS[name] = result
    return result


@pytest.mark.parametrize("name", _names())
def test_class(name):
    status, why = _check(name)
    # a patched class that disagrees with its stock forward, or an analysis that crashed, fails
    assert status in ("verified", "refused", "not constructible", "not runnable", "not importable"), why
    if status == "refused":
        assert why  # a stated reason


def test_totals():
    for name in _names():
        _check(name)
    by = {}
    for name, (status, why) in sorted(_RESULTS.items()):
        by.setdefault(status, {})[name] = why
    summary = {k: len(v) for k, v in by.items()}
    out = os.environ.get("FUSEDCE_SWEEP_JSON")
    if out:
        with open(out, "w") as f:
            json.dump({"transformers_version": transformers.__version__, "summary": summary, **by}, f, indent=1)
    print(json.dumps(summary))
    assert not by.get("mismatch") and not by.get("failed"), {k: by.get(k) for k in ("mismatch", "failed")}
    assert summary.get("verified", 0) >= MIN_VERIFIED, summary
    # The shipped list of verified classes (audit()'s "verified", install(verified_only=True)) is
    # exactly what this sweep verified, for the transformers version it names.
    version, listed = fhf._manifest()
    if transformers.__version__ == version:
        assert listed == set(by.get("verified", {})), {
            "listed, not verified now": sorted(listed - set(by.get("verified", {}))),
            "verified now, not listed": sorted(set(by.get("verified", {})) - listed)}
