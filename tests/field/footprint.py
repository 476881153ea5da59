"""Device footprint per training backend: installed size, agent import time, peak RSS and speed while training.

    python -m tests.field.footprint [--json out.json] [--no-emulation]

Uses the test infrastructure (cached device venvs, the firmware overlay, the
emulated Pi), so run it from a checkout with .venv active, as root for the
emulated part. Measures, for the demo's watch model (1D-CNN, FedAlt, AdamW,
188 windows of (6, 100), batch 32, one epoch per phase, 1 thread):

- portable on mainstream onnxruntime and ort-training on onnxruntime-training-cpu, x86_64, native;
- portable on aarch64 under qemu-user emulating a Cortex-A72: size and times only (RSS under
  qemu-user is qemu's own, dominated by its translation cache, and says nothing about a Pi).

Prints a table and, with --json, writes the numbers. Each timing is the median of fresh processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.keys import save_public_key
from tests.packaging.device_venv import QUIET_ENV, DeviceVenv, device_venv

IMPORT_PROBE = ("import time; t = time.perf_counter(); import device_agent.cli; "
                "from device_agent.training_backends import installed_backends; installed_backends(); "
                "print(time.perf_counter() - t)")
REPEATS = 5


#: Runs argv and reports its peak RSS. A process forked from this one (torch loaded: ~480 MB) would report
#: this one's RSS as its peak (Linux keeps the fork-time high-water mark across exec), so a small launcher forks it.
LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); _, status, usage = os.wait4(p.pid, 0); "
            "print(f'MAXRSS {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}', file=sys.stderr)")


def _timed_child(cmd: Sequence[str], env: dict[str, str], cwd: str) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes of that command alone, stdout)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-I", "-c", LAUNCHER, *cmd], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=900, check=False)
    seconds = time.perf_counter() - started
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    if not last.startswith("MAXRSS ") or last.split()[2] != "0":
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr[-2000:]}")
    return seconds, int(last.split()[1]) * 1024, proc.stdout


def watch_case(work: Path) -> tuple[Path, Path, Path]:
    """(bundle, fleet key, local data) for the demo's watch model."""
    from sdk.demo import DemoSettings
    from sdk.demo.fleet import build_watch_bundle

    key = Ed25519PrivateKey.generate()
    build_watch_bundle(DemoSettings(), signing_key=key, out_path=work / "watch.fedge")
    save_public_key(key.public_key(), work / "fleet.pub")
    rng = np.random.default_rng(0)
    np.savez(work / "local.npz", x=rng.normal(size=(188, 6, 100)).astype(np.float32), y=rng.integers(0, 7, 188))
    return work / "watch.fedge", work / "fleet.pub", work / "local.npz"


def measure_venv(venv: DeviceVenv, backend: str, case: tuple[Path, Path, Path], work: Path) -> dict[str, object]:
    bundle, key, data = case
    env = {"PATH": f"{venv.path / 'bin'}:/usr/bin:/bin", "HOME": str(work), **QUIET_ENV}
    imports = [float(_timed_child([str(venv.exe("python")), "-I", "-c", IMPORT_PROBE], env, str(work))[2]) for _ in range(REPEATS)]
    dest = work / f"bundle-{venv.extra}"
    _timed_child([str(venv.exe("fedge-agent")), "install", str(bundle), "--fleet-key", str(key), "--dest", str(dest)], env, str(work))
    runs = []
    for i in range(REPEATS):
        seconds, rss, out = _timed_child(
            [str(venv.exe("fedge-agent")), "train", "--bundle-dir", str(dest), "--fleet-key", str(key), "--state",
             str(work / f"state-{venv.extra}-{i}"), "--data", str(data), "--threads", "1", "--backend", backend], env, str(work))
        runs.append((seconds, rss, json.loads(out)))
    steps = runs[0][2]["steps"]
    return {"backend": backend, "where": f"x86_64 native ({venv.extra})", "installed_mib": venv.size_bytes() / 2**20,
            "import_s": statistics.median(imports), "train_process_s": statistics.median(r[0] for r in runs),
            "steps": steps, "steps_per_s": statistics.median(steps / r[2]["seconds"] for r in runs),
            "peak_rss_mib": statistics.median(r[1] for r in runs) / 2**20}


def measure_emulated(case: tuple[Path, Path, Path], tmp: Path) -> dict[str, object]:
    from tests.build_cache import cache_lock, cache_root
    from tests.field.arm64_root import EMULATED_CPU, EmulatedPi, cached_root
    from tests.field.conftest import INSTALL_SCRIPT, run_build_script

    out = tmp / "fedge-overlay.tar.gz"
    with cache_lock("aarch64-wheels", timeout_s=900):
        summary = run_build_script(out, cache_root() / "aarch64-wheels")
    bundle, key, data = case
    with cached_root() as (lower, _):
        pi = EmulatedPi(lower, tmp / "pi")
        try:
            staging = pi.path("/tmp/fp")
            staging.mkdir()
            for source in (out, Path(f"{out}.sha256"), INSTALL_SCRIPT, bundle, key, data):
                (staging / source.name).write_bytes(source.read_bytes())
                (staging / source.name).chmod(0o644)
            staging.chmod(0o755)
            proc = pi.run(["sh", "/tmp/fp/install.sh", f"/tmp/fp/{out.name}"], timeout=600)
            assert proc.returncode == 0, proc.stderr
            env = dict(QUIET_ENV)
            imports = []
            for _ in range(3):
                proc = pi.run(["/opt/fedge/venv/bin/python3", "-I", "-c", IMPORT_PROBE], user="fedge", env=env)
                imports.append(float(proc.stdout.strip().splitlines()[-1]))
            agent = "/opt/fedge/venv/bin/fedge-agent"
            proc = pi.run([agent, "install", f"/tmp/fp/{bundle.name}", "--fleet-key", f"/tmp/fp/{key.name}", "--dest",
                           "/var/lib/fedge/fp/bundle"], user="fedge", env=env)
            assert proc.returncode == 0, proc.stderr
            runs = []
            for i in range(3):
                started = time.perf_counter()
                proc = pi.run([agent, "train", "--bundle-dir", "/var/lib/fedge/fp/bundle", "--fleet-key", f"/tmp/fp/{key.name}",
                               "--state", f"/var/lib/fedge/fp/s{i}", "--data", f"/tmp/fp/{data.name}", "--threads", "1",
                               "--backend", "portable"], user="fedge", env=env, timeout=900)
                assert proc.returncode == 0, proc.stderr
                runs.append((time.perf_counter() - started, json.loads(proc.stdout)))
        finally:
            pi.close()
    steps = runs[0][1]["steps"]
    return {"backend": "portable", "where": f"aarch64 EMULATED (qemu-user, {EMULATED_CPU})",
            "installed_mib": float(summary["installed_bytes"]) / 2**20, "import_s": statistics.median(imports),
            "train_process_s": statistics.median(r[0] for r in runs), "steps": steps,
            "steps_per_s": statistics.median(steps / r[1]["seconds"] for r in runs), "peak_rss_mib": None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--no-emulation", action="store_true", help="x86_64 rows only")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedge-footprint-") as tmp:
        work = Path(tmp)
        case = watch_case(work)
        for extra, backend in (("device", "portable"), ("device-ort-training", "ort-training")):
            with device_venv(extra) as venv:
                rows.append(measure_venv(venv, backend, case, work))
        if not args.no_emulation:
            rows.append(measure_emulated(case, work))
    header = f"{'backend':<13} {'where':<42} {'installed MiB':>13} {'import s':>9} {'train proc s':>12} {'steps/s':>8} {'peak RSS MiB':>12}"
    print(header)
    for r in rows:
        rss = "n/a" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
        print(f"{r['backend']:<13} {r['where']:<42} {r['installed_mib']:>13.0f} {r['import_s']:>9.2f} "
              f"{r['train_process_s']:>12.2f} {r['steps_per_s']:>8.0f} {rss:>12}")
    if args.json:
        args.json.write_text(json.dumps({"model": "watch 1D-CNN fedalt adamw, 188 x (6, 100), batch 32, 1 thread",
                                         "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
