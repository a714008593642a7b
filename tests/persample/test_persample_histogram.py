"""The histogram of Linear per-sample gradients (products d_o * a_i) without forming them, against
counting the explicitly built products in float64."""

import pytest
import torch

from cockpit_lite.persample.linear import outer_product_histogram


def brute_force_counts(D, A, R, bins=100):
    G = torch.einsum("bo,bi->boi", D.double(), A.double()).reshape(-1)
    return torch.bincount(((G + R) / (2 * R) * bins).floor().clamp(0, bins - 1).long(), minlength=bins).double()


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("range_factor", [1.0, 0.6, 2.5])
def test_outer_product_histogram_is_exact(relu, range_factor):
    torch.manual_seed(int(relu) * 10 + int(range_factor * 10))
    D, A = torch.randn(11, 7), torch.randn(11, 23)
    if relu:
        A = torch.relu(A)  # many exact zeros
    D[0, 3] = 0.0  # a row without gradient
    A[2, :5] = 0.0
    R = float((D.abs().amax(1) * A.abs().amax(1)).max()) * range_factor  # < 1: values clipped into edge bins
    got = outer_product_histogram(D, A, R, 100)
    assert got.sum() == D.numel() * A.shape[1]
    torch.testing.assert_close(got, brute_force_counts(D, A, R), rtol=0, atol=0)


def test_outer_product_histogram_declines_when_dense_is_cheaper():
    D, A = torch.randn(4, 3), torch.randn(4, 5)
    R = float((D.abs().amax(1) * A.abs().amax(1)).max())
    assert outer_product_histogram(D, A, R, 100, prefer_dense_above=1e6) is None
    assert outer_product_histogram(D, A, R, 100, prefer_dense_above=1e-6) is not None


def test_nonfinite_per_sample_gradients_give_no_histogram_but_a_reason(tmp_path):
    """A NaN in one sample's gradient made the range max(0, nan) = 0 -> 1e-12 and half the elements vanished
    from a histogram drawn as normal; now the step's histogram is absent with the reason, and the next
    finite step is counted over its own range again. (The loop repairs .grad before stepping, so the
    layer inputs that feed the per-sample gradients are NaN only on that step.)"""
    import cockpit_lite
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    crit = nn.CrossEntropyLoss()
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "r", quantities=["grad_hist_1d"]):
        for i in range(3):
            x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
            if i == 1:
                x[2, 0] = float("nan")
            opt.zero_grad()
            crit(model(x), y).backward()
            if i == 1:
                for p in model.parameters():  # keep theta finite for the next step
                    p.grad = torch.nan_to_num(p.grad, nan=0.0)
            opt.step()
    run = cockpit_lite.load(tmp_path / "r")
    hist = dict(run.data("grad_hist_1d"))
    assert hist[1]["counts"] is None and "not finite" in hist[1]["reason"]
    P = sum(p.numel() for p in model.parameters())
    for step in (0, 2):
        assert sum(hist[step]["counts"]) == 6 * P and hist[step]["edges"][-1] > 1e-6


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("range_factor", [1.0, 0.5, 1.7])
def test_embedding_histogram_without_the_dense_tensor(padding_idx, range_factor):
    """nn.Embedding's per-sample gradients are zero outside the rows a sample used: the histogram counts
    the used rows and adds the rest to the zero bin, equal to counting the built [b, V, E] tensor in
    float64 (repeated tokens summed, a padding row, exact zeros in the output gradient, clipping)."""
    from cockpit_lite.persample.embedding import EmbeddingWeightSamples

    torch.manual_seed(int(range_factor * 10) + (padding_idx is None))
    b, T, V, E = 3, 6, 9, 4
    idx = torch.randint(0, V, (b, T))
    idx[0, :3] = 5  # a token repeated in one sample
    idx[1, 0] = 0
    D = torch.randn(b, T, E)
    D[2, 1] = 0.0
    ps = EmbeddingWeightSamples(idx, D, V, padding_idx)
    G = ps.materialize()
    R = float(G.abs().max()) * range_factor
    counts, top, clipped = ps.histogram(R, 100)
    flat = G.double().reshape(-1)
    ref = torch.bincount(((flat + R) / (2 * R) * 100).floor().clamp(0, 99).long(), minlength=100).double()
    torch.testing.assert_close(counts, ref, rtol=0, atol=0)
    assert top == pytest.approx(float(G.abs().max()))
    assert clipped == int((flat.abs() > R).sum())
