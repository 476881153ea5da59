"""Exposure rule, credentials file, Basic authentication; the dashboard's TOML."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from device_agent.daemon.errors import ConfigError
from sdk.dashboard.config import ServerSettings, load_dashboard_config
from sdk.dashboard.security import ExposureError, check_exposure, load_credentials


def _auth(tmp_path: Path, line: str = "ops:correct-horse-battery", mode: int = 0o600) -> Path:
    path = tmp_path / "auth"
    path.write_text(line + "\n")
    path.chmod(mode)
    return path


def test_loopback_needs_nothing_and_anything_else_needs_auth_and_tls(tmp_path: Path) -> None:
    assert check_exposure(ServerSettings(bind="127.0.0.1")) is None
    assert check_exposure(ServerSettings(bind="::1")) is None
    with pytest.raises(ExposureError, match="without authentication"):
        check_exposure(ServerSettings(bind="0.0.0.0"))
    auth = _auth(tmp_path)
    with pytest.raises(ExposureError, match="clear text"):
        check_exposure(ServerSettings(bind="0.0.0.0", auth_file=auth))
    assert check_exposure(ServerSettings(bind="0.0.0.0", auth_file=auth, plain_http=True)) is not None
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    assert check_exposure(ServerSettings(bind="::", auth_file=auth, tls_cert_file=cert, tls_key_file=cert)) is not None


def test_credentials_file_must_be_private_and_well_formed(tmp_path: Path) -> None:
    with pytest.raises(ExposureError, match="chmod 600"):
        load_credentials(_auth(tmp_path, mode=0o644))
    for line in ("no-colon-here-at-all", "ops:short", ":password-without-user"):
        with pytest.raises(ExposureError, match="user:password"):
            load_credentials(_auth(tmp_path, line))
    creds = load_credentials(_auth(tmp_path))
    good = "Basic " + base64.b64encode(b"ops:correct-horse-battery").decode()
    assert creds.accepts(good)
    assert not creds.accepts(None) and not creds.accepts("Basic !!!") and not creds.accepts("Bearer x")
    assert not creds.accepts("Basic " + base64.b64encode(b"ops:wrong").decode())
    assert "correct-horse" not in repr(creds)


def test_dashboard_toml_reads_the_monitor_credentials_and_names_bad_keys(tmp_path: Path, fleet_key) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_agent.keys import key_id, save_public_key

    keys = tmp_path / "keys"
    keys.mkdir()
    revoked = Ed25519PrivateKey.generate().public_key()
    save_public_key(fleet_key.public_key(), keys / "dev-1.pub")
    save_public_key(revoked, keys / "dev-2.pub")
    (keys / "revoked.txt").write_text(key_id(revoked) + "\n")
    (tmp_path / "monitor.json").write_text(json.dumps({"host": "127.0.0.1", "port": 1884, "username": "fedge-monitor",
                                                       "password": "pw", "tls": False, "message_size_limit": 1024}))
    path = tmp_path / "dashboard.toml"
    base = 'fleet = "f"\n[registries]\neu = "keys"\n'
    path.write_text('fleet = "f"\nmetrics = ["http://127.0.0.1:9464/metrics"]\n[registries]\neu = "keys"\n'
                    '[mqtt]\ncredentials = "monitor.json"\n')
    config = load_dashboard_config(path)
    assert list(config.registries) == ["eu"] and "dev-1" in config.registries["eu"]
    assert "dev-2" not in config.registries["eu"]  # its key is revoked: statuses signed with it are refused
    assert config.mqtt is not None and (config.mqtt.host, config.mqtt.port, config.mqtt.username) == ("127.0.0.1", 1884,
                                                                                                        "fedge-monitor")
    assert config.server.bind == "127.0.0.1" and config.server.port == 8765
    for body, key in (('metrics = ["ftp://x"]\n' + base, "metrics"),
                      (base + '[server]\nbind = "example.org"\n', "server.bind"),
                      ('colour = "blue"\n' + base, "colour"),
                      ('fleet = "f"\n[registries]\neu = "nope"\n', "registries.eu"),
                      (base + '[mqtt]\nrole = "root"\n', "mqtt.credentials")):
        path.write_text(body)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_dashboard_config(path)
