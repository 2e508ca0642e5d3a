#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the project and its pinned deps.
# Idempotent: a second run installs nothing new. Works offline except for PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch first and pinned: this machine's pip takes the CPU build from local disk; an unpinned
# torch pulled in by another package would fetch a multi-GB CUDA build instead.
.venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
# The browser test (tests/test_browser.py) drives Debian's Chromium through Playwright. Playwright's
# own browser download is never used (no `playwright install`): the test launches /usr/bin/chromium.
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
fi
.venv/bin/pip install --quiet --disable-pip-version-check "playwright==1.65.2"
