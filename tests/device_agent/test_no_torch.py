"""The device agent installs, verifies, trains and saves with torch impossible to import."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from device_agent.keys import save_public_key

CHILD = textwrap.dedent(
    """
    import json, sys
    from device_agent.import_guard import ModuleBlocker

    sys.meta_path.insert(0, ModuleBlocker(("torch", "onnx", "sdk")))
    import numpy as np
    from device_agent.bundle.archive import install_bundle
    from device_agent.data import ArrayDataSource
    from device_agent.keys import load_verify_key
    from device_agent.trainer import DeviceTrainer, TrainBudget

    bundle_path, key_path, work, backend = sys.argv[1:5]
    bundle = install_bundle(bundle_path, load_verify_key(key_path), work + "/installed")
    trainer = DeviceTrainer(bundle, state_dir=work + "/state", backend=backend)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 64)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    before = trainer.evaluate(ArrayDataSource(x, y)).loss
    report = trainer.train(ArrayDataSource(x, y), TrainBudget(epochs=5, batch_size=32), rng=rng)
    after = trainer.evaluate(ArrayDataSource(x, y)).loss
    trainer.save_state()
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "sdk"))
    print(json.dumps({"steps": report.steps, "before": before, "after": after, "heavy": heavy,
                      "training_pkg": "onnxruntime.training" in sys.modules, "backend": trainer.backend_name.value}))
    """
)


@pytest.mark.parametrize("backend", ["ort-training", "portable"])
def test_device_agent_trains_without_torch(backend, bundle_factory, fleet_key, tmp_path: Path):
    key_path = tmp_path / "fleet.pub"
    save_public_key(fleet_key.public_key(), key_path)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(bundle_factory("fedalt", mu=0.01, num_classes=2)), str(key_path), str(tmp_path), backend],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["training_pkg"] is False
    assert result["backend"] == backend
    assert result["steps"] == 80
    assert result["after"] < result["before"]


def test_device_agent_import_does_not_load_torch_even_when_installed():
    """torch *is* installed here; importing the agent must still not load it."""
    code = "import sys, device_agent.trainer, device_agent.bundle.archive; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch','onnx')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.strip() == "[]"
