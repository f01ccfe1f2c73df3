"""Layering, checked on the source (ast) so it cannot drift.

The checks read one import graph of the package: a node per module (a package is its
``__init__``), and an edge A -> B, recorded with A's file and line, when A's source anywhere
(module level, inside a function, under ``TYPE_CHECKING``):

* imports B: ``import sft_actors.x.y`` -> ``sft_actors.x.y``; ``from sft_actors.x import y``
  -> ``sft_actors.x.y`` when that is a module, else ``sft_actors.x`` (the name then comes from
  the package's ``__init__``); relative imports are resolved the same way;
* names B in a string, ``"sft_actors.x.y"`` or ``"sft_actors.x.y:attr"``: a ``python -m``
  argument, a role factory resolved lazily, an ``importlib`` argument. Such an edge is hidden
  from an import scan but is a dependency all the same.

Importing ``sft_actors.x.y`` also runs ``sft_actors/x/__init__.py``; that implicit step is
not an edge, or every package that re-exports its submodules would form a cycle with them.
Type-only imports are edges: they couple modules as much as any other, so a cycle they close
must be listed, with its reason, in ``ALLOWED_CYCLES``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "sft_actors"
PURE = ("wire", "codec", "model", "data", "train", "plan")
FORBIDDEN = ("sft_actors.actors", "sft_actors.transport", "sft_actors.runtime", "sft_actors.cli")
IMPORT_FUNCTIONS = {"import_module", "__import__"}

# Cycles that exist on purpose -> why. A cycle is allowed only when its modules are exactly
# one entry here: a grown or a new cycle fails, and so does an entry that is no longer a cycle.
ALLOWED_CYCLES: dict[frozenset[str], str] = {
    frozenset(
        {
            "sft_actors.actors.base",
            "sft_actors.actors.liveness",
            "sft_actors.actors.core",
            "sft_actors.actors.env",
        }
    ): (
        "type-only: env.py names Actor (for ActorFactory) under TYPE_CHECKING; "
        "at run time the imports go base -> liveness -> core -> env only"
    ),
}


@dataclass(frozen=True, slots=True)
class Edge:
    source: str
    target: str
    where: str  # path:line of the import or string in the source module


def _module_names(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute name ``from ... import`` reads from (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(node: ast.AST, module: str, path: Path, modules: dict[str, Path]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names if a.name in modules)
    elif isinstance(node, ast.ImportFrom):
        base = _resolve(node, module, path.name == "__init__.py")
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in modules:
                yield sub
            elif base in modules:
                yield base
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
        name = node.value.partition(":")[0]
        if "." in name and name in modules:  # the bare package name is also a directory name
            yield name


def import_graph(root: Path = PKG) -> dict[str, list[Edge]]:
    """Module -> its edges, as the module docstring defines them."""
    modules = _module_names(root)
    graph: dict[str, list[Edge]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, [])
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for target in _targets(node, module, path, modules):
                if target != module:
                    where = f"{path.relative_to(root.parent)}:{getattr(node, 'lineno', '?')}"
                    edges.append(Edge(module, target, where))
    return graph


def _cycles(graph: dict[str, list[Edge]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for e in graph[v]:
            if e.target not in index:
                visit(e.target)
                low[v] = min(low[v], low[e.target])
            elif e.target in stack:
                low[v] = min(low[v], index[e.target])
        if low[v] == index[v]:
            comp = set()
            while (w := stack.pop()) != v:
                comp.add(w)
            if comp:
                found.append(frozenset({v, *comp}))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(component: frozenset[str], graph: dict[str, list[Edge]]) -> str:
    """A shortest path around the cycle from its first module, each step with its line."""
    start = min(component)
    came_by: dict[str, Edge] = {}
    frontier = [start]
    while frontier:  # breadth-first inside the component, until an edge returns to start
        nxt = []
        for at in frontier:
            for e in graph[at]:
                if e.target == start:
                    steps = [e]
                    while steps[0].source != start:
                        steps.insert(0, came_by[steps[0].source])
                    path = "; ".join(f"{s.source} -> {s.target} ({s.where})" for s in steps)
                    return f"cycle: {path} [modules: {', '.join(sorted(component))}]"
                if e.target in component and e.target not in came_by:
                    came_by[e.target] = e
                    nxt.append(e.target)
        frontier = nxt
    raise AssertionError(f"{sorted(component)} is not a cycle")


def _dynamic_imports(root: Path = PKG) -> list[str]:
    """``importlib.import_module`` / ``__import__`` calls whose argument names a package module."""
    hits = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = (
                func.attr
                if isinstance(func, ast.Attribute)
                else func.id
                if isinstance(func, ast.Name)
                else ""
            )
            args = [*node.args[:1], *(k.value for k in node.keywords if k.arg == "name")]
            if name in IMPORT_FUNCTIONS and any(_names_package(a, root.name) for a in args):
                hits.append(f"{path.relative_to(root.parent)}:{node.lineno}: {ast.unparse(node)}")
    return hits


def _names_package(arg: ast.expr, package: str) -> bool:
    """Whether ``arg`` starts with a literal naming ``package`` or a relative module."""
    while isinstance(arg, ast.BinOp):  # "sft_actors." + name
        arg = arg.left
    if isinstance(arg, ast.JoinedStr) and arg.values:  # f"sft_actors.{name}"
        arg = arg.values[0]
    return (
        isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith((package, "."))
    )


GRAPH = import_graph()


@pytest.mark.parametrize("layer", PURE)
def test_pure_layer_does_not_import_runtime_code(layer: str) -> None:
    modules = [m for m in GRAPH if m.startswith(f"sft_actors.{layer}")]
    assert modules, f"no modules in sft_actors/{layer}"
    bad = [
        f"{e.where}: {e.source} -> {e.target}"
        for m in modules
        for e in GRAPH[m]
        if e.target.startswith(FORBIDDEN)
    ]
    assert not bad, f"the pure layer {layer} must not depend on actors/transport/runtime/cli:\n" + "\n".join(
        bad
    )


#: The tensor <-> frame glue: only the wire layer and the actors (who speak the protocol) use it.
FRAME_GLUE = ("sft_actors.wire.coded", "sft_actors.wire.envelope", "sft_actors.wire.tensors")


def test_training_code_hands_tensors_not_frames() -> None:
    """train/, model/, data/ and plan/ may name wire *types* (a plan, a stats record) but never
    pack or unpack frames: that is wire/'s job, called by the actors."""
    bad = [
        f"{e.where}: {e.source} -> {e.target}"
        for module, edges in GRAPH.items()
        if module.startswith(("sft_actors.train", "sft_actors.model", "sft_actors.data", "sft_actors.plan"))
        for e in edges
        if e.target.startswith(FRAME_GLUE)
    ]
    assert not bad, "frame packing belongs to sft_actors.wire (called by actors):\n" + "\n".join(bad)


def test_nothing_below_the_cli_depends_on_it() -> None:
    """The CLI imports the runtime, never the reverse: runtime.py (and every other module
    outside cli/) neither imports ``sft_actors.cli`` nor starts it by name (``-m``)."""
    bad = [
        f"{e.where}: {e.source} -> {e.target}"
        for module, edges in GRAPH.items()
        if not module.startswith("sft_actors.cli")
        for e in edges
        if e.target.startswith("sft_actors.cli")
    ]
    assert not bad, "only sft_actors/cli may depend on sft_actors.cli:\n" + "\n".join(bad)


def test_no_dynamic_imports_of_the_package() -> None:
    """A module of the package imported by name through importlib hides an edge from every
    import scan; import it (at the top, or inside the function that needs it) instead."""
    hits = _dynamic_imports()
    assert not hits, "import these modules with an import statement:\n" + "\n".join(hits)


def test_no_import_cycles() -> None:
    """Modules import each other in one direction only, function-local imports included."""
    bad = [_describe(c, GRAPH) for c in _cycles(GRAPH) if c not in ALLOWED_CYCLES]
    assert not bad, "import cycles (break them with a module both sides import):\n" + "\n".join(bad)


def test_allowed_cycles_are_still_cycles() -> None:
    stale = set(ALLOWED_CYCLES) - set(_cycles(GRAPH))
    assert not stale, f"no longer cycles, delete them from ALLOWED_CYCLES: {[sorted(c) for c in stale]}"


def test_the_checks_see_hidden_edges(tmp_path: Path) -> None:
    """The checker itself: a function-local cycle, a relative import, a ``-m`` string and an
    importlib call are all found."""
    pkg = tmp_path / "sft_actors"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from sft_actors.sub.a import f\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "sub" / "b.py").write_text("import importlib\nimportlib.import_module('sft_actors.sub.a')\n")
    (pkg / "runner.py").write_text(
        "ARGS = ['-m', 'sft_actors.sub.a']\nimport importlib\n__import__(f'sft_actors.{1}')\n"
    )
    graph = import_graph(pkg)
    assert _cycles(graph) == [frozenset({"sft_actors.sub.a", "sft_actors.sub.b"})]
    assert "sft_actors.sub.a -> sft_actors.sub.b (sft_actors/sub/a.py:2)" in _describe(
        _cycles(graph)[0], graph
    )
    assert [e.target for e in graph["sft_actors.runner"]] == ["sft_actors.sub.a"]
    assert [h.split(":")[:2] for h in _dynamic_imports(pkg)] == [
        ["sft_actors/runner.py", "3"],
        ["sft_actors/sub/b.py", "2"],
    ]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):  # function-local imports count too
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_pickle_in_the_package() -> None:
    """Only the CIFAR-100 reader touches pickle (its release format), through a restricted
    unpickler; nothing else may import it."""
    users = {p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if "pickle" in _imports(p)}
    assert users <= {"data/safe_pickle.py"}, users
