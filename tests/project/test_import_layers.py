"""The two top-level packages depend one way: ``instruments`` on ``cockpit_lite`` (through public
names only), never ``cockpit_lite`` on ``instruments`` at import time (issue 18). Read from the
source with ``ast``, so an import added anywhere is caught, and checked once in a fresh interpreter.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def imports(path: pathlib.Path):
    """``(module, names, at_import_time)`` of every import in ``path``; imports inside a function or
    under ``if TYPE_CHECKING`` do not run at import time."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name == "__init__.py":
        package += ".__init__"
    found = []

    def visit(node, top):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, False)
            elif isinstance(child, ast.Import):
                found.extend((a.name, [], top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[:-child.level]
                    base = ".".join(parent + ([base] if base else []))
                found.append((base, [a.name for a in child.names], top))
            else:
                visit(child, top)

    visit(tree, True)
    return found


def files(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def test_cockpit_lite_never_imports_instruments_at_import_time():
    bad = [(str(p.relative_to(ROOT)), mod) for p in files("cockpit_lite") for mod, _, top in imports(p)
           if top and (mod == "instruments" or mod.startswith("instruments."))]
    assert not bad, f"cockpit_lite imports instruments at import time (a cycle): {bad}"


def test_instruments_use_only_public_names_of_cockpit_lite():
    bad = []
    for p in files("instruments"):
        for mod, names, _ in imports(p):
            if mod == "cockpit_lite" or mod.startswith("cockpit_lite."):
                private = [part for part in mod.split(".") if part.startswith("_")]
                private += [n for n in names if n.startswith("_")]
                if private:
                    bad.append((str(p.relative_to(ROOT)), mod, private))
    assert not bad, f"instruments reach into private names of cockpit_lite: {bad}"


def test_the_scan_sees_imports():
    """The scan itself: relative, lazy and TYPE_CHECKING imports are told apart."""
    found = imports(ROOT / "instruments" / "_base.py")
    assert ("instruments._reasons", ["missing_reason"], True) in found
    assert ("instruments._run_view", ["RunView"], False) in found
    lazy = imports(ROOT / "cockpit_lite" / "cli.py")
    assert ("instruments", [], False) in lazy


def run_python(code: str):
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_no_cycle_at_runtime():
    run_python("import sys, cockpit_lite, cockpit_lite.cli, cockpit_lite.dashboard, cockpit_lite.notebook, "
               "cockpit_lite.runlog, cockpit_lite.testing, cockpit_lite.presets\n"
               "assert 'instruments' not in sys.modules, 'cockpit_lite imported instruments'\n")
    run_python("import instruments\nassert len(instruments.builtin()) > 10\n")
