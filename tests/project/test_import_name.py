"""The instruments' import name is ``cockpit_lite.instruments`` (issue 22, item 5) in the three ways the
package reaches a user: an editable install (what CI does), a built wheel, and a source checkout that is
not the installed one. The old name ``instruments`` keeps working for one release: one
DeprecationWarning, the same module objects (instruments/_old_name.py says how).

Every check runs in a fresh interpreter (a fresh ``sys.modules``) against a copy of this checkout's
packaging files in ``tmp_path``, so the build leaves nothing in the checkout and a stale ``build/``
cannot leak into the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "setup.py", "README.md", "LICENSE", "cockpit_lite", "instruments"]

# the new name first (no DeprecationWarning), then the old one on top (same objects, one warning)
NEW_THEN_OLD = r'''
import json, sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import cockpit_lite
    import cockpit_lite.instruments as new
    from cockpit_lite.instruments import Instrument, RunView, builtin, tab_panels
    import cockpit_lite.instruments.gradient_tests as gt
    found = builtin()
    tab_panels()
new_warnings = [str(w.message) for w in caught if "instruments" in str(w.message)]
with warnings.catch_warnings(record=True) as caught:
    import instruments
    from instruments import Instrument as OldInstrument, builtin as old_builtin
    import instruments.alpha_gauge
    import instruments.gradient_tests
    from instruments._draw import downsample
old_warnings = [(str(w.message), w.filename) for w in caught if issubclass(w.category, DeprecationWarning)]
print(json.dumps({
    "root": cockpit_lite.__file__, "new": new.__file__, "n_builtin": len(found),
    "new_warnings": new_warnings, "old_warnings": old_warnings,
    "same": [instruments is new, instruments.alpha_gauge is new.alpha_gauge, instruments.gradient_tests is gt,
             OldInstrument is Instrument, sys.modules["instruments._draw"] is sys.modules["cockpit_lite.instruments._draw"]],
    "registry": [type(i) for i in old_builtin()] == [type(i) for i in found],
    "spec": new.alpha_gauge.__spec__.name,
    "files": sorted({m.__file__ for n, m in list(sys.modules.items()) if "instruments" in n}),
}))
'''

# the old name in a fresh interpreter: it loads the package under the new name, once
OLD_FIRST = r'''
import json, sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import instruments.alpha_gauge
    from instruments import builtin
    found = builtin()
    import instruments
import cockpit_lite.instruments as new
print(json.dumps({
    "root": sys.modules["cockpit_lite"].__file__, "new": new.__file__, "n_builtin": len(found),
    "old_warnings": [(str(w.message), w.filename) for w in caught if issubclass(w.category, DeprecationWarning)],
    "same": [instruments is new, instruments.alpha_gauge is new.alpha_gauge, sys.modules["instruments"] is new],
    "registry": all(type(i).__module__.startswith("cockpit_lite.instruments.") for i in found),
    "spec": new.alpha_gauge.__spec__.name,
    "files": sorted({m.__file__ for n, m in list(sys.modules.items()) if "instruments" in n}),
}))
'''


def checkout_copy(tmp_path: Path) -> Path:
    """The files a build reads, copied (the ``cockpit_lite/instruments`` symlink kept as a symlink)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    return src


def python(code: str, cwd: Path, prelude: str = "", flags=()) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, *flags, "-c", prelude + code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_one_package(out: dict, where: Path, old: bool = True):
    """Everything imported from ``where``; no DeprecationWarning for the new name, one for the old name
    (at the importing line), naming the new import; the old name's modules are the new name's."""
    assert Path(out["root"]).is_relative_to(where), (out["root"], where)
    assert Path(out["new"]).is_relative_to(where)
    assert all(Path(f).is_relative_to(where) for f in out["files"]), out["files"]
    assert not any("instruments/" in f and "cockpit_lite/instruments/" not in f for f in out["files"]), \
        f"a module was loaded under the old path: {out['files']}"
    assert out["n_builtin"] > 10
    assert out.get("new_warnings", []) == []
    assert out["spec"] == "cockpit_lite.instruments.alpha_gauge"
    if old:
        assert len(out["old_warnings"]) == 1, out["old_warnings"]
        message, filename = out["old_warnings"][0]
        assert "cockpit_lite.instruments" in message and filename == "<string>"
        assert all(out["same"]) and out["registry"], out


def test_a_source_checkout_imports_its_own_instruments(tmp_path):
    """``python -c`` from the root of a checkout that is not the installed one imports that checkout."""
    src = checkout_copy(tmp_path)
    assert_one_package(python(NEW_THEN_OLD, src), src)
    assert_one_package(python(OLD_FIRST, src), src)


def test_an_editable_install(tmp_path):
    """The editable install that ``pip install -e .`` makes (setuptools' PEP 660 hook), used alone: the
    interpreter starts without site (the shared editable install's finder stays out) and gets the
    environment's packages plus this install's directory."""
    build_meta = pytest.importorskip("setuptools.build_meta")
    if not hasattr(build_meta, "build_editable"):
        pytest.skip("setuptools < 64 has no PEP 660 editable install (pip falls back to setup.py develop)")
    src = checkout_copy(tmp_path)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-c", f"import setuptools.build_meta as b; b.build_editable({str(wheels)!r})"],
                   cwd=src, check=True, capture_output=True, timeout=300)
    site_dir = tmp_path / "site"
    zipfile.ZipFile(next(wheels.glob("*.whl"))).extractall(site_dir)
    assert list(site_dir.glob("__editable__*.pth"))
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    # this install's directory first: its finder module has the same name as the shared install's
    prelude = (f"import site, sys\nsys.path.insert(0, {str(site_dir)!r})\nsys.path.extend({paths!r})\n"
               f"site.addsitedir({str(site_dir)!r})\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert_one_package(python(NEW_THEN_OLD, elsewhere, prelude, ["-S"]), src)
    assert_one_package(python(OLD_FIRST, elsewhere, prelude, ["-S"]), src)


def test_a_built_wheel(tmp_path):
    """``pip wheel``: the instruments under ``cockpit_lite/instruments/``, the old name one file; imported
    from the unpacked wheel in a directory that is not a checkout."""
    src = checkout_copy(tmp_path)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(src)], cwd=tmp_path, check=True, capture_output=True, timeout=300)
    wheel = zipfile.ZipFile(next(wheels.glob("cockpit_lite-*.whl")))
    names = wheel.namelist()
    modules = sorted(p.name for p in (ROOT / "instruments").glob("*.py"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("cockpit_lite/instruments/")) == modules
    assert [n for n in names if n.startswith("instruments/")] == ["instruments/__init__.py"]
    unpacked = tmp_path / "unpacked"
    wheel.extractall(unpacked)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    prelude = f"import sys\nsys.path.insert(0, {str(unpacked)!r})\n"
    assert_one_package(python(NEW_THEN_OLD, elsewhere, prelude), unpacked)
    assert_one_package(python(OLD_FIRST, elsewhere, prelude), unpacked)


def test_an_unrelated_instruments_package_keeps_its_name(tmp_path):
    """Someone else's top-level ``instruments`` first on the path: ``cockpit_lite.instruments`` is still
    ours, and theirs is left alone (no alias, no warning)."""
    theirs = tmp_path / "theirs" / "instruments"
    theirs.mkdir(parents=True)
    (theirs / "__init__.py").write_text("MINE = True\n")
    (theirs / "alpha_gauge.py").write_text("MINE = True\n")
    code = ("import json, sys, warnings\nwarnings.simplefilter('error', DeprecationWarning)\n"
            f"sys.path.insert(0, {str(ROOT)!r})\nsys.path.insert(0, {str(theirs.parent)!r})\n"
            "import cockpit_lite.instruments as new, instruments, instruments.alpha_gauge\n"
            "print(json.dumps([instruments.MINE, instruments.alpha_gauge.MINE, new.__file__, len(new.builtin())]))\n")
    mine, mine_too, new_file, n = python(code, tmp_path)
    assert mine and mine_too and Path(new_file).is_relative_to(ROOT) and n > 10


def test_the_installed_package_when_it_is_this_checkout(tmp_path):
    """The environment's own install (CI's ``pip install -e .``), from a directory that is not a checkout;
    skipped where the installed cockpit_lite is another checkout (a helper's worktree)."""
    installed = python("import json, cockpit_lite\nprint(json.dumps(cockpit_lite.__file__))", tmp_path)
    if not Path(installed).is_relative_to(ROOT):
        pytest.skip(f"the installed cockpit_lite is {installed}, not this checkout")
    assert_one_package(python(NEW_THEN_OLD, tmp_path), ROOT)
    assert_one_package(python(OLD_FIRST, tmp_path), ROOT)
