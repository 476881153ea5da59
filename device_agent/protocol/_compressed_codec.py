"""The compressed storage codes of the tensor codec (private: ``tensor_codec`` is the public face).

Per tensor, after the dims (all integers little-endian)::

    131 dense quantised:   bits u8 | block u32 | byte_len u64 | exponents (int8 x blocks) | codes
    132 sparse float32:    index_format u8 | nnz u64 | byte_len u64 | indices | values (f32 x nnz)
    133 sparse quantised:  index_format u8 | nnz u64 | bits u8 | block u32 | byte_len u64 | indices | exponents | codes

``codes``: int8 per value (8 bits) or two's-complement nibbles, low nibble
first, a zero pad nibble at an odd end (4 bits); every code within
``-qmax..qmax``. Decoded value: ``code * 2**exponent`` (exponent of the
code's block of ``block`` values). ``indices``: format 0, ``nnz`` u32
strictly ascending and < size; format 1, a bitmap of ``ceil(size / 8)``
bytes (bit ``i % 8`` of byte ``i // 8``), exactly ``nnz`` bits set and no
bit set past ``size``. The encoder writes whichever is smaller (the list
on a tie). Everything decodes to dense float32.
"""

from __future__ import annotations

import math

import numpy as np

from device_agent.compression.quantise import QMAX, QuantisedBlocks, blocks_for, dequantise, pack_codes, packed_size, unpack_codes
from device_agent.compression.spec import MAX_BLOCK, CompressedTensor
from device_agent.errors import MalformedMessageError
from device_agent.protocol._reader import ByteReader, pack_u8, pack_u32, pack_u64

DENSE_QUANTISED = 131
SPARSE_F32 = 132
SPARSE_QUANTISED = 133
_INDEX_LIST, _INDEX_BITMAP = 0, 1
_F32_MAX = float(np.finfo(np.float32).max)


def storage_code(tensor: CompressedTensor) -> int:
    """The storage code ``tensor`` travels as."""
    quantised = isinstance(tensor.values, QuantisedBlocks)
    if tensor.indices is None:
        if not quantised:
            raise ValueError("a dense float32 tensor travels as raw float32, not as a compressed tensor")
        return DENSE_QUANTISED
    return SPARSE_QUANTISED if quantised else SPARSE_F32


def bits_of(tensor: CompressedTensor) -> int | None:
    """The quantisation bits of ``tensor`` (None: float32 values)."""
    return tensor.values.bits if isinstance(tensor.values, QuantisedBlocks) else None


def encode_compressed(name: str, tensor: CompressedTensor) -> tuple[bytes, bytes]:
    """``(params, data)`` of ``tensor`` (params include ``byte_len``)."""
    code = storage_code(tensor)
    size = tensor.size
    if tensor.indices is not None:
        idx = np.asarray(tensor.indices)
        if idx.ndim != 1 or (idx.size and (idx[0] < 0 or int(idx[-1]) >= size or np.any(np.diff(idx.astype(np.int64)) <= 0))):
            raise ValueError(f"tensor {name!r}: sparse indices must be strictly ascending and inside the tensor")
        if size >= 1 << 32:
            raise ValueError(f"tensor {name!r}: too large for sparse storage")
    kept = tensor.kept
    if isinstance(tensor.values, QuantisedBlocks):
        blocks = tensor.values
        if blocks.codes.size != kept:
            raise ValueError(f"tensor {name!r}: {blocks.codes.size} codes for {kept} entries")
        if blocks.block > MAX_BLOCK:
            raise ValueError(f"tensor {name!r}: block {blocks.block} over {MAX_BLOCK}")
        values = blocks.exponents.astype(np.int8).tobytes() + pack_codes(blocks.codes, blocks.bits)
        qparams = pack_u8(blocks.bits) + pack_u32(blocks.block)
    else:
        arr = np.asarray(tensor.values)
        if arr.dtype != np.float32 or arr.shape != (kept,):
            raise ValueError(f"tensor {name!r}: sparse values must be {kept} float32")
        values, qparams = np.ascontiguousarray(arr, dtype="<f4").tobytes(), b""
    if code == DENSE_QUANTISED:
        return qparams + pack_u64(len(values)), values
    index_format, index_bytes = _encode_indices(np.asarray(tensor.indices), size)
    data = index_bytes + values
    return pack_u8(index_format) + pack_u64(kept) + qparams + pack_u64(len(data)), data


def _encode_indices(indices: np.ndarray, size: int) -> tuple[int, bytes]:
    if (size + 7) // 8 < 4 * indices.size:
        bitmap = np.zeros(size, dtype=np.uint8)
        bitmap[indices] = 1
        return _INDEX_BITMAP, np.packbits(bitmap, bitorder="little").tobytes()
    return _INDEX_LIST, np.ascontiguousarray(indices, dtype="<u4").tobytes()


def decode_compressed(reader: ByteReader, code: int, *, bits: int | None, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Read one compressed tensor's params and data (after its dims) and return the dense float32 array.

    ``bits`` is what the declared encoding requires (None: float32 values).
    """
    size = math.prod(shape)
    kept = size
    index_format = None
    if code != DENSE_QUANTISED:
        if size >= 1 << 32:
            raise MalformedMessageError(f"tensor payload: {where} is too large for sparse storage")
        index_format = reader.u8(f"{where} index format")
        if index_format not in (_INDEX_LIST, _INDEX_BITMAP):
            raise MalformedMessageError(f"tensor payload: {where} has unknown index format {index_format}")
        kept = reader.u64(f"{where} entry count")
        if kept > size:
            raise MalformedMessageError(f"tensor payload: {where} keeps {kept} entries of {size}")
    block = 0
    if code != SPARSE_F32:
        got_bits, block = reader.u8(f"{where} bits"), reader.u32(f"{where} block")
        if got_bits != bits:
            raise MalformedMessageError(f"tensor payload: {where} has {got_bits}-bit codes, the encoding says {bits}")
        if not 1 <= block <= MAX_BLOCK:
            raise MalformedMessageError(f"tensor payload: {where} block {block} outside 1..{MAX_BLOCK}")
    index_len = 0 if index_format is None else (kept * 4 if index_format == _INDEX_LIST else (size + 7) // 8)
    nblocks = blocks_for(kept, block) if block else 0
    value_len = kept * 4 if code == SPARSE_F32 else nblocks + packed_size(kept, bits or 8)
    byte_len = reader.u64(f"{where} byte length")
    if byte_len != index_len + value_len:
        raise MalformedMessageError(f"tensor payload: {where} byte length {byte_len} does not match its entries")
    indices = None if index_format is None else _decode_indices(reader.take(index_len, f"{where} indices"), index_format,
                                                                 kept, size, where)
    if code == SPARSE_F32:
        values = np.frombuffer(reader.take(value_len, f"{where} values"), dtype="<f4").astype(np.float32)
    else:
        qmax = QMAX[bits or 8]
        exponents = np.frombuffer(reader.take(nblocks, f"{where} exponents"), dtype=np.int8).copy()
        if exponents.size and float(qmax) * 2.0 ** float(exponents.max()) > _F32_MAX:
            raise MalformedMessageError(f"tensor payload: {where} has a quantisation exponent out of range")
        try:
            codes = unpack_codes(reader.take(value_len - nblocks, f"{where} codes"), kept, bits or 8)
        except ValueError as exc:
            raise MalformedMessageError(f"tensor payload: {where}: {exc}") from exc
        if codes.size and int(np.abs(codes.astype(np.int16)).max()) > qmax:
            raise MalformedMessageError(f"tensor payload: {where} has a code outside -{qmax}..{qmax}")
        values = dequantise(QuantisedBlocks(bits=bits or 8, block=block, exponents=exponents, codes=codes))
    if indices is None:
        return values.reshape(shape)
    out = np.zeros(size, dtype=np.float32)
    out[indices] = values
    return out.reshape(shape)


def _decode_indices(raw: memoryview, index_format: int, kept: int, size: int, where: str) -> np.ndarray:
    if index_format == _INDEX_LIST:
        idx = np.frombuffer(raw, dtype="<u4").astype(np.int64)
        if idx.size and (int(idx[-1]) >= size or np.any(np.diff(idx) <= 0)):
            raise MalformedMessageError(f"tensor payload: {where} has indices out of order or out of bounds")
        return idx
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    if bits[size:].any():
        raise MalformedMessageError(f"tensor payload: {where} has bitmap bits past the tensor")
    idx = np.flatnonzero(bits[:size])
    if idx.size != kept:
        raise MalformedMessageError(f"tensor payload: {where} bitmap has {idx.size} entries, declared {kept}")
    return idx
