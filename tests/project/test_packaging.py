"""Packaging: one version source, py.typed, LICENSE/CHANGELOG, and mypy seeing the public API typed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cockpit_lite

ROOT = Path(__file__).resolve().parents[2]


def test_one_version_source():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cockpit_lite.__version__"}
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["cockpit_lite"]
    assert isinstance(cockpit_lite.__version__, str) and cockpit_lite.__version__.count(".") >= 2
    assert (ROOT / "cockpit_lite" / "py.typed").exists()
    assert "MIT" in (ROOT / "LICENSE").read_text() and project["project"]["license"] == {"text": "MIT"}
    assert "## Unreleased" in (ROOT / "CHANGELOG.md").read_text()


SNIPPET = '''
import cockpit_lite
import torch

model = torch.nn.Linear(2, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
cockpit = cockpit_lite.watch(model, opt, loss_fn=torch.nn.MSELoss(), logdir="runs/x")
reveal_type(cockpit)
with cockpit_lite.watch(model, opt) as inner:
    reveal_type(inner)
cockpit.close()
run = cockpit_lite.load("runs/x")
reveal_type(run)
steps, values = run.series("loss")
reveal_type(values)
reveal_type(cockpit_lite.Run)
reveal_type(cockpit_lite.__version__)
from cockpit_lite.instruments import Instrument, builtin
from cockpit_lite.instruments.gradient_tests import GradientTests
reveal_type(builtin())
reveal_type(GradientTests())
'''


@pytest.mark.slow
def test_mypy_sees_the_public_api_typed(tmp_path):
    """mypy on a user's snippet: no errors, and no revealed type is Any (the instruments under their import
    name ``cockpit_lite.instruments`` included). Errors inside the package are
    not the user's (``--follow-imports=silent``, as mypy treats an installed package)."""
    pytest.importorskip("mypy")
    (tmp_path / "user.py").write_text(SNIPPET)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--cache-dir",
                          str(tmp_path / "cache"), str(tmp_path / "user.py")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    revealed = [line.split("Revealed type is ", 1)[1] for line in text.splitlines() if "Revealed type is" in line]
    assert len(revealed) == SNIPPET.count("reveal_type(")
    assert all('"Any"' != r.strip() for r in revealed), revealed
    expected = ["cockpit_lite.engine.cockpit.Cockpit", "cockpit_lite.engine.cockpit.Cockpit", "cockpit_lite.runlog.reader.Run",
                "numpy.ndarray", "-> cockpit_lite.runlog.reader.Run", "str",
                "list[cockpit_lite.instruments._base.Instrument]", "cockpit_lite.instruments.gradient_tests.GradientTests"]
    for want, got in zip(expected, revealed):
        assert want in got, (want, got)
