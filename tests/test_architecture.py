"""The architecture as rules: no import cycle (type-only and function-level imports included),
modules under 400 lines, states mirrored by the manifest's CHECK constraints, and each
invariant stated by the module that owns it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from minibatch.states import ChunkStatus, Outcome, RunStatus

PACKAGE = Path(__file__).resolve().parents[1] / "minibatch"
MODULES = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__main__"}


def imports(path: Path) -> set[str]:
    """Every minibatch module `path` imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minibatch"):
            found.add(node.module.split(".")[1] if "." in node.module else "__init__")
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("minibatch.")}
    return found - {path.stem}


def test_no_module_imports_itself_back_round_a_cycle() -> None:
    graph = {name: imports(path) & MODULES.keys() for name, path in MODULES.items() if name != "__init__"}
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                assert nxt != start, f"import cycle: {' -> '.join([*trail, nxt])}"
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_under_400_lines(name: str) -> None:
    assert len(MODULES[name].read_text().splitlines()) < 400


@pytest.mark.parametrize(
    ("column", "states"),
    [("status", RunStatus), ("status", ChunkStatus), ("outcome", Outcome)],
)
def test_the_manifest_checks_the_same_states_the_code_uses(column: str, states: type) -> None:
    schema = (PACKAGE / "schema.sql").read_text()
    checks = [
        set(re.findall(r"'(\w+)'", c)) for c in re.findall(rf"CHECK \({column} IN \(([^)]*)\)\)", schema)
    ]
    assert {s.value for s in states} in checks


@pytest.mark.parametrize("name", ["results", "ledger", "pool"])
def test_the_owner_of_an_invariant_says_which(name: str) -> None:
    doc = ast.get_docstring(ast.parse(MODULES[name].read_text())) or ""
    assert "Invariant" in doc
