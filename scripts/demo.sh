#!/usr/bin/env bash
# Sets everything up (see setup.sh) and runs the main demonstration.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python disaggregated_inference.py "$@"
