#!/usr/bin/env bash
# Install groupshot with everything its tests need into .venv, then run the test suite
# offline. Extra arguments go to pytest (e.g. `bash tests/run.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/venv.sh
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
