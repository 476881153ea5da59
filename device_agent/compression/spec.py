"""What a bundle (or a round) asks the device to send, and the in-memory form of one compressed tensor.

Text form, one token or two joined by ``+`` (the bundle manifest's
``compression`` field and the agent's ``compression`` setting use it):
``none`` (full float32), ``q8`` / ``q4`` (every value, 8 or 4 bits),
``topk:F`` (the fraction F of entries with the largest magnitude, float32
values), ``topk:F+q8`` / ``topk:F+q4`` (both), and ``/B`` after ``q8``/``q4``
for the quantisation block size (default 256), e.g. ``topk:0.05+q8/128``;
a last ``+deflate`` sends the compressed tensors through zlib (lossless,
payload version 3), e.g. ``q4+deflate``; ``q6`` (codes in -31..31, one per
byte before deflate) only with it, e.g. ``q6+deflate``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from device_agent.compression.quantise import QMAX, QuantisedBlocks, dequantise

DEFAULT_BLOCK = 256
MAX_BLOCK = 1 << 16
_TOKEN = re.compile(r"^(?:topk:(?P<frac>[0-9]*\.?[0-9]+(?:e-?[0-9]+)?)|q(?P<bits>[468])(?:/(?P<block>[0-9]{1,6}))?)$")


@dataclass(frozen=True, kw_only=True)
class CompressionSpec:
    """``topk`` None: dense; else the fraction of entries kept per tensor, in (0, 1].
    ``bits`` None: float32 values; else 8, 6 or 4 with one power-of-two scale per ``block`` values.
    ``deflate``: the encoded tensors go through zlib (lossless; needs ``topk`` or ``bits``)."""

    topk: float | None = None
    bits: int | None = None
    block: int = DEFAULT_BLOCK
    deflate: bool = False

    def __post_init__(self) -> None:
        if self.topk is not None and not (math.isfinite(self.topk) and 0.0 < self.topk <= 1.0):
            raise ValueError(f"topk must be in (0, 1], got {self.topk}")
        if self.bits is not None and self.bits not in QMAX:
            raise ValueError(f"bits must be one of {sorted(QMAX)}, got {self.bits}")
        if not 1 <= self.block <= MAX_BLOCK:
            raise ValueError(f"block must be in 1..{MAX_BLOCK}, got {self.block}")
        if self.bits == 6 and not self.deflate:
            raise ValueError("q6 codes travel one per byte: give +deflate with them")
        if self.deflate and not self.enabled:
            raise ValueError("deflate applies to compressed tensors: give topk, q8 or q4 with it")

    @property
    def enabled(self) -> bool:
        """False for ``none``: the delta goes out as plain float32."""
        return self.topk is not None or self.bits is not None

    @property
    def encoding(self) -> str:
        """The tensor-codec encoding name this spec's tensors travel in (``raw``, ``q8``, ``topk_q4``, ``q4_deflate``...)."""
        parts = (["topk"] if self.topk is not None else []) + ([f"q{self.bits}"] if self.bits is not None else [])
        return "_".join(parts + (["deflate"] if self.deflate else [])) or "raw"

    def describe(self) -> str:
        """The text form (round-trips through :meth:`parse`)."""
        parts = [f"topk:{self.topk:g}"] if self.topk is not None else []
        if self.bits is not None:
            parts.append(f"q{self.bits}" + (f"/{self.block}" if self.block != DEFAULT_BLOCK else ""))
        return "+".join(parts + (["deflate"] if self.deflate else [])) or "none"

    @classmethod
    def parse(cls, text: str) -> CompressionSpec:
        """A spec from its text form; ValueError naming what is wrong."""
        if not isinstance(text, str):
            raise ValueError(f"compression must be a string, got {type(text).__name__}")
        if text.strip() in ("", "none"):
            return NO_COMPRESSION
        topk, bits, block = None, None, DEFAULT_BLOCK
        tokens = [token.strip() for token in text.strip().split("+")]
        deflate = tokens[-1] == "deflate"
        if deflate:
            tokens.pop()
            if not tokens:
                raise ValueError(f"compression {text!r}: deflate needs topk:F, q8 or q4 before it")
        for token in tokens:
            m = _TOKEN.match(token)
            if m is None:
                raise ValueError(f"compression {text!r}: {token!r} is not topk:F, q8, q6, q4 or qN/B"
                                 " (deflate comes last)")
            if m.group("frac") is not None:
                if topk is not None:
                    raise ValueError(f"compression {text!r}: topk given twice")
                topk = float(m.group("frac"))
            else:
                if bits is not None:
                    raise ValueError(f"compression {text!r}: quantisation given twice")
                bits = int(m.group("bits"))
                block = int(m.group("block")) if m.group("block") else DEFAULT_BLOCK
        return cls(topk=topk, bits=bits, block=block, deflate=deflate)


NO_COMPRESSION = CompressionSpec()


@dataclass(frozen=True, kw_only=True)
class CompressedTensor:
    """One float32 tensor as it travels: ``indices`` None for dense, else ascending uint32 flat indices;
    ``values`` float32 (one per kept entry) or :class:`QuantisedBlocks` over the kept entries."""

    shape: tuple[int, ...]
    indices: np.ndarray | None
    values: np.ndarray | QuantisedBlocks

    @property
    def size(self) -> int:
        """Entries of the dense tensor."""
        return math.prod(self.shape)

    @property
    def kept(self) -> int:
        """Entries carried (the dense size when not sparse)."""
        return self.size if self.indices is None else int(self.indices.size)

    def to_dense(self) -> np.ndarray:
        """The float32 tensor this stands for (zeros where nothing was sent)."""
        values = dequantise(self.values) if isinstance(self.values, QuantisedBlocks) else np.asarray(self.values, np.float32)
        if self.indices is None:
            return values.reshape(self.shape).copy()
        out = np.zeros(self.size, dtype=np.float32)
        out[self.indices] = values
        return out.reshape(self.shape)
