"""Where the dashboard's data comes from: the monitoring account on MQTT, and the aggregators' ``/metrics``.

Both only read. The MQTT side subscribes to retained statuses, model
announcements, bridge states and the signed release metadata (never updates, receipts or anything with
weights of a device: the monitoring account's ACL could not read them
anyway); paho's network thread only queues what arrives (bounded, overflow
counted), and :func:`apply_message` verifies each message (statuses against
the device registry, models against the configured signers) before the view
sees it. Anything refused is counted in the view and logged at debug level,
never shown as data.
"""

from __future__ import annotations

import logging
import queue
import ssl
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.errors import FedgeError
from device_agent.protocol.envelope import SenderKeys, open_model
from device_agent.protocol.topics import TopicLayout
from sdk.dashboard.aggregators import AggregatorReading, MetricsParseError, parse_metrics
from sdk.dashboard.config import MonitorBroker
from sdk.dashboard.view import FleetView
from sdk.fleet.status_view import VERIFIED, build_view

logger = logging.getLogger(__name__)
#: Messages waiting for the dashboard's loop; beyond this, new ones are dropped (and counted).
MAX_QUEUED = 10_000
#: Largest scrape body read.
MAX_SCRAPE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Inbound:
    """One MQTT message as queued by the network thread."""

    topic: str
    payload: bytes


class MonitorClient:
    """The monitoring account's MQTT connection (module docstring): subscribe, queue, reconnect (paho)."""

    def __init__(self, broker: MonitorBroker, layout: TopicLayout, *, releases: bool = False) -> None:
        self.broker = broker
        self.layout = layout
        self.releases = releases
        self.messages: queue.Queue[Inbound] = queue.Queue(MAX_QUEUED)
        self.dropped = 0
        self.connected = False
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fedge-dashboard-{uuid.uuid4().hex[:12]}",
                             clean_session=True, protocol=mqtt.MQTTv311)
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.password)
        if broker.ca_file is not None:
            client.tls_set(ca_certs=str(broker.ca_file),
                           certfile=None if broker.cert_file is None else str(broker.cert_file),
                           keyfile=None if broker.key_file is None else str(broker.key_file),
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client

    def subscriptions(self) -> list[str]:
        """Statuses, model announcements, (at the root) bridge states and (``releases``) the release metadata."""
        extra = [self.layout.release_metadata_filter] if self.releases else []
        if self.broker.role == "root":
            return [self.layout.all_region_statuses, self.layout.root_model, f"{self.layout.base}/region/+/bridge/state",
                    *extra]
        return [self.layout.all_device_statuses, self.layout.global_model, *extra]

    def start(self) -> None:
        """Connect in the background (paho retries with backoff)."""
        logger.info("dashboard: reading %s broker %s:%d as %s", self.broker.role, self.broker.host, self.broker.port,
                    self.broker.username or "anonymous")
        self._client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self._client.loop_start()

    def stop(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: mqtt.ReasonCode, props: object) -> None:
        if rc.is_failure:
            logger.error("dashboard: broker %s:%d refused the monitoring account: %s", self.broker.host, self.broker.port, rc)
            return
        self.connected = True
        logger.info("dashboard: connected to %s:%d", self.broker.host, self.broker.port)
        client.subscribe([(topic, 1) for topic in self.subscriptions()])

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, rc: mqtt.ReasonCode, props: object) -> None:
        self.connected = False
        logger.warning("dashboard: connection to %s:%d lost (%s); reconnecting", self.broker.host, self.broker.port, rc)

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            self.messages.put_nowait(Inbound(message.topic, bytes(message.payload)))
        except queue.Full:
            self.dropped += 1


def apply_message(view: FleetView, message: Inbound, *, layout: TopicLayout, registries: Mapping[str, SenderKeys],
                  model_keys: Mapping[str, Ed25519PublicKey], region: str | None = None) -> None:
    """Verify one message and hand it to ``view``; refusals are counted there (``region``: the broker's, for
    role ``region``). Statuses go through ``fedge fleet status``'s reader
    (:func:`~sdk.fleet.status_view.build_view`): the same checks, the same verdicts."""
    topic, payload = message.topic, message.payload
    source = layout.status_source(topic)
    if source is not None:
        topic_region, device = source
        checked = build_view(layout=layout, regions=list(registries), registries=registries,
                             expected={} if topic_region else {device: region or "?"}, messages=[(topic, payload)])
        row = next((r for rows in checked.regions.values() for r in rows), None)
        if row is None:
            return  # an empty retained message clears a topic
        if row.verdict != VERIFIED or row.status is None:
            view.reject(f"status ({row.verdict})")
            logger.debug("dashboard: refused a status on %s: %s %s", topic, row.verdict, row.detail)
            return
        view.apply_status(row.status)
        return
    if topic.endswith("/bridge/state"):
        bridge_region = topic[len(layout.base) + len("/region/"):].split("/", 1)[0]
        if payload in (b"0", b"1"):
            view.apply_bridge(bridge_region, payload == b"1")
        return
    if topic in (layout.root_model, layout.global_model):
        signer = "root" if topic == layout.root_model else region
        key = None if signer is None else model_keys.get(signer)
        if signer is None or key is None or not payload:
            return  # no key to verify it with: announcements are not shown (docs/operations.md)
        try:
            model = open_model(payload, trusted_signers=key)
        except (FedgeError, ValueError) as exc:
            view.reject("model")
            logger.debug("dashboard: refused a model on %s: %s", topic, exc)
            return
        view.apply_model(signer, model.header.round)


async def scrape(session: aiohttp.ClientSession, url: str, timeout_s: float) -> tuple[AggregatorReading | None, str]:
    """GET ``url`` and parse it: (reading, "") or (None, why not)."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            if response.status != 200:
                return None, f"HTTP {response.status}"
            body = await response.content.read(MAX_SCRAPE_BYTES + 1)
            if len(body) > MAX_SCRAPE_BYTES:
                return None, f"more than {MAX_SCRAPE_BYTES} bytes"
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    try:
        return parse_metrics(body.decode("utf-8", errors="replace")), ""
    except MetricsParseError as exc:
        return None, str(exc)
