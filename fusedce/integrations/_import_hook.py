"""A meta-path hook that runs a callback right after a matching module is executed, so that an
integration can patch a library module imported after install()."""

from __future__ import annotations

import importlib.abc
import importlib.util


class PostImportHook(importlib.abc.MetaPathFinder):
    """`after(module)` runs once `module` (a name for which `matches(name)` holds) is executed."""

    def __init__(self, matches, after):
        self._matches = matches
        self._after = after
        self._busy = set()  # names being looked up by this hook itself (find_spec recurses)

    def find_spec(self, name, path=None, target=None):
        if not self._matches(name) or name in self._busy:
            return None
        self._busy.add(name)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy.discard(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module
        after = self._after

        def exec_module(module):
            loader_exec(module)
            after(module)

        spec.loader.exec_module = exec_module
        return spec
