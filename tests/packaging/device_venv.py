"""Device-only virtual environments: ``pip install '<checkout>[device]'`` into a fresh venv, cached per input.

A venv is built once for each (Python, machine, extra, fedge sources) and
kept in the test cache (:mod:`tests.build_cache`); a session that uses it
holds the entry's shared lock, so no other session prunes it meanwhile.
Commands run isolated (``python -I``, a working directory outside the
checkout) so the checkout's own packages can never stand in for the installed ones.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.build_cache import REPO, held_entry, tree_key
from tests.example_modules import load_example

#: Bump when the way the venv is built changes.
RECIPE = 1
#: onnxruntime >= 1.29's official Linux wheels upload telemetry unless this is set (tests stay on loopback).
QUIET_ENV = {"ORT_DISABLE_TELEMETRY": "1"}
RUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-training", "onnxruntime-training-cpu")


@dataclass(frozen=True, kw_only=True)
class DeviceVenv:
    """A venv holding ``fedge[extra]`` and nothing else."""

    path: Path
    extra: str
    #: True when this session built it (a cold run), False when it came from the cache.
    built_now: bool

    def exe(self, name: str) -> Path:
        """``bin/<name>`` of the venv."""
        return self.path / "bin" / name

    def run(self, args: Sequence[str], *, timeout: float = 180.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command from the venv's bin/ (first item of ``args``) outside the checkout, with a minimal environment."""
        full_env = {"PATH": f"{self.path / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
                    "LANG": "C.UTF-8", **QUIET_ENV, **(env or {})}
        with tempfile.TemporaryDirectory(prefix="fedge-venv-run-") as cwd:
            return subprocess.run([str(self.exe(args[0])), *args[1:]], cwd=cwd, env=full_env, capture_output=True,
                                  text=True, timeout=timeout, check=False)

    def python(self, code: str, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        """``python -I -c code args...`` in the venv."""
        return self.run(["python", "-I", "-c", code, *args], timeout=timeout)

    def distributions(self) -> dict[str, str]:
        """Installed distributions: normalised name -> version."""
        proc = self.python("import importlib.metadata as m, json; "
                           "print(json.dumps({d.metadata['Name'].lower().replace('_', '-'): d.version for d in m.distributions()}))")
        if proc.returncode != 0:
            raise RuntimeError(f"listing {self.path}'s distributions failed: {proc.stderr}")
        return json.loads(proc.stdout)

    def size_bytes(self, *, exclude: Sequence[str] = ("pip", "setuptools", "_distutils_hack")) -> int:
        """Bytes of site-packages without the installer's own packages (what a device would carry)."""
        site = next((self.path / "lib").glob("python3.*/site-packages"))
        total = 0
        for path in site.rglob("*"):
            if path.is_file() and not path.is_symlink():
                top = path.relative_to(site).parts[0]
                if not any(top == name or top.startswith(f"{name}-") for name in exclude):
                    total += path.stat().st_size
        return total


def _build(path: Path, extra: str) -> None:
    overlay = load_example("firmware-image/build_overlay.py")
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True, timeout=300)
    with tempfile.TemporaryDirectory(prefix="fedge-src-") as tmp:
        source = overlay.copy_wheel_sources(REPO, Path(tmp) / "fedge")
        proc = subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", f"{source}[{extra}]"],
                              capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install '.[{extra}]' into a fresh venv failed:\n{proc.stderr[-3000:]}")


@contextmanager
def device_venv(extra: str) -> Iterator[DeviceVenv]:
    """A venv with ``fedge[extra]`` built from this checkout (cached), held in use until the context ends."""
    overlay = load_example("firmware-image/build_overlay.py")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    kind = f"venv-{extra}-{python}-{platform.machine()}"
    entry = f"{kind}-r{RECIPE}-{tree_key(REPO, overlay.WHEEL_SOURCES)}"
    with held_entry(kind, entry, lambda p: _build(p, extra), keep=2, timeout_s=900) as (path, built):
        yield DeviceVenv(path=path, extra=extra, built_now=built)
