"""cockpit-lite in TensorBoard: a sink that writes the run log into TensorBoard event files
(:mod:`.writer`) and a dynamic TensorBoard plugin that shows the cockpit as a tab (:mod:`.plugin`).

Nothing here is imported by ``import cockpit_lite``; TensorBoard is only imported when one of
these modules is used. TensorFlow is never needed.
"""

from .names import PLUGIN_NAME, SCALAR_PREFIX


def __getattr__(name):  # lazy: importing the package must not import tensorboard
    if name == "TensorBoardSink":
        from .writer import TensorBoardSink

        return TensorBoardSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PLUGIN_NAME", "SCALAR_PREFIX", "TensorBoardSink"]
