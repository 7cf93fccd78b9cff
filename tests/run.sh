#!/usr/bin/env bash
# Install groupshot with everything its tests need into .venv, then run the test suite
# offline. Extra arguments go to pytest (e.g. `bash tests/run.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The CPU machines of this project serve torch 2.14.1 + torchvision 0.29.1 from local disk;
# override TORCH_SPEC elsewhere (any torch >= 2.4 with its matching torchvision works).
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q $TORCH_SPEC -e ".[test]"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
