"""fusedce: the loss of a language-model head without materializing the [tokens x vocab] logits."""

from ._extension import build_info, load_extension
from ._version import __version__
from . import _torch_fixes  # noqa: F401  (a linear torch._library fill_defaults: see there)

_C = load_extension()  # registers torch.ops.fusedce.* (checks the torch it was built against first)

from . import ops as _ops  # noqa: E402,F401  (fake kernels and autograd of the C++ ops)
from .functional import (  # noqa: E402
    LossOutput,
    allow_second_backward,
    cross_entropy,
    linear_cross_entropy,
)
from .terms import (  # noqa: E402
    TokenStatistics,
    distillation_loss,
    policy_loss,
    token_logprobs,
    token_statistics,
)
from .preference import kto_loss, preference_loss  # noqa: E402
from .validation import validate_targets  # noqa: E402
from . import nn  # noqa: E402

__all__ = [
    "__version__",
    "LossOutput",
    "allow_second_backward",
    "build_info",
    "cross_entropy",
    "distillation_loss",
    "kto_loss",
    "linear_cross_entropy",
    "nn",
    "policy_loss",
    "preference_loss",
    "token_logprobs",
    "token_statistics",
    "TokenStatistics",
    "validate_targets",
]

import os as _os  # noqa: E402

if _os.environ.get("FUSEDCE_PATCH_TRANSFORMERS", "") not in ("", "0"):
    # fusedce into every transformers *ForCausalLM it can prove it handles (imports transformers)
    from .integrations import transformers as _hf

    _hf.install(verified_only=_os.environ["FUSEDCE_PATCH_TRANSFORMERS"] == "verified")

if _os.environ.get("FUSEDCE_PATCH_TRL", "") not in ("", "0"):
    # fusedce's head in TRL's trainers (add_fused_lm_head), patched when TRL is imported
    from .integrations import trl as _trl

    try:
        _trl.install(lazy=True)
    except ImportError as _e:  # FUSEDCE_PATCH_TRL set where TRL is absent: fusedce itself still works
        import warnings as _warnings

        _warnings.warn(str(_e), stacklevel=2)
