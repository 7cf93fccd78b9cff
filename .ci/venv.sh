#!/usr/bin/env bash
# Create .venv (if missing) and install groupshot with everything its tests and examples
# need. Shared by the README's two commands (examples/quickstart.sh, tests/run.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
# This project's CPU machines serve torch 2.14.1 + torchvision 0.29.1 from local disk;
# elsewhere set TORCH_SPEC (any torch >= 2.4 with its matching torchvision works).
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q $TORCH_SPEC -e ".[test]"
# The demo's browser test drives Debian's Chromium (never a downloaded browser).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
            || echo "warning: could not install chromium; the browser test will say so" >&2
    fi
fi
