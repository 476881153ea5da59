"""Known-answer vectors for frame version 2 (prehashed signatures), byte for byte, in ``vectors/protocol_frame_v2.json``.

The same inputs and fixed keys as ``protocol_v1.json`` (``test_vectors.py``), sealed in frame
version 2: a raw and an int8 update and a region's aggregate, with the SHA-256 each signature
covers, and a signed model (still frame version 1) whose header announces ``frames`` ``[1, 2]``.
A separate file, so the version-1 vectors keep their bytes. Regenerate after an intended protocol
change with ``python -m tests.device_agent.protocol.test_vectors_prehashed --regenerate`` (from
the repository root) and review the diff.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from device_agent.protocol.envelope import open_model, open_update, seal_update, sign_model
from device_agent.protocol.headers import ModelHeader, UpdateHeader
from device_agent.protocol.raw_keys import key_to_raw
from tests.device_agent.protocol.test_vectors import _canonical, _keys, _tensors, write_vectors, _inputs as v1_inputs

VECTORS = Path(__file__).parent / "vectors" / "protocol_frame_v2.json"
CONTEXT = b"fedge frame v2: Ed25519 over SHA-256\x00"  # docs/protocol.md, "Frames", spelled out again on purpose


def _inputs() -> dict[str, Any]:
    v1 = v1_inputs()
    aggregate_header = {**v1["update_header"], "kind": "aggregate", "sender": "eu", "nonce": "1f" * 16}
    return {
        "tensors": v1["tensors"],
        "update_header": v1["update_header"],
        "aggregate_header": aggregate_header,
        "model_header": {**v1["model_header"], "frames": [1, 2]},
        "keys": v1["keys"],
        "context": CONTEXT.hex(),
    }


def _outputs(inputs: dict[str, Any]) -> dict[str, Any]:
    keys, tensors = _keys(inputs), _tensors(inputs["tensors"])
    sealed, digests = {}, {}
    for name, record in (("raw", inputs["update_header"]), ("int8", {**inputs["update_header"], "encoding": "int8"}),
                         ("aggregate", inputs["aggregate_header"])):
        blob = seal_update(UpdateHeader.from_bytes(_canonical(record)), tensors, recipient_public_key=keys["region"].public_key(),
                           sender_key=keys["device"], ephemeral_key=keys["ephemeral"], frame_version=2)
        sealed[name], digests[name] = blob.hex(), hashlib.sha256(blob[:-64]).hexdigest()
    model = sign_model(ModelHeader.from_bytes(_canonical(inputs["model_header"])), tensors, signer_key=keys["root"])
    return {"sealed_updates": sealed, "signed_digests": digests, "signed_model": model.hex()}


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    return json.loads(VECTORS.read_text())


@pytest.mark.parametrize("section", ["sealed_updates", "signed_digests", "signed_model"])
def test_prehashed_vectors_reproduce_byte_for_byte(vectors: dict[str, Any], section: str) -> None:
    assert _outputs(vectors["inputs"])[section] == vectors["outputs"][section]


def test_prehashed_vectors_inputs_are_the_documented_ones(vectors: dict[str, Any]) -> None:
    assert vectors["inputs"] == json.loads(json.dumps(_inputs()))


@pytest.mark.parametrize("name", ["raw", "int8", "aggregate"])
def test_prehashed_vectors_open_with_their_digest(vectors: dict[str, Any], name: str) -> None:
    keys, outputs = _keys(vectors["inputs"]), vectors["outputs"]
    opened = open_update(bytes.fromhex(outputs["sealed_updates"][name]), recipient_key=keys["region"],
                         sender_public_key={"dev-1": keys["device"].public_key(), "eu": keys["device"].public_key()},
                         with_digest=True)
    assert opened.frame_version == 2 and opened.digest.hex() == outputs["signed_digests"][name]


def test_prehashed_vector_follows_the_documented_construction(vectors: dict[str, Any]) -> None:
    """Re-derive the raw vector from the primitives as docs/protocol.md describes, without envelope.py or _frame.py."""
    keys, inputs, outputs = _keys(vectors["inputs"]), vectors["inputs"], vectors["outputs"]
    blob = bytes.fromhex(outputs["sealed_updates"]["raw"])
    header_len = int.from_bytes(blob[5:7], "little")
    header, rest = blob[7 : 7 + header_len], blob[7 + header_len :]
    ephemeral_public, ciphertext, signature = rest[:32], rest[32:-64], rest[-64:]
    assert blob[:5] == b"FDGU\x02" and header == _canonical(inputs["update_header"])
    digest = hashlib.sha256(blob[:-64]).digest()
    assert bytes.fromhex(inputs["context"]) == CONTEXT and digest.hex() == outputs["signed_digests"]["raw"]
    keys["device"].public_key().verify(signature, CONTEXT + digest)
    shared = keys["region"].exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
    okm = HKDF(algorithm=SHA256(), length=44, salt=hashlib.sha256(header).digest(),
               info=b"fedge-seal-v1\x00" + ephemeral_public + key_to_raw(keys["region"].public_key())).derive(shared)
    plaintext = ChaCha20Poly1305(okm[:32]).decrypt(okm[32:], ciphertext, blob[: 7 + header_len + 32])
    v1 = json.loads((VECTORS.parent / "protocol_v1.json").read_text())
    assert plaintext.hex() == v1["outputs"]["tensor_payloads"]["raw"]  # the payload is version 1's, only the frame differs


def test_prehashed_vectors_model_announces_frames_and_stays_version_1(vectors: dict[str, Any]) -> None:
    keys = _keys(vectors["inputs"])
    blob = bytes.fromhex(vectors["outputs"]["signed_model"])
    assert blob[:5] == b"FDGM\x01" and b'"frames":[1,2]' in blob
    assert open_model(blob, trusted_signers=keys["root"].public_key()).header.frames == (1, 2)


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python -m tests.device_agent.protocol.test_vectors_prehashed --regenerate")
    write_vectors(VECTORS, "fedge frame version 2 (prehashed Ed25519) known-answer vectors; see test_vectors_prehashed.py "
                           "and docs/protocol.md", _inputs(), _outputs)
