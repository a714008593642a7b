"""A PyTorch CPU kernel that is wrong on a batch of one, and what cockpit-lite makes of it.

``BatchNorm2d`` in eval mode, backward on the CPU (torch 2.14): a channels-last output gradient whose size-1 batch
dimension has a stride other than C*H*W (what ``h.flatten(2).transpose(1, 2).mean(1)`` gives back for B = 1)
yields wrong weight and input gradients. Per-sample loops of batches of one (the per-sample replay's fallback when
vmap cannot batch a model, and brute-force references) then see wrong per-sample gradients; the batch of B and
``torch.func.vmap`` are right. Found by a probe of timm's XCiT (conv + BatchNorm patch embedding): its logged values
were right and the loop reference wrong. The engine's check of the per-sample mean against ``.grad`` turns the
loop's wrong gradients into NaN with that reason; they are never logged as values.
"""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import cockpit_lite
import reference as R


def test_the_kernel_is_wrong_on_a_batch_of_one_with_that_stride():
    """Documents the kernel: if this starts failing, torch fixed it and the notes above can go."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).eval()
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.normal_()
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    go = torch.randn(600).as_strided((1, 4, 8, 8), (4, 1, 32, 4))
    odd = torch.autograd.grad(bn(x), bn.weight, go)[0]
    dense = torch.autograd.grad(bn(x), bn.weight, go.contiguous())[0]
    assert (odd - dense).abs().max() > 1e-2


class ScaledConvBN(nn.Module):
    """A learned per-channel input scale (no layer rule serves it: the per-sample replay does), then conv,
    BatchNorm in eval mode and a token mean in the layout that gives the kernel its stride."""

    def __init__(self, item: bool):
        super().__init__()
        self.item = item
        self.scale = nn.Parameter(torch.randn(3, 1, 1))
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        if self.item and float(x.abs().max()) > 1e9:  # data-dependent: vmap cannot batch it, the replay loops
            x = x / 2
        return self.head(self.bn(self.conv(x * self.scale)).flatten(2).transpose(1, 2).mean(1))


@pytest.mark.parametrize("item", [False, True], ids=["vmap", "loop"])
def test_replayed_values_are_exact_or_nan_never_the_kernels_error(tmp_path, item):
    torch.manual_seed(0)
    model = ScaledConvBN(item)
    model.bn.eval()
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2)
    model.bn.weight.data.normal_()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,))
    m64 = ScaledConvBN(False).double()
    m64.load_state_dict(model.state_dict())
    m64.bn.eval()
    params = {k: v.detach() for k, v in m64.named_parameters()}
    buffers = dict(m64.named_buffers())

    def loss_i(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(m64, {**p, **buffers}, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    G = vmap(grad(loss_i), in_dims=(None, 0, 0))(params, x.double(), y)  # right where batches of one are not
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run", quantities={"norm_test": "every"}):
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
    record = cockpit_lite.load(tmp_path / "run").records[0]
    for name in ("scale", "conv.weight", "bn.weight"):
        value = record["values"][f"norm_test/{name}"]
        if item:
            assert math.isnan(float(value)) and "not proportional to .grad" in record["reasons"][f"norm_test/{name}"]
        else:
            assert value == pytest.approx(R.norm_test(G[name].reshape(4, -1)), rel=1e-4), name
