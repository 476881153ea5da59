"""The fedge and fedge-agent command lines, end to end on real files."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from device_agent.cli import main as agent_main
from sdk.cli.main import cli


def test_cli_keys_bundle_build_verify_and_agent_train(tmp_path: Path, digits, capsys):
    runner = CliRunner()
    key = tmp_path / "fleet.key"
    res = runner.invoke(cli, ["keys", "generate", "--out", str(key)])
    assert res.exit_code == 0, res.output
    assert (key.stat().st_mode & 0o777) == 0o600
    bundle = tmp_path / "digits.fedge"
    res = runner.invoke(cli, ["bundle", "build", "--model", "sdk.models:PersonalizedMLP", "--model-arg", "in_features=64",
                              "--model-arg", "hidden=(32,)", "--model-arg", "num_classes=10", "--input-shape", "64",
                              "--shared", "base", "--personal", "head", "--mode", "fedalt", "--mu", "0.01", "--lr", "0.01",
                              "--key", str(key), "--name", "digits", "--version", "3", "--compression", "topk:0.30+q4",
                              "-o", str(bundle)])
    assert res.exit_code == 0, res.output
    assert "2080 shared + 330 personal" in res.output
    res = runner.invoke(cli, ["bundle", "verify", str(bundle), "--pub", str(tmp_path / "fleet.pub"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["bundle_version"] == 3
    assert json.loads(res.output)["compression"] == "topk:0.3+q4"  # signed, in its canonical spelling

    other = tmp_path / "other.key"
    runner.invoke(cli, ["keys", "generate", "--out", str(other)])
    res = runner.invoke(cli, ["bundle", "verify", str(bundle), "--pub", str(tmp_path / "other.pub")])
    assert res.exit_code == 1 and "REFUSED" in res.output

    x, y = digits
    np.savez(tmp_path / "train.npz", x=x[:1200], y=y[:1200])
    np.savez(tmp_path / "test.npz", x=x[1200:], y=y[1200:])
    pub = str(tmp_path / "fleet.pub")
    assert agent_main(["install", str(bundle), "--fleet-key", pub, "--dest", str(tmp_path / "inst")]) == 0
    assert agent_main(["train", "--bundle-dir", str(tmp_path / "inst"), "--fleet-key", pub, "--state", str(tmp_path / "st"),
                       "--data", str(tmp_path / "train.npz"), "--eval-data", str(tmp_path / "test.npz"), "--epochs", "5"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["eval_accuracy"] > 0.85
    assert agent_main(["evaluate", "--bundle-dir", str(tmp_path / "inst"), "--fleet-key", pub, "--state", str(tmp_path / "st"),
                       "--data", str(tmp_path / "test.npz")]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["accuracy"] == trained["eval_accuracy"]  # state was persisted and reloaded


def test_cli_bundle_build_reports_split_errors(tmp_path: Path):
    runner = CliRunner()
    runner.invoke(cli, ["keys", "generate", "--out", str(tmp_path / "k")])
    res = runner.invoke(cli, ["bundle", "build", "--model", "sdk.models:PersonalizedMLP", "--model-arg", "in_features=4",
                              "--input-shape", "4", "--shared", "base", "--personal", "haed", "--mode", "fedalt",
                              "--key", str(tmp_path / "k"), "--name", "x", "-o", str(tmp_path / "x.fedge")])
    assert res.exit_code == 2  # an input error (docs/cli.md)
    assert "match no parameter" in res.output
    assert not (tmp_path / "x.fedge").exists()


def test_agent_refuses_tampered_bundle_with_exit_code(tmp_path: Path, bundle_factory, fleet_key, capsys):
    from device_agent.keys import save_public_key

    save_public_key(fleet_key.public_key(), tmp_path / "fleet.pub")
    src = bundle_factory("fedavg")
    bad = tmp_path / "bad.fedge"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            zout.writestr(name, data.replace(b'"digits-mlp"', b'"digits-mlq"') if name == "manifest.json" else data)
    assert agent_main(["install", str(bad), "--fleet-key", str(tmp_path / "fleet.pub"), "--dest", str(tmp_path / "i")]) == 1  # refused: exit 1 (docs/cli.md)
    assert "verification failed" in capsys.readouterr().err


def test_cli_simulate_digits_writes_json(tmp_path: Path):
    out = tmp_path / "sim.json"
    res = CliRunner().invoke(cli, ["simulate", "--dataset", "digits", "--algorithm", "fedalt", "--rounds", "2",
                                   "--epochs", "2", "--lr", "0.01", "--json-out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert [r["round"] for r in doc["rounds"]] == [0, 1]
    assert len(doc["rounds"][-1]["accuracy"]) == 10
    assert doc["rounds"][-1]["mean_accuracy"] > 0.5
    assert "final mean personalised accuracy" in res.output


def test_cli_bench_accuracy_refuses_unknown_setting_and_missing_results(tmp_path: Path):
    from sdk.cli.main import cli

    res = CliRunner().invoke(cli, ["bench", "accuracy", "--setting", "nope", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown settings" in res.output
    res = CliRunner().invoke(cli, ["bench", "accuracy", "--setting", "watch", "--report-only", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "no results to report" in res.output
    res = CliRunner().invoke(cli, ["bench", "accuracy", "--setting", "fmnist-full", "--run", "FedRep", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "has no runs ['FedRep']" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["bench", "accuracy", "--setting", "synthetic", "--rounds", "500", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--rounds must be between 1 and" in res.output


def test_cli_simulate_hierarchy_robust_rule_and_fine_tuning(tmp_path: Path):
    from sdk.cli.main import cli

    out = tmp_path / "sim.json"
    res = CliRunner().invoke(cli, ["simulate", "--dataset", "digits", "--algorithm", "fedavg", "--rounds", "2", "--regions", "2",
                                   "--regional-weight", "0.5", "--aggregation", "trimmed_mean", "--clip-norm", "5",
                                   "--finetune-epochs", "1", "--json-out", str(out)])
    assert res.exit_code == 0, res.output
    assert "hierarchy: global model" in res.output and "after local fine-tuning (head)" in res.output
    data = json.loads(out.read_text())
    assert data["rounds"][-1]["regional_accuracy"] and set(data["fine_tuned_accuracy"]) == {"all", "head"}
    res = CliRunner().invoke(cli, ["simulate", "--dataset", "digits", "--rounds", "1", "--regional-weight", "0.5"])
    assert res.exit_code == 2 and "has no regions" in res.output


def test_cli_simulate_same_seed_same_numbers(tmp_path: Path):
    from sdk.cli.main import cli

    outs = []
    for i in range(2):
        out = tmp_path / f"{i}.json"
        res = CliRunner().invoke(cli, ["simulate", "--dataset", "digits", "--algorithm", "fedavg", "--rounds", "1", "--seed", "7",
                                       "--json-out", str(out)])
        assert res.exit_code == 0, res.output
        outs.append(json.loads(out.read_text())["rounds"][0]["accuracy"])
    assert outs[0] == outs[1]


def test_cli_keys_generate_names_the_public_key_so_the_registry_finds_the_device(tmp_path: Path):
    runner = CliRunner()
    registry = tmp_path / "devices"
    res = runner.invoke(cli, ["keys", "generate", "--out", str(registry / "eu-dev-0001.key")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in registry.iterdir()) == ["eu-dev-0001.key", "eu-dev-0001.pub"]
    (registry / "eu-dev-0001.key").rename(tmp_path / "eu-dev-0001.key")  # the private key goes to the device
    from sdk.aggregator.registry import KeyRegistry

    assert KeyRegistry(registry).ids() == ("eu-dev-0001",)
    res = runner.invoke(cli, ["keys", "generate", "--kind", "encryption", "--out", str(tmp_path / "eu-agg.x25519")])
    assert res.exit_code == 0 and (tmp_path / "eu-agg.x25519.pub").is_file()
    res = runner.invoke(cli, ["keys", "generate", "--out", str(tmp_path / "eu-dev-0001.key")])
    assert res.exit_code == 2 and "exists" in res.output
    res = runner.invoke(cli, ["keys", "generate", "--out", str(tmp_path / "x.pub")])
    assert res.exit_code == 2 and "public key's name" in res.output


# -- your own data and model -----------------------------------------------------------------

USER_NET = '''
import torch

class Net(torch.nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.base = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU())
        self.head = torch.nn.Linear(hidden, 10)

    def forward(self, x):
        return self.head(self.base(x))
'''


def _user_folder(root: Path, digits, *, clients: int = 3) -> Path:
    """Digits dealt to ``clients`` .npz files with no validation split, and a regions.toml."""
    x, y = digits
    folder = root / "my-clients"
    folder.mkdir()
    for i, idx in enumerate(np.array_split(np.arange(600), clients)):
        cut = int(0.8 * len(idx))
        np.savez(folder / f"dev-{i}.npz", x_train=x[idx[:cut]], y_train=y[idx[:cut]], x_test=x[idx[cut:]], y_test=y[idx[cut:]])
    (folder / "regions.toml").write_text("".join(f'"dev-{i}" = "r{i % 2}"\n' for i in range(clients)))
    return folder


def test_cli_simulate_user_folder_and_model_from_the_working_directory(tmp_path: Path, digits, monkeypatch):
    folder = _user_folder(tmp_path, digits)
    (tmp_path / "mynets.py").write_text(USER_NET)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sim.json"
    res = CliRunner().invoke(cli, ["simulate", "--data", "my-clients", "--model", "mynets:Net", "--model-arg", "hidden=24",
                                   "--personal", "head", "--algorithm", "fedfomo", "--fomo-candidates", "2", "--rounds", "3",
                                   "--lr", "0.01", "--json-out", str(out)])
    assert res.exit_code == 0, res.output
    assert "no client came with a validation split: held out 10%" in res.output
    assert "fedfomo: kept only its own model" in res.output and "dev-0" in res.output
    doc = json.loads(out.read_text())
    assert set(doc["final_accuracy"]) == {"dev-0", "dev-1", "dev-2"} and doc["mean_final_accuracy"] > 0.5
    assert doc["validation"]["held_out"] == {"dev-0": 16, "dev-1": 16, "dev-2": 16}  # 10% of 160
    assert set(doc["fomo_kept_own"]["per_device"]) == {"dev-0", "dev-1", "dev-2"} and doc["fomo_kept_own"]["overall"] is not None
    # The folder's regions drive the hierarchy; the built-in model is picked for the data's shape without --model.
    res = CliRunner().invoke(cli, ["simulate", "--data", str(folder), "--algorithm", "fedavg", "--rounds", "1",
                                   "--regional-weight", "0.5"])
    assert res.exit_code == 0, res.output
    assert "hierarchy: global model" in res.output and str(folder) in res.output


def test_cli_simulate_bad_user_input_is_one_line_with_exit_2(tmp_path: Path, digits, monkeypatch):
    folder = _user_folder(tmp_path, digits)
    (tmp_path / "mynets.py").write_text(USER_NET)
    monkeypatch.chdir(tmp_path)
    with np.load(folder / "dev-1.npz") as d:
        arrays = dict(d)
    arrays["y_train"] = arrays["y_train"].reshape(-1, 1)
    np.savez(folder / "dev-1.npz", **arrays)
    cases = [
        (["--data", "my-clients"], "my-clients/dev-1.npz: y_train: shape"),
        (["--data", "nowhere"], "nowhere: no such folder"),
        (["--data", "my-clients", "--dataset", "digits"], "not both"),
        (["--model", "mynets:Nett"], "mynets has no attribute 'Nett'"),
        (["--model", "mynets:Net", "--algorithm", "fedalt"], "--personal PREFIX"),
        (["--model", "mynets:Net", "--model-arg", "hiden=3", "--algorithm", "fedavg"], "unexpected keyword argument 'hiden'"),
        (["--model", "mynets:Net", "--personal", "hed"], "prefixes match no parameter: ['hed']"),
        (["--dataset", "watch", "--model", "mynets:Net", "--personal", "head"], "rejects examples of shape (6, 100)"),
        (["--dataset", "synthetic", "--model", "mynets:Net", "--personal", "head"], "rejects examples of shape (60,)"),
    ]
    for args, expected in cases:
        res = CliRunner().invoke(cli, ["simulate", "--rounds", "1", *args])
        assert res.exit_code == 2, (args, res.output)
        assert expected in res.output, (args, res.output)
        assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
        assert "Traceback" not in res.output


def test_cli_bench_accuracy_user_folder_writes_to_its_own_folder_not_docs_results(tmp_path: Path, digits, monkeypatch):
    _user_folder(tmp_path, digits)
    (tmp_path / "mynets.py").write_text(USER_NET)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["bench", "accuracy", "--data", "my-clients", "--model", "mynets:Net", "--personal", "head",
                                   "--algorithm", "local", "--algorithm", "fedalt", "--algorithm", "fedfomo", "--rounds", "2",
                                   "--workers", "1", "--lr", "0.01"])
    assert res.exit_code == 0, res.output
    results = tmp_path / "fedge-results"
    assert sorted(p.name for p in results.iterdir()) == ["my-clients-gain.png", "my-clients-rounds.png", "my-clients.json",
                                                          "my-clients.md"]
    assert not (tmp_path / "docs").exists()
    doc = json.loads((results / "my-clients.json").read_text())
    assert [r["label"] for r in doc["runs"]] == ["Local-only", "FedAlt", "FedFomo"]
    assert "FedFomo" in doc["summary"]["fomo_kept_own"] and "held out 10%" in doc["summary"]["validation"]
    # The report can be rebuilt from the JSON alone.
    res = CliRunner().invoke(cli, ["bench", "accuracy", "--data", "my-clients", "--report-only"])
    assert res.exit_code == 0 and "Your data: my-clients" in res.output, res.output
    res = CliRunner().invoke(cli, ["bench", "accuracy", "--data", "my-clients", "--name", "watch"])
    assert res.exit_code == 2 and "built-in setting" in res.output


def test_defaults_are_one_learning_rate_everywhere():
    import inspect

    from sdk.artifacts import TrainingSpec
    from sdk.demo.settings import DemoSettings
    from sdk.simulation import compare
    from sdk.simulation.runner import BundleTraining
    from sdk.training_defaults import DEFAULT_LEARNING_RATE

    def cli_default(*path: str) -> float:
        command = cli
        for name in path:
            command = command.commands[name]  # type: ignore[attr-defined]
        return next(p.default for p in command.params if p.name in ("lr", "learning_rate"))

    assert {cli_default("simulate"), cli_default("demo"), cli_default("bundle", "build"), cli_default("bench", "accuracy"),
            TrainingSpec(mode="fedavg").learning_rate, DemoSettings().learning_rate, BundleTraining().learning_rate,
            inspect.signature(compare).parameters["learning_rate"].default} == {DEFAULT_LEARNING_RATE}


def test_agent_train_and_evaluate_read_the_npz_keys_agent_toml_names(tmp_path: Path, bundle_factory, fleet_key, digits, capsys):
    x, y = digits
    np.savez(tmp_path / "local.npz", features=x[:300], labels=y[:300])
    pub = tmp_path / "fleet.pub"
    from device_agent.keys import save_public_key

    save_public_key(fleet_key.public_key(), pub)
    assert agent_main(["install", str(bundle_factory("fedavg")), "--fleet-key", str(pub), "--dest", str(tmp_path / "inst")]) == 0
    common = ["--bundle-dir", str(tmp_path / "inst"), "--fleet-key", str(pub), "--state", str(tmp_path / "st"),
              "--data", str(tmp_path / "local.npz")]
    assert agent_main(["train", *common]) == 2
    assert "missing arrays ['x', 'y']" in capsys.readouterr().err
    assert agent_main(["train", *common, "--x-key", "features", "--y-key", "labels", "--epochs", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2 * 10
    assert agent_main(["evaluate", *common, "--x-key", "features", "--y-key", "labels"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["examples"] == 300
