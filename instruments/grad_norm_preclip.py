"""Gradient norm before and after the user's clipping: ||g||_2 at the end of backward and at the step."""

from typing import Optional

from . import missing_reason
from ._lines import LinesInstrument


class GradNormPreclip(LinesInstrument):
    name = "grad_norm_preclip"
    title = "Gradient norm, before / after clipping"
    group = "gradients"
    keys = ("grad_norm_preclip", "grad_norm")
    ylabel = "||g||₂"
    description = ("L2 norm of the mini-batch gradient at the end of backward (before clipping, unscaled) and "
                   "as the optimizer used it (after clipping); they differ where clipping fired.")
    _LABELS = {"grad_norm_preclip": "before clipping", "grad_norm": "after clipping (stepped)"}

    def label(self, key: str) -> str:
        return self._LABELS.get(key, key)

    def missing(self, run) -> Optional[str]:
        if run.has_finite("grad_norm_preclip"):
            return None
        return missing_reason(run, ["grad_norm_preclip"])
