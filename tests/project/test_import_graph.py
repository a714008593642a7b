"""The package's modules import each other one way: no cycle, counting imports inside functions too
(a lazy import still ties two rooms together). Read from the source with ``ast``, not by importing.

One edge is allowed on purpose: ``Run._repr_html_`` (cockpit_lite/runlog/queries.py) hands a notebook's
rich display to ``cockpit_lite.notebook``; IPython looks the method up on the object, so the data layer
names the presentation layer there, lazily, and nowhere else."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
ALLOWED = {("cockpit_lite.runlog.queries", "cockpit_lite.notebook")}


def modules(package: str):
    """``{name: (path, is_package)}``; ``cockpit_lite.instruments`` is the top-level folder ``instruments/``
    (``cockpit_lite/instruments`` is a symlink to it, which ``rglob`` does not follow)."""
    found = {}
    folders = [(ROOT / package, [])]
    if package == "cockpit_lite":
        folders.append((ROOT / "instruments", ["cockpit_lite"]))
    for folder, prefix in folders:
        for path in folder.rglob("*.py"):
            parts = prefix + list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[:2] == ["cockpit_lite", "instruments"] and not prefix:
                continue  # the symlink, on a Python whose rglob follows it
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def imports(tree):
    """Every import statement, at module level or in a function, except under ``if TYPE_CHECKING``."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(x) for x in ast.walk(node))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def graph(package: str):
    mods = modules(package)
    edges = {}
    for name, (path, is_package) in mods.items():
        base = name.split(".") if is_package else name.split(".")[:-1]
        out = set()
        for node in imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
                continue
            target = ".".join(base[:len(base) - node.level + 1] + [node.module] if node.level and node.module
                              else base[:len(base) - node.level + 1] if node.level else [node.module or ""])
            out.update(f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names)
        edges[name] = {m for m in out if m in mods and m != name and (name, m) not in ALLOWED}
    return edges


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    edges = graph("cockpit_lite")
    assert {"cockpit_lite.instruments", "cockpit_lite.instruments._registry"} <= set(edges)
    assert "cockpit_lite.instruments" in edges["cockpit_lite.dashboard"]
    assert cycles(edges) == []


def test_the_check_finds_a_cycle(tmp_path, monkeypatch):
    """The check itself: two modules importing each other inside functions are a cycle."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import x\n"
                              "def g():\n    from . import a\n")
    (pkg / "c.py").write_text("from .b import g\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert cycles(graph("pkg")) == [["pkg.a", "pkg.b"]]
