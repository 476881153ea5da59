"""The release client over real Mosquitto: the operator's publisher, the device's MQTT connection, chunked downloads.

Covered: a release published retained is fetched chunk by chunk and verified
(TUF, then the bundle's signature); a download stopped half way resumes from
the chunks on disk without asking for them again; a tampered chunk on the
broker is refused on arrival and reported, and the download completes once
the right chunk is back; expired metadata is refused and reported.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from device_agent.daemon.config import BrokerConfig
from device_agent.daemon.connection import MqttConnection, drain
from device_agent.protocol.topics import TopicLayout
from device_agent.release.client import InstallReady, ReleaseClient
from device_agent.release.policy import DeviceIdentity, LocalRelease
from device_agent.release.release_info import Stage
from device_agent.release.release_state import ReleaseReport
from device_agent.release.settings import ReleaseSettings
from sdk.aggregator.service_config import BrokerSettings
from sdk.release.publisher import MqttSession, publish_repository
from tests.release_support import FLEET, ReleaseFixture, utc

pytestmark = pytest.mark.mosquitto
LAYOUT = TopicLayout(fleet=FLEET)


@pytest.fixture
def operator(tmp_path: Path, fleet_key) -> ReleaseFixture:
    return ReleaseFixture(tmp_path / "operator", fleet_key)


def _publisher(port: int) -> BrokerSettings:
    return BrokerSettings(host="127.0.0.1", port=port, client_id="release-tool", max_packet_size=1 << 20)


class Device:
    """A release client on a real MQTT connection, driven the way the agent drives it."""

    def __init__(self, port: int, directory: Path, root_file: Path, fleet_key, *, chunks_per_s: float = 200.0) -> None:
        self.reports: list[ReleaseReport] = []
        self.connection = MqttConnection(BrokerConfig(host="127.0.0.1", port=port), client_id="eu-1",
                                         presence_topic=LAYOUT.device_presence("eu-1"),
                                         subscriptions=(LAYOUT.release_metadata_filter,))
        self.subscribed: list[str] = []

        def subscribe(topics):
            self.subscribed.extend(topics)
            self.connection.subscribe(topics)

        self.client = ReleaseClient(
            ReleaseSettings(root_file=root_file, chunks_per_s=chunks_per_s, window=2, settle_s=0.2, chunk_timeout_s=5.0),
            identity=DeviceIdentity(device="eu-1", fleet=FLEET, region="eu"), directory=directory, topics=LAYOUT,
            fleet_keys=fleet_key.public_key(), subscribe=subscribe, unsubscribe=self.connection.unsubscribe,
            report=self.reports.append)
        self.connection.start()
        assert self.connection.wait_connected(10)

    def run(self, until, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in drain(self.connection.inbox):
                self.client.handle(message)
            result = self.client.step(LocalRelease(bundle_version=1))
            if until(result):
                return result
            time.sleep(0.02)
        raise AssertionError(f"timed out; reports: {self.reports[-5:]}")

    def close(self) -> None:
        self.connection.close()


def test_release_is_fetched_in_chunks_and_verified(mosquitto, operator, bundle_factory, fleet_key, tmp_path):
    broker = mosquitto.start()
    v2 = bundle_factory("fedalt", seed=2)
    info = operator.add(v2, canary=("eu-1",))
    report = publish_repository(operator.repo, _publisher(broker.port), LAYOUT)
    assert report.chunks == info.chunks > 3
    root = tmp_path / "root.json"
    root.write_bytes(operator.root_json)
    device = Device(broker.port, tmp_path / "dev", root, fleet_key)
    try:
        ready = device.run(lambda r: isinstance(r, InstallReady))
    finally:
        device.close()
    assert ready.info == info and ready.archive.read_bytes() == v2.read_bytes()
    assert [r.state for r in device.reports][:1] == ["fetching"] and device.reports[-1].state == "verifying"


def test_download_resumes_after_a_stop_without_asking_again(mosquitto, operator, bundle_factory, fleet_key, tmp_path):
    broker = mosquitto.start()
    info = operator.add(bundle_factory("fedalt", seed=3), canary=("eu-1",))
    publish_repository(operator.repo, _publisher(broker.port), LAYOUT)
    root = tmp_path / "root.json"
    root.write_bytes(operator.root_json)
    first = Device(broker.port, tmp_path / "dev", root, fleet_key, chunks_per_s=10.0)
    chunks_dir = tmp_path / "dev" / "downloads" / info.sha256
    try:
        first.run(lambda r: len(list(chunks_dir.glob("*.chunk"))) >= 3)
    finally:
        first.close()
    on_disk = {int(p.stem) for p in chunks_dir.glob("*.chunk")}
    assert 3 <= len(on_disk) < info.chunks
    second = Device(broker.port, tmp_path / "dev", root, fleet_key)
    try:
        ready = second.run(lambda r: isinstance(r, InstallReady))
    finally:
        second.close()
    asked = {int(t.rsplit("/", 1)[1]) for t in second.subscribed}
    assert asked == set(range(info.chunks)) - on_disk, "chunks already on disk are not asked for again"
    assert ready.archive.read_bytes() == operator.bundles[info.sha256]


def test_tampered_chunk_is_refused_and_the_right_one_completes(mosquitto, operator, bundle_factory, fleet_key, tmp_path):
    broker = mosquitto.start()
    info = operator.add(bundle_factory("fedalt", seed=4), canary=("eu-1",))
    publish_repository(operator.repo, _publisher(broker.port), LAYOUT)
    good = operator.bundles[info.sha256][: info.chunk_size]
    with MqttSession(_publisher(broker.port)) as session:  # someone with broker access swaps chunk 0
        session.publish_all([(LAYOUT.release_chunk(info.sha256, 0), b"X" + good[1:])])
    root = tmp_path / "root.json"
    root.write_bytes(operator.root_json)
    device = Device(broker.port, tmp_path / "dev", root, fleet_key)
    try:
        device.run(lambda r: any(rep.reason.startswith("hash_mismatch") for rep in device.reports))
        refused = next(rep for rep in device.reports if rep.reason.startswith("hash_mismatch"))
        assert refused.state == "refused" and refused.release == info.release
        assert not (tmp_path / "dev" / "downloads" / info.sha256 / "0.chunk").exists()
        chunks = tmp_path / "dev" / "downloads" / info.sha256
        device.run(lambda r: len(list(chunks.glob("*.chunk"))) == info.chunks - 1)  # every other chunk came
        assert device.reports[-1].state == "refused", "the refusal stays in the status while the chunk is wrong"
        with MqttSession(_publisher(broker.port)) as session:  # the operator republishes the right chunk
            session.publish_all([(LAYOUT.release_chunk(info.sha256, 0), good)])
        ready = device.run(lambda r: isinstance(r, InstallReady), timeout=30)
    finally:
        device.close()
    assert ready.archive.read_bytes() == operator.bundles[info.sha256]


def test_expired_metadata_is_refused_with_its_reason(mosquitto, operator, bundle_factory, fleet_key, tmp_path):
    broker = mosquitto.start()
    operator.add(bundle_factory("fedalt", seed=5), stage=Stage.PROMOTED)
    operator.repo.sign_timestamp(operator.signers(), expires=utc(-5))
    publish_repository(operator.repo, _publisher(broker.port), LAYOUT)
    root = tmp_path / "root.json"
    root.write_bytes(operator.root_json)
    device = Device(broker.port, tmp_path / "dev", root, fleet_key)
    try:
        device.run(lambda r: bool(device.reports) and device.reports[-1].state == "refused")
    finally:
        device.close()
    assert device.reports[-1].reason.startswith("expired_metadata") and device.reports[-1].release is None
