"""The old import name ``instruments``: deprecated, kept working for one release (0.2; removed in 0.3),
as the very same modules as ``cockpit_lite.instruments``.

Where the code lives and how each name finds it:

* the files stay in the repository's top-level folder ``instruments/`` (the design card's layout);
* ``cockpit_lite/instruments`` is a relative symlink to that folder. A symlink is the one mechanism
  that every reader follows without help: Python's path finder in a source checkout (whichever
  checkout's ``cockpit_lite`` comes first on ``sys.path``, not the one an editable install points
  at), setuptools' editable finder (it maps ``cockpit_lite`` to its folder; the subpackage is found
  inside it), mypy and IDEs (they need no import hook), and setuptools' package discovery, which
  follows it and so writes the instruments into the wheel under ``cockpit_lite/instruments/``.
  A ``cockpit_lite/instruments/__init__.py`` setting ``__path__`` would need a second ``__init__``
  and a type stub for mypy; a meta-path finder would be invisible to mypy and to the wheel build;
* ``instruments/__init__.py`` runs under both names. Under ``cockpit_lite.instruments`` it is the
  package. Under ``instruments`` (a source checkout or editable install, where the folder itself is
  on the path, or the wheel's one-file top-level ``instruments`` package, see setup.py) it first calls
  :func:`redirect`, which puts ``cockpit_lite.instruments`` in ``sys.modules["instruments"]``, so
  ``import instruments`` returns that module, and answers every ``instruments.X`` with the module
  ``cockpit_lite.instruments.X`` (:class:`Alias`). No module is loaded twice: instruments are
  classes that the registry finds by ``isinstance``/``issubclass``, and a second copy would be a
  second, foreign class.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings

OLD = "instruments"
NEW = "cockpit_lite.instruments"
MESSAGE = ("the import name 'instruments' is deprecated and goes away in cockpit-lite 0.3: import "
           "'cockpit_lite.instruments' instead (e.g. 'from cockpit_lite.instruments import Instrument')")


class Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``instruments.X`` -> the module object ``cockpit_lite.instruments.X`` (loaded once, under the
    new name). First on ``sys.meta_path``, so the path finder never loads the file a second time."""

    def find_spec(self, fullname, path=None, target=None):
        new_package = sys.modules.get(NEW)
        if not fullname.startswith(OLD + ".") or new_package is None or sys.modules.get(OLD) is not new_package:
            return None  # not ours, or an unrelated ``instruments`` owns the name
        new = NEW + fullname[len(OLD):]
        if new not in sys.modules and importlib.util.find_spec(new) is None:
            return None  # no such module: the usual ModuleNotFoundError, naming the old name
        return importlib.machinery.ModuleSpec(fullname, self, loader_state=new)

    def create_module(self, spec):
        module = importlib.import_module(spec.loader_state)
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        # the import system has just set the alias spec on the module: give it back its own
        module.__spec__ = module.__spec__.loader_state


def redirect() -> None:
    """Called by ``instruments/__init__.py`` when imported as ``instruments``: one DeprecationWarning
    (at the importing line), then the old name is the new package."""
    warnings.warn(MESSAGE, DeprecationWarning, stacklevel=3)
    if not any(isinstance(finder, Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, Alias())
    sys.modules[OLD] = importlib.import_module(NEW)
