#!/usr/bin/env python3
"""Turn a stream of labelled sensor samples into the windows file the fedge agent trains on.

A Pi's sensors (an IMU, a Sense HAT) produce samples at a fixed rate; the agent
trains on fixed-size windows of them, re-reading ``data.path`` every round. This
adapter sits in between: it reads samples from a text stream (a file, or a FIFO
another process writes to), cuts sliding windows, keeps the newest ``--keep`` of
them, and rewrites the ``.npz`` (arrays ``x``, ``y``) atomically every
``--flush-every`` windows, so the agent never sees a half-written file.

Input, one sample per line: ``label,v1,v2,...,vC`` (C = ``--channels``); the
label is an integer class, or ``-`` when unknown (windows touching an unlabelled
sample are dropped: training needs labels). Lines starting with ``#`` are
comments. A bad line (wrong field count, not a number, not finite) is rejected,
counted by reason and logged in one line; the stream goes on.

    mkfifo /run/fedge/imu.fifo
    python3 sensor_windows.py --input /run/fedge/imu.fifo --follow --out /var/lib/fedge/data/local.npz

Where real hardware plugs in: anything that yields :class:`Sample` works as the
source (see :func:`sense_hat_samples`); the text stream keeps this testable
without hardware. Prints one JSON summary when the input ends. Exit 0 ok,
1 failure, 2 usage or input error.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_agent.data import collect_windows

logger = logging.getLogger("fedge.sensor_windows")


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One reading of every channel at one instant; ``label`` None when unknown."""

    values: tuple[float, ...]
    label: int | None


@dataclass
class Rejections:
    """Lines refused so far, by reason (each also logged once, with its line number)."""

    counts: dict[str, int] = field(default_factory=collections.Counter)

    def reject(self, line_number: int, reason: str, line: str) -> None:
        self.counts[reason] += 1
        logger.warning("line %d rejected (%s): %.80r", line_number, reason, line)


def parse_samples(lines: Iterable[str], *, channels: int, rejections: Rejections) -> Iterator[Sample]:
    """Samples from ``label,v1..vC`` lines; bad lines go to ``rejections`` and are skipped."""
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(",")
        if len(fields) != channels + 1:
            rejections.reject(number, "field_count", line)
            continue
        label_text = fields[0].strip()
        try:
            label = None if label_text == "-" else int(label_text)
            values = tuple(float(v) for v in fields[1:])
        except ValueError:
            rejections.reject(number, "not_a_number", line)
            continue
        if not all(math.isfinite(v) for v in values):
            rejections.reject(number, "not_finite", line)
            continue
        yield Sample(values=values, label=label)


def sliding_windows(samples: Iterable[Sample], *, size: int, stride: int) -> Iterator[tuple[np.ndarray, int]]:
    """(window of shape (channels, size), label) every ``stride`` samples; windows with mixed or unknown labels are skipped."""
    if size < 1 or stride < 1:
        raise ValueError("size and stride must be >= 1")
    buffer: collections.deque[Sample] = collections.deque(maxlen=size)
    since_last = 0
    for sample in samples:
        buffer.append(sample)
        since_last += 1
        if len(buffer) < size or since_last < stride:
            continue
        since_last = 0
        labels = {s.label for s in buffer}
        if len(labels) != 1 or None in labels:
            continue
        window = np.array([s.values for s in buffer], dtype=np.float32).T
        yield window, int(buffer[0].label)  # type: ignore[arg-type]


def write_npz_atomically(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write ``x``, ``y`` to ``path`` via a temporary file, fsync and rename: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, x=x, y=y)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True, kw_only=True)
class StreamSummary:
    """What a run did: windows cut, windows in the file, files written."""

    windows: int
    kept: int
    writes: int


def stream_to_file(windows: Iterator[tuple[np.ndarray, int]], *, out: Path, keep: int, flush_every: int,
                   flatten: bool = False) -> StreamSummary:
    """Drain ``windows`` in chunks of ``flush_every`` (``collect_windows``), keep the newest ``keep``, rewrite ``out`` after each chunk."""
    if keep < 1 or flush_every < 1:
        raise ValueError("keep and flush_every must be >= 1")
    kept: collections.deque[tuple[np.ndarray, int]] = collections.deque(maxlen=keep)
    total = writes = 0
    while pending := list(itertools.islice(windows, flush_every)):
        chunk = collect_windows(pending, max_windows=flush_every)  # one shape for all, stacked
        kept.extend(zip(chunk.x, chunk.y.tolist()))
        total += len(chunk)
        x = np.stack([w for w, _ in kept])
        write_npz_atomically(out, x.reshape(len(x), -1) if flatten else x, np.array([label for _, label in kept], dtype=np.int64))
        writes += 1
        logger.info("wrote %d windows to %s (%d cut so far)", len(kept), out, total)
    return StreamSummary(windows=total, kept=len(kept), writes=writes)


def text_lines(path: Path, *, follow: bool, stop: Callable[[], bool] = lambda: False) -> Iterator[str]:
    """Lines of ``path``; with ``follow``, reopen it whenever the writer closes it (a FIFO) until ``stop()``."""
    while True:
        with open(path, encoding="utf-8", errors="replace") as fh:
            yield from fh
        if not follow or stop():
            return
        time.sleep(0.1)


def sense_hat_samples(*, label: int, rate_hz: float = 50.0) -> Iterator[Sample]:  # pragma: no cover - needs the hardware
    """Accelerometer + gyroscope of a Raspberry Pi Sense HAT as 6-channel samples, all labelled ``label``.

    The plug-in point for real hardware (NOT tested here: it needs the board and the
    ``sense-hat`` package). Any IMU reader that yields :class:`Sample` works the same way;
    feed it to :func:`sliding_windows` instead of :func:`parse_samples`.
    """
    from sense_hat import SenseHat  # imported here: only a Pi with the board has it

    hat = SenseHat()
    period = 1.0 / rate_hz
    next_at = time.monotonic()
    while True:
        acc, gyro = hat.get_accelerometer_raw(), hat.get_gyroscope_raw()
        yield Sample(values=(acc["x"], acc["y"], acc["z"], gyro["x"], gyro["y"], gyro["z"]), label=label)
        next_at += period
        time.sleep(max(0.0, next_at - time.monotonic()))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="text file or FIFO of 'label,v1,...,vC' lines")
    parser.add_argument("--out", type=Path, required=True, help="the .npz the agent's data.path names")
    parser.add_argument("--channels", type=int, default=6, help="values per sample")
    parser.add_argument("--window", type=int, default=100, help="samples per window")
    parser.add_argument("--stride", type=int, default=50, help="samples between window starts")
    parser.add_argument("--keep", type=int, default=1024, help="newest windows kept in the file (bounds RAM and flash)")
    parser.add_argument("--flush-every", type=int, default=64, help="rewrite the file after this many new windows")
    parser.add_argument("--flatten", action="store_true", help="store windows as channels*window vectors (for MLP bundles)")
    parser.add_argument("--follow", action="store_true", help="keep reading: reopen the input when its writer closes it")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 1), format="%(levelname)s %(name)s: %(message)s")
    for name in ("channels", "window", "stride", "keep", "flush_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    rejections = Rejections()
    try:
        samples = parse_samples(text_lines(args.input, follow=args.follow), channels=args.channels, rejections=rejections)
        summary = stream_to_file(sliding_windows(samples, size=args.window, stride=args.stride), out=args.out,
                                 keep=args.keep, flush_every=args.flush_every, flatten=args.flatten)
    except OSError as exc:
        print(f"sensor_windows: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    result = {"out": str(args.out), "windows": summary.windows, "kept": summary.kept, "writes": summary.writes,
              "rejected": dict(rejections.counts)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
