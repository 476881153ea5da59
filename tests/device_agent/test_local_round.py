"""The device's round steps: train_local_round, FedFomo's candidate combination, fine-tuning with early stopping."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.data import ArrayDataSource
from device_agent.local_round import combine_candidates_fomo, fine_tune_early_stopped, train_local_round
from device_agent.personalization.model_select import best_index
from device_agent.trainer import DeviceTrainer, TrainBudget


def test_local_round_delta_is_relative_to_received_global(bundle_factory, install, digits):
    x, y = digits
    trainer = DeviceTrainer(install(bundle_factory("fedprox", mu=0.01)))
    rng = np.random.default_rng(0)
    received = {n: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for n, v in trainer.get_shared().items()}
    update = train_local_round(trainer, ArrayDataSource(x[:256], y[:256]), global_params=received, round_number=7,
                               budget=TrainBudget(epochs=1, batch_size=32))
    assert update.round_number == 7 and trainer.round == 7 and update.num_examples == 256
    now = trainer.get_shared()
    for n in now:
        np.testing.assert_allclose(update.delta[n], now[n] - received[n], atol=1e-7)


def _device_and_helpful_peer(bundle_factory, install, digits):
    """A fresh fedsim device, its validation data, and a peer's trained shared layers (lower loss on that data)."""
    x, y = digits
    device = DeviceTrainer(install(bundle_factory("fedsim")))
    helper = DeviceTrainer(install(bundle_factory("fedsim")))
    helper.train(ArrayDataSource(x[:1400], y[:1400]), TrainBudget(epochs=3, batch_size=32), rng=np.random.default_rng(0))
    return device, ArrayDataSource(x[1500:], y[1500:]), helper.get_shared()


def test_fomo_combination_pulls_only_towards_helpful_peers(bundle_factory, install, digits):
    device, val, good = _device_and_helpful_peer(bundle_factory, install, digits)
    own = device.get_shared()
    bad = {n: (v + 5.0).astype(np.float32) for n, v in own.items()}  # wrecked shared layers

    update = combine_candidates_fomo(device, [bad, good], val, round_number=1)

    assert update.weights[0] == 0 and update.weights[1] == 1.0
    for n, v in device.get_shared().items():
        np.testing.assert_allclose(v, good[n], atol=1e-6)  # one helpful peer: move all the way to it
        np.testing.assert_array_equal(device.global_reference[n], v)  # and it is the round's reference

    worse_only = combine_candidates_fomo(device, [bad], val, round_number=2)
    assert worse_only.kept_own
    for n, v in device.get_shared().items():
        np.testing.assert_allclose(v, good[n], atol=1e-6)


def test_fomo_combination_keep_reference_leaves_the_served_model_as_reference(bundle_factory, install, digits):
    device, val, good = _device_and_helpful_peer(bundle_factory, install, digits)
    served = {n: (v + 0.01).astype(np.float32) for n, v in device.get_shared().items()}
    device.set_global(served, round_number=4)

    update = combine_candidates_fomo(device, [good], val, round_number=4, keep_reference=True)

    assert update.weights[0] == 1.0 and device.round == 4
    delta = device.shared_delta()
    for n, v in device.get_shared().items():
        np.testing.assert_allclose(v, good[n], atol=1e-6)  # the combination is the model now
        np.testing.assert_array_equal(device.global_reference[n], served[n])  # but deltas stay against S_r
        np.testing.assert_allclose(delta[n], good[n] - served[n], atol=1e-6)


def test_local_round_of_a_ditto_device_chooses_what_it_serves_on_validation(bundle_factory, install, digits):
    from device_agent.personalization.model_choice import choose_mixture
    from device_agent.trainer import ModelView

    x, y = digits
    trainer = DeviceTrainer(install(bundle_factory("ditto", ditto_lambda=0.1)), threads=1)
    val = ArrayDataSource(x[1500:1600], y[1500:1600])
    update = train_local_round(trainer, ArrayDataSource(x[:300], y[:300]), global_params=trainer.get_shared(), round_number=0,
                               budget=TrainBudget(epochs=2), rng=np.random.default_rng(0), validation=val)
    personal = trainer.model_outputs(val, model=ModelView.PERSONAL)[0]
    global_ = trainer.model_outputs(val, model=ModelView.GLOBAL)[0]
    want = choose_mixture(personal, global_, y[1500:1600], trainer.manifest.hyperparameters.loss)
    assert update.choice is not None and update.choice.alpha == want.alpha == trainer.serving_weight
    assert update.choice.accuracy == want.accuracy and len(update.choice.candidates) == 11
    # the choice is about what the device serves: the delta it sends is its global track's alone
    now = trainer.get_shared()
    for n, d in update.delta.items():
        np.testing.assert_array_equal(d, now[n] - trainer.global_reference[n])


def test_local_round_makes_no_choice_without_a_personal_model_or_validation(bundle_factory, install, digits):
    x, y = digits
    data, val = ArrayDataSource(x[:64], y[:64]), ArrayDataSource(x[1500:1550], y[1500:1550])
    fedavg = DeviceTrainer(install(bundle_factory("fedavg")), threads=1)
    assert train_local_round(fedavg, data, global_params=None, round_number=0, budget=TrainBudget(), validation=val).choice is None
    ditto = DeviceTrainer(install(bundle_factory("ditto", ditto_lambda=0.1)), threads=1)
    assert train_local_round(ditto, data, global_params=None, round_number=0, budget=TrainBudget()).choice is None
    assert ditto.serving_weight == 1.0


def test_early_stopped_fine_tuning_keeps_the_best_validation_epoch(bundle_factory, install, digits):
    x, y = digits
    trainer = DeviceTrainer(install(bundle_factory("fedavg", finetune=("head",))))
    train, val = ArrayDataSource(x[:300], y[:300]), ArrayDataSource(x[1500:1600], y[1500:1600])
    received = trainer.get_shared()
    before = trainer.evaluate(val)

    stopped = fine_tune_early_stopped(trainer, train, val, scope="all", max_epochs=6, patience=2,
                                      rng=np.random.default_rng(0))

    assert 1 <= stopped.epochs <= stopped.trained <= 6 and len(stopped.scores) == stopped.trained + 1
    assert best_index(stopped.scores) == stopped.epochs
    assert stopped.trained == 6 or stopped.trained - stopped.epochs == 2  # stopped by patience, or at the cap
    assert stopped.score.accuracy > before.accuracy  # an untrained model: training helps on the same digits
    now = trainer.evaluate(val)
    assert (now.accuracy, now.loss) == pytest.approx((stopped.score.accuracy, stopped.score.loss))
    # anchors and the delta reference are the received model's still
    for n, v in trainer.global_reference.items():
        np.testing.assert_array_equal(v, received[n])


def test_early_stopping_keeps_the_received_model_when_no_epoch_beats_it(bundle_factory, install, digits):
    x, y = digits
    trainer = DeviceTrainer(install(bundle_factory("fedavg", finetune=("head",))))
    trainer.train(ArrayDataSource(x[:1000], y[:1000]), TrainBudget(epochs=3, batch_size=32), rng=np.random.default_rng(1))
    held = trainer.get_shared()
    # validation: examples the model already gets right; training labels that contradict them
    right = np.flatnonzero(np.argmax(trainer.predict(x[:1000]), axis=1) == y[:1000])[:100]
    val = ArrayDataSource(x[right], y[right])
    train = ArrayDataSource(x[right], (y[right] + 1) % 10)

    stopped = fine_tune_early_stopped(trainer, train, val, scope="all", max_epochs=10, patience=2,
                                      rng=np.random.default_rng(0))

    assert (stopped.epochs, stopped.trained) == (0, 2), stopped.scores
    assert best_index(stopped.scores) == 0
    for n, v in trainer.get_shared().items():
        np.testing.assert_array_equal(v, held[n])


def test_early_stopping_refuses_what_it_cannot_do(bundle_factory, install, digits):
    x, y = digits
    data = ArrayDataSource(x[:64], y[:64])
    fedavg = DeviceTrainer(install(bundle_factory("fedavg", finetune=("head",))))
    with pytest.raises(ValueError, match="validation data"):
        fine_tune_early_stopped(fedavg, data, ArrayDataSource(x[:0], y[:0]), scope="head", max_epochs=2)
    ditto = DeviceTrainer(install(bundle_factory("ditto", ditto_lambda=0.1)))
    with pytest.raises(ValueError, match="scope 'all'"):
        fine_tune_early_stopped(ditto, data, data, scope="all", max_epochs=2)


def test_early_stopping_fine_tunes_from_fresh_moments_and_leaves_the_devices_own(bundle_factory, install, digits):
    x, y = digits
    bundle = install(bundle_factory("fedavg", finetune=("head",)))
    train, val = ArrayDataSource(x[:200], y[:200]), ArrayDataSource(x[1500:1600], y[1500:1600])

    def trained() -> DeviceTrainer:
        t = DeviceTrainer(bundle, threads=1)
        t.train(ArrayDataSource(x[200:600], y[200:600]), TrainBudget(epochs=2, batch_size=32), rng=np.random.default_rng(5))
        t.fine_tune(train, TrainBudget(epochs=2, batch_size=32), rng=np.random.default_rng(6))  # moments of another start
        t.set_global(t.get_shared())
        return t

    device, stale = trained(), trained()
    kept = device.export_state().optimizers
    twin = DeviceTrainer(bundle, threads=1)  # never trained: zero moments
    twin.set_global(device.get_shared())
    runs = {}
    for name, t, fresh in (("device", device, True), ("twin", twin, True), ("stale", stale, False)):
        runs[name] = fine_tune_early_stopped(t, train, val, scope="head", max_epochs=3, patience=3, fresh_optimizer=fresh,
                                             rng=np.random.default_rng(0))
    assert [s.loss for s in runs["device"].scores] == pytest.approx([s.loss for s in runs["twin"].scores], rel=1e-5)
    assert [s.loss for s in runs["stale"].scores][1:] != pytest.approx([s.loss for s in runs["twin"].scores][1:], rel=1e-5)
    after = device.export_state().optimizers
    assert all(after[s].step == kept[s].step and all(np.array_equal(after[s].m[n], kept[s].m[n]) for n in kept[s].m) for s in kept)
