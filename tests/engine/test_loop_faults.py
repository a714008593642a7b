"""Faults in the user's loop: never an error raised into it, never a NaN without a reason.

Found by a review of faults and bad input (2026-12-07): an empty batch under reduction="none" raised IndexError out
of the loss's backward; a schedule callable that raises stopped the user's forward; after a NaN batch made the
parameters NaN, param_norm and distance were NaN without a reason and update_size blamed the loop for changing
the parameters in place (NaN != NaN)."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import cockpit_lite


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(2)
    return model, torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)


def test_an_empty_batch_under_reduction_none(tmp_path):
    model, x, y = _setup()
    crit = nn.CrossEntropyLoss(reduction="none")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run",
                                quantities=["loss", "grad_norm", "norm_test"]):
            for i in range(3):
                xb, yb = (x[:0], y[:0]) if i == 1 else (x, y)
                opt.zero_grad()
                crit(model(xb), yb).mean().backward()
                opt.step()
    recs = list(cockpit_lite.load(tmp_path / "run"))
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert math.isnan(float(recs[1]["values"]["loss"])) and recs[1]["reasons"]["loss"]
    assert "2 samples" in recs[1]["reasons"]["norm_test"]
    assert math.isfinite(recs[2]["values"]["norm_test"])  # the step after it is measured as usual


@pytest.mark.parametrize("schedule, tracked", [(lambda s: 1 / 0 if s == 2 else True, [0, 1, 3]),
                                               (lambda s: torch.tensor([True, False]), [])],
                         ids=["raises on step 2", "returns a tensor of two values"])
def test_a_schedule_that_raises_skips_its_quantity_with_a_warning(tmp_path, schedule, tracked):
    model, x, y = _setup()
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="schedule of 'grad_norm' raised"):
        with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run",
                                quantities={"loss": "every", "grad_norm": schedule}):
            for _ in range(4):
                opt.zero_grad()
                crit(model(x), y).backward()
                opt.step()
    recs = list(cockpit_lite.load(tmp_path / "run"))
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    assert all(math.isfinite(r["values"]["loss"]) for r in recs)
    assert [r["step"] for r in recs if "grad_norm" in r["values"]] == tracked


def test_nan_parameters_carry_a_reason_and_are_not_blamed_on_the_loop(tmp_path):
    model, x, y = _setup()
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run", quantities="default"):
            for i in range(4):
                xb = x.clone()
                if i == 1:
                    xb[0, 0] = float("nan")
                opt.zero_grad()
                crit(model(xb), y).backward()
                opt.step()
    recs = list(cockpit_lite.load(tmp_path / "run"))
    for rec in recs[1:]:
        for key, v in rec["values"].items():
            if not (isinstance(v, float) and math.isfinite(v)):
                reason = rec["reasons"].get(key)
                assert reason, (rec["step"], key)
                assert "changed in place" not in reason, (rec["step"], key, reason)
    assert "parameters are not finite" in recs[2]["reasons"]["param_norm"]


def _observations(model, theta, x, y, u):
    """(mean loss, its variance, mean slope along u, its variance) over the samples, by autograd one sample at a
    time in float64 (alpha's four observations, QUANTITIES.md)."""
    m = copy.deepcopy(model).double()
    m.load_state_dict({k: v.double() for k, v in theta.items()})
    ls, slopes = [], []
    for i in range(len(x)):
        m.zero_grad()
        li = nn.functional.cross_entropy(m(x[i:i + 1].double()), y[i:i + 1])
        li.backward()
        ls.append(float(li))
        slopes.append(sum(float((p.grad * u[n]).sum()) for n, p in m.named_parameters()))
    ls, slopes = torch.tensor(ls, dtype=torch.float64), torch.tensor(slopes, dtype=torch.float64)
    return float(ls.mean()), float(ls.var()), float(slopes.mean()), float(slopes.var())


def test_two_backward_passes_through_one_loss_keep_alpha_exact(tmp_path):
    """l.backward(retain_graph=True); l.backward(): .grad and the layers' output gradients are doubled, while the
    scale read at the loss was the last pass's (1): alpha came out -0.437 for -0.870. The scale adds up now."""
    from cockpit_lite.alpha_fit import fit_alpha

    model, x, y = _setup()
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    thetas = [{k: v.detach().clone() for k, v in model.named_parameters()}]
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run", quantities=["alpha", "loss"]):
        for i in range(3):
            opt.zero_grad()
            loss = crit(model(x), y)
            loss.backward(retain_graph=True)
            if i == 1:
                loss.backward()
            opt.step()
            thetas.append({k: v.detach().clone() for k, v in model.named_parameters()})
    recs = list(cockpit_lite.load(tmp_path / "run"))
    for s in (0, 1):
        d = {k: (thetas[s + 1][k] - thetas[s][k]).double() for k in thetas[s]}
        t = math.sqrt(sum(float((v ** 2).sum()) for v in d.values()))
        u = {k: v / t for k, v in d.items()}
        f0, vf0, df0, vdf0 = _observations(model, thetas[s], x, y, u)
        f1, vf1, df1, vdf1 = _observations(model, thetas[s + 1], x, y, u)
        ref = fit_alpha(t, f0, f1, df0, df1, vf0, vf1, vdf0, vdf1).alpha
        assert recs[s]["values"]["alpha"] == pytest.approx(ref, rel=1e-4, abs=1e-5), (s, ref)


def test_a_forked_child_hands_nothing_to_the_sinks(tmp_path):
    """A forked worker that trains a copy of the watched model inherits the cockpit: its records must not reach
    the parent's sinks (a TensorBoard sink would write into the parent's event file)."""
    import os

    class FileSink:
        def __init__(self, path):
            self.path = path

        def write(self, record):
            with open(self.path, "a") as fh:
                fh.write(f"{os.getpid()} {record.get('type')}\n")

        def close(self):
            with open(self.path, "a") as fh:
                fh.write(f"{os.getpid()} close\n")

    model, x, y = _setup()
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = tmp_path / "sink.txt"
    cp = cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run", quantities=["loss"],
                            sinks=[FileSink(out)])
    opt.zero_grad()
    crit(model(x), y).backward()
    opt.step()
    pid = os.fork()
    if pid == 0:  # the child's records and its close (no torch work here: its OpenMP pool does not survive fork)
        try:
            import signal

            signal.alarm(10)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cp._records.emit({"type": "step", "step": 7, "values": {"loss": 1.0}})
                cp._records.close({"steps": 8})
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    cp.close()
    writers = {line.split()[0] for line in out.read_text().splitlines()}
    assert writers == {str(os.getpid())}, out.read_text()


def test_flush_reaches_the_sinks_and_a_failing_flush_detaches_its_sink(tmp_path):
    """``cockpit.flush()`` (and ``cockpit.load()``) also has the sinks write what they hold (TensorBoard's event file
    is written by a thread of its own); a sink whose flush raises is detached with a warning, training goes on."""
    class Counting:
        def __init__(self, fail=False):
            self.flushes, self.records, self.fail = 0, 0, fail

        def write(self, record):
            self.records += 1

        def flush(self):
            self.flushes += 1
            if self.fail:
                raise OSError("disk gone")

        def close(self):
            pass

    model, x, y = _setup()
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    good, bad = Counting(), Counting(fail=True)
    cp = cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run", quantities=["loss"], sinks=[good, bad])
    opt.zero_grad()
    crit(model(x), y).backward()
    opt.step()
    with pytest.warns(RuntimeWarning, match="Counting failed .*disk gone.* detached"):
        cp.flush()
    assert good.flushes == 1 and bad.flushes == 1 and good.records >= 1
    cp.load()
    assert good.flushes == 2 and bad.flushes == 1  # detached
    cp.close()
