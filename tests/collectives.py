"""A test tool: counts the collectives issued through torch.distributed's public functions (it
patches them while active). The vocab-parallel and FSDP tests assert the counts; the distributed
benchmark (benchmarks/bench_distributed.py) imports it from here to report collectives per step."""

from __future__ import annotations

import torch.distributed as dist


class CollectiveCounter:
    """``with CollectiveCounter() as cc: ...; cc.calls``: the names of the collectives called in
    the block, in order."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast",
             "reduce_scatter_tensor", "all_to_all_single", "reduce", "gather", "scatter")

    def __enter__(self):
        self.calls, self.saved = [], {}
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self.saved[name] = fn

            def wrapped(*a, __fn=fn, __name=name, **k):
                self.calls.append(__name)
                return __fn(*a, **k)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)

    def take(self):
        """The calls so far (and start counting afresh)."""
        out, self.calls = self.calls, []
        return out
