"""The import graph of the dcamkd package: no circle, and no import from a lower layer back up.

Every module is parsed with ``ast``; an import counts wherever it is written (module level or
inside a function), and so does a string given to ``importlib.import_module``. The layers are
declared once, below, lowest first; a module may import its own layer and the layers below it.
A new module must be placed in a layer (the test names it otherwise).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dcamkd"

#: Lowest first. The package root ``dcamkd`` is a facade on top: it re-exports the Detector API
#: (imported on first use); its modules take ``__version__`` from ``dcamkd._version``.
LAYERS = [
    ("ground floor: errors, files, torch-free settings and tables",
     ["dcamkd._version", "dcamkd.errors", "dcamkd.io", "dcamkd.impls", "dcamkd.objective", "dcamkd.device",
      "dcamkd.backbones", "dcamkd.config"]),
    ("reference and build", ["dcamkd.reference", "dcamkd._build"]),
    ("Triton kernels", ["dcamkd.kernels", "dcamkd.kernels.*"]),
    ("ops", ["dcamkd.ops", "dcamkd.ops.*"]),
    ("library", ["dcamkd.losses", "dcamkd.dcam", "dcamkd.scoring", "dcamkd.models", "dcamkd.data",
                 "dcamkd.demo_data", "dcamkd.metrics", "dcamkd.distributed", "dcamkd.precision"]),
    ("application", ["dcamkd.checkpoint", "dcamkd.calibration", "dcamkd.train", "dcamkd.evaluate",
                     "dcamkd.predict", "dcamkd.export", "dcamkd.ablate", "dcamkd.detector", "dcamkd.rescore"]),
    ("command line and package facade", ["dcamkd.cli", "dcamkd"]),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _absolute(module: str, is_package: bool, target: str | None, level: int) -> str:
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    """``module -> the dcamkd modules it imports`` (``from X import name`` counts as X.name when
    that is a module, else X; importlib.import_module("dcamkd...") strings count too)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps: set[str] = set()
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(mod, is_pkg, node.module, node.level)
                for a in node.names:
                    deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
            elif isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
                    arg = node.args[0].value
                    pkg = node.args[1].value if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) else None
                    if isinstance(arg, str) and arg.startswith(".") and pkg:
                        arg = _absolute(pkg + ".x", False, arg.lstrip("."), len(arg) - len(arg.lstrip(".")))
                    deps.add(arg)
        graph[mod] = {d for d in deps if d in mods and d != mod}
    return graph


def _layer_of(mod: str) -> int:
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            if mod == n or (n.endswith(".*") and mod.startswith(n[:-1])):
                return i
    raise AssertionError(f"module {mod} is in no layer: add it to LAYERS in {__file__}")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_parser_sees_what_it_must():
    g = import_graph()
    assert "dcamkd.ops._impl" in g["dcamkd.ops.pyramid_loss"]  # from . import _impl
    assert "dcamkd.kernels.pyramid_loss" in g["dcamkd.ops.pyramid_loss"]  # inside a function
    assert "dcamkd.reference" in g["dcamkd.kernels.pyramid_loss"]  # from ..reference import X
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert _cycles(import_graph()) == []


def test_layers_only_import_downwards():
    bad = []
    for mod, deps in sorted(import_graph().items()):
        for d in sorted(deps):
            if _layer_of(d) > _layer_of(mod):
                bad.append(f"{mod} ({LAYERS[_layer_of(mod)][0]}) imports {d} ({LAYERS[_layer_of(d)][0]})")
    assert bad == []


def test_kernels_know_nothing_of_the_ops():
    g = import_graph()
    for mod, deps in g.items():
        if mod.startswith("dcamkd.kernels"):
            assert not any(d.startswith("dcamkd.ops") for d in deps), (mod, deps)
