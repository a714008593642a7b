"""Where the tests live. The test folders mirror the package (``tests/persample`` tests
``cockpit_lite/persample``, ...); shared support (``helpers``, references, process workers) sits in
``tests/`` itself.

``use_test_dirs()`` puts ``tests/`` and every test folder on ``sys.path``, so that a test file or a
worker script imports support and another folder's test module by its plain name (test file names are
unique across the folders). ``conftest.py`` calls it for pytest; worker scripts and benchmarks call it
themselves.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def test_dirs() -> list:
    """``tests/`` and its test folders (those holding ``test_*.py`` files)."""
    return [TESTS] + sorted(d for d in TESTS.iterdir() if d.is_dir() and any(d.glob("test_*.py")))


def use_test_dirs() -> None:
    for d in reversed(test_dirs()):
        if str(d) not in sys.path:
            sys.path.insert(0, str(d))
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
