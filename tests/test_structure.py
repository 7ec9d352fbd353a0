"""The import structure of the fusedce package is a tree (a DAG): no module imports, directly or
through others, a module that imports it. Every import statement counts, those inside functions
too, so a circle cannot hide behind a lazy import. Imports of third-party packages (torch,
transformers, trl, ...) are not edges of this graph. Reads the source with `ast`; imports nothing.
"""

from __future__ import annotations

import ast
import os
import textwrap

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fusedce")
# The compiled extension (setup.py's fusedce._C): `from . import _C` names a module even where no
# build has made the file yet.
EXTENSIONS = {"_C"}


def _modules(root, package):
    """{dotted module name: (path, is_package)} of every .py file under root."""
    mods = {}
    for d, _, files in os.walk(root):
        rel = os.path.relpath(d, root)
        prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
        for f in files:
            if f.endswith(".py"):
                name = prefix if f == "__init__.py" else prefix + "." + f[:-3]
                mods[name] = (os.path.join(d, f), f == "__init__.py")
    return mods


def import_graph(root=ROOT, package="fusedce"):
    """{module: {modules of the package it imports}}, from every import statement at any depth
    (and importlib.import_module("<package>.x") with a literal name). `from p import name` is an
    edge to p.name when that is a module of the package, else to p (name is p's attribute).
    Modules outside the package are not nodes."""
    mods = _modules(root, package)
    graph = {}
    for name, (path, is_pkg) in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        here = name if is_pkg else name.rpartition(".")[0]
        edges = set()

        def add(target):
            # A module without a source file here (generated at build time, or compiled) is a
            # leaf: it imports nothing of the package.
            if target in mods and target != name:
                edges.add(target)

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    base = base + "." + node.module if node.module else base
                else:
                    base = node.module
                for alias in node.names:
                    full = base + "." + alias.name
                    if full in mods or alias.name in EXTENSIONS:
                        add(full)
                    else:  # an attribute of base (the name of a compiled extension is not)
                        add(base)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module" and node.args
                  and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                add(node.args[0].value)
        graph[name] = edges
    return graph


def find_cycle(graph):
    """One import circle as a list [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def _closure(graph, start):
    seen, todo = set(), [start]
    while todo:
        for n in graph[todo.pop()]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_fusedce_imports_form_a_tree():
    graph = import_graph()
    assert "fusedce.functional" in graph and "fusedce._parallel" in graph, sorted(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle in fusedce: " + " -> ".join(cycle)


def test_parallel_layer_is_below_the_public_functions():
    """The vocab-parallel layer is communication only: it never reaches the public functions
    (they check the arguments and call it), the integrations or the package's __init__."""
    graph = import_graph()
    above = {"fusedce", "fusedce.functional", "fusedce.terms", "fusedce.preference",
             "fusedce.distributed", "fusedce.modules", "fusedce.nn"}
    reached = _closure(graph, "fusedce._parallel")
    assert not reached & above, sorted(reached & above)
    assert not any(m.startswith("fusedce.integrations") for m in reached), sorted(reached)
    assert "fusedce._parallel" in graph["fusedce.functional"] and "fusedce._parallel" in graph["fusedce.terms"]


def test_a_circle_through_a_function_level_import_is_found(tmp_path):
    """The checker itself: a circle closed by an import inside a function, written in the three
    forms (relative from-import of a module, of an attribute, absolute import), is reported."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from .sub.b import g\n\ndef f():\n    return g()\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(textwrap.dedent("""\
        import os

        def g():
            from ..c import h
            return h()
        """))
    (pkg / "c.py").write_text("from . import _C\n\ndef h():\n    from . import a\n    return a\n")
    graph = import_graph(str(pkg), "pkg")
    assert graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}, graph
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    # absolute form, and no circle once it is gone
    (pkg / "c.py").write_text("def h():\n    import pkg.a\n    return pkg.a\n")
    assert find_cycle(import_graph(str(pkg), "pkg")) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("import torch\n\ndef h():\n    return torch\n")
    assert find_cycle(import_graph(str(pkg), "pkg")) is None


if __name__ == "__main__":  # print the graph: python tests/test_structure.py
    for m, deps in sorted(import_graph().items()):
        print(f"{m} -> {', '.join(sorted(deps)) or '(none)'}")


# Elementwise math of a softmax term: none of it in the vocab-parallel layer (every kind, the
# plain CE included, merges its ranks' partials in fusedce::shard_finish).
_SOFTMAX_MATH = {"exp", "log", "log1p", "expm1", "logsumexp", "softmax", "log_softmax", "logaddexp",
                 "tanh", "sigmoid", "xlogy", "special"}


def test_parallel_layer_has_no_term_math():
    """Issue 11: every term's math lives in fusedce/reference.py and the kernels only. The
    parallel layer calls the shard ops; a torch.exp / log / softmax / tanh ... call there would
    be a term re-derived in Python."""
    path = os.path.join(ROOT, "_parallel.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef):
            continue
        for node in ast.walk(fn):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in _SOFTMAX_MATH):
                found.append(f"{fn.name} (line {node.lineno}): .{node.func.attr}(...)")
    assert not found, "softmax math in fusedce/_parallel.py:\n" + "\n".join(found)
