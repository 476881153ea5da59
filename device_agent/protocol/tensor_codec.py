"""Named tensors <-> an explicit little-endian binary layout (never pickle).

Layout (all integers little-endian)::

    magic     4 bytes  b"FDGT"
    version   u8       1 for raw/fp16/int8, 2 for the compressed encodings, 3 for the deflated ones
    encoding  u8       0 = raw, 1 = fp16, 2 = int8, 3 = q8, 4 = q4, 5 = topk, 6 = topk_q8, 7 = topk_q4,
                       8..12 = q8_deflate, q4_deflate, topk_deflate, topk_q8_deflate, topk_q4_deflate,
                       13 = q6_deflate, 14 = topk_q6_deflate
    count     u32      number of tensors
    then per tensor (version 3: all of it as one zlib stream), in ascending order of name (UTF-8 byte order):
      name_len  u16, name (UTF-8, non-empty)
      storage   u8     storage code (table below)
      rank      u8
      dims      rank x u64
      params    int8 affine only: lo f64, scale f64
      byte_len  u64    must equal prod(dims) x stored item size
      data      byte_len bytes, C order, little-endian

Storage codes: 1 float32, 2 float16, 3 float64, 4 int8, 5 uint8, 6 int32,
7 int64 (stored and decoded as that dtype); 129 float32 stored as float16
(``fp16`` encoding only); 130 float32 stored as int8 with per-tensor affine
parameters, value = (q + 128) * scale + lo (``int8`` encoding only). The lossy
codes apply to float32 tensors only; other dtypes are always stored raw. A
lossy tensor decodes back to float32. The int8 error bound is ``scale / 2``
per element (plus float32 rounding), with ``scale = (max - min) / 255``.

Version 2 adds the encodings the device's error-feedback compression sends
(:mod:`device_agent.compression`): storage codes 131 (dense, block-quantised
to 8 or 4 bits), 132 (top-k sparse, float32 values) and 133 (top-k sparse,
block-quantised values), laid out in :mod:`._compressed_codec`. They are
encoded from :class:`~device_agent.compression.CompressedTensor` values and
decode to dense float32, so validation and aggregation see plain arrays.

Version 3 is version 2 with the per-tensor records after ``count`` deflated
(one zlib stream, RFC 1950): lossless, so what a tensor decodes to is the
same; block-quantised codes of real deltas take about half their packed size
(docs/protocol.md). Inflating is bounded by the limits, so a small stream
cannot expand past what a version-2 payload could declare.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import numpy as np

from device_agent.compression.spec import CompressedTensor
from device_agent.errors import MalformedMessageError
from device_agent.protocol._compressed_codec import (
    DENSE_QUANTISED,
    SPARSE_F32,
    SPARSE_QUANTISED,
    bits_of,
    decode_compressed,
    encode_compressed,
    storage_code,
)
from device_agent.protocol._reader import ByteReader, pack_f64, pack_u8, pack_u16, pack_u32, pack_u64

MAGIC = b"FDGT"
VERSION = 1
COMPRESSED_VERSION = 2
DEFLATED_VERSION = 3
DEFLATE_LEVEL = 6

_RAW_CODES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f2"),
    3: np.dtype("<f8"),
    4: np.dtype("i1"),
    5: np.dtype("u1"),
    6: np.dtype("<i4"),
    7: np.dtype("<i8"),
}
_CODE_OF_DTYPE = {dtype.name: code for code, dtype in _RAW_CODES.items()}
_F32_AS_F16 = 129
_F32_AS_INT8 = 130
_F16_MAX = float(np.finfo(np.float16).max)


class Encoding(str, Enum):
    """How float32 tensors are stored: exactly, as float16, as int8 affine-quantised (version 1), or
    block-quantised and/or top-k sparse as the device's compression made them (version 2)."""

    RAW = "raw"
    FP16 = "fp16"
    INT8 = "int8"
    Q8 = "q8"
    Q4 = "q4"
    TOPK = "topk"
    TOPK_Q8 = "topk_q8"
    TOPK_Q4 = "topk_q4"
    Q8_DEFLATE = "q8_deflate"
    Q4_DEFLATE = "q4_deflate"
    TOPK_DEFLATE = "topk_deflate"
    TOPK_Q8_DEFLATE = "topk_q8_deflate"
    TOPK_Q4_DEFLATE = "topk_q4_deflate"
    Q6_DEFLATE = "q6_deflate"
    TOPK_Q6_DEFLATE = "topk_q6_deflate"


_ENCODING_CODES = {enc: code for code, enc in enumerate(Encoding)}
_ENCODING_OF_CODE = {code: enc for enc, code in _ENCODING_CODES.items()}
_LOSSY_CODE = {Encoding.FP16: _F32_AS_F16, Encoding.INT8: _F32_AS_INT8}
#: version-2 and -3 encodings: (storage code, bits) they carry float32 tensors in.
_COMPRESSED = {
    Encoding.Q8: (DENSE_QUANTISED, 8), Encoding.Q4: (DENSE_QUANTISED, 4), Encoding.TOPK: (SPARSE_F32, None),
    Encoding.TOPK_Q8: (SPARSE_QUANTISED, 8), Encoding.TOPK_Q4: (SPARSE_QUANTISED, 4),
    Encoding.Q6_DEFLATE: (DENSE_QUANTISED, 6), Encoding.TOPK_Q6_DEFLATE: (SPARSE_QUANTISED, 6),
}
#: version-3 encodings: their per-tensor records are one zlib stream (q6 has no version-2 form).
_DEFLATED = frozenset(enc for enc in Encoding if enc.value.endswith("_deflate"))
_COMPRESSED.update({Encoding(f"{enc.value}_deflate"): kind for enc, kind in list(_COMPRESSED.items()) if enc not in _DEFLATED})


def payload_version(encoding: Encoding | str) -> int:
    """The payload version an encoding is written in (1 raw/fp16/int8, 2 compressed, 3 compressed and deflated)."""
    enc = Encoding(encoding)
    return DEFLATED_VERSION if enc in _DEFLATED else COMPRESSED_VERSION if enc in _COMPRESSED else VERSION


@dataclass(frozen=True, kw_only=True)
class DecodeLimits:
    """Hard limits applied while decoding untrusted bytes.

    ``max_total_bytes`` bounds the decoded (in-memory) size of all tensors.
    """

    max_tensors: int = 4096
    max_total_bytes: int = 256 << 20
    max_rank: int = 8
    max_name_bytes: int = 256

    def __post_init__(self) -> None:
        for name in ("max_tensors", "max_total_bytes", "max_rank", "max_name_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_rank > 255 or self.max_name_bytes > 0xFFFF:
            raise ValueError("max_rank must be <= 255 and max_name_bytes <= 65535")

    @property
    def max_encoded_bytes(self) -> int:
        """The largest encoded payload that can decode within these limits."""
        per_tensor = 2 + self.max_name_bytes + 2 + 8 * self.max_rank + 16 + 8
        # A sparse float32 tensor at full density carries a bitmap on top of its values: 1/32 more.
        return len(MAGIC) + 6 + self.max_tensors * per_tensor + self.max_total_bytes + self.max_total_bytes // 32


def encode_tensors(tensors: Mapping[str, np.ndarray | CompressedTensor], *, encoding: Encoding | str = Encoding.RAW) -> bytes:
    """Encode named tensors deterministically (sorted names); an empty mapping is valid.

    Lossy encodings refuse non-finite float32 values, and ``fp16`` refuses
    values outside the float16 range (ValueError): compress deltas, not garbage.
    The compressed encodings take :class:`CompressedTensor` values of their
    kind (``compress_delta`` makes them) for float32 tensors; a plain float32
    array, or a compressed tensor of another kind, is a ValueError.
    """
    enc = Encoding(encoding)
    head = [MAGIC, pack_u8(payload_version(enc)), pack_u8(_ENCODING_CODES[enc]), pack_u32(len(tensors))]
    records = [part for name in sorted(tensors) for part in _encode_one(name, tensors[name], enc)]
    if enc in _DEFLATED:
        return b"".join(head) + zlib.compress(b"".join(records), DEFLATE_LEVEL)
    return b"".join(head + records)


def _encode_one(name: str, tensor: np.ndarray | CompressedTensor, enc: Encoding) -> list[bytes]:
    if not isinstance(name, str) or not name:
        raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
    if isinstance(tensor, CompressedTensor):
        return _encode_compressed_one(name, tensor, enc)
    if not isinstance(tensor, np.ndarray):
        raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a numpy array")
    raw_name = name.encode("utf-8")
    if len(raw_name) > 0xFFFF or tensor.ndim > 255:
        raise ValueError(f"tensor {name!r}: name or rank too large to encode")
    code = _CODE_OF_DTYPE.get(tensor.dtype.name)
    if code is None:
        raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} is not encodable (supported: {sorted(_CODE_OF_DTYPE)})")
    params = b""
    if enc in _COMPRESSED and tensor.dtype == np.float32:
        raise ValueError(f"tensor {name!r}: encoding {enc.value!r} takes compressed tensors (compress_delta) for float32")
    if enc is not Encoding.RAW and tensor.dtype == np.float32:
        code = _LOSSY_CODE[enc]
        if not np.all(np.isfinite(tensor)):
            raise ValueError(f"tensor {name!r} has non-finite values; lossy encodings refuse them")
        if enc is Encoding.FP16:
            if tensor.size and float(np.max(np.abs(tensor))) > _F16_MAX:
                raise ValueError(f"tensor {name!r} exceeds the float16 range; use raw or int8")
            data = np.ascontiguousarray(tensor, dtype="<f2").tobytes()
        else:
            lo, scale, q = _quantise(tensor)
            params = pack_f64(lo) + pack_f64(scale)
            data = q.tobytes()
    else:
        data = np.ascontiguousarray(tensor, dtype=_RAW_CODES[code]).tobytes()
    head = [pack_u16(len(raw_name)), raw_name, pack_u8(code), pack_u8(tensor.ndim)]
    head.extend(pack_u64(dim) for dim in tensor.shape)
    return head + [params, pack_u64(len(data)), data]


def _encode_compressed_one(name: str, tensor: CompressedTensor, enc: Encoding) -> list[bytes]:
    raw_name = name.encode("utf-8")
    code = storage_code(tensor)
    if _COMPRESSED.get(enc) != (code, bits_of(tensor)):
        raise ValueError(f"tensor {name!r}: a {code}/{bits_of(tensor)}-bit compressed tensor does not fit encoding {enc.value!r}")
    if len(raw_name) > 0xFFFF or len(tensor.shape) > 255:
        raise ValueError(f"tensor {name!r}: name or rank too large to encode")
    params, data = encode_compressed(name, tensor)
    head = [pack_u16(len(raw_name)), raw_name, pack_u8(code), pack_u8(len(tensor.shape))]
    head.extend(pack_u64(dim) for dim in tensor.shape)
    return head + [params, data]


def _quantise(tensor: np.ndarray) -> tuple[float, float, np.ndarray]:
    values = tensor.astype(np.float64)
    lo = float(values.min()) if values.size else 0.0
    hi = float(values.max()) if values.size else 0.0
    scale = (hi - lo) / 255.0
    if scale == 0.0:
        return lo, 0.0, np.full(tensor.shape, -128, dtype=np.int8)
    steps = np.clip(np.rint((values - lo) / scale), 0, 255)
    return lo, scale, np.ascontiguousarray(steps - 128, dtype=np.int8)


def decode_tensors(
    blob: bytes | bytearray | memoryview,
    *,
    encoding: Encoding | str | None = None,
    limits: DecodeLimits = DecodeLimits(),
) -> dict[str, np.ndarray]:
    """Decode bytes made by :func:`encode_tensors` into fresh, writable arrays.

    ``encoding`` (None = any) must match the one the blob declares. Anything
    structurally wrong or over ``limits`` raises MalformedMessageError.
    """
    if len(blob) > limits.max_encoded_bytes:
        raise MalformedMessageError(f"tensor payload: {len(blob)} bytes exceeds the limit of {limits.max_encoded_bytes}")
    reader = ByteReader(blob, what="tensor payload")
    reader.expect(MAGIC, "magic")
    if (version := reader.u8("version")) not in (VERSION, COMPRESSED_VERSION, DEFLATED_VERSION):
        raise MalformedMessageError(f"tensor payload: unsupported version {version}")
    enc = _ENCODING_OF_CODE.get(reader.u8("encoding"))
    if enc is None:
        raise MalformedMessageError("tensor payload: unknown encoding code")
    if payload_version(enc) != version:
        raise MalformedMessageError(f"tensor payload: encoding {enc.value!r} is not part of version {version}")
    if encoding is not None and enc is not Encoding(encoding):
        raise MalformedMessageError(f"tensor payload: encoding {enc.value!r} does not match declared {Encoding(encoding).value!r}")
    count = reader.u32("count")
    if count > limits.max_tensors:
        raise MalformedMessageError(f"tensor payload: {count} tensors exceeds the limit of {limits.max_tensors}")
    if enc in _DEFLATED:
        reader = ByteReader(_inflate(reader.take(reader.remaining, "records"), limits.max_encoded_bytes), what="tensor payload")
    out: dict[str, np.ndarray] = {}
    budget = limits.max_total_bytes
    previous = b""
    for index in range(count):
        name, raw_name, array, used = _decode_one(reader, index, enc, limits, budget)
        if out and raw_name <= previous:
            problem = "duplicate tensor name" if raw_name == previous else "tensor names not in ascending order"
            raise MalformedMessageError(f"tensor payload: {problem} at {name!r}")
        previous = raw_name
        budget -= used
        out[name] = array
    reader.finish()
    return out


def _inflate(stream: memoryview, limit: int) -> bytes:
    """The records a version-3 payload deflated; refuses more than ``limit`` bytes, a cut stream and trailing bytes."""
    inflater = zlib.decompressobj()
    try:
        records = inflater.decompress(stream, limit + 1)
    except zlib.error as exc:
        raise MalformedMessageError(f"tensor payload: deflated records are corrupt ({exc})") from exc
    if len(records) > limit or inflater.unconsumed_tail:
        raise MalformedMessageError(f"tensor payload: deflated records inflate past the limit of {limit} bytes")
    if not inflater.eof:
        raise MalformedMessageError("tensor payload: deflated records are truncated")
    if inflater.unused_data:
        raise MalformedMessageError(f"tensor payload: {len(inflater.unused_data)} trailing bytes after the deflated records")
    return records


def _decode_one(
    reader: ByteReader, index: int, enc: Encoding, limits: DecodeLimits, budget: int
) -> tuple[str, bytes, np.ndarray, int]:
    where = f"tensor {index}"
    name_len = reader.u16(f"{where} name length")
    if not 0 < name_len <= limits.max_name_bytes:
        raise MalformedMessageError(f"tensor payload: {where} name length {name_len} outside 1..{limits.max_name_bytes}")
    raw_name = bytes(reader.take(name_len, f"{where} name"))
    try:
        name = raw_name.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedMessageError(f"tensor payload: {where} name is not valid UTF-8") from exc
    where = f"tensor {name!r}"
    code = reader.u8(f"{where} storage code")
    if code in _RAW_CODES:
        stored = out_dtype = _RAW_CODES[code]
    elif code == _LOSSY_CODE.get(enc):
        stored, out_dtype = (np.dtype("<f2") if code == _F32_AS_F16 else np.dtype("i1")), np.dtype("<f4")
    elif enc in _COMPRESSED and code == _COMPRESSED[enc][0]:
        stored = out_dtype = np.dtype("<f4")
    else:
        raise MalformedMessageError(f"tensor payload: {where} has storage code {code}, not allowed in {enc.value!r}")
    rank = reader.u8(f"{where} rank")
    if rank > limits.max_rank:
        raise MalformedMessageError(f"tensor payload: {where} rank {rank} exceeds the limit of {limits.max_rank}")
    shape = tuple(reader.u64(f"{where} dim") for _ in range(rank))
    size = math.prod(shape)
    # Zero dims count as 1 here, so an "empty" tensor cannot declare absurd dims that numpy refuses.
    if math.prod(max(d, 1) for d in shape) * out_dtype.itemsize > budget:
        raise MalformedMessageError(f"tensor payload: {where} shape {shape} exceeds the total size limit")
    if enc in _COMPRESSED and code == _COMPRESSED[enc][0]:
        array = decode_compressed(reader, code, bits=_COMPRESSED[enc][1], shape=shape, where=where)
        return name, raw_name, array, size * out_dtype.itemsize
    lo, scale = (reader.f64(f"{where} lo"), reader.f64(f"{where} scale")) if code == _F32_AS_INT8 else (0.0, 0.0)
    if not (math.isfinite(lo) and math.isfinite(scale) and scale >= 0.0):
        raise MalformedMessageError(f"tensor payload: {where} has invalid quantisation parameters")
    byte_len = reader.u64(f"{where} byte length")
    if byte_len != size * stored.itemsize:
        raise MalformedMessageError(f"tensor payload: {where} byte length {byte_len} does not match shape {shape}")
    data = np.frombuffer(reader.take(byte_len, f"{where} data"), dtype=stored).reshape(shape)
    if code == _F32_AS_INT8:
        with np.errstate(over="ignore"):  # huge lo/scale give Inf, which validation rejects as non_finite
            array = ((data.astype(np.float64) + 128.0) * scale + lo).astype(np.float32)
    else:
        array = data.astype(out_dtype.newbyteorder("="), copy=True)
    return name, raw_name, array, size * out_dtype.itemsize
