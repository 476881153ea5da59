"""Service TOML files: the spec comes from the signed bundle, mistakes name their key, the CLI runs bounded."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device_agent.daemon.errors import ConfigError
from device_agent.keys import save_private_key, save_public_key
from sdk.aggregator.service_config import load_regional_service_config
from sdk.cli.aggregator_cmd import aggregator
from tests.mosquitto_broker import MosquittoFactory


def write_regional(tmp_path: Path, bundle: Path, fleet_key: Ed25519PrivateKey, *, port: int = 1883, extra: str = "") -> Path:
    save_public_key(fleet_key.public_key(), tmp_path / "fleet.pub")
    save_private_key(Ed25519PrivateKey.generate(), tmp_path / "eu-sign.key")
    save_private_key(X25519PrivateKey.generate(), tmp_path / "eu-enc.key")
    save_public_key(Ed25519PrivateKey.generate().public_key(), tmp_path / "root-sign.pub")
    save_public_key(X25519PrivateKey.generate().public_key(), tmp_path / "root-enc.pub")
    (tmp_path / "devices").mkdir()
    save_public_key(Ed25519PrivateKey.generate().public_key(), tmp_path / "devices" / "eu-dev-0001.pub")
    path = tmp_path / "regional.toml"
    path.write_text(f"""
[aggregator]
fleet = "demo"
region = "eu"
store = "eu.sqlite"
bundle = "{bundle}"
fleet_public_key = "fleet.pub"
signing_key = "eu-sign.key"
encryption_key = "eu-enc.key"
root_verify_key = "root-sign.pub"
root_encryption_key = "root-enc.pub"
device_keys_dir = "devices"
[round]
quorum = 2
deadline_s = 30
{extra}
[broker]
host = "127.0.0.1"
port = {port}
share_group = "eu-aggregators"
""")
    return path


def test_service_config_reads_spec_from_bundle_and_names_bad_keys(bundle_factory, fleet_key: Ed25519PrivateKey, tmp_path: Path) -> None:
    bundle = bundle_factory("fedavg")
    config = load_regional_service_config(write_regional(tmp_path, bundle, fleet_key))
    assert config.aggregator.region == "eu" and config.aggregator.policy.quorum == 2
    assert set(config.aggregator.spec) and config.store == tmp_path / "eu.sqlite"
    assert config.broker.client_id == "fedge-demo-eu-main"
    assert set(config.aggregator.device_keys) == {"eu-dev-0001"}  # type: ignore[arg-type]

    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(ConfigError, match=r"round\.min_updates: min_updates \(3\) cannot exceed quorum"):
        load_regional_service_config(write_regional(bad, bundle, fleet_key, extra="min_updates = 3"))
    typo = tmp_path / "typo"
    typo.mkdir()
    with pytest.raises(ConfigError, match=r"round\.qourum: unknown key"):
        load_regional_service_config(write_regional(typo, bundle, fleet_key, extra="qourum = 3"))


def test_service_config_reads_fomo_candidates(bundle_factory, fleet_key: Ed25519PrivateKey, tmp_path: Path) -> None:
    bundle = bundle_factory("fedavg")
    path = write_regional(tmp_path, bundle, fleet_key)
    assert load_regional_service_config(path).aggregator.fomo_candidates == 0  # off unless asked for
    text = path.read_text()
    path.write_text(text.replace('device_keys_dir = "devices"', 'device_keys_dir = "devices"\nfomo_candidates = 4'))
    assert load_regional_service_config(path).aggregator.fomo_candidates == 4
    path.write_text(text.replace('device_keys_dir = "devices"', 'device_keys_dir = "devices"\nfomo_candidates = 33'))
    with pytest.raises(ConfigError, match=r"aggregator\.fomo_candidates"):
        load_regional_service_config(path)


@pytest.mark.mosquitto
def test_cli_regional_runs_bounded_against_a_broker(bundle_factory, fleet_key: Ed25519PrivateKey,
                                                    mosquitto: MosquittoFactory, tmp_path: Path) -> None:
    broker = mosquitto.start()
    path = write_regional(tmp_path, bundle_factory("fedavg"), fleet_key, port=broker.port)
    result = CliRunner().invoke(aggregator, ["regional", "--config", str(path), "--max-seconds", "0.5"])
    assert result.exit_code == 0, result.output
    assert "stopped (time_limit) after 1 connection(s)" in result.output
    assert (tmp_path / "eu.sqlite").exists()
