"""The dashboard checked as a picture, on a run with outliers, a constant and a near-constant series,
sparse curvature with NaNs, a negative Hessian trace and a slow first step (cockpit_lite/testing/awkward_log.py):
what a person reads must not overlap, leave the figure, hide data, or hide values off the axis."""

import math

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from cockpit_lite import dashboard, load  # noqa: E402
from cockpit_lite.testing import write_awkward_log  # noqa: E402
from picture_checks import data_under_legends, drawn_texts, outside_figure, overlaps  # noqa: E402


@pytest.fixture(scope="module")
def fig(tmp_path_factory):
    root = tmp_path_factory.mktemp("picture")
    write_awkward_log(root / "run", 400)
    figure = dashboard.render(root / "run", root / "dashboard.png")
    figure.cockpit_path = root / "dashboard.png"
    figure.cockpit_run = load(root / "run")
    return figure


def panel(fig, title_start):
    found = [ax for ax in fig.axes if ax.get_title().startswith(title_start)]
    assert found, [ax.get_title() for ax in fig.axes]
    return found[0]


def legend_text(ax):
    return " | ".join(t.get_text() for t in ax.get_legend().get_texts())


def test_no_text_overlaps_and_all_text_is_inside_the_figure(fig):
    assert overlaps(fig) == []
    assert outside_figure(fig) == []
    assert fig.cockpit_path.read_bytes()[:4] == b"\x89PNG"


def test_no_offset_or_multiplier_text_beside_an_axis(fig):
    offsets = [(ax.get_title(), a.get_offset_text().get_text()) for ax in fig.axes for a in (ax.xaxis, ax.yaxis)
               if a.get_offset_text().get_text()]
    assert offsets == []
    ticks = [t for t, _ in drawn_texts(fig)]
    gsnr = panel(fig, "Mean gradient SNR")
    labels = [t.get_text() for t in gsnr.get_yticklabels() if t.get_text()]
    assert len(labels) == len(set(labels))  # no "1 1 1 1"
    assert ticks


def test_legends_cover_no_data(fig):
    assert data_under_legends(fig) == []


def test_alpha_values_off_the_axis_are_marked_with_their_count(fig):
    ax = panel(fig, "Alpha over steps")
    text = legend_text(ax)
    _, alpha = fig.cockpit_run.series("alpha")
    # the reference: count the logged values outside the drawn range of the data (the cut lines)
    cut = [line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"]
    hi_cut = max(cut)
    lo_cut = min(cut)
    n_above, n_below = int(np.sum(alpha > hi_cut)), int(np.sum(alpha < lo_cut))
    assert n_above == 2 and n_below == 1
    assert f"{n_above} above the axis (max 93.4)" in text and f"{n_below} below the axis (min -26.6)" in text


def test_alpha_gauge_shows_the_median_and_quartiles_not_a_mean(fig):
    ax = panel(fig, "Alpha: where steps")
    _, alpha = fig.cockpit_run.series("alpha")
    alpha = alpha[np.isfinite(alpha)]
    q1, med, q3 = np.percentile(alpha, [25, 50, 75])
    text = legend_text(ax)
    assert f"median {med:+.2f}, quartiles {q1:+.2f}..{q3:+.2f}" in text and "mean" not in text


def test_a_constant_learning_rate_is_drawn_flat_from_zero(fig):
    ax = panel(fig, "Learning rate")
    low, high = ax.get_ylim()
    assert low == 0 and high == pytest.approx(1.3 * 3e-4)


def test_rows_have_no_empty_slots(fig):
    width = fig.bbox.width
    rows = {}
    for ax in fig.axes:
        if ax.get_title():
            box = ax.get_window_extent()
            rows.setdefault(round(box.y0), []).append(box)
    for boxes in rows.values():
        assert max(b.x1 for b in boxes) > 0.8 * width  # the last panel of every row reaches the right side


def test_sparse_curvature_has_markers_error_bars_and_a_word_on_negative_traces(fig):
    ax = panel(fig, "Curvature traces")
    traces = [line for line in ax.get_lines() if line.get_label().startswith("hess trace")]
    assert traces and traces[0].get_marker() == "o"
    assert "non-convex region" in legend_text(ax)
    tic = panel(fig, "TIC (Takeuchi")
    assert any(c.get_label().startswith("tic_diag ± 1 standard error") for c in tic.containers)


def test_time_per_step_gives_the_cockpit_share_and_marks_the_slow_first_step(fig):
    ax = panel(fig, "Time per step")
    _, t = fig.cockpit_run.series("time")
    _, c = fig.cockpit_run.series("time/cockpit")
    share = c[1:].sum() / t[1:].sum()  # the reference: ratio of the logged sums, first step left out
    assert f"cockpit: {100 * share:.0f}% of step time" in legend_text(ax)
    assert f"1 above the axis (wall) (max {t[0]:.3g})" in legend_text(ax)
    assert ax.get_ylim()[1] < 1.0  # not flattened by the 8 s first step


def test_a_finite_huge_loss_is_counted_off_the_axis(fig):
    ax = panel(fig, "Mini-batch loss")
    assert "1 above the axis (max 2e+299)" in legend_text(ax)
    assert math.isfinite(ax.get_ylim()[1]) and ax.get_ylim()[1] < 10
