"""Tensor codec: round trips, canonical order, hard decode limits and the lossy error bounds."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from device_agent.errors import MalformedMessageError
from device_agent.protocol.tensor_codec import DecodeLimits, Encoding, decode_tensors, encode_tensors

ALL_DTYPES = ["float32", "float16", "float64", "int8", "uint8", "int32", "int64"]


def _blob(*records: bytes, encoding: int = 0, count: int | None = None, magic: bytes = b"FDGT", version: int = 1) -> bytes:
    """Hand-build a payload from raw per-tensor records (to craft malformed input)."""
    n = len(records) if count is None else count
    return magic + bytes([version, encoding]) + struct.pack("<I", n) + b"".join(records)


def _record(name: bytes, code: int = 1, dims: tuple[int, ...] = (2,), data: bytes | None = None, byte_len: int | None = None) -> bytes:
    payload = bytes(4 * int(np.prod(dims))) if data is None else data
    length = len(payload) if byte_len is None else byte_len
    return (
        struct.pack("<H", len(name)) + name + bytes([code, len(dims)])
        + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<Q", length) + payload
    )


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_tensor_codec_round_trips_every_dtype_exactly(dtype: str) -> None:
    rng = np.random.default_rng(1)
    tensors = {
        "matrix": (rng.normal(size=(3, 5)) * 50).astype(dtype),
        "scalar": np.array(3, dtype=dtype),
        "empty": np.zeros((0, 4), dtype=dtype),
    }
    decoded = decode_tensors(encode_tensors(tensors))
    assert sorted(decoded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert decoded[name].dtype == tensor.dtype and decoded[name].shape == tensor.shape
        np.testing.assert_array_equal(decoded[name], tensor)


def test_tensor_codec_encoding_is_independent_of_insertion_order(tensors: dict[str, np.ndarray]) -> None:
    reordered = dict(reversed(list(tensors.items())))
    assert encode_tensors(tensors) == encode_tensors(reordered)


def test_tensor_codec_handles_non_native_byte_order_and_non_contiguous_input() -> None:
    big_endian = np.arange(6, dtype=">f4").reshape(2, 3)
    strided = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    decoded = decode_tensors(encode_tensors({"be": big_endian, "strided": strided}))
    np.testing.assert_array_equal(decoded["be"], big_endian)
    np.testing.assert_array_equal(decoded["strided"], strided)


def test_tensor_codec_decoded_arrays_are_writable_copies(tensors: dict[str, np.ndarray]) -> None:
    blob = bytearray(encode_tensors(tensors))
    decoded = decode_tensors(blob)
    decoded["steps"][0] = 99
    blob[-1] ^= 0xFF
    assert decoded["steps"][0] == 99


def test_tensor_codec_empty_mapping_round_trips() -> None:
    assert decode_tensors(encode_tensors({})) == {}


@pytest.mark.parametrize(
    ("tensors", "error"),
    [
        ({"x": np.array([True])}, ValueError),
        ({"x": np.array([1j])}, ValueError),
        ({"": np.zeros(1, np.float32)}, ValueError),
        ({"x": [1.0, 2.0]}, TypeError),
    ],
)
def test_tensor_codec_encode_rejects_caller_mistakes(tensors: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        encode_tensors(tensors)


def test_tensor_codec_fp16_error_is_within_half_precision() -> None:
    x = np.random.default_rng(2).normal(scale=0.01, size=1000).astype(np.float32)
    decoded = decode_tensors(encode_tensors({"d": x}, encoding=Encoding.FP16))["d"]
    assert decoded.dtype == np.float32
    assert np.all(np.abs(decoded - x) <= np.abs(x) * 2.0**-11 + 2.0**-24)
    assert not np.array_equal(decoded, x)


@pytest.mark.parametrize("scale", [1e-6, 0.01, 1.0, 1e4])
def test_tensor_codec_int8_error_is_within_half_a_step(scale: float) -> None:
    x = (np.random.default_rng(3).normal(size=(40, 25)) * scale).astype(np.float32)
    decoded = decode_tensors(encode_tensors({"d": x}, encoding="int8"))["d"]
    step = (float(x.max()) - float(x.min())) / 255.0
    bound = step / 2 + float(np.abs(x).max()) * 2.0**-23
    assert decoded.dtype == np.float32 and decoded.shape == x.shape
    assert float(np.abs(decoded.astype(np.float64) - x).max()) <= bound
    assert decoded.min() == pytest.approx(x.min(), abs=bound) and decoded.max() == pytest.approx(x.max(), abs=bound)


def test_tensor_codec_int8_constant_and_empty_tensors_are_exact() -> None:
    tensors = {"c": np.full((3, 3), -2.5, np.float32), "e": np.zeros((0,), np.float32)}
    decoded = decode_tensors(encode_tensors(tensors, encoding=Encoding.INT8))
    np.testing.assert_array_equal(decoded["c"], tensors["c"])
    assert decoded["e"].shape == (0,)


@pytest.mark.parametrize("encoding", [Encoding.FP16, Encoding.INT8])
def test_tensor_codec_lossy_encodings_leave_other_dtypes_exact(encoding: Encoding) -> None:
    tensors = {"i": np.array([2**40, -3], np.int64), "f64": np.array([1 / 3], np.float64)}
    decoded = decode_tensors(encode_tensors(tensors, encoding=encoding))
    np.testing.assert_array_equal(decoded["i"], tensors["i"])
    np.testing.assert_array_equal(decoded["f64"], tensors["f64"])


@pytest.mark.parametrize("encoding", [Encoding.FP16, Encoding.INT8])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_tensor_codec_lossy_encodings_refuse_non_finite_values(encoding: Encoding, bad: float) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        encode_tensors({"d": np.array([1.0, bad], np.float32)}, encoding=encoding)


def test_tensor_codec_raw_encoding_carries_non_finite_values_for_validation_to_catch() -> None:
    decoded = decode_tensors(encode_tensors({"d": np.array([np.nan, np.inf], np.float32)}))
    assert np.isnan(decoded["d"][0]) and np.isinf(decoded["d"][1])


def test_tensor_codec_fp16_refuses_values_out_of_range() -> None:
    with pytest.raises(ValueError, match="float16 range"):
        encode_tensors({"d": np.array([70000.0], np.float32)}, encoding=Encoding.FP16)


def test_tensor_codec_decode_checks_declared_encoding(tensors: dict[str, np.ndarray]) -> None:
    blob = encode_tensors(tensors, encoding=Encoding.FP16)
    assert decode_tensors(blob, encoding=Encoding.FP16).keys() == tensors.keys()
    with pytest.raises(MalformedMessageError, match="does not match"):
        decode_tensors(blob, encoding=Encoding.RAW)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"", "magic"),
        (_blob(magic=b"NOPE"), "magic"),
        (_blob(version=2), "version"),
        (_blob(encoding=9), "encoding"),
        (_blob(count=1), "truncated"),
        (_blob(_record(b"a")) + b"\x00", "trailing"),
        (_blob(_record(b"a"))[:-1], "truncated"),
        (_blob(_record(b"")), "name length"),
        (_blob(_record(b"\xff\xfe")), "UTF-8"),
        (_blob(_record(b"a"), _record(b"a")), "duplicate"),
        (_blob(_record(b"b"), _record(b"a")), "ascending"),
        (_blob(_record(b"a", code=99)), "storage code"),
        (_blob(_record(b"a", code=129, data=bytes(4))), "storage code"),
        (_blob(_record(b"a", code=130, data=bytes(2)), encoding=1), "storage code"),
        (_blob(_record(b"a", byte_len=7, data=bytes(7))), "byte length"),
        (_blob(_record(b"a", dims=(2**40, 2**40))), "size limit"),
        (_blob(_record(b"a", dims=(0, 2**64 - 1), data=b"")), "size limit"),
        (_blob(_record(b"a", dims=(0, 2**40, 2**40), data=b"")), "size limit"),
        (_blob(_record(b"a", dims=(1,) * 9, data=bytes(4))), "rank"),
    ],
)
def test_tensor_codec_decode_rejects_malformed_payloads(blob: bytes, match: str) -> None:
    with pytest.raises(MalformedMessageError, match=match):
        decode_tensors(blob)


def test_tensor_codec_decode_rejects_bad_int8_parameters() -> None:
    name = b"q"
    record = (
        struct.pack("<H", 1) + name + bytes([130, 1]) + struct.pack("<Q", 2)
        + struct.pack("<dd", 0.0, float("nan")) + struct.pack("<Q", 2) + bytes(2)
    )
    with pytest.raises(MalformedMessageError, match="quantisation"):
        decode_tensors(_blob(record, encoding=2))


@pytest.mark.parametrize(
    ("limits", "match"),
    [
        (DecodeLimits(max_tensors=2), "tensors exceeds"),
        (DecodeLimits(max_total_bytes=60), "size limit"),
        (DecodeLimits(max_rank=1), "rank"),
        (DecodeLimits(max_name_bytes=5), "name length"),
    ],
)
def test_tensor_codec_decode_enforces_limits(tensors: dict[str, np.ndarray], limits: DecodeLimits, match: str) -> None:
    with pytest.raises(MalformedMessageError, match=match):
        decode_tensors(encode_tensors(tensors), limits=limits)


def test_tensor_codec_decode_refuses_blob_longer_than_any_valid_payload() -> None:
    limits = DecodeLimits(max_tensors=1, max_total_bytes=16)
    with pytest.raises(MalformedMessageError, match="exceeds the limit"):
        decode_tensors(bytes(limits.max_encoded_bytes + 1), limits=limits)


def test_tensor_codec_decode_survives_random_corruption(tensors: dict[str, np.ndarray], corruptions: Callable[..., Iterator[bytes]]) -> None:
    for encoding in (Encoding.RAW, Encoding.FP16, Encoding.INT8):  # compressed ones: test_compressed_codec.py
        for mutated in corruptions(encode_tensors(tensors, encoding=encoding), seed=7, count=150):
            try:
                decoded = decode_tensors(mutated)
            except MalformedMessageError:
                continue
            assert isinstance(decoded, dict)
