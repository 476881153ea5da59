"""How the portable backend holds the training state: what shares memory, what has one buffer, which arena."""

from __future__ import annotations

import numpy as np

from device_agent.bundle.manifest import ArtifactSetName
from device_agent.training_backends import graph_names as g
from device_agent.training_backends.portable import PortableBackend
from device_agent.training_backends.runtime import shared_cpu_arena
from tests.model_bundles import make_data


def test_flat_parameters_are_views_of_flat_param_and_the_optimizer_state_has_one_buffer(model_bundle, install):
    # mlp-wide: one shared weight has moments of its own; the bundle test_cross_backend builds too
    path, _ = model_bundle("mlp-wide", "fedalt", mu=0.1, optimizer="adamw")
    backend = PortableBackend(install(path), threads=1)
    x, y = make_data("mlp-wide", "cross_entropy", 8, seed=0)
    for _ in range(3):  # an odd number of steps: the values end in the second ping-pong buffer
        backend.train_step(ArtifactSetName.SHARED, x, y)
    graph = backend._graphs[ArtifactSetName.SHARED]
    slots = backend._set_slots[ArtifactSetName.SHARED]
    group = backend._groups[ArtifactSetName.SHARED]
    assert graph.next == 1 and len(group.names) >= 2 and g.FLAT_PARAMS in graph.inputs
    flat = group.arrays[graph.next]
    for name in group.names:  # each flat parameter's current value is its piece of flat.param, the same memory
        np.testing.assert_array_equal(backend.get_parameter(name).reshape(-1), flat[group.pieces[name]])
    own = [n for n in graph.inputs if g.moment_owner(n) is not None]
    assert own, "the wide layer should have its own moments"
    for name in [g.OPT_STEP, g.OPT_M, g.OPT_V, *own]:
        assert len(slots[name].buffers) == 1, name
    separate = [g.param(owner[1]) for owner in map(g.moment_owner, own) if owner is not None]
    assert all(len(slots[name].buffers) == 2 for name in separate)
    assert backend.export_state().optimizers[ArtifactSetName.SHARED].step == 3


def test_portable_sessions_draw_on_the_shared_arena(model_bundle, install):
    path, _ = model_bundle("mlp-wide", "fedalt", mu=0.1, optimizer="adamw")
    backend = PortableBackend(install(path), threads=1)
    assert shared_cpu_arena()
    assert backend._options.get_session_config_entry("session.use_env_allocators") == "1"
