"""Known-answer vectors for the compressed wire formats, byte for byte, in ``vectors/protocol_v1_compressed.json``.

What ``protocol_v1.json`` (``test_vectors.py``) does not cover: the tensor payloads of
versions 2 and 3 (every compressed encoding: q8, q4, topk, topk+q8/q4, their
``_deflate`` twins, q6_deflate and topk_q6_deflate; both index formats, several
blocks, an odd nibble count, an all-zero block, a non-float32 tensor carried raw),
a signed model whose header carries the uplink override ``compression``, the
signed model delta ``FDGD`` (one version-2 and one version-3 payload, made by
the publisher's :class:`DeltaChain`) and one sealed compressed update. A separate
file, so the v1 vectors keep their bytes.

The deflate streams are what reference zlib writes at level 6 (``zlib.compress``);
the protocol pins the 10-byte head and the inflated records (any valid zlib
stream decodes), so a zlib that writes other streams (zlib-ng) fails only the
byte-for-byte test, and its message says so. Regenerate after an intended
protocol change with ``python -m tests.device_agent.protocol.test_vectors_compressed
--regenerate`` (from the repository root) and review the diff.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.compression import CompressionSpec, compress_delta
from device_agent.compression.downlink import DeltaChain, HeldModel, apply_model_delta
from device_agent.errors import AuthenticationError, MalformedMessageError
from device_agent.protocol.envelope import open_model, open_update, seal_update, sign_model
from device_agent.protocol.headers import ModelDeltaHeader, ModelHeader, UpdateHeader
from device_agent.protocol.model_delta import model_digest, open_model_delta, sign_model_delta
from device_agent.protocol.tensor_codec import Encoding, decode_tensors, encode_tensors, payload_version
from tests.device_agent.protocol.test_vectors import _canonical, _keys, _tensor_json, _tensors, write_vectors, _inputs as v1_inputs

VECTORS = Path(__file__).parent / "vectors" / "protocol_v1_compressed.json"
#: One spec per compressed encoding (payload versions 2 and 3).
PAYLOAD_SPECS = (
    "q8", "q4/8", "topk:0.25", "topk:0.03+q8/4", "topk:0.25+q4/4",
    "q8+deflate", "q4/8+deflate", "topk:0.25+deflate", "topk:0.03+q8/4+deflate", "topk:0.25+q4/4+deflate",
    "q6/8+deflate", "topk:0.25+q6+deflate",
)
DELTA_SPECS = ("q4/8", "q6+deflate")
SEALED_SPEC = "topk:0.25+q4/4+deflate"


# --- inputs (only used to (re)generate the file) -------------------------------------------


def _inputs() -> dict[str, Any]:
    i = np.arange(32, dtype=np.float64)
    # Exact float64 arithmetic, then one rounding to float32: the same on every platform.
    weight = (((i * 37) % 29 - 14) / 10 * np.exp2(i // 8 - 3)).reshape(4, 8).astype(np.float32)
    delta = {
        "a.weight": weight,  # four blocks of 8 with different scales
        "a.bias": np.array([0.3, -0.0625, 1e-3], dtype=np.float32),  # an odd count of 4-bit codes
        "a.zero": np.zeros(2, dtype=np.float32),  # an all-zero block: exponent -128
        "steps": np.array([3, -4], dtype=np.int64),  # not float32: travels raw
    }
    base = {"a.weight": (weight * 3 + 0.5).astype(np.float32), "a.bias": np.array([1.0, -2.0, 0.25], dtype=np.float32)}
    target = {"a.weight": (base["a.weight"] + weight).astype(np.float32), "a.bias": np.array([1.1, -2.5, 0.375], dtype=np.float32)}
    model_header = {
        "protocol": 1, "kind": "model", "fleet": "demo", "region": "eu", "sender": "agg-eu", "round": 9,
        "bundle_version": 2, "encoding": "raw", "nonce": "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf", "timestamp_ms": 1700000001000,
        "compression": "topk:0.25+q4/4+deflate",
    }
    delta_header = {
        "protocol": 1, "kind": "model", "fleet": "demo", "region": "eu", "sender": "agg-eu", "round": 9,
        "bundle_version": 2, "nonce": "b0b1b2b3b4b5b6b7b8b9babbbcbdbebf", "timestamp_ms": 1700000002000, "base_round": 8,
    }
    update_header = {
        "protocol": 1, "kind": "update", "fleet": "demo", "region": "eu", "sender": "dev-1", "round": 9,
        "bundle_version": 2, "sample_count": 32, "nonce": "c0c1c2c3c4c5c6c7c8c9cacbcccdcecf", "timestamp_ms": 1700000003000,
    }
    return {
        "delta": {name: _tensor_json(t) for name, t in delta.items()},
        "model_base": {name: _tensor_json(t) for name, t in base.items()},
        "model_target": {name: _tensor_json(t) for name, t in target.items()},
        "payload_specs": list(PAYLOAD_SPECS),
        "model_header": model_header,
        "delta_header": delta_header,
        "delta_specs": {spec: ("q8" if "deflate" in spec else None) for spec in DELTA_SPECS},
        "update_header": update_header,
        "sealed_spec": SEALED_SPEC,
        "keys": v1_inputs()["keys"],  # the same fixed keys as protocol_v1.json
    }


# --- computing outputs from inputs (shared by the tests and the generator) -----------------


def _compressed(inputs: dict[str, Any], spec_text: str) -> tuple[str, dict[str, Any]]:
    """The encoding and the tensors a device sends for ``spec_text`` (no residual yet)."""
    spec = CompressionSpec.parse(spec_text)
    return spec.encoding, compress_delta(_tensors(inputs["delta"]), None, spec).tensors


def _delta_header(inputs: dict[str, Any], spec_text: str, base: HeldModel, result: HeldModel) -> ModelDeltaHeader:
    record = {**inputs["delta_header"], "encoding": CompressionSpec.parse(spec_text).encoding,
              "base_digest": base.digest.hex(), "digest": result.digest.hex()}
    if (override := inputs["delta_specs"][spec_text]) is not None:
        record["compression"] = override
    return ModelDeltaHeader.from_bytes(_canonical(record))


def _outputs(inputs: dict[str, Any]) -> dict[str, Any]:
    keys = _keys(inputs)
    payloads, decoded = {}, {}
    for spec_text in inputs["payload_specs"]:
        encoding, tensors = _compressed(inputs, spec_text)
        payloads[spec_text] = encode_tensors(tensors, encoding=encoding).hex()
        decoded[spec_text] = {name: _tensor_json(t) for name, t in decode_tensors(bytes.fromhex(payloads[spec_text])).items()}
    model = sign_model(ModelHeader.from_bytes(_canonical(inputs["model_header"])), _tensors(inputs["model_base"]),
                       signer_key=keys["root"])
    delta_headers, deltas = {}, {}
    for spec_text in inputs["delta_specs"]:
        chain = DeltaChain(CompressionSpec.parse(spec_text))
        chain.restart(inputs["delta_header"]["base_round"], _tensors(inputs["model_base"]))
        step = chain.advance(inputs["delta_header"]["round"], _tensors(inputs["model_target"]))
        assert step is not None, "the delta chain refused the vector's models"
        header = _delta_header(inputs, spec_text, step.base, step.result)
        delta_headers[spec_text] = header.to_bytes().decode()
        deltas[spec_text] = sign_model_delta(header, step.tensors, signer_key=keys["root"]).hex()
    encoding, tensors = _compressed(inputs, inputs["sealed_spec"])
    update_header = UpdateHeader.from_bytes(_canonical({**inputs["update_header"], "encoding": encoding}))
    sealed = seal_update(update_header, tensors, recipient_public_key=keys["region"].public_key(), sender_key=keys["device"],
                         ephemeral_key=keys["ephemeral"])
    return {
        "payloads": payloads,
        "decoded": decoded,
        "signed_model": model.hex(),
        "model_delta_headers": delta_headers,
        "model_deltas": deltas,
        "sealed_update": sealed.hex(),
    }


# --- tests ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    return json.loads(VECTORS.read_text())


@pytest.fixture(scope="module")
def computed(vectors: dict[str, Any]) -> dict[str, Any]:
    return _outputs(vectors["inputs"])


@pytest.mark.parametrize("section", ["payloads", "decoded", "signed_model", "model_delta_headers", "model_deltas", "sealed_update"])
def test_compressed_vectors_reproduce_byte_for_byte(vectors: dict[str, Any], computed: dict[str, Any], section: str) -> None:
    assert computed[section] == vectors["outputs"][section], (
        f"{section} differs from the stored vectors (zlib {zlib.ZLIB_RUNTIME_VERSION}: the deflate streams stored are "
        "reference zlib's level-6 output; test_compressed_payloads_head_and_records pins the protocol part)"
    )


def test_compressed_vectors_inputs_are_the_documented_ones(vectors: dict[str, Any]) -> None:
    assert vectors["inputs"] == json.loads(json.dumps(_inputs()))
    covered = {Encoding(CompressionSpec.parse(spec).encoding) for spec in vectors["inputs"]["payload_specs"]}
    assert covered == {enc for enc in Encoding if payload_version(enc) > 1}, "every compressed encoding has a vector"


def _records(payload: bytes) -> bytes:
    """The per-tensor records of a version-2 or -3 payload (inflated for version 3)."""
    return zlib.decompress(payload[10:]) if payload[4] == 3 else payload[10:]


@pytest.mark.parametrize("spec_text", PAYLOAD_SPECS)
def test_compressed_payloads_head_and_records(vectors: dict[str, Any], computed: dict[str, Any], spec_text: str) -> None:
    """The protocol part byte for byte (head and inflated records), whatever zlib wrote the stream."""
    stored, made = bytes.fromhex(vectors["outputs"]["payloads"][spec_text]), bytes.fromhex(computed["payloads"][spec_text])
    assert stored[:10] == made[:10] and _records(stored) == _records(made)


@pytest.mark.parametrize("spec_text", [s for s in PAYLOAD_SPECS if s.endswith("+deflate") and "q6" not in s])
def test_deflated_payloads_inflate_to_their_version_2_twin(vectors: dict[str, Any], spec_text: str) -> None:
    payloads = vectors["outputs"]["payloads"]
    deflated, twin = bytes.fromhex(payloads[spec_text]), bytes.fromhex(payloads[spec_text.removesuffix("+deflate")])
    assert deflated[:4] == twin[:4] == b"FDGT" and (deflated[4], twin[4]) == (3, 2)
    assert deflated[5] == twin[5] + 5 and deflated[6:10] == twin[6:10] == (4).to_bytes(4, "little")
    assert _records(deflated) == twin[10:]


@pytest.mark.parametrize("spec_text", PAYLOAD_SPECS)
def test_compressed_payloads_decode_to_the_stored_values(vectors: dict[str, Any], spec_text: str) -> None:
    inputs, outputs = vectors["inputs"], vectors["outputs"]
    encoding = CompressionSpec.parse(spec_text).encoding
    decoded = decode_tensors(bytes.fromhex(outputs["payloads"][spec_text]), encoding=encoding)
    expected, delta = _tensors(outputs["decoded"][spec_text]), _tensors(inputs["delta"])
    assert list(decoded) == sorted(delta)
    for name, tensor in decoded.items():
        assert tensor.dtype == expected[name].dtype and tensor.shape == delta[name].shape
        np.testing.assert_array_equal(tensor, expected[name])
    np.testing.assert_array_equal(decoded["steps"], delta["steps"])
    np.testing.assert_array_equal(decoded["a.zero"], 0.0)
    kept = np.flatnonzero(decoded["a.weight"])
    if spec_text.startswith("topk"):  # only the largest entries survive, everything else decodes to zero
        top = np.argsort(-np.abs(delta["a.weight"].ravel()), kind="stable")[: kept.size]
        assert kept.size <= np.ceil(float(spec_text[5:].split("+")[0]) * 32) and set(kept) == set(top)
    else:  # every value within half a step of its block (8 values or one block of 256)
        spec = CompressionSpec.parse(spec_text)
        qmax = {8: 127, 6: 31, 4: 7}[spec.bits]
        blocks = np.abs(delta["a.weight"].ravel()).reshape(-1, min(spec.block, 32)).max(axis=1)
        bound = np.repeat(np.exp2(np.ceil(np.log2(blocks / qmax))) / 2, min(spec.block, 32))
        assert np.all(np.abs(decoded["a.weight"].ravel() - delta["a.weight"].ravel()) <= bound)


def test_signed_model_carries_the_uplink_override(vectors: dict[str, Any]) -> None:
    keys, inputs = _keys(vectors["inputs"]), vectors["inputs"]
    blob = bytes.fromhex(vectors["outputs"]["signed_model"])
    opened = open_model(blob, trusted_signers=keys["root"].public_key())
    assert opened.header.compression == "topk:0.25+q4/4+deflate" and opened.header.region == "eu"
    assert b'"compression":"topk:0.25+q4/4+deflate"' in blob[7 : 7 + int.from_bytes(blob[5:7], "little")]
    for name, tensor in _tensors(inputs["model_base"]).items():
        np.testing.assert_array_equal(opened.tensors[name], tensor)


@pytest.mark.parametrize("spec_text", DELTA_SPECS)
def test_model_deltas_verify_and_apply_to_their_base(vectors: dict[str, Any], spec_text: str) -> None:
    keys, inputs, outputs = _keys(vectors["inputs"]), vectors["inputs"], vectors["outputs"]
    opened = open_model_delta(bytes.fromhex(outputs["model_deltas"][spec_text]), trusted_signers=keys["root"].public_key())
    header = opened.header
    assert header.to_bytes().decode() == outputs["model_delta_headers"][spec_text]
    assert header.encoding.value == CompressionSpec.parse(spec_text).encoding
    assert header.compression == inputs["delta_specs"][spec_text]
    base = HeldModel.of(header.base_round, _tensors(inputs["model_base"]))
    assert header.base_digest == base.digest == model_digest(_tensors(inputs["model_base"]))
    applied = apply_model_delta(base, opened.tensors, round=header.round, base_round=header.base_round,
                                base_digest=header.base_digest, digest=header.digest)
    assert applied.model is not None, applied.detail
    target = _tensors(inputs["model_target"])
    for name, tensor in applied.model.tensors.items():  # one lossy step towards the target, not past it
        assert np.max(np.abs(tensor - target[name])) <= 0.2


@pytest.mark.parametrize("spec_text", DELTA_SPECS)
def test_model_deltas_follow_the_documented_frame(vectors: dict[str, Any], spec_text: str) -> None:
    """Re-read the FDGD frame as docs/protocol.md describes it, without model_delta.py."""
    keys, outputs = _keys(vectors["inputs"]), vectors["outputs"]
    blob = bytes.fromhex(outputs["model_deltas"][spec_text])
    header_len = int.from_bytes(blob[5:7], "little")
    header, payload, signature = blob[7 : 7 + header_len], blob[7 + header_len : -64], blob[-64:]
    assert blob[:5] == b"FDGD\x01" and header == outputs["model_delta_headers"][spec_text].encode()
    keys["root"].public_key().verify(signature, blob[:-64])
    assert payload[:4] == b"FDGT" and payload[4] == payload_version(json.loads(header)["encoding"])


def test_sealed_compressed_update_opens(vectors: dict[str, Any]) -> None:
    keys, inputs, outputs = _keys(vectors["inputs"]), vectors["inputs"], vectors["outputs"]
    opened = open_update(bytes.fromhex(outputs["sealed_update"]), recipient_key=keys["region"],
                         sender_public_key={"dev-1": keys["device"].public_key()})
    assert opened.header.encoding.value == "topk_q4_deflate" and opened.header.round == 9
    expected = _tensors(outputs["decoded"][inputs["sealed_spec"]])
    for name, tensor in expected.items():
        np.testing.assert_array_equal(opened.tensors[name], tensor)


@pytest.mark.parametrize("section", ["signed_model", "model_deltas", "sealed_update"])
def test_a_flipped_byte_in_a_signed_vector_is_refused(vectors: dict[str, Any], section: str) -> None:
    keys, stored = _keys(vectors["inputs"]), vectors["outputs"][section]
    blob = bytearray.fromhex(stored if isinstance(stored, str) else stored["q6+deflate"])
    blob[-100] ^= 0x01  # in the payload, before the signature
    root = keys["root"]
    with pytest.raises((AuthenticationError, MalformedMessageError)):
        if section == "signed_model":
            open_model(bytes(blob), trusted_signers=root.public_key())
        elif section == "model_deltas":
            open_model_delta(bytes(blob), trusted_signers=root.public_key())
        else:
            open_update(bytes(blob), recipient_key=keys["region"], sender_public_key={"dev-1": keys["device"].public_key()})


def _regenerate() -> None:
    write_vectors(VECTORS, "fedge compressed payloads (versions 2 and 3), model header compression, FDGD model deltas: "
                           "known-answer vectors; see test_vectors_compressed.py and docs/protocol.md", _inputs(), _outputs,
                  zlib=f"deflate streams written by zlib {zlib.ZLIB_RUNTIME_VERSION} at level 6")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python -m tests.device_agent.protocol.test_vectors_compressed --regenerate")
    _regenerate()
