"""The advisor's diagnoses of the run, as a text panel: what is wrong, how sure, what to try."""

from __future__ import annotations

import textwrap

from . import Instrument


class Advisor(Instrument):
    name = "advisor"
    tab = "advisor"
    title = "Advisor: diagnoses"
    group = "performance"
    keys = ("loss", "grad_norm")  # any run with step records can be diagnosed
    kind = "text"
    description = "Rules over the recorded quantities (cockpit_lite.advisor): problem, confidence, action."

    def missing(self, run):
        from . import no_records

        base = getattr(run, "run", run)
        if no_records(base) or not (hasattr(type(base), "records") or getattr(base, "records", None)):
            return "the log has no step records yet"
        return None

    def diagnoses(self, run):
        from cockpit_lite.advisor import diagnose

        return diagnose(getattr(run, "run", run))  # the whole run: rules look at its recent steps

    def draw(self, ax, run) -> None:
        from cockpit_lite.advisor.coverage import unchecked

        found = self.diagnoses(run)
        missed = unchecked(getattr(run, "run", run))
        ax.set_axis_off()
        ax.set_title(self.title)
        lines = []
        if not found:
            lines.append("No problem found by the checks that could run." if missed else
                         "No problem found by the rules the recorded quantities allow.")
        for d in found[:4]:
            lines += textwrap.wrap(f"• {d.title} [{d.rule}, confidence {d.confidence:.2f}]", 62)
            lines += textwrap.wrap(f"   → {d.action}", 62, subsequent_indent="     ")
        if len(found) > 4:
            lines.append(f"(+{len(found) - 4} more: cockpit-lite diagnose LOGDIR)")
        budget = 16 - len(lines[:16])
        if missed and budget > 1:  # what a quiet advisor could not look at, and why
            more = ["Could not check:"]
            for key, why in missed:
                more += textwrap.wrap(f"- {key}: {why}", 62, subsequent_indent="   ")
            if len(more) > budget:
                more = more[:budget - 1] + ["  (cockpit-lite diagnose LOGDIR lists all)"]
            lines = lines[:16] + more
        ax.text(0.0, 1.0, "\n".join(lines[:16]), va="top", ha="left", fontsize=7, family="monospace",
                transform=ax.transAxes)
