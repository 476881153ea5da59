"""A device-only install: ``pip install '.[device]'`` (or ``[device-ort-training]``) into a fresh venv, no torch.

It resolves, holds exactly one ONNX Runtime distribution, imports the agent
without torch, onnx or sdk, and its ``fedge`` script says in one line what is
missing. The ``device`` extra also resolves to wheels that exist for a
Raspberry Pi (aarch64, CPython 3.11); the ORT-training one does not.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.example_modules import load_example
from tests.packaging.device_venv import RUNTIME_DISTRIBUTIONS, DeviceVenv, device_venv

pytestmark = pytest.mark.packaging

#: extra -> the one ONNX Runtime distribution it must bring.
RUNTIME_OF = {"device": "onnxruntime", "device-ort-training": "onnxruntime-training-cpu"}
HOST_ONLY = ("torch", "click", "onnxscript", "matplotlib", "scikit-learn", "amqtt")

IMPORTS = """
import importlib.util, json, sys
import device_agent.cli, device_agent.daemon.bootstrap, device_agent.trainer, device_agent.protocol.envelope
from device_agent.training_backends import installed_backends
backends = [b.value for b in installed_backends()]  # imports onnxruntime
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnx', 'sdk'})
print(json.dumps({"heavy": heavy, "torch_installed": importlib.util.find_spec('torch') is not None,
                  "onnxruntime": sys.modules['onnxruntime'].__version__, "backends": backends}))
"""
#: extra -> the training backends its runtime can run.
BACKENDS_OF = {"device": ["portable"], "device-ort-training": ["ort-training", "portable"]}


@pytest.fixture(scope="module", params=sorted(RUNTIME_OF))
def venv(request: pytest.FixtureRequest) -> Iterator[DeviceVenv]:
    with device_venv(request.param) as made:
        yield made


def test_device_install_holds_one_runtime_and_no_host_tools(venv: DeviceVenv) -> None:
    dists = venv.distributions()
    assert "fedge" in dists
    assert [d for d in RUNTIME_DISTRIBUTIONS if d in dists] == [RUNTIME_OF[venv.extra]], dists
    assert [d for d in HOST_ONLY if d in dists] == []
    if venv.extra == "device":
        assert "onnx" not in dists  # onnxruntime-training-cpu drags onnx in; the portable runtime does not
    check = venv.run(["python", "-I", "-m", "pip", "check"])
    assert check.returncode == 0, check.stdout + check.stderr


def test_device_install_imports_the_agent_without_torch(venv: DeviceVenv) -> None:
    proc = venv.python(IMPORTS)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [] and result["torch_installed"] is False, result
    assert result["onnxruntime"] == venv.distributions()[RUNTIME_OF[venv.extra]]
    assert result["backends"] == BACKENDS_OF[venv.extra]


def test_device_install_trains_a_bundle_with_its_backend(venv: DeviceVenv, model_bundle, fleet_key, tmp_path: Path) -> None:
    """The installed fedge-agent (not the checkout) verifies, installs and trains a bundle carrying both artifact kinds."""
    from device_agent.keys import save_public_key
    from tests.model_bundles import make_data

    path, _ = model_bundle("mlp", "fedalt", mu=0.1, optimizer="adamw")
    save_public_key(fleet_key.public_key(), tmp_path / "fleet.pub")
    x, y = make_data("mlp", "cross_entropy", 64, seed=1)
    np.savez(tmp_path / "local.npz", x=x, y=y)
    install = venv.run(["fedge-agent", "install", str(path), "--fleet-key", str(tmp_path / "fleet.pub"),
                        "--dest", str(tmp_path / "bundle")])
    assert install.returncode == 0, install.stderr
    train = venv.run(["fedge-agent", "train", "--bundle-dir", str(tmp_path / "bundle"), "--fleet-key", str(tmp_path / "fleet.pub"),
                      "--state", str(tmp_path / "state"), "--data", str(tmp_path / "local.npz"), "--epochs", "2"])
    assert train.returncode == 0, train.stderr
    result = json.loads(train.stdout)
    assert result["backend"] == BACKENDS_OF[venv.extra][0] and result["steps"] == 8  # auto: ort-training where installed


def test_device_install_fedge_script_names_the_missing_extra_in_one_line(venv: DeviceVenv) -> None:
    proc = venv.run(["fedge", "bundle", "build", "--help"])
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "pip install 'fedge[sdk]'" in lines[0] and "fedge-agent" in lines[0]


def test_device_install_fedge_agent_reports_a_missing_bundle_in_one_line(venv: DeviceVenv, tmp_path: Path) -> None:
    proc = venv.run(["fedge-agent", "install", str(tmp_path / "absent.fedge"), "--fleet-key", str(tmp_path / "absent.pub"),
                     "--dest", str(tmp_path / "dest")])
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("fedge-agent: error:")


def _dry_run_for_aarch64(extra: str, report: Path) -> subprocess.CompletedProcess[str]:
    overlay = load_example("firmware-image/build_overlay.py")
    target = overlay.Target(python="3.11", platforms=overlay.DEFAULT_PLATFORMS)
    with tempfile.TemporaryDirectory(prefix="fedge-src-") as tmp:
        source = overlay.copy_wheel_sources(Path(__file__).resolve().parents[2], Path(tmp) / "fedge")
        return subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed", "--report", str(report),
             "--target", str(Path(tmp) / "target"), *target.pip_args(), f"{source}[{extra}]"],
            capture_output=True, text=True, timeout=300, check=False)


def test_device_extra_resolves_to_wheels_that_exist_for_aarch64_cp311(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    proc = _dry_run_for_aarch64("device", report)
    assert proc.returncode == 0, proc.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in installs}
    assert {"fedge", "onnxruntime", "numpy", "paho-mqtt", "cryptography"} <= names
    assert not names & {"onnxruntime-training", "onnxruntime-training-cpu", "torch"}
    for item in installs:
        if item["metadata"]["name"] == "fedge":
            continue  # built from the checkout: pure Python
        wheel = item["download_info"]["url"].rsplit("/", 1)[-1]
        assert wheel.endswith(".whl"), wheel
        platform_tag = wheel[:-4].split("-")[-1]
        assert platform_tag == "any" or "aarch64" in platform_tag, wheel


def test_device_ort_training_extra_has_no_aarch64_wheel(tmp_path: Path) -> None:
    """The reason the portable backend exists: onnxruntime-training-cpu ships no Linux aarch64 wheel."""
    proc = _dry_run_for_aarch64("device-ort-training", tmp_path / "report.json")
    assert proc.returncode != 0
    assert "onnxruntime-training-cpu" in proc.stderr and "No matching distribution" in proc.stderr, proc.stderr[-3000:]
