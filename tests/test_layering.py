"""The package's imports point one way, bottom up, with no circle (lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "cilkit"

# Bottom up. A module may import its own layer and the layers below it, never one above.
LAYERS = [
    ("errors", "schema"),
    ("data", "models", "losses", "metrics", "memory", "results"),
    ("training",),
    ("methods",),
    ("config", "presets", "driver"),
    ("experiment", "trained", "export", "extend"),
    ("cli", "__main__", "__init__"),
]
# Within a layer: config knows no method and no driver, the driver no config (it is handed built parts).
FORBIDDEN = {"config": {"methods", "driver"}, "presets": {"methods", "driver"}, "driver": {"config", "presets"}}


def layer_of(part: str) -> int:
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise AssertionError(f"cilkit.{part} is in no layer: add it to LAYERS in tests/test_layering.py")


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Every cilkit module ``path`` imports, at any depth (lazy imports and TYPE_CHECKING blocks included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "cilkit"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "cilkit":
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}  # `from cilkit.x import module`
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        edges[name] = {t for t in imports_of(path, name) if t in modules and t != name}
    return edges


def part(module: str) -> str:
    pieces = module.split(".")
    if len(pieces) == 1:
        return "__init__"
    return pieces[1]


def violations(edges: dict[str, set[str]]) -> list[str]:
    out = []
    for src, targets in edges.items():
        for dst in targets:
            a, b = part(src), part(dst)
            if a == b:
                continue
            if layer_of(b) > layer_of(a):
                out.append(f"{src} (layer {layer_of(a)}) imports {dst} (layer {layer_of(b)})")
            elif b in FORBIDDEN.get(a, ()):
                out.append(f"{src} imports {dst}: cilkit.{a} must not depend on cilkit.{b}")
    return sorted(out)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_sits_in_a_layer_and_imports_only_below_it():
    edges = graph()
    assert len(edges) > 40  # the scan found the package
    assert violations(edges) == []


def test_no_import_circle_between_modules():
    assert cycles(graph()) == []


def test_the_checks_catch_a_wrong_import_and_a_circle():
    edges = {"cilkit.methods.lwf": {"cilkit.driver"}, "cilkit.config": {"cilkit.methods"},
             "cilkit.data.a": {"cilkit.data.b"}, "cilkit.data.b": {"cilkit.data.a"}, "cilkit.driver": set()}
    found = violations(edges)
    assert any("cilkit.methods.lwf" in v for v in found) and any("cilkit.config imports" in v for v in found)
    assert cycles(edges) == [["cilkit.data.a", "cilkit.data.b"]]
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("newthing")
