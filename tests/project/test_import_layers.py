"""The two layers depend one way: ``cockpit_lite.instruments`` (the panels; its files are the top-level
folder ``instruments/``) on the rest of ``cockpit_lite`` (through public names only), never the rest of
``cockpit_lite`` on the instruments at import time (issue 18). Read from the source with ``ast``, so an
import added anywhere is caught, and checked once in a fresh interpreter. The old import name
``instruments`` (deprecated, tests/project/test_import_name.py) counts as the instruments too.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
INSTRUMENTS = "cockpit_lite.instruments"


def module_name(path: pathlib.Path) -> str:
    """The import name of a source file: ``instruments/x.py`` is ``cockpit_lite.instruments.x``."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("cockpit_lite",) + parts if parts[0] == "instruments" else parts)


def is_instruments(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in (INSTRUMENTS, "instruments"))


def imports(path: pathlib.Path):
    """``(module, names, at_import_time)`` of every import in ``path``; imports inside a function or
    under ``if TYPE_CHECKING`` do not run at import time."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path)
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


def files(folder: str):
    """The source files of a folder; ``cockpit_lite``'s without its ``instruments`` (a symlink to the
    top-level folder: ``files("instruments")``)."""
    return sorted(p for p in (ROOT / folder).rglob("*.py")
                  if not (folder == "cockpit_lite" and p.relative_to(ROOT / folder).parts[0] == "instruments"))


def test_cockpit_lite_never_imports_instruments_at_import_time():
    bad = [(str(p.relative_to(ROOT)), mod, names) for p in files("cockpit_lite") for mod, names, top in imports(p)
           if top and any(is_instruments(m) for m in [mod] + [f"{mod}.{n}" for n in names])]
    assert not bad, f"cockpit_lite imports instruments at import time (a cycle): {bad}"


def test_cockpit_lite_uses_only_public_names_of_instruments():
    bad = [(str(p.relative_to(ROOT)), mod, names) for p in files("cockpit_lite") for mod, names, _ in imports(p)
           if is_instruments(mod) and ([part for part in mod.split(".") if part.startswith("_")]
                                       or [n for n in names if n.startswith("_")])]
    assert not bad, f"cockpit_lite reaches into private modules or names of the instruments: {bad}"


def test_instruments_use_only_public_names_of_cockpit_lite():
    bad = []
    for p in files("instruments"):
        for mod, names, _ in imports(p):
            if (mod == "cockpit_lite" or mod.startswith("cockpit_lite.")) and not is_instruments(mod):
                private = [part for part in mod.split(".") if part.startswith("_")]
                private += [n for n in names if n.startswith("_")]
                if private:
                    bad.append((str(p.relative_to(ROOT)), mod, private))
    assert not bad, f"instruments reach into private names of cockpit_lite: {bad}"


def test_the_scan_sees_imports():
    """The scan itself: relative, lazy and TYPE_CHECKING imports are told apart."""
    found = imports(ROOT / "instruments" / "_base.py")
    assert ("cockpit_lite.instruments._reasons", ["missing_reason"], True) in found
    assert ("cockpit_lite.instruments._run_view", ["RunView"], False) in found
    lazy = imports(ROOT / "cockpit_lite" / "cli.py")
    assert ("cockpit_lite", ["instruments"], False) in lazy
    assert not any("instruments" in p.relative_to(ROOT).parts for p in files("cockpit_lite"))


def run_python(code: str):
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_no_cycle_at_runtime():
    run_python("import sys, cockpit_lite, cockpit_lite.cli, cockpit_lite.dashboard, cockpit_lite.notebook, "
               "cockpit_lite.runlog, cockpit_lite.testing, cockpit_lite.presets\n"
               "assert not [m for m in sys.modules if m.startswith(('instruments', 'cockpit_lite.instruments'))], "
               "'cockpit_lite imported instruments'\n")
    run_python("import cockpit_lite.instruments as i\nassert len(i.builtin()) > 10\n")
