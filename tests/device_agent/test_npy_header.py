"""The strict .npy header reader: every header numpy writes reads back as numpy reads it; anything else is refused."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent.data import load_npz
from device_agent.npy_header import NpyFormatError, parse_npy_header, read_npy_header

DTYPES = ("<f4", ">f4", "<f8", "<f2", "|u1", "|i1", "<i2", ">i4", "<i8", "<u8", "|b1", "<c8")


def _written(array: np.ndarray, version: tuple[int, int] | None = None) -> io.BytesIO:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version)
    buffer.seek(0)
    return buffer


@settings(max_examples=200, deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=st.lists(st.integers(0, 5), max_size=4).map(tuple),
       fortran=st.booleans(), version=st.sampled_from([None, (1, 0), (2, 0), (3, 0)]))
def test_every_header_numpy_writes_reads_as_numpy_reads_it(dtype: str, shape: tuple[int, ...], fortran: bool,
                                                           version: tuple[int, int] | None) -> None:
    array = np.zeros(shape, dtype=dtype, order="F" if fortran else "C")
    ours = _written(array, version)
    header = read_npy_header(ours)
    theirs = _written(array, version)
    major, minor = np.lib.format.read_magic(theirs)
    reader = np.lib.format.read_array_header_1_0 if (major, minor) == (1, 0) else np.lib.format.read_array_header_2_0
    assert (header.shape, header.fortran_order, header.dtype) == reader(theirs)
    assert ours.tell() == theirs.tell()  # both stop at the first data byte


@pytest.mark.parametrize("text, reason", [
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'extra': 1}", "exactly"),
    ("{'descr': '<f4', 'fortran_order': False}", "exactly"),
    ("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': ()}", "duplicate"),
    ("{'descr': True, 'fortran_order': False, 'shape': ()}", "wrong kind"),
    ("{'descr': '<f4', 'fortran_order': '<f4', 'shape': ()}", "wrong kind"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (3)}", "exactly"),       # (3) is an int, not a tuple
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (3L,)}", "exactly"),     # Python 2 long
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}", "exactly"),
    ("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': ()}", "exactly"),  # structured
    ("{'descr': '<q9', 'fortran_order': False, 'shape': ()}", "unknown dtype"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (), ", "dict literal"),
    ("__import__('os')", "dict literal"),
    ("", "dict literal"),
])
def test_anything_else_is_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(NpyFormatError, match=reason):
        parse_npy_header(text)


def test_a_header_longer_than_declared_or_the_limit_is_refused() -> None:
    with pytest.raises(NpyFormatError, match="truncated"):
        read_npy_header(io.BytesIO(b"\x93NUMPY\x01\x00\x40\x00{'descr'"))
    with pytest.raises(NpyFormatError, match="exceeds"):
        read_npy_header(io.BytesIO(b"\x93NUMPY\x02\x00" + (1 << 20).to_bytes(4, "little")))
    with pytest.raises(NpyFormatError, match="version"):
        read_npy_header(io.BytesIO(b"\x93NUMPY\x04\x00\x00\x00"))


def test_many_threads_read_data_files_at_once(tmp_path: Path) -> None:
    # The demo runs its devices as threads of one process; numpy's header reader (ast) failed there under
    # CPython 3.11 with "AST constructor recursion depth mismatch". Ours has no shared parser state.
    rng = np.random.default_rng(0)
    path = tmp_path / "local.npz"
    x, y = rng.normal(size=(40, 6, 10)).astype(np.float32), rng.integers(0, 3, size=40)
    np.savez(path, x=x, y=y)
    failures: list[BaseException] = []

    def load_repeatedly() -> None:
        try:
            for _ in range(100):
                data = load_npz(path)
                assert len(data) == 40
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=load_repeatedly) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads) and failures == []
