"""Ditto in the simulator, resumable checkpoints, and newcomers joining a running fleet (real ORT training on digits)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from device_agent.bundle.archive import install_bundle
from device_agent.trainer import TrainBudget
from sdk.datasets.digits import load_digits
from sdk.simulation.checkpoint import SimulationCheckpoint
from sdk.simulation.cold_start import ColdStartConfig, newcomer_indices
from sdk.simulation.simulator import FederatedSimulator, SimulationConfig


#: Every test here trains from one of three bundles, each built once per run and shared with other
#: modules (bundle building, not the simulation, is what costs): FedAvg with a head set (cold start needs
#: it; its joint training is plain FedAvg's), Ditto and FedAlt, all from the same initial weights.
FEDAVG = {"mode": "fedavg", "finetune": ("head",)}
BUNDLES = {"fedavg": FEDAVG, "ditto": {"mode": "ditto", "ditto_lambda": 0.1}, "fedalt": {"mode": "fedalt"}}
ROUNDS = 4


@pytest.fixture(scope="module")
def skewed_digits():
    return load_digits(num_clients=5, label_skew=0.5, seed=3)


def _run(bundle_factory, fleet_key, path, data, bundle, *, rounds=3, checkpoint=None, newcomers=(), cold_start=None):
    installed = install_bundle(bundle_factory(lr=0.01, **bundle), fleet_key.public_key(), path)
    config = SimulationConfig(rounds=rounds, budget=TrainBudget(epochs=1, batch_size=16), seed=0, cold_start=cold_start)
    return FederatedSimulator(installed, data, config, checkpoint=checkpoint, newcomers=newcomers).run()


@pytest.fixture(scope="module")
def straight_runs(bundle_factory, fleet_key, tmp_path_factory, skewed_digits):
    """mode -> the uninterrupted ROUNDS-round run, simulated once for the whole module."""
    root = tmp_path_factory.mktemp("straight")
    return {mode: _run(bundle_factory, fleet_key, root / mode, skewed_digits, bundle, rounds=ROUNDS)
            for mode, bundle in BUNDLES.items()}


def test_ditto_global_track_is_fedavg_and_devices_record_their_choice(straight_runs, skewed_digits):
    fedavg, ditto = straight_runs["fedavg"], straight_runs["ditto"]
    # Ditto's global model trains exactly as FedAvg does (same initial weights, same shuffles, mu = 0)
    for name, value in fedavg.global_params.items():
        np.testing.assert_array_equal(ditto.global_params[name], value)
    for ours, theirs in zip(ditto.rounds, fedavg.rounds, strict=True):
        assert ours.global_accuracy == theirs.global_accuracy
    last = ditto.rounds[-1]
    assert set(last.serving_weight) == set(last.personal_model_accuracy) == {c.client_id for c in skewed_digits.clients}
    assert all(0.0 <= w <= 1.0 for w in last.serving_weight.values())
    # personalisation helps on label-skewed clients: the personal models beat the one global model
    assert np.mean(list(last.personal_model_accuracy.values())) > np.mean(list(last.global_accuracy.values()))
    assert fedavg.rounds[-1].serving_weight == {} and fedavg.rounds[-1].personal_model_accuracy == {}


@pytest.mark.parametrize("mode", ["ditto", "fedalt"])
def test_a_resumed_run_gives_the_numbers_of_an_uninterrupted_one(bundle_factory, fleet_key, tmp_path, skewed_digits,
                                                                 straight_runs, mode):
    straight = straight_runs[mode]
    ckpt = SimulationCheckpoint(tmp_path / "ckpt", every=2)
    first = _run(bundle_factory, fleet_key, tmp_path / "first", skewed_digits, BUNDLES[mode], rounds=ROUNDS - 1, checkpoint=ckpt)
    assert json.loads((tmp_path / "ckpt" / "progress.json").read_text()) == {"round": 2}
    assert len((tmp_path / "ckpt" / "rounds.jsonl").read_text().splitlines()) == ROUNDS - 1
    resumed = _run(bundle_factory, fleet_key, tmp_path / "second", skewed_digits, BUNDLES[mode], rounds=ROUNDS,
                   checkpoint=SimulationCheckpoint(tmp_path / "ckpt", every=2))
    assert [r.personalised_accuracy for r in resumed.rounds] == [r.personalised_accuracy for r in straight.rounds]
    assert resumed.rounds[:ROUNDS - 1] == first.rounds
    for name, value in straight.global_params.items():
        np.testing.assert_array_equal(resumed.global_params[name], value)


def test_compressed_runs_are_not_checkpointed(bundle_factory, fleet_key, tmp_path, skewed_digits):
    from device_agent.compression import CompressionSpec

    installed = install_bundle(bundle_factory(lr=0.01, **FEDAVG), fleet_key.public_key(), tmp_path / "x")
    config = SimulationConfig(rounds=1, seed=0, compression=CompressionSpec.parse("q8"))
    with pytest.raises(ValueError, match="error-feedback residuals are not saved"):
        FederatedSimulator(installed, skewed_digits, config, checkpoint=SimulationCheckpoint(tmp_path / "ckpt", every=1))


def test_a_checkpoint_with_devices_ahead_of_the_commit_starts_over(bundle_factory, fleet_key, tmp_path, skewed_digits):
    ckpt = SimulationCheckpoint(tmp_path / "ckpt", every=1)
    _run(bundle_factory, fleet_key, tmp_path / "a", skewed_digits, FEDAVG, rounds=2, checkpoint=ckpt)
    # a crash after one device saved round 2 but before the commit: that device is ahead of progress.json
    (tmp_path / "ckpt" / "progress.json").write_text(json.dumps({"round": 0}))
    ids = [c.client_id for c in skewed_digits.clients]
    assert SimulationCheckpoint(tmp_path / "ckpt").committed_round(ids) is None
    assert not (tmp_path / "ckpt" / "devices").exists() and not (tmp_path / "ckpt" / "rounds.jsonl").exists()


def test_newcomers_join_with_a_few_examples_and_are_compared_with_local_only(bundle_factory, fleet_key, tmp_path):
    data = load_digits(num_clients=6, label_skew=0.5, seed=3)
    fleet = type(data)(name=data.name, clients=data.clients[:4], input_shape=data.input_shape, num_classes=data.num_classes,
                       description=data.description)
    newcomers = data.clients[4:]
    config = ColdStartConfig(join_rounds=(1, 3), samples=(10, 40), head_epochs=3, local_epochs=6, batch_size=16)
    result = _run(bundle_factory, fleet_key, tmp_path / "fleet", fleet, FEDAVG, newcomers=newcomers, cold_start=config)
    joined = result.cold_start
    assert len(joined) == 2 * len(newcomers) * 2  # join rounds x newcomers x sample sizes
    assert {(j.join_round, j.samples) for j in joined} == {(1, 10), (1, 40), (3, 10), (3, 40)}
    for j in joined:
        assert j.zero_shot is not None and j.local is not None and 0.0 <= j.fleet <= 1.0
    # local-only does not depend on when the device joins: trained once per newcomer and sample size, same examples
    local = {(j.device, j.samples): j.local for j in joined if j.join_round == 1}
    assert all(local[(j.device, j.samples)] == j.local for j in joined)
    a, b = newcomer_indices(100, 10, seed=0, index=1), newcomer_indices(100, 10, seed=0, index=1)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 10 and newcomer_indices(5, 10, seed=0, index=1).tolist() == [0, 1, 2, 3, 4]
    # the fleet improves between round 1 and round 3, and so does the newcomer that starts from it
    zero = {r: np.mean([j.zero_shot for j in joined if j.join_round == r]) for r in (1, 3)}
    assert zero[3] > zero[1]


def test_cold_start_needs_a_head_set_and_an_averaging_fleet(bundle_factory, fleet_key, tmp_path, skewed_digits):
    config = ColdStartConfig(join_rounds=(1,))
    with pytest.raises(ValueError, match="finetune"):
        _run(bundle_factory, fleet_key, tmp_path / "x", skewed_digits, BUNDLES["fedalt"], rounds=1,
             newcomers=skewed_digits.clients[:1], cold_start=config)
    with pytest.raises(ValueError, match="join_rounds"):
        SimulationConfig(rounds=1, cold_start=ColdStartConfig(join_rounds=(2,)))
