"""What the hooks note about the user's loop besides the step state (kept out of ``cockpit.py``): which backward
passes write the watched ``.grad`` (``grad_reach.py``), which loss calls read samples already read
(``repeated_samples.py``), whether another optimizer stepped after a pass through the model
(``other_optimizers.py``), whether the loop changed the parameters after the step's backward pass
(``param_versions.py``) and how many parameter groups the optimizer had (``param_groups.py``)."""

from __future__ import annotations

from .grad_reach import ParamReach
from .param_versions import ParamVersions
from .repeated_samples import RepeatedSamples


def start_loop_trackers(cockpit, params) -> None:
    cockpit._repeats = RepeatedSamples()
    cockpit._reaches_params = ParamReach(params)
    cockpit._param_groups_seen = len(cockpit.optimizer.param_groups)
    cockpit._other_stepped = False
    cockpit._param_versions = ParamVersions(params)


def reset_loop_trackers(cockpit) -> None:
    """A new step: what the trackers noted about the last one is dropped."""
    cockpit._other_stepped = False
    cockpit._repeats.reset()
    cockpit._reaches_params.take()
    cockpit._param_versions.reset()
