"""Hessian- and GGN-vector products on a re-evaluation of the step's mini-batch.

Two ways to get H v, both with ``torch.autograd.grad`` / ``torch.func`` (``.grad`` is never touched):

* ``"double_backward"`` (default): one forward and one ``create_graph`` backward per step; each
  product is then one more backward through the retained gradient graph;
* ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad``; each product re-runs the
  forward and backward with dual numbers (nothing retained between products).

Measured on this repo's CPU machine (3-conv CNN, batch 128, torch 2.13 CPU, 2 shared and very busy
cores, so only ratios to a plain forward+backward taken in the same round mean anything; three
interleaved rounds): double backward: set-up 0.9-1.35x a plain step, then 1.8-2.3x per product;
forward-over-reverse: no set-up, 1.9-4.3x per product. They break even around two to three products;
Lanczos uses 6-7 per step at the default tolerance and Hutchinson 10 probes, so double backward is
the default. Forward-over-reverse also fails where an op has no forward-mode AD rule.

GGN products G v = J^T H_L J v use the same retained forward: J v by the double-vjp trick
(differentiate J^T u w.r.t. a dummy u), H_L by double backward of the loss w.r.t. the model
output, and J^T by one more backward.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import List, Sequence

import torch
from torch import nn

from .batch_loss import BatchLoss, CurvatureUnavailable

Vector = List[torch.Tensor]  # one tensor per parameter, shaped like it


class HessianOperator:
    """v -> H v for the step's mini-batch loss at theta_t; ``hvps`` counts products made."""

    def __init__(self, batch_loss: BatchLoss, mode: str = "double_backward"):
        if mode not in ("double_backward", "forward_over_reverse"):
            raise ValueError(f"unknown HVP mode {mode!r}")
        self.batch_loss = batch_loss
        self.mode = mode
        self.params = batch_loss.params
        self.trainable = list(getattr(batch_loss, "trainable", [True] * len(self.params)))
        self._idx = [j for j, t in enumerate(self.trainable) if t]  # frozen parameters: rows/columns of 0
        self.hvps = 0
        self._grad = None
        self._rows: List[int] = []  # positions in ``_grad`` (trainable parameters) that depend on theta
        self._leaves = None
        if mode == "double_backward":
            self._leaves = [p.detach().requires_grad_(t) for p, t in zip(self.params, self.trainable)]
            live = [self._leaves[j] for j in self._idx]
            with torch.enable_grad(), batch_loss.kernels():
                loss = batch_loss.evaluate(self._leaves)
                self.loss = loss.detach()
                self._grad = torch.autograd.grad(loss, live, create_graph=True, allow_unused=True) if live else ()
            # only the gradients that depend on theta enter the products: one that does not (None, or a
            # constant such as the last bias's under a loss linear in its input) has a zero row of H, and
            # autograd refuses a constant among the outputs it differentiates
            self._rows = [k for k, g in enumerate(self._grad) if g is not None and g.requires_grad]
            if not self._rows:
                self._grad = None  # the loss is linear in theta (H = 0)

    def __call__(self, v: Sequence[torch.Tensor]) -> Vector:
        self.hvps += 1
        out = [torch.zeros_like(p) for p in self.params]
        if self.mode == "double_backward":
            if self._grad is None:
                return out
            live = [self._leaves[j] for j in self._idx]
            with torch.enable_grad(), self.batch_loss.kernels(), _second_order("Hessian-vector products"):
                hv = torch.autograd.grad([self._grad[k] for k in self._rows], live,
                                         [v[self._idx[k]] for k in self._rows], retain_graph=True,
                                         allow_unused=True)
            for j, h in zip(self._idx, hv):
                if h is not None:
                    out[j] = h.detach()
            return out
        if len(self._idx) == len(self.params):
            grad_fn = torch.func.grad(lambda ps: self.batch_loss.evaluate(ps))
            with torch.enable_grad(), self.batch_loss.kernels(), _second_order("Hessian-vector products"):
                _, hv = torch.func.jvp(grad_fn, (list(self.params),), (list(v),))
            return [h.detach() for h in hv]

        def loss_of_trainable(live):  # frozen parameters held at their values
            ps = list(self.params)
            for j, p in zip(self._idx, live):
                ps[j] = p
            return self.batch_loss.evaluate(ps)
        with torch.enable_grad(), self.batch_loss.kernels(), _second_order("Hessian-vector products"):
            _, hv = torch.func.jvp(torch.func.grad(loss_of_trainable), ([self.params[j] for j in self._idx],),
                                   ([v[j] for j in self._idx],))
        for j, h in zip(self._idx, hv):
            out[j] = h.detach()
        return out

    def release(self) -> None:
        self._grad = None
        self._leaves = None


class GGNOperator:
    """v -> G v, G = sum_k w_k J_k^T H_{L,k} J_k (generalized Gauss-Newton) of the step's loss.

    The split between the network (J) and the loss (H_L) is at the loss function's input, except when that
    input is the output of an ``nn.LogSoftmax`` module (NLLLoss after LogSoftmax): NLL is linear in the
    log-probabilities, so H_L would be 0 there; the split moves to the LogSoftmax's input (the logits), where
    the loss's curvature lives, as for CrossEntropyLoss on logits. A loss that is still linear in its input
    (e.g. NLLLoss after a functional log_softmax, which cannot be found) raises :class:`CurvatureUnavailable`
    with the reason instead of reporting a GGN of 0."""

    def __init__(self, batch_loss: BatchLoss):
        self.params = batch_loss.params
        self.batch_loss = batch_loss
        self.hvps = 0
        # frozen parameters (requires_grad=False) are constants: their rows/columns of G are 0
        trainable = getattr(batch_loss, "trainable", [True] * len(self.params))
        self._leaves = [p.detach().requires_grad_(t) for p, t in zip(self.params, trainable)]
        self._idx = [j for j, t in enumerate(trainable) if t]
        live = [self._leaves[j] for j in self._idx]
        self._parts = []
        self.loss = 0.0  # the re-evaluated step loss
        self.split = "loss input"
        loss_fn = batch_loss.wrapper.loss_fn
        with torch.enable_grad(), _log_softmax_outputs(batch_loss.wrapper.model) as seen, batch_loss.kernels():
            for out, _, call in batch_loss.outputs_and_losses(self._leaves):
                tail = next((m for m, x, y in seen if y is out), None)
                if tail is not None:  # split at the logits: the loss is loss_fn(log_softmax(z))
                    out = next(x for m, x, y in seen if y is out)
                    self.split = f"input of {type(tail).__name__}"
                out_d = out.detach().requires_grad_(True)
                loss = loss_fn.forward(out_d if tail is None else tail(out_d), *call.target)
                loss = (loss.mean() if loss.numel() != 1 else loss) * call.weight
                self.loss += float(loss.detach())
                (g_out,) = torch.autograd.grad(loss, out_d, create_graph=True)
                dummy = torch.zeros_like(out, requires_grad=True)
                jt_dummy = torch.autograd.grad(out, live, dummy, create_graph=True, allow_unused=True) if live else ()
                self._parts.append((out, out_d, g_out, dummy, jt_dummy))
        if self._parts and all(_linear(g_out, out_d) for _, out_d, g_out, _, _ in self._parts):
            raise CurvatureUnavailable(
                f"{type(loss_fn).__name__} is linear in its input, so the generalized Gauss-Newton matrix split there "
                "is 0 and says nothing about the curvature; for NLLLoss after log_softmax, end the model with an "
                "nn.LogSoftmax module (the GGN is then split at the logits) or use CrossEntropyLoss on logits")

    def __call__(self, v: Sequence[torch.Tensor]) -> Vector:
        self.hvps += 1
        total = [torch.zeros_like(p) for p in self.params]
        with torch.enable_grad(), self.batch_loss.kernels(), _second_order("Gauss-Newton-vector products"):
            for out, out_d, g_out, dummy, jt_dummy in self._parts:
                pairs = [(j, v[k]) for j, k in zip(jt_dummy, self._idx) if j is not None and j.requires_grad]
                if not pairs:
                    continue
                (jv,) = torch.autograd.grad([j for j, _ in pairs], dummy, [vi for _, vi in pairs], retain_graph=True)
                if not g_out.requires_grad:
                    continue  # loss linear in the output: H_L = 0
                (hjv,) = torch.autograd.grad(g_out, out_d, jv, retain_graph=True)
                gv = torch.autograd.grad(out, [self._leaves[k] for k in self._idx], hjv, retain_graph=True,
                                         allow_unused=True)
                for k, x in zip(self._idx, gv):
                    if x is not None:
                        total[k].add_(x)
        return total

    def release(self) -> None:
        self._parts = []


def _linear(g_out: torch.Tensor, out_d: torch.Tensor) -> bool:
    """Whether the loss is linear in its input: H_L r is exactly 0 for a random r (autograd's derivative of
    a linear loss's gradient is an exact zero; a curved loss gives exact zeros for a random r only on
    a set of measure zero)."""
    if not g_out.requires_grad:
        return True
    r = torch.randn(out_d.shape, generator=torch.Generator().manual_seed(0), dtype=out_d.dtype).to(out_d.device)
    with torch.enable_grad(), _second_order("Gauss-Newton-vector products"):
        (h,) = torch.autograd.grad(g_out, out_d, r, retain_graph=True, allow_unused=True)
    return h is None or not bool(h.ne(0).any())


_NO_DERIVATIVE = re.compile(r"derivative for (\S+) is not implemented")


@contextmanager
def _second_order(what: str):
    """Turns autograd's refusal to differentiate an op a second time (``derivative for aten::X is not
    implemented``, e.g. MultiMarginLoss's backward) into :class:`CurvatureUnavailable` naming the op."""
    try:
        yield
    except RuntimeError as err:
        m = _NO_DERIVATIVE.search(str(err))
        if m is None:
            raise
        raise CurvatureUnavailable(
            f"PyTorch has no derivative of {m.group(1)} (a backward op on the path from the loss to the "
            f"parameters), so {what} of the step's loss cannot be formed") from None


@contextmanager
def _log_softmax_outputs(model: nn.Module):
    """Collects (module, input, output) of every nn.LogSoftmax call in ``model`` while active."""
    seen = []
    handles = [m.register_forward_hook(lambda m, a, y: seen.append((m, a[0], y)))
               for m in model.modules() if isinstance(m, nn.LogSoftmax)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def flatten(v: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in v])


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> Vector:
    out, i = [], 0
    for p in like:
        n = p.numel()
        out.append(flat[i:i + n].view_as(p))
        i += n
    return out
