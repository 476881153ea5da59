"""The device's TUF client against a real repository: every protection TUF defines, one test each.

The broker is a dict (see tests/release_support.py): the TUF checks, the
signatures (Ed25519) and the repository are real; only MQTT is left out.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata

from device_agent.release.release_info import Stage
from device_agent.release.tuf_view import ReleaseRefusal
from sdk.release.keys import KeyPolicy, ReleaseKeyError, add_role_key, load_signers
from sdk.release.plan import ReleaseChoices, plan_release
from tests.release_support import ReleaseFixture, utc


@pytest.fixture
def fixture(tmp_path: Path, fleet_key) -> ReleaseFixture:
    return ReleaseFixture(tmp_path / "operator", fleet_key)


@pytest.fixture
def bundle(bundle_factory) -> Path:
    return bundle_factory("fedalt")


def test_tuf_view_lists_releases_and_stages(fixture: ReleaseFixture, bundle: Path, tmp_path: Path) -> None:
    assert fixture.view(tmp_path / "dev").releases == ()
    info = fixture.add(bundle, canary=("eu-1",))
    view = fixture.view(tmp_path / "dev")
    assert [r.release for r in view.releases] == [1]
    assert view.releases[0] == info
    assert view.stage_of(1).stage is Stage.CANARY
    fixture.stage(1, Stage.PROMOTED, "2/2 canaries healthy")
    view = fixture.view(tmp_path / "dev")
    assert view.stage_of(1).stage is Stage.PROMOTED and view.stage_of(1).reason == "2/2 canaries healthy"


def test_tuf_view_verifies_the_bundle_bytes(fixture: ReleaseFixture, bundle: Path, tmp_path: Path) -> None:
    info = fixture.add(bundle)
    view = fixture.view(tmp_path / "dev")
    out = view.verify_bundle(info, tmp_path / "bundle.fedge")
    assert out.read_bytes() == bundle.read_bytes()
    tampered = bytearray(fixture.bundles[info.sha256])
    tampered[len(tampered) // 2] ^= 1
    fixture.bundles[info.sha256] = bytes(tampered)
    with pytest.raises(ReleaseRefusal) as caught:
        fixture.view(tmp_path / "dev").verify_bundle(info, tmp_path / "bundle2.fedge")
    assert caught.value.reason == "hash_mismatch"
    assert not (tmp_path / "bundle2.fedge").exists()


def test_tuf_view_refuses_a_replayed_older_timestamp(fixture: ReleaseFixture, bundle: Path, tmp_path: Path) -> None:
    old_timestamp = fixture.broker["timestamp.json"]
    fixture.add(bundle)
    fixture.view(tmp_path / "dev")  # the device now trusts the newer timestamp
    fixture.broker["timestamp.json"] = old_timestamp  # an attacker with broker access replays the old one
    with pytest.raises(ReleaseRefusal) as caught:
        fixture.view(tmp_path / "dev")
    assert caught.value.reason == "metadata_rollback"


def test_tuf_view_refuses_expired_metadata(fixture: ReleaseFixture, bundle: Path, tmp_path: Path) -> None:
    fixture.add(bundle)
    fixture.repo.sign_timestamp(fixture.signers(), expires=utc(-60))
    fixture.publish()
    with pytest.raises(ReleaseRefusal) as caught:
        fixture.view(tmp_path / "dev")
    assert caught.value.reason == "expired_metadata"
    fixture.repo.refresh_online(fixture.signers(), force=True)  # the controller re-signs: the device recovers
    fixture.publish()
    assert [r.release for r in fixture.view(tmp_path / "dev").releases] == [1]


def test_tuf_view_refuses_mixed_versions(fixture: ReleaseFixture, bundle: Path, tmp_path: Path) -> None:
    """Mix-and-match: old targets content served under the name the new snapshot pins."""
    first = fixture.add(bundle)
    old_targets = fixture.broker[f"{fixture.repo.targets.md.signed.version}.targets.json"]
    fixture.add(bundle, publish=False)
    new_name = f"{fixture.repo.targets.md.signed.version}.targets.json"
    fixture.publish()
    fixture.broker[new_name] = old_targets
    with pytest.raises(ReleaseRefusal) as caught:
        fixture.view(tmp_path / "dev")
    assert caught.value.reason == "metadata_rollback"
    assert first.release == 1


def test_tuf_view_refuses_targets_signed_by_another_key(fixture: ReleaseFixture, bundle: Path, tmp_path: Path) -> None:
    """Arbitrary content: an attacker holding the online keys (snapshot, timestamp) but not targets cannot add a release."""
    fixture.add(bundle)
    name = f"{fixture.repo.targets.md.signed.version}.targets.json"
    forged = Metadata.from_bytes(fixture.broker[name])
    forged.signed.targets[next(iter(forged.signed.targets))].length += 1
    forged.signatures.clear()
    for signer in load_signers([fixture.key_dir], "snapshot"):
        forged.sign(signer, append=True)  # a key the root does not trust for targets
    fixture.broker[name] = forged.to_bytes()
    with pytest.raises(ReleaseRefusal) as caught:
        fixture.view(tmp_path / "fresh-device")
    assert caught.value.reason == "untrusted_metadata"


def test_tuf_view_follows_a_rotated_targets_key_and_refuses_the_old_one(fixture: ReleaseFixture, bundle: Path,
                                                                         tmp_path: Path) -> None:
    fixture.add(bundle)
    fixture.view(tmp_path / "dev")
    old_targets_keys = fixture.signers(("targets",))["targets"]
    # The targets key is compromised: the operator adds a fresh key and rotates through root v2 (2 of 3 root keys).
    index, public = add_role_key(fixture.key_dir, "targets")
    for path in fixture.key_dir.glob("targets-*"):
        if path.name not in (f"targets-{index}.key", f"targets-{index}.pub"):
            path.rename(tmp_path / path.name)  # the old keys leave the key directory
    version = fixture.repo.rotate("targets", [public], threshold=1, signers=fixture.signers())
    assert version == 2
    fixture.add(bundle)
    fixture.publish()
    view = fixture.view(tmp_path / "dev")  # a device provisioned with root v1 walks to v2: no reflashing
    assert [r.release for r in view.releases] == [1, 2]
    # The thief signs a targets file with the old key: refused now.
    name = f"{fixture.repo.targets.md.signed.version}.targets.json"
    forged = Metadata.from_bytes(fixture.broker[name])
    forged.signatures.clear()
    for signer in old_targets_keys:
        forged.sign(signer, append=True)
    fixture.broker[name] = forged.to_bytes()
    with pytest.raises(ReleaseRefusal) as caught:
        fixture.view(tmp_path / "another-device")
    assert caught.value.reason == "untrusted_metadata"


def test_tuf_view_needs_the_root_threshold_for_a_new_root(fixture: ReleaseFixture, tmp_path: Path) -> None:
    """One stolen root key (of 3, threshold 2) cannot rotate keys: a root v2 signed by it alone is refused."""
    new = Metadata.from_bytes(fixture.root_json)
    new.signed.version = 2
    new.signatures.clear()
    new.sign(load_signers([fixture.key_dir], "root")[0], append=True)
    fixture.broker["2.root.json"] = new.to_bytes()
    with pytest.raises(ReleaseRefusal) as caught:
        fixture.view(tmp_path / "dev")
    assert caught.value.reason == "untrusted_metadata"


def test_repository_refuses_to_sign_below_threshold(tmp_path: Path, fleet_key, bundle: Path) -> None:
    fixture = ReleaseFixture(tmp_path / "op", fleet_key, policy=KeyPolicy(targets_threshold=2))
    info_signers = fixture.signers()
    only_one = {**info_signers, "targets": info_signers["targets"][:1]}
    info, data = plan_release(bundle, release=1, fleet="demo", fleet_key=fleet_key.public_key(),
                              choices=ReleaseChoices(expires_ms=int(time.time() * 1000) + 10_000),
                              message_size_limit=fixture.message_size_limit)
    with pytest.raises(ReleaseKeyError, match="targets: targets was signed by 1/2 keys"):
        fixture.repo.add_release(info, data, only_one, stage=None)
    assert fixture.repo.releases() == []
    fixture.repo.add_release(info, data, info_signers, stage=None)
    fixture.publish()
    assert fixture.view(tmp_path / "dev").stage_of(1) is None  # unstaged: nobody installs it yet
    assert fixture.view(tmp_path / "dev").releases[0].release == 1
