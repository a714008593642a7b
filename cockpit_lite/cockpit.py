"""``cockpit_lite.cockpit``: where ``watch`` and ``Cockpit`` were before the engine moved to
``cockpit_lite.engine``; kept so that existing imports keep working."""

from .engine.cockpit import Cockpit, watch

__all__ = ["Cockpit", "watch"]
