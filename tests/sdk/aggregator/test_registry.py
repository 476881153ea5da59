"""KeyRegistry: the <id>.pub files of a directory, revoked keys refused, reloads swap the whole map or nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.keys import key_id, save_public_key
from sdk.aggregator.registry import KeyRegistry, RegistryError


def _pub(directory: Path, name: str) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    save_public_key(key.public_key(), directory / f"{name}.pub")
    return key


def test_registry_reads_ids_from_file_names_and_refuses_revoked_keys(tmp_path: Path, caplog) -> None:
    a, b = _pub(tmp_path, "dev-a"), _pub(tmp_path, "dev-b")
    (tmp_path / "revoked.txt").write_text(f"# comment\n{key_id(b.public_key())} dev-b removed 2026-01-01T00:00:00Z\n")
    with caplog.at_level(logging.WARNING):
        registry = KeyRegistry(tmp_path)
    assert registry.ids() == ("dev-a",) and registry("dev-b") is None and "dev-b" not in registry
    assert key_id(registry("dev-a")) == key_id(a.public_key()) and len(registry) == 1
    assert "revoked key" in caplog.text


def test_registry_warns_about_a_key_named_the_old_way(tmp_path: Path, caplog) -> None:
    _pub(tmp_path, "eu-dev-0001.key")
    with caplog.at_level(logging.WARNING):
        registry = KeyRegistry(tmp_path)
    assert registry.ids() == ("eu-dev-0001.key",)
    assert "name the file eu-dev-0001.pub" in caplog.text


def test_registry_reload_applies_adds_removals_and_new_keys_at_once(tmp_path: Path) -> None:
    _pub(tmp_path, "dev-a")
    _pub(tmp_path, "dev-b")
    registry = KeyRegistry(tmp_path)
    (tmp_path / "dev-a.pub").unlink()
    new_b = _pub(tmp_path, "dev-b")
    _pub(tmp_path, "dev-c")
    change = registry.reload()
    assert change is not None and (change.added, change.removed, change.changed, change.total) == (("dev-c",), ("dev-a",),
                                                                                                  ("dev-b",), 2)
    assert registry("dev-a") is None and key_id(registry("dev-b")) == key_id(new_b.public_key())
    assert registry.generation == 1


def test_registry_reload_keeps_the_old_map_when_the_directory_is_broken(tmp_path: Path, caplog) -> None:
    _pub(tmp_path, "dev-a")
    registry = KeyRegistry(tmp_path)
    (tmp_path / "dev-x.pub").write_text("not a key")
    with caplog.at_level(logging.ERROR):
        assert registry.reload() is None
    assert registry.ids() == ("dev-a",) and "dev-x.pub" in caplog.text


def test_registry_refuses_an_empty_or_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no <id>.pub"):
        KeyRegistry(tmp_path)
    with pytest.raises(RegistryError, match="not a directory"):
        KeyRegistry(tmp_path / "missing")
    (tmp_path / "bad id!.pub").write_text("x")
    with pytest.raises(RegistryError, match="bad id"):
        KeyRegistry(tmp_path)
