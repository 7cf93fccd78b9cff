#!/usr/bin/env bash
# Install groupshot into .venv and run the quick start (add --tiny for the offline models).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/venv.sh
exec .venv/bin/python examples/quickstart.py "$@"
