"""The simulator makes a validation split where the data has none (for every algorithm) and counts FedFomo's kept-own steps."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.bundle.archive import install_bundle
from device_agent.trainer import TrainBudget
from sdk.datasets import load_digits
from sdk.simulation.results import RoundMetrics, SimulationResult
from sdk.simulation.simulator import FederatedSimulator, SimulationConfig


@pytest.fixture(scope="module")
def digits_without_val():
    return load_digits(num_clients=5, label_skew=0.5, seed=2, val_fraction=0.0)


def _sim(bundle_factory, fleet_key, path, data, mode, **config):
    bundle = install_bundle(bundle_factory(mode, lr=0.01, hidden=(32,)), fleet_key.public_key(), path)
    return FederatedSimulator(bundle, data, SimulationConfig(rounds=config.pop("rounds", 3), seed=0,
                                                             budget=TrainBudget(epochs=1, batch_size=16), **config))


def test_fedfomo_runs_on_data_without_validation_and_every_method_trains_on_the_same_examples(
        bundle_factory, fleet_key, tmp_path, digits_without_val):
    assert all(len(c.val) == 0 for c in digits_without_val.clients)
    fomo = _sim(bundle_factory, fleet_key, tmp_path / "fomo", digits_without_val, "fedsim", fomo_candidates=2)
    avg = _sim(bundle_factory, fleet_key, tmp_path / "avg", digits_without_val, "fedavg")
    for sim in (fomo, avg):
        for before, after in zip(digits_without_val.clients, sim.dataset.clients):
            expected = max(1, len(before.train) // 10)
            assert (len(after.val), len(after.train)) == (expected, len(before.train) - expected)
    for a, b in zip(fomo.dataset.clients, avg.dataset.clients):
        np.testing.assert_array_equal(a.train.x, b.train.x)
    result = fomo.run()
    assert result.validation is not None and set(result.validation.held_out) == {c.client_id for c in digits_without_val.clients}
    assert "no client came with a validation split" in result.validation.describe()


def test_simulator_without_a_validation_split_refuses_fedfomo_when_asked_to_make_none(
        bundle_factory, fleet_key, tmp_path, digits_without_val):
    with pytest.raises(ValueError, match="FedFomo needs a validation split"):
        _sim(bundle_factory, fleet_key, tmp_path, digits_without_val, "fedsim", fomo_candidates=2, validation_fraction=0.0)


def test_fedfomo_counts_when_no_peer_helps(bundle_factory, fleet_key, tmp_path):
    """Round 0, first device: every upload is still the common initial model, so no peer can help and it keeps its own."""
    data = load_digits(num_clients=5, label_skew=0.5, seed=2)
    result = _sim(bundle_factory, fleet_key, tmp_path, data, "fedsim", fomo_candidates=2, rounds=4).run()
    ids = tuple(c.client_id for c in data.clients)
    first = result.rounds[0]
    assert first.fomo_combined == ids and first.fomo_kept_own[0] == ids[0]
    assert all(set(r.fomo_kept_own) <= set(r.fomo_combined) for r in result.rounds)
    kept = sum(len(r.fomo_kept_own) for r in result.rounds)
    assert 1 <= kept < 4 * len(ids)  # once peers have trained, they help somebody
    rates = result.fomo_kept_own_rate
    assert set(rates) == set(ids) and rates[ids[0]] >= 0.25 and all(0.0 <= v <= 1.0 for v in rates.values())
    assert result.fomo_kept_own_overall == pytest.approx(sum(len(r.fomo_kept_own) for r in result.rounds) / (4 * len(ids)))
    doc = result.to_json_dict()
    assert doc["fomo_kept_own"]["per_device"] == rates and doc["rounds"][0]["fomo_kept_own"] == list(first.fomo_kept_own)


def _round(n: int, combined: tuple[str, ...], kept: tuple[str, ...]) -> RoundMetrics:
    return RoundMetrics(round_number=n, selected=combined, aggregated=combined, dropped={}, personalised_accuracy={"a": 1.0},
                        mean_accuracy=1.0, pooled_accuracy=1.0, global_accuracy={}, regional_accuracy={}, bytes_up_per_device=0,
                        bytes_down_per_device=0, seconds=0.0, fomo_combined=combined, fomo_kept_own=kept)


def test_kept_own_rates_are_per_device_shares_of_combine_steps() -> None:
    rounds = (_round(0, ("a", "b"), ("a", "b")), _round(1, ("a", "b"), ("b",)), _round(2, ("a",), ()), _round(3, ("b",), ("b",)))
    result = SimulationResult(rounds=rounds, final_accuracy={"a": 1.0}, global_params={})
    assert result.fomo_kept_own_rate == {"a": pytest.approx(1 / 3), "b": 1.0}
    assert result.fomo_kept_own_overall == pytest.approx(4 / 6)
    plain = SimulationResult(rounds=(_round(0, (), ()),), final_accuracy={"a": 1.0}, global_params={})
    assert plain.fomo_kept_own_rate == {} and plain.fomo_kept_own_overall is None
