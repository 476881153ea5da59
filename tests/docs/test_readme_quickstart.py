"""The README's Python quick start runs as written (so it cannot rot)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[2] / "README.md"


def quick_start() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Quick start (Python API)"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python block under 'Quick start (Python API)'"
    return match.group(1)


def test_readme_python_quick_start_runs_as_written(tmp_path: Path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "local.npz", x=rng.normal(size=(64, 6, 100)).astype(np.float32), y=rng.integers(0, 7, 64))
    code = quick_start() + "\nprint('delta', sorted(delta) == sorted(trainer.get_shared()))\n"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "delta True" in run.stdout
    assert (tmp_path / "fedge-device" / "bundle").is_symlink()
