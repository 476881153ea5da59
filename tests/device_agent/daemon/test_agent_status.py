"""The agent's signed status on a real broker: published on connect and after rounds, the rollout hook, the will."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.daemon.status_reporter import StatusReporter, available_memory
from device_agent.protocol.status import DeviceStatus, ReleaseState, open_status
from tests.device_agent.daemon.fleet_harness import DEVICE, FLEET, Probe

pytestmark = pytest.mark.mosquitto
TOPIC = f"fedge/{FLEET}/dev/{DEVICE}/status"


class Statuses:
    """Every status that arrives on the device's topic, verified with its key."""

    def __init__(self, fleet) -> None:
        self.probe = Probe(fleet.broker.port, TOPIC)
        self.keys = {DEVICE: fleet.keys.device.public_key()}

    def next(self, timeout: float = 10.0) -> DeviceStatus:
        return open_status(self.probe.next(timeout), device_keys=self.keys, fleet=FLEET, device=DEVICE, region="eu")

    def until(self, check, timeout: float = 15.0) -> DeviceStatus:
        """The first status for which ``check`` holds (older ones skipped)."""
        while True:
            status = self.next(timeout)
            if check(status):
                return status


def test_agent_status_says_online_with_its_bundle_then_the_round_it_played(fleet, local_data) -> None:
    fleet.sections["data"]["validation_path"] = str(local_data)
    agent = fleet.agent()
    statuses = Statuses(fleet)
    try:
        first = statuses.until(lambda s: s.online)
        assert (first.bundle_model, first.bundle_version, first.backend) == ("digits-mlp", 1, "ort-training")
        assert first.last_round is None and first.release.state is ReleaseState.IDLE
        assert first.free_memory_bytes is None or first.free_memory_bytes > 0
        fleet.responder.publish_model(0, agent.trainer.global_reference)
        result = agent.run(max_rounds=1)
        assert result.finished == 1
        trained = statuses.until(lambda s: s.last_round_status == "trained")
        assert trained.last_round == 0 and trained.loss_is_finite
        assert trained.last_val_accuracy is not None and 0.0 <= trained.last_val_accuracy <= 1.0
        done = statuses.until(lambda s: s.last_round_status == "accepted")
        assert done.last_round == 0 and done.sequence > trained.sequence > first.sequence
        assert np.isclose(done.last_loss, result.rounds[0].report.mean_loss)
    finally:
        statuses.probe.close()


def test_agent_update_status_hook_publishes_the_release_at_once(fleet) -> None:
    agent = fleet.agent()
    statuses = Statuses(fleet)
    try:
        statuses.until(lambda s: s.online)
        agent.update_status(release={"state": "fetching", "version": 2, "progress": 40})
        fetching = statuses.until(lambda s: s.release.state is ReleaseState.FETCHING)
        assert (fetching.release.version, fetching.release.progress) == (2, 40)
        agent.status.update_release(state="refused", reason="expired\nmetadata " * 30)
        refused = statuses.until(lambda s: s.release.state is ReleaseState.REFUSED)
        assert refused.release.version == 2 and refused.release.reason.startswith("expired metadata expired")
        assert len(refused.release.reason) <= 200
        with pytest.raises(ValueError):
            agent.update_status(online=False)
        with pytest.raises(ValueError):
            agent.update_status(release={"state": "dancing"})
    finally:
        statuses.probe.close()


def test_agent_dropped_without_goodbye_leaves_a_signed_offline_will(fleet) -> None:
    agent = fleet.agent()
    statuses = Statuses(fleet)
    try:
        online = statuses.until(lambda s: s.online)
        agent.close(graceful=False)  # the socket drops: the broker publishes the will
        will = statuses.until(lambda s: not s.online)
        assert will.bundle_version == online.bundle_version and will.device == DEVICE
        late = Statuses(fleet)  # a reader that comes later gets the will, retained
        try:
            assert not late.next().online
        finally:
            late.probe.close()
    finally:
        statuses.probe.close()


def test_status_reporter_counts_signs_and_reports_changes(fleet_key) -> None:
    calls: list[int] = []
    now = [100.0]
    reporter = StatusReporter(fleet="f", region="eu", device="d-1", signing_key=fleet_key, wall_clock=lambda: 1_700_000_000.0,
                              clock=lambda: now[0], free_memory=lambda: 1234, on_change=lambda: calls.append(1))
    reporter.update(bundle_version=3, last_loss=float("nan"))
    now[0] = 160.5
    blob = reporter.online_payload()
    status = open_status(blob, device_keys={"d-1": fleet_key.public_key()}, fleet="f")
    assert (status.sequence, status.uptime_s, status.free_memory_bytes, status.bundle_version) == (0, 60, 1234, 3)
    assert not status.loss_is_finite and calls == [1]
    assert open_status(reporter.offline_payload(), device_keys={"d-1": fleet_key.public_key()}, fleet="f").sequence == 1


def test_available_memory_reads_meminfo_or_says_unknown(tmp_path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  1000 kB\nMemAvailable:   2048 kB\n")
    assert available_memory(meminfo) == 2048 * 1024
    meminfo.write_text("MemTotal: 1000 kB\n")
    assert available_memory(meminfo) is None
    assert available_memory(tmp_path / "missing") is None
