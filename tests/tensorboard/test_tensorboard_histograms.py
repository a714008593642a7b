"""Native TensorBoard histograms: ``grad_hist_1d`` read back by tbparse (TensorBoard's stock event
reader) with the run log's edges and counts; every step record is one event."""

from __future__ import annotations

import glob
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from helpers import watched_training

tbparse = pytest.importorskip("tbparse")


def _train(logdir, steps=4):
    torch.manual_seed(0)
    model, loss_fn = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return watched_training(model, opt, loss_fn, batches, logdir, tensorboard=True,
                             quantities={"loss": "every", "grad_norm": "every", "grad_hist_1d": "every:2",
                                         "alpha": "every"}).run


def test_tbparse_reads_the_logged_histograms(tmp_path):
    run = _train(tmp_path)
    logged = run.data("grad_hist_1d")
    assert [s for s, _ in logged] == [0, 2]
    frame = tbparse.SummaryReader(str(tmp_path), pivot=False, extra_columns={"min", "max", "num"}).histograms
    frame = frame[frame["tag"] == "histograms/grad_hist_1d"].sort_values("step")
    assert list(frame["step"]) == [0, 2]
    for (step, hist), (_, row) in zip(logged, frame.iterrows()):
        counts = np.asarray(hist["counts"], dtype=np.float64)
        edges = np.asarray(hist["edges"], dtype=np.float64)
        np.testing.assert_array_equal(row["counts"], counts)
        np.testing.assert_allclose(row["limits"], edges[1:])
        filled = np.flatnonzero(counts)  # min/max: the edges around the non-empty bins
        assert row["min"] == pytest.approx(edges[filled[0]]) and row["max"] == pytest.approx(edges[filled[-1] + 1])
        assert row["num"] == counts.sum() > 0


def test_tensorboard_migrates_them_to_its_histogram_plugin(tmp_path):
    """TensorBoard's own data path (data_compat, used by both loaders) turns the events into the
    Histograms plugin's [left, right, count] tensors with the logged bins."""
    from tensorboard import data_compat
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    run = _train(tmp_path)
    (path,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    found = {}
    for event in EventFileLoader(path).Load():
        for value in event.summary.value:
            if value.tag == "histograms/grad_hist_1d":
                migrated = data_compat.migrate_value(value)
                assert migrated.metadata.plugin_data.plugin_name == "histograms"
                found[event.step] = tensor_util.make_ndarray(migrated.tensor)
    assert sorted(found) == [0, 2]
    for step, hist in run.data("grad_hist_1d"):
        table = found[step]
        counts, edges = np.asarray(hist["counts"], dtype=np.float64), np.asarray(hist["edges"])
        filled = np.flatnonzero(counts)  # TensorBoard drops the empty bins at both ends
        a, b = filled[0], filled[-1] + 1
        np.testing.assert_allclose(table[:, 0], edges[a:b], rtol=1e-6)
        np.testing.assert_allclose(table[:, 1], edges[a + 1:b + 1], rtol=1e-6)
        np.testing.assert_array_equal(table[:, 2], counts[a:b])
        assert table[:, 2].sum() == counts.sum()


def test_one_event_per_step_record(tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    run = _train(tmp_path)
    (path,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    per_step = {}
    for event in EventFileLoader(path).Load():
        tags = {v.tag for v in event.summary.value}
        if not tags or tags <= {"meta", "events"}:
            continue
        per_step[event.step] = per_step.get(event.step, 0) + 1
        if event.step == 0 and "cockpit/loss" in tags:
            assert "data/grad_hist_1d" in tags and "histograms/grad_hist_1d" in tags and "cockpit/grad_norm" in tags
    # one event per step record; a step amended later (alpha) gets one more event for the amendment
    amended = {r["step"] for r in run.records if "alpha" in r["values"]}
    for step in run.steps():
        assert per_step[int(step)] == 1 + (int(step) in amended and int(step) < run.steps()[-1]), (step, per_step)


def test_histograms_without_bins_are_not_written():
    from cockpit_lite.tensorboard.writer import histogram_proto

    assert histogram_proto({"edges": None, "counts": None, "reason": "no parameter"}) is None
    assert histogram_proto({"edges": [0.0, 1.0], "counts": [1, 2]}) is None
    proto = histogram_proto({"edges": [-1.0, 0.0, 2.0], "counts": [3, 4]})
    assert (proto.min, proto.max, list(proto.bucket_limit), list(proto.bucket), proto.num) == (-1, 2, [0, 2], [3, 4], 7)
