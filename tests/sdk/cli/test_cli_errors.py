"""User mistakes give one line on stderr naming the option or file at fault, the right exit code, and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sdk.cli.main import cli

MLP = ["--model", "sdk.models:PersonalizedMLP", "--model-arg", "in_features=64", "--model-arg", "num_classes=10",
       "--mode", "fedavg", "--shared", "*", "--name", "digits"]


def one_line_error(text: str, *needles: str) -> None:
    assert text.count("\n") == 1 and text.endswith("\n"), f"not one line: {text!r}"
    assert "Traceback" not in text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"


def _fedge(*args: str):
    return CliRunner().invoke(cli, list(args))


def _agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "device_agent.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "fleet.key"
    assert _fedge("keys", "generate", "--out", str(path)).exit_code == 0
    return path


def test_bundle_verify_with_a_private_key_as_pub(bundle_factory, key):
    result = _fedge("bundle", "verify", str(bundle_factory("fedavg")), "--pub", str(key))
    assert result.exit_code == 2
    one_line_error(result.stderr, "--pub", str(key), "private key")


def test_bundle_build_input_shape_the_model_rejects(key, tmp_path):
    out = tmp_path / "x.fedge"
    result = _fedge("bundle", "build", *MLP, "--input-shape", "6,100", "--key", str(key), "-o", str(out))
    assert result.exit_code == 2
    one_line_error(result.stderr, "--input-shape", "[6, 100]")
    assert not out.exists()


def test_bundle_build_unknown_compression(key, tmp_path):
    out = tmp_path / "x.fedge"
    result = _fedge("bundle", "build", *MLP, "--input-shape", "64", "--compression", "topk:2", "--key", str(key), "-o", str(out))
    assert result.exit_code == 2
    one_line_error(result.stderr, "--compression", "topk must be in (0, 1]")
    assert not out.exists()


def test_bundle_build_misspelt_model_arg(key, tmp_path):
    args = [a.replace("in_features", "in_feature") for a in MLP]
    result = _fedge("bundle", "build", *args, "--input-shape", "64", "--key", str(key), "-o", str(tmp_path / "x.fedge"))
    assert result.exit_code == 2
    one_line_error(result.stderr, "--model-arg", "in_feature")


def test_bundle_build_misspelt_personal_prefix(key, tmp_path):
    args = [*MLP[:-4], "--shared", "base", "--personal", "haed", "--mode", "fedalt", "--name", "x"]
    result = _fedge("bundle", "build", *args, "--input-shape", "64", "--key", str(key), "-o", str(tmp_path / "x.fedge"))
    assert result.exit_code == 2
    one_line_error(result.stderr, "--shared/--personal", "haed")


@pytest.mark.parametrize("command", ["keys", "bundle", "broker-config"])
def test_unwritable_output_paths(command, key, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    target = blocker / "out"
    if command == "keys":
        result = _fedge("keys", "generate", "--out", str(target))
    elif command == "bundle":
        result = _fedge("bundle", "build", *MLP, "--input-shape", "64", "--key", str(key), "-o", str(target / "x.fedge"))
    else:
        topology = Path(__file__).parents[1] / "broker_config" / "data" / "small_topology.toml"
        result = _fedge("broker-config", "generate", "--topology", str(topology), "--out", str(target))
    assert result.exit_code == 2, result.output
    one_line_error(result.stderr, "--out", str(blocker))


@pytest.mark.parametrize("args, option", [(["--participation", "2"], "--participation"),
                                           (["--stragglers", "-1"], "--stragglers")])
def test_simulate_out_of_range_fractions(args, option):
    result = _fedge("simulate", *args)
    assert result.exit_code == 2
    one_line_error(result.stderr, option)


@pytest.fixture(scope="module")
def installed(bundle_factory, fleet_key, tmp_path_factory) -> tuple[Path, Path]:
    from device_agent.bundle.archive import install_bundle
    from device_agent.keys import save_public_key

    home = tmp_path_factory.mktemp("agent")
    save_public_key(fleet_key.public_key(), home / "fleet.pub")
    install_bundle(bundle_factory("fedavg"), fleet_key.public_key(), home / "bundle")
    return home / "bundle", home / "fleet.pub"


def _train_args(installed, data: Path, state: Path) -> list[str]:
    bundle, pub = installed
    return ["--bundle-dir", str(bundle), "--fleet-key", str(pub), "--state", str(state), "--data", str(data)]


@pytest.mark.parametrize("kind", ["npy", "text"])
def test_agent_refuses_a_non_npz_data_file_without_pickle_advice(kind, installed, tmp_path):
    data = tmp_path / "local.npz"
    if kind == "npy":
        with open(data, "wb") as fh:
            np.save(fh, np.zeros((4, 64), np.float32))
    else:
        data.write_text("1,2,3\n")
    result = _agent("train", *_train_args(installed, data, tmp_path / "state"))
    assert result.returncode == 2
    one_line_error(result.stderr, str(data), "npz")
    assert "pickle" not in result.stderr.replace("never loads", "")


def test_agent_train_epochs_zero_is_refused_and_outputs_are_valid_json(installed, digits, tmp_path):
    x, y = digits
    np.savez(tmp_path / "d.npz", x=x[:64], y=y[:64])
    refused = _agent("train", *_train_args(installed, tmp_path / "d.npz", tmp_path / "s"), "--epochs", "0")
    assert refused.returncode == 2
    one_line_error(refused.stderr, "--epochs")
    ok = _agent("train", *_train_args(installed, tmp_path / "d.npz", tmp_path / "s"), "--max-steps", "1")
    assert ok.returncode == 0, ok.stderr

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    report = json.loads(ok.stdout, parse_constant=no_constants)
    assert report["steps"] == 1


def test_agent_evaluate_refuses_a_state_dir_without_this_bundles_state(installed, digits, tmp_path):
    x, y = digits
    np.savez(tmp_path / "d.npz", x=x[:256], y=y[:256])
    bundle, pub = installed
    empty = tmp_path / "empty"
    empty.mkdir()
    evaluate = ["evaluate", "--bundle-dir", str(bundle), "--fleet-key", str(pub), "--data", str(tmp_path / "d.npz")]
    refused = _agent(*evaluate, "--state", str(empty))
    assert refused.returncode == 2
    one_line_error(refused.stderr, "--state", str(empty), "no saved state")
    assert not any(empty.iterdir()), "refusing must not create state"
    initial = _agent(*evaluate)
    assert initial.returncode == 0 and json.loads(initial.stdout)["trained"] is False
    assert _agent("train", *_train_args(installed, tmp_path / "d.npz", tmp_path / "s"), "--epochs", "3").returncode == 0
    trained = _agent(*evaluate, "--state", str(tmp_path / "s"))
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout)["accuracy"] > json.loads(initial.stdout)["accuracy"]


def test_agent_bad_fleet_key_names_the_option(installed, tmp_path):
    bundle, _ = installed
    wrong = tmp_path / "wrong.pub"
    wrong.write_text("not a key")
    result = _agent("evaluate", "--bundle-dir", str(bundle), "--fleet-key", str(wrong), "--data", "x.npz")
    assert result.returncode == 2
    one_line_error(result.stderr, "--fleet-key", str(wrong))


def test_agent_config_example_is_shipped_and_valid(tmp_path):
    result = _agent("config", "example", "--out", str(tmp_path / "agent.toml"))
    assert result.returncode == 0, result.stderr
    assert "[broker]" in (tmp_path / "agent.toml").read_text()
    again = _agent("config", "example", "--out", str(tmp_path / "agent.toml"))
    assert again.returncode == 2
    one_line_error(again.stderr, "--out", "--force")
