"""The ONNX clean-up passes: each changes the graph as described and leaves its results unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from sdk.portable_graph.graph_passes import (
    castlike_to_cast,
    clean_up,
    dedupe_initializers,
    drop_identity_expands,
    fold_broadcast_expands,
    fold_matmul_expands,
    hoist_scalar_ops_above_expands,
    squeeze_full_reductions,
    squeeze_reductions,
    strip_provenance,
)

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=(), value_info=()):  # type: ignore[no-untyped-def]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, F, s) for n, s in outputs], initializer=list(initializers),
                              value_info=[helper.make_tensor_value_info(n, F, s) for n, s in value_info])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL  # judge our graph, not ORT's
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _i64(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _check_unchanged(model: onnx.ModelProto, passes, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    before = _run(model, feeds)
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    assert passes(changed.graph) > 0
    onnx.checker.check_model(changed)
    for a, b in zip(before, _run(changed, feeds)):
        np.testing.assert_array_equal(a, b)
    return changed


def test_identical_initializers_become_one_and_their_gathers_can_merge():
    index = np.arange(6, dtype=np.int64)[::-1].copy()
    model = _model([helper.make_node("Gather", ["x", "i1"], ["a"], axis=1), helper.make_node("Gather", ["x", "i2"], ["b"], axis=1),
                    helper.make_node("Add", ["a", "b"], ["out"])], [("x", [2, 6])], [("out", [2, 6])],
                   [numpy_helper.from_array(index, "i1"), numpy_helper.from_array(index.copy(), "i2")])
    changed = _check_unchanged(model, dedupe_initializers, {"x": np.arange(12, dtype=np.float32).reshape(2, 6)})
    assert len(changed.graph.initializer) == 1
    assert changed.graph.node[0].input == changed.graph.node[1].input


def test_matmul_of_a_broadcast_matrix_reads_the_matrix():
    model = _model([helper.make_node("Unsqueeze", ["w", "axis0"], ["w3"]), helper.make_node("Expand", ["w3", "shape"], ["we"]),
                    helper.make_node("MatMul", ["we", "b"], ["out"])],
                   [("w", [3, 4]), ("b", [5, 4, 2])], [("out", [5, 3, 2])], [_i64("axis0", [0]), _i64("shape", [5, 3, 4])],
                   value_info=[("w3", [1, 3, 4]), ("we", [5, 3, 4])])
    rng = np.random.default_rng(0)
    changed = _check_unchanged(model, fold_matmul_expands, {"w": rng.normal(size=(3, 4)).astype(np.float32),
                                                            "b": rng.normal(size=(5, 4, 2)).astype(np.float32)})
    assert "Expand" not in _ops(changed)


def test_a_mean_backward_divides_before_broadcasting_into_the_mask_product():
    # expand(g) / n * mask  ->  (g / n) * mask, with ONNX broadcasting doing the expand
    model = _model([helper.make_node("Expand", ["g", "shape"], ["ge"]), helper.make_node("Div", ["ge", "n"], ["gd"]),
                    helper.make_node("Mul", ["gd", "mask"], ["out"])],
                   [("g", [4, 3, 1]), ("mask", [4, 3, 5])], [("out", [4, 3, 5])],
                   [_i64("shape", [4, 3, 5]), numpy_helper.from_array(np.array(5, np.float32), "n")],
                   value_info=[("ge", [4, 3, 5]), ("gd", [4, 3, 5])])
    rng = np.random.default_rng(0)
    feeds = {"g": rng.normal(size=(4, 3, 1)).astype(np.float32), "mask": (rng.random((4, 3, 5)) > 0.5).astype(np.float32)}
    changed = _check_unchanged(model, hoist_scalar_ops_above_expands, feeds)
    assert _ops(changed) == ["Div", "Expand", "Mul"]
    changed = _check_unchanged(changed, fold_broadcast_expands, feeds)
    assert _ops(changed) == ["Div", "Mul"]


def test_an_expand_is_kept_when_the_other_operand_does_not_carry_its_shape():
    model = _model([helper.make_node("Expand", ["g", "shape"], ["ge"]), helper.make_node("Mul", ["ge", "s"], ["out"])],
                   [("g", [4, 1]), ("s", [1, 5])], [("out", [4, 5])], [_i64("shape", [4, 5])], value_info=[("ge", [4, 5])])
    assert fold_broadcast_expands(model.graph) == 0
    assert _ops(model) == ["Expand", "Mul"]


def test_expand_to_its_own_shape_is_dropped():
    model = _model([helper.make_node("Expand", ["g", "shape"], ["ge"]), helper.make_node("Mul", ["ge", "x"], ["out"])],
                   [("g", []), ("x", [3])], [("out", [3])], [_i64("shape", [])], value_info=[("ge", [])])
    changed = _check_unchanged(model, drop_identity_expands, {"g": np.array(2, np.float32), "x": np.ones(3, np.float32)})
    assert _ops(changed) == ["Mul"]


def test_reduce_then_reshape_away_the_kept_axes_becomes_one_reduce():
    model = _model([helper.make_node("ReduceSum", ["x", "axes"], ["r"]), helper.make_node("Reshape", ["r", "shape"], ["flat"]),
                    helper.make_node("Neg", ["flat"], ["out"])],
                   [("x", [6, 4])], [("out", [4])], [_i64("axes", [0]), _i64("shape", [4])], value_info=[("r", [1, 4]), ("flat", [4])])
    changed = _check_unchanged(model, squeeze_reductions, {"x": np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)})
    assert _ops(changed) == ["ReduceSum", "Neg"]


def test_reduce_whose_reshape_does_more_than_drop_axes_is_kept():
    model = _model([helper.make_node("ReduceSum", ["x", "axes"], ["r"]), helper.make_node("Reshape", ["r", "shape"], ["out"])],
                   [("x", [6, 4])], [("out", [2, 2])], [_i64("axes", [0]), _i64("shape", [2, 2])], value_info=[("r", [1, 4])])
    assert squeeze_reductions(model.graph) == 0


def test_expand_to_a_scalar_shape_is_dropped_without_a_recorded_input_shape():
    model = _model([helper.make_node("Div", ["one", "n"], ["inv"]), helper.make_node("Expand", ["inv", "shape"], ["ge"]),
                    helper.make_node("Mul", ["ge", "x"], ["out"])],
                   [("n", []), ("x", [3])], [("out", [3])], [_i64("shape", []), numpy_helper.from_array(np.array(1, np.float32), "one")],
                   value_info=[("ge", [])])
    changed = _check_unchanged(model, drop_identity_expands, {"n": np.array(4, np.float32), "x": np.ones(3, np.float32)})
    assert _ops(changed) == ["Div", "Mul"]


def test_a_full_mean_then_squeeze_becomes_one_mean_without_kept_axes():
    model = _model([helper.make_node("ReduceMean", ["x"], ["r"], keepdims=1), helper.make_node("Squeeze", ["r"], ["s"]),
                    helper.make_node("Neg", ["s"], ["out"])], [("x", [6, 1])], [("out", [])], value_info=[("r", [1, 1])])
    changed = _check_unchanged(model, squeeze_full_reductions, {"x": np.arange(6, dtype=np.float32).reshape(6, 1)})
    assert _ops(changed) == ["ReduceMean", "Neg"]


def test_a_mean_over_some_axes_keeps_its_squeeze():
    model = _model([helper.make_node("ReduceMean", ["x", "axes"], ["r"], keepdims=1), helper.make_node("Squeeze", ["r"], ["out"])],
                   [("x", [6, 1])], [("out", [1])], [_i64("axes", [0])])
    assert squeeze_full_reductions(model.graph) == 0


def test_castlike_of_a_known_type_becomes_a_cast():
    model = _model([helper.make_node("CastLike", ["k", "x"], ["c"]), helper.make_node("Mul", ["c", "x"], ["out"])],
                   [("x", [3])], [("out", [3])], [_i64("k", [2])])
    changed = _check_unchanged(model, castlike_to_cast, {"x": np.arange(3, dtype=np.float32)})
    assert _ops(changed) == ["Cast", "Mul"]


def test_the_exporters_provenance_is_dropped_and_the_graph_still_computes_the_same():
    neg = helper.make_node("Neg", ["x"], ["out"], doc_string="traced from model.py:12")
    onnx.helper.set_metadata_props(neg, {"pkg.torch.onnx.fx_node": "%neg : call_function[target=aten.neg]"})
    model = _model([neg], [("x", [3])], [("out", [3])])
    changed = _check_unchanged(model, strip_provenance, {"x": np.arange(3, dtype=np.float32)})
    assert not changed.graph.node[0].metadata_props and not changed.graph.node[0].doc_string
    assert strip_provenance(changed.graph) == 0


def test_clean_up_keeps_a_graph_valid_and_topologically_sorted():
    model = _model([helper.make_node("Expand", ["g", "shape"], ["ge"]), helper.make_node("Div", ["ge", "n"], ["gd"]),
                    helper.make_node("Mul", ["gd", "mask"], ["out"])],
                   [("g", [4, 3, 1]), ("mask", [4, 3, 5])], [("out", [4, 3, 5])],
                   [_i64("shape", [4, 3, 5]), numpy_helper.from_array(np.array(5, np.float32), "n")],
                   value_info=[("ge", [4, 3, 5]), ("gd", [4, 3, 5])])
    clean_up(model)
    onnx.checker.check_model(model)
    seen = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        assert all(name in seen for name in node.input), node.name
        seen.update(node.output)
