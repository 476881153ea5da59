"""The build-time check that a portable graph reproduces PyTorch: what it refuses and what it tolerates."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from sdk.portable_graph.builder import _ATOL, _STEP_ATOL_PER_LR, _check_against_eager
from sdk.portable_graph.support import UnsupportedModelError


@pytest.fixture
def identity_graph(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    path = tmp_path / "identity.onnx"
    onnx.save(model, path)
    return path


def _off_by(delta: float):
    return lambda x: (x + delta,)


def test_a_graph_off_by_a_learning_rate_step_is_refused(identity_graph):
    lr = 0.01
    with pytest.raises(UnsupportedModelError, match="does not reproduce PyTorch"):
        _check_against_eager(identity_graph, _off_by(lr), [torch.ones(4, 3)], ["x"], atol=_STEP_ATOL_PER_LR * lr)


def test_adamw_noise_on_near_zero_gradients_is_tolerated_in_a_step_but_not_at_the_default(identity_graph):
    lr, noise = 0.01, 2.2e-6  # the size seen on a correct 2D-CNN AdamW step
    _check_against_eager(identity_graph, _off_by(noise), [torch.zeros(4, 3)], ["x"], atol=max(_ATOL, _STEP_ATOL_PER_LR * lr))
    with pytest.raises(UnsupportedModelError):
        _check_against_eager(identity_graph, _off_by(noise), [torch.zeros(4, 3)], ["x"])
