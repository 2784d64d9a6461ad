"""The package layout stays the architecture's picture: imports only go down the order below,
never sideways between packages of one rank, and no modules import each other in a cycle.

    base -> config -> routing -> {store, transport, inference, service}
         -> {flows, ota} -> {app, specialize} -> cli

docs/architecture.md draws the same order; change both together."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parent.parent / "agent"

RANK = {
    "base": 0,
    "config": 1,
    "routing": 2,
    "store": 3, "transport": 3, "inference": 3, "service": 3,
    "flows": 4, "ota": 4,
    "app": 5, "specialize": 5,
    "cli": 6,
    "__main__": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(AGENT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_of(module: str) -> str | None:
    """`agent.flows.ingest` -> `flows`; the `agent` package itself (its __version__) -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports(path: Path, known: set[str]) -> set[str]:
    """The agent modules a file imports, at any depth (lazy imports count: they are still edges)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "agent")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "agent":
                continue
            for alias in node.names:  # `from agent.store import schema` names a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in AGENT.rglob("*.py")}
    known = set(files)
    return {name: imports(path, known) - {name} for name, path in files.items()}


def order_violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in sorted(edges.items()):
        here = package_of(source)
        if here is None:
            continue
        for target in sorted(targets):
            there = package_of(target)
            if there is None or there == here:
                continue
            if here not in RANK or there not in RANK:
                bad.append(f"{source} -> {target}: package not in the order")
            elif RANK[there] >= RANK[here]:
                bad.append(f"{source} -> {target}: {here} may not import {there}")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_imports_follow_the_package_order() -> None:
    assert order_violations(graph()) == []


def test_no_modules_import_each_other_in_a_cycle() -> None:
    assert cycles(graph()) == []


def test_the_checks_catch_a_sideways_import_an_upward_import_and_a_cycle() -> None:
    edges = graph()
    edges["agent.store.writer"] = edges["agent.store.writer"] | {"agent.transport.mqtt"}
    edges["agent.config.settings"] = edges["agent.config.settings"] | {"agent.flows.ingest"}
    assert order_violations(edges) == [
        "agent.config.settings -> agent.flows.ingest: config may not import flows",
        "agent.store.writer -> agent.transport.mqtt: store may not import transport",
    ]
    edges["agent.base.errors"] = edges["agent.base.errors"] | {"agent.base.retry"}
    assert ["agent.base.errors", "agent.base.retry"] in cycles(edges)


def test_the_top_level_is_small_and_every_package_says_what_it_owns() -> None:
    entries = [p.name for p in AGENT.iterdir() if p.name != "__pycache__"]
    assert len(entries) <= 14, sorted(entries)
    packages = sorted(p for p in AGENT.iterdir() if (p / "__init__.py").exists())
    assert {p.name for p in packages} == set(RANK) - {"app", "__main__"}
    for package in packages:
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert doc, f"{package.name}/__init__.py has no docstring"
        assert "import" in doc.lower(), f"{package.name}/__init__.py: what may it import?"


@pytest.mark.parametrize("module", sorted(graph()))
def test_every_module_opens_with_a_docstring(module: str) -> None:
    path = AGENT.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = AGENT.parent / module.replace(".", "/") / "__init__.py"
    assert ast.get_docstring(ast.parse(path.read_text())), module


def cited_events() -> set[str]:
    """Event names the tests and the demo wait for or count: `wait_for_event("x")`,
    `e.get("event") == "x"`, `event="x"`."""
    root = AGENT.parent
    patterns = [r'wait_for_event\(\s*"([a-z_]+)"', r'"event"[)\]]? == "([a-z_]+)"',
                r'\bevent="([a-z_]+)"', r'"event"\) in \(([^)]*)\)']
    found: set[str] = set()
    for path in [*root.glob("tests/test_*.py"), *root.glob("tools/*.py")]:
        if path.name == "test_layout.py":
            continue
        text = path.read_text()
        for pattern in patterns:
            for match in re.finditer(pattern, text):
                found.update(re.findall(r"[a-z_]+", match.group(1)))
    return found


def test_every_event_the_tests_cite_is_spelled_out_in_the_agent() -> None:
    """structlog event names are literals in agent/, never built with f-strings, so that grep
    finds the line that logs a name the README, a test or a journal search cites."""
    source = "\n".join(p.read_text() for p in AGENT.rglob("*.py"))
    literals = set(re.findall(r'"([a-z][a-z0-9_]*)"', source))
    cited = cited_events()
    assert len(cited) > 20, sorted(cited)  # the patterns still find what the tests cite
    assert sorted(cited - literals) == []
