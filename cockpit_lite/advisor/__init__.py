"""The advisor: reads a run's recorded quantities and says what is wrong and what to try.

    from cockpit_lite.advisor import diagnose
    for d in diagnose(cockpit_lite.load("runs/exp1")):
        print(d.summary())

Rules live in ``rules.py`` (one function each), thresholds with their reasoning in ``thresholds.py``.
Live use: ``watch(..., advisor=True)`` warns once per diagnosis and logs it (``live.AdvisorSink``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from .diagnosis import Diagnosis
from .thresholds import Thresholds

__all__ = ["diagnose", "Diagnosis", "Thresholds", "report"]


def diagnose(run, thresholds: Optional[Dict[str, Any]] = None, rules: Optional[List[str]] = None) -> List[Diagnosis]:
    """All diagnoses that hold for ``run`` (a ``cockpit_lite.Run``), most confident first."""
    from .rules import RULES

    th = Thresholds().with_overrides(thresholds)
    chosen = RULES if rules is None else {name: RULES[name] for name in rules}
    found = []
    if not len(run.steps()) and not run.skipped:
        return found
    for rule in chosen.values():
        d = rule(run, th)
        if d is not None:
            found.append(d)
    return sorted(found, key=lambda d: -d.confidence)


def report(run, thresholds: Optional[Dict[str, Any]] = None) -> str:
    """A short text report, as printed by ``cockpit-lite diagnose LOGDIR``."""
    found = diagnose(run, thresholds)
    steps = run.steps().tolist()
    head = (f"cockpit-lite diagnosis of {run.path.parent} ({len(steps)} tracked steps"
            f"{f', {steps[0]}..{steps[-1]}' if steps else ''}; {len(run.skipped)} skipped)")
    from .coverage import lines as coverage_lines

    missed = coverage_lines(run, thresholds)
    if not found:
        checked = "the checks that could run" if missed else "the rules this run's quantities allow"
        return "\n".join([head + f"\nNo problem found by {checked} "
                                 f"(recorded: {', '.join(sorted({k.split('/')[0] for k in run.keys()}))})."] + missed)
    lines = [head]
    for d in found:
        lines.append(f"\n* {d.title}  [{d.rule}, confidence {d.confidence:.2f}, step {d.step}]")
        lines.append(f"  action: {d.action}")
        for e in d.evidence[:4]:
            obs = e["observed"]
            obs = f"{obs:.3g}" if isinstance(obs, float) else obs
            if e.get("interval"):
                obs += f" (95% interval {e['interval'][0]:.3g}..{e['interval'][1]:.3g})"
            at = e.get("steps") or []
            span = (f" over steps {at[0]}..{at[-1]}" if len(at) > 1 and at[0] != at[-1] else
                    f" at step {at[0]}" if at else "")
            lines.append(f"  evidence: {e['quantity']} {e['comparison']} {e['threshold']}: {obs}{span}")
        if len(d.evidence) > 4:
            lines.append(f"  evidence: ... and {len(d.evidence) - 4} more of the same kind (--json lists all)")
    if missed:
        lines.append("")
    return "\n".join(lines + missed)
