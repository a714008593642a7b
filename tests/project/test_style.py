"""ruff's pyflakes and pycodestyle rules (pyproject.toml, [tool.ruff]) hold on the whole repository:
no unused import, no undefined name, no unused variable, no stray whitespace."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_ruff_is_clean():
    pytest.importorskip("ruff", reason="ruff is in the 'test' extra")
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
