import os

import pytest
import torch

from layout import use_test_dirs

use_test_dirs()  # test folders mirror the package; support and other folders' tests import by name

# the suite runs on 2 shared cores: keep each test's intra-op threads modest and deterministic
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Test files that drive a third-party framework, a browser or several processes. Marked here, by file,
# so that `pytest -m "not integration"` (or "not slow") gives the fast inner loop without every file
# repeating the marks; the README's test command still runs everything.
_INTEGRATION = {
    "test_distributed.py", "test_integration_lightning.py", "test_integration_transformers.py",
    "test_tensorboard_e2e.py", "test_tensorboard_routes.py", "test_persample_cockpit_compare.py",
    "test_demo.py", "test_dashboard_png.py", "test_dashboard_live.py", "test_benchmarks_device.py",
}
_SLOW = {  # several seconds each on 2 cores: processes, compilers, browsers, a whole demo
    "test_distributed.py", "test_integration_lightning.py", "test_tensorboard_e2e.py", "test_demo.py",
    "test_amp_compile.py", "test_dashboard_png.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        if name in _INTEGRATION:
            item.add_marker(pytest.mark.integration)
        if name in _SLOW:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def logdir(tmp_path):
    return tmp_path / "run"
