"""The package's layout: no module imports one that imports it back (no import circles).

Every ``import`` of a `langchain_moa` module counts, wherever it stands: at the top, inside a
function (a lazy import that only hides a circle is still a circle) or under
``TYPE_CHECKING``. Third-party imports are not edges. Importing a submodule runs its parent
package's ``__init__`` too; that implicit step is not an edge (a package's ``__init__`` may
import its own submodules).
"""

from __future__ import annotations

import ast
from pathlib import Path

import langchain_moa

PACKAGE = Path(langchain_moa.__file__).parent
NAME = "langchain_moa"

Edges = dict[str, dict[str, list[str]]]
"""module -> {imported module -> ["path:line", ...]}"""


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in root.rglob("*.py"):
        parts = [NAME, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _target(name: str, known: dict[str, Path]) -> str | None:
    """The package module an import of `name` loads (``a.b.f`` -> ``a.b`` for a function)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(known: dict[str, Path], root: Path = PACKAGE) -> Edges:
    edges: Edges = {}
    for module, path in known.items():
        out: dict[str, list[str]] = {}
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from a import b`: b may be a submodule, else a name in module a
                names = [f"{base}.{alias.name}" for alias in node.names]
            for name in names:
                if not (name == NAME or name.startswith(NAME + ".")):
                    continue
                target = _target(name, known)
                if target is not None and target != module:
                    where = f"{path.relative_to(root.parent)}:{node.lineno}"
                    seen = out.setdefault(target, [])
                    if where not in seen:  # `from a import b, c`: one line, one place
                        seen.append(where)
        edges[module] = out
    return edges


def cycles(edges: Edges) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def describe(component: list[str], edges: Edges) -> str:
    inside = set(component)
    lines = [
        f"  {a} -> {b} ({', '.join(where)})"
        for a in component
        for b, where in sorted(edges[a].items())
        if b in inside
    ]
    return "import circle among " + ", ".join(component) + ":\n" + "\n".join(lines)


def test_no_import_circles() -> None:
    edges = import_graph(modules())
    found = cycles(edges)
    assert not found, "\n".join(describe(c, edges) for c in found)


def test_the_check_sees_circles_through_lazy_imports(tmp_path: Path) -> None:
    """The checker itself: a function-level import back is reported, a one-way one is not."""
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "a.py").write_text("from langchain_moa import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from langchain_moa.a import g\n")
    (tmp_path / "c.py").write_text("import json\nfrom langchain_moa.b import f\n")
    edges = import_graph(modules(tmp_path), tmp_path)
    assert cycles(edges) == [["langchain_moa.a", "langchain_moa.b"]]
    (tmp_path / "b.py").write_text("def f():\n    import json\n")
    assert cycles(import_graph(modules(tmp_path), tmp_path)) == []


def test_the_layout_by_concern() -> None:
    """The CLI, the data pipelines, sampling and shielding each have their own modules, and
    the old import paths still work."""
    from langchain_moa import cli, pipelines
    from langchain_moa.data import generate, label
    from langchain_moa.sampling import sample_candidates
    from langchain_moa.shielding import shield_callbacks

    assert (pipelines.generate, pipelines.label) == (generate, label)
    assert pipelines.sample_candidates is sample_candidates
    assert cli.EXIT_USER_ERROR == 2 and callable(cli.main)
    edges = import_graph(modules())
    assert "langchain_moa.pipelines" not in edges["langchain_moa.judge_graph"]
    assert "langchain_moa.sampling" in edges["langchain_moa.judge_graph"]
    assert "langchain_moa.shielding" in edges["langchain_moa.calls"]
    assert callable(shield_callbacks)
