"""Device trainer behaviour: FedAlt freezing, learning on digits, deltas, bad input, resume."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.data import ArrayDataSource
from device_agent.errors import TrainingError
from device_agent.trainer import DeviceTrainer, TrainBudget

DIGITS_ACCURACY_FLOOR = 0.90


def _split(digits):
    x, y = digits
    order = np.random.default_rng(42).permutation(len(x))
    x, y = x[order], y[order]
    return ArrayDataSource(x[:1400], y[:1400]), ArrayDataSource(x[1400:], y[1400:])


def test_trainer_fedalt_head_phase_leaves_shared_untouched(bundle_factory, install, digits):
    trainer = DeviceTrainer(install(bundle_factory("fedalt", mu=0.01)))
    train, _ = _split(digits)
    shared0, personal0 = trainer.get_shared(), trainer.get_personal()
    report = trainer.train(train, TrainBudget(epochs=0, personal_epochs=1, batch_size=64))
    assert report.phase_steps == {"personal": 22, "shared": 0}
    for n, v in trainer.get_shared().items():
        np.testing.assert_array_equal(v, shared0[n])
    assert any(not np.array_equal(v, personal0[n]) for n, v in trainer.get_personal().items())


def test_trainer_fedalt_shared_phase_leaves_head_untouched(bundle_factory, install, digits):
    trainer = DeviceTrainer(install(bundle_factory("fedalt", mu=0.01)))
    train, _ = _split(digits)
    shared0, personal0 = trainer.get_shared(), trainer.get_personal()
    trainer.train(train, TrainBudget(epochs=1, personal_epochs=0, batch_size=64))
    for n, v in trainer.get_personal().items():
        np.testing.assert_array_equal(v, personal0[n])
    assert all(not np.array_equal(v, shared0[n]) for n, v in trainer.get_shared().items())


def test_trainer_fedalt_phases_see_each_others_updates(bundle_factory, install, digits):
    """After the head phase, the shared phase must train against the *new* head (ORT-training: state sync)."""
    trainer = DeviceTrainer(install(bundle_factory("fedalt", mu=0.0)), backend="ort-training")
    train, test = _split(digits)
    trainer.train(train, TrainBudget(epochs=3, batch_size=32), rng=np.random.default_rng(0))
    trainer.export_state()  # exporting syncs the last phase's parameters into the other state
    # both ORT states must now hold identical weights for every parameter
    names = trainer.manifest.shared_names + trainer.manifest.personal_names
    states = list(trainer._backend._sessions.values())
    for n in names:
        np.testing.assert_array_equal(states[0].get(n), states[1].get(n))
    assert trainer.evaluate(test).accuracy > 0.8


@pytest.mark.parametrize("mode", ["fedavg", "fedprox", "fedsim", "fedalt"])
def test_trainer_learns_digits(bundle_factory, install, digits, mode):
    mu = 0.0 if mode in ("fedavg", "fedalt") else 0.001
    trainer = DeviceTrainer(install(bundle_factory(mode, mu=mu, lr=0.01)))
    train, test = _split(digits)
    before = trainer.evaluate(test).accuracy
    trainer.train(train, TrainBudget(epochs=8, batch_size=32), rng=np.random.default_rng(1))
    after = trainer.evaluate(test)
    assert before < 0.3
    assert after.accuracy >= DIGITS_ACCURACY_FLOOR, after
    preds = np.argmax(trainer.predict(test.x), axis=1)
    assert np.mean(preds == test.y) == pytest.approx(after.accuracy)


def test_trainer_sgd_learning_rate_is_settable_at_run_time(bundle_factory, install, digits):
    train, _ = _split(digits)
    deltas = []
    for lr in (0.01, 0.04):
        trainer = DeviceTrainer(install(bundle_factory("fedavg", optimizer="sgd", lr=0.5)))
        trainer.train(train, TrainBudget(epochs=1, batch_size=len(train), learning_rate=lr))
        deltas.append(trainer.shared_delta())
    # one full-batch SGD step from the same weights: the delta scales with the learning rate
    for n in deltas[0]:
        np.testing.assert_allclose(deltas[1][n], 4 * deltas[0][n], rtol=1e-4, atol=1e-7)


def test_trainer_shared_delta_is_relative_to_last_global(bundle_factory, install, digits):
    trainer = DeviceTrainer(install(bundle_factory("fedsim", mu=0.1)))
    rng = np.random.default_rng(0)
    new_global = {n: rng.normal(0, 0.1, v.shape).astype(np.float32) for n, v in trainer.get_shared().items()}
    trainer.set_global(new_global, round_number=4)
    assert trainer.round == 4
    for n, d in trainer.shared_delta().items():
        assert not d.any(), n
    for n, a in trainer.get_anchors().items():
        np.testing.assert_array_equal(a, new_global[n])
    train, _ = _split(digits)
    trainer.train(train, TrainBudget(epochs=1, batch_size=64))
    now = trainer.get_shared()
    for n, d in trainer.shared_delta().items():
        np.testing.assert_allclose(d, now[n] - new_global[n], rtol=0, atol=1e-7)
        assert np.abs(d).max() > 0


def test_trainer_refuses_bad_inputs(bundle_factory, install, digits):
    trainer = DeviceTrainer(install(bundle_factory("fedavg")))
    x, y = digits
    with pytest.raises(TrainingError, match="input shape"):
        trainer.train(ArrayDataSource(x[:, :10], y), TrainBudget(epochs=1))
    with pytest.raises(TrainingError, match="labels must lie"):
        trainer.train(ArrayDataSource(x[:10], np.full(10, 12)), TrainBudget(epochs=1))
    with pytest.raises(ValueError, match="shape"):
        trainer.set_global({n: np.zeros((1,), np.float32) for n in trainer.manifest.shared_names})
    bad = trainer.get_shared()
    first = next(iter(bad))
    bad[first][...] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        trainer.set_global(bad)
    with pytest.raises(TrainingError, match="NaN or Inf"):
        trainer.train(ArrayDataSource(np.full((8, 64), np.nan, np.float32), np.zeros(8, np.int64)), TrainBudget(epochs=1))
    diverging = DeviceTrainer(install(bundle_factory("fedavg", optimizer="sgd")))
    with pytest.raises(TrainingError, match="non-finite"):
        diverging.train(ArrayDataSource(x, y), TrainBudget(epochs=3, batch_size=16, learning_rate=1e30))


def test_trainer_budget_max_steps_caps_partial_work(bundle_factory, install, digits):
    trainer = DeviceTrainer(install(bundle_factory("fedalt")))
    train, _ = _split(digits)
    report = trainer.train(train, TrainBudget(epochs=3, batch_size=32, max_steps=5))
    assert report.phase_steps == {"personal": 5, "shared": 5}
    assert trainer.total_steps == 10


def test_trainer_resumes_from_saved_state(bundle_factory, install, digits, tmp_path):
    bundle = install(bundle_factory("fedalt", mu=0.01))
    train, test = _split(digits)
    first = DeviceTrainer(bundle, state_dir=tmp_path / "state")
    first.set_global(first.get_shared(), round_number=2)
    first.train(train, TrainBudget(epochs=2, batch_size=32), rng=np.random.default_rng(0))
    first.save_state()
    second = DeviceTrainer(bundle, state_dir=tmp_path / "state")
    assert second.round == 2 and second.total_steps == first.total_steps
    for getter in ("get_shared", "get_personal", "get_anchors", "global_reference"):
        a, b = getattr(first, getter), getattr(second, getter)
        a, b = (a() if callable(a) else a), (b() if callable(b) else b)
        assert a.keys() == b.keys()
        for n in a:
            np.testing.assert_array_equal(a[n], b[n], err_msg=f"{getter}:{n}")
    # optimizer moments come back too: one more identical step gives identical weights
    batch = ArrayDataSource(test.x[:32], test.y[:32])
    first.train(batch, TrainBudget(epochs=1, batch_size=32))
    second.train(batch, TrainBudget(epochs=1, batch_size=32))
    for n, v in first.get_shared().items():
        np.testing.assert_allclose(second.get_shared()[n], v, rtol=1e-6, atol=1e-7)
