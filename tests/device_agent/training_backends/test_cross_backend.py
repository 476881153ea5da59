"""portable and ort-training held to each other and to a PyTorch reference, step by step.

Tolerances (float32 throughout):
- portable vs ort-training: every parameter within atol 2e-6 + rtol 1e-5 after every
  step, losses within rtol 1e-5. Both run the same float32 arithmetic (portable
  reproduces ORT-training's HF AdamW op by op); what remains is summation order
  inside kernels (measured: <= 1.5e-8 on the MLP after 42 AdamW steps).
- either backend vs the PyTorch reference: atol 2e-5 + rtol 1e-4 on parameters,
  rtol 1e-4 on losses. The reference computes the same maths in textbook order,
  and AdamW divides by sqrt(v) + 1e-6, which magnifies float32 rounding of tiny
  gradients in the first steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from device_agent.data import ArrayDataSource
from device_agent.trainer import DeviceTrainer, TrainBudget
from tests.model_bundles import make_data
from tests.device_agent.training_backends.reference import ReferenceTrainer

BACKENDS = ("ort-training", "portable")
CROSS = {"rtol": 1e-5, "atol": 2e-6}
REF = {"rtol": 1e-4, "atol": 2e-5}
BATCHES = (8, 8, 5)  # the last one odd-sized: the graphs' batch axis is dynamic


@dataclass(frozen=True, kw_only=True)
class Case:
    model: str
    mode: str
    optimizer: str
    loss: str = "cross_entropy"
    mu: float = 0.0
    finetune: tuple[str, ...] = ()
    #: Portable step graphs on slices of this many examples (batches 8, 8, 5: slices 3, 3, 2 and 3, 2).
    micro_batch: int = 0


CASES = {
    "mlp-fedprox-sgd-ce": Case(model="mlp", mode="fedprox", optimizer="sgd", mu=0.5),
    "mlp-fedalt-adamw-ce": Case(model="mlp", mode="fedalt", optimizer="adamw", mu=0.1),
    "mlp-fedavg-adamw-mse-finetune": Case(model="mlp", mode="fedavg", optimizer="adamw", loss="mse", finetune=("head",)),
    "mlp-fedsim-sgd-bce": Case(model="mlp", mode="fedsim", optimizer="sgd", loss="bce_with_logits", mu=0.2),
    "mlpwide-fedalt-adamw-ce": Case(model="mlp-wide", mode="fedalt", optimizer="adamw", mu=0.1),
    "cnn1d-fedalt-adamw-ce": Case(model="cnn1d", mode="fedalt", optimizer="adamw", mu=0.1),  # the bundle of test_mainstream_onnxruntime
    "cnn2d-fedavg-adamw-ce": Case(model="cnn2d", mode="fedavg", optimizer="adamw"),
    "mlp-fedprox-sgd-ce-micro": Case(model="mlp", mode="fedprox", optimizer="sgd", mu=0.5, micro_batch=3),
    "mlpwide-fedalt-adamw-ce-micro": Case(model="mlp-wide", mode="fedalt", optimizer="adamw", mu=0.1, micro_batch=3),
    "cnn2d-fedavg-adamw-ce-micro": Case(model="cnn2d", mode="fedavg", optimizer="adamw", micro_batch=3),
}


def _phases(case: Case, manifest) -> list[tuple[str, list[str]]]:
    if case.mode == "fedalt":
        return [("personal", list(manifest.personal_names)), ("shared", list(manifest.shared_names))]
    return [("joint", list(manifest.shared_names + manifest.personal_names))]


def _params(trainer: DeviceTrainer) -> dict[str, np.ndarray]:
    return {**trainer.get_shared(), **trainer.get_personal()}


def _assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], tol: dict[str, float], what: str) -> None:
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, err_msg=f"{what}: {name}", **tol)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", list(CASES))
def test_backends_match_each_other_and_pytorch_step_by_step(case_id, model_bundle, install):
    case = CASES[case_id]
    path, net = model_bundle(case.model, case.mode, mu=case.mu, optimizer=case.optimizer, loss=case.loss, finetune=case.finetune,
                             micro_batch=case.micro_batch)
    bundle = install(path)
    trainers = {b: DeviceTrainer(bundle, backend=b, threads=1) for b in BACKENDS}
    manifest = bundle.manifest
    ref = ReferenceTrainer(net, shared=list(manifest.shared_names), mu=case.mu, loss=case.loss, optimizer=case.optimizer,
                           lr=manifest.hyperparameters.learning_rate)
    _assert_close(_params(trainers["portable"]), ref.numpy_params(), {"rtol": 0, "atol": 0}, "initial weights")
    if case.mu > 0:  # anchors away from the weights, so the FedProx term and its gradient matter
        rng = np.random.default_rng(1)
        anchors = {n: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32) for n, v in trainers["portable"].get_shared().items()}
        for t in trainers.values():
            t.set_anchors(anchors)
        ref.set_anchors(anchors)
    for i, batch in enumerate(BATCHES):
        x, y = make_data(case.model, case.loss, batch, seed=10 + i)
        lr = 0.03 if i == len(BATCHES) - 1 else None  # the learning rate set at run time for the last step
        ref.lr = lr or manifest.hyperparameters.learning_rate
        ref_losses = [ref.step(name, trainable, x, y) for name, trainable in _phases(case, manifest)]
        budget = TrainBudget(epochs=1, batch_size=batch, learning_rate=lr)
        reports = {b: t.train(ArrayDataSource(x, y), budget) for b, t in trainers.items()}
        for b, report in reports.items():
            assert report.mean_loss == pytest.approx(np.mean(ref_losses), rel=REF["rtol"]), (b, i)
        assert reports["portable"].mean_loss == pytest.approx(reports["ort-training"].mean_loss, rel=CROSS["rtol"])
        ort, portable = _params(trainers["ort-training"]), _params(trainers["portable"])
        _assert_close(portable, ort, CROSS, f"step {i}: portable vs ort-training")
        _assert_close(ort, ref.numpy_params(), REF, f"step {i}: ort-training vs PyTorch")
    if case.finetune:
        ref.lr = manifest.hyperparameters.learning_rate
        x, y = make_data(case.model, case.loss, 8, seed=99)
        tuned = list(trainers["portable"].fine_tune_names)
        ref_loss = ref.step("finetune", tuned, x, y)
        for t in trainers.values():
            assert t.fine_tune(ArrayDataSource(x, y), TrainBudget(epochs=1, batch_size=8)).mean_loss == pytest.approx(ref_loss, rel=REF["rtol"])
        _assert_close(_params(trainers["portable"]), _params(trainers["ort-training"]), CROSS, "finetune")
        _assert_close(_params(trainers["portable"]), ref.numpy_params(), REF, "finetune vs PyTorch")
    # evaluation and prediction agree too (eval loss includes the FedProx term)
    x, y = make_data(case.model, case.loss, 11, seed=7)
    evals = {b: t.evaluate(ArrayDataSource(x, y)) for b, t in trainers.items()}
    assert evals["portable"].loss == pytest.approx(evals["ort-training"].loss, rel=CROSS["rtol"])
    assert evals["portable"].accuracy == evals["ort-training"].accuracy
    np.testing.assert_allclose(trainers["portable"].predict(x), trainers["ort-training"].predict(x), **CROSS)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "mlp-wide"])  # mlp-wide: a parameter with its own moments on portable
@pytest.mark.parametrize(("first", "second"), [("ort-training", "portable"), ("portable", "ort-training")])
def test_saved_state_resumes_on_the_other_backend(first, second, model, model_bundle, install, tmp_path):
    """Personal head, anchors and both phases' AdamW moments survive a change of backend."""
    path, _ = model_bundle(model, "fedalt", mu=0.1, optimizer="adamw")
    bundle = install(path)
    data = [make_data(model, "cross_entropy", 8, seed=s) for s in range(3)]
    budget = TrainBudget(epochs=1, batch_size=8)
    straight = DeviceTrainer(bundle, backend=first, threads=1)
    saving = DeviceTrainer(bundle, backend=first, threads=1, state_dir=tmp_path / "state")
    rng = np.random.default_rng(3)
    anchors = {n: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32) for n, v in straight.get_shared().items()}
    for t in (straight, saving):
        t.set_anchors(anchors)
        for x, y in data[:2]:
            t.train(ArrayDataSource(x, y), budget)
    saving.round = 4
    saving.save_state()
    resumed = DeviceTrainer(bundle, backend=second, threads=1, state_dir=tmp_path / "state")
    assert resumed.backend_name.value == second and resumed.round == 4
    _assert_close(resumed.get_anchors(), anchors, {"rtol": 0, "atol": 0}, "anchors")
    before = resumed.export_state().to_arrays()
    for key, value in saving.export_state().to_arrays().items():
        np.testing.assert_array_equal(before[key], value, err_msg=key)  # moments and step counters included
    x, y = data[2]
    want = straight.train(ArrayDataSource(x, y), budget).mean_loss
    assert resumed.train(ArrayDataSource(x, y), budget).mean_loss == pytest.approx(want, rel=CROSS["rtol"])
    _assert_close(_params(resumed), _params(straight), CROSS, f"{first} -> {second}")
    steps = resumed.export_state().optimizers
    assert {s.value: o.step for s, o in steps.items()} == {"personal": 3, "shared": 3}


def test_fresh_state_is_identical_on_both_backends(model_bundle, install):
    path, _ = model_bundle("mlp", "fedalt", mu=0.1, optimizer="adamw")
    bundle = install(path)
    states = [DeviceTrainer(bundle, backend=b).export_state().to_arrays() for b in BACKENDS]
    assert sorted(states[0]) == sorted(states[1])
    for key in states[0]:
        np.testing.assert_array_equal(states[0][key], states[1][key], err_msg=key)
