"""The portable graphs on MAINSTREAM onnxruntime (current PyPI release, no torch, no onnxruntime-training).

A child process in a separate venv (``mainstream_venv``) trains the same
bundle on the same batches as the host does with its portable backend (on
onnxruntime-training 1.19.2's InferenceSession); both must end with the same
numbers (the cross-backend tolerances: rtol 1e-5, atol 2e-6). It also resumes a
format-1 state generation (ORT checkpoints) and runs ``fedge-agent train``.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from device_agent.data import ArrayDataSource
from device_agent.keys import save_public_key
from device_agent.trainer import DeviceTrainer, TrainBudget
from tests.model_bundles import make_data
from tests.device_agent.training_backends.legacy import save_format1_generation
from tests.device_agent.training_backends.mainstream_venv import mainstream_python

REPO = Path(__file__).resolve().parents[3]
TOL = {"rtol": 1e-5, "atol": 2e-6}
BATCHES = (8, 8, 5)

CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    try:
        import torch  # noqa: F401
        sys.exit("torch is importable in the mainstream venv")
    except ImportError:
        pass
    import onnxruntime
    from device_agent.bundle.archive import load_bundle
    from device_agent.data import ArrayDataSource
    from device_agent.keys import load_verify_key
    from device_agent.trainer import DeviceTrainer, TrainBudget
    from device_agent.training_backends import BackendUnavailableError, installed_backends

    bundle_dir, key, state, data = sys.argv[1:5]
    bundle = load_bundle(bundle_dir, load_verify_key(key))
    out = {"onnxruntime": onnxruntime.__version__, "installed": [b.value for b in installed_backends()]}
    try:
        DeviceTrainer(bundle, backend="ort-training")
        out["forced_ort_training"] = "accepted"
    except BackendUnavailableError as exc:
        out["forced_ort_training"] = str(exc)
    arrays = np.load(data)
    for name, kwargs in (("fresh", {}), ("resumed", {"state_dir": state})):
        trainer = DeviceTrainer(bundle, **kwargs)
        losses = []
        for i in range(int(arrays["n"])):
            x, y = arrays[f"x{i}"], arrays[f"y{i}"]
            losses.append(trainer.train(ArrayDataSource(x, y), TrainBudget(epochs=1, batch_size=len(x))).mean_loss)
        out[name] = {"backend": trainer.backend_name.value, "losses": losses,
                     "params": {k: v.tolist() for k, v in {**trainer.get_shared(), **trainer.get_personal()}.items()}}
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def mainstream():
    try:
        return mainstream_python()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.fail(f"cannot build the mainstream onnxruntime venv (needs PyPI): {exc}")


def _run(python: Path, *args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(REPO)
    cmd = [str(python), "-c", code, *args] if code is not None else [str(python), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO, check=False)


@pytest.mark.slow
@pytest.mark.parametrize(("model", "micro_batch"), [("mlp", 0), ("cnn1d", 0), ("mlp", 3)])  # 3: slices in a Loop (convolutions in a Loop: test_cross_backend)
def test_portable_graphs_give_the_host_numbers_on_mainstream_onnxruntime(model, micro_batch, mainstream, model_bundle, install,
                                                                         fleet_key, tmp_path):
    path, _ = model_bundle(model, "fedalt", mu=0.1, optimizer="adamw", micro_batch=micro_batch)
    bundle = install(path)
    key = tmp_path / "fleet.pub"
    save_public_key(fleet_key.public_key(), key)
    batches = [make_data(model, "cross_entropy", n, seed=20 + i) for i, n in enumerate(BATCHES)]
    np.savez(tmp_path / "data.npz", n=len(batches), **{f"x{i}": x for i, (x, _) in enumerate(batches)},
             **{f"y{i}": y for i, (_, y) in enumerate(batches)})
    # a device of the previous release: two rounds on ort-training, saved as ORT checkpoints
    old = DeviceTrainer(bundle, backend="ort-training", threads=1)
    for x, y in batches[:2]:
        old.train(ArrayDataSource(x, y), TrainBudget(epochs=1, batch_size=len(x)))
    save_format1_generation(old, tmp_path / "state")

    proc = _run(mainstream, str(bundle.directory), str(key), str(tmp_path / "state"), str(tmp_path / "data.npz"), code=CHILD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["onnxruntime"] != "1.19.2" and out["installed"] == ["portable"]
    assert "not installed here" in out["forced_ort_training"]
    assert out["fresh"]["backend"] == out["resumed"]["backend"] == "portable"

    host = DeviceTrainer(bundle, backend="portable", threads=1)
    host_losses = [host.train(ArrayDataSource(x, y), TrainBudget(epochs=1, batch_size=len(x))).mean_loss for x, y in batches]
    np.testing.assert_allclose(out["fresh"]["losses"], host_losses, rtol=TOL["rtol"])
    for name, value in {**host.get_shared(), **host.get_personal()}.items():
        np.testing.assert_allclose(np.array(out["fresh"]["params"][name], dtype=np.float32), value, err_msg=name, **TOL)
    # the resumed device continues from its ORT checkpoints: 3 more batches on top of the 2 it had
    for x, y in batches:
        old.train(ArrayDataSource(x, y), TrainBudget(epochs=1, batch_size=len(x)))
    for name, value in {**old.get_shared(), **old.get_personal()}.items():
        np.testing.assert_allclose(np.array(out["resumed"]["params"][name], dtype=np.float32), value, err_msg=name, **TOL)


@pytest.mark.slow
def test_fedge_agent_train_runs_on_mainstream_onnxruntime(mainstream, model_bundle, install, fleet_key, tmp_path):
    path, _ = model_bundle("mlp", "fedalt", mu=0.1, optimizer="adamw")
    bundle = install(path)
    key = tmp_path / "fleet.pub"
    save_public_key(fleet_key.public_key(), key)
    x, y = make_data("mlp", "cross_entropy", 64, seed=5)
    np.savez(tmp_path / "local.npz", x=x, y=y)
    args = ["-m", "device_agent.cli", "train", "--bundle-dir", str(bundle.directory), "--fleet-key", str(key),
            "--state", str(tmp_path / "state"), "--data", str(tmp_path / "local.npz"), "--epochs", "2"]
    proc = _run(mainstream, *args)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["backend"] == "portable" and result["steps"] == 8
    forced = _run(mainstream, *args, "--backend", "ort-training")
    assert forced.returncode == 2 and "Traceback" not in forced.stderr
    assert "backend ort-training is not installed here" in forced.stderr


# onnxruntime >= 1.29 stays quiet when it sees one of these (CI detection) and honours XDG_CACHE_HOME: the control
# below must look like a device, not like a CI runner.
_CI_MARKERS = ("CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL",
               "CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR", "BITBUCKET_BUILD_NUMBER",
               "XDG_CACHE_HOME", "PYTHONPATH", "VIRTUAL_ENV", "ORT_DISABLE_TELEMETRY")


def test_the_agent_switches_onnxruntime_telemetry_off(mainstream, tmp_path):
    """onnxruntime >= 1.29 sends usage events and writes a device id under ~/.cache unless told not to."""
    code = ("import os; from device_agent.training_backends.runtime import onnxruntime_module; "
            "ort = onnxruntime_module(); print(os.environ.get('ORT_DISABLE_TELEMETRY'))")
    env = {k: v for k, v in os.environ.items() if k not in _CI_MARKERS}
    plain_home, agent_home = tmp_path / "plain", tmp_path / "agent"
    plain_home.mkdir()
    agent_home.mkdir()
    agent = subprocess.run([str(mainstream), "-c", code], capture_output=True, text=True, timeout=120,
                           env={**env, "HOME": str(agent_home), "PYTHONPATH": str(REPO)}, cwd=REPO, check=False)
    assert agent.returncode == 0, agent.stderr
    # Set before onnxruntime is imported, so it holds whatever the wheel would otherwise decide.
    assert agent.stdout.strip() == "1", agent.stdout
    assert not (agent_home / ".cache").exists() or not list((agent_home / ".cache").rglob("*")), \
        sorted(map(str, (agent_home / ".cache").rglob("*")))
    # The control: onnxruntime on its own writes its telemetry id on a machine that does not look like a CI
    # runner (so the file check above can fail). Where the wheel still stays quiet, there is nothing to compare.
    plain = subprocess.run([str(mainstream), "-c", "import onnxruntime"], capture_output=True, text=True, timeout=120,
                           env={**env, "HOME": str(plain_home)}, cwd=REPO, check=False)
    assert plain.returncode == 0, plain.stderr
    wrote = list((plain_home / ".cache").rglob("deviceid"))
    if not wrote:
        print("control: this onnxruntime wheel wrote no telemetry id here; only the setting was checked")
