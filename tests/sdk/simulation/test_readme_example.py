"""The README's compare() example runs as written (taken from README.md itself, so it cannot rot)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[3] / "README.md"
MARKER = "<!-- tested: tests/sdk/simulation/test_readme_example.py"


def readme_compare_block() -> str:
    """The first ```python block after the marker comment."""
    text = README.read_text(encoding="utf-8")
    start = text.index(MARKER)
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match is not None, "no python block after the marker in README.md"
    return match.group(1)


def test_readme_compare_example_runs_as_written(tmp_path: Path) -> None:
    code = readme_compare_block()
    assert "compare(" in code
    (tmp_path / "example.py").write_text(code)
    repo = README.parent
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["device", "local", "fedavg", "fedalt"]
    assert [line.split()[0] for line in lines[1:6]] == ["device-0", "device-1", "device-2", "device-3", "mean"]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [r["algorithm"] for r in doc["results"]] == ["local", "fedavg", "fedalt"]
    for r in doc["results"]:
        assert set(r["per_device"]) == {f"device-{i}" for i in range(4)}
        assert 0.0 <= r["mean"] <= 1.0 and len(r["round_means"]) == 5
    assert "held out 10%" in doc["validation"]


def test_readme_states_the_default_learning_rate() -> None:
    from sdk.training_defaults import DEFAULT_LEARNING_RATE

    found = re.search(r"learning rate ([0-9.]+) with AdamW everywhere", README.read_text(encoding="utf-8"))
    assert found is not None and float(found.group(1)) == DEFAULT_LEARNING_RATE
