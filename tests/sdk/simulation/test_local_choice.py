"""The per-device choice against training alone, after federation (real ORT training on digits)."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.bundle.archive import install_bundle
from device_agent.trainer import TrainBudget
from sdk.datasets.digits import load_digits
from sdk.simulation.simulator import FederatedSimulator, SimulationConfig

ROUNDS = 2


@pytest.fixture(scope="module")
def runs(bundle_factory, fleet_key, tmp_path_factory):
    """The local-only run and a FedAvg run (head set) that ends with the choice, on the same data and seed."""
    data = load_digits(num_clients=4, label_skew=0.5, seed=3)
    root = tmp_path_factory.mktemp("local-choice")
    local_bundle = install_bundle(bundle_factory("fedavg", lr=0.01), fleet_key.public_key(), root / "local")
    fedavg = install_bundle(bundle_factory("fedavg", lr=0.01, finetune=("head",)), fleet_key.public_key(), root / "fedavg")
    budget = TrainBudget(epochs=1, batch_size=16)
    local = FederatedSimulator(local_bundle, data, SimulationConfig(rounds=ROUNDS, budget=budget, federated=False)).run()
    plain = FederatedSimulator(fedavg, data, SimulationConfig(rounds=ROUNDS, budget=budget)).run()
    chosen = FederatedSimulator(fedavg, data, SimulationConfig(rounds=ROUNDS, budget=budget, choice_epochs=3),
                                local_bundle=local_bundle).run()
    return local, plain, chosen


def test_the_fallback_is_the_local_only_model_and_the_choice_is_evaluation_only(runs):
    local, plain, chosen = runs
    # the federated run is unchanged by the choice made after it
    assert chosen.final_accuracy == plain.final_accuracy
    assert [r.global_accuracy for r in chosen.rounds] == [r.global_accuracy for r in plain.rounds]
    ensembles = {"local+served", "local+FT(head)", "local+FT(all)", "local+FT(head)+FT(all)"}
    assert set(chosen.candidate_accuracy) == {"FT(head)", "FT(all)", *ensembles}
    assert set(chosen.chosen_model) == set(chosen.chosen_accuracy) == {"ties to local", "ties by loss"}
    names = {"local", "served", "FT(head)", "FT(all)", *ensembles}
    for rule, picked in chosen.chosen_model.items():
        assert set(picked) == set(local.final_accuracy) and set(picked.values()) <= names
        for device, name in picked.items():
            expected = {"local": local.final_accuracy, "served": chosen.final_accuracy}.get(name)
            expected = expected if expected is not None else chosen.candidate_accuracy[name]
            # a device that falls back holds exactly the local-only run's model (same weights, same shuffles)
            assert chosen.chosen_accuracy[rule][device] == expected[device], (rule, device, name)
    # fine-tuning the received model on the device's own data beats the one global model here
    assert np.mean(list(chosen.candidate_accuracy["FT(all)"].values())) > np.mean(list(plain.final_accuracy.values()))


def test_the_choice_needs_the_local_bundle_and_an_averaging_run(bundle_factory, fleet_key, tmp_path):
    data = load_digits(num_clients=2, label_skew=0.5, seed=3)
    bundle = install_bundle(bundle_factory("fedavg", lr=0.01), fleet_key.public_key(), tmp_path / "b")
    with pytest.raises(ValueError, match="local_bundle"):
        FederatedSimulator(bundle, data, SimulationConfig(rounds=1, choice_epochs=2))
    with pytest.raises(ValueError, match="flat averaging runs"):
        SimulationConfig(rounds=1, choice_epochs=2, federated=False)
