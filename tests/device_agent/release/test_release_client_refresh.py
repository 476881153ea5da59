"""When the release client refreshes TUF: new metadata ends an incomplete-metadata backoff (fake clock, dict broker)."""

from __future__ import annotations

from pathlib import Path

from device_agent.daemon.connection_types import InboundMessage
from device_agent.protocol.topics import TopicLayout
from device_agent.release.client import ReleaseClient
from device_agent.release.metadata_cache import MetadataCache
from device_agent.release.policy import DeviceIdentity, LocalRelease
from device_agent.release.settings import ReleaseSettings
from tests.release_support import FLEET, ReleaseFixture

LAYOUT = TopicLayout(fleet=FLEET)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_new_metadata_ends_the_backoff_of_an_unpublished_repository(tmp_path: Path, fleet_key, bundle_factory) -> None:
    operator = ReleaseFixture(tmp_path / "operator", fleet_key)
    root_file = tmp_path / "root.json"
    root_file.write_bytes(operator.root_json)
    clock = Clock()
    client = ReleaseClient(ReleaseSettings(root_file=root_file, settle_s=0.5), identity=DeviceIdentity(
        device="eu-1", fleet=FLEET, region="eu"), directory=tmp_path / "device", topics=LAYOUT,
        fleet_keys=fleet_key.public_key(), subscribe=lambda topics: None, unsubscribe=lambda topics: None, clock=clock)
    local = LocalRelease(bundle_version=1)
    # A fleet whose repository was never published: the broker holds nothing; every refresh is incomplete.
    for _ in range(5):
        client.step(local)
        clock.now += 40.0  # past every backoff delay (capped at 30 s)
    assert client.view is None
    client.step(local)  # incomplete again: the next try is some seconds away
    # The operator publishes a release now; the files arrive.
    operator.add(bundle_factory("fedavg"))
    for name, payload in sorted(operator.broker.items()):
        client.handle(InboundMessage(topic=LAYOUT.release_metadata(name), payload=payload, retained=True))
    clock.now += 0.6  # settled: refreshed at once, not when the backoff ends
    client.step(local)
    assert client.view is not None and [r.release for r in client.view.releases] == [1]


def test_metadata_cache_refuses_odd_names_and_oversized_files_and_clears_on_empty() -> None:
    cache = MetadataCache()
    assert cache.file("1.root.json", b"{}") and cache.get("1.root.json") == b"{}"
    assert not cache.file("../evil.json", b"{}") and not cache.file("0.root.json", b"{}")
    assert not cache.file("timestamp.json", b"x" * 9000)  # over python-tuf's timestamp limit as fedge sets it
    assert cache.file("1.root.json", b"") and cache.get("1.root.json") is None and len(cache) == 0
