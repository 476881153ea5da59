"""Signed model deltas (FDGD) and the model header's round compression field."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.compression import CompressionSpec, compress_delta
from device_agent.errors import AuthenticationError, MalformedMessageError
from device_agent.protocol.envelope import open_model, sign_model
from device_agent.protocol.headers import ModelDeltaHeader, ModelHeader
from device_agent.protocol.model_delta import model_digest, open_model_delta, sign_model_delta

_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(7, 39)))
_OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(50, 82)))


def _delta_header(**overrides) -> ModelDeltaHeader:
    fields = dict(fleet="f", sender="region-a", region="a", round=4, bundle_version=1, encoding="q8", base_round=3,
                  base_digest=b"\x01" * 32, digest=b"\x02" * 32, nonce=b"\x03" * 16, timestamp_ms=5)
    fields.update(overrides)
    return ModelDeltaHeader(**fields)


def _tensors():
    delta = {"w": np.linspace(-1, 1, 40, dtype=np.float32).reshape(8, 5)}
    return compress_delta(delta, None, CompressionSpec.parse("q8")).tensors


def test_a_signed_delta_opens_to_what_was_sent_and_only_with_a_trusted_key():
    blob = sign_model_delta(_delta_header(), _tensors(), signer_key=_KEY)
    opened = open_model_delta(blob, trusted_signers=[_OTHER.public_key(), _KEY.public_key()])
    assert opened.header == _delta_header()
    assert np.array_equal(opened.tensors["w"], _tensors()["w"].to_dense())
    with pytest.raises(AuthenticationError):
        open_model_delta(blob, trusted_signers=_OTHER.public_key())
    forged = bytearray(blob)
    forged[-80] ^= 1  # a payload byte
    with pytest.raises(AuthenticationError):
        open_model_delta(bytes(forged), trusted_signers=_KEY.public_key())


def test_a_delta_never_opens_as_a_model_nor_a_model_as_a_delta():
    delta = sign_model_delta(_delta_header(), _tensors(), signer_key=_KEY)
    model = sign_model(ModelHeader(fleet="f", sender="r", round=4, bundle_version=1, nonce=b"\x03" * 16, timestamp_ms=5),
                       {"w": np.zeros((8, 5), np.float32)}, signer_key=_KEY)
    with pytest.raises(MalformedMessageError):
        open_model(delta, trusted_signers=_KEY.public_key())
    with pytest.raises(MalformedMessageError):
        open_model_delta(model, trusted_signers=_KEY.public_key())


@pytest.mark.parametrize("overrides", [dict(base_round=4), dict(base_round=9), dict(base_digest=b"\x01" * 31),
                                       dict(digest=None), dict(compression="topk:0.30")])
def test_a_delta_header_refuses_bad_fields(overrides):
    with pytest.raises(ValueError):
        _delta_header(**overrides)


def test_model_headers_without_a_round_compression_keep_their_bytes_and_with_one_carry_it():
    plain = ModelHeader(fleet="f", sender="r", round=4, bundle_version=1, nonce=b"\x03" * 16, timestamp_ms=5)
    assert b"compression" not in plain.to_bytes()
    assert ModelHeader.from_bytes(plain.to_bytes()) == plain
    override = ModelHeader(fleet="f", sender="r", round=4, bundle_version=1, nonce=b"\x03" * 16, timestamp_ms=5,
                           compression="topk:0.3+q4")
    assert b'"compression":"topk:0.3+q4"' in override.to_bytes()
    assert ModelHeader.from_bytes(override.to_bytes()).compression == "topk:0.3+q4"
    spelled_null = plain.to_bytes().replace(b'"bundle_version":1,', b'"bundle_version":1,"compression":null,')
    with pytest.raises(MalformedMessageError):
        ModelHeader.from_bytes(spelled_null)  # one spelling only: absent, never null


def test_the_digest_names_the_model_bit_for_bit():
    a = {"w": np.zeros(3, np.float32), "b": np.ones(2, np.float32)}
    assert model_digest(a) == model_digest(dict(reversed(a.items())))
    assert model_digest(a) != model_digest(dict(a, w=np.array([0, 0, -0.0], np.float32)))
