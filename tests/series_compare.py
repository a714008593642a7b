"""The check shared by the integration tests: a framework run logs what the plain-loop ``watch`` logs."""

from __future__ import annotations

import math

import torch


def assert_same_series(run, ref, steps, families, rtol=1e-6, step_offset=0):
    """Every key of ``ref`` (but time) has the same steps (``run``'s are ``step_offset`` later) and values
    in ``run`` (within ``rtol``); the quantity ``families`` are among them, and ``norm_test`` was computed
    on the first step."""
    keys = [k for k in ref.keys() if not k.startswith("time")]
    assert set(families) <= {k.split("/")[0] for k in keys}
    for key in keys:
        ref_steps, ref_values = ref.series(key)
        got_steps, got_values = run.series(key)
        assert list(got_steps) == [s + step_offset for s in ref_steps], key
        assert len(ref_steps) >= steps - 1, key  # alpha of the last step needs a next one
        assert torch.allclose(torch.as_tensor(got_values), torch.as_tensor(ref_values), rtol=rtol, atol=1e-9,
                              equal_nan=True), (key, got_values, ref_values)
    assert not math.isnan(ref.series("norm_test")[1][0])
