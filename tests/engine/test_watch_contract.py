"""watch(): bad input, hook removal, and the promise not to perturb training."""

import subprocess
import sys

import pytest
import numpy as np
import torch
from torch import nn

import cockpit_lite
from helpers import watched_training


def net(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(dropout), nn.Linear(12, 3))


def train(model, opt, crit, steps=6, seed=5):
    g = torch.Generator().manual_seed(seed)
    watched_training(model, opt, crit, [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
                                        for _ in range(steps)])


@pytest.mark.parametrize("preset", ["default", "economy", "business", "full"])
@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                      lambda p: torch.optim.AdamW(p, lr=1e-2)], ids=["momentum", "adamw"])
def test_training_is_bitwise_identical_with_cockpit(preset, make_opt, tmp_path):
    crit = nn.CrossEntropyLoss()
    results = []
    for watched in (False, True):
        model = net(dropout=0.3)
        opt = make_opt(model.parameters())
        torch.manual_seed(123)  # dropout masks come from the global RNG
        if watched:
            with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / preset, quantities=preset):
                train(model, opt, crit)
        else:
            train(model, opt, crit)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_close_removes_every_hook(logdir):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    before = (len(model._forward_pre_hooks), len(model._forward_hooks), len(crit._forward_hooks))
    cockpit = cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir)
    train(model, opt, crit, steps=2)
    cockpit.close()
    assert (len(model._forward_pre_hooks), len(model._forward_hooks), len(crit._forward_hooks)) == before
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert "zero_grad" not in opt.__dict__ and "zero_grad" not in model.__dict__
    train(model, opt, crit, steps=2)  # still trains, nothing more is logged
    assert len(cockpit_lite.load(logdir)) == 2
    # after close the model can be watched again
    cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir.parent / "again").close()


def test_bad_input_gives_clear_errors(tmp_path):
    crit = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="no parameters"):
        cockpit_lite.watch(nn.ReLU(), torch.optim.SGD(net().parameters(), lr=0.1), logdir=tmp_path / "a")
    with pytest.raises(ValueError, match="does not hold any parameter"):
        cockpit_lite.watch(net(), torch.optim.SGD(net().parameters(), lr=0.1), logdir=tmp_path / "b")
    with pytest.raises(TypeError, match="nn.Module"):
        cockpit_lite.watch("model", None, logdir=tmp_path / "c")
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cockpit = cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "d")
    with pytest.raises(RuntimeError, match="already watched"):
        cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "e")
    cockpit.close()
    written = (tmp_path / "d" / "cockpit.jsonl").read_bytes()
    cockpit.close()  # a second close() does nothing: no error, no second footer
    assert (tmp_path / "d" / "cockpit.jsonl").read_bytes() == written
    assert cockpit_lite.load(tmp_path / "d").finished
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="is a file, not a folder .a folder above the logdir"):
        cockpit_lite.watch(model, opt, loss_fn=crit, logdir=blocker / "sub")
    with pytest.raises(FileExistsError, match="already holds a run log"):
        cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "d")
    with pytest.raises(ValueError, match="unknown quantity"):
        cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "f", quantities=["no_such_thing"])
    with pytest.raises(ValueError, match="unknown preset"):
        cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "g", quantities="platinum")


def test_partial_optimizer_warns_and_observes_its_params(logdir):
    model = net()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="not in the optimizer"):
        cockpit = cockpit_lite.watch(model, opt, loss_fn=nn.CrossEntropyLoss(), logdir=logdir)
    cockpit.close()
    assert [p["name"] for p in cockpit_lite.load(logdir).header["params"]] == ["0.weight", "0.bias"]


def test_failing_quantity_is_reported_not_raised(logdir):
    from cockpit_lite.quantities import Quantity

    class Broken(Quantity):
        name = "broken"

        def before_step(self, ctx):
            raise ZeroDivisionError("boom")

    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    with pytest.warns(RuntimeWarning, match="broken"):
        with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir, quantities=[Broken(), "loss"]):
            train(model, opt, crit, steps=2)
    run = cockpit_lite.load(logdir)
    assert "ZeroDivisionError" in run.reasons("broken")[0]
    assert len(run.series("loss")[1]) == 2


def test_a_quantity_failing_as_a_whole_labels_its_parts_too(logdir):
    """Per-parameter values logged on earlier steps get NaN with the same reason on the step where the
    quantity fails as a whole (not NaN without a reason, not a silently missing column)."""
    from cockpit_lite.quantities.grad_norm import GradNorm

    class FailsOnSecondStep(GradNorm):
        def before_step(self, ctx):
            if ctx.step == 1:
                raise ZeroDivisionError("boom")
            super().before_step(ctx)

    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    with pytest.warns(RuntimeWarning, match="grad_norm"):
        with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir, quantities=[FailsOnSecondStep("every")]):
            train(model, opt, crit, steps=3)
    run = cockpit_lite.load(logdir)
    parts = [k for k in run.keys() if k.startswith("grad_norm/")]
    assert parts
    for key in ["grad_norm", *parts]:
        steps, values = run.series(key)
        assert list(steps) == [0, 1, 2] and np.isnan(values[1]) and np.isfinite(values[[0, 2]]).all(), key
        assert "ZeroDivisionError" in run.reasons(key)[1], key


def test_import_is_light():
    code = ("import sys, cockpit_lite; bad = [m for m in ('matplotlib', 'tensorboard', 'torch') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_forward_that_bypasses_the_watched_module_is_named_as_the_reason(tmp_path):
    """The loop calls a submodule directly (the watched module's forward never runs): per-sample
    quantities are NaN with a reason that says so, and the gradient norms are still logged."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.CrossEntropyLoss()
    with pytest.warns(RuntimeWarning, match="forward did not run"):
        with cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=tmp_path, quantities=["grad_norm", "norm_test"]):
            x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
            opt.zero_grad()
            loss_fn(model[0](x), y).backward()
            opt.step()
    rec = [r for r in cockpit_lite.load(tmp_path).records if r.get("type") == "step"][0]
    assert "forward did not run" in rec["reasons"]["norm_test"]
    assert rec["values"]["grad_norm"] > 0


def test_importing_cockpit_lite_imports_no_framework():
    """The integrations are optional extras: importing the package (and its integrations package)
    never imports Lightning, transformers or accelerate."""
    code = ("import sys, cockpit_lite, cockpit_lite.integrations; cockpit_lite.watch; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', "
            "'transformers', 'accelerate'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_one_loss_module_cannot_serve_two_open_cockpits(tmp_path):
    """Its calls cannot be told apart (both logs would mix the two models' losses): a clear error at
    watch(); after the first cockpit is closed, the module can be watched again."""
    crit = nn.CrossEntropyLoss()
    a, b = net(0), net(1)
    first = cockpit_lite.watch(a, torch.optim.SGD(a.parameters(), lr=0.1), loss_fn=crit, logdir=tmp_path / "a")
    with pytest.raises(RuntimeError, match="one loss module per watched model"):
        cockpit_lite.watch(b, torch.optim.SGD(b.parameters(), lr=0.1), loss_fn=crit, logdir=tmp_path / "b")
    first.close()
    cockpit_lite.watch(b, torch.optim.SGD(b.parameters(), lr=0.1), loss_fn=crit, logdir=tmp_path / "b2").close()


def test_loss_called_with_keywords_logs_what_a_positional_call_logs(tmp_path):
    quantities = ["loss", "alpha", "norm_test"]
    runs = []
    for how in ("positional", "keywords"):
        model = net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        crit = nn.CrossEntropyLoss()
        g = torch.Generator().manual_seed(5)
        with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / how, quantities=quantities):
            for _ in range(3):
                x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
                opt.zero_grad()
                out = model(x)
                loss = crit(out, y) if how == "positional" else crit(input=out, target=y)
                loss.backward()
                opt.step()
        runs.append(cockpit_lite.load(tmp_path / how))
    for q in quantities:
        s1, v1 = runs[0].series(q)
        s2, v2 = runs[1].series(q)
        assert list(s1) == list(s2) and len(s1) >= 2 and not runs[1].reasons(q), q
        assert list(v1) == list(v2), q


@pytest.mark.parametrize("bad, match", [({"sinks": 5}, "sinks=.*iterable"), ({"sinks": [object()]}, "write"),
                                        ({"dashboard": 5}, "dashboard=")])
def test_a_bad_sink_or_dashboard_argument_is_named_and_leaves_no_log(tmp_path, bad, match):
    """Checked before the run log is created: the corrected call on the same logdir then works (a header-only
    log used to be left behind, refusing it with FileExistsError)."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=match):
        cockpit_lite.watch(model, opt, loss_fn=nn.CrossEntropyLoss(), logdir=tmp_path / "run", **bad)
    assert not (tmp_path / "run").exists()
    cockpit_lite.watch(model, opt, loss_fn=nn.CrossEntropyLoss(), logdir=tmp_path / "run").close()
