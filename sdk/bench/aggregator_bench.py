"""Regional aggregator throughput: the durable intake (group commit) vs in memory, one member vs two, per-part costs.

``N`` sealed updates from ``N`` distinct device keys are prepared in advance
(not timed) and written to one file. Each path then runs in its own fresh
subprocess (:mod:`sdk.bench.aggregator_children`), reading the updates from
that file as they would arrive from the broker, and reports updates/s and its
peak RSS (``VmHWM``):

- ``durable``: :class:`~sdk.aggregator.RegionalAggregator` on a SQLite file
  (WAL, ``synchronous=FULL``), updates handed over in batches of ``batch``
  (what the service's queue does under load): open + validate + fold a batch,
  one commit, then the batch's signed receipts; then ``close_round``.
- ``unbatched``: the same with batches of one (a commit per update: the intake before group commit).
- ``memory``: ``open_update`` + :class:`UpdateValidator`, folded into a
  :class:`~sdk.aggregation.StreamingWeightedMean`, no store, no digest, no receipt.
  ``durable`` / ``memory`` is the price of durability and exactly-once, and of taking updates a batch at a time.
- ``memory-batched``: ``memory`` fed as ``durable`` is, a batch of ``batch`` received updates at a time (the
  service's queue holds them until their batch is handled), then each opened, validated and folded.
  ``durable`` / ``memory-batched`` is the price of the store and the receipts alone: the two differ only
  in them, while ``memory`` also reads each update just before it opens it (its bytes still in the CPU's caches).
- ``naive``: the same open + validate, every decoded delta kept in a list, the mean at the end (memory grows with N).
- ``members``: two ``durable`` processes, members of ONE region sharing its
  store, each taking every other update, started together; the round is
  closed by one of them (merging both partial sums). ``members`` / ``durable``
  is the scaling of a region over two cores.

Every path runs once per frame version in ``frames`` (default both: the same
deltas and headers sealed in version 1 and in version 2, prehashed), alternating
inside each repeat, so the two envelopes are compared side by side in one run.

A ``parts`` child times each stage of the intake on the same updates (header
parse, the version-2 prehash, Ed25519, X25519 + HKDF, ChaCha20-Poly1305, decode,
digest, validation, bounds + fold, receipt signing: ``PARTS``); the durable child adds the COMMIT
time per update. Every child also reports its CPU time and its run-queue wait
(``/proc/self/schedstat``: runnable, waiting for a CPU another process held),
so the machine's load can be told apart from fedge's own waits (COMMIT, and
another member's write lock). Paths alternate (durable,
memory, ..., durable, ...) and medians are reported. Every path's mean is
checked against a float64 reference computed independently while sealing.
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
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sdk.bench.aggregator_children import MEMBER, PART_NAMES, SCRIPTS

PATHS = ("durable", "memory", "memory-batched", "naive", "unbatched", "members")
REQUIRED_PATHS = ("durable", "memory")
PARTS = PART_NAMES
FLOOR_PARTS = ("prehash", "ed25519", "x25519_hkdf", "chacha20", "decode", "validate", "bounds_fold")
"""The parts no intake can skip: authenticate (the prehash and Ed25519), decrypt, decode, check finiteness + norm, fold
(issue 12's floor, plus the key agreement every sealed message needs). Above it: parsing, the content digest, the
receipt, the store."""
FRAMES = (1, 2)
FLOOR_MS = 0.6
"""The unavoidable work per update at 100k parameters on one core, as estimated in issue 12."""
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

@dataclass(frozen=True, kw_only=True)
class PathFigures:
    """Median figures of one path over the repeats.

    ``updates_per_s``: N / (time to handle every update + time to produce the
    mean). ``finish_s``: the last part alone (``close_round``, or the naive
    mean over the kept list). ``rss_before_mb``: RSS once imports, keys and
    the empty aggregator are in place, before the first update.
    ``commit_ms``: COMMIT time per update (durable paths; None elsewhere).
    ``cpu_ms``: CPU time per update over the loop (every member's, summed): the cost
    whatever else shares the machine (None for a path that does not report it).
    ``runq_ms``: time per update the path's process(es) were runnable but waited for a CPU
    (Linux ``/proc/self/schedstat``; every member's, summed): the machine's load, not fedge's work.
    ``lock_ms``: time per update spent waiting for another member's write lock (durable paths).
    ``unqueued_loop_s``: ``loop_s`` with the run-queue wait taken out (members: the longest
    member's own loop minus its wait, as if both had started at once): the loop on CPUs nobody else wanted.
    """

    updates_per_s: float
    loop_s: float
    finish_s: float
    peak_rss_mb: float
    rss_before_mb: float
    commit_ms: float | None = None
    cpu_ms: float | None = None
    runq_ms: float | None = None
    lock_ms: float | None = None
    unqueued_loop_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class AggregatorBenchRow:
    """One N and frame version: each path's median figures, the per-part costs (ms per update), the ratios (None when a path
    was not run), and the largest deviation from the reference mean. ``members_vs_durable_unqueued``: the
    members ratio from the loops with each process's run-queue wait taken out (what two free cores would give);
    ``members_vs_durable_runs``: the wall-clock ratio of each repeat (its spread)."""

    updates: int
    frame: int
    parameters: int
    update_bytes: int
    repeats: int
    batch: int
    paths: dict[str, PathFigures]
    parts_ms: dict[str, float]
    durable_vs_memory: float
    durable_vs_memory_batched: float | None
    members_vs_durable: float | None
    members_vs_durable_unqueued: float | None
    members_vs_durable_runs: list[float] | None
    durable_vs_unbatched: float | None
    rss_ratio_naive_durable: float | None
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


def prepare_updates(spec: Mapping[str, tuple[int, ...]], count: int, work: Path,
                    frame: int = 1) -> tuple[Path, list[tuple[int, int]], dict[str, np.ndarray]]:
    """Seal ``count`` updates from ``count`` distinct device keys into one file, in frame version ``frame``.

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
    path = work / f"updates-v{frame}.bin"
    with path.open("wb") as fh:
        for i in range(count):
            device, delta, samples = _device(i), _delta(spec, i), _samples(i)
            header = UpdateHeader.create(kind=MessageKind.UPDATE, fleet=FLEET, sender=device, region=REGION, round=0,
                                         bundle_version=BUNDLE_VERSION, sample_count=samples)
            blob = seal_update(header, delta, recipient_public_key=recipient, frame_version=frame,
                               sender_key=Ed25519PrivateKey.from_private_bytes(_seed(f"ed25519:{device}")))
            index.append((fh.tell(), len(blob)))
            fh.write(blob)
            for name in sums:
                sums[name] += samples * delta[name].astype(np.float64)
            total += samples
    return path, index, {name: (s / total).astype(np.float32) for name, s in sums.items()}


def _child_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _run_child(script: str, cfg: Mapping[str, object]) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", SCRIPTS[script], json.dumps(cfg)], capture_output=True, text=True,
                          env=_child_env(), timeout=900, check=False, start_new_session=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} benchmark child failed:\n{proc.stderr[-2000:]}{proc.stdout[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_members(cfg: Mapping[str, object], members: int = 2) -> dict[str, float]:
    """``members`` processes of one region on one store, started together; the first closes the round."""
    procs = [subprocess.Popen([sys.executable, "-c", MEMBER, json.dumps(dict(cfg, members=members, share=k, member=f"m{k}"))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(),
                              start_new_session=True)
             for k in range(members)]
    try:
        lines = [_line(p) for p in procs]  # ready
        for p in procs:
            _send(p, "go")
        timings = [_line(p) for p in procs]
        for k, p in enumerate(procs):
            _send(p, "close" if k == 0 else "exit")
        closed = _line(procs[0])
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    del lines
    start = min(t["t0"] for t in timings)
    loop_s = max(t["t1"] for t in timings) - start
    count = len(cfg["index"])  # type: ignore[arg-type]
    return dict(closed, loop_s=loop_s, updates_per_s=count / (loop_s + closed["finish_s"]),
                unqueued_loop_s=max(t["t1"] - t["t0"] - t["runq_s"] for t in timings),  # start skew is queueing too
                **{key: sum(t[key] for t in timings) for key in ("commit_s", "cpu_s", "runq_s", "lock_s")})


def _line(proc: subprocess.Popen[str]) -> dict[str, float]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        stderr = proc.stderr.read() if proc.stderr is not None else ""
        raise RuntimeError(f"members benchmark child failed:\n{stderr[-2000:]}")
    return json.loads(line)


def _send(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(word + "\n")
    proc.stdin.flush()


def _max_abs_diff(path: Path, reference: Mapping[str, np.ndarray]) -> float:
    with np.load(path) as got:
        if set(got.files) != set(reference):
            raise RuntimeError(f"{path.name}: tensors {sorted(got.files)} != {sorted(reference)}")
        return max(float(np.max(np.abs(got[name].astype(np.float64) - reference[name]))) for name in reference)


def run_aggregator_bench(
    *, updates: tuple[int, ...] = (400,), spec: Mapping[str, tuple[int, ...]] = SPEC_100K, repeats: int = 3,
    paths: tuple[str, ...] = PATHS, batch: int = 32, tolerance: float = 1e-5, progress: Callable[[int], object] | None = None,
    frames: tuple[int, ...] = FRAMES,
) -> list[AggregatorBenchRow]:
    """Measure every path (and the per-part costs) ``repeats`` times per N and frame version, alternating, and
    return median rows (one per N and frame version).

    ``paths`` must include ``durable`` and ``memory``. RuntimeError when any path's mean differs from the
    reference by more than ``tolerance``.
    """
    if not set(REQUIRED_PATHS) <= set(paths) or not set(paths) <= set(PATHS):
        raise ValueError(f"paths must include {REQUIRED_PATHS} and be drawn from {PATHS}, got {paths}")
    if not frames or not set(frames) <= set(FRAMES) or len(set(frames)) != len(frames):
        raise ValueError(f"frames must be distinct values from {FRAMES}, got {frames}")
    if repeats < 1 or batch < 1 or any(n < 1 for n in updates):
        raise ValueError("repeats, batch and every update count must be >= 1")
    parameters = sum(math.prod(s) for s in spec.values())
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedge-aggbench-") as tmp:
        work = Path(tmp)
        for count in updates:
            prepared = {frame: prepare_updates(spec, count, work, frame) for frame in frames}
            bases = {frame: {"spec": {k: list(v) for k, v in spec.items()}, "devices": [_device(i) for i in range(count)],
                             "region": REGION, "fleet": FLEET, "bundle_version": BUNDLE_VERSION, "norm_bound": _norm_bound(spec),
                             "blobs": str(blob_path), "index": index, "batch": batch}
                     for frame, (blob_path, index, _) in prepared.items()}
            runs: dict[int, dict[str, list[dict[str, float]]]] = {frame: {p: [] for p in paths} for frame in frames}
            parts: dict[int, list[dict[str, float]]] = {frame: [] for frame in frames}
            worst = dict.fromkeys(frames, 0.0)
            for rep in range(repeats):
                for p in paths:
                    for frame in frames:  # the two envelopes back to back: the same load for both
                        mean_out = work / f"mean-{p}-{count}-{rep}-v{frame}.npz"
                        cfg = dict(bases[frame], mean_out=str(mean_out), db=str(work / f"region-{count}-{rep}.sqlite"))
                        if p == "unbatched":
                            cfg["batch"] = 1
                        if p == "memory-batched":
                            cfg["received"] = batch  # the durable path's batches, received before any is opened
                        runs[frame][p].append(_run_members(cfg) if p == "members" else _run_child(p, cfg))
                        diff = _max_abs_diff(mean_out, prepared[frame][2])
                        if not diff <= tolerance:
                            raise RuntimeError(f"{p} path with {count} updates (frame version {frame}): mean differs from the "
                                               f"reference by {diff:.3g} > {tolerance}")
                        worst[frame] = max(worst[frame], diff)
                        for leftover in work.glob(f"region-{count}-{rep}.sqlite*"):
                            leftover.unlink()
                for frame in frames:
                    parts[frame].append(_run_child("parts", dict(bases[frame], mean_out="", part_names=list(PARTS))))
                if progress is not None:
                    progress(1)
            for frame in frames:
                rows.append(_row(count, frame, parameters, prepared[frame][1], repeats, batch, runs[frame], parts[frame],
                                 worst[frame]))
                prepared[frame][0].unlink()
    return rows


def _row(count: int, frame: int, parameters: int, index: list[tuple[int, int]], repeats: int, batch: int,
         runs: dict[str, list[dict[str, float]]], parts: list[dict[str, float]], worst: float) -> AggregatorBenchRow:
    def median(rs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rs)

    def per_update_ms(rs: list[dict[str, float]], key: str) -> float | None:
        return 1000 * median(rs, key) / count if key in rs[0] else None

    for rs in runs.values():
        for r in rs:
            r.setdefault("unqueued_loop_s", r["loop_s"] - r.get("runq_s", 0.0))
    figures = {p: PathFigures(**{k: median(rs, k) for k in ("updates_per_s", "loop_s", "finish_s", "peak_rss_mb", "rss_before_mb",
                                                           "unqueued_loop_s")},
                              commit_ms=per_update_ms(rs, "commit_s"), cpu_ms=per_update_ms(rs, "cpu_s"),
                              runq_ms=per_update_ms(rs, "runq_s"), lock_ms=per_update_ms(rs, "lock_s"))
               for p, rs in runs.items()}

    def ratio(a: str, b: str, key: str = "updates_per_s") -> float | None:
        if a not in figures or b not in figures:
            return None
        return getattr(figures[a], key) / getattr(figures[b], key)

    durable_vs_memory = ratio("durable", "memory")
    assert durable_vs_memory is not None  # both paths are required
    unqueued = None
    if "members" in figures:  # N / (unqueued loop + finish), members over one member
        members, durable = figures["members"], figures["durable"]
        unqueued = (durable.unqueued_loop_s + durable.finish_s) / (members.unqueued_loop_s + members.finish_s)  # type: ignore[operator]
    per_run = None
    if "members" in runs:  # the repeats ran alternately: pair each members run with the durable run of its repeat
        per_run = [m["updates_per_s"] / d["updates_per_s"] for m, d in zip(runs["members"], runs["durable"])]
    return AggregatorBenchRow(
        updates=count, frame=frame, parameters=parameters, update_bytes=int(statistics.median(n for _, n in index)), repeats=repeats,
        batch=batch, paths=figures, parts_ms={name: 1000 * median(parts, name) for name in PARTS},
        durable_vs_memory=durable_vs_memory, durable_vs_memory_batched=ratio("durable", "memory-batched"),
        members_vs_durable=ratio("members", "durable"),
        members_vs_durable_unqueued=unqueued, members_vs_durable_runs=per_run,
        durable_vs_unbatched=ratio("durable", "unbatched"), rss_ratio_naive_durable=ratio("naive", "durable", "peak_rss_mb"),
        max_abs_diff=worst,
    )


def format_table(rows: list[AggregatorBenchRow]) -> str:
    """Plain-text tables: one line per (N, frame version, path) with the ratios, the frame versions side by side,
    then the per-part costs of each frame version beside the floor."""
    head = (f"{'N':>5s} {'frame':5s} {'path':14s} {'updates/s':>10s} {'upd/CPU-s':>10s} {'CPU ms/upd':>11s} {'runq ms/upd':>12s}"
            f" {'lock ms/upd':>12s} {'commit ms/upd':>14s} {'finish s':>9s} {'peak RSS MB':>12s}")
    lines = [head, "-" * len(head)]

    def cell(value: float | None, width: int) -> str:
        return f"{'' if value is None else f'{value:.3f}':>{width}s}"

    def cpu_ms(r: AggregatorBenchRow, path: str = "durable") -> float:
        f = r.paths[path]
        return f.cpu_ms if f.cpu_ms is not None else 1000 / f.updates_per_s

    for r in rows:
        for p, f in r.paths.items():
            per_cpu_s = "" if not f.cpu_ms else f"{1000 / f.cpu_ms:.0f}"
            lines.append(f"{r.updates:5d} {'v' + str(r.frame):5s} {p:14s} {f.updates_per_s:10.1f} {per_cpu_s:>10s} {cell(f.cpu_ms, 11)}"
                         f" {cell(f.runq_ms, 12)} {cell(f.lock_ms, 12)} {cell(f.commit_ms, 14)} {f.finish_s:9.3f} {f.peak_rss_mb:12.1f}")
        extra = [f"durable/memory {r.durable_vs_memory:.2f}x (target >= 0.8)"]
        if r.durable_vs_memory_batched is not None:
            extra.append(f"durable/memory-batched {r.durable_vs_memory_batched:.2f}x (the store and receipts alone)")
        if r.members_vs_durable is not None:
            runs = "/".join(f"{x:.2f}" for x in r.members_vs_durable_runs or [])
            extra.append(f"2 members/1 {r.members_vs_durable:.2f}x (target >= 1.6; per repeat {runs};"
                         f" with the run-queue wait taken out {r.members_vs_durable_unqueued:.2f}x)")
        if r.durable_vs_unbatched is not None:
            extra.append(f"batch {r.batch}/batch 1 {r.durable_vs_unbatched:.2f}x")
        if r.rss_ratio_naive_durable is not None:
            extra.append(f"RSS naive/durable {r.rss_ratio_naive_durable:.2f}x")
        lines.append(f"{'':11s} " + ", ".join(extra) + f", max |mean - reference| {r.max_abs_diff:.2g}")
    by_n: dict[int, list[AggregatorBenchRow]] = {}
    for r in rows:
        by_n.setdefault(r.updates, []).append(r)
    for n, group in by_n.items():
        if len(group) == 2:
            v1, v2 = group
            ratios = ", ".join(f"{p} {v2.paths[p].updates_per_s / v1.paths[p].updates_per_s:.2f}x" for p in v1.paths if p in v2.paths)
            lines += ["", f"N = {n}: frame v{v2.frame} / v{v1.frame} updates/s (same run, alternating): {ratios}; durable CPU ms"
                          f" per update {cpu_ms(v1):.3f} -> {cpu_ms(v2):.3f} ({cpu_ms(v1) / cpu_ms(v2):.2f}x fewer)"]
        lines += ["", f"CPU ms per update, N = {n}, {group[0].parameters:,} parameters, one process (issue 12's floor: ~{FLOOR_MS} ms"
                      " on an idle core; * = floor part):", f"  {'part':14s}" + "".join(f" {'v' + str(r.frame):>8s}" for r in group)]
        for part in PARTS:
            lines.append(f"  {part:14s}" + "".join(f" {r.parts_ms[part]:8.3f}" for r in group) + (" *" if part in FLOOR_PARTS else ""))
        lines.append(f"  {'store + rest':14s}" + "".join(f" {cpu_ms(r) - sum(r.parts_ms.values()):8.3f}" for r in group)
                     + "   (SQL statements and the sum write, dedup reads, copies, Python)")
        lines.append(f"  {'(commit wait)':14s}" + "".join(f" {r.paths['durable'].commit_ms or 0.0:8.3f}" for r in group)
                     + f"   (COMMIT with fsync, batch {group[0].batch}, per update: wall time, mostly I/O)")
        lines.append(f"  {'durable total':14s}" + "".join(f" {cpu_ms(r):8.3f}" for r in group) + "   = "
                     + ", ".join(f"v{r.frame} {1000 / cpu_ms(r):.0f}" for r in group) + " updates/s per free core")
        lines.append(f"  {'floor (*)':14s}" + "".join(f" {sum(r.parts_ms[p] for p in FLOOR_PARTS):8.3f}" for r in group)
                     + "   durable / floor " + ", ".join(f"v{r.frame} {cpu_ms(r) / sum(r.parts_ms[p] for p in FLOOR_PARTS):.2f}x"
                                                         for r in group))
    return "\n".join(lines)


def write_json(rows: list[AggregatorBenchRow], path: Path) -> None:
    """Write rows plus machine info as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "aggregator", "floor_ms": FLOOR_MS,
           "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
           "rows": [asdict(r) for r in rows]}
    path.write_text(json.dumps(doc, indent=2))


def write_png(rows: list[AggregatorBenchRow], path: Path) -> None:
    """Two charts for the last row: updates/s per path, and the durable path's CPU ms per update by part beside the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row = rows[-1]
    fig, (speed, parts) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(row.paths)
    speed.bar(names, [row.paths[p].updates_per_s for p in names], color="tab:blue")
    speed.set_title(f"updates/s, N = {row.updates}, {row.parameters:,} parameters", fontsize=9)
    bottom = 0.0
    durable = row.paths["durable"]
    total = durable.cpu_ms if durable.cpu_ms is not None else 1000 / durable.updates_per_s
    for part, cost in [*row.parts_ms.items(), ("store + rest", max(0.0, total - sum(row.parts_ms.values())))]:
        parts.bar(["durable"], [cost], bottom=bottom, label=part)
        bottom += cost
    parts.axhline(FLOOR_MS, color="grey", linewidth=0.8, linestyle="--", label=f"issue 12 floor ({FLOOR_MS} ms, idle core)")
    parts.set_title("CPU ms per update, by part", fontsize=9)
    parts.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for ax in (speed, parts):
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
