"""A user's own per-client data: a folder of ``.npz`` files, or the same arrays in memory.

The one place fedge parses and validates federated data from outside. Layout::

    my-data/
      alice.npz        # one client per file; the file name (without .npz) is the client id
      bob.npz
      regions.toml     # optional: client id -> region name (or regions.json)

Each ``.npz`` holds ``x_train``, ``y_train``, ``x_test``, ``y_test`` and,
optionally, ``x_val``/``y_val`` (together or not at all). Features are any
real numbers (int, float or bool; stored as float32), examples on the first
axis, one shape for every example of every client. Labels are 1-D class
indices 0..C-1 (int, bool, or floats holding whole numbers); ``C`` is
``num_classes`` when given, else the largest label + 1. Files are read with
``allow_pickle=False``, so a data file never runs code.

Any problem raises :class:`~sdk.datasets.errors.DatasetFormatError` (or
:class:`~sdk.datasets.errors.DatasetNotFoundError`) with one line naming the
file and key (``my-data/bob.npz: y_train: label -1 is negative...``). Other
files in the folder are ignored. A ``regions.toml`` maps ids to regions at
the top level (``alice = "eu"``); ``regions.json`` is the same as a JSON
object; every client must be named, and only clients.
"""

from __future__ import annotations

import json
import logging
import tomllib
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sdk.datasets.errors import DatasetFormatError, DatasetNotFoundError
from sdk.datasets.federated import ClientData, FederatedDataset, LabeledArrays

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
KEYS = tuple(f"{a}_{s}" for s in SPLITS for a in ("x", "y"))
REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
REGION_FILES = ("regions.toml", "regions.json")
_LAYOUT = "one .npz per client with x_train, y_train, x_test, y_test (optional x_val, y_val)"


def _features(where: str, key: str, value: object) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise DatasetFormatError(f"{where}: {key}: dtype {arr.dtype} is not a real number type (use float32 or int)")
    if arr.ndim < 2:
        raise DatasetFormatError(f"{where}: {key}: shape {arr.shape}; expected (examples, features...) with at least 2"
                                 " dimensions (for one feature per example, reshape to (n, 1))")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused just below
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        raise DatasetFormatError(f"{where}: {key}: holds NaN or infinite values (or values too large for float32)")
    return out


def _labels(where: str, key: str, value: object) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise DatasetFormatError(f"{where}: {key}: dtype {arr.dtype}; labels must be integer class indices")
    if arr.ndim != 1:
        raise DatasetFormatError(f"{where}: {key}: shape {arr.shape}; labels must be 1-D (one class index per example,"
                                 " not one-hot)")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
        raise DatasetFormatError(f"{where}: {key}: float labels must be whole numbers (class indices)")
    if arr.size and arr.min() < 0:
        raise DatasetFormatError(f"{where}: {key}: label {arr.min():g} is negative; labels must be 0..C-1")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _client_splits(where: str, arrays: Mapping[str, object]) -> dict[str, LabeledArrays]:
    """Validate one client's arrays (a file or a mapping); ``{"train": ..., "val": ..., "test": ...}``."""
    unknown = sorted(set(arrays) - set(KEYS))
    if unknown:
        raise DatasetFormatError(f"{where}: unexpected keys {unknown}; expected {', '.join(KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if ("x_val" in arrays) != ("y_val" in arrays):
        missing.append("y_val" if "x_val" in arrays else "x_val")
    if missing:
        raise DatasetFormatError(f"{where}: missing keys {missing} ({_LAYOUT})")
    out: dict[str, LabeledArrays] = {}
    for split in SPLITS:
        if f"x_{split}" not in arrays:
            continue
        x = _features(where, f"x_{split}", arrays[f"x_{split}"])
        y = _labels(where, f"y_{split}", arrays[f"y_{split}"])
        if x.shape[0] != y.shape[0]:
            raise DatasetFormatError(f"{where}: x_{split} has {x.shape[0]} examples but y_{split} has {y.shape[0]} labels")
        if split != "val" and x.shape[0] == 0:
            raise DatasetFormatError(f"{where}: x_{split} has no examples")
        if out and x.shape[1:] != out["train"].x.shape[1:]:
            raise DatasetFormatError(f"{where}: x_{split} examples have shape {x.shape[1:]}, but x_train's have"
                                     f" {out['train'].x.shape[1:]}")
        out[split] = LabeledArrays(x=x, y=y)
    return out


def _read_npz(path: Path, where: str) -> dict[str, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:  # ValueError: pickled data, refused
        raise DatasetFormatError(f"{where}: not a readable .npz archive ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetFormatError(f"{where}: not an .npz archive (a single array; np.savez writes an .npz)")
    with archive:
        arrays = {}
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except ValueError as exc:  # object arrays need pickle, which is refused
                raise DatasetFormatError(f"{where}: {key}: cannot be read without pickle; save plain numeric arrays"
                                         f" ({exc})") from exc
            except (zipfile.BadZipFile, EOFError, OSError) as exc:
                raise DatasetFormatError(f"{where}: {key}: unreadable ({exc})") from exc
    return arrays


def _read_regions(folder: Path) -> tuple[dict[str, str] | None, str]:
    present = [folder / name for name in REGION_FILES if (folder / name).is_file()]
    if not present:
        return None, ""
    if len(present) > 1:
        raise DatasetFormatError(f"{folder}: both regions.toml and regions.json; keep one")
    path = present[0]
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8")) if path.suffix == ".toml" else json.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(raw, dict):
        raise DatasetFormatError(f"{path}: expected a mapping of client id -> region name")
    bad = sorted(k for k, v in raw.items() if not isinstance(v, str) or not v)
    if bad:
        raise DatasetFormatError(f"{path}: region of {bad} is not a non-empty string")
    return dict(raw), str(path)


def _check_regions(regions: Mapping[str, str], ids: list[str], where: str) -> None:
    missing = [c for c in ids if c not in regions]
    extra = sorted(set(regions) - set(ids))
    if missing or extra:
        raise DatasetFormatError(f"{where}: regions must name every client and only clients; "
                                 f"missing {missing}, unknown {extra}")


def _assemble(name: str, source: str, per_client: dict[str, dict[str, LabeledArrays]], wheres: dict[str, str],
              regions: Mapping[str, str] | None, num_classes: int | None) -> FederatedDataset:
    ids = list(per_client)
    first = ids[0]
    shape = per_client[first]["train"].x.shape[1:]
    for cid in ids[1:]:
        other = per_client[cid]["train"].x.shape[1:]
        if other != shape:
            raise DatasetFormatError(f"{wheres[cid]}: x_train examples have shape {other}, but {wheres[first]}'s have {shape}")
    top = max(int(s.y.max()) for splits in per_client.values() for s in splits.values() if len(s))
    if num_classes is None:
        num_classes = top + 1
        if num_classes < 2:
            raise DatasetFormatError(f"{source}: every label is 0; classification needs at least 2 classes")
    elif num_classes < 2:
        raise DatasetFormatError(f"{source}: num_classes must be >= 2, got {num_classes}")
    else:
        for cid, splits in per_client.items():
            for split, part in splits.items():
                if len(part) and int(part.y.max()) >= num_classes:
                    raise DatasetFormatError(f"{wheres[cid]}: y_{split}: label {int(part.y.max())} is outside 0..{num_classes - 1}"
                                             f" ({num_classes} classes)")
    empty = LabeledArrays(x=np.zeros((0, *shape), dtype=np.float32), y=np.zeros(0, dtype=np.int64))
    clients = tuple(
        ClientData(client_id=cid, region=None if regions is None else str(regions[cid]), train=s["train"],
                   val=s.get("val", empty), test=s["test"])
        for cid, s in per_client.items()
    )
    n_train = sum(len(c.train) for c in clients)
    with_val = sum(1 for c in clients if len(c.val))
    region_note = f", {len(set(regions.values()))} regions" if regions else ""
    description = (f"{len(clients)} clients from {source}{region_note}; {n_train:,} training examples of shape {shape},"
                   f" {num_classes} classes; validation split given for {with_val} of {len(clients)} clients")
    return FederatedDataset(name=name, clients=clients, input_shape=shape, num_classes=num_classes, description=description)


def load_client_folder(path: str | Path, *, num_classes: int | None = None) -> FederatedDataset:
    """Read a folder of per-client ``.npz`` files (see the module docstring) into a :class:`FederatedDataset`.

    Clients are in file-name order; ``num_classes`` None infers it from the
    largest label. Regions come from ``regions.toml``/``regions.json`` in the
    folder; none there means no regions.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DatasetNotFoundError(f"{folder}: no such folder ({_LAYOUT})")
    files = sorted(p for p in folder.iterdir() if p.suffix == ".npz" and p.is_file())
    if not files:
        raise DatasetFormatError(f"{folder}: no .npz files ({_LAYOUT})")
    per_client: dict[str, dict[str, LabeledArrays]] = {}
    wheres: dict[str, str] = {}
    for file in files:
        where = str(file)
        wheres[file.stem] = where
        per_client[file.stem] = _client_splits(where, _read_npz(file, where))
    regions, regions_path = _read_regions(folder)
    if regions is not None:
        _check_regions(regions, list(per_client), regions_path)
    logger.info("read %d clients from %s", len(per_client), folder)
    return _assemble(folder.resolve().name or "user-data", f"{folder} (one .npz per client)", per_client, wheres, regions,
                     num_classes)


def clients_from_arrays(clients: Mapping[str, Mapping[str, object]], *, num_classes: int | None = None,
                        regions: Mapping[str, str] | None = None, name: str = "user-data") -> FederatedDataset:
    """The same validation for arrays already in memory: ``{client_id: {"x_train": ..., "y_train": ..., ...}}``.

    Keys and rules are those of a client's ``.npz`` file; ``regions`` maps
    every client id to a region (None: no regions).
    """
    if not isinstance(clients, Mapping) or not clients:
        raise DatasetFormatError("clients: expected a non-empty mapping of client id -> arrays")
    per_client: dict[str, dict[str, LabeledArrays]] = {}
    wheres: dict[str, str] = {}
    for cid, arrays in clients.items():
        where = f"client {cid!r}"
        if not isinstance(cid, str) or not cid:
            raise DatasetFormatError(f"{where}: client ids must be non-empty strings")
        if not isinstance(arrays, Mapping):
            raise DatasetFormatError(f"{where}: expected a mapping of {', '.join(REQUIRED_KEYS)} (optional x_val, y_val)"
                                     f" to arrays, got {type(arrays).__name__}")
        wheres[cid] = where
        per_client[cid] = _client_splits(where, arrays)
    if regions is not None:
        _check_regions(regions, list(per_client), "regions")
    return _assemble(name, "in-memory arrays", per_client, wheres, regions, num_classes)
