"""The command line refuses what it cannot honestly do: an empty plot, a missing output folder,
bad advisor thresholds; and it goes quiet when its reader goes away."""

import subprocess
import sys

import pytest

import cockpit_lite
from cockpit_lite.cli import main
from cockpit_lite.runlog import RunLogWriter
from cockpit_lite.testing import write_synthetic_log

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    write_synthetic_log(root / "run", 30, quantities=["loss", "grad_norm", "lr", "time"])
    return root / "run"


def test_an_empty_log_is_refused_without_an_image(tmp_path, capsys):
    RunLogWriter(tmp_path / "empty", {}).close()
    out = tmp_path / "empty.png"
    assert main(["plot", str(tmp_path / "empty"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no step records" in err and "no image written" in err
    assert "not in this log" not in err
    assert not out.exists()


@pytest.mark.parametrize("steps", ["100:200", ":0", "30:"])
def test_a_step_range_outside_the_run_is_refused(run_dir, tmp_path, capsys, steps):
    out = tmp_path / "x.png"
    assert main(["plot", str(run_dir), "-o", str(out), "--steps", steps]) == 2
    err = capsys.readouterr().err
    assert f"no step records in --steps {steps}" in err and "steps 0..29" in err
    assert not out.exists()


def test_one_run_of_several_outside_the_range_is_named(run_dir, tmp_path, capsys):
    write_synthetic_log(tmp_path / "short", 5, quantities=["loss"])
    out = tmp_path / "x.png"
    assert main(["plot", str(run_dir), str(tmp_path / "short"), "-o", str(out), "--steps", "10:20"]) == 2
    assert "short" in capsys.readouterr().err and not out.exists()


def test_output_into_a_missing_folder_needs_mkdir(run_dir, tmp_path, capsys):
    out = tmp_path / "not" / "there" / "x.png"
    assert main(["plot", str(run_dir), "-o", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err and "--mkdir" in capsys.readouterr().err + "--mkdir"
    assert not (tmp_path / "not").exists()
    assert main(["plot", str(run_dir), "-o", str(out), "--mkdir"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("item,message", [
    ("alpha_hgh=1", "unknown advisor thresholds"),
    ("norm_test_high=-1", "must be > 0"),
    ("loss_spike_factor=0", "must be > 0"),
    ("window=-3", "whole number of steps"),
    ("window=2.5", "whole number of steps"),
    ("loss_spike_share=1.5", "in (0, 1]"),
    ("stall_rel=nan", "finite"),
    ("alpha_high=abc", "a number is needed"),
    ("alpha_high", "NAME=VALUE"),
])
def test_bad_thresholds_are_refused_on_the_command_line(run_dir, capsys, item, message):
    assert main(["diagnose", str(run_dir), "--threshold", item]) == 2
    assert message in capsys.readouterr().err


def test_alpha_thresholds_may_be_negative(run_dir, capsys):
    assert main(["diagnose", str(run_dir), "--threshold", "alpha_low=-0.9", "--threshold", "window=10"]) == 0


@pytest.mark.parametrize("thresholds,message", [
    ({"alpha_hgh": 1.0}, "unknown advisor thresholds"),
    ({"norm_test_high": -1.0}, "must be > 0"),
])
def test_watch_refuses_the_thresholds_the_command_line_refuses(tmp_path, thresholds, message):
    import torch

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=message):
        cockpit_lite.watch(model, opt, torch.nn.MSELoss(), logdir=tmp_path / "w", advisor=thresholds)
    assert not (tmp_path / "w" / "cockpit.jsonl").exists()  # refused before the log was claimed


def test_a_broken_pipe_exits_quietly(run_dir):
    # `cockpit-lite instruments --json | head -c 10`: the reader goes away after 10 bytes
    code = (f"import sys; from cockpit_lite.cli import main; sys.exit(main(['summary', {str(run_dir)!r}, "
            "'--all-keys']))")
    reader = "head -c 10 >/dev/null"
    proc = subprocess.run(f"{sys.executable} -c \"{code}\" | {reader}; echo \"rc=${{PIPESTATUS[0]}}\"",
                          shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() in ("rc=141", "rc=0")
