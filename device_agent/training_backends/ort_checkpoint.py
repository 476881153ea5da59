"""Reading and writing onnxruntime-training 1.19 checkpoint files (flatbuffers, identifier ``ODTC``).

The training API has no call to read or set optimizer moments, but its
checkpoint file holds them: module state (trainable and frozen tensors) and
one optimizer group (``group0``: step, initial learning rate, ``momentum0`` /
``momentum1`` per trainable parameter). This codec turns such a file into
numpy arrays and back, so the ort-training backend can export and import
backend-neutral state, and old state generations (ORT checkpoints) can be
migrated. It uses only the ``flatbuffers`` package, which every onnxruntime
wheel depends on; the schema is ORT's ``ort_training_checkpoint.fbs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agent.errors import StateError

_IDENTIFIER = b"ODTC"
_VERSION = 2  # what onnxruntime-training 1.19 writes and reads
_FLOAT = 1  # TensorDataType FLOAT
GROUP_NAME = "group0"
MOMENT_NAMES = ("momentum0", "momentum1")


@dataclass(frozen=True, kw_only=True)
class OrtCheckpoint:
    """A checkpoint's content. ``step`` None: no optimizer group (a bundle's initial checkpoint)."""

    trainable: dict[str, np.ndarray]
    frozen: dict[str, np.ndarray]
    step: int | None = None
    learning_rate: float = 0.0
    moments: dict[str, tuple[np.ndarray, ...]] | None = None


def _flatbuffers() -> Any:
    try:
        import flatbuffers
    except ImportError as exc:  # every onnxruntime wheel depends on it
        raise StateError("reading ORT checkpoints needs the flatbuffers package (installed with onnxruntime)") from exc
    return flatbuffers


class _Table:
    """Field access by slot over a flatbuffers table."""

    def __init__(self, tab: Any) -> None:
        self.tab = tab

    def _offset(self, slot: int) -> int:
        return int(self.tab.Offset(4 + 2 * slot))

    def scalar(self, slot: int, flags: Any, default: Any) -> Any:
        o = self._offset(slot)
        return self.tab.Get(flags, o + self.tab.Pos) if o else default

    def string(self, slot: int) -> str:
        o = self._offset(slot)
        return self.tab.String(o + self.tab.Pos).decode() if o else ""

    def table(self, slot: int) -> _Table | None:
        fb = _flatbuffers()
        o = self._offset(slot)
        return _Table(fb.table.Table(self.tab.Bytes, self.tab.Indirect(o + self.tab.Pos))) if o else None

    def tables(self, slot: int) -> list[_Table]:
        fb = _flatbuffers()
        o = self._offset(slot)
        if not o:
            return []
        start = self.tab.Vector(o)
        return [_Table(fb.table.Table(self.tab.Bytes, self.tab.Indirect(start + 4 * i))) for i in range(self.tab.VectorLen(o))]

    def numbers(self, slot: int, flags: Any) -> np.ndarray:
        o = self._offset(slot)
        return self.tab.GetVectorAsNumpy(flags, o) if o else np.zeros((0,))


def _tensor(t: _Table) -> tuple[str, np.ndarray]:
    fb = _flatbuffers()
    name = t.string(0)
    if t.scalar(3, fb.number_types.Int32Flags, 0) != _FLOAT:
        raise StateError(f"ORT checkpoint tensor {name!r} is not float32")
    if t.scalar(6, fb.number_types.Int64Flags, -1) != -1:
        raise StateError(f"ORT checkpoint tensor {name!r} keeps its data in an external file")
    dims = tuple(int(d) for d in t.numbers(2, fb.number_types.Int64Flags))
    raw = t.numbers(4, fb.number_types.Uint8Flags).tobytes()
    if len(raw) != 4 * int(np.prod(dims, dtype=np.int64)):
        raise StateError(f"ORT checkpoint tensor {name!r}: {len(raw)} bytes do not fit shape {dims}")
    return name, np.frombuffer(raw, dtype="<f4").reshape(dims).astype(np.float32)


def read_checkpoint(data: bytes) -> OrtCheckpoint:
    """Parse checkpoint bytes; StateError for anything that is not a float32 ORT checkpoint."""
    fb = _flatbuffers()
    if len(data) < 8 or data[4:8] != _IDENTIFIER:
        raise StateError("not an onnxruntime-training checkpoint (identifier ODTC missing)")
    try:
        root = _Table(fb.table.Table(bytearray(data), fb.encode.Get(fb.packer.uoffset, data, 0)))
        module = root.table(1)
        if module is None:
            raise StateError("ORT checkpoint has no module state")
        trainable = dict(_tensor(t) for t in module.tables(0))
        frozen = dict(_tensor(t) for t in module.tables(1))
        groups = root.tables(2)
        if not groups:
            return OrtCheckpoint(trainable=trainable, frozen=frozen)
        group = groups[0]
        moments = {}
        for state in group.tables(3):
            named = dict(_tensor(t) for t in state.tables(1))
            moments[state.string(0)] = tuple(named[m] for m in MOMENT_NAMES if m in named)
        return OrtCheckpoint(
            trainable=trainable, frozen=frozen, step=int(group.scalar(1, fb.number_types.Int64Flags, 0)),
            learning_rate=float(group.scalar(2, fb.number_types.Float32Flags, 0.0)), moments=moments,
        )
    except (IndexError, ValueError, KeyError, UnicodeDecodeError) as exc:
        raise StateError(f"damaged ORT checkpoint: {exc}") from exc


class _Writer:
    def __init__(self) -> None:
        self.fb = _flatbuffers()
        self.b = self.fb.Builder(1 << 16)

    def tensor(self, name: str, value: np.ndarray) -> int:
        arr = np.ascontiguousarray(value, dtype="<f4")
        name_off = self.b.CreateString(name)
        dims_off = self.b.CreateNumpyVector(np.asarray(arr.shape, dtype=np.int64))
        raw_off = self.b.CreateNumpyVector(np.frombuffer(arr.tobytes(), dtype=np.uint8))
        self.b.StartObject(7)
        self.b.PrependUOffsetTRelativeSlot(0, name_off, 0)
        self.b.PrependUOffsetTRelativeSlot(2, dims_off, 0)
        self.b.PrependInt32Slot(3, _FLOAT, 0)
        self.b.PrependUOffsetTRelativeSlot(4, raw_off, 0)
        return int(self.b.EndObject())

    def vector(self, offsets: list[int]) -> int:
        self.b.StartVector(4, len(offsets), 4)
        for off in reversed(offsets):
            self.b.PrependUOffsetTRelative(off)
        try:
            return int(self.b.EndVector())
        except TypeError:  # flatbuffers < 2.0 wants the length
            return int(self.b.EndVector(len(offsets)))


def write_checkpoint(ckpt: OrtCheckpoint) -> bytes:
    """Serialise ``ckpt`` the way onnxruntime-training 1.19 writes it."""
    w = _Writer()
    b = w.b
    trainable = w.vector([w.tensor(n, v) for n, v in ckpt.trainable.items()])
    frozen = w.vector([w.tensor(n, v) for n, v in ckpt.frozen.items()])
    b.StartObject(4)
    b.PrependUOffsetTRelativeSlot(0, trainable, 0)
    b.PrependUOffsetTRelativeSlot(1, frozen, 0)
    module = b.EndObject()
    groups = None
    if ckpt.step is not None:
        states = []
        for name, moments in (ckpt.moments or {}).items():
            tensors = w.vector([w.tensor(MOMENT_NAMES[i], m) for i, m in enumerate(moments)])
            name_off = b.CreateString(name)
            b.StartObject(2)
            b.PrependUOffsetTRelativeSlot(0, name_off, 0)
            b.PrependUOffsetTRelativeSlot(1, tensors, 0)
            states.append(b.EndObject())
        states_vec = w.vector(states)
        group_name = b.CreateString(GROUP_NAME)
        b.StartObject(4)
        b.PrependUOffsetTRelativeSlot(0, group_name, 0)
        b.PrependInt64Slot(1, int(ckpt.step), 0)
        b.PrependFloat32Slot(2, float(ckpt.learning_rate), 0.0)
        b.PrependUOffsetTRelativeSlot(3, states_vec, 0)
        groups = w.vector([b.EndObject()])
    b.StartObject(4)
    b.PrependInt32Slot(0, _VERSION, 0)
    b.PrependUOffsetTRelativeSlot(1, module, 0)
    if groups is not None:
        b.PrependUOffsetTRelativeSlot(2, groups, 0)
    root = b.EndObject()
    b.Finish(root, file_identifier=_IDENTIFIER)
    return bytes(b.Output())
