"""CPU time, peak RSS and I/O bytes of other processes, read from /proc (Linux).

The fleet benchmark samples every process it started (brokers, aggregator
services, load generators, agents) at the start and the end of the timed
rounds: CPU seconds and bytes are the differences, peak RSS (``VmHWM``) is
the process's high-water mark since it started. ``rchar``/``wchar`` of
``/proc/<pid>/io`` count every byte the process passed to read(2)/write(2)
(sockets included: Mosquitto reads and writes its clients' sockets that
way), so for a broker they are the MQTT bytes in and out plus its log and
persistence writes. Reading another user's ``io`` needs the same user or root;
a figure that cannot be read is None. ``schedstat`` adds how long the
process's threads were ready to run but waited for a CPU: on a machine shared
with other work, that is the time the process lost to the others (threads
that have exited by the second reading drop out of the sum).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ProcSample:
    """One reading of a process: CPU seconds (user + system), peak and current RSS in MB, I/O bytes, and seconds its
    threads were runnable but waiting for a CPU (``run_wait_s``, from ``schedstat``); None: unreadable."""

    cpu_s: float | None
    peak_rss_mb: float | None
    rss_mb: float | None
    read_bytes: int | None
    written_bytes: int | None
    run_wait_s: float | None = None


def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return None


def sample(pid: int) -> ProcSample:
    """Read ``pid``'s figures now (fields None when the process is gone or not readable)."""
    stat = _read(f"/proc/{pid}/stat")
    cpu = None
    if stat is not None:
        fields = stat[stat.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)
    status = _read(f"/proc/{pid}/status") or ""
    memory = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in status.splitlines()
              if line.startswith(("VmHWM:", "VmRSS:"))}
    io = _read(f"/proc/{pid}/io") or ""
    counters = {line.split(":")[0]: int(line.split()[1]) for line in io.splitlines() if line.startswith(("rchar:", "wchar:"))}
    return ProcSample(cpu_s=cpu, peak_rss_mb=memory.get("VmHWM"), rss_mb=memory.get("VmRSS"),
                      read_bytes=counters.get("rchar"), written_bytes=counters.get("wchar"), run_wait_s=_run_wait_s(pid))


def _run_wait_s(pid: int) -> float | None:
    """Seconds every thread of ``pid`` spent runnable on a run queue, not running (sum of /proc/<pid>/task/*/schedstat)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total, seen = 0, False
    for task in tasks:
        text = _read(f"/proc/{pid}/task/{task}/schedstat")
        if text is not None and len(text.split()) >= 2:
            total += int(text.split()[1])
            seen = True
    return total / 1e9 if seen else None


def machine_busy_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot from /proc/stat; None when unreadable."""
    text = _read("/proc/stat")
    if text is None:
        return None
    values = [int(v) for v in text.splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user/nice
    return total - idle, total


def difference(before: int | float | None, after: int | float | None) -> float | None:
    """``after - before``, None when either is unknown."""
    return None if before is None or after is None else float(after - before)


class LastSamples:
    """Samples ``pids`` (name -> pid) every ``interval_s`` in a thread and keeps each one's last complete reading,
    so a process that exits before the end (an agent done with its rounds) still has its CPU and peak RSS."""

    def __init__(self, pids: Mapping[str, int], *, interval_s: float = 0.5) -> None:
        self._pids = dict(pids)
        self._interval_s = interval_s
        self._last: dict[str, ProcSample] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="proc-sampler", daemon=True)
        self._thread.start()

    def _take(self) -> None:
        for name, pid in self._pids.items():
            reading = sample(pid)
            if reading.cpu_s is not None and reading.peak_rss_mb is not None:
                with self._lock:
                    self._last[name] = reading

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._take()

    def finish(self) -> dict[str, ProcSample]:
        """Stop, take a last reading, and return the last complete one of each process (a partial one if never)."""
        self._stop.set()
        self._thread.join()
        self._take()
        with self._lock:
            return {name: self._last.get(name) or sample(pid) for name, pid in self._pids.items()}
