"""Refusal at build time: a model the training graphs cannot express never becomes a bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from device_agent.bundle.manifest import ArtifactSetName, LossKind
from sdk.artifacts import TrainingSpec, _generate_set, export_onnx
from sdk.bundle_builder import build_bundle
from sdk.cli.main import cli
from sdk.model_spec import ParameterSplit
from sdk.ort_smoke import OrtSmokeTestError, smoke_test_ort_sets
from sdk.portable_graph import SUPPORTED_LAYERS, UnsupportedModelError, check_model_supported
from tests.sdk.portable_graph import zoo

REFUSED = [
    (zoo.BatchNormNet(), (2, 8), "model.base.1 (BatchNorm1d): BatchNorm in training mode"),
    (zoo.DropoutNet(), (2, 8), "model.base.2 (Dropout): Dropout is not supported"),
    (zoo.GroupedConvNet(), (2, 4, 8), "model.base.0 (Conv1d): only groups=1"),
    (zoo.RecurrentNet(), (2, 5, 4), "model.base (GRU): this layer type is not covered"),
]


@pytest.mark.parametrize(("model", "shape", "message"), REFUSED, ids=["batchnorm", "dropout", "grouped-conv", "gru"])
def test_unsupported_layer_is_refused_naming_its_path_and_type(model, shape, message, fleet_key, tmp_path):
    with pytest.raises(UnsupportedModelError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        build_bundle(model, example_input=torch.zeros(shape), split=ParameterSplit(shared=("*",)),
                     spec=TrainingSpec(mode="fedavg"), signing_key=fleet_key, out_path=tmp_path / "x.fedge", model_name="x")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x.fedge").exists()


def test_unsupported_layer_is_refused_whatever_artifact_kinds(fleet_key, tmp_path):
    """BatchNorm crashed ORT-training at the first step on the device; an ORT-only build is refused as well."""
    with pytest.raises(UnsupportedModelError, match="BatchNorm1d"):
        build_bundle(zoo.BatchNormNet(), example_input=torch.zeros(2, 8), split=ParameterSplit(shared=("*",)),
                     spec=TrainingSpec(mode="fedavg"), signing_key=fleet_key, out_path=tmp_path / "x.fedge", model_name="x",
                     kinds=("ort-training",))


def test_average_pooling_is_refused_for_ort_training_bundles_only(fleet_key, tmp_path):
    """onnxruntime-training 1.19 dies with SIGFPE training AvgPool's gradient: refused by name unless portable-only."""
    net = zoo.EveryLayerNet(avg_pool=True)
    with pytest.raises(UnsupportedModelError, match=r"model\.base\.conv2d\.5 \(AvgPool2d\): onnxruntime-training 1\.19 crashes"):
        build_bundle(net, example_input=torch.zeros(2, 2, 8, 8), split=ParameterSplit(shared=("*",)),
                     spec=TrainingSpec(mode="fedavg"), signing_key=fleet_key, out_path=tmp_path / "x.fedge", model_name="x")
    check_model_supported(net, ort_training=False)


def test_ort_training_crash_is_a_refusal_not_a_dead_build(tmp_path):
    """Past the layer check, a crashing ORT-training step (SIGFPE) still ends in one line, in this process alive."""
    net = torch.nn.Sequential(torch.nn.Conv1d(2, 2, 3, padding=1), torch.nn.AvgPool1d(2), torch.nn.Flatten())
    proto = export_onnx(net, torch.zeros(2, 2, 8), tmp_path / "m.onnx")
    names = [n for n, _ in net.named_parameters()]
    aset = _generate_set(proto, set_name=ArtifactSetName.JOINT, trainable=names, frozen=[], spec=TrainingSpec(mode="fedavg", loss="mse"), shared=names, out_dir=tmp_path)
    with pytest.raises(OrtSmokeTestError, match="crashed \\(SIGFPE\\)"):
        smoke_test_ort_sets([aset], tmp_path, input_shape=(2, 8), loss=LossKind.MSE, output_shape=(2, 8))


def test_op_without_a_standard_training_graph_fails_in_one_line(fleet_key, tmp_path):
    with pytest.raises(UnsupportedModelError, match="cannot express the model.*lgamma") as info:
        build_bundle(zoo.CustomOpNet(), example_input=torch.zeros(2, 4), split=ParameterSplit(shared=("*",)),
                     spec=TrainingSpec(mode="fedavg"), signing_key=fleet_key, out_path=tmp_path / "x.fedge", model_name="x")
    assert "\n" not in str(info.value)


def test_cli_refuses_batchnorm_model_with_one_line_and_no_traceback(tmp_path: Path):
    runner = CliRunner()
    runner.invoke(cli, ["keys", "generate", "--out", str(tmp_path / "k")])
    res = runner.invoke(cli, ["bundle", "build", "--model", "tests.sdk.portable_graph.zoo:BatchNormNet", "--input-shape", "8",
                              "--shared", "*", "--mode", "fedavg", "--key", str(tmp_path / "k"), "--name", "bn",
                              "-o", str(tmp_path / "bn.fedge")])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "error: refused: model.base.1 (BatchNorm1d):" in lines[0], res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "bn.fedge").exists()


def test_every_supported_layer_is_in_the_test_model():
    """EveryLayerNet (trained on both backends in test_graphs) must hold every type the builder accepts."""
    used = {type(m) for m in zoo.EveryLayerNet(avg_pool=True).modules()}
    assert set(SUPPORTED_LAYERS) <= used, set(SUPPORTED_LAYERS) - used
    check_model_supported(zoo.EveryLayerNet(avg_pool=False))


def test_cli_artifacts_option_builds_one_kind(tmp_path: Path):
    runner = CliRunner()
    runner.invoke(cli, ["keys", "generate", "--out", str(tmp_path / "k")])
    common = ["bundle", "build", "--model", "sdk.models:PersonalizedMLP", "--model-arg", "in_features=6", "--input-shape", "6",
              "--shared", "*", "--mode", "fedavg", "--key", str(tmp_path / "k"), "--name", "m"]
    for kind, fmt in (("portable", 3), ("ort-training", 2)):
        res = runner.invoke(cli, [*common, "--artifacts", kind, "-o", str(tmp_path / f"{kind}.fedge")])
        assert res.exit_code == 0, res.output
        assert f"artifacts {kind}" in res.output
        res = runner.invoke(cli, ["bundle", "verify", str(tmp_path / f"{kind}.fedge"), "--pub", str(tmp_path / "k.pub")])
        assert res.exit_code == 0 and f"format {fmt}, artifacts {kind}" in res.output, res.output
