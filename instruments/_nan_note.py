"""Values that a panel cannot draw, said on the panel: "alpha: 7 of 20 steps NaN: <first reason>".

A line has a gap where a value is NaN and a histogram simply counts fewer values: without a word, a reader
takes the drawn values for all of them. ``nan_note(ax, run, keys)`` counts, per key, the steps in range whose
value is NaN, and writes one line per key with its first logged reason (the reason of the first NaN step)
in a small box at the bottom left of the panel. Every panel that draws scalar series calls it; the
notebook's key panels too (``cockpit_lite.notebook``)."""

from __future__ import annotations

import textwrap
from typing import List, Optional, Sequence

import numpy as np

#: the ``gid`` of the note's Text artist (tests and tools find it by this)
NAN_NOTE_GID = "nan-note"
WIDTH = 64  # characters per line of the box before wrapping
MAX_CHARS = 2 * WIDTH  # of one key's line, shortened at a word with " …" beyond
#: how a note on a panel looks (red text in a small white box, above the data)
NOTE_STYLE = dict(fontsize="x-small", color="#b00020", zorder=6,
                  bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="#e8b4b8", alpha=0.9))


def nan_counts(run, key: str):
    """``(k, n, reason)``: NaN steps of ``key`` in range, steps logged, and the reason of the first NaN step
    (else the first reason logged for ``key``; None when none was)."""
    steps, values = run.series(key)
    values = np.asarray(values, dtype=np.float64)
    nan = np.isnan(values)
    k = int(nan.sum())
    if not k:
        return 0, len(values), None
    try:
        reasons = run.reasons(key)
    except Exception:  # a view without reasons: the count alone
        reasons = {}
    reason = None
    for s in np.asarray(steps)[nan].tolist():
        if int(s) in reasons:
            reason = reasons[int(s)]
            break
    if reason is None and reasons:
        reason = next(iter(reasons.values()))
    return k, len(values), reason


def nan_lines(run, keys: Sequence[str]) -> List[str]:
    """One line per key with NaN steps: '<key>: k of n steps NaN: <first reason>'."""
    lines = []
    for key in dict.fromkeys(keys):
        k, n, reason = nan_counts(run, key)
        if k:
            lines.append(f"{key}: {k} of {n} steps NaN: {reason or 'no reason logged'}")
    return lines


def nan_note(ax, run, keys: Sequence[str], *, loc: str = "lower left") -> Optional[object]:
    """Write the NaN counts and reasons of ``keys`` on ``ax`` (nothing when every value is a number).
    Returns the Text artist (gid :data:`NAN_NOTE_GID`) or None."""
    return draw_note(ax, nan_lines(run, keys), loc=loc)


def draw_note(ax, lines: Sequence[str], *, loc: str = "lower left") -> Optional[object]:
    """``lines`` (wrapped) in the note's box on ``ax``; None when there are none."""
    if not lines:
        return None
    # at most ~2 lines per key: a panel is small; the full reason stays in the log (``run.reasons(key)``)
    # and in the TensorBoard tab's problems table
    text = "\n".join(textwrap.fill(textwrap.shorten(line, MAX_CHARS, placeholder=" …"), WIDTH,
                                    subsequent_indent="  ", break_on_hyphens=False) for line in lines)
    x, ha = (0.01, "left") if loc.endswith("left") else (0.99, "right")
    y, va = (0.02, "bottom") if loc.startswith("lower") else (0.98, "top")
    return ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, gid=NAN_NOTE_GID, multialignment="left",
                   **NOTE_STYLE)
