"""``distance``: ||theta_t - theta_0||_2, theta_0 = the parameters when watching began."""

import torch

from .base import Quantity


class Distance(Quantity):
    name = "distance"
    description = "||theta_t - theta_0||_2 from the parameters at watch(); total and distance/<param>"
    reads_theta = "norms"
    reduces = False  # reads only what every process has (its own devices, the all-reduced .grad)

    def start(self, watched):
        with torch.no_grad():
            self._theta0 = [p.detach().clone() for p in watched.params]
            self._scratch = [torch.empty_like(p) for p in watched.params]

    def before_step(self, ctx):
        # a persistent scratch buffer: a fresh P-sized allocation per step costs page faults
        with torch.no_grad():  # one pass per tensor (a copy, then a subtraction in place, reads theta twice)
            for out, p, p0 in zip(self._scratch, ctx.params, self._theta0):
                torch.sub(p, p0, out=out)
        ctx.emit_norms("distance", self._scratch)

    def close(self):
        self._theta0 = self._scratch = None
