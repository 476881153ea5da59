"""Device status: canonical signed frames, the one parser, what it refuses, and the topic helpers."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.errors import AuthenticationError, MalformedMessageError
from device_agent.protocol._frame import frame_prefix, sign_frame
from device_agent.protocol.status import (
    STATUS_MAGIC,
    DeviceStatus,
    ReleaseState,
    ReleaseStatus,
    open_status,
    release_changes,
    short_text,
    sign_status,
)
from device_agent.protocol.topics import TopicLayout


def _status(**overrides: Any) -> DeviceStatus:
    values: dict[str, Any] = dict(fleet="demo", region="eu", device="dev-1", sequence=4, timestamp_ms=1_700_000_000_000,
                                  online=True, agent_version="0.1.0", bundle_model="watch-cnn", bundle_version=2,
                                  backend="portable", last_round=7, last_round_status="accepted", last_loss=0.6931471805599453,
                                  last_val_accuracy=0.875, free_memory_bytes=512 * 1024 * 1024, uptime_s=3600,
                                  release=ReleaseStatus(state=ReleaseState.FETCHING, version=3, progress=40))
    values.update(overrides)
    return DeviceStatus(**values)


def test_status_round_trips_through_its_signed_frame(device_key: Ed25519PrivateKey) -> None:
    status = _status()
    blob = sign_status(status, signer_key=device_key)
    opened = open_status(blob, device_keys={"dev-1": device_key.public_key()}, fleet="demo", device="dev-1", region="eu")
    assert opened == status
    assert opened.release.state is ReleaseState.FETCHING and opened.release.progress == 40
    assert blob.startswith(STATUS_MAGIC) and len(blob) < 1024


def test_status_floats_travel_as_canonical_strings_and_divergence_is_reportable(device_key: Ed25519PrivateKey) -> None:
    keys = {"dev-1": device_key.public_key()}
    for loss in (float("nan"), float("inf"), -0.0, 1e-300, 12345.678):
        status = _status(last_loss=loss)
        record = json.loads(status.to_bytes())
        assert record["last_loss"] == repr(loss)
        opened = open_status(sign_status(status, signer_key=device_key), device_keys=keys, fleet="demo")
        assert repr(opened.last_loss) == repr(loss)
    assert not _status(last_loss=float("nan")).loss_is_finite
    assert _status(last_loss=0.5).loss_is_finite and not _status(last_loss=None).loss_is_finite


def test_status_unknown_fields_stay_none_before_anything_happened(device_key: Ed25519PrivateKey) -> None:
    bare = DeviceStatus(fleet="demo", region="eu", device="dev-1", sequence=0, timestamp_ms=0, online=False,
                        agent_version="0.1.0")
    opened = open_status(sign_status(bare, signer_key=device_key), device_keys={"dev-1": device_key.public_key()},
                         fleet="demo")
    assert (opened.bundle_version, opened.last_round, opened.last_loss, opened.release.state) == (None, None, None,
                                                                                                 ReleaseState.IDLE)


def test_status_signed_by_another_device_or_unknown_fails_authentication(
        device_key: Ed25519PrivateKey, other_device_key: Ed25519PrivateKey) -> None:
    keys = {"dev-1": device_key.public_key(), "dev-2": other_device_key.public_key()}
    forged = sign_status(_status(device="dev-1"), signer_key=other_device_key)  # dev-2 speaks for dev-1
    with pytest.raises(AuthenticationError):
        open_status(forged, device_keys=keys, fleet="demo")
    with pytest.raises(AuthenticationError):
        open_status(sign_status(_status(device="dev-9"), signer_key=device_key), device_keys=keys, fleet="demo")
    tampered = sign_status(_status(), signer_key=device_key).replace(b'"accepted"', b'"rejected"')
    with pytest.raises(AuthenticationError):
        open_status(tampered, device_keys=keys, fleet="demo")


def test_status_on_the_wrong_topic_or_fleet_is_malformed(device_key: Ed25519PrivateKey) -> None:
    keys = {"dev-1": device_key.public_key()}
    blob = sign_status(_status(), signer_key=device_key)
    for kwargs in ({"fleet": "other"}, {"fleet": "demo", "device": "dev-2"}, {"fleet": "demo", "region": "us"}):
        with pytest.raises(MalformedMessageError):
            open_status(blob, device_keys=keys, **kwargs)


def test_status_non_canonical_record_is_refused_even_when_validly_signed(device_key: Ed25519PrivateKey) -> None:
    keys = {"dev-1": device_key.public_key()}
    record = json.loads(_status().to_bytes())
    for field, value in (("last_loss", "0.69314718055994530"), ("last_loss", 0.5), ("online", 1),
                         ("release", {"state": "idle"}), ("last_round_status", "Accepted!")):
        bad = dict(record, **{field: value})
        raw = json.dumps(bad, sort_keys=True, separators=(",", ":")).encode()
        with pytest.raises(MalformedMessageError):
            open_status(sign_frame(frame_prefix(STATUS_MAGIC, raw), device_key), device_keys=keys, fleet="demo")
    spaced = json.dumps(record, sort_keys=True).encode()
    with pytest.raises(MalformedMessageError):
        open_status(sign_frame(frame_prefix(STATUS_MAGIC, spaced), device_key), device_keys=keys, fleet="demo")


def test_status_random_corruption_never_opens(device_key: Ed25519PrivateKey,
                                              corruptions: Callable[..., Iterator[bytes]]) -> None:
    blob = sign_status(_status(), signer_key=device_key)
    for mutated in corruptions(blob, seed=11, count=200):
        with pytest.raises((MalformedMessageError, AuthenticationError)):
            open_status(mutated, device_keys={"dev-1": device_key.public_key()}, fleet="demo")


@pytest.mark.parametrize("bad", [dict(agent_version="1 0"), dict(release={"state": "idle", "version": None, "progress": 101, "reason": ""}),
                                 dict(last_round_reason="x" * 201), dict(last_round_reason="line\nbreak"),
                                 dict(free_memory_bytes=-1), dict(online="yes"), dict(backend="a/b")])
def test_status_invalid_fields_are_value_errors(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _status(**bad)


def test_release_changes_merge_fields_and_reject_unknown_ones() -> None:
    current = ReleaseStatus(state="fetching", version=3, progress=10)
    merged = release_changes(current, {"progress": 90})
    assert (merged.state, merged.version, merged.progress) == (ReleaseState.FETCHING, 3, 90)
    assert release_changes(current, ReleaseStatus()) == ReleaseStatus()
    with pytest.raises(ValueError):
        release_changes(current, {"colour": "red"})


def test_short_text_makes_one_printable_line_within_the_limit() -> None:
    assert short_text("refused:\n  expired   metadata") == "refused: expired metadata"
    assert short_text("é" * 5) == "?????"
    cut = short_text("y" * 500)
    assert len(cut) == 200 and cut.endswith("...")


def test_status_topics_name_device_and_region_and_parse_back() -> None:
    layout = TopicLayout(fleet="demo")
    assert layout.device_status("dev-1") == "fedge/demo/dev/dev-1/status"
    assert layout.region_device_status("eu", "dev-1") == "fedge/demo/region/eu/dev/dev-1/status"
    assert layout.status_source("fedge/demo/dev/dev-1/status") == (None, "dev-1")
    assert layout.status_source("fedge/demo/region/eu/dev/dev-1/status") == ("eu", "dev-1")
    for other in ("fedge/demo/dev/dev-1/presence", "fedge/other/dev/dev-1/status", "fedge/demo/dev/status",
                  "fedge/demo/region/eu/up/status"):
        assert layout.status_source(other) is None
    with pytest.raises(ValueError):
        layout.device_status("a/b")
