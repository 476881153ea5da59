"""The build-time proofs that a step graph's optimizer state, and its parameters, may share one buffer with their update."""

from __future__ import annotations

import pytest
from onnx import TensorProto, helper

from sdk.portable_graph.in_place import check_in_place_updates, parameters_update_in_place
from sdk.portable_graph.support import UnsupportedModelError


def _graph(extra_reader: bool):
    """new.opt.m = opt.m * 0.9 + g; with ``extra_reader`` a second node reads opt.m outside that computation."""
    nodes = [helper.make_node("Mul", ["opt.m", "beta"], ["decayed"]), helper.make_node("Add", ["decayed", "g"], ["new.opt.m"])]
    outputs = [helper.make_tensor_value_info("new.opt.m", TensorProto.FLOAT, [3])]
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["opt.m"], ["leak"]))
        outputs.append(helper.make_tensor_value_info("leak", TensorProto.FLOAT, [3]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in ("opt.m", "g", "beta")]
    return helper.make_graph(nodes, "step", inputs, outputs)


def test_an_update_that_only_its_own_output_reads_passes():
    check_in_place_updates(_graph(extra_reader=False))


def test_a_read_the_update_does_not_wait_for_is_refused():
    with pytest.raises(UnsupportedModelError, match="opt.m .*node"):
        check_in_place_updates(_graph(extra_reader=True))


def _vector(name: str):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [3])


def _params_graph(*, through_loop: bool, late_view_reader: bool):
    """new.param.w = w - g, g computed from w (inside a one-iteration Loop, or directly); optionally a Transpose view of
    w read by a node the update does not wait for (onnxruntime may fold the Transpose so that node reads w itself)."""
    nodes = []
    if through_loop:
        body = helper.make_graph([helper.make_node("Mul", ["param.w", "param.w"], ["g.out"]),
                                  helper.make_node("Identity", ["cond"], ["cond.out"])], "body",
                                 [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                                  helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                                 [helper.make_tensor_value_info("cond.out", TensorProto.BOOL, []), _vector("g.out")])
        nodes.append(helper.make_node("Loop", ["trips", "true"], ["g"], body=body))
    else:
        nodes.append(helper.make_node("Mul", ["param.w", "param.w"], ["g"]))
    nodes.append(helper.make_node("Sub", ["param.w", "g"], ["new.param.w"]))
    outputs = [_vector("new.param.w")]
    if late_view_reader:
        nodes += [helper.make_node("Transpose", ["param.w"], ["w.t"]), helper.make_node("Neg", ["w.t"], ["late"])]
        outputs.append(_vector("late"))
    init = [helper.make_tensor("trips", TensorProto.INT64, [], [1]), helper.make_tensor("true", TensorProto.BOOL, [], [True])]
    return helper.make_graph(nodes, "step", [_vector("param.w")], outputs, initializer=init)


@pytest.mark.parametrize("through_loop", [False, True])
def test_parameters_in_place_when_every_read_comes_first_even_inside_a_loop(through_loop):
    assert parameters_update_in_place(_params_graph(through_loop=through_loop, late_view_reader=False))


@pytest.mark.parametrize("through_loop", [False, True])
def test_a_late_read_through_a_transpose_keeps_the_parameters_ping_ponged(through_loop):
    assert not parameters_update_in_place(_params_graph(through_loop=through_loop, late_view_reader=True))


def test_a_loop_counts_as_reading_what_its_body_reads():
    """The update does not wait for the loop: the loop's reads of param.w come too late."""
    graph = _params_graph(through_loop=True, late_view_reader=False)
    graph.node[1].input[1] = "param.w"  # new.param.w = w - w: no longer waits for the loop
    graph.output.append(_vector("g"))
    assert not parameters_update_in_place(graph)
