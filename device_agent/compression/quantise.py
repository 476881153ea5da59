"""Block-wise symmetric quantisation with power-of-two scales.

A flat float vector is cut into blocks of ``block`` values; each block gets
one scale ``2**e`` (``e`` an int8, the smallest with ``max|x| <= qmax * 2**e``)
and each value the integer code ``q = round(x / 2**e)`` in ``-qmax..qmax``
(``qmax`` = 127 for 8 bits, 31 for 6, 7 for 4). Decoded value: ``q * 2**e``.

Why powers of two: ``x / 2**e`` and ``q * 2**e`` are exact in binary floating
point, so the rounding decision is exact and the decoded value is exactly
representable in float32; with round-to-nearest the error-feedback residual
``x - q * 2**e`` is then exact in float64 too (tested). It costs at most one
bit of resolution against a free float scale, and the scale takes one byte.
A block whose values are all zero (or too small for ``2**-128``) gets
``e = -128`` and codes 0; what was not representable stays in the residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QMAX = {8: 127, 6: 31, 4: 7}
"""Largest code per bit width. 6-bit codes travel one per byte, so only deflated (the spec requires it)."""
MIN_EXPONENT = -128
MAX_EXPONENT = 127


@dataclass(frozen=True, kw_only=True)
class QuantisedBlocks:
    """``codes`` (int8, one per value, in ``-qmax..qmax``) and one int8 exponent per block of ``block`` codes."""

    bits: int
    block: int
    exponents: np.ndarray
    codes: np.ndarray

    def __post_init__(self) -> None:
        if self.bits not in QMAX:
            raise ValueError(f"bits must be one of {sorted(QMAX)}, got {self.bits}")
        if self.block < 1:
            raise ValueError("block must be >= 1")
        if self.exponents.dtype != np.int8 or self.codes.dtype != np.int8:
            raise TypeError("exponents and codes must be int8 arrays")
        if self.exponents.shape != (blocks_for(self.codes.size, self.block),):
            raise ValueError(f"{self.codes.size} codes in blocks of {self.block} need {blocks_for(self.codes.size, self.block)} exponents")


def blocks_for(count: int, block: int) -> int:
    """How many blocks of ``block`` values ``count`` values fill (the last one may be short)."""
    return -(-count // block)


def quantise(values: np.ndarray, *, bits: int, block: int, rng: np.random.Generator | None = None) -> QuantisedBlocks:
    """Quantise a flat float vector; ``rng`` None rounds to nearest, else stochastically (unbiased)."""
    qmax = QMAX.get(bits)
    if qmax is None:
        raise ValueError(f"bits must be one of {sorted(QMAX)}, got {bits}")
    x = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(x)):
        raise ValueError("cannot quantise non-finite values")
    n = x.size
    nblocks = blocks_for(n, block)
    padded = np.zeros(nblocks * block, dtype=np.float64)
    padded[:n] = x
    peak = np.abs(padded.reshape(nblocks, block)).max(axis=1) if n else np.zeros(0)
    with np.errstate(divide="ignore"):
        exps = np.ceil(np.log2(peak / qmax))
    exps = np.where(peak > 0, exps, MIN_EXPONENT)
    # log2 can be one off at exact powers of two: fix so max|x| <= qmax * 2**e holds exactly.
    exps = np.where(peak > qmax * np.exp2(exps), exps + 1, exps)
    exps = np.clip(exps, MIN_EXPONENT, MAX_EXPONENT)
    scaled = padded.reshape(nblocks, block) / np.exp2(exps)[:, None]
    if rng is None:
        q = np.rint(scaled)
    else:
        low = np.floor(scaled)
        q = low + (rng.random(scaled.shape) < (scaled - low))
    q = np.clip(q, -qmax, qmax).ravel()[:n]
    return QuantisedBlocks(bits=bits, block=block, exponents=exps.astype(np.int8), codes=q.astype(np.int8))


def dequantise(blocks: QuantisedBlocks) -> np.ndarray:
    """The float32 values the codes stand for (exact: ``q * 2**e`` needs no rounding)."""
    n = blocks.codes.size
    scale = np.repeat(np.exp2(blocks.exponents.astype(np.float64)), blocks.block)[:n]
    with np.errstate(over="ignore"):  # hostile exponents give Inf, which validation rejects as non_finite
        return (blocks.codes.astype(np.float64) * scale).astype(np.float32)


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Codes as bytes: int8 as is for 8 and 6 bits; two's-complement nibbles, low nibble first, for 4 bits."""
    if bits != 4:
        return np.ascontiguousarray(codes, dtype=np.int8).tobytes()
    nibbles = (codes.astype(np.int16) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def packed_size(count: int, bits: int) -> int:
    """Bytes :func:`pack_codes` makes from ``count`` codes."""
    return count if bits != 4 else (count + 1) // 2


def unpack_codes(data: bytes | memoryview, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`; ValueError when a padding nibble is not zero."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits != 4:
        return raw.view(np.int8)[:count].copy()
    out = np.empty(raw.size * 2, dtype=np.uint8)
    out[0::2] = raw & 0x0F
    out[1::2] = raw >> 4
    if out.size > count and out[count:].any():
        raise ValueError("non-zero padding nibble")
    signed = out[:count].astype(np.int8)
    return np.where(signed > 7, signed - 16, signed).astype(np.int8)
