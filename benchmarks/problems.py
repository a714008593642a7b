"""The benchmark problems shared by every script in benchmarks/ (random data, fixed seeds).

* ``mlp``: 784-256-128-10 with ReLU, batch 128 (MNIST-sized inputs);
* ``cnn``: 3 conv layers on 32x32x3 inputs, batch 128 (CIFAR-sized), as in Cockpit's benchmarks;
* ``transformer``: token + position embeddings, one ``nn.TransformerEncoderLayer`` (width 256, 4 heads, dropout 0) +
  mean pooling + linear head, sequences of 128 tokens, batch 8 (small enough for tens of ms per step
  on a 2-core CPU; attention and LayerNorm exercise the non-Linear per-sample rules);
* ``resnet_bn_eval`` / ``resnet_bn_train``: a small ResNet (stem, two basic blocks with BatchNorm, one
  downsampling) on 32x32x3 inputs, batch 128, BatchNorm in eval mode (running statistics: a per-sample
  affine map; the statistics stay at their initial values, as no step updates them) or in training mode (batch statistics mix the samples, so per-sample quantities are NaN
  with that reason by design; the benchmark still times them and says so).

* ``transformer4``: the same with 4 encoder layers (issue 21's "4-layer transformer");
* ``resnet18_gn``: ResNet-18 (torchvision's layout for 32x32 inputs: 3x3 stem, no max-pool, stages of 64,
  128, 256, 512 channels, two basic blocks each) with GroupNorm (32 groups) in place of BatchNorm, batch
  16 (about half a second per plain step on the 2-core CPU): issue 21's "ResNet-18 (GroupNorm)".

``make(name, batch_size=..., hidden=...)`` builds the variants of the scaling study (other batch sizes,
MLP widths); ``Problem.spec`` holds its arguments, so a subprocess can rebuild the same problem.

Device: every problem runs on ``DEVICE`` (``set_device``: "cpu", "cuda", "cuda:1" or "auto" = a GPU when
there is one), kept in the environment variable ``COCKPIT_BENCH_DEVICE`` so that subprocesses (the
memory measurement) use the same one. The data are drawn on the CPU (same numbers everywhere) and moved.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn


DEVICE = os.environ.get("COCKPIT_BENCH_DEVICE", "cpu")


def set_device(name: str = "auto") -> str:
    """Run every problem on ``name`` from now on (also in subprocesses); returns the device chosen."""
    global DEVICE
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch sees no CUDA device here (torch {torch.__version__}); "
                         "run on the CPU (--device cpu) or on a machine with a GPU")
    torch.device(name)  # a malformed name fails here
    DEVICE = os.environ["COCKPIT_BENCH_DEVICE"] = name
    return name


def on_gpu() -> bool:
    return DEVICE.startswith("cuda")


@dataclass
class Problem:
    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[..., tuple]  # (seed, batch_size) -> (x, y)
    batch_size: int
    train_mode: bool = True  # False: the model is put in eval mode (BatchNorm uses running statistics)
    spec: dict = dataclasses.field(default_factory=dict)  # arguments of ``make`` that rebuild it (subprocesses)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def batch_norm(channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels)


def group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(min(32, channels), channels)


class BasicBlock(nn.Module):
    """conv-norm-ReLU-conv-norm plus the (projected) input, then ReLU: the ResNet building block."""

    def __init__(self, cin: int, cout: int, stride: int = 1, norm: Callable[[int], nn.Module] = batch_norm):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = norm(cout)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), norm(cout))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet() -> nn.Module:
    """32x32x3 -> stem (16 ch, pooled to 16x16) -> block(16) -> block(16->32, stride 2) -> pool -> 10."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        BasicBlock(16, 16), BasicBlock(16, 32, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def resnet18_gn() -> nn.Module:
    """ResNet-18 for 32x32 inputs with GroupNorm: 3x3 stem (64), stages 64/128/256/512 of two blocks each."""
    layers, cin = [nn.Conv2d(3, 64, 3, padding=1, bias=False), group_norm(64), nn.ReLU()], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride, group_norm), BasicBlock(cout, cout, 1, group_norm)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))


VOCAB, SEQ, WIDTH = 1000, 128, 256


class Transformer(nn.Module):
    """Token + position embeddings, ``layers`` encoder layers (pre-norm, dropout 0), mean pool, head."""

    def __init__(self, width: int = WIDTH, layers: int = 1, heads: int = 4, classes: int = 10):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, width)
        self.positions = nn.Embedding(SEQ, width)
        self.encoder = nn.Sequential(*[
            nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, ids):
        # positions with the batch dimension: every module input has the batch first (per-sample rules)
        pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        h = self.encoder(self.tokens(ids) + self.positions(pos))
        return self.head(self.norm(h).mean(dim=1))


def _tokens(classes=10):
    def make(seed: int, batch_size: int = 8):
        g = torch.Generator().manual_seed(seed)
        return (torch.randint(0, VOCAB, (batch_size, SEQ), generator=g),
                torch.randint(0, classes, (batch_size,), generator=g))

    return make


def _batch(shape, classes=10):
    def make(seed: int, batch_size: int = 128):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch_size, *shape, generator=g), torch.randint(0, classes, (batch_size,), generator=g)

    return make


PROBLEMS = {
    "mlp": Problem("mlp", mlp, _batch((1, 28, 28)), 128),
    "cnn": Problem("cnn", cnn, _batch((3, 32, 32)), 128),
    "transformer": Problem("transformer", Transformer, _tokens(), 8),
    "transformer4": Problem("transformer4", lambda: Transformer(layers=4), _tokens(), 8),
    "resnet18_gn": Problem("resnet18_gn", resnet18_gn, _batch((3, 32, 32)), 16),
    "resnet_bn_eval": Problem("resnet_bn_eval", resnet, _batch((3, 32, 32)), 128, train_mode=False),
    "resnet_bn_train": Problem("resnet_bn_train", resnet, _batch((3, 32, 32)), 128),
}


def make(name: str, batch_size: Optional[int] = None, hidden: Optional[int] = None) -> Problem:
    """Problem ``name`` with another batch size and, for ``mlp``, hidden widths hidden-hidden/2 (the
    ``mlp`` problem has hidden=256): the variants of the scaling study. ``make(**p.spec)`` rebuilds p."""
    base = get(name)
    b = batch_size or base.batch_size
    label = name + (f"-h{hidden}" if hidden else "") + (f"-b{b}" if batch_size else "")
    if hidden is not None and name != "mlp":
        raise ValueError(f"hidden= is defined for the mlp problem only, not {name!r}")

    def wide_mlp():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 2),
                             nn.ReLU(), nn.Linear(hidden // 2, 10))
    return dataclasses.replace(base, name=label, make_model=base.make_model if hidden is None else wide_mlp, batch_size=b,
                               spec={"name": name, "batch_size": batch_size, "hidden": hidden})


def to_device(batch: tuple) -> tuple:
    return tuple(t.to(DEVICE) for t in batch)


def get(name: str) -> Problem:
    try:
        return dataclasses.replace(PROBLEMS[name], spec={"name": name})
    except KeyError:
        raise ValueError(f"unknown problem {name!r}; known: {', '.join(PROBLEMS)}") from None


def make_optimizer(model: nn.Module, optimizer: str = "sgd", momentum: float = 0.9) -> torch.optim.Optimizer:
    """The benchmarks' optimizers: SGD (lr 0.01, ``momentum``) or Adam (lr 1e-3)."""
    return (torch.optim.SGD(model.parameters(), lr=0.01, momentum=momentum) if optimizer == "sgd"
            else torch.optim.Adam(model.parameters(), lr=1e-3))


def training_step(problem: Problem, quantities=None, logdir=None, optimizer: str = "sgd", momentum: float = 0.9):
    """A plain training step on ``problem`` (4 fixed batches, cycled), watched by a cockpit tracking
    ``quantities`` when given. Returns ``(step, cockpit or None, model)``; close the cockpit after use."""
    import cockpit_lite

    torch.manual_seed(0)
    model = problem.make_model().to(DEVICE)
    model.train(problem.train_mode)
    opt = make_optimizer(model, optimizer, momentum)
    crit = nn.CrossEntropyLoss()  # one loss module per loop: cockpit-lite observes its calls
    cockpit = None
    if quantities is not None:
        cockpit = cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir, quantities=quantities)
    batches = itertools.cycle([to_device(problem.make_batch(s, problem.batch_size)) for s in range(4)])

    def step():
        x, y = next(batches)
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()

    return step, cockpit, model
