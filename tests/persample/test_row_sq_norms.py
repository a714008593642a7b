"""samples.row_sq_norms: ||g_i||^2 of per-sample blocks in one read, against float64."""

import pytest
import torch


@pytest.mark.parametrize("cols", [1, 100, 4096, 4097, 3 * 4096, 50000])
def test_row_sq_norms_match_float64(cols):
    """||g_i||^2 of per-sample blocks from norms of column blocks: as accurate as squaring and summing."""
    from cockpit_lite.persample.samples import row_sq_norms

    torch.manual_seed(cols)
    G = torch.randn(5, cols) * torch.logspace(-3, 3, 5)[:, None]
    G[2] = 0.0
    ref = (G.double() ** 2).sum(1)
    torch.testing.assert_close(row_sq_norms(G).double(), ref, rtol=1e-6, atol=0)
