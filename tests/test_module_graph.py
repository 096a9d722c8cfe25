"""The modules' imports form no cycle (function-level imports included): data flows one way."""

import ast
from pathlib import Path

import opendaam

ROOT = Path(opendaam.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("opendaam"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("opendaam"))
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        graph[name] = {m for m in found if m in modules and m != name and not package.startswith(m)}
    return graph


def test_no_import_cycles():
    graph = _imports()
    assert "opendaam.tracing.tracer" in graph and "opendaam.dataset.merge" in graph
    done, stack = set(), []

    def visit(node):
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in done:
            return
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        stack.pop()
        done.add(node)

    for module in sorted(graph):
        visit(module)


def test_early_layers_import_no_later_one():
    graph = _imports()
    later = {"opendaam.heatmaps", "opendaam.optimize", "opendaam.experiments", "opendaam.dataset", "opendaam.cli",
             "opendaam.viz", "opendaam.report", "opendaam.replay", "opendaam.refine", "opendaam.segmenter"}
    for early in ("opendaam.attention", "opendaam.models", "opendaam.tracing.adapters", "opendaam.tracing.hooks",
                  "opendaam.tracing.recorders", "opendaam.tracing.records", "opendaam.tracing.tracer",
                  "opendaam.metrics", "opendaam.cache", "opendaam.generation"):
        bad = {m for m in graph[early] if any(m == x or m.startswith(x + ".") for x in later)}
        assert not bad, f"{early} imports later modules {sorted(bad)}"
