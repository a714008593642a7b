"""Registry of quantities by name. Third parties add theirs through the entry-point group
``cockpit_lite.quantities`` (name = quantity name, object = a ``Quantity`` subclass) or ``register``.
"""

from __future__ import annotations

from typing import Dict, Type

from .alpha import Alpha
from .base import Quantity, Watched
from .cabs import CABS
from .early_stopping import EarlyStopping
from .grad_hist_1d import GradHist1d
from .inner_test import InnerTest
from .mean_gsnr import MeanGSNR
from .norm_test import NormTest
from .ortho_test import OrthoTest
from .distance import Distance
from .energy import Energy
from .ggn_trace import GGNTrace
from .grad_hist_2d import GradHist2d
from .grad_norm import GradNorm
from .grad_norm_preclip import GradNormPreclip
from .hess_max_ev import HessMaxEV
from .hess_trace import HessTrace
from .loss import Loss
from .lr import LearningRate
from .param_norm import ParamNorm
from .tic_diag import TICDiag
from .tic_trace import TICTrace
from .time import StepTime
from .update_size import UpdateSize

REGISTRY: Dict[str, Type[Quantity]] = {}


def register(cls: Type[Quantity]) -> Type[Quantity]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    REGISTRY[cls.name] = cls
    return cls


for _cls in (Loss, GradNorm, GradNormPreclip, ParamNorm, Distance, UpdateSize, LearningRate, StepTime, Alpha, HessMaxEV, HessTrace, GGNTrace, TICDiag, TICTrace, GradHist2d, Energy,
             NormTest, InnerTest, OrthoTest, MeanGSNR, EarlyStopping, CABS, GradHist1d):
    register(_cls)


def _from_entry_points(name: str):
    from importlib.metadata import entry_points

    eps = entry_points()
    group = eps.select(group="cockpit_lite.quantities") if hasattr(eps, "select") else eps.get("cockpit_lite.quantities", [])
    for ep in group:
        if ep.name == name:
            return register(ep.load())
    return None


def make(name: str, schedule=None) -> Quantity:
    cls = REGISTRY.get(name) or _from_entry_points(name)
    if cls is None:
        raise ValueError(f"unknown quantity {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return cls(schedule)


__all__ = ["Quantity", "Watched", "REGISTRY", "register", "make"]
