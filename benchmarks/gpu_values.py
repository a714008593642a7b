"""Stage ``values``: the same training run on the CPU and on the GPU gives the same logged values.

Two runs per problem: the demo (examples/demo.py's CNN on scikit-learn's digits, Adam) and a transformer
(benchmarks/problems.py's encoder, SGD with momentum), each watched with the ``full`` preset on every
step plus ``energy``. Both devices start from one initial model (built on the CPU from a seed, copied)
and see the same batches (drawn on the CPU, copied); TF32 is off and deterministic algorithms are on
(gpu_common.comparable_numerics). Then every scalar key of the two logs is compared step by step:

* default: |a - b| <= 1e-4 * max(|a|, |b|, floor), floor = 1e-3 x the key's largest magnitude over the
  run (a value that is ~0 by cancellation, e.g. ``distance`` at step 0, is judged against its series);
* ``alpha``: |a - b| <= 1e-3 absolute (a ratio of differences of losses, around 0 by design);
* ``hess_max_ev``: 1e-3 relative, the Lanczos stopping tolerance (both sides start from the same
  vector, drawn on the CPU, so the iterations match up to rounding);
* estimates with a ``<key>/stderr`` entry: the probes are drawn from a CPU generator seeded per step
  (cockpit_lite.rng.step_generator), so they are the same on both devices and 1e-4 applies; a larger
  difference that stays within the two standard errors is reported as "within SE", not as a pass;
* NaN on both sides agrees (the reasons are listed when they differ); NaN on one side only fails;
* not compared: ``time*`` and ``energy*`` (they measure the device), ``*/hvps`` (an iteration count,
  listed), ``lr`` (the same schedule on both). A key logged on one side only fails.

The histograms (data entries ``grad_hist_1d``/``grad_hist_2d``) are compared too: edges at 1e-4
relative, counts by the fraction of samples in another bin (<= 1e-3; a value on a bin edge may fall
on either side).

On a machine without CUDA (or ``--device cpu``) the "GPU" run is a second CPU run: a dry run of the
machinery, labelled as such.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
from typing import List, Tuple

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cockpit_lite  # noqa: E402
from benchmarks import gpu_common as gc_  # noqa: E402
from benchmarks import problems  # noqa: E402

REL, ALPHA_ABS, LANCZOS_REL, FLOOR, HIST_FLIP = 1e-4, 1e-3, 1e-3, 1e-3, 1e-3
NOT_COMPARED = ("time", "energy", "lr")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo_module():
    spec = importlib.util.spec_from_file_location("cockpit_lite_demo", os.path.join(ROOT, "examples", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_problem(steps: int, tiny: bool):
    """(make_model, batches, optimizer factory, note): the demo's CNN, Adam, its digits when
    scikit-learn is there (else random 8x8 images, said in the note)."""
    demo = _demo_module()
    note = "examples/demo.py model, scikit-learn digits, Adam lr 3e-3, batch 64"
    try:
        (x, y), _ = demo.digits()
    except ImportError as err:
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(1500, 1, 8, 8, generator=g), torch.randint(0, 10, (1500,), generator=g)
        note += f" (scikit-learn missing: {err}; random 8x8 images instead)"
    b = 64
    batches = [(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]) for i in range(steps)]
    return demo.model, batches, lambda params: torch.optim.Adam(params, lr=3e-3), note


def transformer_problem(steps: int, tiny: bool):
    width = 32 if tiny else problems.WIDTH
    make = problems._tokens()
    batches = [make(100 + s, 4 if tiny else 8) for s in range(steps)]
    note = (f"benchmarks/problems.py Transformer (width {width}, 4 heads, sequences of {problems.SEQ}), "
            "SGD lr 0.01 momentum 0.9")
    return (lambda: problems.Transformer(width=width)), batches, \
        (lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9)), note


PROBLEMS = {"demo": demo_problem, "transformer": transformer_problem}


def quantities():
    q = cockpit_lite.presets.preset("full", "every")
    q["energy"] = "every"
    return q


def train(make_model, batches, make_opt, device: str, logdir: str):
    torch.manual_seed(0)
    model = make_model()  # built on the CPU from the seed: the same initial weights on every device
    model.to(device)
    opt = make_opt(model.parameters())
    crit = nn.CrossEntropyLoss()
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir, quantities=quantities()):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
    return cockpit_lite.load(logdir)


def _skipped(key: str) -> bool:
    return key.split("/")[0] in NOT_COMPARED or key.endswith("/hvps")


def rule_for(key: str, has_stderr: bool) -> str:
    if key == "alpha":
        return f"abs {ALPHA_ABS:g}"
    if key == "hess_max_ev":
        return f"rel {LANCZOS_REL:g} (Lanczos tolerance)"
    return f"rel {REL:g}" + (" (same probes; SE shown)" if has_stderr else "")


def compare_pair(key: str, a: float, b: float, scale: float) -> Tuple[bool, float]:
    """(agrees, the difference in the rule's unit: absolute for alpha, relative otherwise)."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b), 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    if math.isinf(a) or math.isinf(b):
        return a == b, 0.0 if a == b else math.inf
    if key == "alpha":
        d = abs(a - b)
        return d <= ALPHA_ABS, d
    denom = max(abs(a), abs(b), FLOOR * scale)
    d = 0.0 if denom == 0 else abs(a - b) / denom
    return d <= (LANCZOS_REL if key == "hess_max_ev" else REL), d


def compare_scalars(ref, other) -> List[dict]:
    """One row per scalar key: steps compared, worst difference (rule's unit), verdict."""
    rows = []
    keys_ref, keys_other = set(ref.keys()), set(other.keys())
    for key in sorted(keys_ref | keys_other):
        if _skipped(key):
            continue
        if key not in keys_ref or key not in keys_other:
            side = "CPU" if key in keys_ref else "GPU"
            rows.append({"key": key, "rule": "present on both", "compared": 0, "worst": math.inf, "ok": False,
                         "note": f"logged on the {side} side only"})
            continue
        s_ref, v_ref = ref.series(key)
        s_oth, v_oth = other.series(key)
        by_step = dict(zip(map(int, s_oth), map(float, v_oth)))
        finite = [abs(float(v)) for v in list(v_ref) + list(v_oth) if math.isfinite(float(v))]
        scale = max(finite, default=0.0)
        stderr_key = key + "/stderr" if not key.endswith("/stderr") else None
        has_se = bool(stderr_key and stderr_key in keys_ref)
        se_ref = dict(zip(map(int, ref.series(stderr_key)[0]), map(float, ref.series(stderr_key)[1]))) if has_se else {}
        se_oth = dict(zip(map(int, other.series(stderr_key)[0]), map(float, other.series(stderr_key)[1]))) if has_se else {}
        worst, worst_step, ok, compared, within_se, notes = 0.0, None, True, 0, 0, []
        missing = [int(s) for s in s_ref if int(s) not in by_step]
        if missing or len(s_ref) != len(s_oth):
            ok = False
            notes.append(f"steps differ (CPU {list(map(int, s_ref))}, GPU {sorted(by_step)})")
        for s, a in zip(map(int, s_ref), map(float, v_ref)):
            if s not in by_step:
                continue
            b = by_step[s]
            agree, d = compare_pair(key, a, b, scale)
            compared += 1
            if not agree and has_se and math.isfinite(a) and math.isfinite(b):
                se = math.hypot(se_ref.get(s, math.nan), se_oth.get(s, math.nan))
                if abs(a - b) <= se:
                    within_se += 1
            if not agree:
                ok = False
                if math.isnan(a) != math.isnan(b):
                    reason = (ref.reasons(key) if math.isnan(a) else other.reasons(key)).get(s, "")
                    notes.append(f"step {s}: NaN on the {'CPU' if math.isnan(a) else 'GPU'} side only ({reason[:160]})")
            if worst_step is None or d > worst:
                worst, worst_step = d, s
        if within_se:
            notes.append(f"{within_se} step(s) differ beyond {REL:g} but within the standard error")
        r_ref, r_oth = set(ref.reasons(key).values()), set(other.reasons(key).values())
        if r_ref != r_oth:
            notes.append(f"NaN reasons differ: CPU {sorted(r_ref)[:2]} / GPU {sorted(r_oth)[:2]}")
        rows.append({"key": key, "rule": rule_for(key, has_se), "compared": compared, "worst": worst,
                     "worst_step": worst_step, "ok": ok, "note": "; ".join(notes)})
    return rows


def _hist_pairs(run, key):
    return {int(s): d for s, d in run.data(key)}


def compare_histograms(ref, other) -> List[dict]:
    rows = []
    for key, edge_names in (("grad_hist_1d", ("edges",)), ("grad_hist_2d", ("x_edges", "y_edges"))):
        a, b = _hist_pairs(ref, key), _hist_pairs(other, key)
        if not a and not b:
            continue
        worst_edge, worst_flip, ok, notes = 0.0, 0.0, True, []
        for s in sorted(set(a) | set(b)):
            if s not in a or s not in b:
                ok = False
                notes.append(f"step {s} on one side only")
                continue
            for name in edge_names:
                ea, eb = np.asarray(a[s].get(name) or [], float), np.asarray(b[s].get(name) or [], float)
                if ea.shape != eb.shape:
                    ok = False
                    notes.append(f"step {s}: {name} shapes differ")
                    continue
                if ea.size:
                    scale = max(np.abs(ea).max(), np.abs(eb).max(), 1e-30)
                    worst_edge = max(worst_edge, float(np.abs(ea - eb).max() / scale))
            ca, cb = _counts(a[s]), _counts(b[s])
            if ca is None and cb is None:
                continue  # not computable on either side (NaN with a reason in both logs)
            if ca is None or cb is None or ca.shape != cb.shape:
                ok = False
                notes.append(f"step {s}: counts missing or of different shapes")
                continue
            total = max(float(ca.sum()), 1.0)
            worst_flip = max(worst_flip, float(np.abs(ca - cb).sum()) / 2 / total)
        ok = ok and worst_edge <= REL and worst_flip <= HIST_FLIP
        rows.append({"key": f"data:{key}", "rule": f"edges rel {REL:g}; counts: <= {HIST_FLIP:g} of samples moved",
                     "compared": len(set(a) & set(b)), "worst": max(worst_edge, worst_flip),
                     "worst_edge": worst_edge, "worst_moved": worst_flip, "ok": ok, "note": "; ".join(notes)})
    return rows


def _counts(entry):
    for name in ("counts", "hist", "histogram"):
        if entry.get(name) is not None:
            return np.asarray(entry[name], float)
    return None


def run_problem(name: str, device: str, steps: int, tiny: bool, tmp: str) -> dict:
    make_model, batches, make_opt, note = PROBLEMS[name](steps, tiny)
    gc_.say(f"values/{name}: CPU run ({steps} steps)")
    ref = train(make_model, batches, make_opt, "cpu", os.path.join(tmp, f"{name}-cpu"))
    gc_.say(f"values/{name}: {device} run")
    other = train(make_model, batches, make_opt, device, os.path.join(tmp, f"{name}-device"))
    rows = compare_scalars(ref, other) + compare_histograms(ref, other)
    hvps = {side: [int(v) for v in run.series("hess_max_ev/hvps")[1]] for side, run in (("cpu", ref), (device, other))}
    return {"problem": name, "note": note, "steps": steps, "rows": rows, "hvps": hvps}


def run(device: str, tiny: bool, out: str) -> dict:
    gc_.comparable_numerics()
    dry = not gc_.cuda_ok(device)
    target = device if not dry else "cpu"
    steps = 2 if tiny else 4
    checks, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in PROBLEMS:
            try:
                res = run_problem(name, target, steps, tiny, tmp)
            except Exception as err:  # one problem failing must not lose the other
                checks.append(gc_.check(f"values {name}: CPU vs {target}", gc_.FAIL,
                                        f"the run raised {type(err).__name__}: {err}"))
                continue
            results.append(res)
            bad = [r for r in res["rows"] if not r["ok"]]
            label = f"values {name}: CPU vs {target}" + (" (dry run: both on the CPU)" if dry else "")
            detail = (f"{len(res['rows'])} keys, {sum(r['compared'] for r in res['rows'])} values compared; "
                      + (f"{len(bad)} disagree: " + ", ".join(f"{r['key']} ({_fmt(r['worst'])}{'; ' + r['note'] if r['note'] else ''})"
                                                         for r in bad[:12]) if bad else "all agree"))
            checks.append(gc_.check(label, gc_.passed(not bad), detail, keys=len(res["rows"]), disagree=len(bad)))
    gc_.write_json(os.path.join(out, "values.json"), {"device": target, "dry_run": dry, "problems": results})
    figures = {"compared_on": target, "dry_run": dry,
               "worst_by_problem": {r["problem"]: max((x["worst"] for x in r["rows"] if math.isfinite(x["worst"])), default=0.0)
                                    for r in results}}
    return gc_.stage_result("values", checks, figures)


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1e}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    print(run(args.device, args.tiny, args.out))


if __name__ == "__main__":
    main()
