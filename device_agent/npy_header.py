"""A strict reader for the header of one ``.npy`` array (format versions 1.0, 2.0 and 3.0).

numpy's own reader evaluates the header text with ``ast.literal_eval``. That is
safe, but CPython 3.11's AST construction is not thread-safe: two threads parsing
at once can fail with ``SystemError: AST constructor recursion depth mismatch``
(python/cpython#106905), which took down one of the demo's device threads while
it read its data file. The header is a fixed, tiny grammar, so it is parsed here
with regular expressions instead: a dict literal with exactly the keys
``descr`` (a dtype string such as ``'<f4'``), ``fortran_order`` (``True`` or
``False``) and ``shape`` (a tuple of non-negative integers), in any order, with
numpy's space padding and final newline. Anything else (structured dtypes,
Python 2 ``L`` suffixes, duplicate or unknown keys) is refused with a one-line
reason. No ``eval``, ``ast`` or pickle. :func:`load_npz_arrays` reads a whole
``.npz`` this way (the device's own state, a verified bundle's parameters) in
place of ``np.load``, which parses every member's header with ``ast``.
"""

from __future__ import annotations

import math
import os
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

MAGIC = b"\x93NUMPY"
MAX_HEADER_BYTES = 65536
"""Longer headers are refused (numpy writes ~128 bytes; its own reader stops at 10,000 by default)."""

_LENGTH_FORMAT = {(1, 0): "<H", (2, 0): "<I", (3, 0): "<I"}
_ENCODING = {(1, 0): "latin1", (2, 0): "latin1", (3, 0): "utf8"}
_DESCR = r"'(?P<descr>[<>|=]?[A-Za-z][A-Za-z0-9]*)'"
_FORTRAN = r"(?P<fortran>True|False)"
_SHAPE = r"\((?P<shape>\s*|\s*\d+\s*,\s*|\s*\d+(?:\s*,\s*\d+)+\s*,?\s*)\)"
_ENTRY = re.compile(r"\s*'(?P<key>descr|fortran_order|shape)'\s*:\s*(?:" + _DESCR + "|" + _FORTRAN + "|" + _SHAPE + r")\s*")


class NpyFormatError(ValueError):
    """The ``.npy`` member or ``.npz`` file is not one this reader accepts (the message says why)."""


@dataclass(frozen=True, kw_only=True)
class NpyHeader:
    """What an ``.npy`` header declares."""

    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype


def read_npy_header(fh: BinaryIO) -> NpyHeader:
    """Read the magic, version and header from ``fh``, leaving it at the first data byte."""
    prefix = fh.read(len(MAGIC) + 2)
    if len(prefix) != len(MAGIC) + 2 or not prefix.startswith(MAGIC):
        raise NpyFormatError("not an .npy array (bad magic)")
    version = (prefix[-2], prefix[-1])
    if version not in _LENGTH_FORMAT:
        raise NpyFormatError(f"unsupported .npy format version {version[0]}.{version[1]}")
    length_format = _LENGTH_FORMAT[version]
    length_bytes = fh.read(struct.calcsize(length_format))
    if len(length_bytes) != struct.calcsize(length_format):
        raise NpyFormatError("truncated .npy header")
    (length,) = struct.unpack(length_format, length_bytes)
    if length > MAX_HEADER_BYTES:
        raise NpyFormatError(f".npy header of {length} bytes exceeds {MAX_HEADER_BYTES}")
    raw = fh.read(length)
    if len(raw) != length:
        raise NpyFormatError("truncated .npy header")
    try:
        text = raw.decode(_ENCODING[version])
    except UnicodeDecodeError:
        raise NpyFormatError("the .npy header is not valid text") from None
    return parse_npy_header(text)


def parse_npy_header(text: str) -> NpyHeader:
    """Parse the header's dict literal (see the module docstring for the accepted grammar)."""
    body = text.rstrip(" \n")
    if not (body.startswith("{") and body.endswith("}")):
        raise NpyFormatError("malformed .npy header (not a dict literal)")
    body = body[1:-1]
    values: dict[str, re.Match[str]] = {}
    position = 0
    while True:
        match = _ENTRY.match(body, position)
        if match is None:
            break
        key = match["key"]
        if key in values:
            raise NpyFormatError(f"malformed .npy header (duplicate key {key!r})")
        values[key] = match
        position = match.end()
        if position < len(body) and body[position] == ",":
            position += 1
        else:
            break
    if body[position:].strip() or set(values) != {"descr", "fortran_order", "shape"}:
        raise NpyFormatError("malformed .npy header (expected exactly 'descr', 'fortran_order' and 'shape')")
    descr, fortran, shape = values["descr"]["descr"], values["fortran_order"]["fortran"], values["shape"]["shape"]
    if descr is None or fortran is None or shape is None:
        raise NpyFormatError("malformed .npy header (a key has a value of the wrong kind)")
    try:
        dtype = np.dtype(descr)
    except (TypeError, ValueError):
        raise NpyFormatError(f"malformed .npy header (unknown dtype {descr!r})") from None
    return NpyHeader(shape=tuple(int(n) for n in re.findall(r"\d+", shape)), fortran_order=fortran == "True", dtype=dtype)


def read_npy_data(fh: BinaryIO, header: NpyHeader) -> np.ndarray:
    """The array ``header`` declares, read from ``fh`` (positioned after the header), in native byte order."""
    count = math.prod(header.shape)
    size = count * header.dtype.itemsize
    data = fh.read(size)
    if len(data) != size:
        raise NpyFormatError(f"truncated ({len(data)} of {size} bytes)")
    array = np.frombuffer(data, dtype=header.dtype, count=count).reshape(header.shape, order="F" if header.fortran_order else "C")
    return array.astype(header.dtype.newbyteorder("="), copy=True)


def load_npz_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (``np.savez``) by name; NpyFormatError for a damaged file or an object array.

    For files the device wrote or verified itself; :func:`device_agent.data.load_npz` reads untrusted data files
    with size limits before any allocation.
    """
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                with archive.open(member) as fh:
                    header = read_npy_header(fh)
                    if header.dtype.hasobject:
                        raise NpyFormatError(f"{member}: an array of Python objects (fedge never unpickles)")
                    arrays[member[:-4] if member.endswith(".npy") else member] = read_npy_data(fh, header)
    except (zipfile.BadZipFile, zlib.error, EOFError, struct.error) as exc:
        raise NpyFormatError(f"damaged .npz file: {exc}") from exc
    return arrays
