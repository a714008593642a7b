"""Every instrument drawn from a recorded (synthetic, spec-following) run: what was drawn is checked
against the log read back independently (``Run.series`` / ``Run.data``) and brute-force references."""

import json
import math
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

import cockpit_lite
from cockpit_lite import instruments
from cockpit_lite.instruments import RunView
from cockpit_lite.instruments._draw import downsample, moving_average, spans_decades
from cockpit_lite.testing import write_synthetic_log

pytest.importorskip("matplotlib")
from matplotlib.collections import PathCollection, PolyCollection, QuadMesh  # noqa: E402
from matplotlib.patches import StepPatch  # noqa: E402
from helpers import written_run  # noqa: E402
from picture_checks import draw_panel  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "third_party_instrument"
STEPS = 60


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    write_synthetic_log(d, STEPS, hist_every=10, curvature_every=5, lr_groups=2)
    return cockpit_lite.load(d)


def draw(inst, run):
    return draw_panel(inst, run, figsize=(5, 4))  # a real render: errors at draw time surface there


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def by_name():
    return {i.name: i for i in instruments.builtin()}


def test_builtins_cover_every_family_and_describe_themselves():
    found = instruments.builtin()
    names = [i.name for i in found]
    assert len(names) == len(set(names))
    read = {k.split("/")[0] for i in found for k in i.keys}
    for quantity in ("alpha", "norm_test", "inner_test", "ortho_test", "grad_norm", "distance", "update_size",
                     "grad_hist_1d", "grad_hist_2d", "hess_max_ev", "hess_trace", "ggn_trace", "tic_diag",
                     "tic_trace", "mean_gsnr", "early_stopping", "cabs", "lr", "loss", "time", "energy"):
        assert quantity in read, quantity
    for inst in found:
        desc = json.loads(json.dumps(inst.describe()))
        assert desc["title"] and desc["keys"] and desc["name"] == inst.name
        assert desc["kind"] in instruments.KINDS
        assert desc["group"] in instruments.GROUPS


def test_every_instrument_has_data_in_a_full_log(full_run):
    view = RunView(full_run)
    for inst in instruments.builtin():
        assert inst.missing(view) is None, (inst.name, inst.missing(view))


@pytest.mark.parametrize("name,keys", [
    ("grad_norm", ["grad_norm"]), ("gsnr", ["mean_gsnr"]), ("early_stopping", ["early_stopping"]),
    ("cabs", ["cabs"]), ("tic", ["tic_diag", "tic_trace"]), ("hess_max_ev", ["hess_max_ev"]),
    ("gradient_tests_history", ["norm_test", "inner_test", "ortho_test"]),
    ("step_time", ["time", "time/cockpit"]), ("distance", ["distance", "update_size"]),
])
def test_line_instruments_draw_the_logged_series(full_run, name, keys):
    inst = by_name()[name]
    ax = draw(inst, full_run)
    lines = lines_by_label(ax)
    assert ax.get_title() == inst.title
    assert ax.get_xlabel() == "step" and ax.get_ylabel()
    for key in keys:
        steps, values = full_run.series(key)
        line = lines[inst.label(key)]
        np.testing.assert_array_equal(line.get_xdata(), steps)
        np.testing.assert_allclose(line.get_ydata(), values)


def test_thresholds_are_drawn_where_the_tests_decide(full_run):
    ax = draw(by_name()["gradient_tests_history"], full_run)
    ref = [l for l in ax.get_lines() if l.get_linestyle() == "--"]
    assert len(ref) == 1 and set(ref[0].get_ydata()) == {1.0}
    ax = draw(by_name()["early_stopping"], full_run)
    assert {0.0} == set([l for l in ax.get_lines() if l.get_linestyle() == "--"][0].get_ydata())


def test_distance_uses_a_log_axis_when_values_span_decades(full_run):
    ax = draw(by_name()["distance"], full_run)
    _, d = full_run.series("distance")
    _, u = full_run.series("update_size")
    both = np.concatenate([d, u])
    assert both.max() / both.min() > 100  # the synthetic run spans decades
    assert ax.get_yscale() == "log"
    ax = draw(by_name()["grad_norm"], full_run)
    assert ax.get_yscale() == "linear"  # ||g|| within one decade


def test_hyperparameters_draw_one_line_per_param_group(full_run):
    ax = draw(by_name()["hyperparameters"], full_run)
    lines = lines_by_label(ax)
    assert set(lines) == {"group0", "group1"}
    np.testing.assert_allclose(lines["group1"].get_ydata(), full_run.series("lr/group1")[1])


def test_performance_moving_average_matches_a_brute_force_trailing_mean(full_run):
    ax = draw(by_name()["performance"], full_run)
    steps, loss = full_run.series("loss")
    window = max(1, min(200, len(loss) // 20))
    brute = np.array([np.mean(loss[max(0, i - window + 1):i + 1]) for i in range(len(loss))])
    ma = [l for l in ax.get_lines() if l.get_label().startswith("moving average")][0]
    assert f"({window} steps)" in ma.get_label()
    np.testing.assert_allclose(ma.get_ydata(), brute, rtol=1e-12)
    np.testing.assert_allclose(lines_by_label(ax)["loss"].get_ydata(), loss)


def test_alpha_gauge_draws_the_unit_parabola_and_both_histograms(full_run):
    ax = draw(by_name()["alpha_gauge"], full_run)
    _, alpha = full_run.series("alpha")
    alpha = alpha[np.isfinite(alpha)]
    assert len(alpha) == STEPS - 1  # the last step's alpha is never known
    parabola = lines_by_label(ax)["unit parabola"]
    np.testing.assert_allclose(parabola.get_ydata(), np.asarray(parabola.get_xdata()) ** 2)
    outlines = {p.get_label(): p for p in ax.patches if isinstance(p, StepPatch) and not p.get_fill()}
    recent = max(1, round(0.1 * len(alpha)))
    # robust statistics (median, quartiles), numpy's percentiles as the reference
    q = [np.percentile(v, [25, 50, 75]) for v in (alpha, alpha[-recent:])]
    all_label = f"all {len(alpha)} steps: median {q[0][1]:+.2f}, quartiles {q[0][0]:+.2f}..{q[0][2]:+.2f}"
    recent_label = f"last {recent}: median {q[1][1]:+.2f}, quartiles {q[1][0]:+.2f}..{q[1][2]:+.2f}"
    assert set(outlines) == {all_label, recent_label}
    for label, values in ((all_label, alpha), (recent_label, alpha[-recent:])):
        heights = outlines[label].get_data().values
        counts = np.zeros(30)
        for a in values:  # brute force: bin each value, the out-of-range ones into the edge bins
            counts[min(29, max(0, int(math.floor((min(max(a, -1.5), 1.5) + 1.5) / 0.1 + 1e-9))))] += 1
        np.testing.assert_allclose(heights / heights.max(), counts / counts.max(), atol=1e-12)
    assert "alpha" in ax.get_xlabel() and ax.get_title() == by_name()["alpha_gauge"].title


def test_alpha_trace_plots_alpha_per_step(full_run):
    ax = draw(by_name()["alpha_trace"], full_run)
    steps, alpha = full_run.series("alpha")
    dots = lines_by_label(ax)["alpha"]
    np.testing.assert_array_equal(dots.get_xdata(), steps)
    np.testing.assert_allclose(dots.get_ydata(), alpha)


def test_gradient_tests_scatter_inner_against_ortho(full_run):
    ax = draw(by_name()["gradient_tests"], full_run)
    s_in, inner = full_run.series("inner_test")
    s_or, ortho = full_run.series("ortho_test")
    expected = {(float(o), float(i)) for s, i in zip(s_in, inner) for t, o in zip(s_or, ortho) if s == t}
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    offsets = {tuple(map(float, xy)) for xy in scatters[0].get_offsets()}
    assert offsets == expected
    assert ax.get_xlabel() == "orthogonality test" and ax.get_ylabel() == "inner-product test"
    circle = lines_by_label(ax)["norm test = 1"]
    np.testing.assert_allclose(np.hypot(circle.get_xdata(), circle.get_ydata()), 1.0)


def test_grad_hist_1d_draws_the_latest_histogram(full_run):
    ax = draw(by_name()["grad_hist_1d"], full_run)
    last_step, last = full_run.data("grad_hist_1d")[-1]
    filled = [p for p in ax.patches if isinstance(p, StepPatch) and p.get_fill()][0]
    np.testing.assert_array_equal(filled.get_data().values, last["counts"])
    np.testing.assert_allclose(filled.get_data().edges, last["edges"])
    assert filled.get_label() == f"step {last_step}"
    assert "B·g_ij" in ax.get_xlabel()


def test_grad_hist_2d_draws_the_latest_joint_histogram(full_run):
    ax = draw(by_name()["grad_hist_2d"], full_run)
    step, h = full_run.data("grad_hist_2d")[-1]
    mesh = [c for c in ax.collections if isinstance(c, QuadMesh)][0]
    counts = np.asarray(h["counts"], dtype=float)  # (x bins, y bins)
    drawn = np.ma.filled(mesh.get_array(), 0.0).reshape(len(h["y_edges"]) - 1, len(h["x_edges"]) - 1)
    np.testing.assert_array_equal(np.nan_to_num(drawn), counts.T)
    assert f"step {step}" in ax.get_title()


def test_hess_max_ev_marks_unconverged_steps(full_run):
    ax = draw(by_name()["hess_max_ev"], full_run)
    bad = [s for s, d in full_run.data("hess_max_ev") if not d["converged"]]
    marks = [l for l in ax.get_lines() if l.get_label().startswith("not converged")][0]
    assert list(marks.get_xdata()) == bad and len(bad) > 0


def test_traces_draw_both_traces_with_standard_error_bands(full_run):
    ax = draw(by_name()["traces"], full_run)
    labels = [l.get_label() for l in ax.get_lines()]
    assert any(l.startswith("hess trace (hutchinson, 20 probes)") for l in labels)
    assert any(l.startswith("ggn trace") for l in labels)
    # a sparse series (curvature every few steps) carries error bars, a dense one a band
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    bars = list(ax.containers)
    assert len(bands) + len(bars) == 2
    steps, value = full_run.series("hess_trace")
    _, err = full_run.series("hess_trace/stderr")
    if bars:
        ys = np.concatenate([seg[:, 1] for seg in bars[0].lines[2][0].get_segments()])
    else:
        ys = bands[0].get_paths()[0].vertices[:, 1]
    assert np.isclose(ys.max(), (value + err).max()) and np.isclose(ys.min(), (value - err).min())


def test_exact_traces_have_no_error_band(tmp_path):
    run = written_run(tmp_path, [{"hess_trace": 3.0 + step, "hess_trace/stderr": 0.0} for step in range(5)],
                      data={"hess_trace": {"method": "exact:backpack-diag-hessian", "probes": 0}})
    ax = draw(by_name()["traces"], run)
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert [l.get_label() for l in ax.get_lines()] == ["hess trace (exact:backpack-diag-hessian)"]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [3, 4, 5, 6, 7])


def test_energy_shows_provenance_and_cumulative_energy(full_run):
    ax = draw(by_name()["energy"], full_run)
    text = " ".join(t.get_text() for a in ax.figure.axes for t in a.texts)
    assert "gpu0: measured (nvml)" in text and "cpu: estimated" in text
    _, joules = full_run.series("energy")
    _, co2 = full_run.series("energy/co2_g")
    assert f"{co2.sum():.3g} gCO₂eq" in text and "400 g/kWh" in text
    twin = [a for a in ax.figure.axes if a is not ax][0]
    np.testing.assert_allclose(twin.get_lines()[0].get_ydata(), np.cumsum(joules) / 3.6e6)
    assert twin.get_ylabel() == "cumulative kWh"
    assert "total: estimated" in text  # the label of the sum (GPU measured + CPU estimated)
    devices = lines_by_label(ax)
    np.testing.assert_allclose(devices["gpu0"].get_ydata(), full_run.series("energy/gpu0")[1])


def test_energy_records_covering_several_steps_are_shown_per_step(tmp_path):
    write_synthetic_log(tmp_path, 12, quantities=["loss", "energy"], energy_every=3)
    run = cockpit_lite.load(tmp_path)
    steps, joules = run.series("energy")
    assert steps.tolist() == [2, 5, 8, 11]
    ax = draw(by_name()["energy"], run)
    np.testing.assert_allclose(lines_by_label(ax)["total"].get_ydata(), joules / 3)
    twin = [a for a in ax.figure.axes if a is not ax][0]
    assert twin.get_lines()[0].get_ydata()[-1] == pytest.approx(joules.sum() / 3.6e6)


# -- missing data --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loss_only(tmp_path_factory):
    d = tmp_path_factory.mktemp("loss_only")
    write_synthetic_log(d, 20, quantities=["loss", "cabs", "energy"], optimizer="Adam", energy_status="unavailable")
    return cockpit_lite.load(d)


def test_missing_quantities_say_what_is_absent_and_how_to_enable_it(loss_only):
    view = RunView(loss_only)
    reasons = {i.name: i.missing(view) for i in instruments.builtin()}
    assert reasons["performance"] is None and reasons["advisor"] is None  # any step record can be diagnosed
    assert "alpha not in this log" in reasons["alpha_gauge"] and "quantities='economy'" in reasons["alpha_gauge"]
    assert "hess_max_ev" in reasons["hess_max_ev"] and "'full'" in reasons["hess_max_ev"]
    assert "quantities=[..., 'mean_gsnr']" in reasons["gsnr"]
    for name, reason in reasons.items():
        if name not in ("performance", "advisor"):
            assert reason, name


def test_nan_values_report_the_logged_reason(loss_only):
    view = RunView(loss_only)
    cabs = by_name()["cabs"].missing(view)
    assert "NaN on every step (20x)" in cabs and "optimizer is Adam" in cabs
    energy = by_name()["energy"].missing(view)
    assert "energy is NaN on every step (20x)" in energy and "RAPL is not readable" in energy


def test_step_range_without_values_is_reported(full_run):
    view = RunView(full_run, start=STEPS + 10)
    assert "no values in the chosen step range" in by_name()["grad_norm"].missing(view)
    assert RunView(full_run, start=10, stop=20).series("loss")[0].tolist() == list(range(10, 20))


def test_empty_log_has_no_data_anywhere(tmp_path):
    from cockpit_lite.runlog import RunLogWriter

    RunLogWriter(tmp_path, {}).close()
    view = RunView(cockpit_lite.load(tmp_path))
    for inst in instruments.builtin():
        assert inst.missing(view) == "the log has no step records yet"


# -- display helpers -----------------------------------------------------------------------------
def test_downsample_keeps_spikes_and_bounds():
    steps = np.arange(100_000)
    values = np.sin(steps / 1000.0)
    values[54_321] = 50.0
    values[777] = np.nan
    s, v = downsample(steps, values, 2000)
    assert len(s) <= 2000 and np.all(np.diff(s) >= 0)
    assert np.nanmax(v) == 50.0 and np.isclose(np.nanmin(v), values[np.isfinite(values)].min())
    short = np.arange(10.0)
    assert downsample(short, short)[1] is short  # short series are untouched


def test_moving_average_ignores_nan_like_a_brute_force_loop():
    v = np.array([1.0, np.nan, 3.0, 4.0, np.nan, np.nan, np.nan, 8.0])
    ma = moving_average(v, 3)
    for i in range(len(v)):
        window = v[max(0, i - 2):i + 1]
        window = window[np.isfinite(window)]
        if window.size:
            assert ma[i] == pytest.approx(window.mean())
        else:
            assert np.isnan(ma[i])


def test_spans_decades():
    assert spans_decades([1e-3, 1.0]) and not spans_decades([1.0, 20.0]) and not spans_decades([-1.0, 1e5])


# -- third-party instruments ---------------------------------------------------------------------
def _entry_point(name, value):
    return metadata.EntryPoint(name=name, value=value, group=instruments.GROUP_ENTRY_POINTS)


@pytest.fixture
def example_package(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    yield
    sys.modules.pop("cockpit_lite_relative_update", None)


def test_third_party_instrument_is_discovered_through_the_entry_point_group(monkeypatch, example_package, full_run):
    eps = [_entry_point("relative_update", "cockpit_lite_relative_update:RelativeUpdate")]

    def fake_entry_points(**kw):
        assert kw == {"group": "cockpit_lite.instruments"}
        return eps

    monkeypatch.setattr(metadata, "entry_points", fake_entry_points)
    found = instruments.discover()
    assert [i.name for i in found][-1] == "relative_update"
    inst = found[-1]
    assert inst.missing(RunView(full_run)) is None
    ax = draw(inst, full_run)
    steps, upd = full_run.series("update_size")
    _, par = full_run.series("param_norm")
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), upd / par)
    assert instruments.select(["relative_update"])[0] is not None


def test_broken_or_clashing_entry_points_are_skipped_with_a_warning(monkeypatch):
    eps = [_entry_point("broken", "no_such_module_xyz:Panel"), _entry_point("dup", "cockpit_lite.instruments.grad_norm:GradNorm")]
    monkeypatch.setattr(metadata, "entry_points", lambda **kw: eps)
    with pytest.warns(RuntimeWarning) as record:
        found = instruments.discover()
    text = " ".join(str(w.message) for w in record)
    assert "'broken'" in text and "named 'grad_norm' like an existing one" in text
    assert [i.name for i in found] == [i.name for i in instruments.builtin()]


def test_select_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown instrument"):
        instruments.select(["grad_norm", "nope"])


@pytest.mark.parametrize("which", ["full_run", "loss_only"])  # loss_only holds NaN values
def test_prefetched_series_equal_the_runs_own_series(request, which):
    full_run = request.getfixturevalue(which)
    keys = full_run.keys()
    for start, stop in ((None, None), (5, 30)):
        view = RunView(full_run, start, stop)
        view.prefetch(keys + ["no_such_key", "hess_trace"], ["grad_hist_1d", "alpha", "energy", "nothing"])
        assert view.series("no_such_key")[0].size == 0  # Run.series raises KeyError for it: nothing drawn
        for key in keys + ["hess_trace"]:
            s_ref, v_ref = full_run.series(key, start=start, stop=stop)
            s, v = view.series(key)
            np.testing.assert_array_equal(s, s_ref)
            np.testing.assert_array_equal(v, v_ref)  # NaN compare equal in assert_array_equal
        for key in ("grad_hist_1d", "alpha", "energy", "nothing"):
            expected = [(st, d) for st, d in full_run.data(key) if (start or 0) <= st < (stop or 10**9)]
            assert view.data(key) == expected
    assert set(RunView(full_run).keys()) == set(keys)


def test_prefetch_handles_mixed_records_null_and_infinite_values(tmp_path):
    from cockpit_lite.runlog import RunLogWriter

    w = RunLogWriter(tmp_path, {})
    for step in range(12):
        values = {"a": float(step)}
        if step % 3 == 0:
            values["b"] = math.inf if step == 3 else -1.0
        if step == 7:
            values["a"] = None  # JSON null: NaN for the reader
        if step == 8:
            values = {"b": math.nan, "a": 8.0}  # another key order
        w.write({"type": "step", "step": step, "values": values})
    w.write({"type": "step", "step": 4, "amends": True, "values": {"c": 2.5}})
    w.close()
    run = cockpit_lite.load(tmp_path)
    view = RunView(run)
    view.prefetch(["a", "b", "c"])
    for key in ("a", "b", "c"):
        np.testing.assert_array_equal(view.series(key)[0], run.series(key)[0])
        np.testing.assert_array_equal(view.series(key)[1], run.series(key)[1])
    assert np.isnan(view.series("a")[1][7]) and np.isinf(view.series("b")[1][1])


def test_long_series_are_drawn_as_bucket_means_with_a_min_max_band(tmp_path):
    n = 5000
    rng = np.random.default_rng(0)
    values = 1.0 + 0.1 * rng.standard_normal(n)
    values[3333] = 40.0  # a spike must stay visible
    ax = draw(by_name()["grad_norm"], written_run(tmp_path, [{"grad_norm": float(v)} for v in values]))
    line = lines_by_label(ax)["grad_norm"]
    xs, ys = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
    assert len(xs) <= 1000
    bounds = list(xs) + [n]
    for i in (0, len(xs) // 2, len(xs) - 1):  # brute-force bucket means
        assert ys[i] == pytest.approx(values[bounds[i]:bounds[i + 1]].mean())
    band = [c for c in ax.collections if isinstance(c, PolyCollection)][0]
    top = band.get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(40.0)
    assert ax.get_yscale() == ("log" if values.max() / values.min() >= 100 else "linear")


def test_steps_covered_matches_a_lookup_per_step():
    from cockpit_lite.instruments.energy import _covers, _steps_covered

    details = [(2, {"steps": 3}), (5, {"steps": 0}), (8, {}), (8, {"steps": 4}), (11, "not a dict"), (14, {"steps": None}),
               (20, {"steps": 2.5})]
    steps = np.array([0, 2, 5, 8, 11, 14, 17, 20, 25])

    def brute(s):  # the rule: the last dict record of the step, "steps" or 1, at least 1
        value = 1
        for at, d in details:
            if at == s and isinstance(d, dict):
                value = d.get("steps", 1) or 1
        return max(float(value), 1.0)

    expected = [brute(s) for s in steps]
    np.testing.assert_array_equal(_steps_covered(steps, details), expected)
    np.testing.assert_array_equal(_steps_covered(steps, details, _covers(details)), expected)
    assert _steps_covered(steps, []).tolist() == [1.0] * len(steps)
    assert _steps_covered(np.empty(0, dtype=np.int64), details).size == 0


@pytest.mark.parametrize("cached", [False, True])
def test_energy_covers_from_the_steps_entries_match_the_structures(tmp_path, monkeypatch, cached):
    """The energy panel reads only the ``steps`` entries and the last structure (a cached run does
    not decode its 100,000 structures): the same table and provenance as from every structure."""
    from cockpit_lite.runlog.cache import RunCache
    from cockpit_lite.instruments.energy import _covers, _covers_of

    monkeypatch.setattr(RunCache, "MIN_BYTES", 0)
    write_synthetic_log(tmp_path, 60, energy_every=3)
    run = cockpit_lite.load(tmp_path)
    if cached:
        run = cockpit_lite.load(tmp_path)
        assert run._cached is not None
    for view in (RunView(run), RunView(run, 10, 40)):
        at, n = _covers_of(view)
        ref_at, ref_n = _covers(view.data("energy"))
        np.testing.assert_array_equal(at, ref_at)
        np.testing.assert_array_equal(n, ref_n)
        assert n.tolist() == [3.0] * len(at) and len(at) == (20 if view.start is None else 10)
        assert view.last_data("energy") == view.data("energy")[-1]
    assert RunView(run, 0, 2).last_data("energy") is None and RunView(run, 0, 3).last_data("energy")[0] == 2
    h_steps, converged = RunView(run).data_field("hess_max_ev", "converged")
    assert h_steps.tolist()[:3] == [0, 5, 10] and converged.tolist()[:3] == [0.0, 1.0, 1.0]


def test_long_series_envelope_keeps_a_nan_as_a_gap():
    """Above MAX_POINTS a line is drawn as bucket means: a bucket holding a NaN must show a gap (as a
    short series does), not the mean of its other values."""
    import numpy as np
    from cockpit_lite.instruments._draw import MAX_POINTS, envelope

    n = 4 * MAX_POINTS
    steps = np.arange(n)
    values = np.ones(n)
    values[3001] = np.nan
    s, mean, lo, hi = envelope(steps, values)
    bucket = np.searchsorted(s, 3001, side="right") - 1
    assert np.isnan(mean[bucket]) and np.isfinite(np.delete(mean, bucket)).all()
    assert lo[bucket] == hi[bucket] == 1.0  # the band spans the finite values
