"""The curvature traces panel's 'tr(H) < 0 ... non-convex region' legend entry counts only steps where the
sign is established: exact values below 0, estimates more than 2 standard errors below 0 (references: the
logged ``hess_trace`` and ``hess_trace/stderr``)."""

import re

import numpy as np
import pytest

import cockpit_lite
from cockpit_lite.runlog import RunLogWriter

pytest.importorskip("matplotlib")
from picture_checks import draw_panel  # noqa: E402


def trace_log(path, values, stderrs, method):
    w = RunLogWriter(path, {})
    for s, (v, e) in enumerate(zip(values, stderrs)):
        w.write({"type": "step", "step": s, "values": {"hess_trace": v, "hess_trace/stderr": e},
                 "data": {"hess_trace": {"method": method, "probes": 10 if e else 0}}})
    w.close()
    return cockpit_lite.load(path)


def legend_texts(run):
    ax = draw_panel("traces", run)
    return [t.get_text() for t in ax.get_legend().get_texts()]


def negative_count(texts):
    found = [re.search(r"tr\(H\) < 0 on (\d+) step", t) for t in texts]
    found = [int(m.group(1)) for m in found if m]
    return found[0] if found else 0


def test_estimates_within_two_standard_errors_of_zero_are_not_called_non_convex(tmp_path):
    # -1.39 +- 3.59 and -0.57 +- 2.72: within their error of 0; -9 +- 1: 9 s.e. below 0
    run = trace_log(tmp_path, [5.0, -1.39, 4.0, -0.57, -9.0, 6.0], [1.0, 3.59, 1.0, 2.72, 1.0, 1.0], "hutchinson")
    _, v = run.series("hess_trace")
    _, e = run.series("hess_trace/stderr")
    expected = int(np.sum(v < -2 * e))
    assert expected == 1
    texts = legend_texts(run)
    assert negative_count(texts) == expected
    assert any("within 2 s.e. of 0" in t and "on 2 step(s)" in t for t in texts)
    # exact values (standard error 0) below 0 count as before, however close to 0
    exact = trace_log(tmp_path / "exact", [3.0, -0.2, 2.0, -0.01], [0.0] * 4, "exact:backpack-diag-hessian")
    _, v = exact.series("hess_trace")
    texts = legend_texts(exact)
    assert negative_count(texts) == int(np.sum(v < 0)) == 2 and not any("within" in t for t in texts)
