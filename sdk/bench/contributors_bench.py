"""What contributor lists cost one level up: a middle tier taking two children's aggregates that list N devices each.

Per N, two sealed aggregates are prepared (not timed: keys, lists, sealing),
then a fresh :class:`~sdk.aggregator.MiddleAggregator` on a SQLite file
(WAL, ``synchronous=FULL``) takes both (timed: open, validate the list,
``device_overlap`` check and one contributor row per device, fold, commit,
receipt) and closes (timed: merge, the composed list of 2N devices, seal).
The sealed aggregate's size and the composed list's length are checked and
reported. The model is tiny (16 parameters): what is measured is the lists.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device_agent.protocol.envelope import seal_update
from device_agent.protocol.headers import MessageKind, UpdateHeader
from sdk.aggregator import MiddleAggregator, MiddleConfig, RoundPolicy
from sdk.aggregator.contributors import CONTRIBUTORS_TENSOR, encode_contributors

_FLEET = "bench"
_SPEC = {"w": ((4, 3), "float32"), "b": ((4,), "float32")}
_CHILDREN = ("cell-a", "cell-b")


@dataclass(frozen=True, kw_only=True)
class ContributorsRow:
    """One N: the list's size, the middle tier's time per aggregate and for its close, the sealed aggregate's size."""

    devices_per_child: int
    list_mb: float
    intake_ms: float
    close_ms: float
    sealed_mb: float


def _aggregate(child: str, key: Ed25519PrivateKey, recipient: X25519PrivateKey, devices: int) -> tuple[bytes, int]:
    entries = [(f"{child}-device-{i:07d}", 3) for i in range(devices)]
    tensors = {name: np.full(shape, 0.01, np.float32) for name, (shape, _) in _SPEC.items()}
    tensors[CONTRIBUTORS_TENSOR] = encode_contributors(entries)
    header = UpdateHeader.create(kind=MessageKind.AGGREGATE, fleet=_FLEET, sender=child, region=child, round=0,
                                 bundle_version=1, sample_count=3 * devices)
    return seal_update(header, tensors, recipient_public_key=recipient.public_key(), sender_key=key), \
        int(tensors[CONTRIBUTORS_TENSOR].size)


def measure(devices: int, directory: Path) -> ContributorsRow:
    """One middle tier, two children of ``devices`` devices each (see the module docstring)."""
    keys = {child: Ed25519PrivateKey.generate() for child in _CHILDREN}
    parent, encryption = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    config = MiddleConfig(fleet=_FLEET, region="mid", encryption_key=encryption, signing_key=Ed25519PrivateKey.generate(),
                          device_keys={c: k.public_key() for c, k in keys.items()},
                          root_verify_key=Ed25519PrivateKey.generate().public_key(),
                          root_encryption_key=parent.public_key(), spec=_SPEC, bundle_version=1,
                          policy=RoundPolicy(quorum=len(_CHILDREN), deadline_s=600.0))
    prepared = [(child, *_aggregate(child, keys[child], encryption, devices)) for child in _CHILDREN]
    with MiddleAggregator.open(directory / f"mid-{devices}.sqlite", config) as middle:
        middle.start_round(0, {name: np.zeros(shape, np.float32) for name, (shape, _) in _SPEC.items()})
        start = time.perf_counter()
        for child, blob, _ in prepared:
            handled = middle.handle_aggregate(blob, topic_child=child)
            if not handled.accepted:
                raise RuntimeError(f"the middle tier refused {child}'s aggregate: {handled.reason}")
        intake = (time.perf_counter() - start) / len(prepared)
        start = time.perf_counter()
        closed = middle.close_round()
        close = time.perf_counter() - start
    if closed.blob is None or closed.sample_count != 3 * devices * len(_CHILDREN):
        raise RuntimeError("the middle tier's aggregate does not count every device")
    return ContributorsRow(devices_per_child=devices, list_mb=prepared[0][2] / 1e6, intake_ms=intake * 1e3,
                           close_ms=close * 1e3, sealed_mb=len(closed.blob) / 1e6)


def run_contributors_bench(devices: tuple[int, ...], *, progress: Callable[[int], None] | None = None) -> list[ContributorsRow]:
    """One row per entry of ``devices`` (devices per child), each on a fresh store in a temporary directory."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedge-contributors-") as scratch:
        for n in devices:
            rows.append(measure(n, Path(scratch)))
            if progress is not None:
                progress(1)
    return rows


def format_table(rows: list[ContributorsRow]) -> str:
    """A plain-text table, one line per N."""
    head = f"{'devices/child':>13s} {'list MB':>8s} {'intake ms/aggregate':>20s} {'close+seal ms':>14s} {'sealed MB':>10s}"
    lines = [head, "-" * len(head)]
    lines += [f"{r.devices_per_child:13d} {r.list_mb:8.2f} {r.intake_ms:20.0f} {r.close_ms:14.0f} {r.sealed_mb:10.2f}"
              for r in rows]
    return "\n".join(lines)


def write_json(rows: list[ContributorsRow], path: Path) -> None:
    """Write rows plus machine info as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "contributors",
           "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
           "rows": [asdict(r) for r in rows]}
    path.write_text(json.dumps(doc, indent=2))
