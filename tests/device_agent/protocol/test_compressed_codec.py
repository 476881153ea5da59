"""The compressed encodings of the tensor codec (version 2): round trips, strict decoding, hostile input."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent.compression import CompressionSpec, compress_delta, decoded_values
from device_agent.errors import MalformedMessageError
from device_agent.protocol.envelope import open_update, seal_update
from device_agent.protocol.tensor_codec import DecodeLimits, Encoding, decode_tensors, encode_tensors

TEXTS = ["q8", "q4", "q8/3", "topk:0.2", "topk:0.01", "topk:0.3+q8/5", "topk:0.02+q4", "topk:1+q4/1",
         "q4+deflate", "topk:0.3+q8/5+deflate", "topk:0.01+deflate", "q6+deflate", "topk:0.2+q6/7+deflate"]


def _payload(spec: str, tensors: dict[str, np.ndarray]) -> tuple[bytes, dict[str, np.ndarray]]:
    s = CompressionSpec.parse(spec)
    out = compress_delta(tensors, None, s)
    return encode_tensors(out.tensors, encoding=s.encoding), decoded_values(out.tensors)


@pytest.mark.parametrize("text", TEXTS)
def test_compressed_codec_decodes_exactly_what_the_device_meant(text: str) -> None:
    @settings(max_examples=15, deadline=None, database=None, derandomize=True)
    @given(st.integers(0, 300), st.integers(1, 5), st.floats(1e-6, 1e3), st.integers(0, 2**31))
    def check(n: int, m: int, scale: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        tensors = {"a": (rng.normal(size=(n, m)) * scale).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32),
                   "steps": np.array([seed], np.int64)}
        blob, expected = _payload(text, tensors)
        decoded = decode_tensors(blob, encoding=CompressionSpec.parse(text).encoding)
        assert sorted(decoded) == sorted(tensors)
        for name, value in expected.items():
            assert decoded[name].dtype == value.dtype and decoded[name].shape == value.shape
            np.testing.assert_array_equal(decoded[name], value)

    check()


def test_compressed_codec_sizes_per_parameter() -> None:
    tensors = {"w": np.random.default_rng(0).normal(size=100_000).astype(np.float32)}
    sizes = {t: len(_payload(t, tensors)[0]) for t in ["q8", "q4", "topk:0.01", "topk:0.1+q8", "topk:0.1+q4"]}
    raw = len(encode_tensors(tensors))
    assert raw > 400_000
    assert sizes["q8"] < raw / 3.9 and sizes["q4"] < raw / 7.5
    assert sizes["topk:0.01"] < 8 * 1000 + 100  # u32 index + f32 value per kept entry
    assert sizes["topk:0.1+q8"] < 100_000 / 8 + 10_000 * 1.01 + 100  # bitmap beats the index list at 10%
    assert sizes["topk:0.1+q4"] < sizes["topk:0.1+q8"]


@pytest.mark.parametrize("text", ["q8", "q4/64", "topk:0.05", "topk:0.3+q8", "topk:0.3+q4"])
def test_deflated_payload_is_version_3_and_decodes_to_the_same_arrays(text: str) -> None:
    rng = np.random.default_rng(5)
    # Deltas are peaked: most codes near zero, a few large. Deflate takes what the packed codes waste.
    tensors = {"w": (rng.laplace(size=(300, 100)) * 1e-3).astype(np.float32), "steps": np.array([3], np.int64)}
    plain, expected = _payload(text, tensors)
    deflated, _ = _payload(f"{text}+deflate", tensors)
    assert plain[4] == 2 and deflated[4] == 3
    decoded = decode_tensors(deflated, encoding=CompressionSpec.parse(f"{text}+deflate").encoding)
    assert sorted(decoded) == sorted(tensors)
    for name, value in expected.items():
        np.testing.assert_array_equal(decoded[name], value)
    assert len(deflated) < len(plain)


def test_compressed_codec_encode_refuses_mismatched_kinds() -> None:
    tensors = {"w": np.ones(8, np.float32)}
    q8 = compress_delta(tensors, None, CompressionSpec.parse("q8")).tensors
    with pytest.raises(ValueError, match="does not fit"):
        encode_tensors(q8, encoding="q4")
    with pytest.raises(ValueError, match="does not fit"):
        encode_tensors(q8, encoding="topk_q8")
    with pytest.raises(ValueError, match="compressed tensors"):
        encode_tensors(tensors, encoding="q8")


# -- hand-made hostile payloads ---------------------------------------------------------------

def _v2(encoding: Encoding, *records: bytes, version: int = 2) -> bytes:
    return b"FDGT" + bytes([version, list(Encoding).index(encoding)]) + struct.pack("<I", len(records)) + b"".join(records)


def _head(name: bytes, code: int, dims: tuple[int, ...]) -> bytes:
    return struct.pack("<H", len(name)) + name + bytes([code, len(dims)]) + b"".join(struct.pack("<Q", d) for d in dims)


def _sparse(indices: list[int], values: list[float], *, size: int = 10, fmt: int = 0, nnz: int | None = None,
            byte_len: int | None = None, index_bytes: bytes | None = None) -> bytes:
    idx = index_bytes if index_bytes is not None else struct.pack(f"<{len(indices)}I", *indices)
    data = idx + struct.pack(f"<{len(values)}f", *values)
    n = len(values) if nnz is None else nnz
    return _head(b"w", 132, (size,)) + bytes([fmt]) + struct.pack("<QQ", n, len(data) if byte_len is None else byte_len) + data


def _dense_q(codes: bytes, exps: bytes, *, bits: int = 8, block: int = 4, size: int = 4, byte_len: int | None = None) -> bytes:
    data = exps + codes
    return (_head(b"w", 131, (size,)) + bytes([bits]) + struct.pack("<IQ", block, len(data) if byte_len is None else byte_len)
            + data)


BAD: list[tuple[Encoding, bytes, str]] = [
    (Encoding.TOPK, _sparse([1, 12], [1.0, 2.0]), "out of order or out of bounds"),
    (Encoding.TOPK, _sparse([3, 3], [1.0, 2.0]), "out of order or out of bounds"),
    (Encoding.TOPK, _sparse([4, 2], [1.0, 2.0]), "out of order or out of bounds"),
    (Encoding.TOPK, _sparse([1], [1.0], nnz=11), "keeps 11 entries of 10"),
    (Encoding.TOPK, _sparse([1], [1.0], byte_len=9), "byte length"),
    (Encoding.TOPK, _sparse([1], [1.0], fmt=7), "unknown index format"),
    (Encoding.TOPK, _sparse([], [1.0, 2.0], fmt=1, index_bytes=b"\x01\x00"), "bitmap has 1 entries, declared 2"),
    (Encoding.TOPK, _sparse([], [1.0], fmt=1, index_bytes=b"\x01\x04"), "bitmap bits past the tensor"),
    (Encoding.TOPK, _sparse([1, 2], [1.0, 2.0])[:-3], "truncated"),
    (Encoding.Q8, _dense_q(bytes([1, 2, 3, 0x80]), b"\x00"), "code outside -127..127"),
    (Encoding.Q8, _dense_q(bytes(4), b"\x7f"), "exponent out of range"),
    (Encoding.Q8, _dense_q(bytes(4), b"\x00", bits=4), "4-bit codes, the encoding says 8"),
    (Encoding.Q8, _dense_q(bytes(4), b"\x00", block=0), "block 0 outside"),
    (Encoding.Q8, _dense_q(bytes(4), b"\x00", byte_len=4), "byte length"),
    (Encoding.Q4, _dense_q(bytes([0x11, 0x18]), b"\x00", bits=4), "code outside -7..7"),
    (Encoding.Q4, _dense_q(bytes([0x11, 0x11]), b"\x00", bits=4, size=3), "padding nibble"),
    (Encoding.Q4, _sparse([1], [1.0]), "storage code 132, not allowed in 'q4'"),
    (Encoding.TOPK, _dense_q(bytes(4), b"\x00"), "storage code 131, not allowed in 'topk'"),
    (Encoding.INT8, _dense_q(bytes(4), b"\x00"), "storage code 131"),
]


@pytest.mark.parametrize(("encoding", "blob", "match"), [(e, _v2(e, r), m) for e, r, m in BAD], ids=[m for _, _, m in BAD])
def test_compressed_codec_rejects_malformed_tensors_with_one_line(encoding: Encoding, blob: bytes, match: str) -> None:
    version = 1 if encoding is Encoding.INT8 else 2
    with pytest.raises(MalformedMessageError, match=match) as caught:
        decode_tensors(blob[:4] + bytes([version]) + blob[5:])
    assert "\n" not in str(caught.value)


def test_compressed_codec_versions_are_not_interchangeable() -> None:
    blob, _ = _payload("q8", {"w": np.ones(4, np.float32)})
    with pytest.raises(MalformedMessageError, match="not part of version 1"):
        decode_tensors(blob[:4] + b"\x01" + blob[5:])
    raw = encode_tensors({"w": np.ones(4, np.float32)})
    with pytest.raises(MalformedMessageError, match="not part of version 2"):
        decode_tensors(raw[:4] + b"\x02" + raw[5:])
    with pytest.raises(MalformedMessageError, match="does not match declared"):
        decode_tensors(blob, encoding="q4")


def test_compressed_codec_sparse_tensor_cannot_inflate_past_the_limits() -> None:
    """A few bytes declaring a huge sparse tensor are refused before anything is allocated."""
    blob = _v2(Encoding.TOPK, _sparse([0], [1.0], size=1 << 31))
    with pytest.raises(MalformedMessageError, match="exceeds the total size limit"):
        decode_tensors(blob, limits=DecodeLimits(max_total_bytes=1 << 20))


def _v3(encoding: Encoding, stream: bytes, count: int = 1) -> bytes:
    return b"FDGT" + bytes([3, list(Encoding).index(encoding)]) + struct.pack("<I", count) + stream


_RECORD = _dense_q(bytes([1, 2, 3, 4]), b"\x00")
DEFLATE_BAD: list[tuple[bytes, str]] = [
    (_v3(Encoding.Q8_DEFLATE, b"not a zlib stream"), "deflated records are corrupt"),
    (_v3(Encoding.Q8_DEFLATE, zlib.compress(_RECORD)[:-6]), "deflated records are truncated"),
    (_v3(Encoding.Q8_DEFLATE, zlib.compress(_RECORD) + b"\x00"), "1 trailing bytes after the deflated records"),
    (_v3(Encoding.Q8_DEFLATE, zlib.compress(_RECORD + b"\x00")), "1 trailing bytes"),
    (_v3(Encoding.Q8_DEFLATE, zlib.compress(_dense_q(bytes([0x80, 0, 0, 0]), b"\x00"))), "code outside -127..127"),
    (_v3(Encoding.Q4_DEFLATE, zlib.compress(_RECORD)), "8-bit codes, the encoding says 4"),
    (_v3(Encoding.Q8, zlib.compress(_RECORD)), "'q8' is not part of version 3"),
    (_v2(Encoding.Q8_DEFLATE, _RECORD), "'q8_deflate' is not part of version 2"),
    (_v3(Encoding.Q6_DEFLATE, zlib.compress(_dense_q(bytes([1, 2, 32, 4]), b"\x00", bits=6))), "code outside -31..31"),
]


@pytest.mark.parametrize(("blob", "match"), DEFLATE_BAD, ids=[m for _, m in DEFLATE_BAD])
def test_deflated_codec_rejects_malformed_streams_with_one_line(blob: bytes, match: str) -> None:
    with pytest.raises(MalformedMessageError, match=match) as caught:
        decode_tensors(blob)
    assert "\n" not in str(caught.value)


def test_deflated_codec_cannot_inflate_past_the_limits() -> None:
    """A small stream of zeros is refused once it inflates past what the limits allow, without inflating the rest."""
    bomb = _v3(Encoding.Q8_DEFLATE, zlib.compress(bytes(64 << 20), 9))
    assert len(bomb) < 100_000
    limits = DecodeLimits(max_total_bytes=1 << 20)
    with pytest.raises(MalformedMessageError, match=f"inflate past the limit of {limits.max_encoded_bytes} bytes"):
        decode_tensors(bomb, limits=limits)


def test_compressed_codec_survives_random_corruption(corruptions: Callable[..., Iterator[bytes]]) -> None:
    tensors = {"w": np.linspace(-1, 1, 300, dtype=np.float32), "b": np.ones(3, np.float32)}
    for text in ["q4", "topk:0.5+q8/7", "topk:0.01", "topk:0.5+q4+deflate"]:
        blob, _ = _payload(text, tensors)
        for mutated in corruptions(blob, seed=11, count=100):
            try:
                decoded = decode_tensors(mutated, limits=DecodeLimits(max_total_bytes=1 << 16))
            except MalformedMessageError:
                continue
            assert all(v.dtype.kind in "fiu" for v in decoded.values())


def test_compressed_update_seals_and_opens_to_the_decoded_values(make_header: Callable[..., Any]) -> None:
    device, region = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    spec = CompressionSpec.parse("topk:0.1+q8")
    out = compress_delta({"w": np.random.default_rng(2).normal(size=(32, 8)).astype(np.float32)}, None, spec)
    header = make_header(encoding=spec.encoding)
    blob = seal_update(header, out.tensors, recipient_public_key=region.public_key(), sender_key=device)
    opened = open_update(blob, recipient_key=region, sender_public_key={"dev-1": device.public_key()})
    np.testing.assert_array_equal(opened.tensors["w"], decoded_values(out.tensors)["w"])
