"""The live dashboard in an ordinary script run as a program (no ``if __name__ == "__main__":`` guard,
as in the README's snippet): frames appear while training, no stray run folder, exit 0, and the
renderer does not outlive a trainer killed with SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("matplotlib")

SCRIPT = textwrap.dedent("""
    import os, sys, time
    import torch
    from torch import nn
    import cockpit_lite

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = nn.CrossEntropyLoss()
    cockpit = cockpit_lite.watch(model, optimizer, loss_fn=criterion, logdir="runs/exp1",
                                 quantities=["loss", "grad_norm"], dashboard=True)
    print("renderer", cockpit._live.pid, flush=True)
    png = os.path.join("runs", "exp1", "cockpit.png")
    end = time.monotonic() + 150
    frame_at = None
    while time.monotonic() < end:
        x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
        time.sleep(0.02)
        if frame_at is None and os.path.exists(png):
            frame_at = cockpit.step
            print("frame while training at step", frame_at, flush=True)
            if sys.argv[1:] == ["finish"]:
                break
    cockpit.close()
    print("done", flush=True)
""")


def _start(tmp_path, *args):
    (tmp_path / "train.py").write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))] + [os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie nobody reaped yet
    except FileNotFoundError:
        return True


@pytest.mark.slow
@pytest.mark.integration
def test_a_script_without_main_guard_gets_frames_while_training(tmp_path):
    proc = _start(tmp_path, "finish")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "frame while training at step" in out and "done" in out, (out, err)
    assert "Traceback" not in err, err
    assert os.listdir(tmp_path / "runs") == ["exp1"]  # no stray run folder from a re-run script
    assert (tmp_path / "runs" / "exp1" / "cockpit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    renderer = int(out.split("renderer", 1)[1].split()[0])
    assert _gone(renderer)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_the_renderer_exits_when_the_trainer_is_killed(tmp_path):
    proc = _start(tmp_path)
    try:
        line = proc.stdout.readline()
        assert line.startswith("renderer"), (line, proc.stderr.read() if proc.poll() is not None else "")
        renderer = int(line.split()[1])
        assert proc.stdout.readline().startswith("frame while training")
        assert not _gone(renderer)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    end = time.monotonic() + 20
    while not _gone(renderer) and time.monotonic() < end:
        time.sleep(0.1)
    assert _gone(renderer)
    assert os.listdir(tmp_path / "runs") == ["exp1"]
