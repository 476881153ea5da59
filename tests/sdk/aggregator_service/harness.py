"""The world around the aggregator services in tests: keys, a service thread, simulated devices, an observer.

Everything is real: Mosquitto on loopback, paho clients, the sealed-update
envelope and signatures. :class:`ServiceThread` opens the aggregator inside
its own thread (SQLite connections stay in the thread that made them) and
runs the service there with a bounded ``max_seconds``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.protocol.chunking import Reassembler, is_chunk
from device_agent.protocol.envelope import seal_update
from device_agent.protocol.headers import UpdateHeader
from device_agent.protocol.topics import TopicLayout
from sdk.aggregation.influence import InfluencePolicy
from sdk.aggregator import AggregatorStatus
from sdk.aggregator.mqtt_service import MqttAggregatorService, ServiceReport

FLEET = "itest"
BUNDLE_VERSION = 3
SPEC = {"base.weight": ((6, 4), "float32"), "base.bias": ((6,), "float32")}
WAIT = 10.0
"""Upper bound of every wait for something that should arrive."""
LAYOUT = TopicLayout(fleet=FLEET)
#: Bounds that never bind on these tests' updates (small deltas, counts < 1000), for the tests that compare with the
#: plain sample-weighted mean; the default bounds are tested in tests/sdk/aggregator/test_bounds.py and the integration tests.
LOOSE_BOUNDS = InfluencePolicy(norm="fixed", norm_bound=1e3, weight="fixed", max_sample_count=1_000_000)


@dataclass(frozen=True, kw_only=True)
class TierKeys:
    """An aggregator's two key pairs: Ed25519 to sign, X25519 to be sealed to."""

    signing: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    encryption: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)


def random_params(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Arrays of SPEC's shapes, float32."""
    return {name: (scale * rng.standard_normal(shape)).astype(np.float32) for name, (shape, _) in SPEC.items()}


def weighted_mean(deltas: list[dict[str, np.ndarray]], weights: list[int]) -> dict[str, np.ndarray]:
    """The numpy reference: sum_k n_k d_k / sum_k n_k, in float64."""
    total = float(sum(weights))
    return {name: sum(w * d[name].astype(np.float64) for d, w in zip(deltas, weights)) / total for name in SPEC}


@dataclass(kw_only=True)
class Device:
    """A simulated device: its id, key, sample count and the delta it trained."""

    device_id: str
    region: str
    samples: int
    delta: dict[str, np.ndarray]
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    def header(self, round_number: int) -> UpdateHeader:
        return UpdateHeader.create(fleet=FLEET, sender=self.device_id, region=self.region, round=round_number,
                                   bundle_version=BUNDLE_VERSION, sample_count=self.samples)

    def seal(self, header: UpdateHeader, region_key: X25519PrivateKey, delta: Mapping[str, np.ndarray] | None = None) -> bytes:
        return seal_update(header, self.delta if delta is None else delta,
                           recipient_public_key=region_key.public_key(), sender_key=self.key)


class ServiceThread:
    """Runs ``build()``'s service in a thread: ``build`` opens the aggregator there and returns (service, aggregator)."""

    def __init__(self, build: Callable[[], tuple[MqttAggregatorService, Any]], *, max_seconds: float = 40.0) -> None:
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.service: MqttAggregatorService | None = None
        self.report: ServiceReport | None = None
        self.status: AggregatorStatus | None = None
        self.error: BaseException | None = None
        self._build = build
        self._max = max_seconds
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            service, aggregator = self._build()
            with aggregator:
                self.service = service
                self.ready.set()
                self.report = service.run(self.stop_event, max_seconds=self._max)
                self.status = aggregator.status()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.error = exc
            self.ready.set()

    def start(self) -> ServiceThread:
        self._thread.start()
        assert self.ready.wait(WAIT) and self.error is None, self.error
        assert self.service is not None and self.service.subscribed.wait(WAIT), "service never subscribed"
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "service did not stop"
        if self.error is not None:
            raise self.error


class Observer:
    """A paho client (callbacks only enqueue) that publishes for devices and records what comes back."""

    def __init__(self, port: int, *, client_id: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._subacks: queue.Queue[int] = queue.Queue()
        self._connected: queue.Queue[bool] = queue.Queue()
        self._reassembler = Reassembler()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_connect = lambda c, u, f, rc, p: self._connected.put(not rc.is_failure)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subacks.put(mid)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._connected.get(timeout=WAIT)

    def subscribe(self, *topics: str) -> Observer:
        _, mid = self.client.subscribe([(t, 1) for t in topics])
        assert self._subacks.get(timeout=WAIT) == mid
        return self

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published(), f"no PUBACK for {topic}"

    def receive(self, topic_filter: Callable[[str], bool], count: int = 1) -> list[tuple[str, bytes]]:
        """The next ``count`` whole messages whose topic passes ``topic_filter`` (chunks reassembled)."""
        got: list[tuple[str, bytes]] = []
        while len(got) < count:
            topic, payload = self.messages.get(timeout=WAIT)
            if not topic_filter(topic):
                continue
            blob = self._reassembler.add(payload, sender=topic) if is_chunk(payload) else payload
            if blob is not None:
                got.append((topic, blob))
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
