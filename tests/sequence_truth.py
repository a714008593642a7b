"""One watched step of a token model against a float64 brute force over single sequences, for the tests of
layers the rules see through the batch's structure (tests/persample/test_broadcast.py, test_flat_rows.py,
test_module_forms.py): g_i is the gradient of sequence i's mean token loss, each sequence evaluated alone."""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Dict, Tuple

import torch
from torch import nn

import cockpit_lite

TESTS = ("norm_test", "inner_test", "ortho_test")


def per_sequence_grads(model: nn.Module, inputs: tuple, y: torch.Tensor, vocab: int,
                       call: Callable = lambda m, *a: m(*a)) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(G [B, P] float64, {parameter name: its columns of G}); ``inputs``: the model's batched arguments."""
    ref = copy.deepcopy(model).double()
    params = list(ref.parameters())
    rows = []
    for i in range(y.shape[0]):
        out = call(ref, *(a[i:i + 1] for a in inputs))
        loss = nn.functional.cross_entropy(out.reshape(-1, vocab), y[i].reshape(-1))
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    G = torch.stack(rows)
    names = [n for n, _ in ref.named_parameters()]
    return G, dict(zip(names, torch.split(G, [p.numel() for p in params], dim=1)))


def watched_step(model: nn.Module, inputs: tuple, y: torch.Tensor, vocab: int, logdir) -> dict:
    """The record of one SGD step (lr 0) with the gradient tests, the loop's loss the mean token cross-entropy
    on the logits viewed as rows (``crit(model(*inputs).view(-1, V), y.view(-1))``)."""
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir, quantities={q: "every" for q in TESTS}):
            opt.zero_grad()
            crit(model(*inputs).view(-1, vocab), y.view(-1)).backward()
            opt.step()
    return cockpit_lite.load(logdir).records[0]
