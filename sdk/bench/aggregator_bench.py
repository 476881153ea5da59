"""Regional aggregator throughput and memory: fedge's streaming durable path vs keeping every delta.

``N`` sealed updates from ``N`` distinct device keys are prepared in advance
(not timed) and written to one file. Each path then runs in its own fresh
subprocess, reading the updates one at a time from that file (as they would
arrive from the broker), and reports updates/s and its peak RSS (``VmHWM``):

- ``streaming``: :class:`~sdk.aggregator.RegionalAggregator` on a SQLite
  file (WAL, ``synchronous=FULL``): per update open + validate + fold + commit,
  then ``close_round``.
- ``naive``: ``open_update`` + :class:`UpdateValidator` per update, every
  decoded delta kept in a Python list, the sample-weighted mean computed at the end.
- ``memory``: the same open + validate, folded into a
  :class:`~sdk.aggregation.StreamingWeightedMean` with no store; the gap to
  ``streaming`` is the cost of durability, the gap to ``naive`` the cost of the math.

Paths alternate (streaming, naive, memory, streaming, ...) and medians are
reported. Each child writes the mean it produced; the parent checks every path
against a float64 reference computed independently, so the comparison is honest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

PATHS = ("streaming", "naive", "memory")
FLEET = "bench"
REGION = "eu"
BUNDLE_VERSION = 1
DELTA_SCALE = 0.01

# A small MLP's shared layers: 99,978 parameters.
SPEC_100K: dict[str, tuple[int, ...]] = {
    "base.0.weight": (256, 256),
    "base.0.bias": (256,),
    "base.1.weight": (128, 256),
    "base.1.bias": (128,),
    "head.weight": (10, 128),
    "head.bias": (10,),
}

_CHILD_PRELUDE = textwrap.dedent(
    """
    import hashlib, json, sys, time
    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from device_agent.protocol.envelope import open_update
    from device_agent.protocol.validation import UpdateValidator
    cfg = json.loads(sys.argv[1])
    def seed(label):
        return hashlib.sha256(f"fedge-bench:{label}".encode()).digest()
    from sdk.bench.process_memory import status_mb
    spec = {name: (tuple(shape), "float32") for name, shape in cfg["spec"].items()}
    devices = {d: Ed25519PrivateKey.from_private_bytes(seed("ed25519:" + d)).public_key() for d in cfg["devices"]}
    region_key = X25519PrivateKey.from_private_bytes(seed("x25519:" + cfg["region"]))
    index = cfg["index"]
    blobs = open(cfg["blobs"], "rb")
    def next_blob(i):
        blobs.seek(index[i][0])
        return blobs.read(index[i][1])
    rss_before_mb = status_mb("VmRSS")
    def report(mean, loop_s, finish_s):
        np.savez(cfg["mean_out"], **mean)
        n = len(index)
        print(json.dumps({"updates_per_s": n / (loop_s + finish_s), "loop_s": loop_s, "finish_s": finish_s,
                          "peak_rss_mb": status_mb("VmHWM"), "rss_before_mb": rss_before_mb}))
    """
)

_OPEN_VALIDATE = textwrap.dedent(
    """
    validator = UpdateValidator(params=spec, max_norm=cfg["norm_bound"], fleet=cfg["fleet"], region=cfg["region"],
                                bundle_version=cfg["bundle_version"])
    limits_total = sum(8 * int(np.prod(s)) for s, _ in spec.values())
    from device_agent.protocol.tensor_codec import DecodeLimits
    limits = DecodeLimits(max_tensors=2 * len(spec) + 8, max_total_bytes=2 * limits_total + 4096)
    def open_valid(i):
        opened = open_update(next_blob(i), recipient_key=region_key, sender_public_key=devices, limits=limits)
        validator.validate(opened, current_round=0)
        return opened
    """
)

STREAMING_CHILD = _CHILD_PRELUDE + textwrap.dedent(
    """
    from sdk.aggregator import RegionalAggregator, RegionalConfig, RoundPolicy, Verdict
    from sdk.aggregation.influence import InfluencePolicy
    config = RegionalConfig(
        fleet=cfg["fleet"], region=cfg["region"], encryption_key=region_key,
        signing_key=Ed25519PrivateKey.from_private_bytes(seed("ed25519:" + cfg["region"])),
        device_keys=devices,
        root_verify_key=Ed25519PrivateKey.from_private_bytes(seed("ed25519:root")).public_key(),
        root_encryption_key=X25519PrivateKey.from_private_bytes(seed("x25519:root")).public_key(),
        spec=spec, bundle_version=cfg["bundle_version"],
        policy=RoundPolicy(quorum=len(index), deadline_s=86400.0), norm_bound=cfg["norm_bound"],
        # Fixed bounds that do not bind (same clipping work as the default), so the mean matches the plain reference.
        influence=InfluencePolicy(norm="fixed", norm_bound=cfg["norm_bound"], weight="fixed", max_sample_count=1_000_000),
    )
    agg = RegionalAggregator.open(cfg["db"], config)
    agg.start_round(0, {name: np.zeros(shape, dtype=np.float32) for name, (shape, _) in spec.items()})
    rss_before_mb = status_mb("VmRSS")
    t0 = time.perf_counter()
    for i in range(len(index)):
        handled = agg.handle_update(next_blob(i))
        if handled.verdict is not Verdict.ACCEPTED:
            raise SystemExit(f"update {i} not accepted: {handled.reason}")
    t1 = time.perf_counter()
    aggregate = agg.close_round()
    t2 = time.perf_counter()
    agg.close()
    report(aggregate.mean_delta, t1 - t0, t2 - t1)
    """
)

NAIVE_CHILD = _CHILD_PRELUDE + _OPEN_VALIDATE + textwrap.dedent(
    """
    rss_before_mb = status_mb("VmRSS")
    t0 = time.perf_counter()
    kept = []
    for i in range(len(index)):
        opened = open_valid(i)
        kept.append((opened.tensors, opened.header.sample_count))
    t1 = time.perf_counter()
    total = float(sum(n for _, n in kept))
    mean = {name: (sum(n * t[name].astype(np.float64) for t, n in kept) / total).astype(np.float32) for name in spec}
    t2 = time.perf_counter()
    report(mean, t1 - t0, t2 - t1)
    """
)

MEMORY_CHILD = _CHILD_PRELUDE + _OPEN_VALIDATE + textwrap.dedent(
    """
    from sdk.aggregation import StreamingWeightedMean
    acc = StreamingWeightedMean(expected_shapes={name: shape for name, (shape, _) in spec.items()})
    rss_before_mb = status_mb("VmRSS")
    t0 = time.perf_counter()
    for i in range(len(index)):
        opened = open_valid(i)
        acc.accumulate(opened.tensors, float(opened.header.sample_count))
    t1 = time.perf_counter()
    mean = acc.finalize()
    t2 = time.perf_counter()
    report(mean, t1 - t0, t2 - t1)
    """
)

_CHILDREN = {"streaming": STREAMING_CHILD, "naive": NAIVE_CHILD, "memory": MEMORY_CHILD}


@dataclass(frozen=True, kw_only=True)
class PathFigures:
    """Median figures of one path over the repeats.

    ``updates_per_s``: N / (time to handle every update + time to produce the
    mean). ``finish_s``: the last part alone (``close_round``, or the naive
    mean over the kept list). ``rss_before_mb``: RSS once imports, keys and
    the empty aggregator are in place, before the first update.
    """

    updates_per_s: float
    loop_s: float
    finish_s: float
    peak_rss_mb: float
    rss_before_mb: float


@dataclass(frozen=True, kw_only=True)
class AggregatorBenchRow:
    """One N: each path's median figures, the ratios, and the largest deviation from the reference mean."""

    updates: int
    parameters: int
    update_bytes: int
    repeats: int
    paths: dict[str, PathFigures]
    rss_ratio_naive_streaming: float
    speed_ratio_streaming_naive: float
    max_abs_diff: float


def _seed(label: str) -> bytes:
    return hashlib.sha256(f"fedge-bench:{label}".encode()).digest()


def _device(i: int) -> str:
    return f"{REGION}-dev-{i}"


def _delta(spec: Mapping[str, tuple[int, ...]], i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + i)
    return {name: rng.normal(scale=DELTA_SCALE, size=shape).astype(np.float32) for name, shape in spec.items()}


def _samples(i: int) -> int:
    return 5 + (i * 37) % 200


def _norm_bound(spec: Mapping[str, tuple[int, ...]]) -> float:
    # Generous: a delta of this scale has norm ~ DELTA_SCALE * sqrt(params); the bound is still checked.
    return 10.0 * DELTA_SCALE * math.sqrt(sum(math.prod(s) for s in spec.values())) + 1.0


def prepare_updates(spec: Mapping[str, tuple[int, ...]], count: int, work: Path) -> tuple[Path, list[tuple[int, int]], dict[str, np.ndarray]]:
    """Seal ``count`` updates from ``count`` distinct device keys into one file.

    Returns the file, the (offset, length) of each update, and the sample-weighted
    mean of the deltas computed in float64 (the reference every path must match).
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from device_agent.protocol.envelope import seal_update
    from device_agent.protocol.headers import MessageKind, UpdateHeader

    recipient = X25519PrivateKey.from_private_bytes(_seed(f"x25519:{REGION}")).public_key()
    sums = {name: np.zeros(shape, dtype=np.float64) for name, shape in spec.items()}
    total = 0.0
    index = []
    path = work / "updates.bin"
    with path.open("wb") as fh:
        for i in range(count):
            device, delta, samples = _device(i), _delta(spec, i), _samples(i)
            header = UpdateHeader.create(kind=MessageKind.UPDATE, fleet=FLEET, sender=device, region=REGION, round=0,
                                         bundle_version=BUNDLE_VERSION, sample_count=samples)
            blob = seal_update(header, delta, recipient_public_key=recipient,
                               sender_key=Ed25519PrivateKey.from_private_bytes(_seed(f"ed25519:{device}")))
            index.append((fh.tell(), len(blob)))
            fh.write(blob)
            for name in sums:
                sums[name] += samples * delta[name].astype(np.float64)
            total += samples
    return path, index, {name: (s / total).astype(np.float32) for name, s in sums.items()}


def _run_child(path_name: str, cfg: dict[str, object]) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILDREN[path_name], json.dumps(cfg)], capture_output=True, text=True,
                          env=env, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{path_name} benchmark child failed:\n{proc.stderr[-2000:]}{proc.stdout[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _max_abs_diff(path: Path, reference: Mapping[str, np.ndarray]) -> float:
    with np.load(path) as got:
        if set(got.files) != set(reference):
            raise RuntimeError(f"{path.name}: tensors {sorted(got.files)} != {sorted(reference)}")
        return max(float(np.max(np.abs(got[name].astype(np.float64) - reference[name]))) for name in reference)


def run_aggregator_bench(
    *, updates: tuple[int, ...] = (50, 200), spec: Mapping[str, tuple[int, ...]] = SPEC_100K, repeats: int = 3,
    paths: tuple[str, ...] = PATHS, tolerance: float = 1e-5, progress: Callable[[int], object] | None = None,
) -> list[AggregatorBenchRow]:
    """Measure every path ``repeats`` times per N, alternating, and return median rows.

    ``paths`` must include ``streaming`` and ``naive``; ``memory`` is optional.
    RuntimeError when any path's mean differs from the reference by more than ``tolerance``.
    """
    if not {"streaming", "naive"} <= set(paths) or not set(paths) <= set(PATHS):
        raise ValueError(f"paths must include 'streaming' and 'naive' and be drawn from {PATHS}, got {paths}")
    if repeats < 1 or any(n < 1 for n in updates):
        raise ValueError("repeats and every update count must be >= 1")
    parameters = sum(math.prod(s) for s in spec.values())
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedge-aggbench-") as tmp:
        work = Path(tmp)
        for count in updates:
            blob_path, index, reference = prepare_updates(spec, count, work)
            base = {"spec": {k: list(v) for k, v in spec.items()}, "devices": [_device(i) for i in range(count)], "region": REGION,
                    "fleet": FLEET, "bundle_version": BUNDLE_VERSION, "norm_bound": _norm_bound(spec),
                    "blobs": str(blob_path), "index": index}
            runs: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
            worst = 0.0
            for rep in range(repeats):
                for p in paths:
                    mean_out = work / f"mean-{p}-{count}-{rep}.npz"
                    db = work / f"region-{count}-{rep}.sqlite"
                    runs[p].append(_run_child(p, dict(base, mean_out=str(mean_out), db=str(db))))
                    diff = _max_abs_diff(mean_out, reference)
                    if not diff <= tolerance:
                        raise RuntimeError(f"{p} path with {count} updates: mean differs from the reference by {diff:.3g} > {tolerance}")
                    worst = max(worst, diff)
                    for leftover in work.glob(f"region-{count}-{rep}.sqlite*"):
                        leftover.unlink()
                if progress is not None:
                    progress(1)
            figures = {p: PathFigures(**{k: statistics.median(r[k] for r in rs) for k in
                                         ("updates_per_s", "loop_s", "finish_s", "peak_rss_mb", "rss_before_mb")})
                       for p, rs in runs.items()}
            rows.append(AggregatorBenchRow(
                updates=count, parameters=parameters, update_bytes=int(statistics.median(n for _, n in index)), repeats=repeats,
                paths=figures, rss_ratio_naive_streaming=figures["naive"].peak_rss_mb / figures["streaming"].peak_rss_mb,
                speed_ratio_streaming_naive=figures["streaming"].updates_per_s / figures["naive"].updates_per_s, max_abs_diff=worst,
            ))
            blob_path.unlink()
    return rows


def format_table(rows: list[AggregatorBenchRow]) -> str:
    """A plain-text table: one line per (N, path), then the ratios per N."""
    head = f"{'N':>5s} {'path':10s} {'updates/s':>10s} {'finish s':>9s} {'peak RSS MB':>12s} {'RSS at start MB':>16s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        for p, f in r.paths.items():
            lines.append(f"{r.updates:5d} {p:10s} {f.updates_per_s:10.1f} {f.finish_s:9.3f} {f.peak_rss_mb:12.1f} {f.rss_before_mb:16.1f}")
        lines.append(f"{'':5s} RSS ratio naive/streaming {r.rss_ratio_naive_streaming:.2f}x, speed streaming/naive "
                     f"{r.speed_ratio_streaming_naive:.2f}x, max |mean - reference| {r.max_abs_diff:.2g}")
    return "\n".join(lines)


def write_json(rows: list[AggregatorBenchRow], path: Path) -> None:
    """Write rows plus machine info as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "aggregator",
           "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
           "rows": [asdict(r) for r in rows]}
    path.write_text(json.dumps(doc, indent=2))
