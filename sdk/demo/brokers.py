"""Mosquitto for the demo: find or install the binary, run one process per generated broker.

A minimal re-implementation of what ``tests/mosquitto_broker.py`` does for
the test suite (the SDK must not import test code, nor pytest). Mosquitto
started as root drops to user ``mosquitto`` before it opens the password
file, ACL and persistence directory: :func:`generate_topology` hands those to
``owner`` and the demo's work directory is made traversable (0711).
"""

from __future__ import annotations

import fcntl
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from sdk.broker_config import GeneratedTopology
from sdk.demo.settings import DemoError

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
MOSQUITTO_USER = "mosquitto"
_SEARCH_PATH = "/usr/sbin:/usr/bin:/usr/local/sbin:/usr/local/bin"
_INSTALL_LOCK = Path(tempfile.gettempdir()) / "fedge-mosquitto-install.lock"


def find_mosquitto() -> str | None:
    """Path of the ``mosquitto`` binary, or None when it is not installed."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path=_SEARCH_PATH)


def ensure_mosquitto(*, timeout_s: float = 600.0) -> str:
    """Path of ``mosquitto``; installs the Debian package first when missing and running as root (DemoError otherwise)."""
    found = find_mosquitto()
    if found:
        return found
    if os.geteuid() != 0:
        raise DemoError("mosquitto is not installed; install it (e.g. `sudo apt-get install -y mosquitto`) and run again")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "mosquitto"]
    logger.info("installing mosquitto with apt-get")
    try:
        with open(_INSTALL_LOCK, "w") as lock:  # one installer at a time (parallel test workers, several demos)
            fcntl.flock(lock, fcntl.LOCK_EX)
            if find_mosquitto() is None:
                if subprocess.run(install, env=env, capture_output=True, timeout=timeout_s, check=False).returncode != 0:
                    # A fresh machine has no package lists yet.
                    subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=timeout_s, check=True)
                    subprocess.run(install, env=env, capture_output=True, timeout=timeout_s, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise DemoError(f"installing mosquitto with apt-get failed: {exc}") from exc
    found = find_mosquitto()
    if not found:
        raise DemoError("apt-get installed mosquitto but the binary is not on PATH or in /usr/sbin")
    return found


def broker_owner() -> str | None:
    """The user a root-started Mosquitto drops to (it must own the broker files), or None when it will not drop."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(MOSQUITTO_USER)
    except KeyError:
        return None
    return MOSQUITTO_USER


#: Ports :func:`free_port` hands out: below Linux's ephemeral range (32768-60999), so the
#: client sockets of other processes never take one between the pick and the server's bind.
_PORT_RANGE = range(20000, 32000)
_PORT_COUNTER = Path(tempfile.gettempdir()) / f"fedge-next-port-{os.getuid()}"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago and that no other fedge process got from here.

    Processes on one machine (parallel test workers, several demos) take turns on a
    counter file, so two of them never pick the same port before either binds it;
    without the file (another user's, a read-only temp dir) the OS picks one.
    """
    try:
        with open(_PORT_COUNTER, "a+") as counter:
            fcntl.flock(counter, fcntl.LOCK_EX)
            counter.seek(0)
            text = counter.read().strip()
            start = int(text) if text.isdigit() else _PORT_RANGE.start + os.getpid() % len(_PORT_RANGE)
            for step in range(len(_PORT_RANGE)):
                port = _PORT_RANGE.start + (start - _PORT_RANGE.start + step) % len(_PORT_RANGE)
                if _bindable(host, port):
                    counter.seek(0)
                    counter.truncate()
                    counter.write(str(port + 1))
                    return port
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_open(port: int, host: str = LOOPBACK) -> bool:
    """Whether something accepts TCP connections on ``host:port`` right now."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class BrokerProcess:
    """One Mosquitto process started from a generated ``mosquitto.conf``, logging to ``mosquitto.log`` beside it."""

    def __init__(self, *, name: str, binary: str, config_file: Path, port: int, startup_timeout_s: float = 10.0) -> None:
        self.name = name
        self.port = port
        self.config_file = config_file
        self.log_file = config_file.parent / "mosquitto.log"
        self._binary = binary
        self._startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and return once its plain listener accepts connections (DemoError if it exits or times out)."""
        with open(self.log_file, "ab") as log:
            self._process = subprocess.Popen([self._binary, "-c", str(self.config_file)], cwd=self.config_file.parent,
                                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self._startup_timeout_s
        while not port_open(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_file.read_text(errors="replace")[-2000:]
                raise DemoError(f"mosquitto for {self.name} did not start on port {self.port}:\n{tail}")
            time.sleep(0.02)

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; nothing when it is not running."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)

    def kill(self, timeout_s: float = 5.0) -> None:
        """SIGKILL, as a crash would (nothing flushed to persistence); nothing when it is not running.

        For fault-injection tests (``tests/integration``): :meth:`start` brings it back on the same port and config.
        """
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(timeout=timeout_s)


class BrokerSet:
    """Every broker of a generated topology, root first; a context manager that stops them all."""

    def __init__(self, generated: GeneratedTopology) -> None:
        binary = ensure_mosquitto()
        topology = generated.topology
        ports = {"root": topology.root.address.port, **{r.name: r.address.port for r in topology.regions}}
        self.brokers: Sequence[BrokerProcess] = tuple(
            BrokerProcess(name=name, binary=binary, config_file=generated.broker(name).config_file, port=port)
            for name, port in ports.items()
        )

    def __enter__(self) -> BrokerSet:
        try:
            for broker in self.brokers:
                broker.start()
                logger.info("broker %s listening on %s:%d", broker.name, LOOPBACK, broker.port)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every broker (regions first, so bridges do not log the root going away)."""
        for broker in reversed(self.brokers):
            broker.stop()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
