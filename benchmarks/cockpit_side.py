"""Side by side with Cockpit (cockpit-for-pytorch): its overhead and ours on the same quantities, in
one process, and a check that both give the same values on the same batches.

    python benchmarks/cockpit_side.py [--problems mlp,cnn] [--rounds 3] [--steps 2]

Cockpit's loop needs BackPACK-extended model and loss, the per-sample losses and its context manager
around ``backward``; its alpha is defined for plain SGD only, so both sides train with SGD without
momentum (lr 0.01). Timing: the plain loop, cockpit-lite and Cockpit, each tracking the same set every
step, interleaved (benchmarks/timing.py), ratios to the plain step per round, medians.
Values: fresh copies of one initial model, the same 3 batches, every quantity every step; per
quantity the largest relative difference |ours - Cockpit's| / max(|ours|, |Cockpit's|) over the steps
and (for per-parameter quantities) the parameters. Cockpit's ``hess_max_ev`` is the eigenvalue of
largest magnitude, ours the largest algebraic one: equal when that one is positive.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys
import tempfile
import types
from typing import Dict, List

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cockpit_lite  # noqa: E402
from benchmarks import problems, timing  # noqa: E402

# our name -> Cockpit's class name
COCKPIT_NAME = {"loss": "Loss", "grad_norm": "GradNorm", "distance": "Distance", "update_size": "UpdateSize",
                "alpha": "Alpha", "norm_test": "NormTest", "inner_test": "InnerTest", "ortho_test": "OrthoTest",
                "mean_gsnr": "MeanGSNR", "grad_hist_1d": "GradHist1d", "hess_max_ev": "HessMaxEV",
                "hess_trace": "HessTrace", "tic_diag": "TICDiag"}
PER_PARAMETER = ("grad_norm", "distance", "update_size", "hess_trace")  # Cockpit: one value per parameter
NOT_COMPARED = {"grad_hist_1d": "histograms: different bin ranges by design"}
SETS = {
    "noise": ("grad_norm", "norm_test", "inner_test", "ortho_test", "mean_gsnr"),
    "alpha": ("alpha",),
    "economy (every step)": ("alpha", "distance", "grad_hist_1d", "grad_norm", "inner_test", "loss", "norm_test",
                             "ortho_test", "update_size"),
}
CHECKED = tuple(n for n in COCKPIT_NAME if n not in NOT_COMPARED)
LR = 0.01


def import_cockpit():
    """(cockpit, backpack) or a reason string. Cockpit's plotting imports pandas/seaborn and
    pkg_resources at import time; where missing, empty stand-ins are put in place for the import only
    (nothing is plotted here) and removed right after."""
    stand_ins = []
    for name in ("pkg_resources", "pandas", "seaborn"):
        try:
            __import__(name)
        except ImportError:
            module = types.ModuleType(name)
            if name == "pkg_resources":
                class DistributionNotFound(Exception):
                    pass

                def get_distribution(dist):
                    raise DistributionNotFound(dist)

                module.DistributionNotFound, module.get_distribution = DistributionNotFound, get_distribution
            sys.modules[name] = module
            stand_ins.append(name)
    try:
        import backpack
        import cockpit
        import cockpit.quantities  # noqa: F401
        from cockpit.utils import schedules  # noqa: F401
        return cockpit, backpack
    except Exception as err:  # not installed, or not importable beside this torch
        return f"cockpit-for-pytorch not usable: {type(err).__name__}: {err}"
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)


def _batches(problem, n=4):
    return [problems.to_device(problem.make_batch(s, problem.batch_size)) for s in range(n)]


def lite_step(model, names, logdir, batches):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    crit = nn.CrossEntropyLoss()
    cp = cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir, quantities={n: "every" for n in names})
    it = itertools.cycle(batches)

    def step():
        x, y = next(it)
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()

    return step, cp


def cockpit_step(model, names, batches, modules):
    cockpit, backpack = modules
    from cockpit.utils.schedules import linear

    model = backpack.extend(model)
    crit = backpack.extend(nn.CrossEntropyLoss())
    per_sample = nn.CrossEntropyLoss(reduction="none")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    qs = {n: getattr(cockpit.quantities, COCKPIT_NAME[n])(track_schedule=linear(1)) for n in names}
    ck = cockpit.Cockpit(model.parameters(), quantities=list(qs.values()))
    it, counter = itertools.cycle(batches), itertools.count()

    def step():
        i = next(counter)
        x, y = next(it)
        opt.zero_grad()
        out = model(x)
        loss = crit(out, y)
        info = {"batch_size": x.shape[0], "individual_losses": per_sample(out, y), "loss": loss, "optimizer": opt}
        with ck(i, info=info):
            loss.backward(create_graph=ck.create_graph(i))
        opt.step()

    return step, qs


def timings(problem_name: str, rounds: int, steps: int, tmp: str, modules) -> List[dict]:
    """Per set: plain, cockpit-lite and Cockpit ms per step and ratios, measured interleaved."""
    problem = problems.get(problem_name)
    batches = _batches(problem)
    torch.manual_seed(0)
    init = problem.make_model().to(problems.DEVICE)
    variants, closers = {}, []
    plain_model = copy.deepcopy(init)
    plain_opt, plain_crit, plain_it = torch.optim.SGD(plain_model.parameters(), lr=LR), nn.CrossEntropyLoss(), itertools.cycle(batches)

    def plain():
        x, y = next(plain_it)
        plain_opt.zero_grad()
        plain_crit(plain_model(x), y).backward()
        plain_opt.step()

    variants["plain"] = plain
    for set_name, names in SETS.items():
        variants[("lite", set_name)], cp = lite_step(copy.deepcopy(init), names, os.path.join(tmp, f"side-{problem_name}-{set_name}"), batches)
        closers.append(cp)
        variants[("cockpit", set_name)], _ = cockpit_step(copy.deepcopy(init), names, batches, modules)
    per_round = timing.interleaved(variants, rounds=rounds, steps=steps, warmup=1)
    for cp in closers:
        cp.close()
    ratios, med = timing.ratios(per_round), timing.medians(per_round)
    return [{"problem": problem_name, "set": s, "plain_ms": med["plain"] * 1e3,
             "lite_ms": med[("lite", s)] * 1e3, "lite_ratio": ratios[("lite", s)],
             "cockpit_ms": med[("cockpit", s)] * 1e3, "cockpit_ratio": ratios[("cockpit", s)]} for s in SETS]


def _rel(a: float, b: float) -> float:
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


def check_values(problem_name: str, tmp: str, modules, steps: int = 3, names=CHECKED) -> List[dict]:
    """Per quantity in ``names``: the largest relative difference between ours and Cockpit's on the same
    batches."""
    problem = problems.get(problem_name)
    batches = _batches(problem, steps)
    torch.manual_seed(0)
    init = problem.make_model().to(problems.DEVICE)
    ours_model = copy.deepcopy(init)
    step, cp = lite_step(ours_model, names, os.path.join(tmp, f"values-{problem_name}"), batches)
    for _ in range(steps):
        step()
    cp.close()
    run = cockpit_lite.load(cp.logdir)
    step, qs = cockpit_step(copy.deepcopy(init), names, batches, modules)
    for _ in range(steps):
        step()
    param_names = [n for n, _ in ours_model.named_parameters()]
    rows = []
    for name, q in qs.items():
        theirs: Dict[int, object] = q.get_output()
        diffs, reason = [], ""
        for s, value in sorted(theirs.items()):
            if value is None:
                continue
            if name in PER_PARAMETER:
                ours = [run.series(f"{name}/{p}") for p in param_names]
                pairs = [(float(o[1][list(o[0]).index(s)]), float(v)) for o, v in zip(ours, value) if s in list(o[0])]
            else:
                st, vals = run.series(name)
                pairs = [(float(vals[list(st).index(s)]), float(value))] if s in list(st) else []
            diffs += [_rel(a, b) for a, b in pairs]
        if not diffs:
            reason = "no step with both values"
        rows.append({"problem": problem_name, "quantity": name, "compared": len(diffs),
                     "max_rel_diff": max(diffs) if diffs else float("nan"), "note": reason})
    for name, why in NOT_COMPARED.items():
        rows.append({"problem": problem_name, "quantity": name, "compared": 0, "max_rel_diff": float("nan"), "note": why})
    return rows


CURVATURE = ("hess_max_ev", "hess_trace", "tic_diag")


def measure(problem_names, rounds: int, steps: int, tmp: str, curvature=("mlp", "cnn")):
    """(timing rows, value rows), or a reason string when Cockpit cannot be used. The curvature values
    are checked on the problems in ``curvature`` only (Cockpit's on the CNN take about a minute here)."""
    modules = import_cockpit()
    if isinstance(modules, str):
        return modules
    times, values = [], []
    for p in problem_names:
        times += timings(p, rounds, steps, tmp, modules)
        names = CHECKED if p in curvature else tuple(n for n in CHECKED if n not in CURVATURE)
        values += check_values(p, tmp, modules, names=names)
    return times, values


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", default="mlp,cnn")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--curvature", default="mlp,cnn", help="problems on which the curvature values are checked")
    args = ap.parse_args(argv)
    from benchmarks import report
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.problems.split(","), args.rounds, args.steps, tmp, args.curvature.split(","))
    print(report.cockpit_tables(result))


if __name__ == "__main__":
    main()
