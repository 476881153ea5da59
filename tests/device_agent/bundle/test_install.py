"""Installing bundles: an atomic switch (even under kill -9), never to an older version, idempotent for the same one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.bundle.archive import install_bundle, load_bundle
from device_agent.bundle.install_policy import BundleDowngradeError, read_record, versions_dir
from device_agent.cli import main as agent_main
from device_agent.errors import BundleError
from device_agent.keys import save_public_key
from tests.device_agent.bundle.resign import resigned


@pytest.fixture
def versions(bundle_factory, fleet_key, tmp_path: Path) -> dict[int, Path]:
    """The digits fedavg bundle as versions 1, 2 and 3 (re-signed with the fleet key)."""
    src = bundle_factory("fedavg")
    return {v: resigned(src, tmp_path / f"v{v}.fedge", fleet_key, version=v) for v in (1, 2, 3)}


def test_install_switches_a_symlink_to_a_versioned_directory(versions, fleet_key, tmp_path: Path):
    dest = tmp_path / "bundle"
    first = install_bundle(versions[1], fleet_key.public_key(), dest)
    assert dest.is_symlink() and dest.resolve() == first.directory
    assert first.directory.parent == versions_dir(dest)
    second = install_bundle(versions[2], fleet_key.public_key(), dest)
    assert dest.resolve() == second.directory != first.directory
    assert load_bundle(dest, fleet_key.public_key()).manifest.bundle_version == 2
    assert first.directory.is_dir(), "the previous version stays for a process still reading it"
    install_bundle(versions[3], fleet_key.public_key(), dest)
    assert not first.directory.exists(), "older versions are pruned"
    assert sorted(p.name for p in versions_dir(dest).iterdir() if p.is_dir()) == sorted(
        [second.directory.name, dest.resolve().name])


def test_install_refuses_an_older_version_also_after_the_install_dir_is_gone(versions, fleet_key, tmp_path: Path):
    dest = tmp_path / "bundle"
    install_bundle(versions[2], fleet_key.public_key(), dest)
    with pytest.raises(BundleDowngradeError, match="v1: this device already installed v2"):
        install_bundle(versions[1], fleet_key.public_key(), dest)
    assert load_bundle(dest, fleet_key.public_key()).manifest.bundle_version == 2
    dest.unlink()  # a "reboot" that lost the installed bundle keeps the record beside it
    for entry in versions_dir(dest).iterdir():
        if entry.is_dir():
            import shutil

            shutil.rmtree(entry)
    with pytest.raises(BundleDowngradeError):
        install_bundle(versions[1], fleet_key.public_key(), dest)
    assert install_bundle(versions[2], fleet_key.public_key(), dest).manifest.bundle_version == 2


def test_install_of_the_same_bundle_is_idempotent(versions, fleet_key, tmp_path: Path):
    dest = tmp_path / "bundle"
    first = install_bundle(versions[2], fleet_key.public_key(), dest)
    stamp = first.directory.stat().st_mtime_ns
    again = install_bundle(versions[2], fleet_key.public_key(), dest)
    assert again.directory == first.directory and again.manifest_sha256 == first.manifest_sha256
    assert first.directory.stat().st_mtime_ns == stamp, "nothing was rewritten"


def test_same_version_with_other_content_is_refused(versions, bundle_factory, fleet_key, tmp_path: Path):
    dest = tmp_path / "bundle"
    install_bundle(versions[2], fleet_key.public_key(), dest)
    other = resigned(bundle_factory("fedavg", lr=0.02), tmp_path / "other.fedge", fleet_key, version=2)
    with pytest.raises(BundleDowngradeError, match="different bundle v2"):
        install_bundle(other, fleet_key.public_key(), dest)


def test_a_legacy_plain_directory_install_is_the_floor_and_gets_migrated(versions, fleet_key, tmp_path: Path):
    dest = tmp_path / "bundle"
    staged = install_bundle(versions[2], fleet_key.public_key(), tmp_path / "elsewhere")
    import shutil

    shutil.copytree(staged.directory, dest)  # what installs looked like before versioned directories
    with pytest.raises(BundleDowngradeError):
        install_bundle(versions[1], fleet_key.public_key(), dest)
    assert read_record(dest) is None
    install_bundle(versions[3], fleet_key.public_key(), dest)
    assert dest.is_symlink() and read_record(dest).bundle_version == 3


def test_agent_install_cli_refuses_a_downgrade_in_one_line(versions, fleet_key, tmp_path: Path, capsys):
    save_public_key(fleet_key.public_key(), tmp_path / "fleet.pub")
    args = ["--fleet-key", str(tmp_path / "fleet.pub"), "--dest", str(tmp_path / "bundle")]
    assert agent_main(["install", str(versions[3]), *args]) == 0
    capsys.readouterr()
    assert agent_main(["install", str(versions[1]), *args]) == 1  # refused (docs/cli.md)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "v1" in err and "v3" in err and "Traceback" not in err
    assert agent_main(["install", str(versions[3]), *args]) == 0  # the same again: fine


INSTALLER = """
import sys
from device_agent.bundle.archive import install_bundle
from device_agent.keys import load_verify_key
key = load_verify_key(sys.argv[2])
print("ready", flush=True)
for archive in sys.argv[3:]:
    install_bundle(archive, key, sys.argv[1])
    print("installed", flush=True)
print("done", flush=True)
"""


def test_install_survives_kill_9_at_random_moments(bundle_factory, fleet_key, tmp_path: Path):
    """A process installing ten rising versions is killed at a random moment; what is installed always loads whole.

    The moment is counted in installs, not seconds, so a loaded machine moves it nowhere:
    after 0-2 finished installs (at least one in the first attempt), a random fraction of
    one install's time into the next.
    """
    save_public_key(fleet_key.public_key(), tmp_path / "fleet.pub")
    dest = tmp_path / "bundle"
    src = bundle_factory("fedavg")
    rng = np.random.default_rng(11)
    seen = set()
    for attempt in range(5):
        archives = [resigned(src, tmp_path / f"a{attempt}-{v}.fedge", fleet_key, version=100 * attempt + v)
                    for v in range(1, 11)]
        proc = subprocess.Popen([sys.executable, "-c", INSTALLER, str(dest), str(tmp_path / "fleet.pub"),
                                 *map(str, archives)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        lines = []
        for _ in range(int(rng.integers(1 if attempt == 0 else 0, 3))):
            started = time.monotonic()
            lines.append(proc.stdout.readline().strip())
            one_install = time.monotonic() - started
        assert all(line == "installed" for line in lines), lines
        time.sleep(float(rng.uniform(0.0, 1.0)) * (one_install if lines else 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        finished = proc.stdout.read().strip().endswith("done")
        proc.wait(timeout=30)
        if not dest.exists():
            assert attempt == 0, "once installed, the link never disappears"
            continue
        version = load_bundle(dest, fleet_key.public_key()).manifest.bundle_version  # verifies every file
        record = read_record(dest)
        assert record is not None and record.bundle_version >= version  # the record is written before the switch
        seen.add((version, finished))
    assert any(not finished for _, finished in seen), "no kill landed mid-install; shorten the waits"
    assert len(seen) >= 2, seen


def test_revert_returns_to_the_kept_version_and_refuses_the_failed_one_for_good(versions, fleet_key, tmp_path: Path):
    from device_agent.bundle.archive import previous_bundle, revert_bundle
    from device_agent.bundle.install_policy import BundleFailedError

    dest = tmp_path / "bundle"
    key = fleet_key.public_key()
    install_bundle(versions[1], key, dest)
    install_bundle(versions[2], key, dest)
    assert previous_bundle(dest, key).manifest.bundle_version == 1
    with pytest.raises(BundleDowngradeError):  # no failure, no withdrawal: the rule says no
        revert_bundle(dest, key, marked_failed=False, withdrawn=False)
    back = revert_bundle(dest, key, marked_failed=True, withdrawn=False)
    assert back.manifest.bundle_version == 1
    assert load_bundle(dest, key).manifest.bundle_version == 1
    assert read_record(dest).bundle_version == 2, "the floor stays at the failed version"
    with pytest.raises(BundleFailedError):  # the failed bundle itself: never again, also after a reboot
        install_bundle(versions[2], key, dest)
    with pytest.raises(BundleError, match="no older version is kept"):  # and no walking further down
        revert_bundle(dest, key, marked_failed=True, withdrawn=True)
    assert install_bundle(versions[3], key, dest).manifest.bundle_version == 3


@pytest.mark.parametrize("where", [0.25, 0.5, 0.75])
def test_install_refuses_an_archive_corrupted_in_transit_with_the_opaque_error(bundle_factory, fleet_key, tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture[str], where: float):
    from device_agent.errors import BundleVerificationError

    data = bytearray(Path(bundle_factory("fedavg")).read_bytes())
    data[int(len(data) * where)] ^= 0x01  # one bit flipped inside a member: a bad CRC or a broken deflate stream
    bad = tmp_path / "bad.fedge"
    bad.write_bytes(bytes(data))
    with pytest.raises(BundleVerificationError):
        install_bundle(bad, fleet_key.public_key(), tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    pub = tmp_path / "fleet.pub"
    save_public_key(fleet_key.public_key(), pub)
    code = agent_main(["install", str(bad), "--fleet-key", str(pub), "--dest", str(tmp_path / "dest2")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
