"""The energy of a data-parallel run over all processes (cockpit_lite/energy/processes.py): shared
physical devices (a CPU socket, a GPU two processes use) are counted once, distinct ones added."""

import math

from cockpit_lite.energy.processes import combine


def proc(rank, host, **devices):
    return {"rank": rank, "host": host, "devices": {
        d: {"joules": j, "error_j": e, "status": s, "identity": i} for d, (j, e, s, i) in devices.items()}}


def test_a_shared_socket_is_counted_once_and_distinct_gpus_are_added():
    out = combine([
        proc(1, "a", cpu0=(101.0, 1.0, "measured", "a:cpu0"), gpu0=(50.0, 2.0, "measured", "a:gpu:U1")),
        proc(0, "a", cpu0=(100.0, 1.0, "measured", "a:cpu0"), gpu0=(40.0, 2.0, "measured", "a:gpu:U0")),
    ])
    assert out["processes"] == 2 and out["label"] == "measured"
    assert math.isclose(out["total_j"], 100.0 + 40.0 + 50.0)  # the socket from rank 0, both GPUs
    assert math.isclose(out["error_j"], 1.0 + 2.0 + 2.0)
    assert out["devices"]["a:cpu0"]["from_rank"] == 0 and out["devices"]["a:cpu0"]["seen_by_ranks"] == [0, 1]
    assert "a:cpu0" in out["shared"] and "a:gpu:U0" not in out["shared"]


def test_two_hosts_add_their_sockets_and_a_shared_gpu_counts_once():
    out = combine([
        proc(0, "a", cpu0=(10.0, 0.1, "measured", "a:cpu0"), gpu0=(5.0, 0.5, "measured", "a:gpu:U0")),
        proc(1, "a", gpu0=(5.5, 0.5, "measured", "a:gpu:U0")),
        proc(2, "b", cpu0=(20.0, 0.2, "measured", "b:cpu0")),
    ])
    assert math.isclose(out["total_j"], 10.0 + 5.0 + 20.0)
    assert out["shared"] == {"a:gpu:U0": "measured by ranks [0, 1], counted once"}


def test_an_estimate_makes_the_total_an_estimate_and_unavailable_devices_are_listed():
    out = combine([
        proc(0, "a", cpu=(30.0, math.nan, "estimated", "a:cpu"), gpu0=(math.nan, math.nan, "unavailable", "a:gpu:U0")),
        proc(1, "a", cpu=(31.0, math.nan, "estimated", "a:cpu")),
    ])
    assert out["label"] == "estimated" and math.isnan(out["error_j"]) and math.isclose(out["total_j"], 30.0)
    assert out["unavailable"] == ["a:gpu:U0"]


def test_nothing_measured_anywhere_is_unavailable_not_zero():
    out = combine([proc(0, "a", cpu=(0.0, 0.0, "unavailable", "a:cpu")), proc(1, "a", cpu=(0.0, 0.0, "unavailable", "a:cpu"))])
    assert out["label"] == "unavailable" and math.isnan(out["total_j"]) and out["unavailable"] == ["a:cpu"]
