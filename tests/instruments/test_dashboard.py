"""The dashboard: layout by group, only instruments with data, visible reasons, readable figure."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import cockpit_lite
from cockpit_lite import instruments
from cockpit_lite import dashboard
from cockpit_lite.testing import write_synthetic_log

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    write_synthetic_log(root / "full", 40, hist_every=10, curvature_every=5)
    write_synthetic_log(root / "partial", 30, quantities=["loss", "grad_norm", "distance", "update_size", "lr",
                                                           "time", "cabs"], optimizer="Adam", seed=1)
    return root


def titles(fig):
    return [ax.get_title() for ax in fig.get_axes() if ax.get_title()]


def texts(fig):
    return " ".join(t.get_text() for t in fig.texts) + " " + " ".join(
        t.get_text() for ax in fig.get_axes() for t in ax.texts)


def test_full_log_shows_every_instrument_grouped(logs, tmp_path):
    out = tmp_path / "full.png"
    fig = dashboard.render(logs / "full", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = set(titles(fig))
    for inst in instruments.builtin():
        assert any(t.startswith(inst.title) for t in drawn), inst.title
    header = [t.get_text() for t in fig.texts]
    for group in ("Step size", "Gradients", "Curvature", "Performance", "Cost"):
        assert group in header
    assert "Not shown" not in texts(fig)
    # group order: every step-size panel sits above every cost panel
    by_title = {ax.get_title(): ax for ax in fig.get_axes() if ax.get_title()}
    assert by_title["Alpha over steps"].get_position().y0 > by_title["Time per step"].get_position().y0


def test_partial_log_lays_out_only_instruments_with_data_and_lists_the_rest(logs):
    lay = dashboard.layout(dashboard._views(logs / "partial", None))
    shown = {c.instrument.name for c in lay.panels}
    assert shown == {"distance", "hyperparameters", "grad_norm", "grad_flow", "performance", "advisor", "step_time"}
    missing = {title: reason for _, title, reason in lay.missing}
    assert "optimizer is Adam" in missing["CABS suggested batch size"]
    assert "quantities='economy'" in missing["Alpha: where steps land on the local parabola"]
    fig = dashboard.figure(lay)
    text = texts(fig)
    assert "Not shown, no data:" in text and "CABS suggested batch size: cabs is NaN on every step" in text
    assert "Curvature" not in [t.get_text() for t in fig.texts]  # a group without panels is left out


def test_named_instruments_without_data_get_a_greyed_panel_with_the_reason(logs):
    fig = dashboard.render(logs / "partial", instruments=["performance", "alpha_gauge"])
    axes = {ax.get_title(): ax for ax in fig.get_axes() if ax.get_title()}
    assert set(axes) == {"Mini-batch loss", "Alpha: where steps land on the local parabola"}
    grey = axes["Alpha: where steps land on the local parabola"]
    assert grey.get_facecolor()[:3] == pytest.approx((0xEC / 255,) * 3, abs=1e-3)
    assert "alpha not in this log" in " ".join(t.get_text() for t in grey.texts)
    assert not grey.get_lines()


def test_several_runs_side_by_side_share_the_y_range(logs):
    fig = dashboard.render([logs / "full", logs / "partial"])
    t = titles(fig)
    assert "[full] Gradient norm" in t and "[partial] Gradient norm" in t
    axes = {ax.get_title(): ax for ax in fig.get_axes() if ax.get_title()}
    assert axes["[full] Gradient norm"].get_ylim() == axes["[partial] Gradient norm"].get_ylim()
    # an instrument with data in one run only: greyed in the other, with the reason
    assert "cabs is NaN" in " ".join(x.get_text() for x in axes["[partial] CABS suggested batch size"].texts)
    assert fig.texts[0].get_text().startswith("cockpit-lite: full (") and " vs partial (" in fig.texts[0].get_text()


def test_step_range_limits_what_is_drawn(logs):
    fig = dashboard.render(logs / "full", instruments=["grad_norm"], steps="10:20")
    ax = [a for a in fig.get_axes() if a.get_title() == "Gradient norm"][0]
    assert list(ax.get_lines()[0].get_xdata()) == list(range(10, 20))
    with pytest.raises(ValueError, match="empty"):
        dashboard.parse_steps("20:10")
    assert dashboard.parse_steps(":5") == (None, 5) and dashboard.parse_steps("7:") == (7, None)


def test_panels_do_not_overlap(logs):
    """Readability: every axes' full extent (ticks, labels, title, colorbar) stays inside its own panel."""
    fig = dashboard.render([logs / "full"])
    renderer = fig.canvas.get_renderer()
    W, H = fig.get_size_inches() * fig.dpi
    main = [ax for ax in fig.get_axes() if ax.get_visible() and ax.get_title()]
    per_row = {}  # a row of fewer panels than columns spreads them over the full width
    for ax in main:
        per_row.setdefault(round(ax.get_position().y0, 6), []).append(ax)
    boxes = []
    for ax in fig.get_axes():
        if not ax.get_visible():
            continue
        tight = ax.get_tightbbox(renderer)
        pos = ax.get_position()
        row = min(per_row, key=lambda y: abs(y - pos.y0))
        cell_w = W / len(per_row[row])
        col = int(pos.x0 * W // cell_w)
        assert tight.x0 >= col * cell_w - 1 and tight.x1 <= (col + 1) * cell_w + 1, ax.get_title()
        assert 0 <= tight.y0 and tight.y1 <= H
        if ax.get_title():  # main panels: their extents must not intersect each other
            boxes.append((ax.get_title(), tight))
    for i, (ta, a) in enumerate(boxes):
        for tb, b in boxes[i + 1:]:
            assert not a.overlaps(b), (ta, tb)


def test_an_instrument_that_fails_gets_a_reason_not_a_crash(logs):
    class Broken(instruments.Instrument):
        name, title, group, keys = "broken", "Broken panel", "performance", ("loss",)

        def draw(self, ax, run):
            ax.figure.colorbar  # touch the figure, then fail half-way
            ax.plot([0, 1], [0, 1])
            raise RuntimeError("boom")

    with pytest.warns(RuntimeWarning, match="boom"):
        fig = dashboard.render(logs / "full", instruments=[Broken(), "performance"])
    ax = [a for a in fig.get_axes() if a.get_title() == "Broken panel"][0]
    assert "could not draw: RuntimeError: boom" in " ".join(t.get_text() for t in ax.texts)
    assert not ax.get_lines()


def test_empty_log_renders_a_readable_page(tmp_path):
    from cockpit_lite.runlog import RunLogWriter

    RunLogWriter(tmp_path / "empty", {}).close()
    fig = dashboard.render(tmp_path / "empty", tmp_path / "empty.png")
    assert "No instrument has data" in texts(fig) and "the log has no step records yet" in texts(fig)
    assert (tmp_path / "empty.png").stat().st_size > 0


@pytest.mark.parametrize("suffix,magic", [("pdf", b"%PDF"), ("svg", b"<?xml")])
def test_pdf_and_svg(logs, tmp_path, suffix, magic):
    out = tmp_path / f"d.{suffix}"
    dashboard.render(logs / "partial", out, instruments=["performance"])
    assert out.read_bytes()[:len(magic)] == magic
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # the temporary file was renamed


def test_bad_output_suffix(logs, tmp_path):
    with pytest.raises(ValueError, match=r"\.png, \.pdf or \.svg"):
        dashboard.render(logs / "partial", tmp_path / "d.jpg")


def test_importing_the_packages_does_not_import_matplotlib():
    code = "import sys, cockpit_lite, cockpit_lite.instruments, cockpit_lite.dashboard, cockpit_lite.live, cockpit_lite.cli; " \
           "cockpit_lite.instruments.discover(); print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dashboard_of_a_real_watched_run(tmp_path):
    """One real run of the first-order quantities: the panels show exactly what the log holds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=tmp_path / "real"):
            for _ in range(8):
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
    run = cockpit_lite.load(tmp_path / "real")
    fig = dashboard.render(run, tmp_path / "real.png")
    axes = {ax.get_title(): ax for ax in fig.get_axes() if ax.get_title()}
    assert {"Mini-batch loss", "Gradient norm", "Distance from θ₀ and update size", "Learning rate",
            "Time per step"} <= set(axes)
    np.testing.assert_allclose(axes["Mini-batch loss"].get_lines()[0].get_ydata(), run.series("loss")[1])
    np.testing.assert_allclose(axes["Gradient norm"].get_lines()[0].get_ydata(), run.series("grad_norm")[1])
    assert "Not shown, no data:" in texts(fig)  # alpha, curvature, ... were not enabled


def test_reasons_shared_by_all_runs_are_listed_once(logs):
    views = dashboard._views([logs / "partial", cockpit_lite.load(logs / "partial")], None)
    lay = dashboard.layout(views)
    alpha = [m for m in lay.missing if m[1] == "Alpha: where steps land on the local parabola"]
    assert alpha == [("all runs", alpha[0][1], alpha[0][2])] and "alpha not in this log" in alpha[0][2]


def test_an_instrument_with_an_unknown_group_is_refused(logs):
    class Odd(instruments.Instrument):
        name, title, group, keys = "odd", "Odd", "misc", ("loss",)

    with pytest.raises(ValueError, match="group 'misc'"):
        dashboard.render(logs / "partial", instruments=[Odd()])


@pytest.mark.parametrize("steps", [None, "10:20", "35:", ":3", "100:200"])
def test_title_steps_come_from_the_records_in_range(logs, steps):
    run = cockpit_lite.load(logs / "full")
    start, stop = dashboard.parse_steps(steps)
    expected = [r["step"] for r in run.records if (start is None or r["step"] >= start)
                and (stop is None or r["step"] < stop)]
    view = dashboard._views(run, steps)[0]
    assert dashboard._any_steps(view)[0] == expected
    title = dashboard._title(dashboard.layout([view]))
    assert (f"steps {expected[0]}–{expected[-1]}" if expected else "no steps") in title


def test_titles_sit_at_a_fixed_height_without_changing_global_settings(logs):
    import matplotlib

    before = matplotlib.rcParams["axes.titley"]
    fig = dashboard.render(logs / "full")
    assert matplotlib.rcParams["axes.titley"] == before
    assert all(ax._autotitlepos is False for ax in fig.get_axes() if ax.get_title())


def test_a_cached_run_is_plotted_and_diagnosed_without_building_its_records(tmp_path, monkeypatch):
    """The plot of a run read from its cache (the advisor panel included) reads columns and a few
    structures only, and shows what the plot of the plainly decoded run shows."""
    from cockpit_lite.advisor import diagnose
    from cockpit_lite.runlog import RunLogWriter
    from cockpit_lite.runlog.cache import CachedRecords, RunCache

    monkeypatch.setattr(RunCache, "MIN_BYTES", 0)
    w = RunLogWriter(tmp_path, {"model": "m", "optimizer": "SGD", "params": [{"name": "w"}]})
    for s in range(60):
        bad = s >= 50
        w.write({"type": "step", "step": s, "samples": 8, "flags": ["nonfinite_loss"] if bad else [],
                 "values": {"loss": float("nan") if bad else 1.0 / (s + 1), "grad_norm": float(s),
                            "grad_norm/w": float("inf") if bad else 0.5, "norm_test": 9.0}})
    w.close({"steps": 60})
    plain = cockpit_lite.load(tmp_path, cache=False)
    cockpit_lite.load(tmp_path)  # writes the cache
    monkeypatch.setattr(CachedRecords, "records", lambda self: pytest.fail("the records were built"))
    run = cockpit_lite.load(tmp_path)
    found = {d.rule: d for d in diagnose(run)}
    assert [d.to_json() for d in diagnose(run)] == [d.to_json() for d in diagnose(plain)]
    assert "first parameter (in model order) with a non-finite gradient: w" in found["divergence"].title
    assert found["divergence"].step == 50 and "(from 8)" in found["gradient_noise_dominates"].action
    fig = dashboard.render(run, tmp_path / "cached.png")
    assert "Advisor: diagnoses" in titles(fig) and "Training diverged" in texts(fig)
    assert titles(fig) == titles(dashboard.render(plain))
