"""PyTorch model -> ONNX -> ONNX Runtime on-device training artifacts.

FedProx lives *inside* the training graph: each shared parameter ``w`` gets a
frozen twin initializer ``anchor.w`` and the loss becomes
``task_loss + mu/2 * sum ||w - anchor.w||^2``. The device writes the last
received global weights into the anchors each round, so no host round-trip is
needed to regularise towards them (Li et al., "Federated Optimization in
Heterogeneous Networks", MLSys 2020).

For ``fedalt`` (Pillutla et al., "Federated Learning with Partial Model
Personalization", ICML 2022) two artifact sets are generated: one trains the
personal head with the shared layers frozen, the other trains the shared layers
with the head frozen. ORT cannot share one ``CheckpointState`` between two
modules, so the device keeps one state per set and copies the parameters that
just changed at each phase switch.

For ``ditto`` (Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated
Learning Through Personalization", ICML 2021) every parameter is federated and
two sets train all of them: ``joint`` the global model's local update (FedAvg,
or FedProx with ``mu``), ``ditto`` the device's personal model with the proximal
term ``lambda/2 * sum ||v - anchor.w||^2`` towards the received global model. The
anchors are FedProx's, over every parameter; the device keeps the second copy
of the weights (see ``device_agent.trainer``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from device_agent.bundle.manifest import (
    ANCHOR_PREFIX,
    ArtifactKind,
    ArtifactSet,
    ArtifactSetName,
    Hyperparameters,
    LossKind,
    OptimizerKind,
    ParameterInfo,
    PortableArtifacts,
    TensorSpec,
    TrainingMode,
)
from sdk.model_spec import ParameterSplit, ParameterSplitError, Role, matches_prefix, names_with_role
from sdk.ort_smoke import smoke_test_ort_sets
from sdk.portable_graph import PortablePlan, UnsupportedModelError, build_portable_graphs, check_model_supported
from sdk.training_defaults import DEFAULT_LEARNING_RATE

logger = logging.getLogger(__name__)

#: ORT 1.19 loads ONNX IR <= 10 and opset <= 21.
MAX_IR_VERSION = 10
OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "output"
LABEL_NAME = "labels"
#: What a bundle carries unless told otherwise: both kinds, so every device can train it.
ALL_KINDS = (ArtifactKind.ORT_TRAINING, ArtifactKind.PORTABLE)


@dataclass(frozen=True, kw_only=True)
class TrainingSpec:
    """How a bundle trains. ``mu`` > 0 adds the FedProx term on the shared layers.

    ``finetune`` (name prefixes, e.g. ``("head",)``) adds an extra artifact set
    that trains only those parameters with everything else frozen: what a
    device runs to fine-tune a received global model locally (FedAvg + local
    fine-tuning). Empty: no such set. ``ditto_lambda`` (> 0, mode ``ditto``
    only) weighs the personal model's pull towards the global model.

    Enum fields also accept their string values (``mode="fedalt"``).
    """

    mode: TrainingMode
    loss: LossKind = LossKind.CROSS_ENTROPY
    optimizer: OptimizerKind = OptimizerKind.ADAMW
    learning_rate: float = DEFAULT_LEARNING_RATE
    mu: float = 0.0
    finetune: tuple[str, ...] = ()
    ditto_lambda: float = 0.0
    #: Portable step graphs: 0 runs the forward and backward on the whole batch, k > 0 on slices of k examples
    #: (same numbers, less memory, some speed; docs/device-agent.md "Micro-batched steps").
    micro_batch: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.finetune, str):
            raise TypeError("finetune must be a sequence of name prefixes, not a string")
        object.__setattr__(self, "finetune", tuple(self.finetune))
        object.__setattr__(self, "mode", TrainingMode(self.mode))
        object.__setattr__(self, "loss", LossKind(self.loss))
        object.__setattr__(self, "optimizer", OptimizerKind(self.optimizer))
        if not (self.learning_rate > 0):
            raise ValueError("learning_rate must be > 0")
        if not (self.mu >= 0):
            raise ValueError("mu must be >= 0")
        if self.mode is TrainingMode.FEDAVG and self.mu != 0:
            raise ValueError("fedavg has no proximal term; use mode fedprox for mu > 0")
        if self.mode is TrainingMode.FEDPROX and self.mu == 0:
            raise ValueError("fedprox needs mu > 0")
        if (self.mode is TrainingMode.DITTO) != (self.ditto_lambda > 0) or not self.ditto_lambda >= 0:
            raise ValueError("ditto_lambda must be > 0 for mode ditto and 0 for every other mode")
        if not isinstance(self.micro_batch, int) or self.micro_batch < 0:
            raise ValueError("micro_batch must be 0 (whole batch) or a positive slice size")

    def prox_weight(self, set_name: ArtifactSetName) -> float:
        """The proximal weight in set ``set_name``'s loss: lambda for Ditto's personal set, mu otherwise."""
        return self.ditto_lambda if set_name is ArtifactSetName.DITTO else self.mu

    @property
    def anchored(self) -> bool:
        """Whether the graphs carry ``anchor.<name>`` copies of the shared parameters."""
        return self.mu > 0 or self.mode is TrainingMode.DITTO


@dataclass(frozen=True, kw_only=True)
class GeneratedArtifacts:
    """What :func:`generate_training_artifacts` wrote and what the manifest must say about it."""

    directory: Path
    hyperparameters: Hyperparameters
    parameters: tuple[ParameterInfo, ...]
    artifact_sets: tuple[ArtifactSet, ...]
    inputs: tuple[TensorSpec, ...]
    label: TensorSpec
    output_name: str
    portable: PortableArtifacts | None = None

    @property
    def files(self) -> tuple[str, ...]:
        """Every file written, of both kinds."""
        ort = tuple(f for s in self.artifact_sets for f in s.files)
        return ort + (self.portable.files if self.portable is not None else ())


def _check_mode_split(spec: TrainingSpec, roles: dict[str, Role]) -> None:
    personal = names_with_role(roles, Role.PERSONAL)
    if spec.mode in (TrainingMode.FEDAVG, TrainingMode.FEDPROX, TrainingMode.DITTO) and personal:
        raise ValueError(f"mode {spec.mode.value} federates every parameter; declare no personal prefixes (got {personal})")
    if spec.mode in (TrainingMode.FEDSIM, TrainingMode.FEDALT) and not personal:
        raise ValueError(f"mode {spec.mode.value} needs a personal head; declare personal prefixes")


def export_onnx(model: torch.nn.Module, example_input: torch.Tensor, path: Path) -> onnx.ModelProto:
    """Export ``model`` for training with a dynamic batch axis; initializer names equal parameter names."""
    model = copy.deepcopy(model).cpu().float()
    model.train()
    with warnings.catch_warnings():
        # torch 2.13 deprecates training=TRAINING in favour of model.train(); we set both.
        warnings.simplefilter("ignore", DeprecationWarning)
        _export(model, example_input, path)
    proto = onnx.load(str(path))
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    return proto


def _export(model: torch.nn.Module, example_input: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model,
        (example_input,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        export_params=True,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.TRAINING,
        opset_version=OPSET,
        dynamo=False,
    )


def _add_anchors(proto: onnx.ModelProto, shared: Sequence[str]) -> list[str]:
    inits = {i.name: i for i in proto.graph.initializer}
    anchors = []
    for name in shared:
        anchor = numpy_helper.from_array(numpy_helper.to_array(inits[name]).copy(), ANCHOR_PREFIX + name)
        proto.graph.initializer.append(anchor)
        anchors.append(anchor.name)
    return anchors


def _task_loss_block(kind: LossKind):  # type: ignore[no-untyped-def]
    from onnxruntime.training import onnxblock

    if kind is LossKind.CROSS_ENTROPY:
        return onnxblock.loss.CrossEntropyLoss()
    if kind is LossKind.MSE:
        return onnxblock.loss.MSELoss()
    return onnxblock.loss.BCEWithLogitsLoss()


def _make_loss_block(kind: LossKind, shared: Sequence[str], mu: float):  # type: ignore[no-untyped-def]
    from onnxruntime.training import onnxblock

    class FedProxLoss(onnxblock.Block):  # type: ignore[misc]
        """task loss + mu/2 * sum over shared w of ||w - anchor.w||^2."""

        def __init__(self) -> None:
            super().__init__()
            self._task = _task_loss_block(kind)

        def build(self, output_name: str, labels_name: str = LABEL_NAME) -> str:
            loss = self._task(output_name, labels_name)
            if mu == 0 or not shared:
                return loss
            total = None
            for name in shared:
                diff = onnxblock.blocks.Sub()(name, ANCHOR_PREFIX + name)
                squared = onnxblock.blocks.Mul()(diff, diff)
                term = onnxblock.blocks.ReduceSum(keepdims=False)(squared)
                total = term if total is None else onnxblock.blocks.Add()(total, term)
            # A rank-0 initializer: onnxblock's Constant is shape [1], and adding it to
            # the rank-0 loss breaks gradient building (ReduceSum axis error).
            half_mu = "fedprox.half_mu"
            self.base.graph.initializer.append(numpy_helper.from_array(np.array(mu / 2, dtype=np.float32), half_mu))
            prox = onnxblock.blocks.Mul()(total, half_mu)
            return onnxblock.blocks.Add()(loss, prox)

    return FedProxLoss()


def _generate_set(
    proto: onnx.ModelProto,
    *,
    set_name: ArtifactSetName,
    trainable: list[str],
    frozen: list[str],
    spec: TrainingSpec,
    shared: Sequence[str],
    out_dir: Path,
) -> ArtifactSet:
    import onnxruntime
    from onnxruntime.training import artifacts

    onnxruntime.set_default_logger_severity(3)
    prefix = f"{set_name.value}_"
    optim = artifacts.OptimType.SGD if spec.optimizer is OptimizerKind.SGD else artifacts.OptimType.AdamW
    # onnxblock writes scratch files to the cwd; keep them out of the user's tree.
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch), _native_stderr_to_log():
        artifacts.generate_artifacts(
            copy.deepcopy(proto),
            requires_grad=trainable,
            frozen_params=frozen,
            loss=_make_loss_block(spec.loss, shared, spec.prox_weight(set_name)),
            optimizer=optim,
            artifact_directory=str(out_dir),
            prefix=prefix,
            additional_output_names=[OUTPUT_NAME],
        )
    files = {
        "training_model": f"{prefix}training_model.onnx",
        "eval_model": f"{prefix}eval_model.onnx",
        "optimizer_model": f"{prefix}optimizer_model.onnx",
        "checkpoint": f"{prefix}checkpoint",
    }
    for f in files.values():
        if not (out_dir / f).is_file():
            raise RuntimeError(f"onnxruntime did not write {f}")
    for key in ("training_model", "eval_model", "optimizer_model"):
        _stamp_ir_version(out_dir / files[key])
    return ArtifactSet(name=set_name, trainable=tuple(trainable), **files)


def _stamp_ir_version(path: Path) -> None:
    """Lower a generated graph's IR version to what ORT 1.19 loads.

    onnx >= 1.17 (needed on the host by torch's dynamo exporter) stamps its own,
    newer IR on the graphs ``generate_artifacts`` builds (the optimizer graph
    always); ORT 1.19 refuses IR > 10. The ops are unchanged, so stamping is safe.
    """
    proto = onnx.load(str(path))
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
        onnx.save(proto, str(path))


@contextlib.contextmanager
def _native_stderr_to_log() -> Iterator[None]:
    """Capture C++ stderr (ORT's gradient builder logs every graph pass at INFO, ignoring
    the Python-side severity) and replay it to our logger at debug level."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace")
            if text:
                logger.debug("onnxruntime artifact generation said:\n%s", text)


def _label_spec(kind: LossKind, output_shape: tuple[int, ...]) -> TensorSpec:
    if kind is LossKind.CROSS_ENTROPY:
        return TensorSpec(name=LABEL_NAME, shape=(None,), dtype="int64")
    return TensorSpec(name=LABEL_NAME, shape=(None, *output_shape[1:]), dtype="float32")


def _set_plan(spec: TrainingSpec, param_names: list[str], shared: list[str],
              personal: list[str]) -> list[tuple[ArtifactSetName, list[str], list[str]]]:
    """(set, trainable, frozen parameters) for every artifact set ``spec`` needs."""
    if spec.mode is TrainingMode.FEDALT:
        plan = [(ArtifactSetName.PERSONAL, personal, shared), (ArtifactSetName.SHARED, shared, personal)]
    elif spec.mode is TrainingMode.DITTO:
        plan = [(ArtifactSetName.JOINT, shared, []), (ArtifactSetName.DITTO, shared, [])]
    else:
        plan = [(ArtifactSetName.JOINT, shared + personal, [])]
    if spec.finetune:
        tuned = [n for n in param_names if any(matches_prefix(n, p) for p in spec.finetune)]
        unused = [p for p in spec.finetune if not any(matches_prefix(n, p) for n in param_names)]
        if unused or len(tuned) == len(param_names):
            raise ParameterSplitError(f"finetune prefixes {list(spec.finetune)} must each match a parameter and leave some frozen"
                                      f" (unmatched: {unused})")
        plan.append((ArtifactSetName.FINETUNE, tuned, [n for n in param_names if n not in tuned]))
    return plan


def generate_training_artifacts(
    model: torch.nn.Module,
    *,
    example_input: torch.Tensor,
    split: ParameterSplit,
    spec: TrainingSpec,
    out_dir: str | os.PathLike[str],
    kinds: Sequence[ArtifactKind] = ALL_KINDS,
) -> GeneratedArtifacts:
    """Export ``model`` and write the artifact set(s) for ``spec.mode`` of each kind in ``kinds`` into ``out_dir``.

    Refuses (``UnsupportedModelError``, one line naming the layer) a model the
    training graphs cannot express, whatever ``kinds`` says: a bundle that
    builds trains on every device that can run one of its kinds.
    """
    kinds = tuple(ArtifactKind(k) for k in kinds)
    if not kinds:
        raise ValueError("kinds must name at least one artifact kind")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    param_names = [n for n, p in model.named_parameters()]
    roles = split.assign(param_names)
    _check_mode_split(spec, roles)
    check_model_supported(model, ort_training=ArtifactKind.ORT_TRAINING in kinds)
    shared = names_with_role(roles, Role.SHARED)
    personal = names_with_role(roles, Role.PERSONAL)
    plan = _set_plan(spec, param_names, shared, personal)

    with torch.no_grad():
        example_output = copy.deepcopy(model).eval()(example_input)
    output_shape = tuple(example_output.shape)
    num_classes = int(output_shape[-1]) if spec.loss is LossKind.CROSS_ENTROPY else None

    portable = None
    if ArtifactKind.PORTABLE in kinds:  # first: its refusals name the op that cannot be expressed
        portable = build_portable_graphs(model, example_input=example_input, out_dir=out, plan=PortablePlan(
            sets=tuple((name, tuple(trainable)) for name, trainable, _ in plan), shared=tuple(shared), mu=float(spec.mu),
            ditto_lambda=float(spec.ditto_lambda), micro_batch=spec.micro_batch,
            loss=spec.loss, optimizer=spec.optimizer, learning_rate=float(spec.learning_rate)))
    sets: list[ArtifactSet] = []
    if ArtifactKind.ORT_TRAINING in kinds:
        try:
            sets = _generate_ort_sets(model, example_input, spec, plan, shared, out, output_shape)
        except Exception as exc:  # torch's exporter and ORT's generator raise many types; all mean "cannot train this"
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise UnsupportedModelError(f"cannot build ORT-training artifacts for this model: {type(exc).__name__}: {first}") from exc

    params = tuple(
        ParameterInfo(name=n, shape=tuple(int(d) for d in p.shape), dtype="float32", role=roles[n].value)
        for n, p in model.named_parameters()
    )
    return GeneratedArtifacts(
        directory=out,
        hyperparameters=Hyperparameters(
            mode=spec.mode, mu=float(spec.mu), loss=spec.loss, optimizer=spec.optimizer,
            learning_rate=float(spec.learning_rate), num_classes=num_classes,
            ditto_lambda=float(spec.ditto_lambda) if spec.mode is TrainingMode.DITTO else None,
        ),
        parameters=params,
        artifact_sets=tuple(sets),
        inputs=(TensorSpec(name=INPUT_NAME, shape=(None, *tuple(int(d) for d in example_input.shape[1:])), dtype="float32"),),
        label=_label_spec(spec.loss, output_shape),
        output_name=OUTPUT_NAME,
        portable=portable,
    )


def _generate_ort_sets(model: torch.nn.Module, example_input: torch.Tensor, spec: TrainingSpec,
                       plan: list[tuple[ArtifactSetName, list[str], list[str]]], shared: list[str], out: Path,
                       output_shape: tuple[int, ...]) -> list[ArtifactSet]:
    param_names = [n for n, _ in model.named_parameters()]
    with tempfile.TemporaryDirectory() as tmp:
        proto = export_onnx(model, example_input, Path(tmp) / "model.onnx")
    init_names = {i.name for i in proto.graph.initializer}
    missing = [n for n in param_names if n not in init_names]
    if missing:
        raise RuntimeError(f"ONNX export renamed or folded parameters {missing}; export needs do_constant_folding=False")
    anchors = _add_anchors(proto, shared) if spec.anchored else []
    buffers = sorted(init_names - set(param_names))
    if buffers:
        logger.info("non-parameter initializers stay constant in the graph: %s", buffers)
    sets = [_generate_set(proto, set_name=set_name, trainable=trainable, frozen=frozen + anchors, spec=spec, shared=shared,
                          out_dir=out) for set_name, trainable, frozen in plan]
    smoke_test_ort_sets(sets, out, input_shape=tuple(example_input.shape[1:]), loss=spec.loss, output_shape=output_shape)
    return sets
