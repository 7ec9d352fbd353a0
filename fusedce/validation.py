"""Opt-in target validation: the host-side check that a default CUDA call does not make.

By default no CUDA call of fusedce reads a device value back on the host (no host sync, CUDA-graph
capturable). A target outside [0, V) that is not ``ignore_index`` is then never used as an index;
it makes that token's loss NaN (so a reduced loss is NaN), and its gradient row NaN as well whenever
that loss receives a gradient (a ``torch.amp.GradScaler`` then skips the step). The CPU always
checks, since reading the targets costs nothing there.

Inside ``with fusedce.validate_targets():``, or with the environment variable ``FUSEDCE_VALIDATE=1``,
every CUDA call checks its targets on the host first (one host sync per call; skipped while a CUDA
graph is being captured) and raises ``RuntimeError`` naming the first bad index and its value.
"""

from __future__ import annotations

import contextlib
import os


def _c():
    from . import _C  # the compiled module; the C++ ops read the same process-wide switch

    return _C


@contextlib.contextmanager
def validate_targets():
    """Check the targets of every fusedce call made inside the block (process-wide, nestable)."""
    c = _c()
    c._validate_targets(1)
    try:
        yield
    finally:
        c._validate_targets(-1)


def validation_enabled() -> bool:
    """Whether calls check their targets on the host: a validate_targets() block is open or
    FUSEDCE_VALIDATE is set (to anything but "" or "0")."""
    c = _c()
    if hasattr(c, "_validation_enabled"):
        return bool(c._validation_enabled())
    return os.environ.get("FUSEDCE_VALIDATE", "") not in ("", "0")
