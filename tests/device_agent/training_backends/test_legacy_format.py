"""What existing devices have keeps working: format-1 bundles train, format-1 state generations resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from device_agent.bundle.archive import verify_bundle
from device_agent.data import ArrayDataSource
from device_agent.state_store import StateStore
from device_agent.trainer import DeviceTrainer, TrainBudget
from device_agent.training_backends import BackendUnavailableError
from tests.model_bundles import make_data
from tests.device_agent.training_backends.legacy import as_format1_bundle, save_format1_generation

BUDGET = TrainBudget(epochs=1, batch_size=8)


def test_format1_bundle_verifies_and_trains_on_ort_training(model_bundle, install, fleet_key, tmp_path):
    path, _ = model_bundle("mlp", "fedalt", mu=0.1, kinds=("ort-training",))
    old = as_format1_bundle(path, tmp_path / "old.fedge", fleet_key)
    manifest = verify_bundle(old, fleet_key.public_key())
    assert manifest.format_version == 1 and manifest.portable is None
    trainer = DeviceTrainer(install(old))
    assert trainer.backend_name.value == "ort-training"
    x, y = make_data("mlp", "cross_entropy", 64, seed=0)
    before = trainer.evaluate(ArrayDataSource(x, y)).loss
    trainer.train(ArrayDataSource(x, y), TrainBudget(epochs=5, batch_size=16))
    assert trainer.evaluate(ArrayDataSource(x, y)).loss < before
    with pytest.raises(BackendUnavailableError, match="no portable artifacts"):
        DeviceTrainer(install(old), backend="portable")


def test_portable_bundles_are_format3_and_an_agent_reading_1_2_refuses_them_by_version(model_bundle, fleet_key, monkeypatch):
    """Portable step graphs take ``flat.param`` since format 3: an agent that reads formats 1-2 only must refuse
    such a bundle at verification (one line naming the version), not stop at its first training step."""
    from device_agent.bundle import manifest_parser
    from device_agent.errors import BundleError

    both, _ = model_bundle("mlp", "fedavg")
    ort_only, _ = model_bundle("mlp", "fedalt", mu=0.1, kinds=("ort-training",))
    assert verify_bundle(both, fleet_key.public_key()).format_version == 3
    assert verify_bundle(ort_only, fleet_key.public_key()).format_version == 2
    monkeypatch.setattr(manifest_parser, "SUPPORTED_FORMAT_VERSIONS", (1, 2))  # the constant of the agents before format 3
    with pytest.raises(BundleError, match=r"format version 3 is not supported \(this agent reads \[1, 2\]\)"):
        verify_bundle(both, fleet_key.public_key())
    assert verify_bundle(ort_only, fleet_key.public_key()).format_version == 2


@pytest.mark.parametrize("backend", ["ort-training", "portable"])
def test_format1_state_generation_resumes_with_moments(backend, model_bundle, install, tmp_path):
    """A device saved by the previous release (ORT checkpoints) resumes on either backend, moments and all."""
    path, _ = model_bundle("mlp", "fedalt", mu=0.1, optimizer="adamw")
    bundle = install(path)
    data = [make_data("mlp", "cross_entropy", 8, seed=s) for s in range(3)]
    old = DeviceTrainer(bundle, backend="ort-training", threads=1)
    for x, y in data[:2]:
        old.train(ArrayDataSource(x, y), BUDGET)
    old.round = 7
    save_format1_generation(old, tmp_path / "state")
    stored = StateStore(tmp_path / "state").load()
    assert sorted(p.name for p in stored.directory.iterdir()) == ["ckpt-personal", "ckpt-shared", "global.npz", "meta.json"]

    resumed = DeviceTrainer(bundle, backend=backend, threads=1, state_dir=tmp_path / "state")
    assert resumed.round == 7 and resumed.total_steps == old.total_steps
    want = old.export_state().to_arrays()
    got = resumed.export_state().to_arrays()
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    x, y = data[2]
    assert resumed.train(ArrayDataSource(x, y), BUDGET).mean_loss == pytest.approx(
        old.train(ArrayDataSource(x, y), BUDGET).mean_loss, rel=1e-5)
    for name, value in old.get_personal().items():
        np.testing.assert_allclose(resumed.get_personal()[name], value, rtol=1e-5, atol=2e-6)
    resumed.save_state()  # the next save writes format 2
    stored = StateStore(tmp_path / "state").load()
    assert sorted(p.name for p in stored.directory.iterdir()) == ["global.npz", "meta.json", "state.npz"]
    meta = json.loads((stored.directory / "meta.json").read_text())
    assert meta["state_format"] == 2 and meta["backend"] == backend
