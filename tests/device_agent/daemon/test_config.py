"""Parsing agent.toml: defaults, relative paths, the shipped example, and errors that name the key."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from device_agent.daemon.backoff import BackoffPolicy
from device_agent.daemon.config import DataFormat, OversizePolicy, load_config
from device_agent.daemon.errors import ConfigError
from device_agent.protocol.tensor_codec import Encoding
from device_agent.training_backends import BackendName
from tests.device_agent.daemon.fleet_harness import FleetKeys, agent_sections, render_toml, write_config

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "agent.toml"


@pytest.fixture
def base(tmp_path: Path, fleet_keys: FleetKeys) -> dict[str, dict[str, Any]]:
    return agent_sections(fleet_keys, work=tmp_path / "work", port=1883, bundle=tmp_path / "b.fedge",
                          data=tmp_path / "local.npz")


def load(tmp_path: Path, sections: dict[str, dict[str, Any]]):
    return load_config(write_config(tmp_path / "agent.toml", sections))


def test_config_minimal_file_gets_the_documented_defaults(tmp_path: Path, base):
    minimal = {name: base[name] for name in ("device", "bundle", "state", "keys", "data")}
    minimal["broker"] = {"host": "broker.local"}
    minimal["keys"] = {k: v for k, v in base["keys"].items() if k != "receipt_signers"}
    config = load(tmp_path, minimal)
    assert (config.broker.port, config.broker.keepalive_s, config.broker.max_packet_size) == (1883, 60, 256 * 1024)
    assert config.broker.oversized is OversizePolicy.CHUNK and config.broker.tls is None
    assert config.broker.username is None and config.broker.read_password() is None
    assert config.receipt_signers == config.model_signers
    assert (config.budget.epochs, config.budget.batch_size, config.budget.max_steps) == (1, 32, None)
    assert (config.receipt_timeout_s, config.max_attempts, config.encoding) == (30.0, 5, Encoding.RAW)
    assert config.backoff == BackoffPolicy()
    assert config.data.format is DataFormat.AUTO and config.seed is None
    assert (config.fomo_candidates, config.fomo_timeout_s, config.data.validation_path) == (0, 10.0, None)
    assert config.backend is BackendName.AUTO


def test_config_training_backend_is_read(tmp_path: Path, base):
    base["training"]["backend"] = "portable"
    assert load(tmp_path, base).backend is BackendName.PORTABLE


def test_config_resolves_relative_paths_against_the_config_directory(tmp_path: Path, fleet_keys: FleetKeys):
    sections = agent_sections(fleet_keys, work=Path("work"), port=1883, bundle=Path("b.fedge"), data=Path("d.csv"))
    sections["keys"] = {
        "device_private_key": "keys/device.key",
        "aggregator_public_key": "keys/aggregator.pub",
        "model_signers": "keys/region.pub",  # one path is fine too
    }
    sections["bundle"]["fleet_public_key"] = "keys/fleet.pub"
    config = load(tmp_path, sections)
    assert config.state_dir == tmp_path / "work" / "state"
    assert config.bundle_path == tmp_path / "b.fedge"
    assert config.model_signers == (tmp_path / "keys" / "region.pub",)
    assert config.data.path == tmp_path / "d.csv"


def test_config_reads_tls_and_a_password_file(tmp_path: Path, base):
    (tmp_path / "ca.pem").write_text("ca")
    (tmp_path / "pw").write_text("s3cret\n")
    base["broker"].update(password_file="pw", tls={"ca_file": "ca.pem"}, oversized="refuse", username="u")
    config = load(tmp_path, base)
    assert config.broker.tls is not None and config.broker.tls.ca_file == tmp_path / "ca.pem"
    assert config.broker.read_password() == "s3cret"
    assert config.broker.oversized is OversizePolicy.REFUSE
    assert "s3cret" not in repr(load(tmp_path, {**base, "broker": {"host": "h", "password": "s3cret"}}))


def test_config_example_in_examples_is_valid(tmp_path: Path, fleet_keys: FleetKeys):
    home = tmp_path / "example"
    keys = home / "keys"
    keys.mkdir(parents=True)
    shutil.copy(EXAMPLE, home / "agent.toml")
    for name, source in {"fleet.pub": "fleet.pub", "eu-dev-0001.key": "device.key", "eu-agg.x25519.pub": "aggregator.pub",
                         "root.pub": "root.pub", "eu.pub": "region.pub"}.items():
        shutil.copy(fleet_keys.directory / source, keys / name)
    (keys / "mqtt-password").write_text("pw\n")
    (keys / "ca.pem").write_text("ca\n")
    config = load_config(home / "agent.toml")
    assert (config.device_id, config.fleet, config.region) == ("eu-dev-0001", "demo", "eu")
    assert config.broker.tls is not None and config.broker.read_password() == "pw"
    assert config.receipt_signers == (keys / "eu.pub",) and len(config.model_signers) == 2
    assert config.state_dir == home / "var" / "state"


@pytest.mark.parametrize("edit, key, message", [
    (lambda s: s["device"].pop("id"), "device.id", "missing"),
    (lambda s: s["device"].update(id="dev/1"), "device.id", "not a valid id"),
    (lambda s: s["broker"].update(port="1883"), "broker.port", "integer in 1..65535"),
    (lambda s: s["broker"].update(port=70000), "broker.port", "integer in 1..65535"),
    (lambda s: s["broker"].update(prot=1), "broker.prot", "unknown key"),
    (lambda s: s.update(extra={"a": 1}), "extra", "unknown key"),
    (lambda s: s["broker"].update(password="a", password_file="keys/device.key"), "broker.password_file", "not both"),
    (lambda s: s["broker"].update(tls={"cert_file": "keys/device.key"}), "broker.tls.key_file", "go together"),
    (lambda s: s["broker"].update(oversized="drop"), "broker.oversized", "'chunk', 'refuse'"),
    (lambda s: s["broker"].update(max_packet_size=10), "broker.max_packet_size", "integer in 1024.."),
    (lambda s: s["keys"].update(model_signers=["nope.pub"]), "keys.model_signers", "does not exist"),
    (lambda s: s["keys"].update(model_signers=[]), "keys.model_signers", "non-empty list"),
    (lambda s: s["training"].update(encoding="bf16"), "training.encoding", "'raw', 'fp16', 'int8'"),
    (lambda s: s["training"].update(encoding="topk_q8"), "training.encoding", "bundle's compression field"),
    (lambda s: s["training"].update(backend="tflite"), "training.backend", "'auto', 'portable', 'ort-training'"),
    (lambda s: s["training"].update(batch_size=0), "training.batch_size", "integer in 1.."),
    (lambda s: s["training"].update(learning_rate=-0.1), "training.learning_rate", "number > 0"),
    (lambda s: s["training"].update(fomo_candidates=33), "training.fomo_candidates", "integer in 0..32"),
    (lambda s: s["training"].update(fomo_timeout_s=0), "training.fomo_timeout_s", "number > 0"),
    (lambda s: s["submit"].update(receipt_timeout_s=0), "submit.receipt_timeout_s", "number > 0"),
    (lambda s: s["submit"].update(max_attempts=0), "submit.max_attempts", "integer in 1.."),
    (lambda s: s["backoff"].update(jitter=2.0), "backoff.jitter", "[0, 1]"),
    (lambda s: s["backoff"].update(initial_s=10.0, max_s=1.0), "backoff.max_s", ">= initial_s"),
    (lambda s: s["data"].update(feature_shape=[8, 0]), "data.feature_shape", "positive integers"),
    (lambda s: s["data"].update(format="parquet"), "data.format", "'auto', 'npz', 'csv'"),
    (lambda s: s.update(state="here"), "state", "expected a table"),
])
def test_config_errors_name_the_key(tmp_path: Path, base, edit, key, message):
    edit(base)
    with pytest.raises(ConfigError) as info:
        load(tmp_path, base)
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'agent.toml'}: {key}: "), text
    assert message in text


def test_config_rejects_a_file_that_is_not_toml(tmp_path: Path):
    path = tmp_path / "agent.toml"
    path.write_text("[device\nid = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_config_helper_renders_nested_tables():
    assert render_toml({"broker": {"host": "h", "tls": {"ca_file": "c"}}}) == '[broker]\nhost = "h"\n[broker.tls]\nca_file = "c"\n'


def test_config_release_table(tmp_path: Path, base):
    assert load(tmp_path, base).release is None, "no [release] table: the device never updates"
    root = tmp_path / "root.json"
    root.write_text("{}")
    base["release"] = {"root_file": str(root), "groups": ["gateways"], "chunks_per_second": 2.5, "trial_epochs": 3}
    release = load(tmp_path, base).release
    assert release is not None and release.root_file == root and release.groups == ("gateways",)
    assert (release.chunks_per_s, release.trial_epochs, release.window, release.settle_s) == (2.5, 3, 4, 0.5)
    for key, value, message in (("root_file", str(tmp_path / "missing.json"), "release.root_file"),
                                ("groups", ["bad/group"], "release.groups"),
                                ("window", 0, "release.window"),
                                ("chunks_per_second", 0, "release.chunks_per_second"),
                                ("colour", "blue", "release.colour")):
        bad = {**base, "release": {**base["release"], key: value}}
        with pytest.raises(ConfigError, match=message):
            load(tmp_path, bad)
