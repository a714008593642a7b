"""Same numbers as Cockpit (cockpit-for-pytorch, BackPACK BatchGrad) on the same model and batch.

Skipped when cockpit-for-pytorch is not installed (``pip install cockpit-for-pytorch --no-deps`` plus
``json_tricks``; its plotting imports pandas/seaborn and pkg_resources, stubbed here when missing since
no plot is drawn).
"""

import copy
import sys
import types

import pytest
import torch
from torch import nn

import cockpit_lite


def _import_cockpit():
    """Import cockpit with stand-ins for the plotting-only modules it imports, removed again right after
    (a stand-in left in sys.modules would confuse other libraries, e.g. torch._dynamo)."""
    stubs = []
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        m = types.ModuleType("pkg_resources")

        class DistributionNotFound(Exception):
            pass

        def get_distribution(name):
            raise DistributionNotFound(name)

        m.DistributionNotFound, m.get_distribution = DistributionNotFound, get_distribution
        sys.modules["pkg_resources"] = m
        stubs.append("pkg_resources")
    for name in ("pandas", "seaborn"):
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
            stubs.append(name)
    try:
        import backpack
        import cockpit
        from cockpit import quantities, utils
        from cockpit.utils import schedules as _schedules  # noqa: F401  (submodule import)
    except Exception as err:  # not installed, or not importable next to this torch
        pytest.skip(f"cockpit-for-pytorch not usable: {err!r}")
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
    return backpack, cockpit, quantities, utils


NAMES = {"NormTest": "norm_test", "InnerTest": "inner_test", "OrthoTest": "ortho_test", "MeanGSNR": "mean_gsnr",
         "EarlyStopping": "early_stopping", "CABS": "cabs"}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_same_numbers_as_cockpit(tmp_path, kind):
    backpack, cockpit, cq, utils = _import_cockpit()
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
        x = torch.randn(10, 3, 2, 2)
    else:
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(4, 4, 3, dilation=2, padding=2),
                              nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
        x = torch.randn(10, 3, 6, 6)
    y = torch.randint(0, 3, (10,))
    theirs = copy.deepcopy(model)

    # cockpit-lite
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lf = nn.CrossEntropyLoss()
    cp = cockpit_lite.watch(model, opt, loss_fn=lf, logdir=tmp_path / "lite", quantities=list(NAMES.values()))
    opt.zero_grad()
    lf(model(x), y).backward()
    opt.step()
    cp.close()
    run = cockpit_lite.load(tmp_path / "lite")

    # Cockpit
    theirs = backpack.extend(theirs)
    lf2 = backpack.extend(nn.CrossEntropyLoss())
    opt2 = torch.optim.SGD(theirs.parameters(), lr=0.1)
    every = utils.schedules.linear(1)
    qs = [getattr(cq, name)(track_schedule=every) for name in NAMES]
    ck = cockpit.Cockpit(theirs.parameters(), quantities=qs)
    opt2.zero_grad()
    out = theirs(x)
    loss = lf2(out, y)
    losses = nn.CrossEntropyLoss(reduction="none")(out, y)
    with ck(0, info={"batch_size": 10, "individual_losses": losses, "loss": loss, "optimizer": opt2}):
        loss.backward(create_graph=ck.create_graph(0))
    for q in qs:
        name = NAMES[type(q).__name__]
        expected = float(q.get_output()[0])
        got = float(run.series(name)[1][0])
        assert got == pytest.approx(expected, rel=1e-3, abs=1e-6), name
