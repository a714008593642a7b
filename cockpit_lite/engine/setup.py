"""What ``watch()`` works out once, before the first step: the observed parameters, the quantities
of a preset or list, the module under a ``torch.compile`` wrapper; small helpers on call arguments."""

from __future__ import annotations

import inspect
import math
import warnings
from datetime import datetime, timezone
from typing import Any, Iterable, List, Mapping, Optional, Union

import torch

from .. import presets, quantities as qreg
from ..quantities.base import Quantity

QuantitySpec = Union[str, Iterable[Union[str, Quantity]], Mapping[str, Any]]


def observed_parameters(model, optimizer):
    """(names, params): every parameter the optimizer holds, once, named as in the model."""
    model_params = list(model.named_parameters())
    if not model_params:
        raise ValueError(f"the model ({type(model).__name__}) has no parameters: there is nothing to observe")
    name_of = {id(p): n for n, p in model_params}
    names, params, seen = [], [], set()
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) in seen:
                continue
            seen.add(id(p))
            names.append(name_of.get(id(p), f"optimizer.group{g}.param{i}"))
            params.append(p)
    if not any(id(p) in name_of for p in params):
        raise ValueError(
            "the optimizer does not hold any parameter of the model; build it from model.parameters() "
            "of the model you pass to watch()"
        )
    missing = [n for n, p in model_params if p.requires_grad and id(p) not in seen]
    if missing:
        warnings.warn(
            f"{len(missing)} trainable parameter(s) of the model are not in the optimizer "
            f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); they are not observed",
            stacklevel=5,
        )
    return names, params


def stepping_optimizer(optimizer):
    """The optimizer whose ``step()`` takes the update: ``optimizer`` itself, or the ``base_optimizer`` of a
    wrapper sharing its parameter groups (sharpness-aware minimization, davda54/sam and its variants), whose
    loops call ``first_step()`` / ``second_step()`` and never the wrapper's ``step()``: hooks on the wrapper
    alone logged no step at all. Its ``step(closure)`` runs the base optimizer's step once, too."""
    base = getattr(optimizer, "base_optimizer", None)
    if isinstance(base, torch.optim.Optimizer) and base.param_groups is optimizer.param_groups:
        return base
    return optimizer


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The original module of a ``torch.compile``d one (``OptimizedModule._orig_mod``), else ``model``."""
    orig = getattr(model, "_orig_mod", None)
    return orig if isinstance(orig, torch.nn.Module) and type(model).__name__ == "OptimizedModule" else model


def resolve_quantities(spec: QuantitySpec) -> List[Quantity]:
    """Quantity objects for a preset name, a list of names/objects, or a mapping name -> schedule."""
    if spec is None:
        raise TypeError("quantities=None: give a preset name ('default', 'economy', 'business', 'full'), a list of "
                        "quantity names or a mapping name -> schedule")
    if isinstance(spec, str):
        spec = presets.preset(spec)
    out: List[Quantity] = []
    if isinstance(spec, Mapping):
        for name, schedule in spec.items():
            out.append(qreg.make(name, schedule))
    else:
        for item in spec:
            out.append(item if isinstance(item, Quantity) else qreg.make(item))
    names = [q.name for q in out]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"quantities listed twice: {sorted(dupes)}")
    return out


def positional(module, args, kwargs) -> tuple:
    """The arguments of a loss module's call as positions of its ``forward`` (keywords included), as far
    as they go without a gap; ``args`` as given where the signature cannot bind them."""
    try:
        sig = inspect.signature(module.forward)
        bound = sig.bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return args
    out = []
    for name, param in sig.parameters.items():
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD) or name not in bound:
            break
        out.append(bound[name])
    return tuple(out)


def autocast_state():
    """(device type, dtype) of the torch.autocast region the model is called in, or None."""
    for device in ("cuda", "cpu"):
        try:
            if torch.is_autocast_enabled(device):
                return device, torch.get_autocast_dtype(device)
        except (TypeError, RuntimeError, AttributeError):  # pragma: no cover - older torch
            return None
    return None


def nonfinite_grad_names(watched) -> List[str]:
    bad = []
    with torch.no_grad():
        for n, p in zip(watched.names, watched.params):
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                bad.append(n)
    return bad


def finite(x) -> bool:
    return x is not None and math.isfinite(x)


def jsonable(v):
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v)
    if isinstance(v, (tuple, list)):
        return [jsonable(x) for x in v]
    return repr(v)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_SEQUENCE_FIRST_TYPES = (torch.nn.RNNBase, torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer,
                         torch.nn.TransformerDecoderLayer, torch.nn.Transformer)


def sequence_first_module(model: torch.nn.Module) -> Optional[str]:
    """The first module of ``model`` that declares a sequence-first layout (``batch_first=False`` on a
    recurrent, attention or transformer layer), as ``"name (Type, batch_first=False)"``; else None."""
    for name, module in model.named_modules():
        if isinstance(module, _SEQUENCE_FIRST_TYPES):
            first = getattr(module, "batch_first", None)
            if first is None and isinstance(module, torch.nn.TransformerEncoderLayer):
                first = getattr(module.self_attn, "batch_first", None)
            if first is False:
                return f"'{name or type(module).__name__}' ({type(module).__name__}, batch_first=False)"
    return None
