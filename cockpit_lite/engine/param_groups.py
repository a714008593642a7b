"""``optimizer.add_param_group(...)`` after ``watch()`` (unfreezing a backbone part-way, progressive
growing): the observed parameters are those the optimizer held when watching began (the run header
lists them). The new group's parameters are trained but not observed; every value (grad_norm, distance,
the noise tests, ...) still covers the parameters of the header only. Said once, as a warning and a logged
event, at the first step after the optimizer gained parameter groups."""

from __future__ import annotations


def check_param_groups(cockpit) -> None:
    groups = len(cockpit.optimizer.param_groups)
    if groups <= cockpit._param_groups_seen:
        return
    cockpit._param_groups_seen = groups
    watched = {id(p) for p in cockpit.watched.params}
    names = {id(p): n for n, p in cockpit.watched.model.named_parameters()}
    new = [names.get(id(p), "?") for g in cockpit.optimizer.param_groups for p in g["params"] if id(p) not in watched]
    if new:
        cockpit._warn_once("param_groups", (
            f"cockpit-lite: optimizer.add_param_group() after watch() added {len(new)} parameter(s) "
            f"({', '.join(new[:3])}{' ...' if len(new) > 3 else ''}); they are trained but not observed: every "
            "logged value covers the parameters watched from the start (the run header's list). Add every "
            "group before watch(), with lr=0 or requires_grad=False until it trains, to observe them."))
