"""The layers run one way (ARCHITECTURE.md): parsed from the source, function-level imports included.

- no import cycle among the modules of replq/, workers/ and beat/;
- nothing below the command line imports it (only replq.__main__ and replq.cli.* do);
- the engine and everything else under replq/ never imports workers/ or beat/ (the CLI starts them);
- the pure core imports only the pure core and the standard library;
- no module but the systemd calendar port grows past 600 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("replq", "workers", "beat")
PURE = {"replq.calendar", "replq.model", "replq.plan", "replq.safety", "replq.schedule", "replq.errors",
        "replq.settings", "replq.throttle", "replq.passwords", "replq.redact", "replq.zfsnames"}
IO_LIBRARIES = {"redis", "paramiko", "celery", "kombu", "subprocess", "socket", "flower", "prometheus_client"}
MAX_LINES = 600
LONG_ALLOWED = {"replq.calendar"}  # the faithful port of systemd's calendar code


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every module `path` imports, at any depth of its code (resolved to our modules where ours)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) for name, path in known.items()}


def ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    edges = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycle = path[path.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_nothing_below_the_cli_imports_it(graph: dict[str, set[str]]) -> None:
    bad = sorted((m, d) for m, deps in graph.items() for d in deps
                 if (d == "replq.cli" or d.startswith("replq.cli."))
                 and not (m == "replq.__main__" or m == "replq.cli" or m.startswith("replq.cli.")))
    assert not bad, f"modules below the CLI import it: {bad}"


def test_replq_never_imports_workers_or_beat(graph: dict[str, set[str]]) -> None:
    bad = sorted((m, d) for m, deps in graph.items() if m.startswith("replq") and not m.startswith("replq.cli")
                 for d in deps if d.split(".")[0] in ("workers", "beat"))
    assert not bad, f"the engine reaches up into the runtime: {bad}"


def test_the_pure_core_imports_only_the_pure_core(graph: dict[str, set[str]]) -> None:
    for m in sorted(PURE):
        deps = graph[m]
        assert not {d for d in deps if ours(d)} - PURE, (m, sorted(d for d in deps if ours(d) and d not in PURE))
        assert not {d.split(".")[0] for d in deps} & IO_LIBRARIES, (m, sorted(deps))


def test_no_module_is_too_long() -> None:
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= LONG_ALLOWED, f"modules over {MAX_LINES} lines (split them by concern): {long}"
