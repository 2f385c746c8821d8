"""The tree's layers point one way: cli -> api -> passes / integrations -> parallel -> policy / attention -> kernels.

Every import statement of `moba_rewrite/` and `passes/` is read (including imports inside
functions, excluding `if TYPE_CHECKING:` blocks, which create no run-time dependency), and
the test fails on an import from a higher layer or on a cycle between modules. The layer map
is docs/ARCHITECTURE.md's; change both together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("moba_rewrite", "passes")

# Lowest layer first. A module belongs to the longest prefix listed; it may import modules of
# its own layer or of lower ones.
LAYERS: list[tuple[str, ...]] = [
    ("moba_rewrite.kernels",),
    ("moba_rewrite.attention", "moba_rewrite.policy", "moba_rewrite.exit_codes", "moba_rewrite.third_party"),
    ("moba_rewrite.parallel",),  # context parallelism: the op over torch.distributed
    ("passes", "moba_rewrite.integrations"),
    ("moba_rewrite.report", "moba_rewrite.api", "moba_rewrite.routes", "moba_rewrite.exporters",
     "moba_rewrite.checkpoints", "moba_rewrite.checkpoint_weights", "moba_rewrite.dynamo_backend",
     "moba_rewrite.discovery", "moba_rewrite.evaluation"),
    ("moba_rewrite.cli", "moba_rewrite"),  # the command, and the package's public facade over everything
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(path)] = path
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every project import in the file, outside TYPE_CHECKING blocks."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.append((node.lineno, sub if sub in MODULES else node.module))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [(line, name) for line, name in found if name.split(".")[0] in PACKAGES and name in MODULES]


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            inside = module == p or (module.startswith(p + ".") and p != "moba_rewrite")  # the facade: itself only
            if inside and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is in no layer of tests/test_layering.py"
    return rank


GRAPH = {m: _imports(p) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {target} "
              f"(layer {_layer(target)} above {_layer(m)})"
              for m, edges in GRAPH.items() for line, target in edges if _layer(target) > _layer(m)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for _, target in GRAPH[m]:
            if target == m:
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                walk(target)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            walk(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("package", sorted(m for m, p in MODULES.items() if p.name == "__init__.py"))
def test_every_package_says_what_lives_there(package):
    doc = ast.get_docstring(ast.parse(MODULES[package].read_text()))
    assert doc and len(doc) > 40, f"{package} has no docstring saying what lives there"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checker itself: an import in a function body of a low layer is found."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from moba_rewrite.api import rewrite\n"
                   "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from moba_rewrite import cli\n")
    assert _imports(src) == [(2, "moba_rewrite.api")]
