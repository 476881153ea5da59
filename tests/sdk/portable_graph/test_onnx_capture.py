"""The cheap export route (ATen-IR capture, no torch.onnx re-trace) and the public route it falls back to write the same graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from device_agent.bundle.manifest import LossKind, OptimizerKind
from sdk.portable_graph import onnx_capture
from sdk.portable_graph.export import export_graph
from sdk.portable_graph.rewrite import for_training_graph
from sdk.portable_graph.step import StepSpec, as_numpy, example_inputs, make_step


def _step_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6, 4))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = tuple(params)
    spec = StepSpec(parameters=names, trainable=names, shared=names, mu=0.0, loss=LossKind.CROSS_ENTROPY,
                    optimizer=OptimizerKind.SGD, separate=())
    x, y = torch.randn(4, 2, 6), torch.randint(0, 4, (4,))
    return model, spec, example_inputs(spec, params, x, y, lr=0.01, step=True)


def _run(path, names, inputs):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(names, as_numpy(inputs))))


def test_the_pinned_torch_has_the_internals_of_the_cheap_route():
    # If this fails after a torch upgrade, builds still work (public route) but take 1.2-1.75x as long (docs/benchmarks.md).
    assert onnx_capture.available(), "torch's private export internals changed: onnx_capture falls back to the slow route"


def test_cheap_and_public_routes_write_graphs_that_compute_the_same(tmp_path, monkeypatch):
    model, spec, inputs = _step_case()
    step = make_step(for_training_graph(model), spec)
    taken: list[bool] = []
    real = onnx_capture.export_with_capture
    monkeypatch.setattr(onnx_capture, "export_with_capture", lambda *a, **k: taken.append(real(*a, **k)) or taken[-1])
    cheap = export_graph(step, inputs, input_names=spec.step_inputs(), output_names=spec.step_outputs(), path=tmp_path / "cheap.onnx")
    assert taken == [True], "the cheap route fell back to the public one on this graph"
    monkeypatch.setattr(onnx_capture, "ENABLED", False)
    public = export_graph(step, inputs, input_names=spec.step_inputs(), output_names=spec.step_outputs(), path=tmp_path / "public.onnx")
    assert [i.name for i in cheap.graph.input] == [i.name for i in public.graph.input] == spec.step_inputs()
    assert cheap.graph.input[0].type.tensor_type.shape.dim[0].dim_param, "batch axis must stay symbolic"
    assert not [n for n in cheap.graph.node if n.op_type == "Conv"], "the convolution lowering must run in the cheap route too"
    x, y = torch.randn(7, 2, 6), torch.randint(0, 4, (7,))  # another batch size than traced
    feeds = [x, y, *inputs[2:]]
    expected = as_numpy(make_step(model, spec)(*feeds))
    for path in (tmp_path / "cheap.onnx", tmp_path / "public.onnx"):
        for want, have in zip(expected, _run(path, spec.step_inputs(), feeds)):
            np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-6)
    onnx.checker.check_model(cheap)
