#!/usr/bin/env bash
# Set up (first run only) and run the fedge demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
exec fedge demo "$@"
