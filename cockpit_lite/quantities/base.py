"""The quantity protocol: what a quantity needs, when it runs, and what it records.

A quantity is a small object with a ``name``, a set of ``needs`` (what the engine must capture
on the steps where it is active), a schedule, and two callbacks:

* ``before_step(ctx)``: called in the optimizer's step pre-hook, when ``.grad`` is final
  (after gradient accumulation and unscaling) and the parameters are still theta_t;
* ``after_step(ctx)``: called in the step post-hook, when theta_{t+1} and the update d are known.

Both record values through ``ctx.emit(...)`` (scalars), ``ctx.emit_nan(key, reason)`` (a value that
could not be computed, with the reason) and ``ctx.emit_data(key, obj)`` (JSON-able structures such as
histograms). Later capabilities (per-sample statistics, alpha, curvature, energy) plug in by
subclassing ``Quantity`` and registering; the engine does not change.

Needs the engine understands:

* ``"loss"``: the mini-batch loss of each micro-batch (cheap; always captured when a loss_fn is given);
* ``"update"``: theta_t is snapshotted before the step so that ``ctx.update`` is available after it;
* ``"loss_inputs"``: the model outputs and targets passed to ``loss_fn`` are kept for the step;
* ``"layer_io"``: per-layer inputs and output gradients are captured on the step (per-sample work);
  ``ctx.per_sample`` then gives per-sample statistics (implies ``"loss_inputs"``);
* ``"model_inputs"``: the model's forward arguments and the RNG state before each training forward
  are kept (``ctx.model_calls``), to re-evaluate the mini-batch (curvature); implies ``"loss_inputs"``;
* ``"backward_end"``: ``on_backward_end(step)`` is called at the end of every backward pass through the
  model on the step (after DDP's all-reduce), when ``.grad`` holds what that pass accumulated, before
  anything the user does between ``backward`` and ``step`` (unscaling, clipping).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

from .. import schedules

if TYPE_CHECKING:
    from ..step_context import StepContext

KNOWN_NEEDS = frozenset({"loss", "update", "loss_inputs", "layer_io", "model_inputs", "backward_end"})


class Quantity:
    """Base class; subclasses set ``name`` and override the callbacks they use."""

    name: ClassVar[str] = ""
    needs: ClassVar[FrozenSet[str]] = frozenset()
    default_schedule: ClassVar[Any] = "every"
    #: short description shown by ``cockpit-lite quantities`` and in the README table
    description: ClassVar[str] = ""
    # may reduce across the processes of a data-parallel run: the engine then brackets each of its
    # calls so that a failure in one process cannot leave the others waiting (distributed.Group)
    reduces: ClassVar[bool] = True
    #: declared reductions (as torchmetrics' ``dist_reduce_fx``): in a data-parallel run, the engine
    #: calls ``local_sums(ctx)`` right after ``before_step``, sums these ``step_sums`` numbers over the
    #: processes in the hook's closing check (one collective for every quantity that declares) and hands
    #: the totals to ``with_sums(ctx, totals)``. Unused in one process.
    step_sums: ClassVar[int] = 0
    #: per-sample statistics read from the step's one shared pass per layer (``persample/plan.py``), so
    #: that each is computed once whatever the order of the quantities: "sq" (||g_i||^2 per parameter),
    #: "m2" (sum_i g_i^2), "dots" (g_i . g), "hist" (the 1D histogram of the elements g_ij, counted
    #: over ``hist_range``)
    per_sample_stats: ClassVar[FrozenSet[str]] = frozenset()
    #: how the quantity reads the parameters as theta_t in the pre-hook, for steps where the loop changed them
    #: in place after the backward pass (``engine/param_versions.py``): "" not at all; "norms": per-parameter
    #: norms (the total and the changed parameters' parts become NaN with the reason, the others stay);
    #: "all": their values or a re-evaluation of the batch at them (not computed: NaN with the reason)
    reads_theta: ClassVar[str] = ""

    def __init__(self, schedule: schedules.ScheduleLike = None):
        self.schedule: Callable[[int], bool] = schedules.parse(
            self.default_schedule if schedule is None else schedule
        )
        unknown = set(self.needs) - KNOWN_NEEDS
        if unknown:
            raise ValueError(f"quantity {self.name!r} declares unknown needs {sorted(unknown)}")

    # -- scheduling ------------------------------------------------------------------------
    def is_active(self, step: int) -> bool:
        """Whether this quantity computes anything on ``step`` (captures are made for it)."""
        return bool(self.schedule(step))

    # -- life cycle --------------------------------------------------------------------------
    def start(self, watched: "Watched") -> None:
        """Called once by ``watch`` before the first step (e.g. to remember theta_0)."""

    def before_step(self, ctx: "StepContext") -> None:
        """Gradients are final, parameters are theta_t."""

    def after_step(self, ctx: "StepContext") -> None:
        """Parameters are theta_{t+1}; ``ctx.update`` holds d when ``"update"`` is needed."""

    def local_sums(self, ctx: "StepContext") -> Sequence[float]:
        """This process's ``step_sums`` numbers of the step (data-parallel runs, after ``before_step``)."""
        return ()

    def with_sums(self, ctx: "StepContext", totals: List[float]) -> None:
        """The declared numbers summed over the processes (data-parallel runs, at the end of the
        ``before_step`` hook): record what they give."""

    # -- the step's shared per-sample pass (persample/plan.py asks the active quantities) ------------
    #: ``hist_range(view) -> R``, defined by a quantity declaring "hist": the shared pass counts the elements
    #: g_ij in bins over [-R, R]; R None or not finite: no shared count on this step. Left None: the
    #: quantity counts on its own
    hist_range: ClassVar[Optional[Callable[..., Optional[float]]]] = None

    def per_sample_direction(self, step: Optional[int]) -> Optional[List[Any]]:
        """A direction v (one tensor per parameter) whose per-sample projections g_i . v the shared pass
        should compute on ``step`` (alpha's update d); None: none."""
        return None

    def per_sample_keep(self, step: Optional[int]) -> bool:
        """Whether the per-sample blocks of ``step``'s pass must be kept for a projection after the optimizer
        step (alpha, when a fit starts on it)."""
        return False

    def on_backward_end(self, step: int) -> None:
        """A backward pass through the model ended on ``step`` (quantities needing ``"backward_end"``)."""

    def on_skipped(self, step: int, reason: str) -> None:
        """The step ``step`` was skipped (no optimizer.step after backward); drop pending state."""

    def finish(self, ctx: "StepContext") -> None:
        """At ``Cockpit.close``, before ``close``: record what only the end of the run resolves (values
        of earlier steps, through ``ctx.emit_for_step``); they are written as amendments."""

    def close(self) -> None:
        """Free any state (called by ``Cockpit.close``)."""

    def describe(self) -> Dict[str, Any]:
        return {"schedule": str(self.schedule), "needs": sorted(self.needs)}

    def __repr__(self):
        return f"{type(self).__name__}(schedule={self.schedule})"


class Watched:
    """What a quantity may look at once, at ``start``: the model, optimizer and observed parameters."""

    def __init__(self, model, optimizer, names: List[str], params: list, loss_fn, dist=None):
        self.model = model
        self.optimizer = optimizer
        self.names = names
        self.params = params
        self.loss_fn = loss_fn
        self.dist = dist  # cockpit_lite.distributed.Group of a data-parallel run, None in one process
        self.rule_check: Optional[dict] = None  # outcome of the per-sample self-check (engine/selfcheck.py)
        self.rule_failures: Dict[str, str] = {}  # parameter name -> why its per-sample values are NaN for good
        self.replay_rejected: Dict[str, str] = {}  # of those, where the per-sample replay is no remedy either
        #: (parameter name, how its layer rule read the samples) that a self-check has looked at (passed, failed or
        #: could not check); a parameter served otherwise later (unfrozen, first called, rows read where a
        #: broadcast was) is checked again (engine/selfcheck.py)
        self.rule_checked: Set[Tuple[str, str]] = set()
        #: "name (Type)" of a module that reads dim 1 as the batch (batch_first=False), else None
        #: (engine/setup.py ``sequence_first_module``): the batch size is then not the loss input's dim 0
        self.seq_first: Optional[str] = None


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


__all__ = ["Quantity", "Watched", "KNOWN_NEEDS", "is_finite_number", "Optional"]
