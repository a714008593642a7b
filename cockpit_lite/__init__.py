"""cockpit-lite: make the training of a PyTorch model observable with one line.

    cockpit = cockpit_lite.watch(model, optimizer, loss_fn=criterion, logdir="runs/exp1")
    ...  # the training loop, unchanged
    cockpit.close()
    run = cockpit_lite.load("runs/exp1")
    steps, values = run.series("grad_norm")

Importing this package imports neither matplotlib nor TensorBoard; ``watch`` imports torch.
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"  # the one version: pyproject.toml reads it (tool.setuptools.dynamic)

if TYPE_CHECKING:  # what type checkers see; at run time the names load lazily (__getattr__)
    from . import presets, schedules
    from .engine import Cockpit, watch
    from .notebook import compare, plot
    from .runlog import Run, load

__all__ = ["watch", "load", "Cockpit", "Run", "plot", "compare", "schedules", "presets", "__version__"]


_LAZY = {"watch": "engine", "Cockpit": "engine", "load": "runlog", "Run": "runlog", "plot": "notebook",
         "compare": "notebook"}


def __getattr__(name):  # lazy: keep ``import cockpit_lite`` cheap
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name in ("schedules", "presets"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'cockpit_lite' has no attribute {name!r}")
