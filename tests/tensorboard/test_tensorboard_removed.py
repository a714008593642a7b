"""``rm -rf logdir`` mid-run: the TensorBoard sink's writes went to a file no folder held, silently. It now
notices at its next record (one stat), starts a new event file in the folder made again, warns once, and
TensorBoard shows every record from there on (as the run log does, tests/runlog/test_writer_faults_more.py)."""

import glob
import shutil

import pytest
import torch
from torch import nn

import cockpit_lite
from cockpit_lite.runlog.batch import LOG_BATCH


def _events(logdir):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    steps, tags = {}, set()
    for path in glob.glob(str(logdir / "events.out.tfevents.*")):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                tags.add(value.tag)
                if value.tag == "cockpit/loss":
                    steps[event.step] = float(tensor_util.make_ndarray(value.tensor))  # migrated
    return steps, tags


def test_a_removed_logdir_gets_a_new_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    logdir = tmp_path / "run"
    cockpit = cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir, quantities=["loss"], tensorboard=True)

    def steps(n):
        for _ in range(n):
            opt.zero_grad()
            crit(model(torch.randn(8, 4)), torch.randint(0, 2, (8,))).backward()
            opt.step()

    steps(3)
    cockpit.flush()
    shutil.rmtree(logdir)
    with pytest.warns(RuntimeWarning, match="event file .* was removed"):
        steps(LOG_BATCH + 2)
        cockpit.close()
    run = cockpit_lite.load(logdir)
    seen, tags = _events(logdir)
    assert len(glob.glob(str(logdir / "events.out.tfevents.*"))) == 1 and "meta" in tags
    # every record the run log kept after the removal is in TensorBoard too, with its value
    assert sorted(seen) == run.steps().tolist() == list(range(3, LOG_BATCH + 5))
    for step, loss in zip(*run.series("loss")):
        assert seen[int(step)] == pytest.approx(float(loss), rel=1e-6)
