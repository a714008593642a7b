"""A step with a second record that is not an amendment (two writers, a step counter that went back) is merged
as before, the later line winning, but no longer silently: the step is flagged ``duplicate_record`` and the
reader warns, on every read path (records, the scan of a large finished log, its cache, a growing log)."""

import json
import warnings

import pytest

from cockpit_lite.runlog import load
from cockpit_lite.runlog.cache import RunCache


def _write(path, lines):
    with open(path, "a") as fh:
        fh.write("".join(json.dumps(rec) + "\n" for rec in lines))


def _log(tmp_path, footer=True):
    lines = [{"type": "header", "format": "cockpit-lite-log", "version": 1}]
    lines += [{"type": "step", "step": s, "wall": 1.0, "values": {"loss": float(s)}} for s in range(4)]
    lines += [{"type": "step", "step": 1, "wall": 2.0, "values": {"loss": 9.0}},  # a second record of step 1
              {"type": "step", "step": 3, "amends": True, "values": {"alpha": 0.5}}]  # an amendment: not flagged
    lines += [{"type": "footer", "steps": 4}] if footer else []
    _write(tmp_path / "cockpit.jsonl", lines)
    return tmp_path


def _read(logdir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = load(logdir)
    return run, [str(w.message) for w in caught if "not amendments" in str(w.message)]


@pytest.mark.parametrize("min_bytes", [1 << 30, 0], ids=["records", "scan-then-cache"])
def test_second_record_of_a_step_is_flagged_and_warned(tmp_path, monkeypatch, min_bytes):
    monkeypatch.setattr(RunCache, "MIN_BYTES", min_bytes)
    logdir = _log(tmp_path)
    for _ in range(2):  # the second read comes from the cache where there is one
        run, said = _read(logdir)
        assert len(said) == 1 and "(1)" in said[0] and "duplicate_record" in said[0]
        assert run.flagged("duplicate_record") == [1]
        steps, loss = run.series("loss")
        assert steps.tolist() == [0, 1, 2, 3] and loss.tolist() == [0.0, 9.0, 2.0, 3.0]
        assert run.series("alpha")[0].tolist() == [3]
    if min_bytes == 0:
        assert run._cached is not None  # the second read did come from the cache
    assert "duplicate_record" in run.records[1]["flags"] and "flags" not in run.records[3]


def test_a_growing_log_warns_for_new_duplicates_only(tmp_path):
    logdir = _log(tmp_path, footer=False)
    run, said = _read(logdir)
    assert len(said) == 1
    _write(tmp_path / "cockpit.jsonl", [{"type": "step", "step": 4, "wall": 3.0, "values": {"loss": 4.0}}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing new to say
        assert run.refresh() == 1
    _write(tmp_path / "cockpit.jsonl", [{"type": "step", "step": 2, "wall": 4.0, "values": {"loss": 7.0}}])
    with pytest.warns(RuntimeWarning, match=r"1 step\(s\) have two records .*\(2\)"):
        run.refresh()
    assert run.flagged("duplicate_record") == [1, 2]


def test_a_run_written_by_the_cockpit_has_no_duplicates(tmp_path):
    import torch
    from torch import nn

    import cockpit_lite

    torch.manual_seed(0)
    model, crit = nn.Linear(3, 2), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path, quantities=["loss", "alpha", "grad_norm"]):
        for _ in range(4):
            opt.zero_grad()
            crit(model(torch.randn(4, 3)), torch.randint(0, 2, (4,))).backward()
            opt.step()
    run, said = _read(tmp_path)
    assert said == [] and run.flagged("duplicate_record") == [] and len(run.series("alpha")[0]) >= 3
