"""grad_hist_2d against numpy.histogram2d of brute-force per-sample gradients (a loop of autograd.grad)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

import cockpit_lite
from helpers import watched_training
from cockpit_lite.quantities.grad_hist_2d import GradHist2d, joint_histogram
from reference import per_sample_grads_bruteforce


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))


def _run(model, x, y, logdir, accumulate=1, bins=(12, 9)):
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trained = watched_training(model, opt, loss_fn, zip(x.chunk(accumulate), y.chunk(accumulate)), logdir,
                               accumulate=accumulate, quantities=[GradHist2d("every", bins=bins)])
    return trained.run, trained.thetas[0]


def _reference_counts(model, theta, x, y, x_edges, y_edges):
    model.load_state_dict(theta)
    params = list(model.parameters())
    G = per_sample_grads_bruteforce(model, nn.CrossEntropyLoss(reduction="none"), x, y, params)
    gx = np.concatenate([g.reshape(-1).double().numpy() for g in G])
    py = np.concatenate([p.detach().double().expand_as(g).reshape(-1).numpy() for p, g in zip(params, G)])
    counts, _, _ = np.histogram2d(gx, py, bins=[np.asarray(x_edges), np.asarray(y_edges)])
    return counts, float(np.abs(gx).max())


def test_joint_histogram_matches_numpy_on_the_cnn(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 2, 5, 5, generator=g), torch.randint(0, 4, (6,), generator=g)
    run, theta = _run(_cnn(), x, y, tmp_path / "r")
    (_, h), = run.data("grad_hist_2d")
    assert h["x"] == "B*g_ij" and h["y"] == "theta_j"
    counts = np.asarray(h["counts"])
    assert counts.shape == (12, 9) and len(h["x_edges"]) == 13 and len(h["y_edges"]) == 10
    n_elems = 6 * sum(p.numel() for p in theta.values())
    assert counts.sum() == n_elems
    ref, max_abs = _reference_counts(_cnn(), theta, x, y, h["x_edges"], h["y_edges"])
    assert -h["x_edges"][0] >= max_abs * (1 - 1e-6) and h["x_edges"][-1] >= max_abs * (1 - 1e-6)
    assert ref.sum() >= n_elems - 2  # numpy drops values exactly on the outer edge only by rounding
    assert np.abs(counts - ref).sum() <= 4  # elements on a bin edge may land on either side (float32)


def test_accumulated_micro_batches_form_one_histogram(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)
    run, theta = _run(model, x, y, tmp_path / "r", accumulate=2)
    (_, h), = run.data("grad_hist_2d")
    torch.manual_seed(1)
    ref, _ = _reference_counts(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), theta, x, y,
                               h["x_edges"], h["y_edges"])
    assert np.asarray(h["counts"]).sum() == 8 * sum(p.numel() for p in theta.values())
    assert np.abs(np.asarray(h["counts"]) - ref).sum() <= 4


def test_joint_histogram_function_on_explicit_values():
    grads = [torch.tensor([[[-1.0, 0.0], [0.5, 1.0]]]).reshape(2, 2)]  # n=2 samples, P=2
    params = [torch.tensor([0.0, 1.0])]
    counts = joint_histogram(iter(grads), params, (-1.0, 1.0), (0.0, 1.0), (2, 2))
    # (x, y): (-1, 0) (0, 1) (0.5, 0) (1, 1) -> x bins [-1,0) [0,1], y bins [0,.5) [.5,1]
    assert counts.tolist() == [[1, 0], [1, 2]]


def test_unavailable_per_sample_information_is_nan_with_reason(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cockpit = cockpit_lite.watch(model, opt, loss_fn=loss_fn,
                                 logdir=tmp_path / "r", quantities=[GradHist2d("every")])
    opt.zero_grad()
    with torch.no_grad():
        out = model(torch.randn(4, 3))
    (out.sum() * 0 + model[0].weight.sum()).backward()  # no loss_fn call, no layer gradient of a batch
    opt.step()
    cockpit.close()
    run = cockpit_lite.load(tmp_path / "r")
    assert run.reasons("grad_hist_2d") and all(math.isnan(v) for v in run.series("grad_hist_2d")[1])
