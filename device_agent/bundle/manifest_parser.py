"""Turning signed manifest bytes into typed objects: the one place that parses a manifest.

Every structural problem raises :class:`~device_agent.errors.BundleError`
naming the field. Format 1 (ORT-training artifacts only), format 2
(``portable`` graphs, either kind or both) and format 3 (portable step graphs
with one ``flat.param`` buffer) are read.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Any

from device_agent.bundle.manifest import (
    _FILE_NAME,
    _SUPPORTED_DTYPES,
    MANIFEST_NAME,
    MAX_PORTABLE_OPSET,
    SIGNATURE_NAME,
    SUPPORTED_FORMAT_VERSIONS,
    ArtifactSet,
    ArtifactSetName,
    BundleManifest,
    FileEntry,
    Hyperparameters,
    LossKind,
    OptimizerKind,
    ParameterInfo,
    PortableArtifacts,
    PortableSet,
    TensorSpec,
    TrainingMode,
)
from device_agent.compression.spec import CompressionSpec
from device_agent.errors import BundleError


class _Reader:
    """Typed field access over untrusted JSON with errors that name the field."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise BundleError(f"{where}: expected an object, got {type(data).__name__}")
        self.data = data
        self.where = where

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        if key not in self.data:
            if optional:
                return None
            raise BundleError(f"{self.where}: missing field {key!r}")
        value = self.data[key]
        if value is None and optional:
            return None
        # bool is an int subclass; never accept it where a number is wanted
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise BundleError(f"{self.where}.{key}: expected {kind}, got bool")
        if not isinstance(value, kind):
            raise BundleError(f"{self.where}.{key}: expected {kind}, got {type(value).__name__}")
        return value

    def enum(self, key: str, enum_type: type[Enum]) -> Any:
        raw = self.get(key, str)
        try:
            return enum_type(raw)
        except ValueError:
            allowed = [e.value for e in enum_type]  # type: ignore[var-annotated]
            raise BundleError(f"{self.where}.{key}: {raw!r} is not one of {allowed}") from None

    def name(self, key: str) -> str:
        value = self.get(key, str)
        if not value or len(value) > 256:
            raise BundleError(f"{self.where}.{key}: bad name {value!r}")
        return value

    def file_name(self, key: str) -> str:
        value = self.get(key, str)
        if not _FILE_NAME.match(value):
            raise BundleError(f"{self.where}.{key}: {value!r} is not a plain file name")
        return value

    def dtype(self, key: str) -> str:
        value = self.get(key, str)
        if value not in _SUPPORTED_DTYPES:
            raise BundleError(f"{self.where}.{key}: unsupported dtype {value!r}")
        return value


def _dims(values: Any, where: str, *, allow_none: bool) -> tuple[Any, ...]:
    if not isinstance(values, list) or len(values) > 8:
        raise BundleError(f"{where}: expected a list of at most 8 dimensions")
    out: list[int | None] = []
    for d in values:
        if d is None and allow_none:
            out.append(None)
        elif isinstance(d, int) and not isinstance(d, bool) and 0 < d < 2**31:
            out.append(d)
        else:
            raise BundleError(f"{where}: bad dimension {d!r}")
    return tuple(out)


def _tensor_spec(data: Any, where: str) -> TensorSpec:
    r = _Reader(data, where)
    return TensorSpec(name=r.name("name"), shape=_dims(r.get("shape", list), where + ".shape", allow_none=True), dtype=r.dtype("dtype"))


def parse_manifest_bytes(raw: bytes) -> BundleManifest:
    """Parse and validate manifest bytes; BundleError says exactly what is wrong."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"manifest is not valid UTF-8 JSON: {exc}") from exc
    top = _Reader(data, "manifest")
    version = top.get("format_version", int)
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise BundleError(f"manifest format version {version} is not supported (this agent reads {list(SUPPORTED_FORMAT_VERSIONS)})")
    h = _Reader(top.get("hyperparameters", dict), "manifest.hyperparameters")
    mu = float(h.get("mu", (int, float)))
    lr = float(h.get("learning_rate", (int, float)))
    if not (mu >= 0 and mu < 1e6) or not (0 < lr < 1e3):
        raise BundleError("manifest.hyperparameters: mu must be >= 0 and learning_rate > 0")
    num_classes = h.get("num_classes", int, optional=True)
    mode = h.enum("mode", TrainingMode)
    raw_lambda = h.get("ditto_lambda", (int, float), optional=True)
    ditto_lambda = None if raw_lambda is None else float(raw_lambda)
    if (mode is TrainingMode.DITTO) != (ditto_lambda is not None) or not (ditto_lambda is None or 0 < ditto_lambda < 1e6):
        raise BundleError("manifest.hyperparameters.ditto_lambda: needed (> 0) by mode ditto, and only by it")
    hyper = Hyperparameters(
        mode=mode,
        mu=mu,
        loss=h.enum("loss", LossKind),
        optimizer=h.enum("optimizer", OptimizerKind),
        learning_rate=lr,
        num_classes=num_classes,
        ditto_lambda=ditto_lambda,
    )
    params = []
    for i, item in enumerate(top.get("parameters", list)):
        r = _Reader(item, f"manifest.parameters[{i}]")
        role = r.get("role", str)
        if role not in ("shared", "personal"):
            raise BundleError(f"manifest.parameters[{i}].role: {role!r} is not shared/personal")
        params.append(
            ParameterInfo(
                name=r.name("name"), shape=_dims(r.get("shape", list), f"manifest.parameters[{i}].shape", allow_none=False),
                dtype=r.dtype("dtype"), role=role,
            )
        )
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise BundleError("manifest.parameters: duplicate parameter names")
    if not any(p.role == "shared" for p in params):
        raise BundleError("manifest.parameters: no shared parameter")
    if hyper.mode is TrainingMode.DITTO and any(p.role != "shared" for p in params):
        raise BundleError("manifest.parameters: mode ditto federates every parameter (its personal model is a full copy)")
    sets = []
    for i, item in enumerate(top.get("artifact_sets", list)):
        r = _Reader(item, f"manifest.artifact_sets[{i}]")
        sets.append(
            ArtifactSet(
                name=r.enum("name", ArtifactSetName),
                training_model=r.file_name("training_model"),
                eval_model=r.file_name("eval_model"),
                optimizer_model=r.file_name("optimizer_model"),
                checkpoint=r.file_name("checkpoint"),
                trainable=_trainable(r, names),
            )
        )
    portable = None
    if "portable" in top.data:
        if version < 2:
            raise BundleError("manifest.portable: format version 1 has no portable graphs")
        portable = _portable(top.get("portable", dict), names)
    if not sets and portable is None:
        raise BundleError("manifest: no training artifacts (neither artifact_sets nor portable)")
    if sets:
        _check_sets(hyper.mode, [s.name for s in sets], "manifest.artifact_sets")
    if portable is not None:
        _check_sets(hyper.mode, [s.name for s in portable.sets], "manifest.portable.sets")
        if sets and {s.name: s.trainable for s in sets} != {s.name: s.trainable for s in portable.sets}:
            raise BundleError("manifest: artifact_sets and portable.sets disagree on the sets or their trainable parameters")
    files: dict[str, FileEntry] = {}
    for fname, entry in top.get("files", dict).items():
        if not _FILE_NAME.match(fname) or fname in (MANIFEST_NAME, SIGNATURE_NAME):
            raise BundleError(f"manifest.files: bad file name {fname!r}")
        r = _Reader(entry, f"manifest.files[{fname}]")
        size = r.get("size", int)
        digest = r.get("sha256", str)
        if size < 0 or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise BundleError(f"manifest.files[{fname}]: bad size or sha256")
        files[fname] = FileEntry(size=size, sha256=digest)
    listed = [f for s in sets for f in s.files] + (list(portable.files) if portable is not None else [])
    missing = [f for f in listed if f not in files]
    if missing:
        raise BundleError(f"manifest.files: artifact files not listed: {missing}")
    bundle_version = top.get("bundle_version", int)
    if bundle_version < 0:
        raise BundleError("manifest.bundle_version must be >= 0")
    compression = top.get("compression", str, optional=True)
    if compression is not None:
        try:
            CompressionSpec.parse(compression)
        except ValueError as exc:
            raise BundleError(f"manifest.compression: {exc}") from exc
    return BundleManifest(
        format_version=version,
        model_name=top.name("model_name"),
        bundle_version=bundle_version,
        created_at=top.get("created_at", int),
        signer_key_id=top.name("signer_key_id"),
        hyperparameters=hyper,
        inputs=tuple(_tensor_spec(x, f"manifest.inputs[{i}]") for i, x in enumerate(top.get("inputs", list))),
        label=_tensor_spec(top.get("label", dict), "manifest.label"),
        output_name=top.name("output_name"),
        parameters=tuple(params),
        artifact_sets=tuple(sets),
        files=files,
        portable=portable,
        compression=compression,
    )


def _trainable(r: _Reader, names: list[str]) -> tuple[str, ...]:
    trainable = tuple(r.get("trainable", list))
    unknown = [t for t in trainable if t not in names]
    if unknown or not trainable or len(set(trainable)) != len(trainable):
        raise BundleError(f"{r.where}.trainable: unknown, repeated or empty {unknown}")
    return trainable


_MODE_SETS = {
    TrainingMode.FEDALT: {ArtifactSetName.PERSONAL, ArtifactSetName.SHARED},
    TrainingMode.DITTO: {ArtifactSetName.JOINT, ArtifactSetName.DITTO},
}


def _check_sets(mode: TrainingMode, present_all: list[ArtifactSetName], where: str) -> None:
    expected = _MODE_SETS.get(mode, {ArtifactSetName.JOINT})
    present = [s for s in present_all if s is not ArtifactSetName.FINETUNE]
    finetune = [s for s in present_all if s is ArtifactSetName.FINETUNE]
    if set(present) != expected or len(present) != len(expected) or len(finetune) > 1:
        raise BundleError(f"{where}: mode {mode.value} needs exactly {sorted(s.value for s in expected)}"
                          " (plus at most one 'finetune' set)")


def _portable(data: Any, names: list[str]) -> PortableArtifacts:
    r = _Reader(data, "manifest.portable")
    opset = r.get("opset", int)
    if not 1 <= opset <= MAX_PORTABLE_OPSET:
        raise BundleError(f"manifest.portable.opset: {opset} is not in 1..{MAX_PORTABLE_OPSET}")
    sets = []
    for i, item in enumerate(r.get("sets", list)):
        sr = _Reader(item, f"manifest.portable.sets[{i}]")
        sets.append(PortableSet(name=sr.enum("name", ArtifactSetName), step_model=sr.file_name("step_model"),
                                trainable=_trainable(sr, names)))
    return PortableArtifacts(opset=opset, eval_model=r.file_name("eval_model"),
                             initial_parameters=r.file_name("initial_parameters"), sets=tuple(sets))
