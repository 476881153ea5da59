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


def _edited(directory: Path, bundle: Path, fleet_key: Ed25519PrivateKey, old: str, new: str) -> Path:
    """A regional config in ``directory`` (made here) with ``old`` replaced by ``new``."""
    directory.mkdir()
    path = write_regional(directory, bundle, fleet_key)
    path.write_text(path.read_text().replace(old, new))
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


def test_service_config_influence_and_limits_default_on_and_named_when_wrong(bundle_factory, fleet_key: Ed25519PrivateKey,
                                                                            tmp_path: Path) -> None:
    from sdk.aggregation.influence import InfluencePolicy

    bundle = bundle_factory("fedavg")
    config = load_regional_service_config(write_regional(tmp_path, bundle, fleet_key))
    assert config.aggregator.influence == InfluencePolicy() and not config.aggregator.influence.unsafe
    assert (config.loop.sender_rate_per_s, config.loop.sender_burst) == (1.0, None)
    assert (config.loop.batch_max_updates, config.loop.batch_max_wait_s) == (32, 0.005)
    cases = {
        "[influence]\nnorm = \"unbounded\"\nweight = \"fixed\"\nmax_sample_count = 5000": None,
        "[influence]\nnorm = \"loose\"": r"influence\.norm: expected 'adaptive', 'fixed' or 'unbounded'",
        "[influence]\nmax_sample_count = 0": r"influence\.max_sample_count",
        "[aggregation]\nclip_norm = 1.0": r"aggregation\.clip_norm: norms are bounded in \[influence\]",
        "[service]\nsender_burst = 0": r"service\.sender_burst",
        "[service]\nresend_min_s = 9.0\nresend_max_s = 3.0": r"service\.resend_max_s",
        "[service]\nbatch_max_updates = 0": r"service\.batch_max_updates",
        "[service]\nbatch_max_wait_s = 2.0": r"service\.batch_max_wait_s: must be at most 1 s",
    }
    for i, (extra, error) in enumerate(cases.items()):
        path = _edited(tmp_path / f"case{i}", bundle, fleet_key, "[broker]", extra + "\n[broker]")
        if error is None:
            policy = load_regional_service_config(path).aggregator.influence
            assert (policy.unsafe, policy.weight, policy.max_sample_count) == (True, "fixed", 5000)
        else:
            with pytest.raises(ConfigError, match=error):
                load_regional_service_config(path)


@pytest.mark.parametrize("content", [b"\xff\xfe[aggregator]\n", b"a = " + b"{b = " * 2000 + b"1" + b"}" * 2000 + b"\n"])
def test_service_config_unreadable_toml_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    """Fuzzing found these (tests/fuzz): non-UTF-8 bytes and deep nesting must name the file, not raise through."""
    path = tmp_path / "regional.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="regional.toml: not valid TOML"):
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


def test_service_config_reads_the_downlink_table_and_names_bad_values(bundle_factory, fleet_key: Ed25519PrivateKey,
                                                                       tmp_path: Path) -> None:
    bundle = bundle_factory("fedavg")
    path = write_regional(tmp_path, bundle, fleet_key)
    assert not load_regional_service_config(path).downlink.active  # off unless asked for
    text = path.read_text()
    path.write_text(text + '[downlink]\ncompression = "q4"\nuplink = "0:q8,10:topk:0.3+q4"\n')
    downlink = load_regional_service_config(path).downlink
    assert downlink.compression.describe() == "q4" and downlink.uplink.describe() == "0:q8,10:topk:0.3+q4"
    for bad, where in (('compression = "q5"', r"downlink\.compression"), ('uplink = "5:q8,1:q4"', r"downlink\.uplink"),
                       ('delta = "q4"', r"downlink\.delta: unknown key")):
        path.write_text(text + f"[downlink]\n{bad}\n")
        with pytest.raises(ConfigError, match=where):
            load_regional_service_config(path)


def test_cli_regional_downlink_flags_refuse_bad_values_in_one_line(bundle_factory, fleet_key: Ed25519PrivateKey,
                                                                   tmp_path: Path) -> None:
    path = write_regional(tmp_path, bundle_factory("fedavg"), fleet_key)
    for flag in ("--downlink-compression", "--uplink-compression"):
        result = CliRunner().invoke(aggregator, ["regional", "--config", str(path), flag, "topk:2"])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert flag in result.output and "topk must be in (0, 1]" in result.output
    from sdk.cli.aggregator_cmd import _with_downlink

    loaded = load_regional_service_config(path)
    assert _with_downlink(loaded, None, None) is loaded
    both = _with_downlink(loaded, "q4", "0:q8,3:q4").downlink
    assert (both.compression.describe(), both.uplink.describe()) == ("q4", "0:q8,3:q4")


def test_service_config_refuses_model_deltas_with_fedfomo(bundle_factory, fleet_key: Ed25519PrivateKey, tmp_path: Path) -> None:
    path = write_regional(tmp_path, bundle_factory("fedavg"), fleet_key)
    text = path.read_text().replace('device_keys_dir = "devices"', 'device_keys_dir = "devices"\nfomo_candidates = 2')
    path.write_text(text + '[downlink]\ncompression = "q4"\n')
    with pytest.raises(ConfigError, match=r"aggregator\.fomo_candidates: FedFomo cannot be combined"):
        load_regional_service_config(path)
    path.write_text(text + '[downlink]\nuplink = "q4"\n')  # the round's uplink override alone is fine
    assert load_regional_service_config(path).downlink.uplink.describe() == "0:q4"


def test_service_config_reads_frame_versions_and_names_bad_values(bundle_factory, fleet_key: Ed25519PrivateKey,
                                                                  tmp_path: Path) -> None:
    bundle = bundle_factory("fedavg")
    default = load_regional_service_config(write_regional(tmp_path, bundle, fleet_key)).aggregator
    assert (default.update_frames, default.announce_frames, default.announced_frames) == ({1, 2}, False, None)
    cases = {
        'update_frames = "2"\nannounce_frames = true': None,
        'update_frames = "1,3"': r"aggregator\.update_frames: frame version '3' is not one of 1, 2",
        'update_frames = "2"': r"aggregator\.update_frames: refusing frame version 1 needs announce_frames = true",
        'announce_frames = "yes"': r"aggregator\.announce_frames: expected true or false",
    }
    for i, (lines, error) in enumerate(cases.items()):
        path = _edited(tmp_path / f"case{i}", bundle, fleet_key, 'device_keys_dir = "devices"', f'device_keys_dir = "devices"\n{lines}')
        if error is None:
            config = load_regional_service_config(path).aggregator
            assert (config.update_frames, config.announced_frames) == ({2}, (2,))
        else:
            with pytest.raises(ConfigError, match=error):
                load_regional_service_config(path)
