"""A virtual environment with mainstream ``onnxruntime`` (the current PyPI release) and the device deps, no torch.

Built once under a cache directory outside the checkout (``$FEDGE_TEST_CACHE``,
default ``~/.cache/fedge-tests``) and reused while its stamp matches; a fresh
machine builds it from PyPI with the ordinary pip. A lock keeps two test
processes from building it at the same time.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

#: The device dependencies (pyproject's base dependencies) plus the `device` extra's runtime.
PACKAGES = ("onnxruntime", "numpy>=1.24", "paho-mqtt>=2.1,<3", "cryptography>=42", "tuf>=7,<8")
_STAMP = "fedge-stamp.json"


def cache_root() -> Path:
    return Path(os.environ.get("FEDGE_TEST_CACHE", Path.home() / ".cache" / "fedge-tests"))


def mainstream_python() -> Path:
    """The venv's python, building the venv first when it is missing or stale. RuntimeError says why a build failed."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    env_dir = root / f"mainstream-onnxruntime-py{sys.version_info.major}{sys.version_info.minor}"
    python = env_dir / "bin" / "python"
    want = {"packages": list(PACKAGES), "python": sys.version.split()[0]}
    with open(root / ".mainstream.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = env_dir / _STAMP
        if python.exists() and stamp.exists() and json.loads(stamp.read_text()).get("want") == want:
            return python
        venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
        proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PACKAGES],
                              capture_output=True, text=True, timeout=900, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"pip could not build the mainstream onnxruntime venv in {env_dir}:\n{proc.stderr[-3000:]}")
        version = subprocess.run([str(python), "-c", "import onnxruntime; print(onnxruntime.__version__)"],
                                 capture_output=True, text=True, timeout=120, check=True).stdout.strip()
        stamp.write_text(json.dumps({"want": want, "onnxruntime": version}))
    return python
