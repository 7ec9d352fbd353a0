"""One host-cost fix in torch's custom-op autograd wrapper, applied only where it is provably equal.

torch._library.autograd calls ``torch._library.utils.fill_defaults(op._schema, args, kwargs)`` in
the forward of every op registered with ``register_autograd(..., setup_context=...)``: every call
of fusedce::loss, the op under all the fused losses. That helper reads ``schema.arguments`` (a
pybind property that converts the whole argument list into a new Python list) once per argument,
so one call builds n * (n + 1) Argument objects. For fusedce::loss (26 arguments) that measured
188 us per call on a 2-core CI machine, two thirds of the autograd wrapper's cost and more than
the op itself at small sizes (benchmarks/NOTES.md, "host cost"). The upstream fix (read the list
once) is pytorch/pytorch#195110, open at the time of writing.

Our version reads each schema's arguments through pybind once and caches their names, kinds
and defaults (one schema of ~27 arguments costs ~30 Argument conversions even when read once
per call). We install it only when torch's own function is, character for character, a
source we checked (its SHA-256 below: the same in every release from torch 2.9 to 2.13). Any other
torch, one that fixed it or changed what it does, keeps its own. The replacement returns what the
original returns for every input (tests/test_torch_fixes.py compares both on every fusedce
schema). It changes nothing but speed, for every custom op in the process; FUSEDCE_TORCH_FIXES=0
leaves torch untouched.
"""

from __future__ import annotations

import hashlib
import inspect
import os

import torch._library.utils as _library_utils

# sha256 of inspect.getsource(torch._library.utils.fill_defaults) in the torch releases whose
# function was read and found quadratic (2.9.0, 2.10.0, 2.11.0, 2.12.0, 2.13.0: one source).
_KNOWN_QUADRATIC = frozenset({
    "d95c8d479a68be8a958994e7a61e5322543f1428187f4487bc5837b57babde35",
})

original_fill_defaults = _library_utils.fill_defaults


# Per schema, (name, kwarg_only, default) of each argument: reading them through pybind costs a
# new Argument object and three property conversions per argument on every call (~27 arguments
# of fusedce::loss). Keyed by id(schema) with the schema held in the entry, so an id is never
# reused while cached; the callers pass long-lived schemas (an OpOverload's), and the size cap
# keeps a caller that builds schemas per call from growing it without bound.
_PLANS: dict = {}
_MAX_PLANS = 1024


def _plan(schema):
    """(positional defaults, keyword-only (name, default) pairs) of `schema`, or None when a
    keyword-only argument precedes a positional one (no schema torch parses does that; the general
    loop then handles it)."""
    hit = _PLANS.get(id(schema))
    if hit is not None and hit[0] is schema:
        return hit[1]
    arguments = [(a.name, a.kwarg_only, a.default_value) for a in schema.arguments]
    n_pos = sum(not kw for _, kw, _ in arguments)
    if any(kw for _, kw, _ in arguments[:n_pos]):
        plan = None
    else:
        plan = (tuple(d for _, _, d in arguments[:n_pos]),
                tuple((name, d) for name, _, d in arguments[n_pos:]))
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[id(schema)] = (schema, plan)
    return plan


def fill_defaults(schema, args, kwargs):
    """(args, kwargs) with every schema argument present: the positional ones from `args` or
    their defaults, the keyword-only ones from `kwargs` or their defaults. torch converts a
    default anew on each read, so a list default is a new list on each call (a caller that
    mutates it cannot change the next call's default): the cached one is copied."""
    plan = _plan(schema)
    if plan is None:
        return _fill_general(schema, args, kwargs)
    positional, keyword = plan
    n = len(args)
    # _fresh inlined: this runs on every call of every custom op with an autograd formula
    new_args = tuple(args[:len(positional)]) + tuple(
        list(d) if type(d) is list else d for d in positional[n:])
    new_kwargs = {name: kwargs[name] if name in kwargs else (list(d) if type(d) is list else d)
                  for name, d in keyword}
    return new_args, new_kwargs


def _fill_general(schema, args, kwargs):
    arguments = schema.arguments  # one conversion of the list, not one per argument
    new_args = []
    new_kwargs = {}
    for i, info in enumerate(arguments):
        if info.kwarg_only:
            new_kwargs[info.name] = kwargs[info.name] if info.name in kwargs else info.default_value
        elif i < len(args):
            new_args.append(args[i])
        else:
            new_args.append(info.default_value)
    return tuple(new_args), new_kwargs


def _source_digest(fn) -> str | None:
    try:
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()
    except (OSError, TypeError):  # no source shipped (a frozen or stripped install)
        return None


def applies() -> bool:
    """Whether this torch's fill_defaults is one of the known quadratic sources."""
    return _source_digest(original_fill_defaults) in _KNOWN_QUADRATIC


def install() -> bool:
    """Install the linear fill_defaults where it applies; True when it is in place."""
    if os.environ.get("FUSEDCE_TORCH_FIXES", "1") == "0":
        return False
    if _library_utils.fill_defaults is fill_defaults:
        return True
    if _library_utils.fill_defaults is not original_fill_defaults or not applies():
        return False
    _library_utils.fill_defaults = fill_defaults
    return True


installed = install()
