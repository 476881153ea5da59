"""The bundle manifest: what a training bundle contains, parsed and validated in one place.

The manifest is JSON. The device trusts nothing in it until the Ed25519
signature over its exact bytes has been checked (see ``archive.py``); after
that, :func:`parse_manifest` is the only code that turns those bytes into
typed objects, and it rejects anything structurally wrong with a
:class:`~device_agent.errors.BundleError` that says what is wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


#: Written by this version when a bundle carries portable graphs. 2 adds the portable graphs
#: (``portable``) and lets a bundle carry either artifact kind or both; 3: the portable step graphs
#: take their small parameters as one ``flat.param`` buffer (an agent that reads only 1-2 would stop at
#: the first step, so it refuses the bundle by its version instead). A bundle of ORT-training artifacts
#: only is still written as 2; 1 (ORT-training artifacts only) and 2 are still read.
FORMAT_VERSION = 3
FORMAT_VERSION_WITHOUT_PORTABLE = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3)
#: The newest ONNX opset a portable graph may use: what onnxruntime 1.19 (the oldest runtime fedge supports) runs.
MAX_PORTABLE_OPSET = 18
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
ANCHOR_PREFIX = "anchor."

_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SUPPORTED_DTYPES = {"float32", "int64"}


class TrainingMode(str, Enum):
    """How the bundle trains.

    ``fedavg``: every parameter shared, plain local SGD/AdamW.
    ``fedprox``: every parameter shared, proximal term mu/2 ||w - w_global||^2.
    ``fedsim``: shared layers + personal head updated together (Pillutla et al. 2022), prox on shared.
    ``fedalt``: personal head first with shared frozen, then shared with the head frozen.
    ``ditto``: every parameter shared and trained as in fedavg/fedprox (set ``joint``), plus a personal copy
    of every parameter trained with lambda/2 ||v - w_global||^2 (set ``ditto``; Li et al., ICML 2021).
    """

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDSIM = "fedsim"
    FEDALT = "fedalt"
    DITTO = "ditto"


class LossKind(str, Enum):
    """Task losses the bundle builder supports."""

    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"
    BCE_WITH_LOGITS = "bce_with_logits"


class OptimizerKind(str, Enum):
    """Optimizers the bundle builder supports (learning rate settable at run time)."""

    SGD = "sgd"
    ADAMW = "adamw"


class ArtifactSetName(str, Enum):
    """Which parameters an artifact set trains."""

    JOINT = "joint"  # every trainable parameter (fedavg, fedprox, fedsim)
    PERSONAL = "personal"  # personal head only (fedalt phase 1)
    SHARED = "shared"  # shared layers only (fedalt phase 2)
    FINETUNE = "finetune"  # optional: the parameters a device may fine-tune locally (e.g. FedAvg + head fine-tuning)
    DITTO = "ditto"  # every parameter, proximal term lambda towards the global model (ditto's personal model)


class ArtifactKind(str, Enum):
    """The two kinds of training artifacts a bundle may carry (one backend each)."""

    ORT_TRAINING = "ort-training"  # onnxruntime-training's on-device training API (x86_64 only, deprecated upstream)
    PORTABLE = "portable"  # standard-ops (ai.onnx, opset <= 18) step graphs run by any onnxruntime >= 1.19


@dataclass(frozen=True, kw_only=True)
class ParameterInfo:
    """One model parameter: its name, shape, dtype and role (``shared``/``personal``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    role: str


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """A graph input: name, shape (``None`` for the batch axis) and dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str


@dataclass(frozen=True, kw_only=True)
class ArtifactSet:
    """File names of one ORT training artifact set and the parameters it updates."""

    name: ArtifactSetName
    training_model: str
    eval_model: str
    optimizer_model: str
    checkpoint: str
    trainable: tuple[str, ...]

    @property
    def files(self) -> tuple[str, ...]:
        """Every file this set needs."""
        return (self.training_model, self.eval_model, self.optimizer_model, self.checkpoint)


@dataclass(frozen=True, kw_only=True)
class PortableSet:
    """One portable training-step graph and the parameters it updates."""

    name: ArtifactSetName
    step_model: str
    trainable: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class PortableArtifacts:
    """The portable graphs: one step graph per set, one eval graph, the initial weights (``.npz``)."""

    opset: int
    eval_model: str
    initial_parameters: str
    sets: tuple[PortableSet, ...]

    @property
    def files(self) -> tuple[str, ...]:
        """Every file the portable backend needs."""
        return (self.eval_model, self.initial_parameters, *(s.step_model for s in self.sets))

    def set(self, name: ArtifactSetName) -> PortableSet:
        """The step graph of set ``name``; KeyError if absent."""
        for s in self.sets:
            if s.name is name:
                return s
        raise KeyError(name.value)


@dataclass(frozen=True, kw_only=True)
class Hyperparameters:
    """Training hyper-parameters baked into (or defaulted by) the bundle.

    ``mu``: the FedProx term of the sets that train the federated model.
    ``ditto_lambda``: the proximal weight of Ditto's personal set (None for every other mode).
    """

    mode: TrainingMode
    mu: float
    loss: LossKind
    optimizer: OptimizerKind
    learning_rate: float
    num_classes: int | None = None
    ditto_lambda: float | None = None


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    """Size and SHA-256 (hex) of one file in the bundle."""

    size: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class BundleManifest:
    """Everything a device needs to know about a bundle before loading any artifact."""

    format_version: int
    model_name: str
    bundle_version: int
    created_at: int
    signer_key_id: str
    hyperparameters: Hyperparameters
    inputs: tuple[TensorSpec, ...]
    label: TensorSpec
    output_name: str
    parameters: tuple[ParameterInfo, ...]
    artifact_sets: tuple[ArtifactSet, ...]
    files: dict[str, FileEntry] = field(default_factory=dict)
    portable: PortableArtifacts | None = None
    #: What devices send up: :class:`~device_agent.compression.CompressionSpec` text (None: full float32, the default).
    compression: str | None = None

    @property
    def artifact_kinds(self) -> tuple[ArtifactKind, ...]:
        """The artifact kinds this bundle carries (ORT-training first), never empty for a parsed manifest."""
        kinds = (ArtifactKind.ORT_TRAINING,) if self.artifact_sets else ()
        return kinds + ((ArtifactKind.PORTABLE,) if self.portable is not None else ())

    @property
    def set_names(self) -> tuple[ArtifactSetName, ...]:
        """The training sets (joint, or personal + shared, plus an optional finetune), whichever kind carries them."""
        if self.artifact_sets:
            return tuple(s.name for s in self.artifact_sets)
        return tuple(s.name for s in self.portable.sets) if self.portable is not None else ()

    def trainable(self, name: ArtifactSetName) -> tuple[str, ...]:
        """The parameters set ``name`` updates; KeyError if the bundle has no such set."""
        if self.artifact_sets:
            return self.artifact_set(name).trainable
        if self.portable is None:
            raise KeyError(name.value)
        return self.portable.set(name).trainable

    @property
    def has_anchors(self) -> bool:
        """Whether the state holds ``anchor.<name>`` copies of the shared parameters (FedProx mu > 0, or Ditto)."""
        return self.hyperparameters.mu > 0 or self.hyperparameters.mode is TrainingMode.DITTO

    @property
    def shared_names(self) -> tuple[str, ...]:
        """Names of the federated parameters, in model order."""
        return tuple(p.name for p in self.parameters if p.role == "shared")

    @property
    def personal_names(self) -> tuple[str, ...]:
        """Names of the parameters that never leave the device (empty for fedavg/fedprox)."""
        return tuple(p.name for p in self.parameters if p.role == "personal")

    def parameter(self, name: str) -> ParameterInfo:
        """The table entry of ``name``; KeyError if the bundle has no such parameter."""
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(name)

    def artifact_set(self, name: ArtifactSetName) -> ArtifactSet:
        """The artifact set called ``name``; KeyError if the bundle lacks it."""
        for s in self.artifact_sets:
            if s.name is name:
                return s
        raise KeyError(name.value)

    def shared_spec(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, dtype) of the shared parameters: what a valid update must contain."""
        return {p.name: (p.shape, p.dtype) for p in self.parameters if p.role == "shared"}

    def to_json_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces): the exact bytes that get signed.

        ``portable``, ``compression`` and ``ditto_lambda`` are left out when None, so a
        manifest that does not use them reads (and hashes, and verifies) as it was written
        before these fields existed.
        """
        plain = _to_plain(asdict(self))
        for optional in ("portable", "compression"):
            if plain[optional] is None:
                del plain[optional]
        if plain["hyperparameters"]["ditto_lambda"] is None:
            del plain["hyperparameters"]["ditto_lambda"]
        return json.dumps(plain, sort_keys=True, separators=(",", ":")).encode()


def _to_plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def parse_manifest(raw: bytes) -> BundleManifest:
    """Parse and validate manifest bytes; BundleError says exactly what is wrong (see ``manifest_parser``)."""
    from device_agent.bundle.manifest_parser import parse_manifest_bytes

    return parse_manifest_bytes(raw)
