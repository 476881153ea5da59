"""Headless Chromium for the dashboard tests: Debian's ``chromium`` and ``chromedriver`` through selenium.

The browser is never downloaded: scripts/test.sh installs both packages
when missing. If Chromium cannot start, the test fails with the reason
(never skips). Background networking, component updates and sync are off
(machines here reach no such service), and each browser gets a fresh profile.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Screenshots and other test artifacts (gitignored).
ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"


def start_chromium(profile: Path):
    """A selenium driver for headless Debian Chromium; pytest.fail with the reason when it cannot start."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: install Debian's chromium and chromium-driver (scripts/test.sh does)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        pytest.fail(f"selenium is not installed (pip install 'fedge[test]'): {exc}")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,2400",
                f"--user-data-dir={profile}"):
        options.add_argument(arg)
    try:
        return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    except Exception as exc:  # noqa: BLE001 - any start failure is the test's failure, with the reason
        pytest.fail(f"headless Chromium did not start: {type(exc).__name__}: {exc}")


@pytest.fixture
def browser() -> Iterator:
    profile = Path(tempfile.mkdtemp(prefix="fedge-chromium-"))
    driver = start_chromium(profile)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.25) -> object:
    """``check()``'s first truthy value within ``timeout`` s, else an AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"never saw {what} within {timeout:g} s (last: {last!r})")


def screenshot(driver, name: str) -> Path:
    """Save a full-window PNG under test-artifacts/ and return its path."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path
