"""A middle tier's TOML and a region's ``parent``: the same file shape as a region's, mistakes named by key."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.daemon.errors import ConfigError
from device_agent.keys import save_public_key
from sdk.aggregator.middle import MiddleConfig
from sdk.aggregator.service_config import load_middle_service_config, load_regional_service_config
from tests.sdk.aggregator_service.test_service_config import write_regional


def write_middle(tmp_path: Path, bundle: Path, fleet_key: Ed25519PrivateKey, *, keys: str, extra: str = "") -> Path:
    """``eu`` as a middle tier with children ``eu-a`` and ``eu-b``; ``keys`` replaces the two root key lines."""
    path = write_regional(tmp_path, bundle, fleet_key)
    (tmp_path / "cells").mkdir()
    for child in ("eu-a", "eu-b"):
        save_public_key(Ed25519PrivateKey.generate().public_key(), tmp_path / "cells" / f"{child}.pub")
    text = path.read_text().replace('device_keys_dir = "devices"', 'child_keys_dir = "cells"').replace("quorum = 2\n", "")
    text = text.replace('root_verify_key = "root-sign.pub"\nroot_encryption_key = "root-enc.pub"\n', keys)
    path.write_text(text.replace("[round]\n", f"{extra}[round]\n"))
    return path


def test_middle_config_reads_children_and_counts_them_for_the_quorum(bundle_factory, fleet_key, tmp_path: Path) -> None:
    keys = 'parent = "europe"\nparent_verify_key = "root-sign.pub"\nparent_encryption_key = "root-enc.pub"\n'
    config = load_middle_service_config(write_middle(tmp_path, bundle_factory("fedavg"), fleet_key, keys=keys))
    middle = config.aggregator
    assert isinstance(middle, MiddleConfig)
    assert (middle.region, middle.parent, middle.policy.quorum, middle.policy.min_updates) == ("eu", "europe", 2, 1)
    assert sorted(middle.child_keys) == ["eu-a", "eu-b"]


@pytest.mark.parametrize("keys, extra, message", [
    ('root_verify_key = "root-sign.pub"\nparent_verify_key = "root-sign.pub"\nroot_encryption_key = "root-enc.pub"\n', "",
     "aggregator.parent_verify_key: give parent_verify_key or root_verify_key, not both"),
    ('root_verify_key = "root-sign.pub"\n', "", "aggregator.parent_encryption_key: missing"),
    ('root_verify_key = "root-sign.pub"\nroot_encryption_key = "root-enc.pub"\n', "fomo_candidates = 2\n", "fomo_candidates"),
])
def test_middle_config_mistakes_name_their_key(bundle_factory, fleet_key, tmp_path: Path, keys: str, extra: str,
                                              message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_middle_service_config(write_middle(tmp_path, bundle_factory("fedavg"), fleet_key, keys=keys, extra=extra))


def test_a_two_level_regional_file_is_unchanged_and_a_cell_names_its_parent(bundle_factory, fleet_key, tmp_path: Path) -> None:
    bundle = bundle_factory("fedavg")
    assert load_regional_service_config(write_regional(tmp_path / "two", bundle, fleet_key)).aggregator.parent is None
    (tmp_path / "three").mkdir()
    path = write_regional(tmp_path / "three", bundle, fleet_key)
    path.write_text(path.read_text().replace('region = "eu"\n', 'region = "eu"\nparent = "europe"\n'))
    assert load_regional_service_config(path).aggregator.parent == "europe"
