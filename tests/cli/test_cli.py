"""The command line, through main([...]) and once through a subprocess."""

import json
import subprocess
import sys

import pytest

from cockpit_lite.cli import main
from cockpit_lite.testing import write_synthetic_log

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_synthetic_log(root / "sgd", 30, hist_every=10)
    write_synthetic_log(root / "adam", 25, quantities=["loss", "grad_norm", "lr", "cabs"], optimizer="Adam")
    return root


def test_plot_one_run(runs, tmp_path, capsys):
    out = tmp_path / "one.png"
    assert main(["plot", str(runs / "sgd"), "-o", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert f"wrote {out}" in capsys.readouterr().out


def test_plot_several_runs_with_instruments_and_steps(runs, tmp_path, capsys):
    out = tmp_path / "cmp.svg"
    rc = main(["plot", str(runs / "sgd"), str(runs / "adam"), "-o", str(out), "--instruments", "performance,cabs",
               "--steps", "5:20"])
    assert rc == 0
    svg = out.read_text()
    assert "[sgd] Mini-batch loss" in svg and "[adam] CABS suggested batch size" in svg  # text comments
    assert "(4 panels, 2 run(s)" in capsys.readouterr().out  # 2 instruments x 2 runs


def test_plot_errors_are_one_clear_line(runs, tmp_path, capsys):
    assert main(["plot", str(runs / "sgd"), "-o", str(tmp_path / "x.jpg")]) == 2
    assert "must end in .png, .pdf or .svg" in capsys.readouterr().err
    assert main(["plot", str(runs / "sgd"), "-o", str(tmp_path / "x.png"), "--instruments", "nope"]) == 2
    assert "unknown instrument(s) nope" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing"), "-o", str(tmp_path / "x.png")]) == 2
    assert "no cockpit-lite run log" in capsys.readouterr().err
    assert main(["plot", str(runs / "sgd"), "-o", str(tmp_path / "x.png"), "--steps", "9"]) == 2
    assert "START:STOP" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plot", str(runs / "sgd")])  # -o is required


def test_summary_prints_steps_quantities_and_last_values(runs, capsys):
    from cockpit_lite import load

    assert main(["summary", str(runs / "adam")]) == 0
    out = capsys.readouterr().out
    assert "steps: 25 recorded (steps 0..24), 0 skipped, finished" in out
    assert "quantities: cabs (every), grad_norm (every), loss (every), lr (every)" in out
    steps, loss = load(runs / "adam").series("loss")
    assert f"loss       {loss[-1]:.6g}  (step 24)" in out
    assert "cabs       NaN on every step  [25 NaN: CABS is defined for SGD without momentum" in out
    assert "per-parameter keys not shown" in out
    main(["summary", str(runs / "adam"), "--all-keys"])
    assert "grad_norm/0.weight" in capsys.readouterr().out


def test_instruments_listing(capsys):
    assert main(["instruments", "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert {"alpha_gauge", "gradient_tests", "energy"} <= {d["name"] for d in described}
    assert main(["instruments"]) == 0
    assert "step size:" in capsys.readouterr().out


def test_command_line_entry_in_a_subprocess(runs):
    out = subprocess.run([sys.executable, "-m", "cockpit_lite.cli", "summary", str(runs / "sgd")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "steps: 30 recorded" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "cockpit_lite.cli", "frobnicate"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_plot_from_the_reader_cache_draws_the_same_image(tmp_path, monkeypatch, capsys):
    import gc

    from cockpit_lite.runlog.cache import RunCache

    monkeypatch.setattr(RunCache, "MIN_BYTES", 0)  # cache this small log too
    write_synthetic_log(tmp_path / "run", 400, hist_every=50, curvature_every=7)
    cold, warm = tmp_path / "cold.png", tmp_path / "warm.png"
    assert main(["plot", str(tmp_path / "run"), "-o", str(cold)]) == 0
    assert (tmp_path / "run" / ".cockpit.jsonl.cache").exists()
    assert main(["plot", str(tmp_path / "run"), "-o", str(warm)]) == 0
    assert cold.read_bytes() == warm.read_bytes()
    assert gc.isenabled() and gc.get_freeze_count() == 0  # the command leaves the collector as it was
    assert main(["plot", str(tmp_path / "run"), "-o", str(tmp_path / "part.png"), "--steps", "100:200"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"wrote {tmp_path / 'part.png'}")
