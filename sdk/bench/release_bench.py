"""What following releases with python-tuf costs a device: installed size, import time, memory, verification time.

Method (STYLE rule 17: a device dependency is measured before it is kept):

- **installed size**: the bytes on disk of every file each distribution's
  RECORD lists (tuf, securesystemslib, urllib3: what ``tuf`` pulls in), next to
  the device's other dependencies for scale;
- **import**: each variant in a fresh subprocess, alternating, median of
  ``repeats``: the agent's core (trainer, connection, protocol) without the
  release stack, then the same plus ``tuf.ngclient`` and ``tuf.api.metadata``;
  wall time of the imports and peak RSS (``VmHWM``) of the process;
- **verification**: a repository with ``releases`` releases is built once;
  a fresh subprocess runs one TUF refresh (root, timestamp, snapshot,
  targets, the rollout role per release) and verifies one bundle of
  ``bundle_kib`` KiB, as a device does between rounds; time and peak RSS.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from sdk.bench.process_memory import status_mb

TUF_STACK = ("tuf", "securesystemslib", "urllib3")
OTHERS = ("numpy", "onnxruntime", "onnxruntime-training-cpu", "paho-mqtt", "cryptography")
_CORE = "import device_agent.trainer, device_agent.daemon.connection, device_agent.protocol.envelope"
_TUF = "import tuf.ngclient, tuf.api.metadata"


@dataclass(frozen=True, kw_only=True)
class ImportRow:
    """One variant's median import seconds and peak RSS (MB) over the repeats."""

    variant: str
    import_s: float
    peak_rss_mb: float


@dataclass(frozen=True, kw_only=True)
class VerifyRow:
    """One refresh + bundle check: releases in the repository, bundle size, seconds and peak RSS (MB)."""

    releases: int
    bundle_kib: int
    seconds: float
    peak_rss_mb: float


def installed_mib(names: tuple[str, ...]) -> dict[str, float | None]:
    """Distribution name -> MiB on disk (None when not installed here)."""
    sizes: dict[str, float | None] = {}
    for name in names:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sizes[name] = None
            continue
        total = 0
        for file in dist.files or ():
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                total += path.stat().st_size
        sizes[name] = total / 2**20
    return sizes


def _child(code: str) -> dict[str, float]:
    script = ("import json, time\nt0 = time.perf_counter()\n" + code +
              "\nfrom sdk.bench.process_memory import status_mb\n"
              "print(json.dumps({'seconds': time.perf_counter() - t0, 'rss': status_mb()}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_imports(repeats: int, progress: Callable[[], None] | None = None) -> list[ImportRow]:
    """The import variants, alternating, medians."""
    variants = {"agent core": _CORE, "agent core + tuf": _CORE + "\n" + _TUF}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, code in variants.items():
            results[name].append(_child(code))
            if progress is not None:
                progress()
    return [ImportRow(variant=name, import_s=statistics.median(r["seconds"] for r in runs),
                      peak_rss_mb=statistics.median(r["rss"] for r in runs)) for name, runs in results.items()]


def measure_verify(*, releases: int, bundle_kib: int, repeats: int, progress: Callable[[], None] | None = None) -> VerifyRow:
    """A repository with ``releases`` releases of a ``bundle_kib`` KiB payload; a device's refresh and check of the newest."""
    from sdk.release.keys import create_release_keys, load_signers
    from sdk.release.repository import ReleaseRepository
    from device_agent.release.release_info import ReleaseInfo, Stage, StageRecord, chunk_digests, release_path

    import hashlib
    import os

    with tempfile.TemporaryDirectory(prefix="fedge-release-bench-") as scratch:
        root = Path(scratch)
        public = create_release_keys(root / "keys")
        signers = {role: load_signers([root / "keys"], role) for role in public}
        repo = ReleaseRepository.create(root / "repo", public_keys=public, signers=signers)
        data = os.urandom(bundle_kib * 1024)
        sha = hashlib.sha256(data).hexdigest()
        for number in range(1, releases + 1):
            info = ReleaseInfo(path=release_path(number), length=len(data), sha256=sha, release=number, bundle_version=number,
                               model_name="bench", fleet="bench", expires_ms=int((time.time() + 3600) * 1000),
                               chunk_size=64 * 1024, chunk_sha256=chunk_digests(data, 64 * 1024))
            repo.add_release(info, data, signers, stage=StageRecord(release=number, stage=Stage.PROMOTED))
        files = repo.published_files()
        (root / "broker").mkdir()
        for name, raw in files.items():
            (root / "broker" / name).write_bytes(raw)
        (root / "bundle.bin").write_bytes(data)
        code = f"""
from pathlib import Path
from device_agent.release.tuf_view import BrokerFetcher, refresh_view
import tempfile
broker = Path({str(root / 'broker')!r})
bundle = Path({str(root / 'bundle.bin')!r}).read_bytes()
fetch = BrokerFetcher(metadata=lambda n: (broker / n).read_bytes() if (broker / n).exists() else None,
                      target=lambda sha: bundle)
with tempfile.TemporaryDirectory() as device:
    view = refresh_view(Path(device) / 'metadata', bootstrap_root=(broker / '1.root.json').read_bytes(), fetcher=fetch)
    view.verify_bundle(view.releases[-1], Path(device) / 'bundle')
"""
        runs = []
        for _ in range(repeats):
            runs.append(_child(code))
            if progress is not None:
                progress()
    return VerifyRow(releases=releases, bundle_kib=bundle_kib, seconds=statistics.median(r["seconds"] for r in runs),
                     peak_rss_mb=statistics.median(r["rss"] for r in runs))


def format_table(sizes: dict[str, float | None], imports: list[ImportRow], verify: list[VerifyRow]) -> str:
    """The three tables as text."""
    lines = ["installed (MiB on disk)"]
    lines += [f"  {name:<26} {'-' if mib is None else f'{mib:6.2f}'}" for name, mib in sizes.items()]
    stack = sum(v for k, v in sizes.items() if k in TUF_STACK and v is not None)
    lines.append(f"  {'tuf stack total':<26} {stack:6.2f}")
    lines.append("import (fresh process, median)")
    lines += [f"  {r.variant:<26} {r.import_s:6.3f} s  peak RSS {r.peak_rss_mb:6.1f} MB" for r in imports]
    if len(imports) == 2:
        lines.append(f"  {'tuf adds':<26} {imports[1].import_s - imports[0].import_s:+6.3f} s  "
                     f"{imports[1].peak_rss_mb - imports[0].peak_rss_mb:+6.1f} MB")
    lines.append("refresh + verify one bundle (fresh process, imports included, median)")
    lines += [f"  {r.releases:3d} releases, {r.bundle_kib:5d} KiB bundle  {r.seconds:6.3f} s  peak RSS {r.peak_rss_mb:6.1f} MB"
              for r in verify]
    return "\n".join(lines)


def write_json(path: Path, sizes: dict[str, float | None], imports: list[ImportRow], verify: list[VerifyRow]) -> None:
    """The results as JSON (``null`` for what is not installed here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"installed_mib": sizes, "imports": [asdict(r) for r in imports],
                                "verify": [asdict(r) for r in verify], "python": sys.version.split()[0],
                                "rss_here_mb": status_mb()}, indent=2) + "\n")
