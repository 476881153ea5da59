"""Which devices a regional aggregate counts: carried inside the sealed aggregate, checked by the root.

A region's aggregate holds, next to the mean delta's tensors, one extra
``uint8`` tensor named ``@contributors``: the canonical JSON of
``[[device_id, weight], ...]`` sorted by device id, where ``weight`` is the
bounded weight the region gave that device (the sum equals the aggregate's
``sample_count``). It travels encrypted to the root like the tensors, so a
broker operator does not learn who contributed. The root keeps, per round,
which region counted which device and refuses a second region's aggregate
that counts a device already counted (``device_overlap``): it cannot take one
device's share out of another region's mean (docs/aggregation.md, "One
device, one region, one count"). Pure functions, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from device_agent.errors import RejectedUpdateError
from device_agent.protocol.envelope import OpenedUpdate
from device_agent.protocol.headers import check_id, check_int
from device_agent.protocol.validation import RejectReason

CONTRIBUTORS_TENSOR = "@contributors"
MAX_CONTRIBUTOR_BYTES = 16 * 1024 * 1024
"""Largest contributor list the root decodes (about 100k devices with long ids)."""

Contributors = tuple[tuple[str, int], ...]


def encode_contributors(entries: Sequence[tuple[str, int]]) -> np.ndarray:
    """The ``@contributors`` tensor for ``(device, weight)`` pairs (sorted here); ValueError for bad or repeated entries."""
    ordered = sorted((str(device), int(weight)) for device, weight in entries)
    for device, weight in ordered:
        check_id("contributor", device)
        check_int("contributor weight", weight, minimum=1)
    if len({device for device, _ in ordered}) != len(ordered):
        raise ValueError("a device appears twice in the contributor list")
    raw = _canonical(ordered)
    return np.frombuffer(raw, dtype=np.uint8).copy()


def split_contributors(opened: OpenedUpdate) -> tuple[OpenedUpdate, Contributors]:
    """The aggregate without its ``@contributors`` tensor, and the parsed list.

    RejectedUpdateError ``missing_tensor`` when the list is absent,
    ``malformed`` when it is not canonical sorted ``[id, weight >= 1]`` pairs
    whose weights sum to the header's ``sample_count``.
    """
    tensors = dict(opened.tensors)
    raw = tensors.pop(CONTRIBUTORS_TENSOR, None)
    if raw is None:
        raise RejectedUpdateError(RejectReason.MISSING_TENSOR.value, f"an aggregate must carry {CONTRIBUTORS_TENSOR}")
    entries = _parse(raw)
    total = sum(weight for _, weight in entries)
    if total != opened.header.sample_count:
        raise RejectedUpdateError("malformed", f"contributor weights sum to {total}, the header says {opened.header.sample_count}")
    stripped = replace(opened, tensors=tensors)
    return stripped, entries


def _parse(raw: np.ndarray) -> Contributors:
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > MAX_CONTRIBUTOR_BYTES:
        raise RejectedUpdateError("malformed", f"{CONTRIBUTORS_TENSOR} must be a 1-D uint8 tensor of at most {MAX_CONTRIBUTOR_BYTES} bytes")
    text = raw.tobytes()
    try:
        data = json.loads(text.decode("ascii"), parse_float=_no_float, parse_constant=_no_float)
        if not isinstance(data, list) or not data:
            raise ValueError("expected a non-empty list")
        entries = []
        for item in data:
            if not isinstance(item, list) or len(item) != 2:
                raise ValueError("each entry must be [device, weight]")
            device, weight = item
            check_id("contributor", device)
            check_int("contributor weight", weight, minimum=1)
            entries.append((device, weight))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RejectedUpdateError("malformed", f"{CONTRIBUTORS_TENSOR}: {exc}") from None
    if any(a[0] >= b[0] for a, b in zip(entries, entries[1:])) or _canonical(entries) != text:
        raise RejectedUpdateError("malformed", f"{CONTRIBUTORS_TENSOR} is not sorted, unique and canonical")
    return tuple(entries)


def _canonical(entries: Sequence[tuple[str, int]]) -> bytes:
    return json.dumps([[device, weight] for device, weight in entries], separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _no_float(text: str) -> object:
    raise ValueError(f"non-integer number {text!r}")
