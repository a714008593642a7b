"""The README's demo command works: run log, dashboard image and TensorBoard data in LOGDIR."""

import os
import subprocess
import sys

import cockpit_lite

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)


def test_demo_writes_log_dashboard_and_tensorboard(tmp_path):
    logdir = tmp_path / "demo"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "demo.py"), "--logdir", str(logdir),
                          "--epochs", "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    run = cockpit_lite.load(logdir)
    assert run.finished and len(run) == 23  # 1500 samples / batch 64, one epoch
    for key in ("loss", "grad_norm", "alpha", "norm_test", "hess_max_ev"):
        assert len(run.series(key)[0]) > 0, key
    assert (logdir / "cockpit.png").stat().st_size > 50_000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(logdir))
    assert "cockpit-lite diagnosis" in out.stdout and "test accuracy" in out.stdout
    # energy is logged with its provenance (here usually "unavailable" with the reason)
    statuses = {dev["status"] for _, d in run.data("energy") for name, dev in d.items() if isinstance(dev, dict) and "status" in dev}
    assert statuses and statuses <= {"measured", "estimated", "unavailable"}
    assert "estimated" not in statuses  # an estimate exists only when asked for
