"""The optional ``finetune`` artifact set: FedAvg + local fine-tuning of the head, on real ORT."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.bundle.manifest import ArtifactSetName
from device_agent.data import ArrayDataSource
from device_agent.errors import TrainingError
from device_agent.trainer import DeviceTrainer, TrainBudget
from sdk.artifacts import TrainingSpec
from sdk.model_spec import ParameterSplitError


def test_fine_tune_trains_only_the_head_and_set_global_restores(bundle_factory, install, digits) -> None:
    x, y = digits
    trainer = DeviceTrainer(install(bundle_factory("fedavg", finetune=("head",))), threads=1)
    assert trainer.can_fine_tune
    assert trainer.fine_tune_names == ("head.weight", "head.bias")
    data = ArrayDataSource(x[:400], y[:400])
    received = trainer.get_shared()
    trainer.set_global(received, round_number=0)
    before = trainer.evaluate(data).loss
    report = trainer.fine_tune(data, TrainBudget(epochs=2, batch_size=32), rng=np.random.default_rng(0))
    after = trainer.get_shared()
    assert report.phase_steps == {"finetune": 2 * 13}
    changed = {n for n in after if not np.array_equal(after[n], received[n])}
    assert changed == {"head.weight", "head.bias"}
    assert trainer.evaluate(data).loss < before
    # Joint training after fine-tuning starts from the tuned head (states are synced), and
    # set_global puts the received model back everywhere.
    trainer.set_global(received, round_number=1)
    assert all(np.array_equal(v, received[n]) for n, v in trainer.get_shared().items())
    assert trainer.evaluate(data).loss == pytest.approx(before, rel=1e-6)


def test_bundle_without_finetune_set_refuses(bundle_factory, install, digits) -> None:
    x, y = digits
    trainer = DeviceTrainer(install(bundle_factory("fedavg")), threads=1)
    assert not trainer.can_fine_tune
    with pytest.raises(TrainingError, match="finetune"):
        trainer.fine_tune(ArrayDataSource(x[:10], y[:10]))


def test_fine_tune_state_survives_save_and_resume(bundle_factory, install, digits, tmp_path) -> None:
    x, y = digits
    bundle = install(bundle_factory("fedprox", mu=0.1, finetune=("head",)))
    assert ArtifactSetName.FINETUNE in {s.name for s in bundle.manifest.artifact_sets}
    trainer = DeviceTrainer(bundle, state_dir=tmp_path / "state", threads=1)
    trainer.fine_tune(ArrayDataSource(x[:64], y[:64]), TrainBudget(epochs=1, batch_size=32))
    trainer.save_state()
    resumed = DeviceTrainer(bundle, state_dir=tmp_path / "state", threads=1)
    for name, value in trainer.get_shared().items():
        np.testing.assert_array_equal(resumed.get_shared()[name], value)


@pytest.mark.parametrize("prefixes", [("nothing",), ("base", "head")])
def test_finetune_prefixes_must_match_and_leave_something_frozen(prefixes, tmp_path) -> None:
    import torch

    from sdk.artifacts import generate_training_artifacts
    from sdk.model_spec import ParameterSplit
    from sdk.models import PersonalizedMLP

    with pytest.raises(ParameterSplitError, match="finetune"):
        generate_training_artifacts(PersonalizedMLP(8, (4,), 3), example_input=torch.zeros(2, 8), split=ParameterSplit(shared=("*",)),
                                    spec=TrainingSpec(mode="fedavg", finetune=prefixes), out_dir=tmp_path)


def test_finetune_must_be_a_sequence() -> None:
    with pytest.raises(TypeError):
        TrainingSpec(mode="fedavg", finetune="head")  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["ort-training", "portable"])
def test_fresh_optimizers_trains_as_a_new_device_would_then_puts_the_moments_back(bundle_factory, install, digits,
                                                                                 backend) -> None:
    x, y = digits
    bundle = install(bundle_factory("fedavg", finetune=("head",)))
    data = ArrayDataSource(x[:200], y[:200])
    trainer = DeviceTrainer(bundle, threads=1, backend=backend)
    trainer.train(data, TrainBudget(epochs=2, batch_size=32), rng=np.random.default_rng(0))
    trainer.fine_tune(data, TrainBudget(epochs=1, batch_size=32), rng=np.random.default_rng(1))
    kept = trainer.export_state().optimizers
    assert all(opt.step > 0 for opt in kept.values())
    held = trainer.get_shared()
    new = DeviceTrainer(bundle, threads=1, backend=backend)
    new.set_shared(held)

    with trainer.fresh_optimizers():
        inside = trainer.export_state().optimizers
        assert all(opt.step == 0 and not any(np.any(m) for m in opt.m.values()) for opt in inside.values())
        for t in (trainer, new):
            t.train(data, TrainBudget(epochs=1, batch_size=32), rng=np.random.default_rng(2))
            t.fine_tune(data, TrainBudget(epochs=1, batch_size=32), rng=np.random.default_rng(3))

    # the same steps as a device that never trained before, from the same weights
    for n, v in trainer.get_shared().items():
        np.testing.assert_allclose(v, new.get_shared()[n], rtol=1e-6, atol=1e-7)
    assert any(not np.array_equal(v, held[n]) for n, v in trainer.get_shared().items())
    # and the device's own optimizer state is back, as it was
    after = trainer.export_state().optimizers
    for name, opt in kept.items():
        assert after[name].step == opt.step
        for m in opt.m:
            np.testing.assert_array_equal(after[name].m[m], opt.m[m])
            np.testing.assert_array_equal(after[name].v[m], opt.v[m])
