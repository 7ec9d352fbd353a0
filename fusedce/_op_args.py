"""The term arguments of torch.ops.fusedce.loss / loss_backward, packed as the op takes them.

The ops take the terms beyond the CE as seven optional tensors (by name) plus two lists,
`term_floats` and `term_ints`, whose layout is defined once in csrc/terms_args.h (far fewer op
arguments: torch's register_autograd wrapper costs time quadratic in their number on every call).
`TermOptions` is the typed Python side of that layout; `check_layout` (run when fusedce.ops is
imported) refuses a table that differs from the compiled one, so a shifted entry can never reach
the kernels as a silently wrong number.

Adding an entry: one line at the end of its list in csrc/terms_args.h (FUSEDCE_TERM_FLOATS or
FUSEDCE_TERM_INTS) and one field at the end of the same block of TermOptions below.

Imports only torch, so that any module can build the arguments of an op call.
"""

from __future__ import annotations

import typing
from typing import NamedTuple, Optional

import torch


class TermOptions(NamedTuple):
    """The terms of one fusedce::loss call (meanings: csrc/fusedce.cpp). `pack()` gives the op's
    keyword arguments; the defaults are the plain CE."""

    # term_floats, in the order of FUSEDCE_TERM_FLOATS
    ce_weight: float = 1.0
    entropy_coef: float = 0.0
    distill_weight: float = 1.0
    distill_beta: float = 0.5
    distill_temperature: float = 1.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    kl_beta: float = 0.0
    policy_delta: float = 0.0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    # term_ints, in the order of FUSEDCE_TERM_INTS (bool: a 0/1 flag)
    want_entropy: bool = False
    want_logprob: bool = False
    distill: int = 0
    want_mean_logit: bool = False
    want_log_sum_sq: bool = False
    policy_kind: int = 0
    kl_bias_correction: bool = False
    # the `Tensor? name=None` arguments (FUSEDCE_TERM_TENSORS)
    teacher_logits: Optional[torch.Tensor] = None
    teacher_hidden: Optional[torch.Tensor] = None
    teacher_weight: Optional[torch.Tensor] = None
    teacher_bias: Optional[torch.Tensor] = None
    old_logprobs: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    policy_weights: Optional[torch.Tensor] = None
    entropy_weights: Optional[torch.Tensor] = None

    def pack(self) -> dict:
        """The op's keyword arguments: the tensors given, and each list only when some entry
        differs from its default (an empty list means every default)."""
        kwargs = {name: t for name, t in zip(TENSOR_NAMES, self[_TENSORS]) if t is not None}
        floats, ints = self[_FLOATS], self[_INTS]
        if floats != FLOAT_DEFAULTS:
            kwargs["term_floats"] = [float(x) for x in floats]
        if ints != INT_DEFAULTS:
            kwargs["term_ints"] = [int(x) for x in ints]
        return kwargs

    @classmethod
    def unpack(cls, term_floats, term_ints, tensors=()) -> "TermOptions":
        """The options of an op call from its `term_floats`, `term_ints` and term tensors (in
        TENSOR_NAMES order); the lengths are checked as the C++ op checks them."""
        floats = _checked("term_floats", term_floats, FLOAT_DEFAULTS)
        ints = _checked("term_ints", term_ints, INT_DEFAULTS)
        tensors = tuple(tensors) or (None,) * len(TENSOR_NAMES)
        return cls(*floats, *(t(x) for t, x in zip(_INT_TYPES, ints)), *tensors)


def _checked(name: str, values, defaults: tuple) -> tuple:
    if not values:
        return defaults
    if len(values) != len(defaults):
        raise ValueError(
            f"fusedce: {name} must be empty (all defaults) or hold {len(defaults)} values in "
            f"this order: {' '.join(_NAMES[name])}; got {len(values)} values (build it with "
            "fusedce._op_args.TermOptions(...).pack())")
    return tuple(values)


def _kind(annotation) -> str:
    """The C++ type of a field's layout entry ("double", "bool", "int64_t") or "Tensor"."""
    if annotation is float:
        return "double"
    if annotation is bool:
        return "bool"
    if annotation is int:
        return "int64_t"
    if annotation == Optional[torch.Tensor]:
        return "Tensor"
    raise TypeError(f"fusedce: TermOptions field of unsupported type {annotation!r}")


_HINTS = typing.get_type_hints(TermOptions)
_FIELD_KINDS = [(name, _kind(_HINTS[name])) for name in TermOptions._fields]
_KIND_ORDER = [k for i, (_, k) in enumerate(_FIELD_KINDS)
               if i == 0 or _FIELD_KINDS[i - 1][1] != k]
# pack() slices the tuple: the floats, then the ints (bool or int), then the tensors, each block
# contiguous.
_N_FLOATS = sum(k == "double" for _, k in _FIELD_KINDS)
_N_INTS = sum(k in ("bool", "int64_t") for _, k in _FIELD_KINDS)
_FLOATS = slice(0, _N_FLOATS)
_INTS = slice(_N_FLOATS, _N_FLOATS + _N_INTS)
_TENSORS = slice(_N_FLOATS + _N_INTS, None)
if not (all(k == "double" for _, k in _FIELD_KINDS[_FLOATS])
        and all(k in ("bool", "int64_t") for _, k in _FIELD_KINDS[_INTS])
        and all(k == "Tensor" for _, k in _FIELD_KINDS[_TENSORS])):
    raise TypeError("fusedce: TermOptions must list its float fields, then its bool/int fields, "
                    f"then its tensors; got {_FIELD_KINDS}")

_DEFAULTS = TermOptions()
FLOAT_NAMES = TermOptions._fields[_FLOATS]
INT_NAMES = TermOptions._fields[_INTS]
TENSOR_NAMES = TermOptions._fields[_TENSORS]
FLOAT_DEFAULTS = tuple(_DEFAULTS[_FLOATS])
INT_DEFAULTS = tuple(_DEFAULTS[_INTS])
_INT_TYPES = tuple(bool if k == "bool" else int for _, k in _FIELD_KINDS[_INTS])
_NAMES = {"term_floats": FLOAT_NAMES, "term_ints": INT_NAMES}
# Where the flags that change the ops' outputs sit in term_ints.
WANT_ENTROPY = INT_NAMES.index("want_entropy")
WANT_LOGPROB = INT_NAMES.index("want_logprob")
WANT_MEAN_LOGIT = INT_NAMES.index("want_mean_logit")
WANT_LOG_SUM_SQ = INT_NAMES.index("want_log_sum_sq")


def layout() -> dict:
    """This module's table in the form of fusedce._C.term_layout()."""
    kinds = dict(_FIELD_KINDS)
    return {
        "term_floats": [(n, kinds[n], float(d)) for n, d in zip(FLOAT_NAMES, FLOAT_DEFAULTS)],
        "term_ints": [(n, kinds[n], int(d)) for n, d in zip(INT_NAMES, INT_DEFAULTS)],
        "tensors": list(TENSOR_NAMES),
    }


def check_layout(compiled: dict) -> None:
    """Raise ImportError unless `compiled` (fusedce._C.term_layout()) equals this module's table:
    same entries, names, C++ types, defaults and order."""
    mine = layout()
    theirs = {k: [tuple(e) if isinstance(e, (list, tuple)) else e for e in v]
              for k, v in compiled.items()}
    for key in ("term_floats", "term_ints", "tensors"):
        if mine[key] != theirs.get(key):
            raise ImportError(
                f"fusedce: the layout of {key} in fusedce/_op_args.py (TermOptions) differs from "
                f"the compiled one (csrc/terms_args.h):\n  python: {mine[key]}\n  C++:    "
                f"{theirs.get(key)}\nUpdate TermOptions to match, or rebuild fusedce._C.")


def op_kwargs(**kwargs) -> dict:
    """Keyword arguments of fusedce::loss / loss_backward with the terms written by name
    (want_entropy=True, teacher_logits=..., as TermOptions names them) -> the op's keyword
    arguments, the terms packed. For direct op calls (tests, benchmarks)."""
    terms = {k: kwargs.pop(k) for k in list(kwargs) if k in TermOptions._fields}
    return {**kwargs, **TermOptions(**terms).pack()}
