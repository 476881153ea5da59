"""How the portable backend holds the training state: what shares memory, what has one buffer, which arena."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.bundle.manifest import ArtifactSetName
from device_agent.training_backends import graph_names as g
from device_agent.training_backends.portable import PortableBackend
from device_agent.training_backends.runtime import shared_cpu_arena
from tests.model_bundles import make_data


@pytest.mark.parametrize("marked", [True, False], ids=["in-place", "agent-ignoring-the-mark"])
def test_flat_parameters_are_views_of_flat_param_and_the_optimizer_state_has_one_buffer(marked, model_bundle, install,
                                                                                      monkeypatch):
    # mlp-wide: one shared weight has moments of its own; the bundle test_cross_backend builds too
    path, _ = model_bundle("mlp-wide", "fedalt", mu=0.1, optimizer="adamw")
    if not marked:  # an agent that predates the mark (or a graph without it): two buffers per parameter, ping-pong
        monkeypatch.setattr(g, "PARAMS_IN_PLACE", "fedge.a-key-no-graph-has")
    backend = PortableBackend(install(path), threads=1)
    x, y = make_data("mlp-wide", "cross_entropy", 8, seed=0)
    for _ in range(3):  # an odd number of steps: ping-ponged values end in the second buffer
        backend.train_step(ArtifactSetName.SHARED, x, y)
    graph = backend._graphs[ArtifactSetName.SHARED]
    slots = backend._set_slots[ArtifactSetName.SHARED]
    group = backend._groups[ArtifactSetName.SHARED]
    assert graph.params_in_place is marked and len(group.names) >= 2 and g.FLAT_PARAMS in graph.inputs
    assert len(group.arrays) == (1 if marked else 2) and graph.next == 1
    flat = group.arrays[graph.next if len(group.arrays) == 2 else 0]
    for name in group.names:  # each flat parameter's current value is its piece of flat.param, the same memory
        np.testing.assert_array_equal(backend.get_parameter(name).reshape(-1), flat[group.pieces[name]])
    own = [n for n in graph.inputs if g.moment_owner(n) is not None]
    assert own, "the wide layer should have its own moments"
    for name in [g.OPT_STEP, g.OPT_M, g.OPT_V, *own]:
        assert len(slots[name].buffers) == 1, name
    separate = [g.param(owner[1]) for owner in map(g.moment_owner, own) if owner is not None]
    assert all(len(slots[name].buffers) == (1 if marked else 2) for name in separate)
    assert backend.export_state().optimizers[ArtifactSetName.SHARED].step == 3


def test_portable_sessions_draw_on_the_shared_arena(model_bundle, install):
    path, _ = model_bundle("mlp-wide", "fedalt", mu=0.1, optimizer="adamw")
    backend = PortableBackend(install(path), threads=1)
    assert shared_cpu_arena()
    assert backend._options.get_session_config_entry("session.use_env_allocators") == "1"


def test_a_micro_batched_step_updates_its_parameters_in_place(model_bundle, install):
    """Its builder proved every read of a parameter precedes the update: one buffer each, and the numbers of a whole-batch step."""
    sliced = PortableBackend(install(model_bundle("mlp-wide", "fedalt", mu=0.1, optimizer="adamw", micro_batch=3)[0]), threads=1)
    whole = PortableBackend(install(model_bundle("mlp-wide", "fedalt", mu=0.1, optimizer="adamw")[0]), threads=1)
    for step, batch in enumerate((8, 8, 5)):  # slices 3, 3, 2 and 3, 2
        x, y = make_data("mlp-wide", "cross_entropy", batch, seed=step)
        for set_name in (ArtifactSetName.PERSONAL, ArtifactSetName.SHARED):
            assert sliced.train_step(set_name, x, y) == pytest.approx(whole.train_step(set_name, x, y), rel=1e-5)
    for set_name in (ArtifactSetName.PERSONAL, ArtifactSetName.SHARED):
        graph, slots = sliced._graphs[set_name], sliced._set_slots[set_name]
        assert graph.params_in_place and graph.ping_pong == []
        updated = [n for n in graph.updated if n.startswith(g.PARAM) or n == g.FLAT_PARAMS]
        assert updated and all(len(slots[n].buffers) == 1 for n in updated)
        assert len(sliced._groups[set_name].arrays) == 1
    # whole batch too: each separately updated weight's update waits for the gradient of the parameter before it
    # (step.update_order), which the backward computes from that layer's input gradient, its last read of the weight
    for set_name in (ArtifactSetName.PERSONAL, ArtifactSetName.SHARED):
        assert whole._graphs[set_name].params_in_place and len(whole._groups[set_name].arrays) == 1
    for name, value in whole.export_state().parameters.items():
        np.testing.assert_allclose(sliced.get_parameter(name), value, rtol=1e-5, atol=2e-6, err_msg=name)


@pytest.mark.parametrize("micro_batch", [3, 0], ids=["micro-batched", "whole-batch"])
def test_an_agent_that_ignores_the_in_place_mark_gets_the_same_numbers(micro_batch, model_bundle, install, monkeypatch):
    """A bundle with marked graphs is format 3 as before: an agent of that format (no mark, ping-pong) trains it alike."""
    bundle = install(model_bundle("mlp-wide", "fedalt", mu=0.1, optimizer="adamw", micro_batch=micro_batch)[0])
    batches = [make_data("mlp-wide", "cross_entropy", n, seed=10 + i) for i, n in enumerate((8, 5, 8))]

    def train(backend: PortableBackend) -> dict[str, np.ndarray]:
        for x, y in batches:
            for set_name in (ArtifactSetName.PERSONAL, ArtifactSetName.SHARED):
                backend.train_step(set_name, x, y)
        return backend.export_state().parameters

    in_place = train(PortableBackend(bundle, threads=1))
    monkeypatch.setattr(g, "PARAMS_IN_PLACE", "fedge.a-key-no-graph-has")
    old = PortableBackend(bundle, threads=1)
    ping_ponged = train(old)
    assert not old._graphs[ArtifactSetName.SHARED].params_in_place and old._graphs[ArtifactSetName.SHARED].ping_pong
    for name, value in in_place.items():
        np.testing.assert_array_equal(ping_ponged[name], value, err_msg=name)
