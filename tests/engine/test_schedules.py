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
