"""The pure layers never import the runtime: checked on the source, so it cannot drift."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "sft_actors"
PURE = ("wire", "codec", "model", "data", "train", "plan")
FORBIDDEN = ("sft_actors.actors", "sft_actors.transport", "sft_actors.runtime", "sft_actors.cli")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):  # function-local imports count too
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", PURE)
def test_pure_layer_does_not_import_runtime_code(layer: str) -> None:
    files = sorted((PKG / layer).rglob("*.py"))
    assert files, f"no modules in sft_actors/{layer}"
    bad = {
        f"{path.relative_to(PKG.parent)} imports {name}"
        for path in files
        for name in _imports(path)
        if name.startswith(FORBIDDEN)
    }
    assert not bad, sorted(bad)


def test_no_pickle_in_the_package() -> None:
    """Only the CIFAR-100 reader touches pickle (its release format), through a restricted
    unpickler; nothing else may import it."""
    users = {p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if "pickle" in _imports(p)}
    assert users <= {"data/safe_pickle.py"}, users
