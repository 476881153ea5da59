"""Convolution and pooling as exported: forward and gradients against PyTorch, ties included, and Conv's rounding."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from sdk.portable_graph import convolution
from sdk.portable_graph.export import export_graph
from sdk.portable_graph.rewrite import for_training_graph


def _value_and_grads(model: nn.Module):  # type: ignore[no-untyped-def]
    """f(x, w, *params) -> (sum(model(x) * w), d/dx, d/dparams...), the function the tests export and run eagerly."""
    names = [n for n, _ in model.named_parameters()]

    def loss(x: torch.Tensor, w: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return (functional_call(model, dict(zip(names, params)), (x,)) * w).sum()

    def fn(x: torch.Tensor, w: torch.Tensor, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grads = grad(loss, argnums=(0, *range(2, 2 + len(params))))(x, w, *params)
        return (loss(x, w, *params), *grads)

    return fn, names


def _run_exported(model: nn.Module, x: torch.Tensor, tmp_path, *, traced: nn.Module | None = None) -> tuple[list, list]:
    """(ORT outputs of the exported ``traced`` model, eager outputs of ``model``) for input ``x``."""
    params = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        w = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(1))
    fn, names = _value_and_grads(traced if traced is not None else model)
    inputs = [x, w, *params]
    outputs = ["loss", "grad_x", *[f"grad_{i}" for i in range(len(names))]]
    path = tmp_path / "layer.onnx"
    export_graph(fn, inputs, input_names=["x", "y", *[f"p{i}" for i in range(len(names))]], output_names=outputs, path=path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})
    want = [t.detach().numpy() for t in _value_and_grads(model)[0](*inputs)]
    return got, want


def _ties(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Few distinct values (plenty of equal maxima in every window), some negative, some exact zeros."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(-2, 3, shape).astype(np.float32))


@pytest.mark.parametrize(("pool", "shape"), [
    (nn.MaxPool2d(2), (3, 2, 6, 6)),
    (nn.MaxPool2d(2), (3, 2, 7, 5)),  # odd sizes: the last row/column belong to no window
    (nn.MaxPool2d(3), (2, 1, 9, 6)),  # 9 taps
    (nn.MaxPool1d(2), (3, 4, 10)),
])
def test_tiled_max_pool_gives_each_window_gradient_to_its_first_maximum(pool, shape, tmp_path):
    model = nn.Sequential(pool, nn.Flatten())
    got, want = _run_exported(model, _ties(shape, seed=0), tmp_path)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)  # the weighted sum: summation order may differ
    np.testing.assert_array_equal(got[1], want[1])  # a routed gradient is exact: every element is one w or 0


@pytest.mark.parametrize("two_d", [True, False])
def test_relu_moved_after_max_pool_gives_the_same_values_and_gradients_with_ties(two_d, tmp_path):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1) if two_d else nn.Conv1d(2, 3, 3, padding=1)
    pool = nn.MaxPool2d(2) if two_d else nn.MaxPool1d(2)
    model = nn.Sequential(conv, nn.ReLU(), pool, nn.Flatten())
    with torch.no_grad():  # integer weights and inputs: conv outputs are exact, so ties (and zeros) survive the conv
        for p in model.parameters():
            p.copy_(torch.round(p * 3))
    traced = for_training_graph(model)
    assert [type(m) for m in traced] == [type(conv), type(pool), nn.ReLU, nn.Flatten]
    assert [n for n, _ in traced.named_parameters()] == [n for n, _ in model.named_parameters()]
    x = _ties((4, 2, 6, 6) if two_d else (4, 2, 12), seed=2)
    got, want = _run_exported(model, x, tmp_path, traced=traced)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layer", [
    nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(5, 4, (3, 2), dilation=(2, 1)),
    nn.Conv1d(6, 8, 5, padding=2), nn.Conv1d(2, 3, 3, stride=2, dilation=2),
])
def test_convolution_forward_and_gradients_match_pytorch(layer, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(layer, nn.Flatten())
    shape = (5, layer.in_channels, 9, 8) if isinstance(layer, nn.Conv2d) else (5, layer.in_channels, 17)
    got, want = _run_exported(model, torch.randn(shape), tmp_path)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", [nn.Conv2d(5, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
                                   nn.Conv1d(6, 8, 5, stride=2, padding=2)])
def test_an_unfold_in_ranges_and_a_weight_gradient_by_rows_give_the_same_bits(layer, tmp_path, monkeypatch):
    """A large unfold is made in ranges of output positions, its weight gradient by kernel rows: same sums, same bits."""
    torch.manual_seed(0)
    model = nn.Sequential(layer, nn.Flatten())
    x = torch.randn((3, layer.in_channels, 9, 8) if isinstance(layer, nn.Conv2d) else (3, layer.in_channels, 17))
    whole, _ = _run_exported(model, x, tmp_path)
    geo = convolution._Geometry(x, layer.weight, list(layer.stride), list(layer.padding), list(layer.dilation))
    monkeypatch.setattr(convolution, "UNFOLD_GROUP_BYTES", convolution.unfold_bytes_per_example(geo) // 3)  # 3-4 ranges
    groups = convolution._position_groups(geo)
    assert 3 <= len(groups) <= 4 and groups[0][0] == 0 and groups[-1][1] == geo.positions
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    split, want = _run_exported(model, x, tmp_path)
    for got, expected in zip(split, whole):  # loss, input gradient, weight and bias gradients
        np.testing.assert_array_equal(got, expected)
    for got, expected in zip(split, want):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_convolution_forward_rounds_exactly_as_onnxruntime_conv(tmp_path):
    """The unfolded GEMM sums each output in Conv's order, so the portable forward equals ORT-training's bit for bit."""
    torch.manual_seed(0)
    layer = nn.Conv2d(16, 32, 5)
    model = nn.Sequential(layer)
    x = torch.randn(4, 16, 12, 12)

    def forward(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {"0.weight": w, "0.bias": b}, (x,)) + 0 * y.sum()

    path = tmp_path / "conv.onnx"
    inputs = [x, torch.zeros(4), layer.weight.detach(), layer.bias.detach()]
    export_graph(forward, inputs, input_names=["x", "y", "w", "b"], output_names=["out"], path=path)
    assert "Conv" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    feeds = dict(zip(["x", "y", "w", "b"], (t.numpy() for t in inputs)))
    ours = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    conv = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w", "b"], ["out"])], "conv",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, list(feeds[n].shape)) for n in ("x", "w", "b")],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)])
    reference = onnx.helper.make_model(conv, opset_imports=[onnx.helper.make_opsetid("", 18)])
    reference.ir_version = 10
    session = onnxruntime.InferenceSession(reference.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(ours, session.run(None, {n: feeds[n] for n in ("x", "w", "b")})[0])


@pytest.mark.parametrize("two_d", [True, False])
def test_global_average_pool_becomes_a_mean_with_the_same_values_and_gradients(two_d, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3) if two_d else nn.Conv1d(2, 3, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1) if two_d else nn.AdaptiveAvgPool1d(1), nn.Flatten())
    traced = for_training_graph(model)
    assert type(traced[2]).__name__ == "GlobalMean" and type(model[2]) is not type(traced[2])
    got, want = _run_exported(model, torch.randn((4, 2, 7, 6) if two_d else (4, 2, 11)), tmp_path, traced=traced)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
