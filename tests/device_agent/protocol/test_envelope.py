"""Sealed updates and signed models: round trips, tampering, wrong keys, and robustness to garbage."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device_agent.errors import AuthenticationError, MalformedMessageError
from device_agent.keys import key_id
from device_agent.protocol import envelope
from device_agent.protocol.envelope import open_model, open_update, seal_update, sign_model
from device_agent.protocol.headers import MessageKind, ModelHeader, UpdateHeader
from device_agent.protocol.tensor_codec import DecodeLimits, Encoding

HeaderFactory = Callable[..., UpdateHeader]
EITHER = (MalformedMessageError, AuthenticationError)


@pytest.fixture
def sealed(make_header: HeaderFactory, tensors: dict[str, np.ndarray], region_key: X25519PrivateKey, device_key: Ed25519PrivateKey) -> bytes:
    return seal_update(make_header(), tensors, recipient_public_key=region_key.public_key(), sender_key=device_key)


@pytest.fixture
def senders(device_key: Ed25519PrivateKey, other_device_key: Ed25519PrivateKey) -> dict[str, Any]:
    return {"dev-1": device_key.public_key(), "dev-2": other_device_key.public_key()}


def _open(blob: bytes, region_key: X25519PrivateKey, senders: dict[str, Any], **kwargs: Any) -> envelope.OpenedUpdate:
    return open_update(blob, recipient_key=region_key, sender_public_key=senders, **kwargs)


def _splice_header(blob: bytes, header: bytes) -> bytes:
    """Replace the header of a framed message, fixing its length prefix (an attacker's edit)."""
    old_len = struct.unpack_from("<H", blob, 5)[0]
    return blob[:5] + struct.pack("<H", len(header)) + header + blob[7 + old_len :]


@pytest.mark.parametrize("encoding", [Encoding.RAW, Encoding.FP16, Encoding.INT8])  # compressed: test_compressed_codec.py
def test_envelope_update_round_trips(
    encoding: Encoding, make_header: HeaderFactory, tensors: dict[str, np.ndarray],
    region_key: X25519PrivateKey, device_key: Ed25519PrivateKey, senders: dict[str, Any],
) -> None:
    header = make_header(encoding=encoding)
    blob = seal_update(header, tensors, recipient_public_key=region_key.public_key(), sender_key=device_key)
    opened = _open(blob, region_key, senders)
    assert opened.header == header
    assert opened.sender_key_id == key_id(device_key.public_key())
    assert sorted(opened.tensors) == sorted(tensors)
    for name, tensor in tensors.items():
        np.testing.assert_allclose(opened.tensors[name], tensor, rtol=0.01, atol=0.02)


def test_envelope_update_accepts_a_lookup_function(sealed: bytes, region_key: X25519PrivateKey, senders: dict[str, Any]) -> None:
    assert _open(sealed, region_key, senders.get).header.sender == "dev-1"  # type: ignore[arg-type]


def test_envelope_seal_uses_fresh_ephemeral_keys(make_header: HeaderFactory, tensors: dict[str, np.ndarray], region_key: X25519PrivateKey, device_key: Ed25519PrivateKey) -> None:
    one, two = (seal_update(make_header(), tensors, recipient_public_key=region_key.public_key(), sender_key=device_key) for _ in range(2))
    assert one != two


def test_envelope_digest_names_the_content_not_the_sealing(make_header: HeaderFactory, tensors: dict[str, np.ndarray],
                                                           region_key: X25519PrivateKey, device_key: Ed25519PrivateKey,
                                                           senders: dict[str, Any]) -> None:
    header = make_header()
    def sealed_copy(values: dict[str, np.ndarray]) -> bytes:
        return seal_update(header, values, recipient_public_key=region_key.public_key(), sender_key=device_key)
    one, resealed = sealed_copy(tensors), sealed_copy(tensors)  # fresh ephemeral keys: other ciphertext
    other = sealed_copy({name: value + 1 for name, value in tensors.items()})
    digests = [_open(blob, region_key, senders, with_digest=True).digest for blob in (one, resealed, other)]
    assert one != resealed and digests[0] == digests[1] != digests[2]
    assert digests[0] is not None and len(digests[0]) == 32
    assert _open(one, region_key, senders).digest is None  # only computed when asked for


def test_envelope_ciphertext_hides_the_tensors(sealed: bytes, tensors: dict[str, np.ndarray]) -> None:
    assert tensors["base.0.weight"].tobytes()[:8] not in sealed and b"base.0.weight" not in sealed


def test_envelope_header_stays_readable_for_routing(sealed: bytes) -> None:
    assert b'"sender":"dev-1"' in sealed


HEADER_EDITS: dict[str, Any] = {
    "bundle_version": 4,
    "encoding": "fp16",
    "fleet": "other",
    "kind": "aggregate",
    "nonce": "ff" * 16,
    "region": "us",
    "round": 6,
    "sample_count": 121,
    "sender": "dev-2",
    "timestamp_ms": 1_700_000_000_001,
}


@pytest.mark.parametrize("field", sorted(HEADER_EDITS))
def test_envelope_tampered_header_field_fails_authentication(field: str, sealed: bytes, region_key: X25519PrivateKey, senders: dict[str, Any]) -> None:
    header = json.loads(UpdateHeader.from_bytes(sealed[7 : 7 + struct.unpack_from("<H", sealed, 5)[0]]).to_bytes())
    assert header[field] != HEADER_EDITS[field]
    header[field] = HEADER_EDITS[field]
    edited = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(AuthenticationError):
        _open(_splice_header(sealed, edited), region_key, senders)


def test_envelope_header_fields_all_covered_by_tamper_test(make_header: HeaderFactory) -> None:
    assert set(HEADER_EDITS) | {"protocol"} == set(json.loads(make_header().to_bytes()))


@pytest.mark.parametrize(
    "where",
    ["ephemeral", "ciphertext_start", "ciphertext_middle", "tag", "signature_start", "signature_end"],
)
def test_envelope_tampered_body_fails_authentication(where: str, sealed: bytes, region_key: X25519PrivateKey, senders: dict[str, Any]) -> None:
    body_start = 7 + struct.unpack_from("<H", sealed, 5)[0]
    offset = {
        "ephemeral": body_start + 3,
        "ciphertext_start": body_start + 32,
        "ciphertext_middle": (body_start + 32 + len(sealed) - 64) // 2,
        "tag": len(sealed) - 65,
        "signature_start": len(sealed) - 64,
        "signature_end": len(sealed) - 1,
    }[where]
    tampered = bytearray(sealed)
    tampered[offset] ^= 0x01
    with pytest.raises(AuthenticationError):
        _open(bytes(tampered), region_key, senders)


def test_envelope_wrong_recipient_fails_authentication(sealed: bytes, senders: dict[str, Any]) -> None:
    with pytest.raises(AuthenticationError):
        _open(sealed, X25519PrivateKey.from_private_bytes(bytes(32 * [9])), senders)


def test_envelope_unknown_sender_fails_authentication(sealed: bytes, region_key: X25519PrivateKey, senders: dict[str, Any]) -> None:
    lookups: list[Any] = [{"dev-2": senders["dev-2"]}, lambda _sender: None, {}.__getitem__]
    for lookup in lookups:
        with pytest.raises(AuthenticationError):
            open_update(sealed, recipient_key=region_key, sender_public_key=lookup)


def test_envelope_sender_key_mismatch_fails_authentication(sealed: bytes, region_key: X25519PrivateKey, senders: dict[str, Any]) -> None:
    with pytest.raises(AuthenticationError):
        _open(sealed, region_key, {"dev-1": senders["dev-2"]})


def test_envelope_authentication_errors_are_indistinguishable(sealed: bytes, region_key: X25519PrivateKey, senders: dict[str, Any]) -> None:
    bad_signature = sealed[:-1] + bytes([sealed[-1] ^ 1])
    messages = set()
    for attempt in (
        lambda: _open(bad_signature, region_key, senders),
        lambda: _open(sealed, X25519PrivateKey.from_private_bytes(bytes(32)), senders),
        lambda: _open(sealed, region_key, {}),
    ):
        with pytest.raises(AuthenticationError) as caught:
            attempt()
        messages.add((type(caught.value), str(caught.value)))
    assert len(messages) == 1


def test_envelope_low_order_ephemeral_key_fails_authentication(sealed: bytes, region_key: X25519PrivateKey, device_key: Ed25519PrivateKey, senders: dict[str, Any]) -> None:
    body_start = 7 + struct.unpack_from("<H", sealed, 5)[0]
    unsigned = sealed[:body_start] + bytes(32) + sealed[body_start + 32 : -64]
    with pytest.raises(AuthenticationError):
        _open(unsigned + device_key.sign(unsigned), region_key, senders)


def test_envelope_verifies_signature_before_decrypting(sealed: bytes, region_key: X25519PrivateKey, senders: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = envelope.ChaCha20Poly1305

    class Recording:
        def __init__(self, key: bytes) -> None:
            self._inner = real(key)

        def decrypt(self, *args: Any) -> bytes:
            calls.append("decrypt")
            return bytes(self._inner.decrypt(*args))

    monkeypatch.setattr(envelope, "ChaCha20Poly1305", Recording)
    with pytest.raises(AuthenticationError):
        _open(sealed[:-1] + bytes([sealed[-1] ^ 1]), region_key, senders)
    assert calls == []
    _open(sealed, region_key, senders)
    assert calls == ["decrypt"]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:4] + b"\x03" + b[5:], "frame version 3"),
        (lambda b: b[:5] + b"\xff\xff" + b[7:], "record length"),
        (lambda b: b[:7 + 40], "truncated"),
        (lambda b: b[:6], "truncated"),
        (lambda b: _splice_header(b, b"{not json"), "update header"),
    ],
)
def test_envelope_structural_damage_is_malformed(mutate: Callable[[bytes], bytes], match: str, sealed: bytes, region_key: X25519PrivateKey, senders: dict[str, Any]) -> None:
    with pytest.raises(MalformedMessageError, match=match):
        _open(mutate(sealed), region_key, senders)


def test_envelope_oversized_blob_is_refused_before_any_work(sealed: bytes, region_key: X25519PrivateKey, senders: dict[str, Any]) -> None:
    limits = DecodeLimits(max_tensors=1, max_total_bytes=8)
    with pytest.raises(MalformedMessageError, match="exceeds the limit"):
        _open(sealed + bytes(10_000), region_key, senders, limits=limits)


def test_envelope_authentic_payload_over_limits_is_malformed(sealed: bytes, region_key: X25519PrivateKey, senders: dict[str, Any]) -> None:
    with pytest.raises(MalformedMessageError, match="tensors exceeds"):
        _open(sealed, region_key, senders, limits=DecodeLimits(max_tensors=2))


def test_envelope_random_truncations_and_bit_flips_never_open(
    sealed: bytes, region_key: X25519PrivateKey, senders: dict[str, Any], corruptions: Callable[..., Iterator[bytes]]
) -> None:
    for mutated in corruptions(sealed, seed=11, count=400):
        with pytest.raises(EITHER):
            _open(mutated, region_key, senders)


def test_envelope_rejects_non_bytes_input(region_key: X25519PrivateKey, senders: dict[str, Any]) -> None:
    with pytest.raises(MalformedMessageError, match="expected bytes"):
        _open("text", region_key, senders)  # type: ignore[arg-type]


def test_envelope_seal_rejects_wrong_key_types(make_header: HeaderFactory, tensors: dict[str, np.ndarray], region_key: X25519PrivateKey, device_key: Ed25519PrivateKey) -> None:
    with pytest.raises(TypeError):
        seal_update(make_header(), tensors, recipient_public_key=device_key.public_key(), sender_key=device_key)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        seal_update(make_header(), tensors, recipient_public_key=region_key.public_key(), sender_key=region_key)  # type: ignore[arg-type]


# --- signed models -------------------------------------------------------------------------


@pytest.fixture
def root_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes(range(200, 232)))


@pytest.fixture
def model_header() -> ModelHeader:
    return ModelHeader(fleet="demo", sender="root", round=5, bundle_version=3, nonce=bytes(16), timestamp_ms=1)


def test_envelope_model_round_trips_and_names_its_signer(model_header: ModelHeader, tensors: dict[str, np.ndarray], root_key: Ed25519PrivateKey, device_key: Ed25519PrivateKey) -> None:
    blob = sign_model(model_header, tensors, signer_key=root_key)
    opened = open_model(blob, trusted_signers=[device_key.public_key(), root_key.public_key()])
    assert opened.header == model_header and opened.signer_key_id == key_id(root_key.public_key())
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(opened.tensors[name], tensor)


def test_envelope_model_from_untrusted_signer_fails_authentication(model_header: ModelHeader, tensors: dict[str, np.ndarray], root_key: Ed25519PrivateKey, device_key: Ed25519PrivateKey) -> None:
    blob = sign_model(model_header, tensors, signer_key=device_key)
    with pytest.raises(AuthenticationError):
        open_model(blob, trusted_signers=root_key.public_key())


def test_envelope_model_tampering_fails_authentication(model_header: ModelHeader, tensors: dict[str, np.ndarray], root_key: Ed25519PrivateKey) -> None:
    blob = sign_model(model_header, tensors, signer_key=root_key)
    header = json.loads(model_header.to_bytes())
    header["round"] = 6
    edited = _splice_header(blob, json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    for tampered in (edited, blob[:-70] + bytes([blob[-70] ^ 1]) + blob[-69:]):
        with pytest.raises(AuthenticationError):
            open_model(tampered, trusted_signers=root_key.public_key())


def test_envelope_update_signature_never_verifies_as_model(sealed: bytes, device_key: Ed25519PrivateKey) -> None:
    with pytest.raises(MalformedMessageError, match="magic"):
        open_model(sealed, trusted_signers=device_key.public_key())
    forged = b"FDGM" + sealed[4:]
    with pytest.raises(EITHER):
        open_model(forged, trusted_signers=device_key.public_key())


def test_envelope_model_random_corruption_never_opens(
    model_header: ModelHeader, tensors: dict[str, np.ndarray], root_key: Ed25519PrivateKey, corruptions: Callable[..., Iterator[bytes]]
) -> None:
    blob = sign_model(model_header, tensors, signer_key=root_key)
    for mutated in corruptions(blob, seed=5, count=200):
        with pytest.raises(EITHER):
            open_model(mutated, trusted_signers=root_key.public_key())


def test_envelope_open_model_needs_a_trusted_key(model_header: ModelHeader, tensors: dict[str, np.ndarray], root_key: Ed25519PrivateKey) -> None:
    with pytest.raises(ValueError):
        open_model(sign_model(model_header, tensors, signer_key=root_key), trusted_signers=[])


def test_envelope_aggregate_kind_round_trips(make_header: HeaderFactory, tensors: dict[str, np.ndarray], region_key: X25519PrivateKey, device_key: Ed25519PrivateKey) -> None:
    header = make_header(kind=MessageKind.AGGREGATE, sender="agg-eu")
    blob = seal_update(header, tensors, recipient_public_key=region_key.public_key(), sender_key=device_key)
    assert _open(blob, region_key, {"agg-eu": device_key.public_key()}).header.kind is MessageKind.AGGREGATE


def test_envelope_model_header_is_verified_before_any_tensor_is_decoded(
        model_header: ModelHeader, tensors: dict[str, np.ndarray], root_key: Ed25519PrivateKey,
        device_key: Ed25519PrivateKey) -> None:
    blob = sign_model(model_header, tensors, signer_key=root_key)
    assert envelope.verified_model_header(blob, trusted_signers=[root_key.public_key()]) == model_header
    with pytest.raises(MalformedMessageError):  # the tensors are too large for these limits: the header still reads
        open_model(blob, trusted_signers=[root_key.public_key()], limits=DecodeLimits(max_tensors=1, max_total_bytes=8))
    with pytest.raises(AuthenticationError):
        envelope.verified_model_header(blob, trusted_signers=[device_key.public_key()])
    tampered = bytearray(blob)
    tampered[10] ^= 1
    with pytest.raises((AuthenticationError, MalformedMessageError)):
        envelope.verified_model_header(bytes(tampered), trusted_signers=[root_key.public_key()])
