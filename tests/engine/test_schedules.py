import pytest

from cockpit_lite import schedules


def test_every_and_offsets():
    s = schedules.parse("every:4")
    assert [t for t in range(13) if s(t)] == [0, 4, 8, 12]
    s = schedules.every(3, offset=2)
    assert [t for t in range(10) if s(t)] == [2, 5, 8]
    assert schedules.parse(None)(7) and schedules.parse(1)(7)


def test_log_spaced_is_dense_early_and_sparse_late():
    s = schedules.parse("log:10")
    steps = [t for t in range(10001) if s(t)]
    assert steps[:12] == [0, 1, 2, 3, 5, 6, 7, 10, 12, 15, 19, 25]
    # about per_decade points per decade
    assert 8 <= len([t for t in steps if 1000 <= t < 10000]) <= 11
    assert 10000 in steps and 1000 in steps and 100 in steps


def test_never_at_and_errors():
    assert not any(schedules.parse("never")(t) for t in range(100))
    assert [t for t in range(10) if schedules.parse("at:2,7")(t)] == [2, 7]
    with pytest.raises(ValueError, match="unknown schedule"):
        schedules.parse("sometimes")
    with pytest.raises(ValueError):
        schedules.parse("every:0")
    with pytest.raises(ValueError):
        schedules.parse("every:x")


@pytest.mark.parametrize("spec, match", [("at:", "at least one step"), ("at:-1", "count from 0"),
                                         ([3, -2], "count from 0"), ([], "at least one step")])
def test_an_at_schedule_that_could_never_track_is_refused(spec, match):
    """'at:' and 'at:-1' were accepted and never tracked anything, without a word."""
    with pytest.raises(ValueError, match=match):
        schedules.parse(spec)


def test_quantities_none_is_a_clear_error():
    import torch
    from torch import nn

    import cockpit_lite

    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="quantities=None: give a preset name"):
        cockpit_lite.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=nn.MSELoss(),
                           logdir=None, quantities=None)
