#!/usr/bin/env bash
# What tests/tensorboard/test_tensorboard_e2e.py needs: Debian's chromium and Playwright for Python (which
# drives that chromium; Playwright's own browser download is not used and not needed).
# Called by .ci/run before the test suite. Idempotent.
set -euo pipefail

if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium fonts-liberation
fi

python -m pip install --quiet "playwright>=1.40"

chromium --version
python -c "import playwright.sync_api; print('playwright for Python: ok')"
