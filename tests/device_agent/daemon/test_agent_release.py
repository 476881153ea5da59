"""The agent's release step on real Mosquitto: install between rounds, carry parameters, trial, go back.

One agent (real ONNX Runtime training, real TUF, real MQTT) and releases
published by the operator's real publisher:

- a promoted release is fetched, verified, installed between rounds; the
  personal head carries over (same shapes), layers of another shape start
  from the new bundle; the status names the new bundle and the healthy trial;
  the agent then waits for models of the new version only;
- a release whose training diverges (SGD at learning rate 900) is tried,
  judged, marked failed and left: the agent returns to the kept version by
  itself, reports ``rolled_back``, and never installs it again;
- a release withdrawn by signed metadata (halted) sends the agent back too.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.bundle.archive import install_bundle, load_bundle
from device_agent.bundle.install_policy import read_failed, read_record
from device_agent.compression import CompressionSpec
from device_agent.protocol.status import ReleaseState
from device_agent.protocol.topics import TopicLayout
from device_agent.release.release_info import Stage
from device_agent.data import load_npz
from device_agent.trainer import DeviceTrainer, TrainBudget
from sdk.aggregator.service_config import BrokerSettings
from sdk.release.publisher import publish_repository
from tests.device_agent.bundle.resign import resigned
from tests.device_agent.daemon.fleet_harness import DEVICE, FLEET
from tests.release_support import ReleaseFixture

pytestmark = pytest.mark.mosquitto
HIDDEN_V1, HIDDEN_V2 = (32, 16), (48, 16)


@pytest.fixture
def bundles(bundle_factory, fleet_key, tmp_path: Path) -> dict[int, Path]:
    """v1 (hidden 32-16, float32 up), v2 (48-16: other shared shapes, same head; q8 up), v3 (v2's shapes, SGD at
    lr 900: diverges)."""
    return {
        1: bundle_factory("fedalt", hidden=HIDDEN_V1),
        2: resigned(bundle_factory("fedalt", hidden=HIDDEN_V2, seed=1), tmp_path / "v2.fedge", fleet_key, version=2,
                    compression="q8"),
        3: resigned(bundle_factory("fedalt", hidden=HIDDEN_V2, optimizer="sgd", lr=900.0, seed=2), tmp_path / "v3.fedge",
                    fleet_key, version=3),
    }


def _switch(agent, want, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        switched = agent.between_rounds()
        agent.intake.pump(time.monotonic() + 0.1, lambda: False, agent._stop)
        if switched is not None and want(switched):
            return switched
    raise AssertionError(f"no switch within {timeout} s; release report {agent.release.memory.report}")


def test_agent_installs_tries_and_goes_back(fleet, bundles, fleet_key, tmp_path: Path, digits) -> None:
    operator = ReleaseFixture(tmp_path / "operator", fleet_key, fleet=FLEET)
    root = tmp_path / "root.json"
    root.write_bytes(operator.root_json)
    x, y = digits
    np.savez(tmp_path / "val.npz", x=x[300:500], y=y[300:500])
    fleet.sections["bundle"]["path"] = bundles[1]
    fleet.sections["data"]["validation_path"] = tmp_path / "val.npz"
    fleet.sections["training"]["epochs"] = 3
    fleet.sections["release"] = {"root_file": root, "settle_s": 0.1, "chunks_per_second": 500.0}
    agent = fleet.agent()
    agent.trainer.train(load_npz(fleet.sections["data"]["path"]), TrainBudget(epochs=20), rng=np.random.default_rng(0))
    agent.trainer.save_state()  # v1 has learnt something: the baseline a new version is held to
    head_v1 = agent.trainer.get_personal()
    broker = BrokerSettings(host="127.0.0.1", port=fleet.broker.port, client_id="release-tool", max_packet_size=1 << 20)
    layout = TopicLayout(fleet=FLEET)

    # v2, canary on this device: installed between rounds, head carried, other shapes reset, status updated.
    operator.add(bundles[2], stage=Stage.CANARY, canary=(DEVICE,), publish=False)
    publish_repository(operator.repo, broker, layout)
    switched = _switch(agent, lambda s: s.bundle.manifest.bundle_version == 2)
    assert agent.trainer.manifest.bundle_version == 2
    assert agent.compression == CompressionSpec.parse("q8"), "the new bundle's uplink compression is followed"
    v2_init = DeviceTrainer(install_bundle(bundles[2], fleet_key.public_key(), tmp_path / "scratch")).get_personal()
    assert set(agent.trainer.get_personal()) == set(head_v1)
    assert not np.allclose(agent.trainer.get_personal()["head.weight"], v2_init["head.weight"]), "the head was carried over"
    status = agent.status.current
    assert (status.bundle_version, status.release.state, status.release.version) == (2, ReleaseState.INSTALLED, 1)
    assert status.release.baseline_accuracy is not None and status.last_val_accuracy is not None
    assert status.last_loss is not None and np.isfinite(status.last_loss)
    assert switched.loss is not None

    # v2 halted by signed metadata: back to v1, its personal head as it was.
    operator.stage(1, Stage.HALTED, "operator")
    publish_repository(operator.repo, broker, layout)
    _switch(agent, lambda s: s.bundle.manifest.bundle_version == 1)
    np.testing.assert_array_equal(agent.trainer.get_personal()["head.weight"], head_v1["head.weight"])
    assert not agent.compression.enabled, "back on v1: float32 up again"
    status = agent.status.current
    assert (status.bundle_version, status.release.state, status.release.version) == (1, ReleaseState.ROLLED_BACK, 1)
    assert "halted" in status.release.reason

    # v3 (canary: this device) diverges: tried, marked failed, back to v1 by itself; never installed again.
    operator.add(bundles[3], stage=Stage.CANARY, canary=(DEVICE,), publish=False)
    publish_repository(operator.repo, broker, layout)
    _switch(agent, lambda s: s.bundle.manifest.bundle_version == 1 and 2 in agent.release.memory.failed)
    install_dir = fleet.sections["bundle"]["install_dir"]
    assert load_bundle(install_dir, fleet_key.public_key()).manifest.bundle_version == 1
    assert read_record(install_dir).bundle_version == 3, "the floor stays at the failed version"
    assert sorted(f.bundle_version for f in read_failed(install_dir)) == [2, 3]
    status = agent.status.current
    assert status.release.state is ReleaseState.ROLLED_BACK and status.release.version == 2
    assert "diverged" in status.release.reason
    assert agent.release.memory.failed == (1, 2)
    for _ in range(20):
        assert agent.between_rounds() is None
        agent.intake.pump(time.monotonic() + 0.05, lambda: False, agent._stop)
    assert agent.trainer.manifest.bundle_version == 1
