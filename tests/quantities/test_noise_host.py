"""_noise.host: the per-parameter sums as float64 numpy, one transfer for all (the packed path is the one
an accelerator takes; it runs on CPU tensors here)."""

import numpy as np
import torch

from cockpit_lite.quantities import _noise


def _tensors():
    torch.manual_seed(0)
    return [torch.randn(3, dtype=torch.float32), torch.randn(2, 2, dtype=torch.float64), torch.randn(()),
            torch.zeros(0), torch.randn(4, requires_grad=True)]


def test_packed_path_keeps_shapes_and_values():
    ts = _tensors()
    for out in (_noise._packed(ts), _noise.host(ts)):
        assert len(out) == len(ts)
        for a, t in zip(out, ts):
            assert isinstance(a, np.ndarray) and a.dtype == np.float64 and a.shape == tuple(t.shape)
            np.testing.assert_array_equal(a, t.detach().double().numpy())


def test_host_of_nothing():
    assert _noise.host([]) == []
