"""Putting a release repository on the root broker: retained messages, QoS 1, every one acknowledged.

Order, so a device never sees metadata that points at something missing:
bundle chunks first (``release/targets/<sha256>/<i>``), then every root
version, targets, rollout and snapshot, and the timestamp last
(``release/metadata/<file>``). Files the broker held from an earlier publish
and no longer needs (older snapshot, targets and rollout versions; chunks of
releases beyond the newest ``keep_releases``) are cleared with an empty
retained message. What is on the broker is recorded in ``published.json``
beside the repository so the next publish clears exactly that. The bridges
carry ``release/#`` down to every regional broker, which keeps it retained.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.errors import FedgeError
from device_agent.protocol.chunking import PayloadTooLargeError, check_publish_size
from device_agent.protocol.topics import TopicLayout
from device_agent.state_store import atomic_write_bytes
from sdk.aggregator.inbox import FairInbox, InboxLimits
from sdk.aggregator.service_base import make_client
from sdk.aggregator.service_config import BrokerSettings
from sdk.release.repository import ReleaseRepository

logger = logging.getLogger(__name__)

_RECORD = "published.json"


class PublishError(FedgeError):
    """The broker could not be reached, refused the connection, or did not acknowledge everything in time."""


@dataclass(frozen=True, kw_only=True)
class PublishReport:
    """What one publish put on (and cleared from) the broker."""

    metadata: int
    chunks: int
    cleared: int
    bytes: int
    seconds: float


class MqttSession:
    """A short-lived paho connection for the release tools: connect, publish retained messages (QoS 1, acknowledged)."""

    def __init__(self, broker: BrokerSettings, *, timeout_s: float = 30.0) -> None:
        self.broker = broker
        self._timeout = timeout_s
        # make_client applies credentials and TLS; its queueing callbacks are replaced by this session's own.
        self._client = make_client(broker, FairInbox(InboxLimits()), lambda topic: None)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = None
        self._client.on_subscribe = None
        self._client.on_message = None
        self._connected: bool | None = None
        self._reason = ""

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: mqtt.ReasonCode, props: object) -> None:
        self._connected = not rc.is_failure
        self._reason = str(rc)

    def __enter__(self) -> MqttSession:
        try:
            self._client.connect(self.broker.host, self.broker.port, keepalive=self.broker.keepalive_s)
        except OSError as exc:
            raise PublishError(f"cannot reach broker {self.broker.host}:{self.broker.port}: {exc}") from exc
        self._client.loop_start()
        deadline = time.monotonic() + self._timeout
        while self._connected is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._connected:
            self.__exit__()
            raise PublishError(f"broker {self.broker.host}:{self.broker.port} did not accept {self.broker.username or 'anonymous'}"
                               f": {self._reason or 'no answer'}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def publish_all(self, messages: list[tuple[str, bytes]], *, retain: bool = True) -> int:
        """Publish every (topic, payload) at QoS 1 in order and wait for all acknowledgements; bytes sent."""
        infos = []
        total = 0
        for topic, payload in messages:
            try:
                check_publish_size(len(payload), self.broker.max_packet_size, topic=topic)
            except PayloadTooLargeError as exc:
                raise PublishError(f"{topic}: {exc}") from exc
            infos.append(self._client.publish(topic, payload, qos=1, retain=retain))
            total += len(payload)
        deadline = time.monotonic() + self._timeout
        for info in infos:
            info.wait_for_publish(max(0.01, deadline - time.monotonic()))
            if not info.is_published():
                raise PublishError(f"the broker did not acknowledge every message within {self._timeout:g} s")
        return total


def publish_repository(repo: ReleaseRepository, broker: BrokerSettings, layout: TopicLayout, *, keep_releases: int = 3,
                       republish: bool = False, timeout_s: float = 60.0) -> PublishReport:
    """Publish ``repo`` (module docstring); ``republish`` sends every chunk again even when recorded as published."""
    start = time.monotonic()
    record_file = repo.directory / _RECORD
    record = _read_record(record_file)
    entries = repo.releases()
    kept = {e.info.sha256 for e in entries[-keep_releases:]} if keep_releases > 0 else set()
    chunk_messages: list[tuple[str, bytes]] = []
    chunks_now: dict[str, int] = {}
    for entry in entries:
        info = entry.info
        if info.sha256 not in kept:
            continue
        chunks_now[info.sha256] = info.chunks
        if not republish and record["chunks"].get(info.sha256) == info.chunks:
            continue
        data = repo.bundle_file(info).read_bytes()
        for index in range(info.chunks):
            piece = data[index * info.chunk_size: index * info.chunk_size + info.chunk_size]
            chunk_messages.append((layout.release_chunk(info.sha256, index), piece))
    files = repo.published_files()
    timestamp = files.pop("timestamp.json")
    metadata = [(layout.release_metadata(name), raw) for name, raw in sorted(files.items(), key=_metadata_order)]
    metadata.append((layout.release_metadata("timestamp.json"), timestamp))
    stale = [layout.release_metadata(name) for name in record["metadata"] if name not in files and name != "timestamp.json"]
    for sha, count in record["chunks"].items():
        if sha not in chunks_now:
            stale += [layout.release_chunk(sha, i) for i in range(count)]
    with MqttSession(broker, timeout_s=timeout_s) as session:
        sent = session.publish_all(chunk_messages)
        sent += session.publish_all(metadata)
        session.publish_all([(topic, b"") for topic in stale])
    _write_record(record_file, {"metadata": sorted([*files, "timestamp.json"]), "chunks": chunks_now})
    report = PublishReport(metadata=len(metadata), chunks=len(chunk_messages), cleared=len(stale), bytes=sent,
                           seconds=time.monotonic() - start)
    logger.info("published %d metadata file(s), %d chunk(s) (%d bytes), cleared %d in %.2f s", report.metadata,
                report.chunks, report.bytes, report.cleared, report.seconds)
    return report


def _metadata_order(item: tuple[str, bytes]) -> tuple[int, int]:
    name = item[0]
    version, _, role = name.partition(".")
    rank = {"root.json": 0, "targets.json": 1, "rollout.json": 2, "snapshot.json": 3}.get(role, 4)
    return rank, int(version) if version.isdigit() else 0


def _read_record(path: Path) -> dict:
    try:
        doc = json.loads(path.read_bytes())
        return {"metadata": [str(n) for n in doc["metadata"]], "chunks": {str(k): int(v) for k, v in doc["chunks"].items()}}
    except FileNotFoundError:
        return {"metadata": [], "chunks": {}}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("%s is damaged (%s): publishing everything again", path, exc)
        return {"metadata": [], "chunks": {}}


def _write_record(path: Path, record: dict) -> None:
    atomic_write_bytes(path, json.dumps(record, sort_keys=True).encode())
