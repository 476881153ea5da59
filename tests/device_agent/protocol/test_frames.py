"""Frame version 2 (prehashed signatures) beside version 1: round trips, digests, version binding, who reads what."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device_agent.errors import AuthenticationError, MalformedMessageError
from device_agent.protocol._frame import PREHASH_CONTEXT, frame_prefix, sign_frame
from device_agent.protocol.envelope import MODEL_MAGIC, open_model, open_update, seal_update
from device_agent.protocol.frame_versions import FRAME_PREHASHED, FRAME_V1, choose_frame_version, parse_frame_versions
from device_agent.protocol.headers import ModelHeader, UpdateHeader
from device_agent.protocol.receipts import RECEIPT_MAGIC, Receipt, open_receipt
from device_agent.protocol.tensor_codec import Encoding

HeaderFactory = Callable[..., UpdateHeader]


@pytest.fixture
def senders(device_key: Ed25519PrivateKey) -> dict[str, Any]:
    return {"dev-1": device_key.public_key()}


def _seal(header: UpdateHeader, tensors: dict[str, np.ndarray], region_key: X25519PrivateKey, device_key: Ed25519PrivateKey,
          version: int) -> bytes:
    return seal_update(header, tensors, recipient_public_key=region_key.public_key(), sender_key=device_key, frame_version=version)


@pytest.mark.parametrize("encoding", [Encoding.RAW, Encoding.FP16, Encoding.INT8])
def test_frames_prehashed_update_round_trips_and_its_digest_is_the_signed_hash(
        encoding: Encoding, make_header: HeaderFactory, tensors: dict[str, np.ndarray], region_key: X25519PrivateKey,
        device_key: Ed25519PrivateKey, senders: dict[str, Any]) -> None:
    header = make_header(encoding=encoding)
    blob = _seal(header, tensors, region_key, device_key, FRAME_PREHASHED)
    assert blob[:5] == b"FDGU\x02"
    opened = open_update(blob, recipient_key=region_key, sender_public_key=senders, with_digest=True)
    assert opened.header == header and opened.frame_version == 2
    assert opened.digest == hashlib.sha256(blob[:-64]).digest()
    device_key.public_key().verify(blob[-64:], PREHASH_CONTEXT + hashlib.sha256(blob[:-64]).digest())
    v1 = open_update(_seal(header, tensors, region_key, device_key, FRAME_V1), recipient_key=region_key,
                     sender_public_key=senders, with_digest=True)
    assert v1.frame_version == 1 and sorted(v1.tensors) == sorted(opened.tensors)
    for name in tensors:
        np.testing.assert_array_equal(v1.tensors[name], opened.tensors[name])


def test_frames_prehashed_digest_matches_a_byte_identical_resend_only(
        make_header: HeaderFactory, tensors: dict[str, np.ndarray], region_key: X25519PrivateKey,
        device_key: Ed25519PrivateKey, senders: dict[str, Any]) -> None:
    header = make_header()
    one = _seal(header, tensors, region_key, device_key, FRAME_PREHASHED)
    resealed = _seal(header, tensors, region_key, device_key, FRAME_PREHASHED)  # fresh ephemeral key: other bytes
    digests = [open_update(b, recipient_key=region_key, sender_public_key=senders, with_digest=True).digest
               for b in (one, bytes(one), resealed)]
    assert digests[0] == digests[1] != digests[2]
    assert open_update(one, recipient_key=region_key, sender_public_key=senders).digest is None


@pytest.mark.parametrize(("signed_as", "relabelled"), [(1, 2), (2, 1)])
def test_frames_version_byte_is_signed(signed_as: int, relabelled: int, make_header: HeaderFactory,
                                       tensors: dict[str, np.ndarray], region_key: X25519PrivateKey,
                                       device_key: Ed25519PrivateKey, senders: dict[str, Any]) -> None:
    blob = _seal(make_header(), tensors, region_key, device_key, signed_as)
    with pytest.raises(AuthenticationError):
        open_update(blob[:4] + bytes([relabelled]) + blob[5:], recipient_key=region_key, sender_public_key=senders)


def test_frames_a_signature_over_the_other_message_does_not_verify(
        make_header: HeaderFactory, tensors: dict[str, np.ndarray], region_key: X25519PrivateKey,
        device_key: Ed25519PrivateKey, senders: dict[str, Any]) -> None:
    v2 = _seal(make_header(), tensors, region_key, device_key, FRAME_PREHASHED)
    unsigned = v2[:-64]
    for wrong in (device_key.sign(unsigned), device_key.sign(hashlib.sha256(unsigned).digest())):  # no context string
        with pytest.raises(AuthenticationError):
            open_update(unsigned + wrong, recipient_key=region_key, sender_public_key=senders)


@pytest.mark.parametrize(("accepted", "refused"), [(frozenset({1}), 2), (frozenset({2}), 1)])
def test_frames_a_reader_refuses_versions_it_was_not_told_to_accept(
        accepted: frozenset[int], refused: int, make_header: HeaderFactory, tensors: dict[str, np.ndarray],
        region_key: X25519PrivateKey, device_key: Ed25519PrivateKey, senders: dict[str, Any]) -> None:
    blob = _seal(make_header(), tensors, region_key, device_key, refused)
    with pytest.raises(MalformedMessageError, match=f"unsupported frame version {refused}"):
        open_update(blob, recipient_key=region_key, sender_public_key=senders, frame_versions=accepted)


def test_frames_models_and_receipts_stay_version_1(device_key: Ed25519PrivateKey) -> None:
    header = ModelHeader(fleet="demo", sender="root", round=5, bundle_version=3, nonce=bytes(16), timestamp_ms=1)
    model = sign_frame(frame_prefix(MODEL_MAGIC, header.to_bytes(), version=2) + b"", device_key)
    with pytest.raises(MalformedMessageError, match="unsupported frame version 2"):
        open_model(model, trusted_signers=device_key.public_key())
    receipt = Receipt(fleet="demo", issuer="agg", device="dev-1", round=1, update_nonce=bytes(16), status="accepted",
                      reason="", timestamp_ms=1)
    blob = sign_frame(frame_prefix(RECEIPT_MAGIC, receipt.to_bytes(), version=2), device_key)
    with pytest.raises(MalformedMessageError, match="unsupported frame version 2"):
        open_receipt(blob, trusted_signers=device_key.public_key())


def test_frames_random_damage_to_a_prehashed_update_never_opens(
        make_header: HeaderFactory, tensors: dict[str, np.ndarray], region_key: X25519PrivateKey,
        device_key: Ed25519PrivateKey, senders: dict[str, Any], corruptions: Callable[..., Iterator[bytes]]) -> None:
    blob = _seal(make_header(), tensors, region_key, device_key, FRAME_PREHASHED)
    for mutated in corruptions(blob, seed=12, count=300):
        with pytest.raises((AuthenticationError, MalformedMessageError)):
            open_update(mutated, recipient_key=region_key, sender_public_key=senders)


@pytest.mark.parametrize(("announced", "chosen"), [(None, 1), ((1,), 1), ((1, 2), 2), ((2,), 2), ((1, 2, 7), 2), ((7,), 1)])
def test_frames_sender_picks_the_highest_version_both_read(announced: tuple[int, ...] | None, chosen: int) -> None:
    assert choose_frame_version(announced) == chosen


def test_frames_parse_settings_text() -> None:
    assert parse_frame_versions("1,2") == {1, 2} and parse_frame_versions(" 2 ") == {2}
    for bad in ("", "3", "1,x", "0", "-1"):
        with pytest.raises(ValueError, match="frame version"):
            parse_frame_versions(bad)


def test_frames_model_header_field_is_canonical_and_left_out_when_absent() -> None:
    fields: dict[str, Any] = dict(fleet="demo", sender="root", round=5, bundle_version=3, nonce=bytes(16), timestamp_ms=1)
    plain = ModelHeader(**fields)
    assert b"frames" not in plain.to_bytes() and plain.frames is None
    announced = ModelHeader(**fields, frames=[1, 2])
    assert announced.frames == (1, 2) and b'"frames":[1,2]' in announced.to_bytes()
    assert ModelHeader.from_bytes(announced.to_bytes()) == announced
    for bad in ((), (2, 1), (1, 1), (0,), (256,), (True,), "12", tuple(range(1, 10))):
        with pytest.raises(ValueError, match="frames"):
            ModelHeader(**fields, frames=bad)
    with pytest.raises(MalformedMessageError):
        ModelHeader.from_bytes(plain.to_bytes()[:-1] + b',"frames":null}')
