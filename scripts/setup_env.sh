#!/usr/bin/env bash
# Create .venv and install fedge with the host SDK and test extras.
# torch is pinned to 2.13.0: that version resolves to the local CPU wheel; any
# looser spec pulls gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.fedge-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install --quiet --upgrade pip setuptools wheel
  python -m pip install --quiet "torch==2.13.0"
  python -m pip install --quiet -e ".[sdk,test]"
  touch "$stamp"
fi
