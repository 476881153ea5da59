"""The build-time proof that a step graph's optimizer state may share one buffer with its update."""

from __future__ import annotations

import pytest
from onnx import TensorProto, helper

from sdk.portable_graph.in_place import check_in_place_updates
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
