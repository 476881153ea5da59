"""The firmware overlay tar (examples/firmware-image/build_overlay.py), read on the host: layout, binaries, reproducibility."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.build_cache import cache_lock
from tests.field.conftest import BUILD_SCRIPT, Overlay, run_build_script

pytestmark = pytest.mark.timeout(900)  # the first test builds the overlay (aarch64 wheels downloaded once)

EM_AARCH64 = 183
VENV = "opt/fedge/venv"
SITE = f"{VENV}/lib/python3.11/site-packages"


@pytest.fixture(scope="module")
def members(overlay: Overlay) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(overlay.tar) as tar:
        return {m.name: m for m in tar.getmembers()}


def read(overlay: Overlay, name: str) -> bytes:
    with tarfile.open(overlay.tar) as tar:
        fh = tar.extractfile(name)
        assert fh is not None, name
        return fh.read()


def test_overlay_touches_only_its_own_paths_as_root_with_sane_modes(members: dict[str, tarfile.TarInfo]) -> None:
    own = ("opt/fedge/", "etc/fedge/", "opt/fedge", "etc/fedge")
    system_files = {"usr/lib/systemd/system/fedge-agent.service", "usr/lib/sysusers.d/fedge.conf",
                    "usr/lib/systemd/system-preset/80-fedge.preset"}
    for name, info in members.items():
        assert name.startswith(own) or name in system_files, f"{name} is outside the overlay's own paths"
        assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "root", "root"), name
        assert info.issym() or not info.mode & 0o022, f"{name} is group/world writable ({oct(info.mode)})"
        assert info.isfile() or info.isdir() or info.issym(), name
    assert system_files <= set(members)
    assert members["etc/fedge"].mode == 0o750
    assert "opt/fedge/venv/bin/fedge-agent" in members and members["opt/fedge/venv/bin/fedge-agent"].mode == 0o755
    assert not any(name.startswith(f"{SITE}/sdk/") for name in members)  # the host SDK stays off the device


def test_overlay_carries_this_checkouts_agent(overlay: Overlay) -> None:
    """Every device_agent source file in the overlay is the checkout's own (no stale wheel from an earlier build)."""
    checkout = Path(__file__).resolve().parents[2] / "device_agent"
    prefix = f"{SITE}/device_agent/"
    with tarfile.open(overlay.tar) as tar:  # one pass: a gzip tar cannot seek
        packed = {info.name[len(prefix):]: tar.extractfile(info).read()  # type: ignore[union-attr]
                  for info in tar if info.isfile() and info.name.startswith(prefix) and info.name.endswith(".py")}
    sources = {p.relative_to(checkout).as_posix(): p.read_bytes() for p in checkout.rglob("*.py") if "__pycache__" not in p.parts}
    assert len(sources) > 20
    assert packed == sources


def test_overlay_venv_points_at_the_targets_python(members: dict[str, tarfile.TarInfo], overlay: Overlay) -> None:
    assert members[f"{VENV}/bin/python3"].linkname == "/usr/bin/python3"
    assert members[f"{VENV}/bin/python"].linkname == "python3"
    cfg = dict(line.split(" = ", 1) for line in read(overlay, f"{VENV}/pyvenv.cfg").decode().splitlines())
    assert cfg == {"home": "/usr/bin", "include-system-site-packages": "false", "version": "3.11"}
    launcher = read(overlay, f"{VENV}/bin/fedge-agent").decode()
    assert launcher.startswith("#!/opt/fedge/venv/bin/python3 -I\n") and "from device_agent.cli import main" in launcher
    assert 'os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")' in launcher


def test_overlay_binaries_are_all_aarch64_and_bytecode_is_precompiled(members: dict[str, tarfile.TarInfo], overlay: Overlay) -> None:
    machines: dict[int, list[str]] = {}
    with tarfile.open(overlay.tar) as tar:
        for info in tar:
            if info.isfile() and info.size >= 20:
                fh = tar.extractfile(info)
                assert fh is not None
                head = fh.read(20)
                if head[:4] == b"\x7fELF":
                    machines.setdefault(int.from_bytes(head[18:20], "little"), []).append(info.name)
    assert set(machines) == {EM_AARCH64}, {m: names[:3] for m, names in machines.items()}
    assert len(machines[EM_AARCH64]) == overlay.summary["elf_files"] > 5
    assert any(n.endswith(".cpython-311-aarch64-linux-gnu.so") and "/onnxruntime/" in n for n in machines[EM_AARCH64])
    assert overlay.summary["bytecode"] is True
    assert f"{SITE}/device_agent/__pycache__/cli.cpython-311.pyc" in members


def test_overlay_manifest_names_every_wheel_with_its_hash(overlay: Overlay) -> None:
    manifest = json.loads(read(overlay, "opt/fedge/share/fedge-overlay.json"))
    assert manifest["python"] == "3.11" and manifest["excluded_packages"] == ["sdk"]
    names = set(manifest["wheels"])
    assert {n.split("-")[0] for n in names} >= {"fedge", "onnxruntime", "numpy", "paho_mqtt", "cryptography"}
    for name, digest in manifest["wheels"].items():
        if not name.startswith("fedge-"):
            assert hashlib.sha256((overlay.wheelhouse / name).read_bytes()).hexdigest() == digest, name
    sha_line = Path(f"{overlay.tar}.sha256").read_text().split()
    assert sha_line == [hashlib.sha256(overlay.tar.read_bytes()).hexdigest(), overlay.tar.name]


def test_overlay_device_template_parses_once_its_files_exist(overlay: Overlay, tmp_path: Path, fleet_key) -> None:
    """/etc/fedge/agent.toml.example is a valid agent config: relative keys, absolute writable paths under /var/lib/fedge."""
    from device_agent.daemon.config import load_config
    from tests.device_agent.daemon.fleet_harness import FleetKeys

    home = tmp_path / "etc-fedge"
    (home / "keys").mkdir(parents=True)
    (home / "agent.toml").write_bytes(read(overlay, "etc/fedge/agent.toml.example"))
    keys = FleetKeys(directory=tmp_path / "k", fleet=fleet_key).write()
    for name, source in {"fleet.pub": "fleet.pub", "device.key": "device.key", "aggregator.x25519.pub": "aggregator.pub",
                         "root.pub": "root.pub", "region.pub": "region.pub"}.items():
        (home / "keys" / name).write_bytes((keys.directory / source).read_bytes())
    (home / "keys" / "mqtt-password").write_text("pw\n")
    (home / "keys" / "ca.pem").write_text("ca\n")
    config = load_config(home / "agent.toml")
    assert config.device_private_key == home / "keys" / "device.key"
    assert config.state_dir == Path("/var/lib/fedge/state") and config.install_dir == Path("/var/lib/fedge/bundle")
    assert config.data.path == Path("/var/lib/fedge/data/local.npz")


def test_overlay_rebuilds_offline_byte_for_byte(overlay: Overlay, tmp_path: Path) -> None:
    """The same checkout and wheelhouse give the same tar, with no network (--offline)."""
    again = tmp_path / overlay.tar.name
    with cache_lock("aarch64-wheels", timeout_s=900):
        summary = run_build_script(again, overlay.wheelhouse, offline=True)
    assert summary["sha256"] == overlay.summary["sha256"]
    assert again.read_bytes() == overlay.tar.read_bytes()


def test_overlay_build_script_fails_in_one_line_without_a_wheelhouse_offline(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(BUILD_SCRIPT), "--out", str(tmp_path / "o.tar.gz"), "--offline",
                           "--wheelhouse", str(tmp_path / "empty")], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("build_overlay: error: pip install failed")
    assert not (tmp_path / "o.tar.gz").exists()
