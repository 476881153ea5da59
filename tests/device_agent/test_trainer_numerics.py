"""ORT training steps agree with a PyTorch reference of the same objective."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from device_agent.bundle.archive import install_bundle
from device_agent.data import ArrayDataSource
from device_agent.trainer import DeviceTrainer, TrainBudget
from sdk.artifacts import TrainingSpec
from sdk.bundle_builder import build_bundle
from sdk.model_spec import ParameterSplit
from sdk.models import BASE_HEAD_SPLIT, PersonalizedMLP

MU = 0.5
LR = 0.1


def _task_loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "cross_entropy":
        return F.cross_entropy(out, y)
    if kind == "mse":
        return F.mse_loss(out, y)
    return F.binary_cross_entropy_with_logits(out, y)


def _objective(model: torch.nn.Module, x, y, kind: str, shared: list[str], anchors: dict[str, np.ndarray]) -> torch.Tensor:
    params = dict(model.named_parameters())
    prox = sum(((params[n] - torch.from_numpy(anchors[n])) ** 2).sum() for n in shared)
    return _task_loss(kind, model(x), y) + MU / 2 * prox


def _sgd_step(model: torch.nn.Module, loss: torch.Tensor, names: list[str]) -> None:
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in names:
                p -= LR * p.grad


def _setup(tmp_path, fleet_key, mode: str, loss: str):
    torch.manual_seed(3)
    model = PersonalizedMLP(20, (16,), 4)
    split = BASE_HEAD_SPLIT if mode in ("fedsim", "fedalt") else ParameterSplit(shared=("*",))
    build_bundle(model, example_input=torch.zeros(2, 20), split=split,
                 spec=TrainingSpec(mode=mode, mu=MU, optimizer="sgd", learning_rate=LR, loss=loss),
                 signing_key=fleet_key, out_path=tmp_path / "b.fedge", model_name="num")
    trainer = DeviceTrainer(install_bundle(tmp_path / "b.fedge", fleet_key.public_key(), tmp_path / "inst"))
    rng = np.random.default_rng(7)
    anchors = {n: (v + rng.normal(0, 0.2, v.shape)).astype(np.float32) for n, v in trainer.get_shared().items()}
    trainer.set_anchors(anchors)
    x = rng.normal(size=(24, 20)).astype(np.float32)
    if loss == "cross_entropy":
        y = rng.integers(0, 4, 24).astype(np.int64)
    elif loss == "mse":
        y = rng.normal(size=(24, 4)).astype(np.float32)
    else:
        y = rng.integers(0, 2, (24, 4)).astype(np.float32)
    return model, trainer, anchors, x, y


def _assert_params_match(model: torch.nn.Module, trainer: DeviceTrainer) -> None:
    ort_params = {**trainer.get_shared(), **trainer.get_personal()}
    for n, p in model.named_parameters():
        np.testing.assert_allclose(ort_params[n], p.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=n)


@pytest.mark.parametrize(("mode", "loss"), [("fedprox", "cross_entropy"), ("fedsim", "cross_entropy"),
                                            ("fedprox", "mse"), ("fedprox", "bce_with_logits")])
def test_trainer_one_fedprox_sgd_step_matches_pytorch(tmp_path, fleet_key, mode, loss):
    model, trainer, anchors, x, y = _setup(tmp_path, fleet_key, mode, loss)
    ref = copy.deepcopy(model)
    _assert_params_match(ref, trainer)  # same starting point
    shared = list(trainer.manifest.shared_names)
    ref_loss = _objective(ref, torch.from_numpy(x), torch.from_numpy(y), loss, shared, anchors)
    _sgd_step(ref, ref_loss, [n for n, _ in ref.named_parameters()])

    report = trainer.train(ArrayDataSource(x, y), TrainBudget(epochs=1, batch_size=len(x)))

    assert report.steps == 1
    assert report.mean_loss == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    _assert_params_match(ref, trainer)
    # the anchors are constants of the graph: a step must not move them
    for n, a in trainer.get_anchors().items():
        np.testing.assert_array_equal(a, anchors[n])


def test_trainer_fedalt_sgd_phases_match_pytorch(tmp_path, fleet_key):
    model, trainer, anchors, x, y = _setup(tmp_path, fleet_key, "fedalt", "cross_entropy")
    ref = copy.deepcopy(model)
    shared = list(trainer.manifest.shared_names)
    personal = list(trainer.manifest.personal_names)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    first = _objective(ref, xt, yt, "cross_entropy", shared, anchors)
    _sgd_step(ref, first, personal)  # head phase: shared frozen
    second = _objective(ref, xt, yt, "cross_entropy", shared, anchors)
    _sgd_step(ref, second, shared)  # shared phase: head frozen, evaluated with the new head

    report = trainer.train(ArrayDataSource(x, y), TrainBudget(epochs=1, batch_size=len(x)))

    assert report.phase_steps == {"personal": 1, "shared": 1}
    assert report.mean_loss == pytest.approx((first.item() + second.item()) / 2, rel=1e-5)
    _assert_params_match(ref, trainer)


def test_trainer_eval_loss_reacts_to_anchors(tmp_path, fleet_key):
    _, trainer, anchors, x, y = _setup(tmp_path, fleet_key, "fedprox", "cross_entropy")
    data = ArrayDataSource(x, y)
    far = trainer.evaluate(data).loss
    trainer.set_anchors(trainer.get_shared())
    near = trainer.evaluate(data).loss
    gap = sum(float(((trainer.get_shared()[n] - anchors[n]) ** 2).sum()) for n in anchors)
    assert far - near == pytest.approx(MU / 2 * gap, rel=1e-4)
