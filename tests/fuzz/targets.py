"""Fuzz targets: every parser that takes bytes from the network or a file, and the errors each may raise.

Each target takes raw bytes and either returns or raises one of its documented
error types; anything else (IndexError, struct.error, MemoryError, a hang) is
a bug. Signed formats get two targets: the raw bytes (almost always stopped
at the frame or the signature), and the fuzzed content *behind a valid
signature* (what a compromised signer could send), so header, tensor and
manifest parsing are reached too. Used by ``test_fuzz_parsers.py`` (bounded,
in every test run) and ``atheris_fuzz.py`` (long, coverage-guided runs).
"""

from __future__ import annotations

import io
import json
import struct
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device_agent.bundle.archive import verify_bundle
from device_agent.bundle.manifest import MANIFEST_NAME, SIGNATURE_NAME, parse_manifest
from device_agent.data import load_csv, load_npz
from device_agent.errors import AuthenticationError, BundleError, FedgeError, MalformedMessageError
from device_agent.protocol import envelope
from device_agent.protocol._frame import frame_prefix, sign_frame
from device_agent.protocol.candidate_request import REQUEST_MAGIC, open_candidate_request
from device_agent.protocol.chunking import Reassembler, parse_chunk
from device_agent.protocol.envelope import MODEL_MAGIC, UPDATE_MAGIC
from device_agent.protocol.model_delta import DELTA_MAGIC, open_model_delta
from device_agent.protocol.receipts import RECEIPT_MAGIC, open_receipt
from device_agent.protocol.tensor_codec import DecodeLimits, decode_tensors

_SIGNER = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
_RECIPIENT = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
_LIMITS = DecodeLimits(max_tensors=16, max_total_bytes=1 << 20)
_SCRATCH = Path(tempfile.mkdtemp(prefix="fedge-fuzz-"))
_WIRE = (AuthenticationError, MalformedMessageError)


@dataclass(frozen=True)
class Target:
    """One parser: ``run(data)`` and the exception types it documents."""

    name: str
    run: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...]


def _signed(magic: bytes, data: bytes, version: int = 1) -> bytes:
    """``data`` as record + body behind a valid signature (frame ``version``): its first byte chooses where the record ends."""
    cut = data[0] if data else 0
    record, body = data[1:1 + cut], data[1 + cut:]
    return sign_frame(frame_prefix(magic, record, version=version) + body, _SIGNER)


def _model(data: bytes) -> object:
    return envelope.open_model(data, trusted_signers=[_SIGNER.public_key()], limits=_LIMITS)


def _delta(data: bytes) -> object:
    return open_model_delta(data, trusted_signers=[_SIGNER.public_key()], limits=_LIMITS)


def _update(data: bytes) -> object:
    return envelope.open_update(data, recipient_key=_RECIPIENT, sender_public_key={"dev-1": _SIGNER.public_key()},
                                limits=_LIMITS)


def _candidates(data: bytes) -> object:
    return envelope.open_candidates(data, recipient_key=_RECIPIENT, trusted_signers=[_SIGNER.public_key()], limits=_LIMITS)


def _receipt(data: bytes) -> object:
    return open_receipt(data, trusted_signers=[_SIGNER.public_key()])


def _request(data: bytes) -> object:
    return open_candidate_request(data, device_keys={"dev-1": _SIGNER.public_key()}, fleet="f", region="r")


def _reassemble(data: bytes) -> object:
    """A stream of chunk frames (2-byte length prefixes) into one reassembler with small limits."""
    box = Reassembler(max_messages=4, max_total_bytes=1 << 18, max_chunks=64)
    view = memoryview(data)
    while len(view) >= 2:
        (size,) = struct.unpack(">H", view[:2])
        frame, view = bytes(view[2:2 + size]), view[2 + size:]
        try:
            box.add(frame, sender="dev-1")
        except MalformedMessageError:
            pass  # dropped: the next frames must still be handled
    return None


def _bundle(data: bytes) -> object:
    path = _SCRATCH / "fuzz.fedge"
    path.write_bytes(data)
    return verify_bundle(path, [_SIGNER.public_key()])


def _signed_bundle(data: bytes) -> object:
    """A zip whose manifest (the fuzzed bytes) carries a valid signature: manifest parsing and file checks."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(MANIFEST_NAME, data)
        archive.writestr(SIGNATURE_NAME, _SIGNER.sign(data))
    return _bundle(buffer.getvalue())


def _npz(data: bytes) -> object:
    path = _SCRATCH / "fuzz.npz"
    path.write_bytes(data)
    return load_npz(path, max_array_bytes=1 << 20)


def _csv(data: bytes) -> object:
    path = _SCRATCH / "fuzz.csv"
    path.write_bytes(data)
    return load_csv(path)


def _agent_toml(data: bytes) -> object:
    """The whole of load_config: file bytes -> TOML -> AgentConfig (a RecursionError from tomllib was found here)."""
    from device_agent.daemon.config import load_config

    path = _SCRATCH / "agent.toml"
    path.write_bytes(data)
    return load_config(path)


def _aggregator_toml(data: bytes) -> object:
    import tomllib

    from sdk.aggregator.service_config import load_regional_service_config

    path = _SCRATCH / "aggregator.toml"
    path.write_bytes(data)
    try:
        tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        pass
    return load_regional_service_config(path)


TARGETS: tuple[Target, ...] = (
    Target("tensors", lambda d: decode_tensors(d, limits=_LIMITS), (MalformedMessageError,)),
    Target("model", _model, _WIRE),
    Target("model-signed", lambda d: _model(_signed(MODEL_MAGIC, d)), _WIRE),
    Target("model-delta", _delta, _WIRE),
    Target("model-delta-signed", lambda d: _delta(_signed(DELTA_MAGIC, d)), _WIRE),
    Target("update", _update, _WIRE),
    Target("update-prehashed-signed", lambda d: _update(_signed(UPDATE_MAGIC, d, version=2)), _WIRE),
    Target("candidates", _candidates, _WIRE),
    Target("receipt", _receipt, _WIRE),
    Target("receipt-signed", lambda d: _receipt(_signed(RECEIPT_MAGIC, d)), _WIRE),
    Target("candidate-request", _request, _WIRE),
    Target("candidate-request-signed", lambda d: _request(_signed(REQUEST_MAGIC, d)), _WIRE),
    Target("chunk", parse_chunk, (MalformedMessageError,)),
    Target("reassembly", _reassemble, ()),
    Target("manifest", parse_manifest, (BundleError,)),
    Target("bundle-archive", _bundle, (BundleError,)),
    Target("bundle-signed-manifest", _signed_bundle, (BundleError,)),
    Target("npz", _npz, (FedgeError,)),
    Target("csv", _csv, (FedgeError,)),
    Target("agent-toml", _agent_toml, (FedgeError,)),
    Target("aggregator-toml", _aggregator_toml, (FedgeError,)),
)


def _compressed_seeds(tensors: dict[str, np.ndarray]) -> list[bytes]:
    """One payload per compressed encoding (sparse ones with both index formats)."""
    from device_agent.compression import CompressionSpec, compress_delta
    from device_agent.protocol.tensor_codec import encode_tensors

    wide = {**tensors, "v": np.linspace(-1, 1, 300, dtype=np.float32)}
    out = []
    for text in ("q8", "q4/4", "topk:0.5", "topk:0.02", "topk:0.5+q8/2", "topk:0.02+q4", "q4+deflate",
                 "topk:0.5+q8/2+deflate"):
        spec = CompressionSpec.parse(text)
        out.append(encode_tensors(compress_delta(wide, None, spec).tensors, encoding=spec.encoding))
    return out


def seeds() -> dict[str, list[bytes]]:
    """Valid inputs per target, for mutation (hypothesis examples, atheris corpus)."""
    from device_agent.protocol.headers import ModelHeader
    from device_agent.protocol.receipts import Receipt, ReceiptStatus, sign_receipt
    from device_agent.protocol.tensor_codec import encode_tensors

    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
    model_header = ModelHeader.create(clock=lambda: 1.0, random_bytes=bytes, fleet="f", region=None, sender="root",
                                      round=1, bundle_version=1, encoding="raw", frames=(1, 2))
    model = envelope.sign_model(model_header, tensors, signer_key=_SIGNER)
    from device_agent.protocol.headers import UpdateHeader

    update_header = UpdateHeader.create(clock=lambda: 1.0, random_bytes=bytes, fleet="f", region="r", sender="dev-1",
                                        round=1, bundle_version=1, sample_count=3)
    updates = [envelope.seal_update(update_header, tensors, recipient_public_key=_RECIPIENT.public_key(), sender_key=_SIGNER,
                                    ephemeral_key=X25519PrivateKey.from_private_bytes(bytes(range(2, 34))), frame_version=v)
               for v in (1, 2)]
    update_record = update_header.to_bytes()
    record = model_header.to_bytes()
    npz = io.BytesIO()
    np.savez(npz, x=np.ones((4, 3), np.float32), y=np.arange(4))
    from device_agent.compression import CompressionSpec, compress_delta
    from device_agent.protocol.headers import ModelDeltaHeader
    from device_agent.protocol.model_delta import sign_model_delta

    delta_header = ModelDeltaHeader.create(clock=lambda: 1.0, random_bytes=bytes, fleet="f", region="eu", sender="eu-agg",
                                           round=2, bundle_version=1, encoding="q4", base_round=1, base_digest=bytes(32),
                                           digest=bytes(range(32)), compression="topk:0.3+q8")
    delta = sign_model_delta(delta_header, compress_delta(tensors, None, CompressionSpec.parse("q4")).tensors,
                             signer_key=_SIGNER)
    out = {
        "tensors": [encode_tensors(tensors), encode_tensors(tensors, encoding="int8"), *_compressed_seeds(tensors)],
        "model": [model],
        "update": updates,
        "update-prehashed-signed": [bytes([len(update_record)]) + updates[1][7:-64]] if len(update_record) < 256 else [b""],
        "model-delta": [delta],
        "model-signed": [bytes([len(record)]) + record + encode_tensors(tensors)] if len(record) < 256 else [b""],
        "chunk": [],
        "npz": [npz.getvalue()],
        "csv": [b"a,b,label\n1,2,0\n3,4,1\n"],
        "agent-toml": [b'[device]\nid = "d"\nfleet = "f"\nregion = "r"\n[broker]\nhost = "h"\n'],
        "manifest": [json.dumps({"format_version": 1}).encode()],
    }
    try:
        receipt = Receipt(fleet="f", issuer="r", device="dev-1", round=1, update_nonce=bytes(16),
                          status=ReceiptStatus.ACCEPTED, timestamp_ms=1)
        out["receipt"] = [sign_receipt(receipt, signer_key=_SIGNER)]
    except (TypeError, ValueError):
        pass
    return out
