"""Ditto on the device trainer: both backends against an independent PyTorch reference, views, and saved state.

Ditto (Li et al., ICML 2021, Algorithm 1): per round the global model takes its
local update (FedAvg, or FedProx with mu) and the personal model v takes its own
steps on F_k(v) + lambda/2 ||v - w_received||^2. The reference runs both tracks
as two independent float32 PyTorch models (tests/device_agent/training_backends/reference.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from device_agent.data import ArrayDataSource
from device_agent.personalization.model_choice import mix_outputs
from device_agent.trainer import DeviceTrainer, ModelView, TrainBudget
from tests.device_agent.training_backends.reference import ReferenceTrainer
from tests.model_bundles import make_data

BACKENDS = ("ort-training", "portable")
CROSS = {"rtol": 1e-5, "atol": 2e-6}
REF = {"rtol": 1e-4, "atol": 2e-5}
CASES = {
    "mlp-adamw-fedavg-base": dict(model="mlp", optimizer="adamw", mu=0.0, ditto_lambda=0.5),
    "cnn1d-sgd-fedprox-base": dict(model="cnn1d", optimizer="sgd", mu=0.2, ditto_lambda=2.0),
}


def _reference(net: torch.nn.Module, names: list[str], *, mu: float, optimizer: str, lr: float,
               params: dict[str, np.ndarray]) -> ReferenceTrainer:
    ref = ReferenceTrainer(net, shared=names, mu=mu, loss="cross_entropy", optimizer=optimizer, lr=lr)
    ref.params = {n: torch.from_numpy(np.array(v)) for n, v in params.items()}
    return ref


def _close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], tol: dict[str, float], what: str) -> None:
    assert sorted(got) == sorted(want), what
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, err_msg=f"{what}: {name}", **tol)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", list(CASES))
def test_ditto_matches_pytorch_on_both_backends(case_id, model_bundle, install):
    case = CASES[case_id]
    path, net = model_bundle(case["model"], "ditto", mu=case["mu"], optimizer=case["optimizer"], ditto_lambda=case["ditto_lambda"])
    bundle = install(path)
    manifest = bundle.manifest
    assert manifest.personal_names == () and manifest.has_anchors
    names = list(manifest.shared_names)
    lr = manifest.hyperparameters.learning_rate
    trainers = {b: DeviceTrainer(bundle, backend=b, threads=1) for b in BACKENDS}
    initial = trainers["portable"].get_shared()
    _close(trainers["ort-training"].get_personal_model(), initial, {"rtol": 0, "atol": 0}, "personal model starts at the initial weights")
    personal_ref = _reference(net, names, mu=case["ditto_lambda"], optimizer=case["optimizer"], lr=lr, params=initial)
    global_ref = _reference(net, names, mu=case["mu"], optimizer=case["optimizer"], lr=lr, params=initial)
    rng = np.random.default_rng(5)
    for round_number in range(2):
        # a received global model away from both tracks, so both proximal terms and their gradients matter
        received = {n: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32) for n, v in initial.items()}
        global_ref.params = {n: torch.from_numpy(v.copy()) for n, v in received.items()}  # AdamW moments carry over
        if case["mu"] > 0:
            global_ref.set_anchors(received)
        personal_ref.set_anchors(received)
        for t in trainers.values():
            t.set_global(received, round_number=round_number)
        for i, batch in enumerate((8, 5)):
            x, y = make_data(case["model"], "cross_entropy", batch, seed=100 * round_number + i)
            step_lr = 0.03 if (round_number, i) == (1, 1) else None
            global_ref.lr = personal_ref.lr = step_lr or lr
            want = [global_ref.step("joint", names, x, y), personal_ref.step("ditto", names, x, y)]
            budget = TrainBudget(epochs=1, batch_size=batch, learning_rate=step_lr)
            reports = {b: t.train(ArrayDataSource(x, y), budget) for b, t in trainers.items()}
            for b, report in reports.items():
                assert report.phase_steps == {"joint": 1, "ditto": 1}, b
                assert report.mean_loss == pytest.approx(np.mean(want), rel=REF["rtol"]), (b, round_number, i)
            _close(trainers["portable"].get_shared(), trainers["ort-training"].get_shared(), CROSS, "global track, backends")
            _close(trainers["portable"].get_personal_model(), trainers["ort-training"].get_personal_model(), CROSS,
                   "personal model, backends")
            _close(trainers["ort-training"].get_shared(), global_ref.numpy_params(), REF, "global track vs PyTorch")
            _close(trainers["ort-training"].get_personal_model(), personal_ref.numpy_params(), REF, "personal model vs PyTorch")
            for t in trainers.values():  # the anchors stay the received model; the delta is the global track's
                _close(t.get_anchors(), received, {"rtol": 0, "atol": 0}, "anchors")
                _close(t.shared_delta(), {n: t.get_shared()[n] - received[n] for n in names}, {"rtol": 0, "atol": 0}, "delta")


def test_ditto_views_mixture_and_serving_weight(bundle_factory, install, digits) -> None:
    x, y = digits
    trainer = DeviceTrainer(install(bundle_factory("ditto", ditto_lambda=0.1)), threads=1)
    data = ArrayDataSource(x[:300], y[:300])
    test = ArrayDataSource(x[300:500], y[300:500])
    trainer.train(data, TrainBudget(epochs=2, personal_epochs=4), rng=np.random.default_rng(0))
    personal = trainer.model_outputs(test, model="personal")[0]
    global_ = trainer.model_outputs(test, model=ModelView.GLOBAL)[0]
    assert not np.allclose(personal, global_)
    # before any choice the device serves its personal model (Ditto's default)
    assert trainer.serving_weight == 1.0
    np.testing.assert_array_equal(trainer.predict(x[300:500]), personal)
    # global = the received reference (here the initial weights), not the locally trained global track
    reference = DeviceTrainer(trainer.bundle, threads=1)
    np.testing.assert_allclose(global_, reference.predict(x[300:500]), rtol=1e-6)
    trainer.set_serving_weight(0.3)
    mixed = mix_outputs(personal, global_, 0.3, trainer.manifest.hyperparameters.loss)
    np.testing.assert_allclose(trainer.predict(x[300:500]), mixed, rtol=1e-5, atol=1e-6)
    report = trainer.evaluate(test)
    assert report.accuracy == pytest.approx(np.mean(np.argmax(mixed, axis=1) == y[300:500]))
    trainer.set_serving_weight(0.0)
    np.testing.assert_array_equal(trainer.predict(x[300:500]), global_)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            trainer.set_serving_weight(bad)
    # evaluating or predicting never disturbs the weights the next round trains from
    before = trainer.get_shared()
    trainer.evaluate(test, model="personal")
    _close(trainer.get_shared(), before, {"rtol": 0, "atol": 0}, "global track after evaluation")


def test_other_modes_have_no_personal_model(bundle_factory, install, digits) -> None:
    x, y = digits
    trainer = DeviceTrainer(install(bundle_factory("fedavg")), threads=1)
    assert not trainer.has_personal_model and trainer.get_personal_model() == {}
    with pytest.raises(ValueError, match="no personal model"):
        trainer.evaluate(ArrayDataSource(x[:20], y[:20]), model="personal")
    with pytest.raises(ValueError, match="no personal model"):
        trainer.set_serving_weight(0.5)
    # served and global are the same model for a fedavg device that has not trained since it received it
    np.testing.assert_array_equal(trainer.predict(x[:20]), trainer.predict(x[:20], model="global"))


@pytest.mark.slow
@pytest.mark.parametrize(("first", "second"), [("ort-training", "portable"), ("portable", "ort-training")])
def test_ditto_state_survives_restart_and_backend_change(first, second, model_bundle, install, tmp_path) -> None:
    path, _ = model_bundle("mlp", "ditto", mu=0.0, optimizer="adamw", ditto_lambda=0.5)
    bundle = install(path)
    data = [make_data("mlp", "cross_entropy", 8, seed=s) for s in range(3)]
    budget = TrainBudget(epochs=1, batch_size=8)
    straight = DeviceTrainer(bundle, backend=first, threads=1)
    saving = DeviceTrainer(bundle, backend=first, threads=1, state_dir=tmp_path / "state")
    for t in (straight, saving):
        for x, y in data[:2]:
            t.train(ArrayDataSource(x, y), budget)
        t.set_serving_weight(0.4)
    saving.save_state()
    resumed = DeviceTrainer(bundle, backend=second, threads=1, state_dir=tmp_path / "state")
    assert resumed.serving_weight == 0.4
    _close(resumed.get_personal_model(), saving.get_personal_model(), {"rtol": 0, "atol": 0}, "personal model")
    saved = saving.export_state().to_arrays()
    assert any(k.startswith("ditto/") for k in saved) and any(k.startswith("opt/ditto/") for k in saved)
    for key, value in resumed.export_state().to_arrays().items():
        np.testing.assert_array_equal(saved[key], value, err_msg=key)
    x, y = data[2]
    assert resumed.train(ArrayDataSource(x, y), budget).mean_loss == pytest.approx(
        straight.train(ArrayDataSource(x, y), budget).mean_loss, rel=CROSS["rtol"])
    _close(resumed.get_personal_model(), straight.get_personal_model(), CROSS, f"{first} -> {second}")
