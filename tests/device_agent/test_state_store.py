"""Device state survives kill -9 at any point: a load always finds a complete generation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.errors import StateError
from device_agent.state_store import StateStore
from device_agent.trainer import DeviceTrainer

SAVER = textwrap.dedent(
    """
    import sys, numpy as np
    from device_agent.bundle.archive import load_bundle
    from device_agent.data import ArrayDataSource
    from device_agent.keys import load_verify_key
    from device_agent.trainer import DeviceTrainer, TrainBudget

    bundle = load_bundle(sys.argv[1], load_verify_key(sys.argv[2]))
    trainer = DeviceTrainer(bundle, state_dir=sys.argv[3])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 64)).astype(np.float32); y = rng.integers(0, 10, 64)
    print("ready", flush=True)
    for i in range(100000):
        trainer.train(ArrayDataSource(x, y), TrainBudget(epochs=1, batch_size=16))
        trainer.round = i
        trainer.save_state()
    """
)


def test_state_store_roundtrip_and_corruption_fallback(tmp_path: Path):
    store = StateStore(tmp_path)
    assert store.load() is None
    store.save(lambda d: (d / "a.bin").write_bytes(b"one"), {"round": 1})
    second = store.save(lambda d: (d / "a.bin").write_bytes(b"two"), {"round": 2})
    assert store.load().meta["round"] == 2
    (second.directory / "a.bin").write_bytes(b"tw0")  # bit rot in the newest generation
    loaded = store.load()
    assert loaded.meta["round"] == 1
    assert (loaded.directory / "a.bin").read_bytes() == b"one"
    with pytest.raises(StateError):
        store._check(second.generation)


def test_state_survives_kill_9_during_saves(bundle_factory, install, fleet_key, tmp_path: Path):
    from device_agent.keys import save_public_key

    bundle = install(bundle_factory("fedalt", mu=0.01))
    save_public_key(fleet_key.public_key(), tmp_path / "fleet.pub")
    state = tmp_path / "state"
    rng = np.random.default_rng(5)
    total_before = 0
    for _attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(bundle.directory), str(tmp_path / "fleet.pub"), str(state)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.2, 0.8)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        trainer = DeviceTrainer(bundle, state_dir=state)  # must load without error
        assert trainer.round >= 0, "the child was killed before its first save; lengthen the wait"
        # counters and checkpoint come from one generation: each save adds 8 steps (64 rows / 16, two fedalt phases)
        assert trainer.total_steps == total_before + 8 * (trainer.round + 1)
        meta = json.loads((state / (state / "CURRENT").read_text() / "meta.json").read_text())
        assert meta["total_steps"] == trainer.total_steps
        total_before = trainer.total_steps


def test_residual_file_round_trips_and_treats_damage_as_no_residual(tmp_path: Path):
    import numpy as np

    from device_agent.compression import ResidualState, residual_for
    from device_agent.state_store import ResidualFile

    f = ResidualFile(tmp_path / "residual.bin")
    assert f.load() is None
    state = ResidualState(bundle_version=2, round=5, before={"w": np.full((2, 2), 0.5)}, after={"w": np.arange(4.0).reshape(2, 2)})
    f.save(state)
    back = f.load()
    assert back is not None and (back.bundle_version, back.round) == (2, 5)
    np.testing.assert_array_equal(back.before["w"], state.before["w"])
    np.testing.assert_array_equal(back.after["w"], state.after["w"])
    # Which residual a round starts from: the last round's "after", a re-seal's "before", nothing across bundles.
    assert residual_for(back, bundle_version=2, round=6) is back.after
    assert residual_for(back, bundle_version=2, round=5) is back.before
    assert residual_for(back, bundle_version=3, round=6) is None
    assert residual_for(back, bundle_version=2, round=4) is None
    (tmp_path / "residual.bin").write_bytes(b"FDGT\x01\x00garbage")
    assert f.load() is None
