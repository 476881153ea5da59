"""Session fixtures of the field tests: the firmware overlay tar and an emulated Raspberry Pi with it installed.

Both are built once per session (the Debian root and the aarch64 wheels once
per machine, in the test cache). The time each phase took is written to
``<test cache>/aarch64-timings.json`` and logged, cold or warm.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.build_cache import cache_lock, cache_root
from tests.example_modules import EXAMPLES
from tests.field.arm64_root import EmulatedPi, EmulationUnavailable, cached_root

logger = logging.getLogger(__name__)

BUILD_SCRIPT = EXAMPLES / "firmware-image" / "build_overlay.py"
INSTALL_SCRIPT = EXAMPLES / "raspberry-pi" / "install.sh"
#: What lies beside install.sh in the kit (it installs them too).
KIT_FILES = (EXAMPLES / "raspberry-pi" / "sensor_windows.py", EXAMPLES / "raspberry-pi" / "fedge-sensor.service")
#: Where the install files are copied inside the root.
INSTALL_DIR = "/tmp/fedge-install"


@dataclass
class Timings:
    """Seconds per phase of this session's field tests (``cold`` phases built something the cache did not have)."""

    phases: dict[str, float] = field(default_factory=dict)
    cold: set[str] = field(default_factory=set)

    def add(self, phase: str, seconds: float, *, cold: bool = False) -> None:
        self.phases[phase] = round(seconds, 1)
        if cold:
            self.cold.add(phase)


@pytest.fixture(scope="session")
def field_timings() -> Iterator[Timings]:
    timings = Timings()
    yield timings
    if timings.phases:
        record = {"phases": timings.phases, "cold": sorted(timings.cold), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (cache_root() / "aarch64-timings.json").write_text(json.dumps(record, indent=2) + "\n")
        logger.warning("field test timings: %s", record)


@dataclass(frozen=True, kw_only=True)
class Overlay:
    """The overlay tar the build script wrote, its .sha256 beside it, and the script's JSON summary."""

    tar: Path
    summary: dict[str, object]
    wheelhouse: Path


def run_build_script(out: Path, wheelhouse: Path, *, offline: bool = False) -> dict[str, object]:
    """Run examples/firmware-image/build_overlay.py as a user would; its JSON summary (AssertionError with its stderr)."""
    cmd = [sys.executable, str(BUILD_SCRIPT), "--out", str(out), "--wheelhouse", str(wheelhouse)]
    proc = subprocess.run(cmd + (["--offline"] if offline else []), capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"build_overlay.py failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="session")
def overlay(tmp_path_factory: pytest.TempPathFactory, field_timings: Timings) -> Overlay:
    """The overlay built from this checkout (aarch64 wheels downloaded once into the test cache's wheelhouse)."""
    wheelhouse = cache_root() / "aarch64-wheels"
    out = tmp_path_factory.mktemp("overlay") / "fedge-overlay-bookworm-arm64.tar.gz"
    started = time.monotonic()
    with cache_lock("aarch64-wheels", timeout_s=900):
        fresh = not wheelhouse.is_dir()
        summary = run_build_script(out, wheelhouse)
    field_timings.add("overlay_build", time.monotonic() - started, cold=fresh)
    return Overlay(tar=out, summary=summary, wheelhouse=wheelhouse)


@pytest.fixture(scope="session")
def emulated_pi(tmp_path_factory: pytest.TempPathFactory, overlay: Overlay, field_timings: Timings) -> Iterator[EmulatedPi]:
    """A Debian bookworm arm64 root under qemu with the overlay installed by examples/raspberry-pi/install.sh."""
    started = time.monotonic()
    try:
        with cached_root() as (lower, built):
            field_timings.add("root_ready", time.monotonic() - started, cold=built)
            pi = EmulatedPi(lower, tmp_path_factory.mktemp("emulated-pi"))
            try:
                staging = pi.path(INSTALL_DIR)
                staging.mkdir(parents=True)
                for source in (overlay.tar, Path(f"{overlay.tar}.sha256"), INSTALL_SCRIPT, *KIT_FILES):
                    shutil.copy(source, staging / source.name)
                started = time.monotonic()
                proc = pi.run(["sh", f"{INSTALL_DIR}/install.sh", f"{INSTALL_DIR}/{overlay.tar.name}"], timeout=600)
                field_timings.add("overlay_install", time.monotonic() - started)
                assert proc.returncode == 0, f"install.sh failed in the emulated root:\n{proc.stdout}\n{proc.stderr}"
                yield pi
            finally:
                pi.close()
    except EmulationUnavailable as exc:
        pytest.fail(f"the emulated Raspberry Pi cannot run on this machine: {exc}", pytrace=False)
