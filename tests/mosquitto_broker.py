"""A real Mosquitto broker for integration tests: install, start, wait, restart, stop.

Usage in a conftest or a test module::

    from tests.mosquitto_broker import mosquitto_fixture
    mosquitto = mosquitto_fixture()          # a fixture named "mosquitto"

    def test_x(mosquitto):
        broker = mosquitto.start()           # anonymous broker on a free loopback port
        broker.port ...
        d = mosquitto.workspace()            # a directory user `mosquitto` can reach
        mosquitto.start(config_file=d / "mosquitto.conf")   # listeners read from the file

Mosquitto started as root drops to user ``mosquitto`` before it opens the
password file, the ACL file and the persistence directory, so those must be
reachable by that user: pytest's ``tmp_path`` is not (its ancestors are 0700).
:func:`reachable_dir` makes directories that are, and the broker hands the
files its config names to that user before it starts.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import pytest

from sdk.demo.brokers import LOOPBACK, ensure_mosquitto, free_port, port_open

MOSQUITTO_USER = "mosquitto"
_LISTENER_RE = re.compile(r"^\s*listener\s+(\d+)", re.MULTILINE)
_OWNED_RE = re.compile(
    r"^\s*(password_file|acl_file|persistence_location|keyfile|bridge_keyfile)\s+(\S+)", re.MULTILINE
)


def _mosquitto_ids() -> tuple[int, int] | None:
    """(uid, gid) Mosquitto drops to, or None when it will not drop (not root, or no such user)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(MOSQUITTO_USER)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def reachable_dir(prefix: str = "fedge-mosquitto-") -> Path:
    """A new directory under the system temp dir that user ``mosquitto`` can traverse (caller removes it)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o711)  # search, not list: other users can reach only names they know
    return path


def hand_to_mosquitto(*paths: Path) -> None:
    """Give ``paths`` (recursively) to the user Mosquitto drops to; nothing when it will not drop."""
    ids = _mosquitto_ids()
    if ids is None:
        return
    for path in paths:
        if not path.exists():
            continue
        for item in [path, *(path.rglob("*") if path.is_dir() else ())]:
            os.chown(item, *ids)


class MosquittoBroker:
    """One Mosquitto process on loopback, started from a config file.

    ``config_file`` None writes a default config (anonymous access, persistence,
    ``extra_config`` appended) listening on ``port`` (a free one when None).
    With a config file, the ports waited for are its ``listener`` lines and
    ``port`` is the first of them; relative paths in it are resolved against
    its directory, which is the broker's working directory. Files the config
    names in ``password_file``, ``acl_file``, ``keyfile`` and
    ``persistence_location`` are handed to user ``mosquitto`` before each start
    (its own files only: files in an ``include_dir`` are not scanned).
    """

    def __init__(
        self,
        *,
        config_file: Path | None = None,
        workdir: Path | None = None,
        port: int | None = None,
        extra_config: str = "",
        startup_timeout: float = 10.0,
    ) -> None:
        self.binary = ensure_mosquitto()
        self._own_workdir = workdir is None and config_file is None
        if config_file is None:
            self.workdir = Path(workdir) if workdir is not None else reachable_dir()
            data_dir = self.workdir / "data"
            data_dir.mkdir(exist_ok=True)
            port = port if port is not None else free_port()
            config_file = self.workdir / "mosquitto.conf"
            config_file.write_text(
                f"listener {port} {LOOPBACK}\nallow_anonymous true\npersistence true\n"
                f"persistence_location {data_dir}/\nlog_dest stderr\n{extra_config}"
            )
        else:
            self.workdir = Path(workdir) if workdir is not None else Path(config_file).parent
        self.config_file = Path(config_file).resolve()
        text = self.config_file.read_text()
        self.ports: tuple[int, ...] = tuple(int(p) for p in _LISTENER_RE.findall(text))
        if not self.ports:
            raise ValueError(f"{self.config_file} has no listener line")
        self.port = self.ports[0]
        self.host = LOOPBACK
        self.log_file = self.workdir / "mosquitto.log"
        self.startup_timeout = startup_timeout
        self._owned = [self.config_file.parent / Path(m[1]) for m in _OWNED_RE.findall(text)]
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        """Everything the broker has logged so far (empty before the first start)."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def start(self) -> MosquittoBroker:
        """Start the broker and return once every listener accepts connections."""
        if self.running:
            raise RuntimeError("broker is already running")
        hand_to_mosquitto(*self._owned)
        with open(self.log_file, "ab") as log:
            self._process = subprocess.Popen(
                [self.binary, "-c", str(self.config_file)],
                cwd=self.config_file.parent, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        pending = list(self.ports)
        while pending:
            if self._process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self._process.returncode}:\n{self.log()[-3000:]}")
            pending = [p for p in pending if not port_open(p)]
            if pending and time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"mosquitto did not open ports {pending} in {self.startup_timeout}s:\n"
                                   f"{self.log()[-3000:]}")
            if pending:
                time.sleep(0.02)
        return self

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop cleanly (SIGTERM: persistence is saved), killing it after ``timeout`` seconds."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Crash it (SIGKILL): nothing is saved since the last autosave."""
        self._end(signal.SIGKILL, 5.0)

    def restart(self, *, crash: bool = False) -> MosquittoBroker:
        """Stop (or kill, with ``crash``) and start again on the same ports and data directory."""
        self.kill() if crash else self.stop()
        return self.start()

    def reload(self) -> None:
        """Send SIGHUP: Mosquitto rereads the password and ACL files (bridges are not reloaded)."""
        if not self.running or self._process is None:
            raise RuntimeError("broker is not running")
        self._process.send_signal(signal.SIGHUP)

    def close(self) -> None:
        """Stop the broker and remove its working directory if this object made it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class MosquittoFactory:
    """Starts brokers and makes reachable directories for one test; cleans all of it up after."""

    def __init__(self) -> None:
        self._brokers: list[MosquittoBroker] = []
        self._dirs: list[Path] = []

    def workspace(self) -> Path:
        """A fresh directory that a broker's files can live in (see :func:`reachable_dir`)."""
        self._dirs.append(reachable_dir())
        return self._dirs[-1]

    def start(self, **kwargs: object) -> MosquittoBroker:
        """``MosquittoBroker(**kwargs).start()``, stopped at teardown."""
        broker = MosquittoBroker(**kwargs)  # type: ignore[arg-type]
        self._brokers.append(broker)
        return broker.start()

    def close(self) -> None:
        """Stop every broker, then remove every workspace."""
        for broker in reversed(self._brokers):
            broker.close()
        for path in self._dirs:
            shutil.rmtree(path, ignore_errors=True)


FixtureScope = Literal["session", "package", "module", "class", "function"]


def mosquitto_fixture(scope: FixtureScope = "function", name: str = "mosquitto") -> Any:
    """A pytest fixture (assign it to a module-level name) yielding a :class:`MosquittoFactory`."""

    def _mosquitto() -> Iterator[MosquittoFactory]:
        factory = MosquittoFactory()
        try:
            yield factory
        finally:
            factory.close()

    return pytest.fixture(scope=scope, name=name)(_mosquitto)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


__all__: Sequence[str] = [
    "MosquittoBroker",
    "MosquittoFactory",
    "ensure_mosquitto",
    "free_port",
    "hand_to_mosquitto",
    "mosquitto_fixture",
    "reachable_dir",
    "wait_for",
]
