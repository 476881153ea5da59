"""generate_topology writes the per-broker layout, guards its secrets and reports the paths."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path, PurePosixPath

import pytest

from sdk.broker_config import TlsSettings, Topology, generate_topology, load_topology
from sdk.broker_config.passwords import verify_password

SMALL = Path(__file__).parent / "data" / "small_topology.toml"


def _topology(*, tls: bool = True, mtls: bool = False) -> Topology:
    topology = load_topology(SMALL)
    return dataclasses.replace(topology, tls=TlsSettings(enabled=tls, require_client_certs=mtls))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_topology_layout_and_permissions(tmp_path: Path) -> None:
    out = tmp_path / "out"
    generated = generate_topology(_topology(), out)
    eu = generated.broker("eu")
    assert generated.broker("root").bridge_file is None
    assert eu.bridge_file == out / "eu/conf.d/bridge-root.conf"
    for path in (eu.config_file, eu.acl_file, eu.ca_file, eu.cert_file):
        assert path is not None and _mode(path) == 0o644
    for path in (eu.password_file, eu.bridge_file, eu.key_file, generated.ca_key_file,
                 *generated.credential_files.values()):
        assert path is not None and _mode(path) == 0o600
    assert _mode(generated.credentials_dir) == 0o700 and _mode(out / "pki") == 0o700
    assert eu.persistence_dir.is_dir()
    assert sorted(generated.credential_files) == ["eu-agg", "eu-dev-0001", "eu-dev-0002", "fedge-monitor",
                                                  "fedge-release", "root-agg", "us-1", "us-agg"]
    # In place: the config names the files where they were written.
    assert f"password_file {eu.password_file}" in eu.config_file.read_text().splitlines()


def test_generate_topology_passwords_match_credentials_and_bridge(tmp_path: Path) -> None:
    generated = generate_topology(_topology(), tmp_path / "out")
    eu_hashes = dict(line.split(":", 1) for line in generated.broker("eu").password_file.read_text().splitlines())
    device = json.loads(generated.credential_files["eu-dev-0001"].read_text())
    assert verify_password(device["password"], eu_hashes["eu-dev-0001"])
    root_hashes = dict(
        line.split(":", 1) for line in generated.broker("root").password_file.read_text().splitlines())
    bridge_file = generated.broker("eu").bridge_file
    assert bridge_file is not None
    bridge_password = next(line.split()[1] for line in bridge_file.read_text().splitlines()
                           if line.startswith("remote_password "))
    assert verify_password(bridge_password, root_hashes["bridge-eu"])
    assert len({json.loads(p.read_text())["password"] for p in generated.credential_files.values()}) == 8


def test_generate_topology_deploy_dir_and_no_tls(tmp_path: Path) -> None:
    generated = generate_topology(_topology(tls=False), tmp_path / "out", deploy_dir=PurePosixPath("/opt/mq"))
    conf = generated.broker("eu").config_file.read_text()
    assert "password_file /opt/mq/passwords" in conf.splitlines() and str(tmp_path) not in conf
    assert generated.ca_cert_file is None and generated.broker("eu").key_file is None
    assert not (tmp_path / "out" / "pki").exists() and not (tmp_path / "out" / "eu" / "tls").exists()


def test_generate_topology_mtls_writes_client_and_bridge_certs(tmp_path: Path) -> None:
    generated = generate_topology(_topology(mtls=True), tmp_path / "out")
    device = json.loads(generated.credential_files["eu-dev-0001"].read_text())
    assert (generated.credentials_dir / device["client_cert_file"]).is_file()
    assert _mode(generated.credentials_dir / device["client_key_file"]) == 0o600
    assert _mode(generated.broker("eu").directory / "tls" / "bridge.key") == 0o600


def test_generate_topology_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "old").write_text("x")
    with pytest.raises(FileExistsError):
        generate_topology(_topology(), tmp_path)
