"""Building a bundle's portable graphs: one step graph per artifact set, one eval graph, the initial weights.

Every graph is run once on onnxruntime right after export and compared with
the same function run eagerly in PyTorch (batch 3, one step): a graph that
does not reproduce PyTorch is refused at build time, never shipped. A step
graph must also allow its optimizer state to be updated in place, and is marked
when its parameters may be too (``in_place``).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from device_agent.bundle.manifest import ArtifactSetName, LossKind, OptimizerKind, PortableArtifacts, PortableSet
from device_agent.training_backends import graph_names as g
from sdk.portable_graph.export import OPSET, export_graph
from sdk.portable_graph.in_place import check_in_place_updates, parameters_update_in_place
from sdk.portable_graph.micro_batch import SUMMED, TASK_LOSS, compose_micro_batched
from sdk.portable_graph.rewrite import for_training_graph
from sdk.portable_graph.step import (SEPARATE_UPDATE_MIN_SIZE, StepSpec, as_numpy, example_inputs, gradient_names,
                                     make_apply, make_eval, make_slice_gradients, make_step)
from sdk.portable_graph.support import UnsupportedModelError

logger = logging.getLogger(__name__)

_CHECK_BATCH = 3
_RTOL, _ATOL = 1e-4, 1e-6
# AdamW divides by sqrt(v): where a gradient is at float32 summation-noise level, a correct graph and PyTorch can
# differ by a visible fraction of lr on that weight (2.2e-6 seen on a 2D-CNN at lr 0.01). A wrong graph is off by
# about lr on most weights, so a step's tolerance scales with lr.
_STEP_ATOL_PER_LR = 1e-3


@dataclass(frozen=True, kw_only=True)
class PortablePlan:
    """What to build: the sets (name -> trainable parameters), the shared parameters and the objective.

    ``mu`` is every set's proximal weight except Ditto's personal set, which has ``ditto_lambda``.
    ``micro_batch``: 0 runs every step on the whole batch, k > 0 runs the forward and backward on slices
    of k examples (``micro_batch``).
    """

    sets: tuple[tuple[ArtifactSetName, tuple[str, ...]], ...]
    shared: tuple[str, ...]
    mu: float
    loss: LossKind
    optimizer: OptimizerKind
    learning_rate: float
    ditto_lambda: float = 0.0
    micro_batch: int = 0


def _labels(kind: LossKind, output: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    if kind is LossKind.CROSS_ENTROPY:
        return torch.randint(0, int(output.shape[-1]), (batch,), generator=generator)
    shape = (batch, *output.shape[1:])
    if kind is LossKind.BCE_WITH_LOGITS:
        return torch.randint(0, 2, shape, generator=generator).to(torch.float32)
    return torch.randn(shape, generator=generator)


def build_portable_graphs(model: torch.nn.Module, *, example_input: torch.Tensor, plan: PortablePlan,
                          out_dir: str | os.PathLike[str]) -> PortableArtifacts:
    """Write the portable graphs for ``plan`` into ``out_dir`` and return their manifest entry."""
    out = Path(out_dir)
    model = copy.deepcopy(model).cpu().float().train()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = tuple(params)
    generator = torch.Generator().manual_seed(0)
    # Trace with a batch that is neither 0 nor 1 (torch specialises those), check with another.
    x_trace = torch.randn((4, *example_input.shape[1:]), generator=generator)
    x_check = torch.randn((_CHECK_BATCH, *example_input.shape[1:]), generator=generator)
    with torch.no_grad():
        output = model(x_trace)
    y_trace = _labels(plan.loss, output, 4, generator)
    y_check = _labels(plan.loss, output, _CHECK_BATCH, generator)

    def spec_for(trainable: tuple[str, ...], set_name: ArtifactSetName | None = None) -> StepSpec:
        mu = plan.ditto_lambda if set_name is ArtifactSetName.DITTO else plan.mu
        separate = tuple(n for n in trainable if params[n].numel() >= SEPARATE_UPDATE_MIN_SIZE)
        return StepSpec(parameters=names, trainable=trainable, shared=plan.shared, mu=mu, loss=plan.loss,
                        optimizer=plan.optimizer, separate=separate if plan.optimizer is OptimizerKind.ADAMW else ())

    traced = for_training_graph(model)  # what is exported; the checks run the model as given
    eval_spec = spec_for(())
    eval_file = "portable_eval.onnx"
    export_graph(make_eval(traced, eval_spec), example_inputs(eval_spec, params, x_trace, y_trace, lr=plan.learning_rate, step=False),
                 input_names=eval_spec.eval_inputs(), output_names=["loss", "output"], path=out / eval_file)
    _check_against_eager(out / eval_file, make_eval(model, eval_spec), example_inputs(eval_spec, params, x_check, y_check,
                                                                                      lr=plan.learning_rate, step=False),
                         eval_spec.eval_inputs())
    micro_batch = plan.micro_batch
    checks = [(x_check, y_check)]
    if micro_batch:  # a batch of two whole slices and a shorter one: the sums and the last slice's share are checked
        x_long = torch.randn((2 * micro_batch + 1, *example_input.shape[1:]), generator=generator)
        checks.append((x_long, _labels(plan.loss, output, x_long.shape[0], generator)))
    sets = []
    for set_name, trainable in plan.sets:
        spec = spec_for(trainable, set_name)
        file = f"portable_{set_name.value}_step.onnx"
        inputs = example_inputs(spec, params, x_trace, y_trace, lr=plan.learning_rate, step=True)
        if micro_batch:
            proto = _export_micro_batched(traced, spec, inputs, micro_batch, out / file)
        else:
            proto = export_graph(make_step(traced, spec), inputs, input_names=spec.step_inputs(), output_names=spec.step_outputs(),
                                 path=out / file)
        check_in_place_updates(proto.graph)
        if parameters_update_in_place(proto.graph, spec.flat if spec.flat_params else ()):
            onnx.helper.set_model_props(proto, {g.PARAMS_IN_PLACE: "1"})
            onnx.save(proto, os.fspath(out / file))
        for x, y in checks:
            _check_against_eager(out / file, make_step(model, spec),
                                 example_inputs(spec, params, x, y, lr=plan.learning_rate, step=True, warm=generator),
                                 spec.step_inputs(), atol=max(_ATOL, _STEP_ATOL_PER_LR * plan.learning_rate))
        sets.append(PortableSet(name=set_name, step_model=file, trainable=trainable))
    if micro_batch:
        logger.info("portable step graphs run the forward and backward in slices of %d examples", micro_batch)
    init_file = "portable_parameters.npz"
    with open(out / init_file, "wb") as fh:
        np.savez(fh, **{n: v.numpy() for n, v in params.items()})  # type: ignore[arg-type]
    return PortableArtifacts(opset=OPSET, eval_model=eval_file, initial_parameters=init_file, sets=tuple(sets))


def _export_micro_batched(model: torch.nn.Module, spec: StepSpec, inputs: list[torch.Tensor], micro_batch: int,
                          path: Path) -> onnx.ModelProto:
    """Export a micro-batch's gradients and the update separately, join them in a loop (``micro_batch``), save to ``path``."""
    x, y, lr = inputs[:3]
    state = inputs[3:]
    params = state[:len(spec.parameters)]
    names = gradient_names(spec)
    scale = torch.tensor(0.5, dtype=torch.float32)
    sliced = make_slice_gradients(model, spec)(x, y, scale, *params)
    gradients = export_graph(make_slice_gradients(model, spec), [x, y, scale, *params],
                             input_names=[g.X, g.Y, "scale", *map(g.param, spec.parameters)], output_names=[g.LOSS, *names],
                             path=path)
    apply = export_graph(make_apply(spec), [lr, *state, *(t.detach().clone() for t in sliced)],
                         input_names=[*spec.step_inputs()[2:], TASK_LOSS, *(SUMMED + n for n in names)],
                         output_names=spec.step_outputs(), path=path, batch_inputs=())
    proto = compose_micro_batched(gradients, apply, micro_batch=micro_batch)
    onnx.save(proto, os.fspath(path))
    return proto


def _check_against_eager(path: Path, fn, inputs: Sequence[torch.Tensor], input_names: list[str], *,
                         atol: float = _ATOL) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime

    expected = as_numpy(fn(*inputs))
    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    feeds = dict(zip(input_names, as_numpy(inputs)))
    got = session.run(None, feeds)
    outputs = [o.name for o in session.get_outputs()]
    for name, want, have in zip(outputs, expected, got):
        if want.shape != have.shape or not np.allclose(have, want, rtol=_RTOL, atol=atol):
            worst = float(np.max(np.abs(have.astype(np.float64) - want))) if want.shape == have.shape else float("nan")
            raise UnsupportedModelError(f"{path.name}: output {name} does not reproduce PyTorch (max difference {worst:.3g})")
    logger.debug("%s reproduces PyTorch at batch %d", path.name, _CHECK_BATCH)
