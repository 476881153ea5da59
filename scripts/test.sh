#!/usr/bin/env bash
# Set up (first run only) and run the whole fedge test suite.
# Integration tests need Mosquitto and the Fashion-MNIST files from Debian, the
# dashboard's browser test Debian's Chromium and its driver (never a browser download),
# the emulated Raspberry Pi tests (-m aarch64) qemu-user-static, binfmt-support and debootstrap;
# install them when missing and we are root (as on CI and dev machines here).
# apt (system packages) and pip (.venv) run side by side on a fresh machine.
# The suite runs in parallel pytest-xdist workers (FEDGE_TEST_WORKERS, default 4 on any core
# count: most tests wait on brokers, deadlines and child processes, not on the CPU);
# `--dist loadgroup` keeps the tests that share a costly fixture on one worker (tests/conftest.py, docs/testing.md).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v mosquitto >/dev/null 2>&1 || need+=(mosquitto mosquitto-clients)
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
command -v update-binfmts >/dev/null 2>&1 || need+=(binfmt-support)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
apt_pid=
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null) &
  apt_pid=$!
fi
bash scripts/setup_env.sh
[ -z "$apt_pid" ] || wait "$apt_pid"
. .venv/bin/activate
exec python -m pytest -n "${FEDGE_TEST_WORKERS:-4}" --dist loadgroup --durations=20 "$@"
