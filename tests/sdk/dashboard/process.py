"""``fedge dashboard --config`` (or ``--fleet``) as a real process in tests: start it, learn its URL, stop it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
_URL = re.compile(r"fedge dashboard of fleet \S+: (https?://\S+/)")


class DashboardProcess:
    """The dashboard in a subprocess (its log in ``log``); ``url`` once it listens."""

    def __init__(self, config: Path, log: Path, *extra: str, max_seconds: float = 240.0, source: str = "--config") -> None:
        self.log = log
        self._out = log.open("wb")
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from sdk.cli.main import main; main()", "dashboard", source, str(config),
             "--max-seconds", str(max_seconds), *extra],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.url = self._wait_url()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def _wait_url(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            found = _URL.search(self.text())
            if found:
                return found.group(1)
            assert self.proc.poll() is None, f"fedge dashboard exited ({self.proc.returncode}):\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"fedge dashboard did not start in {timeout:g} s:\n{self.text()[-3000:]}"
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._out.close()
        return self.proc.returncode
