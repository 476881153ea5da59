"""The device's round steps: train_local_round and FedFomo's candidate combination."""

from __future__ import annotations

import numpy as np

from device_agent.data import ArrayDataSource
from device_agent.local_round import combine_candidates_fomo, train_local_round
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


def test_fomo_combination_pulls_only_towards_helpful_peers(bundle_factory, install, digits):
    x, y = digits
    val = ArrayDataSource(x[1500:], y[1500:])
    device = DeviceTrainer(install(bundle_factory("fedsim")))
    helper = DeviceTrainer(install(bundle_factory("fedsim")))
    helper.train(ArrayDataSource(x[:1400], y[:1400]), TrainBudget(epochs=3, batch_size=32), rng=np.random.default_rng(0))
    good = helper.get_shared()  # trained shared layers: lower loss on this device's validation data
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
