"""Bounds-checked little-endian reading of untrusted bytes (private to the protocol package)."""

from __future__ import annotations

import struct

from device_agent.errors import MalformedMessageError

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")


class ByteReader:
    """Reads fields front to back; any overrun raises MalformedMessageError naming the field."""

    def __init__(self, data: bytes | bytearray | memoryview, *, what: str) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0
        self._what = what

    @property
    def remaining(self) -> int:
        """Bytes not yet read."""
        return len(self._view) - self._pos

    def take(self, n: int, field: str) -> memoryview:
        """The next ``n`` bytes (a view, no copy)."""
        if n < 0 or n > self.remaining:
            raise MalformedMessageError(
                f"{self._what}: truncated reading {field} (need {n} bytes, {self.remaining} left)"
            )
        out = self._view[self._pos : self._pos + n]
        self._pos += n
        return out

    def u8(self, field: str) -> int:
        """An unsigned byte."""
        return int(_U8.unpack(self.take(1, field))[0])

    def u16(self, field: str) -> int:
        """A little-endian uint16."""
        return int(_U16.unpack(self.take(2, field))[0])

    def u32(self, field: str) -> int:
        """A little-endian uint32."""
        return int(_U32.unpack(self.take(4, field))[0])

    def u64(self, field: str) -> int:
        """A little-endian uint64."""
        return int(_U64.unpack(self.take(8, field))[0])

    def f64(self, field: str) -> float:
        """A little-endian IEEE-754 double."""
        return float(_F64.unpack(self.take(8, field))[0])

    def expect(self, value: bytes, field: str) -> None:
        """Read ``len(value)`` bytes and require them to equal ``value``."""
        if self.take(len(value), field) != value:
            raise MalformedMessageError(f"{self._what}: bad {field}")

    def finish(self) -> None:
        """Require that every byte was consumed."""
        if self.remaining:
            raise MalformedMessageError(f"{self._what}: {self.remaining} trailing bytes")


def pack_u8(value: int) -> bytes:
    """One unsigned byte."""
    return _U8.pack(value)


def pack_u16(value: int) -> bytes:
    """A little-endian uint16."""
    return _U16.pack(value)


def pack_u32(value: int) -> bytes:
    """A little-endian uint32."""
    return _U32.pack(value)


def pack_u64(value: int) -> bytes:
    """A little-endian uint64."""
    return _U64.pack(value)


def pack_f64(value: float) -> bytes:
    """A little-endian IEEE-754 double."""
    return _F64.pack(value)
