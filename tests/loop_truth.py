"""What a training loop really did, step by step, and the float64 brute force of what cockpit-lite logs.

A test's loop tells ``Truth`` at each optimizer step which per-sample losses l_i define the step
(``begin(per_sample)``: a function of a float64 copy of the model returning [n] losses), the loss it
expects to be logged, and the gradient the optimizer saw; ``stepped()`` after ``optimizer.step()``.
``mismatches(run, truth, model)`` recomputes every logged value from scratch (per-sample gradients by
one ``autograd.grad`` per sample, the statistics from ``reference.py``, alpha's weighted fit from
QUANTITIES.md) and lists each one that is neither within tolerance nor NaN with a reason.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Optional

import torch

import reference as R

QUANTITIES = {name: "every" for name in ("loss", "grad_norm", "norm_test", "inner_test", "ortho_test", "mean_gsnr",
                                         "alpha", "update_size", "distance")}
NOISE = ("norm_test", "inner_test", "ortho_test", "mean_gsnr")


class Truth:
    def __init__(self, model: torch.nn.Module, observed=None):
        self.model = model
        self.observed = set(observed) if observed is not None else {n for n, _ in model.named_parameters()}
        self.theta0 = self._theta()
        self.steps: List[dict] = []
        self.pending: Optional[dict] = None

    def _theta(self) -> Dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def begin(self, per_sample: Callable[[torch.nn.Module], torch.Tensor], loss: Optional[float] = None) -> None:
        """A step starts: ``per_sample(model64)`` gives its l_i; parameters that require no gradient now
        have none on this step."""
        trained = {n for n, p in self.model.named_parameters() if p.requires_grad and n in self.observed}
        self.pending = dict(theta=self._theta(), per_sample=per_sample, loss=loss, trained=trained)

    def note_loss(self, loss: float) -> None:
        self.pending["loss"] = loss

    def note_grad(self) -> None:
        """The gradient the optimizer is about to use (call right before ``optimizer.step()``)."""
        self.pending["grad"] = [p.grad.detach().double().clone() for n, p in self.model.named_parameters()
                                if p.grad is not None and n in self.observed]

    def only(self, names) -> None:
        """Only these parameters get a gradient on this step (``backward(inputs=...)``)."""
        self.pending["trained"] &= set(names)

    def stepped(self) -> None:
        self.pending["after"] = self._theta()
        self.steps.append(self.pending)
        self.pending = None


def per_sample_grads(model, step) -> tuple:
    """(l [n], G [n, P]) in float64 at the step's parameters, over the parameters trained on the step."""
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(step["theta"][n])
    params = [p.requires_grad_() for n, p in m.named_parameters() if n in step["trained"]]
    losses = step["per_sample"](m)
    rows = []
    for i in range(losses.shape[0]):
        gs = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, params)]))
    return losses.detach(), torch.stack(rows)


def alpha(l0, l1, p0, p1, t: float) -> float:
    """alpha from QUANTITIES.md: the weighted least-squares parabola through f(0), f(t), f'(0), f'(t)."""
    y = torch.stack([l0.mean(), l1.mean(), p0.mean(), p1.mean()])
    var = torch.stack([l0.var(), l1.var(), p0.var(), p1.var()])
    var = torch.where(var == 0, torch.full_like(var, 1e-10), var)
    phi = torch.tensor([[1, 0, 0], [1, t, t * t], [0, 1, 0], [0, 1, 2 * t]], dtype=torch.float64)
    w = torch.linalg.solve(phi.T @ torch.diag(1 / var) @ phi, phi.T @ torch.diag(1 / var) @ y)
    if w[2] < 0:
        return -1.0
    return float(2 * t / (-w[1] / w[2]) - 1)


def _flat_update(model, step, names) -> torch.Tensor:
    return torch.cat([(step["after"][n] - step["theta"][n]).double().reshape(-1)
                      for n, _ in model.named_parameters() if n in names])


def full_grads(model, truth: Truth, k: int, grads: list) -> tuple:
    """(l, G) of step k over every observed parameter (in model order), trained on the step or not."""
    st = truth.steps[k]
    if st["trained"] == truth.observed:
        return grads[k]
    if "full_grads" not in st:
        st["full_grads"] = per_sample_grads(model, dict(st, trained=truth.observed))
    return st["full_grads"]


def references(model, truth: Truth) -> List[dict]:
    """Per optimizer step, every value the brute force gives."""
    out = []
    grads = [per_sample_grads(model, st) for st in truth.steps]
    for k, st in enumerate(truth.steps):
        losses, G = grads[k]
        ref = {"norm_test": R.norm_test(G), "inner_test": R.inner_test(G), "ortho_test": R.ortho_test(G),
               "mean_gsnr": R.mean_gsnr(G), "samples": G.shape[0]}
        if st.get("loss") is not None:
            ref["loss"] = st["loss"]
        if st.get("grad") is not None:
            ref["grad_norm"] = float(torch.sqrt(sum((g ** 2).sum() for g in st["grad"])))
        every = truth.observed
        ref["update_size"] = float(_flat_update(model, st, every).norm())
        ref["distance"] = float(torch.sqrt(sum(((st["theta"][n] - truth.theta0[n]).double() ** 2).sum() for n in every)))
        t = ref["update_size"]
        if k + 1 < len(truth.steps) and t > 0:
            # the slopes along d need every moved parameter's gradient, also of those without one on the step
            # (frozen, or not reached by backward: their gradient as a function of theta is not zero)
            u = _flat_update(model, st, every) / t
            (l0, G0), (l1, G1) = (full_grads(model, truth, j, grads) for j in (k, k + 1))
            ref["alpha"] = alpha(l0, l1, G0 @ u, G1 @ u, t)
        out.append(ref)
    return out


def mismatches(run, truth: Truth, model, tol: float = 1e-4, skip=(), skipped=()) -> List[str]:
    """Every logged value that is neither within ``tol`` relative (alpha: 1e-3 absolute; samples: exact) of
    the brute force nor NaN with a reason; and step numbers that are not the optimizer steps taken
    (``skipped``: the step numbers of the attempts the loop skipped, logged as skipped steps)."""
    problems = []
    records = {r["step"]: r for r in run}
    numbers = [k for k in range(len(truth.steps) + len(skipped)) if k not in skipped]
    if sorted(records) != numbers or sorted(s["step"] for s in run.skipped) != sorted(skipped):
        problems.append(f"steps logged {sorted(records)} for {len(truth.steps)} optimizer steps "
                        f"(skipped: {[(s['step'], s['reason'][:60]) for s in run.skipped]})")
        return problems
    for k, ref in enumerate(references(model, truth)):
        rec = records[numbers[k]]
        for key, want in ref.items():
            if key in skip:
                continue
            got = rec.get("samples") if key == "samples" else rec["values"].get(key)
            why = value_problem(k, key, got, want, rec, lambda v, key=key, want=want: (
                abs(v - want) > 1e-3 if key == "alpha" else v != want if key == "samples"
                else abs(v - want) > tol * max(abs(want), 1e-12)))
            if why:
                problems.append(why)
    return problems


def plain(m, opt, crit, x, y, t):
    """The usual step, noting the loss and the gradient in the brute force ``t`` (a ``Truth``)."""
    opt.zero_grad()
    loss = crit(m(x), y)
    t.note_loss(loss.item())
    loss.backward()
    t.note_grad()
    opt.step()


def value_problem(k: int, key: str, got, want: float, rec: dict, bad) -> "str | None":
    """The mismatch of one logged value with the brute force, or None: missing, NaN without a reason, or
    ``bad(got)`` (the caller's tolerance)."""
    if got is None:
        return f"step {k}: {key} missing (want {want:.6g})"
    got = float(got)
    if math.isnan(got):
        return None if (rec.get("reasons") or {}).get(key) else f"step {k}: {key} NaN without a reason"
    return f"step {k}: {key} = {got:.6g}, brute force {want:.6g}" if bad(got) else None
