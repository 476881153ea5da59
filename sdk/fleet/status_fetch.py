"""Reading the retained statuses off a broker with the monitoring account (the I/O half of ``fedge fleet status``).

The monitor subscribes, takes the retained messages the broker replays
after SUBACK, and stops once nothing new arrived for ``quiet_s`` (or at
``timeout_s``). From the root broker it reads every region's statuses
(bridged up under ``region/<r>/dev/<id>/status``); from a regional broker,
that region's. The credentials are the monitor's JSON from ``fedge fleet init``
(``brokers/credentials/monitors/<name>.json``).
"""

from __future__ import annotations

import json
import queue
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.errors import FedgeError
from device_agent.protocol.topics import TopicLayout
from sdk.broker_config.render import CREDENTIALS_DIR
from sdk.fleet import layout


class StatusFetchError(FedgeError):
    """The broker could not be reached or refused the monitoring account; the message says which and why."""


@dataclass(frozen=True, kw_only=True)
class BrokerEndpoint:
    """Where and how the monitor connects to one broker."""

    name: str
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


def monitor_endpoints(fleet_dir: Path, monitor: str) -> dict[str, BrokerEndpoint]:
    """``root`` and each region -> the monitor's endpoint there (StatusFetchError when it has no credentials)."""
    credentials = fleet_dir / layout.BROKERS_DIR / CREDENTIALS_DIR
    path = credentials / "monitors" / f"{monitor}.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StatusFetchError(f"{path}: cannot read the monitoring account's credentials ({exc}); is [monitor] "
                               "enabled in the topology?") from exc

    def file(key: str) -> Path | None:
        return None if doc.get(key) is None else credentials / str(doc[key])

    common = dict(username=str(doc["username"]), password=str(doc["password"]), ca_file=file("ca_file"),
                  cert_file=file("client_cert_file"), key_file=file("client_key_file"))
    endpoints = {layout.ROOT_SITE: BrokerEndpoint(name=layout.ROOT_SITE, host=str(doc["host"]), port=int(doc["port"]),
                                                  **common)}  # type: ignore[arg-type]
    for region, where in dict(doc.get("regional_brokers", {})).items():
        endpoints[region] = BrokerEndpoint(name=region, host=str(where["host"]), port=int(where["port"]),
                                           **common)  # type: ignore[arg-type]
    return endpoints


def fetch_retained(endpoint: BrokerEndpoint, topic_filter: str, *, quiet_s: float = 0.5,
                   timeout_s: float = 10.0) -> list[tuple[str, bytes]]:
    """The retained messages under ``topic_filter`` at ``endpoint`` (topic, payload), in arrival order."""
    events: queue.Queue[tuple[str, object]] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fedge-status-{time.monotonic_ns()}", clean_session=True,
                         protocol=mqtt.MQTTv311)
    client.username_pw_set(endpoint.username, endpoint.password)
    if endpoint.ca_file is not None:
        client.tls_set(ca_certs=str(endpoint.ca_file),
                       certfile=None if endpoint.cert_file is None else str(endpoint.cert_file),
                       keyfile=None if endpoint.key_file is None else str(endpoint.key_file),
                       cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.on_connect = lambda c, u, flags, rc, props: events.put(("connack", rc))
    client.on_subscribe = lambda c, u, mid, rcs, props: events.put(("suback", rcs))
    client.on_message = lambda c, u, msg: events.put(("message", (msg.topic, bytes(msg.payload), bool(msg.retain))))
    where = f"{endpoint.host}:{endpoint.port}"
    try:
        client.connect(endpoint.host, endpoint.port, keepalive=30)
    except (OSError, ValueError) as exc:
        raise StatusFetchError(f"cannot reach the {endpoint.name} broker at {where}: {exc}") from exc
    client.loop_start()
    messages: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + timeout_s
    try:
        kind, value = _next(events, deadline, where)
        if kind != "connack" or getattr(value, "is_failure", True):
            raise StatusFetchError(f"the {endpoint.name} broker at {where} refused {endpoint.username}: {value}")
        client.subscribe(topic_filter, qos=1)
        subscribed = False
        while True:
            wait = quiet_s if subscribed else max(0.0, deadline - time.monotonic())
            try:
                kind, value = events.get(timeout=min(wait, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if subscribed:
                    break  # quiet: the retained replay is over
                raise StatusFetchError(f"no SUBACK from the {endpoint.name} broker at {where}") from None
            if kind == "suback":
                subscribed = True
            elif kind == "message" and isinstance(value, tuple) and value[2]:
                messages.append((str(value[0]), bytes(value[1])))
            if time.monotonic() >= deadline:
                break
    finally:
        client.disconnect()
        client.loop_stop()
    return messages


def _next(events: queue.Queue[tuple[str, object]], deadline: float, where: str) -> tuple[str, object]:
    try:
        return events.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        raise StatusFetchError(f"no answer from the broker at {where}") from None


def fetch_statuses(endpoints: Mapping[str, BrokerEndpoint], *, source: str, topics: TopicLayout,
                   timeout_s: float = 10.0) -> list[tuple[str, bytes]]:
    """Every retained status, in the root's topic form (``region/<r>/dev/<id>/status``): from the root broker
    (``source="root"``), or from each regional broker (``"regions"``), whose name then becomes the topic's region."""
    if source == "root":
        return fetch_retained(endpoints[layout.ROOT_SITE], topics.all_region_statuses, timeout_s=timeout_s)
    found: list[tuple[str, bytes]] = []
    for name, endpoint in endpoints.items():
        if name == layout.ROOT_SITE:
            continue
        for topic, payload in fetch_retained(endpoint, topics.all_device_statuses, timeout_s=timeout_s):
            source_of = topics.status_source(topic)
            if source_of is not None:
                found.append((topics.region_device_status(name, source_of[1]), payload))
    return found
