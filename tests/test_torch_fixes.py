"""fusedce._torch_fixes: the linear fill_defaults it installs into torch._library returns exactly
what torch's own returns, and is installed only over the torch source it was checked against."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch
import torch._library.utils as library_utils

import fusedce  # noqa: F401  (installs the fix)
from fusedce import _torch_fixes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _schemas():
    """Every schema of the fusedce library: the ops whose autograd forward calls fill_defaults,
    and the others (the helper is general; so is the check)."""
    out = []
    for qualified in sorted(torch._C._dispatch_get_all_op_names()):
        namespace, _, name = qualified.partition("::")
        if namespace != "fusedce":
            continue
        name, _, overload = name.partition(".")
        out.append(getattr(getattr(torch.ops.fusedce, name), overload or "default")._schema)
    return out


SCHEMAS = _schemas()


def test_every_op_is_covered():
    names = {s.name for s in SCHEMAS}
    assert {"fusedce::loss", "fusedce::cross_entropy", "fusedce::shard_finish"} <= names


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.name)
def test_equals_torch_on_every_schema(schema):
    # The dispatcher hands the autograd wrapper a prefix of the positional arguments (trailing
    # defaults elided) and any subset of the keyword-only ones: every prefix length, random
    # subsets, and arguments that are not in the schema at all (ignored by both).
    rng = random.Random(0)
    arguments = schema.arguments
    positional = [a for a in arguments if not a.kwarg_only]
    keyword = [a.name for a in arguments if a.kwarg_only]
    for n in range(len(positional) + 1):
        for _ in range(4):
            args = tuple(object() for _ in range(n))
            kwargs = {k: object() for k in keyword if rng.random() < 0.5}
            if rng.random() < 0.3:
                kwargs["not_an_argument"] = object()
            want = _torch_fixes.original_fill_defaults(schema, args, kwargs)
            # the cached fast path, and the general loop it falls back on for a schema with a
            # keyword-only argument before a positional one
            for fn in (_torch_fixes.fill_defaults, _torch_fixes._fill_general):
                got = fn(schema, args, kwargs)
                assert type(got) is type(want) and len(got) == 2
                assert type(got[0]) is tuple and len(got[0]) == len(want[0]) and all(
                    g is w or g == w for g, w in zip(got[0], want[0]))
                assert got[1].keys() == want[1].keys()
                assert all(got[1][k] is want[1][k] or got[1][k] == want[1][k] for k in want[1])


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.name)
def test_cached_defaults_are_not_shared(schema):
    # The replacement caches each schema's defaults: a list default it returns must be a new list
    # on every call (as torch's, which converts it anew), so mutating one result cannot change
    # the defaults of the next call; and a second call returns the same values as the first.
    first = _torch_fixes.fill_defaults(schema, (), {})
    for value in (*first[0], *first[1].values()):
        if type(value) is list:
            value.append("mutated")
    second = _torch_fixes.fill_defaults(schema, (), {})
    want = _torch_fixes.original_fill_defaults(schema, (), {})
    assert list(second[0]) == list(want[0]) and second[1] == want[1]


def test_installed_where_the_source_is_known():
    assert _torch_fixes.installed == _torch_fixes.applies()
    expect = _torch_fixes.fill_defaults if _torch_fixes.applies() else _torch_fixes.original_fill_defaults
    assert library_utils.fill_defaults is expect


def test_unknown_source_is_left_alone(monkeypatch):
    # A torch whose fill_defaults is not the checked source (fixed upstream, or changed in what it
    # does) keeps its own function.
    def theirs(schema, args, kwargs):
        return args, kwargs

    monkeypatch.setattr(library_utils, "fill_defaults", theirs)
    assert _torch_fixes.install() is False
    assert library_utils.fill_defaults is theirs
    monkeypatch.setattr(_torch_fixes, "_source_digest", lambda fn: "0" * 64)
    monkeypatch.setattr(library_utils, "fill_defaults", _torch_fixes.original_fill_defaults)
    assert _torch_fixes.install() is False
    assert library_utils.fill_defaults is _torch_fixes.original_fill_defaults


def test_opt_out_leaves_torch_untouched():
    code = ("import torch._library.utils as u; f = u.fill_defaults; import fusedce; "
            "from fusedce import _torch_fixes as t; "
            "assert u.fill_defaults is f and not t.installed; print('ok')")
    env = dict(os.environ, FUSEDCE_TORCH_FIXES="0",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_build_info_says_whether_it_is_in_place():
    assert fusedce.build_info()["torch_fill_defaults_fix"] is _torch_fixes.installed
