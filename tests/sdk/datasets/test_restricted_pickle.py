"""Tests for sdk.datasets.restricted_pickle: object .npy files load, code-running pickles are refused."""

from __future__ import annotations

import codecs
import copyreg
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from sdk.datasets.errors import DatasetFormatError, UnsafePickleError
from sdk.datasets.restricted_pickle import read_object_npy, restricted_loads

try:
    from numpy._core import multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray  # type: ignore[no-redef]


class _Reduce:
    """Pickles as ``func(*args)``: what an attacker's payload looks like."""

    def __init__(self, func, *args) -> None:
        self.func = func
        self.args = args

    def __reduce__(self):
        return self.func, self.args


def _object_npy(path: Path, payload: bytes) -> Path:
    """Write a valid object-dtype npy header followed by ``payload``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|O", "fortran_order": False, "shape": ()})
    path.write_bytes(buffer.getvalue() + payload)
    return path


def test_read_object_npy_round_trips_np_save_output(tmp_path: Path) -> None:
    stored = np.empty((), dtype=object)
    stored[()] = {"x": [np.arange(6.0).reshape(3, 2), np.ones((2, 2), np.float32)], "y": np.array([3, 1]),
                  "names": ["ax", "ay"], "scalar": np.float32(2.5), "raw": b"\x00\xff"}
    path = tmp_path / "data.npy"
    np.save(path, stored, allow_pickle=True)
    loaded = read_object_npy(path).item()
    assert loaded.keys() == stored[()].keys()
    np.testing.assert_array_equal(loaded["x"][0], np.arange(6.0).reshape(3, 2))
    assert loaded["x"][1].dtype == np.float32
    np.testing.assert_array_equal(loaded["y"], [3, 1])
    assert loaded["names"] == ["ax", "ay"] and loaded["scalar"] == np.float32(2.5) and loaded["raw"] == b"\x00\xff"


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_restricted_loads_rebuilds_arrays_and_bytes_at_every_numpy_protocol(protocol: int) -> None:
    data = pickle.dumps({"a": np.arange(4, dtype=np.int16), "b": b"\xff\x00", "s": np.float64(1.5)}, protocol=protocol)
    loaded = restricted_loads(data)
    np.testing.assert_array_equal(loaded["a"], np.arange(4, dtype=np.int16))
    assert loaded["a"].dtype == np.int16 and loaded["b"] == b"\xff\x00" and loaded["s"] == 1.5


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_restricted_loads_refuses_os_system_without_running_it(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Reduce(os.system, f"touch {marker}"), protocol=protocol)
    with pytest.raises(UnsafePickleError, match="system"):
        restricted_loads(payload)
    assert not marker.exists()


def test_restricted_loads_refuses_a_payload_the_standard_unpickler_would_run(tmp_path: Path) -> None:
    payload = pickle.dumps(_Reduce(os.makedirs, str(tmp_path / "made")))
    with pytest.raises(UnsafePickleError):
        restricted_loads(payload)
    assert not (tmp_path / "made").exists()
    pickle.loads(payload)  # the control: the same bytes are live code for pickle.loads
    assert (tmp_path / "made").is_dir()


def test_restricted_loads_refuses_inst_opcode_eval() -> None:
    # Protocol 0 INST: builtins.eval("1 + 1"), resolved through find_class like GLOBAL.
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        restricted_loads(b"(S'1 + 1'\nibuiltins\neval\n.")


def test_restricted_loads_refuses_extension_codes_even_when_cached() -> None:
    # 240-255 are copyreg's private-use codes; os.getcwd stands in for a dangerous callable.
    copyreg.add_extension(os.getcwd.__module__, "getcwd", 241)
    try:
        payload = pickle.dumps(_Reduce(os.getcwd), protocol=2)
        assert pickle.loads(payload) == os.getcwd()  # fills the C unpickler's extension cache
        with pytest.raises(UnsafePickleError, match="EXT1"):
            restricted_loads(payload)
    finally:
        copyreg.remove_extension(os.getcwd.__module__, "getcwd", 241)


def test_restricted_loads_refuses_allowed_names_used_beyond_their_purpose() -> None:
    with pytest.raises(UnsafePickleError, match="encoding"):
        restricted_loads(pickle.dumps(_Reduce(codecs.encode, "text", "rot13"), protocol=2))
    with pytest.raises(UnsafePickleError, match="shape"):
        restricted_loads(pickle.dumps(_Reduce(multiarray._reconstruct, np.ndarray, (10**6,), b"b"), protocol=2))


def test_read_object_npy_refuses_malicious_payload_after_a_valid_header(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _object_npy(tmp_path / "evil.npy", pickle.dumps(_Reduce(os.system, f"touch {marker}"), protocol=2))
    with pytest.raises(UnsafePickleError):
        read_object_npy(path)
    assert not marker.exists()


def test_read_object_npy_rejects_non_object_and_non_npy_files(tmp_path: Path) -> None:
    np.save(tmp_path / "plain.npy", np.arange(3))
    with pytest.raises(DatasetFormatError, match="holds no objects"):
        read_object_npy(tmp_path / "plain.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an npy file at all")
    with pytest.raises(DatasetFormatError, match="not a valid npy"):
        read_object_npy(tmp_path / "junk.npy")
    with pytest.raises(DatasetFormatError, match="malformed"):
        read_object_npy(_object_npy(tmp_path / "cut.npy", pickle.dumps(np.arange(3), protocol=2)[:20]))
