"""Known-answer vectors: the wire format, byte for byte, as stored in ``vectors/*.json``.

The vectors pin the protocol: any change to a layout, the KDF, the AEAD or
the canonical header makes these tests fail. After an intended protocol
change (with a version bump), regenerate them with
``python tests/device_agent/protocol/test_vectors.py --regenerate`` and review the diff.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from device_agent.keys import key_id
from device_agent.protocol.chunking import Reassembler, split_message
from device_agent.protocol.envelope import open_model, open_update, seal_update, sign_model
from device_agent.protocol.headers import ModelHeader, UpdateHeader
from device_agent.protocol.raw_keys import key_to_raw
from device_agent.protocol.receipts import Receipt, open_receipt, sign_receipt
from device_agent.protocol.tensor_codec import decode_tensors, encode_tensors

VECTORS = Path(__file__).parent / "vectors"


# --- inputs (only used to (re)generate the files) ------------------------------------------


def _inputs() -> dict[str, Any]:
    tensors: dict[str, np.ndarray] = {
        "base.0.weight": np.array([[0.5, -1.25, 3.0], [1e-3, -7.5, 0.0]], dtype=np.float32),
        "base.0.bias": np.array([0.125, -0.25], dtype=np.float32),
        "head.scale": np.array(2.0, dtype=np.float64),
        "steps": np.array([3, -4], dtype=np.int64),
    }
    update_header = {
        "protocol": 1, "kind": "update", "fleet": "demo", "region": "eu", "sender": "dev-1", "round": 7,
        "bundle_version": 2, "sample_count": 64, "encoding": "raw", "nonce": "00112233445566778899aabbccddeeff",
        "timestamp_ms": 1700000000123,
    }
    model_header = {
        "protocol": 1, "kind": "model", "fleet": "demo", "region": None, "sender": "root", "round": 8,
        "bundle_version": 2, "encoding": "fp16", "nonce": "ffeeddccbbaa99887766554433221100", "timestamp_ms": 1700000000456,
    }
    receipt = {
        "protocol": 1, "fleet": "demo", "issuer": "agg-eu", "device": "dev-1", "round": 7,
        "update_nonce": "00112233445566778899aabbccddeeff", "status": "rejected", "reason": "norm", "timestamp_ms": 1700000000789,
    }
    return {
        "tensors": {name: _tensor_json(t) for name, t in tensors.items()},
        "update_header": update_header,
        "model_header": model_header,
        "receipt": receipt,
        "keys": {
            "device_ed25519": bytes(range(1, 33)).hex(),
            "region_x25519": bytes(range(33, 65)).hex(),
            "ephemeral_x25519": bytes(range(65, 97)).hex(),
            "root_ed25519": bytes(range(97, 129)).hex(),
        },
        "chunk_message_id": "0f" * 16,
    }


def _tensor_json(tensor: np.ndarray) -> dict[str, Any]:
    return {"dtype": tensor.dtype.name, "shape": list(tensor.shape), "data": tensor.astype(tensor.dtype.newbyteorder("<")).tobytes().hex()}


def _tensors(data: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        name: np.frombuffer(bytes.fromhex(t["data"]), dtype=np.dtype(t["dtype"]).newbyteorder("<")).reshape(t["shape"])
        for name, t in data.items()
    }


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


# --- computing outputs from inputs (shared by the tests and the generator) -----------------


def _keys(inputs: dict[str, Any]) -> dict[str, Any]:
    raw = {name: bytes.fromhex(value) for name, value in inputs["keys"].items()}
    return {
        "device": Ed25519PrivateKey.from_private_bytes(raw["device_ed25519"]),
        "region": X25519PrivateKey.from_private_bytes(raw["region_x25519"]),
        "ephemeral": X25519PrivateKey.from_private_bytes(raw["ephemeral_x25519"]),
        "root": Ed25519PrivateKey.from_private_bytes(raw["root_ed25519"]),
    }


def _outputs(inputs: dict[str, Any]) -> dict[str, Any]:
    keys, tensors = _keys(inputs), _tensors(inputs["tensors"])
    update_header = UpdateHeader.from_bytes(_canonical(inputs["update_header"]))
    sealed = {}
    for encoding in ("raw", "int8"):
        header = UpdateHeader.from_bytes(_canonical({**inputs["update_header"], "encoding": encoding}))
        sealed[encoding] = seal_update(
            header, tensors, recipient_public_key=keys["region"].public_key(), sender_key=keys["device"], ephemeral_key=keys["ephemeral"]
        ).hex()
    model = sign_model(ModelHeader.from_bytes(_canonical(inputs["model_header"])), tensors, signer_key=keys["root"])
    receipt = sign_receipt(Receipt.from_bytes(_canonical(inputs["receipt"])), signer_key=keys["root"])
    message_id = bytes.fromhex(inputs["chunk_message_id"])
    return {
        "key_ids": {name: key_id(key.public_key()) for name, key in sorted(keys.items())},
        "public_keys": {name: key_to_raw(key.public_key()).hex() for name, key in sorted(keys.items())},
        "update_header_bytes": update_header.to_bytes().decode(),
        "tensor_payloads": {enc: encode_tensors(tensors, encoding=enc).hex() for enc in ("raw", "fp16", "int8")},
        "sealed_updates": sealed,
        "signed_model": model.hex(),
        "signed_receipt": receipt.hex(),
        "chunks": [f.hex() for f in split_message(model, max_frame_bytes=200, random_bytes=lambda n: message_id[:n])],
    }


def write_vectors(path: Path, description: str, inputs: dict[str, Any], outputs: Callable[[dict[str, Any]], dict[str, Any]],
                  **extra: str) -> None:
    """Write a vectors file: ``inputs`` (as JSON gives them back) and what ``outputs`` computes from them."""
    inputs = json.loads(json.dumps(inputs))
    document = {"description": description, **extra, "inputs": inputs, "outputs": outputs(inputs)}
    path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")


def _load() -> dict[str, Any]:
    return json.loads((VECTORS / "protocol_v1.json").read_text())


# --- tests ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    return _load()


@pytest.mark.parametrize(
    "section", ["key_ids", "public_keys", "update_header_bytes", "tensor_payloads", "sealed_updates", "signed_model", "signed_receipt", "chunks"]
)
def test_vectors_reproduce_byte_for_byte(vectors: dict[str, Any], section: str) -> None:
    assert _outputs(vectors["inputs"])[section] == vectors["outputs"][section]


def test_vectors_inputs_are_the_documented_ones(vectors: dict[str, Any]) -> None:
    assert vectors["inputs"] == json.loads(json.dumps(_inputs()))


@pytest.mark.parametrize("encoding", ["raw", "int8"])
def test_vectors_sealed_updates_open(vectors: dict[str, Any], encoding: str) -> None:
    keys, expected = _keys(vectors["inputs"]), _tensors(vectors["inputs"]["tensors"])
    opened = open_update(
        bytes.fromhex(vectors["outputs"]["sealed_updates"][encoding]),
        recipient_key=keys["region"],
        sender_public_key={"dev-1": keys["device"].public_key()},
    )
    assert opened.header.encoding.value == encoding and opened.header.round == 7
    for name, tensor in expected.items():
        np.testing.assert_allclose(opened.tensors[name], tensor, atol=0.02)


def test_vectors_sealed_update_follows_the_documented_construction(vectors: dict[str, Any]) -> None:
    """Re-derive the raw vector from the primitives as docs/protocol.md describes, without envelope.py."""
    keys, outputs = _keys(vectors["inputs"]), vectors["outputs"]
    blob = bytes.fromhex(outputs["sealed_updates"]["raw"])
    header_len = int.from_bytes(blob[5:7], "little")
    header, rest = blob[7 : 7 + header_len], blob[7 + header_len :]
    ephemeral_public, ciphertext, signature = rest[:32], rest[32:-64], rest[-64:]
    assert blob[:5] == b"FDGU\x01" and header == outputs["update_header_bytes"].encode()
    keys["device"].public_key().verify(signature, blob[:-64])
    recipient_public = key_to_raw(keys["region"].public_key())
    assert ephemeral_public == key_to_raw(keys["ephemeral"].public_key())
    shared = keys["region"].exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
    okm = HKDF(
        algorithm=SHA256(), length=44, salt=hashlib.sha256(header).digest(),
        info=b"fedge-seal-v1\x00" + ephemeral_public + recipient_public,
    ).derive(shared)
    aad = blob[: 7 + header_len + 32]
    plaintext = ChaCha20Poly1305(okm[:32]).decrypt(okm[32:], ciphertext, aad)
    assert plaintext.hex() == outputs["tensor_payloads"]["raw"]
    assert plaintext[:10] == b"FDGT\x01\x00" + (4).to_bytes(4, "little")


def test_vectors_tensor_payloads_decode(vectors: dict[str, Any]) -> None:
    expected = _tensors(vectors["inputs"]["tensors"])
    raw = decode_tensors(bytes.fromhex(vectors["outputs"]["tensor_payloads"]["raw"]))
    for name, tensor in expected.items():
        np.testing.assert_array_equal(raw[name], tensor)


def test_vectors_model_receipt_and_chunks_open(vectors: dict[str, Any]) -> None:
    keys, outputs = _keys(vectors["inputs"]), vectors["outputs"]
    model = bytes.fromhex(outputs["signed_model"])
    opened = open_model(model, trusted_signers=keys["root"].public_key())
    assert opened.header.region is None and opened.signer_key_id == outputs["key_ids"]["root"]
    receipt = open_receipt(bytes.fromhex(outputs["signed_receipt"]), trusted_signers=keys["root"].public_key())
    assert receipt.reason == "norm"
    reassembler = Reassembler()
    results = [reassembler.add(bytes.fromhex(chunk)) for chunk in reversed(outputs["chunks"])]
    assert results[-1] == model


def _regenerate() -> None:
    inputs = json.loads(json.dumps(_inputs()))
    document = {
        "description": "fedge wire protocol v1 known-answer vectors; see test_vectors.py and docs/protocol.md",
        "inputs": inputs,
        "outputs": _outputs(inputs),
    }
    VECTORS.mkdir(exist_ok=True)
    (VECTORS / "protocol_v1.json").write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: test_vectors.py --regenerate")
    _regenerate()
