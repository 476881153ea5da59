"""FedFomo over the wire: signed candidate requests and candidate models sealed to the requester."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device_agent.errors import AuthenticationError, MalformedMessageError
from device_agent.keys import raw_public_bytes
from device_agent.protocol.candidate_request import CandidateRequest, open_candidate_request, sign_candidate_request
from device_agent.protocol.envelope import open_candidates, open_update, seal_candidates
from device_agent.protocol.headers import CandidatesHeader, MessageKind
from device_agent.protocol import envelope
from device_agent.protocol.tensor_codec import DecodeLimits, encode_tensors

REPLY = X25519PrivateKey.from_private_bytes(bytes(range(200, 232)))


@pytest.fixture
def region_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes(range(64, 96)))


def _request(**overrides: Any) -> CandidateRequest:
    fields: dict[str, Any] = dict(fleet="demo", region="eu", device="dev-1", round=4, k=3, prefer=("dev-7", "dev-2"),
                                  reply_key=raw_public_bytes(REPLY.public_key()), clock=lambda: 12.5,
                                  random_bytes=lambda n: b"\x01" * n)
    fields.update(overrides)
    return CandidateRequest.create(**fields)


def _keys(device_key: Ed25519PrivateKey) -> dict[str, Any]:
    return {"dev-1": device_key.public_key()}


def test_candidate_request_round_trips(device_key: Ed25519PrivateKey) -> None:
    request = _request()
    blob = sign_candidate_request(request, signer_key=device_key)
    opened = open_candidate_request(blob, device_keys=_keys(device_key), fleet="demo", region="eu")
    assert opened == request
    assert opened.prefer == ("dev-7", "dev-2") and opened.k == 3 and opened.timestamp_ms == 12500
    assert opened.nonce == b"\x01" * 16 and opened.reply_key == raw_public_bytes(REPLY.public_key())


def test_candidate_request_forged_or_tampered_fails_authentication(device_key: Ed25519PrivateKey,
                                                                   other_device_key: Ed25519PrivateKey) -> None:
    forged = sign_candidate_request(_request(), signer_key=other_device_key)  # dev-2 claims to be dev-1
    with pytest.raises(AuthenticationError):
        open_candidate_request(forged, device_keys=_keys(device_key), fleet="demo", region="eu")
    blob = sign_candidate_request(_request(), signer_key=device_key)
    with pytest.raises(AuthenticationError):
        open_candidate_request(blob.replace(b'"k":3', b'"k":9'), device_keys=_keys(device_key), fleet="demo", region="eu")
    with pytest.raises(AuthenticationError):  # unknown device
        open_candidate_request(blob, device_keys={}, fleet="demo", region="eu")
    with pytest.raises(AuthenticationError):
        open_candidate_request(blob, device_keys=lambda device: None, fleet="demo", region="eu")


def test_candidate_request_for_another_fleet_or_region_is_malformed(device_key: Ed25519PrivateKey) -> None:
    blob = sign_candidate_request(_request(), signer_key=device_key)
    with pytest.raises(MalformedMessageError, match="demo/eu"):
        open_candidate_request(blob, device_keys=_keys(device_key), fleet="demo", region="us")
    with pytest.raises(MalformedMessageError):
        open_candidate_request(blob, device_keys=_keys(device_key), fleet="other", region="eu")


def test_candidate_request_truncated_or_padded_is_malformed(device_key: Ed25519PrivateKey,
                                                            corruptions: Callable[..., Iterator[bytes]]) -> None:
    blob = sign_candidate_request(_request(), signer_key=device_key)
    for cut in (0, 3, 7, len(blob) // 2, len(blob) - 65):
        with pytest.raises(MalformedMessageError):
            open_candidate_request(blob[:cut], device_keys=_keys(device_key), fleet="demo", region="eu")
    with pytest.raises(MalformedMessageError, match="exceeds"):
        open_candidate_request(blob + bytes(5000), device_keys=_keys(device_key), fleet="demo", region="eu")
    for mutated in corruptions(blob, seed=5, count=200):
        with pytest.raises((MalformedMessageError, AuthenticationError)):
            open_candidate_request(mutated, device_keys=_keys(device_key), fleet="demo", region="eu")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"k": 0}, "k must be"),
        ({"k": 33}, "k must be"),
        ({"k": True}, "k must be"),
        ({"k": 1, "prefer": ("a", "b")}, "at most 1"),
        ({"prefer": ("a", "a")}, "twice"),
        ({"prefer": ("bad/id",)}, "valid id"),
        ({"reply_key": b"\x00" * 31}, "reply_key"),
        ({"device": "+"}, "valid id"),
    ],
)
def test_candidate_request_refuses_bad_fields(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _request(**overrides)


def test_candidate_request_k_bounds_hold_on_the_wire(device_key: Ed25519PrivateKey) -> None:
    blob = sign_candidate_request(_request(k=32, prefer=()), signer_key=device_key)
    assert open_candidate_request(blob, device_keys=_keys(device_key), fleet="demo", region="eu").k == 32
    raw = _request(k=1, prefer=()).to_bytes().replace(b'"k":1', b'"k":33')
    with pytest.raises(MalformedMessageError, match="k must be"):
        CandidateRequest.from_bytes(raw)


def _header(**overrides: Any) -> CandidatesHeader:
    fields: dict[str, Any] = dict(fleet="demo", sender="eu", region="eu", recipient="dev-1", round=4, bundle_version=3,
                                  request_nonce=b"\x01" * 16, peers=("dev-2", "dev-3"), peer_rounds=(4, 3))
    fields.update(overrides)
    return CandidatesHeader.create(**fields)


def _models() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"w": rng.standard_normal((3, 2)).astype(np.float32), "b": rng.standard_normal(2).astype(np.float32)}
            for _ in range(2)]


def test_candidates_round_trip_to_the_reply_key(region_signing_key: Ed25519PrivateKey) -> None:
    models = _models()
    blob = seal_candidates(_header(), models, recipient_public_key=REPLY.public_key(), signer_key=region_signing_key)
    opened = open_candidates(blob, recipient_key=REPLY, trusted_signers=region_signing_key.public_key())
    assert opened.header.kind is MessageKind.CANDIDATES
    assert opened.header.peers == ("dev-2", "dev-3") and opened.header.peer_rounds == (4, 3)
    for got, want in zip(opened.models, models):
        assert sorted(got) == ["b", "w"]
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    empty = seal_candidates(_header(peers=(), peer_rounds=()), [], recipient_public_key=REPLY.public_key(),
                            signer_key=region_signing_key)
    assert open_candidates(empty, recipient_key=REPLY, trusted_signers=region_signing_key.public_key()).models == ()


def test_candidates_wrong_key_or_tampering_fails_authentication(region_signing_key: Ed25519PrivateKey,
                                                                device_key: Ed25519PrivateKey,
                                                                region_key: X25519PrivateKey) -> None:
    blob = seal_candidates(_header(), _models(), recipient_public_key=REPLY.public_key(), signer_key=region_signing_key)
    with pytest.raises(AuthenticationError):  # not signed by a trusted region
        open_candidates(blob, recipient_key=REPLY, trusted_signers=device_key.public_key())
    with pytest.raises(AuthenticationError):  # sealed to another key
        open_candidates(blob, recipient_key=region_key, trusted_signers=region_signing_key.public_key())
    with pytest.raises(AuthenticationError):
        open_candidates(blob.replace(b'"dev-2"', b'"dev-9"'), recipient_key=REPLY,
                        trusted_signers=region_signing_key.public_key())
    with pytest.raises(MalformedMessageError):  # a candidates frame is never an update
        open_update(blob, recipient_key=REPLY, sender_public_key={"eu": region_signing_key.public_key()})


def test_candidates_truncated_or_over_the_limits_is_malformed(region_signing_key: Ed25519PrivateKey) -> None:
    blob = seal_candidates(_header(), _models(), recipient_public_key=REPLY.public_key(), signer_key=region_signing_key)
    for cut in (5, 60, len(blob) - 100):
        with pytest.raises((MalformedMessageError, AuthenticationError)):
            open_candidates(blob[:cut], recipient_key=REPLY, trusted_signers=region_signing_key.public_key())
    with pytest.raises(MalformedMessageError):
        open_candidates(blob, recipient_key=REPLY, trusted_signers=region_signing_key.public_key(),
                        limits=DecodeLimits(max_tensors=3, max_total_bytes=1000))


def test_candidates_tensors_must_belong_to_header_peers(region_signing_key: Ed25519PrivateKey) -> None:
    models = _models()
    with pytest.raises(ValueError, match="2 peers but 1"):
        seal_candidates(_header(), models[:1], recipient_public_key=REPLY.public_key(), signer_key=region_signing_key)
    one_peer = _header(peers=("dev-2",), peer_rounds=(4,))
    for names in (["0/w", "1/w"], ["0/w", "01/b"], ["0/w", "w"], ["0/"]):
        # Sealed by hand: tensors that name no peer of the header (or no parameter).
        payload = encode_tensors({name: np.zeros(2, dtype=np.float32) for name in names})
        blob = envelope._seal(envelope.CANDIDATES_MAGIC, one_peer.to_bytes(), payload, recipient_public_key=REPLY.public_key(),
                              sender_key=region_signing_key, ephemeral_key=None)
        with pytest.raises(MalformedMessageError, match="names no peer"):
            open_candidates(blob, recipient_key=REPLY, trusted_signers=region_signing_key.public_key())
    empty_model = seal_candidates(one_peer, [{}], recipient_public_key=REPLY.public_key(), signer_key=region_signing_key)
    with pytest.raises(MalformedMessageError, match="no tensors"):
        open_candidates(empty_model, recipient_key=REPLY, trusted_signers=region_signing_key.public_key())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"peers": ("dev-1",), "peer_rounds": (1,)}, "own model"),
        ({"peers": ("dev-2",), "peer_rounds": ()}, "one round per peer"),
        ({"peers": tuple(f"d{i}" for i in range(33)), "peer_rounds": (0,) * 33}, "at most 32"),
        ({"request_nonce": b"x"}, "request_nonce"),
    ],
)
def test_candidates_header_refuses_bad_fields(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _header(**overrides)
