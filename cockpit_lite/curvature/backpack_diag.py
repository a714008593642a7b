"""Exact Hessian / GGN diagonals through BackPACK, on a private copy of the model.

BackPACK needs extended modules and a loss it knows; extending the user's model would change it
(hooks storing inputs, memory), so a hook-free deep copy is extended once and refreshed with the
current parameters and buffers on each use. Support is checked up front (:func:`unsupported_reason`):
an ``nn.Sequential`` (nested ones allowed) of layer types whose second-order backward BackPACK
implements, and a CrossEntropyLoss / MSELoss with mean or sum reduction. Anything else (LayerNorm,
attention, a custom forward, in-place activations, label smoothing) returns a reason and the caller
falls back to a Hutchinson estimate. A BackPACK failure at run time is also reported, never raised
into training.

BackPACK's rules are exact only for the plain forms of its modules; checked against dense float64
Hessians (tests/curvature/test_exact_diag_guard.py), these are silently wrong and are refused up front:

* CrossEntropyLoss with class weights or label smoothing (BackPACK's loss Hessian ignores both);
* CrossEntropyLoss on a step whose targets contain ``ignore_index`` (BackPACK counts the ignored samples
  and divides by the full batch: 14-126% off): refused per step by :func:`step_reason`, so steps without
  padding stay exact;
* convolutions with ``padding_mode`` other than 'zeros' (reflect / circular / replicate padding is
  treated as zero padding: 14-67% off);
* AvgPool with ``divisor_override`` or ``count_include_pad=False``;
* a layer registered twice (``nn.Sequential(l, act, l)``) or a parameter tied between two layers (each use's
  rule sees one use: a failure or a diagonal without the cross terms).

Whatever else may be wrong is caught by the first-use cross-check against Hessian-vector products
(:mod:`.diagonal_check`).
"""

from __future__ import annotations

import copy
import warnings
from typing import List, Optional

import torch
from torch import nn

from ..rng import preserved_rng, set_rng_state
from .batch_loss import BatchLoss

KINDS = {"diag_h": "exact:backpack-diag-hessian", "diag_ggn": "exact:backpack-diag-ggn"}

_LEAVES = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.ZeroPad2d, nn.Dropout, nn.Flatten,
    nn.ReLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.LogSigmoid, nn.ELU, nn.SELU,
)


def unsupported_reason(model: nn.Module, loss_fn) -> Optional[str]:
    """None when BackPACK computes exact diagonals for this model and loss, else why not."""
    try:
        import backpack  # noqa: F401
    except Exception as err:  # pragma: no cover - BackPACK is a dependency
        return f"BackPACK is not importable ({err!r})"
    if not isinstance(model, nn.Sequential):
        return f"BackPACK's exact diagonals need an nn.Sequential model, got {type(model).__name__}"
    shared = _shared_reason(model)
    if shared is not None:
        return shared
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential):
            continue
        if type(m) not in _LEAVES:
            return f"layer {name} ({type(m).__name__}) has no BackPACK second-order rule"
        if getattr(m, "inplace", False):
            return f"layer {name} ({type(m).__name__}) is in-place, which BackPACK cannot extend"
    if type(loss_fn) not in (nn.CrossEntropyLoss, nn.MSELoss):
        return f"BackPACK's exact diagonals need CrossEntropyLoss or MSELoss, got {type(loss_fn).__name__}"
    if getattr(loss_fn, "reduction", None) not in ("mean", "sum"):
        return f"loss reduction {getattr(loss_fn, 'reduction', None)!r} is not supported by BackPACK"
    if isinstance(loss_fn, nn.CrossEntropyLoss) and (loss_fn.weight is not None or loss_fn.label_smoothing != 0):
        return "CrossEntropyLoss with class weights or label smoothing is not supported by BackPACK"
    for name, m in model.named_modules():
        reason = _module_reason(m)
        if reason is not None:
            return f"layer {name} ({type(m).__name__}): {reason}"
    return None


def _shared_reason(model: nn.Module) -> Optional[str]:
    """Why a module used twice or a parameter tied between modules rules BackPACK out (its per-module rules see
    one use of each parameter: 'Linear' object has no attribute 'output', or a diagonal without the cross terms
    between the uses, which only the cross-check would catch), or None."""
    seen = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) in seen and not isinstance(m, nn.Sequential) and any(True for _ in m.parameters(recurse=False)):
            return f"layer {name} is layer {seen[id(m)]} used again; BackPACK's rules see each parameter used once"
        seen.setdefault(id(m), name)
    owners = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owners:
            return f"parameter {name} is tied to {owners[id(p)]}; BackPACK's rules see each parameter used once"
        owners[id(p)] = name
    return None


def _module_reason(m: nn.Module) -> Optional[str]:
    """Why BackPACK's rule for this (supported) layer type is not exact for its settings, or None."""
    if isinstance(m, nn.modules.conv._ConvNd) and getattr(m, "padding_mode", "zeros") != "zeros":
        return f"padding_mode={m.padding_mode!r}, which BackPACK's second-order rules treat as zero padding"
    if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        if getattr(m, "divisor_override", None) is not None:
            return "divisor_override is ignored by BackPACK's second-order rule"
        if not m.count_include_pad:
            return "count_include_pad=False is not supported by BackPACK's second-order rule"
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) and m.return_indices:
        return "return_indices=True is not supported by BackPACK"
    return None


def step_reason(loss_fn: nn.Module, batch_loss: BatchLoss) -> Optional[str]:
    """None when this step's targets are ones BackPACK's loss rules are exact for, else why not."""
    for call in batch_loss.calls:
        view = getattr(call, "view", None)
        if view is not None and not view.identity:
            return (f"the loss input is a {view.kind} view {tuple(view.size)} of the model output "
                    f"{tuple(view.out_shape)}; BackPACK's loss rules see the output itself")
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        for call in batch_loss.calls:
            target = call.target[0] if call.target else None
            if isinstance(target, torch.Tensor) and target.is_floating_point():
                return "CrossEntropyLoss with class-probability targets: BackPACK's rule assumes class indices"
            if isinstance(target, torch.Tensor):
                ignored = int((target == loss_fn.ignore_index).sum())
                if ignored:
                    return (f"{ignored} target(s) equal ignore_index={loss_fn.ignore_index} on this step: BackPACK "
                            "counts ignored samples in its CrossEntropyLoss Hessian")
    return None


def _has_float64(model: nn.Module) -> bool:
    """Whether a float64 copy replays the step: float64 exists on the device, and dropout draws the same masks
    as in float32 (checked on CPU; on CUDA a model with dropout keeps float32)."""
    devices = {p.device.type for p in model.parameters()}
    if not devices <= {"cpu", "cuda"}:
        return False
    dropout = any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())
    return devices == {"cpu"} or not dropout


def _cast(xs, dtype) -> tuple:
    """The floating tensors of ``xs`` in ``dtype`` (None: unchanged)."""
    return tuple(x.to(dtype) if dtype is not None and isinstance(x, torch.Tensor) and x.is_floating_point() else x
                 for x in xs)


def _hook_free_copy(model: nn.Module) -> nn.Module:
    memo = {}
    for m in model.modules():
        for attr, value in vars(m).items():
            if "hook" in attr and isinstance(value, dict):
                memo[id(value)] = type(value)()
        for p in m.parameters(recurse=False):
            if p.grad is not None:
                memo[id(p.grad)] = None
    clone = copy.deepcopy(model, memo)
    for p in clone.parameters():
        p.grad = None
    return clone


class ExactDiagonal:
    """Exact diag(H) or diag(GGN) of the step's loss, in the order of the observed parameters."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, float64: bool = False):
        reason = unsupported_reason(model, loss_fn)
        if reason is not None:
            raise ValueError(reason)
        from backpack import extend

        self.model = model
        copy_ = _hook_free_copy(model)
        # float64: the private copy and the step's floating inputs in double precision (CPU / CUDA only), for
        # quantities that divide by single diagonal entries (tic_diag): float32 leaves a tiny entry 2e-4 off
        self.dtype = torch.float64 if float64 and _has_float64(model) else None
        if self.dtype is None and any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
            self.dtype = torch.float32  # 16-bit parameters: float16 diagonals were 2.5e-4 off "exact"
        if self.dtype is not None:
            copy_ = copy_.to(self.dtype)
        self.copy = extend(copy_)
        kwargs = {"reduction": loss_fn.reduction}
        self.loss = extend(type(loss_fn)(**kwargs))
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            self.loss.ignore_index = loss_fn.ignore_index

    def compute(self, batch_loss: BatchLoss, kind: str) -> List[torch.Tensor]:
        from backpack import backpack
        from backpack.extensions import DiagGGNExact, DiagHessian

        ext, attr = (DiagHessian(), "diag_h") if kind == "diag_h" else (DiagGGNExact(), "diag_ggn_exact")
        own = dict(self.copy.named_parameters())
        with torch.no_grad():
            theirs = dict(self.model.named_buffers())
            for n, b in self.copy.named_buffers():
                b.copy_(theirs[n])
            for key, p in zip(batch_loss.keys, batch_loss.params):
                own[key[len("model."):]].copy_(p)
        # frozen / unfrozen since the copy was made (fine-tuning schedules): the copy follows the model's flags now,
        # else an unfrozen layer's diagonal stayed 0 (hess_trace 1.49 logged exact, dense 2.44)
        for key, trainable in zip(batch_loss.keys, batch_loss.trainable):
            own[key[len("model."):]].requires_grad_(trainable)
        for mine, orig in zip(self.copy.modules(), self.model.modules()):
            mine.training = orig.training  # same train/eval mode per layer (dropout)
        total = {n: torch.zeros_like(p) for n, p in own.items()}
        self.last_loss = 0.0  # the re-evaluated step loss, for the caller's consistency check
        with preserved_rng(), torch.enable_grad():
            for call in batch_loss.calls:
                set_rng_state(call.rng_state)
                out = self.copy(*_cast(call.args, self.dtype), **dict(zip(call.kwargs, _cast(call.kwargs.values(),
                                                                                           self.dtype))))
                loss = self.loss(out, *_cast(call.target, self.dtype))
                self.last_loss += float(loss.detach()) * call.weight
                with backpack(ext), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # BackPACK's full backward hooks on the first layer
                    loss.backward()
                for n, p in own.items():
                    if not p.requires_grad:
                        continue  # frozen: a constant of the loss, its diagonal stays 0
                    total[n].add_(getattr(p, attr).detach(), alpha=call.weight)
                    delattr(p, attr)
                    p.grad = None
        return [total[key[len("model."):]] for key in batch_loss.keys]
