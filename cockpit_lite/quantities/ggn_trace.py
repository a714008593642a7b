"""``ggn_trace``: trace of the generalized Gauss-Newton matrix (exact via BackPACK DiagGGNExact, else
Hutchinson on GGN-vector products J^T H_L J v)."""

from . import _curvature as curv
from ._trace import TraceQuantity


class GGNTrace(TraceQuantity):
    name = "ggn_trace"
    kind = "diag_ggn"
    description = "GGN trace, total and per parameter (exact via BackPACK, else Hutchinson with stderr)"

    def operator(self, ctx):
        return curv.ggn(ctx, self.subbatch)
