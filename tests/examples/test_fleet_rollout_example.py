"""examples/fleet-rollout: its topology provisions all eight devices, its data script writes their data, and every
command its README gives names a real command (the flow itself runs in test_fleet_live and test_rollout_proof)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from sdk.cli.main import cli

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleet-rollout"
DEVICES = [f"{region}-dev-{i:04d}" for region in ("north", "south") for i in range(1, 5)]


def _readme_commands() -> list[list[str]]:
    """Every fedge / fedge-agent command line in the README's bash blocks, as argv lists."""
    blocks = re.findall(r"```bash\n(.*?)```", (EXAMPLE / "README.md").read_text(encoding="utf-8"), re.S)
    commands = []
    for line in "\n".join(blocks).splitlines():
        for part in re.split(r"[;&]|\bdo\b|\bdone\b", line):
            words = shlex.split(part.strip()) if part.strip() else []
            if words and words[0] in ("fedge", "fedge-agent"):
                commands.append(words)
    return commands


def _agent_help(path: list[str]) -> tuple[int, str]:
    run = subprocess.run([sys.executable, "-m", "device_agent.cli", *path, "--help"], capture_output=True, text=True, timeout=60)
    return run.returncode, run.stdout + run.stderr


def test_fleet_rollout_topology_provisions_every_device_and_the_data_script_feeds_them(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["fleet", "init", str(EXAMPLE / "topology.toml"), "--out", str(tmp_path / "fleet")])
    assert result.exit_code == 0, result.output
    devices = tmp_path / "fleet" / "devices"
    assert sorted(p.name for p in devices.iterdir()) == DEVICES
    for device in DEVICES:
        assert 'path = "var/data/local.npz"' in (devices / device / "agent.toml").read_text()
    assert (tmp_path / "fleet" / "release" / "repository").is_dir()

    run = subprocess.run([sys.executable, str(EXAMPLE / "write_lab_data.py"), str(tmp_path / "fleet"), "--per-device", "50"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for index, device in enumerate(DEVICES):
        with np.load(devices / device / "var" / "data" / "local.npz") as data:
            assert data["x"].shape == (50, 64) and data["x"].dtype == np.float32 and data["y"].shape == (50,)
            own = np.isin(data["y"], [(2 * index) % 10, (2 * index + 1) % 10]).mean()
            assert own >= 0.8  # mostly its own two digits: non-IID
    empty = subprocess.run([sys.executable, str(EXAMPLE / "write_lab_data.py"), str(tmp_path / "nothing")],
                           capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "run fedge fleet init first" in empty.stderr and "Traceback" not in empty.stderr


def test_fleet_rollout_readme_commands_are_real_commands() -> None:
    commands = _readme_commands()
    assert len(commands) >= 12  # provisioning, rounds, a release, a halt and a rollback
    names = set()
    for words in commands:
        path: list[str] = []  # the command is its leading lowercase words; arguments are paths, numbers or options
        for w in words[1:]:
            if not re.fullmatch(r"[a-z][a-z-]*", w) or len(path) == 2:
                break
            path.append(w)
        if words[0] == "fedge":
            result = CliRunner().invoke(cli, [*path, "--help"])
            code, output = result.exit_code, result.output
        else:
            code, output = _agent_help(path)
        assert code == 0 and "usage" in output.lower(), f"{' '.join(words)}: exit {code}: {output[-500:]}"
        names.add(" ".join([words[0], *path]))
    assert {"fedge release publish", "fedge release halt", "fedge release rollback", "fedge fleet init",
            "fedge-agent run"} <= names
