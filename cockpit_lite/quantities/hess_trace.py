"""``hess_trace``: trace of the mini-batch Hessian, exact (BackPACK DiagHessian) or estimated with stderr."""

from . import _curvature as curv
from ._trace import TraceQuantity


class HessTrace(TraceQuantity):
    name = "hess_trace"
    kind = "diag_h"
    description = "Hessian trace, total and per parameter (exact via BackPACK, else Hutchinson with stderr)"

    def operator(self, ctx):
        return curv.hessian(ctx, self.subbatch)
