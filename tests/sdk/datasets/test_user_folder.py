"""A user's per-client folder: read into a FederatedDataset, and every bad input refused in one line naming file and key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sdk.datasets import DatasetFormatError, DatasetNotFoundError, clients_from_arrays, load_client_folder


def _arrays(n_train: int = 12, n_test: int = 4, features: tuple[int, ...] = (3,), classes: int = 3, seed: int = 0,
            val: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"x_train": rng.normal(size=(n_train, *features)), "y_train": rng.integers(0, classes, n_train),
           "x_test": rng.normal(size=(n_test, *features)), "y_test": rng.integers(0, classes, n_test)}
    if val:
        out |= {"x_val": rng.normal(size=(val, *features)), "y_val": rng.integers(0, classes, val)}
    return out


def _folder(tmp_path: Path, clients: dict[str, dict[str, np.ndarray]]) -> Path:
    folder = tmp_path / "my-data"
    folder.mkdir(parents=True)
    for cid, arrays in clients.items():
        np.savez(folder / f"{cid}.npz", **arrays)
    return folder


def test_user_folder_reads_clients_in_file_order_with_regions_and_optional_val(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"bob": _arrays(seed=1), "alice": _arrays(seed=2, val=3)})
    (folder / "regions.toml").write_text('alice = "eu"\nbob = "us"\n')
    (folder / "notes.txt").write_text("other files are ignored")
    data = load_client_folder(folder)
    assert [c.client_id for c in data.clients] == ["alice", "bob"]
    assert [c.region for c in data.clients] == ["eu", "us"]
    assert data.input_shape == (3,) and data.name == "my-data"
    alice = data.clients[0]
    assert alice.train.x.dtype == np.float32 and alice.train.y.dtype == np.int64
    assert (len(alice.train), len(alice.val), len(alice.test)) == (12, 3, 4)
    assert len(data.clients[1].val) == 0
    np.testing.assert_allclose(alice.train.x, _arrays(seed=2, val=3)["x_train"].astype(np.float32))
    labels = np.concatenate([s.y for c in data.clients for s in (c.train, c.val, c.test)])
    assert data.num_classes == int(labels.max()) + 1
    assert "2 clients" in data.description and "validation split given for 1 of 2" in data.description


def test_user_folder_regions_json_and_explicit_class_count(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"a": _arrays(classes=2), "b": _arrays(classes=2, seed=3)})
    (folder / "regions.json").write_text(json.dumps({"a": "north", "b": "north"}))
    data = load_client_folder(folder, num_classes=5)
    assert data.num_classes == 5 and data.regions == ("north",)


def test_user_folder_accepts_int_bool_features_and_whole_float_labels(tmp_path: Path) -> None:
    arrays = _arrays()
    arrays["x_train"] = (arrays["x_train"] > 0)
    arrays["x_test"] = np.round(arrays["x_test"] * 10).astype(np.int16)
    arrays["y_train"] = arrays["y_train"].astype(np.float64)
    data = load_client_folder(_folder(tmp_path, {"c": arrays}))
    assert set(np.unique(data.clients[0].train.x)) <= {0.0, 1.0}
    assert data.clients[0].train.y.dtype == np.int64


def _with(**changes: object) -> dict[str, object]:
    arrays: dict[str, object] = dict(_arrays())
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    return arrays


BAD = {
    "missing test labels": (_with(y_test=None), "missing keys ['y_test']"),
    "x_val without y_val": (_with(x_val=np.zeros((2, 3))), "missing keys ['y_val']"),
    "misspelt key": (_with(Y_test=np.zeros(4, int), y_test=None), "unexpected keys ['Y_test']"),
    "string features": (_with(x_train=np.array([["a", "b", "c"]] * 12)), "x_train: dtype <U1 is not a real number"),
    "complex features": (_with(x_test=np.zeros((4, 3), complex)), "x_test: dtype complex128"),
    "1-D features": (_with(x_train=np.zeros(12)), "x_train: shape (12,)"),
    "NaN features": (_with(x_test=np.full((4, 3), np.nan)), "x_test: holds NaN"),
    "float64 overflow": (_with(x_train=np.full((12, 3), 1e300)), "x_train: holds NaN or infinite"),
    "one-hot labels": (_with(y_train=np.eye(12, 3)), "y_train: shape (12, 3)"),
    "negative label": (_with(y_test=np.array([0, 1, -1, 2])), "y_test: label -1 is negative"),
    "fractional label": (_with(y_train=np.full(12, 0.5)), "y_train: float labels must be whole numbers"),
    "string labels": (_with(y_train=np.array(["cat"] * 12)), "y_train: dtype <U3"),
    "row mismatch": (_with(y_train=np.zeros(11, int)), "x_train has 12 examples but y_train has 11 labels"),
    "empty test": (_with(x_test=np.zeros((0, 3)), y_test=np.zeros(0, int)), "x_test has no examples"),
    "shape across splits": (_with(x_test=np.zeros((4, 4))), "x_test examples have shape (4,), but x_train's have (3,)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_user_folder_refuses_bad_arrays_naming_file_and_key(tmp_path: Path, case: str) -> None:
    arrays, expected = BAD[case]
    folder = _folder(tmp_path, {"good": _arrays(seed=5), "bad": arrays})  # type: ignore[dict-item]
    with pytest.raises(DatasetFormatError) as info:
        load_client_folder(folder)
    message = str(info.value)
    assert message.startswith(str(folder / "bad.npz") + ": ") and expected in message, message
    assert "\n" not in message
    # The in-memory API applies the same rules and names the client.
    with pytest.raises(DatasetFormatError, match=f"client 'bad': .*{expected[:12]}"):
        clients_from_arrays({"good": _arrays(seed=5), "bad": arrays})  # type: ignore[dict-item]


def test_user_folder_refuses_pickled_object_arrays_without_running_them(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"c": _with(x_train=np.array([[1, 2, 3]] * 12, dtype=object))})
    with pytest.raises(DatasetFormatError, match=r"c\.npz: x_train: cannot be read without pickle"):
        load_client_folder(folder)


@pytest.mark.parametrize("content,expected", [
    (b"not a zip at all", "not a readable .npz archive"),
    (None, "not an .npz archive"),  # a single .npy array saved under an .npz name
])
def test_user_folder_refuses_files_that_are_not_npz(tmp_path: Path, content: bytes | None, expected: str) -> None:
    folder = _folder(tmp_path, {"good": _arrays()})
    if content is None:
        with open(folder / "bad.npz", "wb") as fh:
            np.save(fh, np.zeros(3))
    else:
        (folder / "bad.npz").write_bytes(content)
    with pytest.raises(DatasetFormatError, match=expected):
        load_client_folder(folder)


def test_user_folder_refuses_shape_differences_between_clients_and_out_of_range_labels(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"a": _arrays(), "b": _arrays(features=(4,))})
    with pytest.raises(DatasetFormatError, match=r"b\.npz: x_train examples have shape \(4,\), but .*a\.npz's have \(3,\)"):
        load_client_folder(folder)
    folder = _folder(tmp_path / "two", {"a": _arrays(classes=3)})
    with pytest.raises(DatasetFormatError, match=r"a\.npz: y_\w+: label 2 is outside 0\.\.1"):
        load_client_folder(folder, num_classes=2)


@pytest.mark.parametrize("name,content,expected", [
    ("regions.toml", 'a = "eu"\n', r"missing \['b'\], unknown \[\]"),
    ("regions.toml", 'a = "eu"\nb = "eu"\nc = "us"\n', r"missing \[\], unknown \['c'\]"),
    ("regions.toml", 'a = 1\nb = "eu"\n', r"region of \['a'\] is not a non-empty string"),
    ("regions.toml", "a = \n", "not valid TOML"),
    ("regions.json", '["a", "b"]', "expected a mapping"),
])
def test_user_folder_refuses_bad_regions_files(tmp_path: Path, name: str, content: str, expected: str) -> None:
    folder = _folder(tmp_path, {"a": _arrays(), "b": _arrays(seed=1)})
    (folder / name).write_text(content)
    with pytest.raises(DatasetFormatError, match=expected):
        load_client_folder(folder)


def test_user_folder_refuses_missing_or_empty_folder_and_two_region_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="no such folder"):
        load_client_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match="no .npz files"):
        load_client_folder(tmp_path / "empty")
    folder = _folder(tmp_path, {"a": _arrays()})
    (folder / "regions.toml").write_text('a = "x"\n')
    (folder / "regions.json").write_text('{"a": "x"}')
    with pytest.raises(DatasetFormatError, match="keep one"):
        load_client_folder(folder)


def test_user_arrays_need_two_classes_and_a_mapping() -> None:
    one_class = _arrays(classes=1)
    with pytest.raises(DatasetFormatError, match="at least 2 classes"):
        clients_from_arrays({"a": one_class})
    with pytest.raises(DatasetFormatError, match="non-empty mapping"):
        clients_from_arrays({})
    with pytest.raises(DatasetFormatError, match="client 'a': expected a mapping"):
        clients_from_arrays({"a": (np.zeros((2, 3)), np.zeros(2))})  # type: ignore[dict-item]
    data = clients_from_arrays({"a": _arrays(), "b": _arrays(seed=4)}, regions={"a": "r1", "b": "r2"})
    assert data.regions == ("r1", "r2")
