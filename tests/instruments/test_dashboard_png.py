"""The command line rasterizes a large dashboard PNG in two halves at once
(``cockpit_lite/dashboard_png.py``): the image must be the one drawn in one process, pixel for
pixel, and any failure of the forked half must fall back to drawing in one process."""

import os

import numpy as np
import pytest
from matplotlib import image

import cockpit_lite
from cockpit_lite import cli, dashboard, dashboard_png
from cockpit_lite.testing import write_synthetic_log

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic")
    write_synthetic_log(path, 400)
    return path


def pixels(path):
    return image.imread(str(path))


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(dashboard_png, "_cores", lambda: 2)


def test_two_halves_give_the_image_of_one_process(logdir, tmp_path, two_cores):
    fig = dashboard.render(cockpit_lite.load(logdir))
    assert dashboard_png.usable(fig) and dashboard_png._split(fig) is not None
    dashboard.save(fig, tmp_path / "two.png", two_processes=True)
    dashboard.save(fig, tmp_path / "one.png")
    a, b = pixels(tmp_path / "two.png"), pixels(tmp_path / "one.png")
    assert a.shape == b.shape and np.array_equal(a, b)
    assert all(ax.get_visible() for ax in fig.axes)  # the hidden halves are shown again
    # the figure was not drawn empty: the panels' own pixels differ from the background
    assert (a != a[0, 0]).any(-1).mean() > 0.2


def test_a_failing_child_falls_back_to_one_process(logdir, tmp_path, two_cores, monkeypatch):
    parent = os.getpid()
    original = dashboard_png._draw_only

    def fails_in_the_child(fig, keep):
        if os.getpid() != parent:
            raise RuntimeError("child fails")
        return original(fig, keep)

    monkeypatch.setattr(dashboard_png, "_draw_only", fails_in_the_child)
    fig = dashboard.render(cockpit_lite.load(logdir))
    with open(tmp_path / "x.png", "wb") as fh:
        assert dashboard_png.write_png(fig, fh, 100) is False
    dashboard.save(fig, tmp_path / "two.png", two_processes=True)  # falls back: a whole image
    dashboard.save(fig, tmp_path / "one.png")
    assert np.array_equal(pixels(tmp_path / "two.png"), pixels(tmp_path / "one.png"))


def test_only_the_command_line_forks(logdir, tmp_path, two_cores, monkeypatch):
    def no_fork():
        raise AssertionError("forked")

    monkeypatch.setattr(os, "fork", no_fork)
    dashboard.render(cockpit_lite.load(logdir), tmp_path / "a.png")  # the library default: one process
    small = dashboard.render(cockpit_lite.load(logdir), instruments=["grad_norm", "alpha_trace"])
    assert not dashboard_png.usable(small)  # too few panels to pay
    with pytest.raises(AssertionError, match="forked"):
        cli.main(["plot", str(logdir), "-o", str(tmp_path / "b.png")])
    assert cli.main(["plot", str(logdir), "-o", str(tmp_path / "c.png"), "--one-process"]) == 0
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "c.png"))


def test_the_command_lines_image_equals_one_process(logdir, tmp_path, two_cores):
    assert cli.main(["plot", str(logdir), "-o", str(tmp_path / "two.png")]) == 0
    assert cli.main(["plot", str(logdir), "-o", str(tmp_path / "one.png"), "--one-process"]) == 0
    assert np.array_equal(pixels(tmp_path / "two.png"), pixels(tmp_path / "one.png"))
