"""The flood benchmark's MQTT clients: honest devices that resend until their receipt, and the flooding account.

Both are paho clients of the generated topology's accounts (``generated`` is a
:class:`~sdk.broker_config.GeneratedTopology`); their callbacks run in paho's
threads and only record what arrives.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping

FLEET = "flood"
REGION = "eu"
FLOODER = f"{REGION}-flooder"


def password(generated, username: str) -> str:  # generated: GeneratedTopology
    """The generated MQTT password of ``username``."""
    return str(json.loads(generated.credential_files[username].read_text())["password"])


def seed(label: str) -> bytes:
    """The bench's fixed key material for ``label`` (a device, the region or the root)."""
    import hashlib

    return hashlib.sha256(f"fedge-flood-bench:{label}".encode()).digest()


def client(generated, username: str, port: int, *, inflight: int = 20, **handlers: Callable[..., None]):  # -> mqtt.Client
    """A started paho client of ``username`` on the loopback ``port`` (clean session, v3.1.1), ``handlers`` set
    (``on_connect=...``), at most ``inflight`` unacknowledged QoS 1 messages."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username, clean_session=True, protocol=mqtt.MQTTv311)
    client.username_pw_set(username, password(generated, username))
    client.max_inflight_messages_set(inflight)
    for name, handler in handlers.items():
        setattr(client, name, handler)
    client.connect_async("127.0.0.1", port, keepalive=60)
    client.loop_start()
    return client


class HonestDevices:
    """Paho clients that publish their sealed update when the region's model arrives and resend it every
    ``receipt_timeout_s`` until a receipt naming its nonce arrives (the device agent's behaviour)."""

    def __init__(self, generated, sealed: Mapping[str, tuple[bytes, bytes]], *, port: int, receipt_timeout_s: float) -> None:
        from device_agent.protocol.topics import TopicLayout

        self.layout = TopicLayout(fleet=FLEET)
        self.sealed = sealed
        self.timeout_s = receipt_timeout_s
        self.published_at: dict[str, float] = {}
        self.last_sent: dict[str, float] = {}
        self.resends = 0
        self.receipts: dict[str, tuple[float, bytes]] = {}
        self.subscribed: set[str] = set()
        self.done = threading.Event()
        self._lock = threading.Lock()
        self.clients = {d: client(generated, d, port, on_connect=self._on_connect(d), on_subscribe=self._on_subscribe(d),
                                   on_message=self._on_message(d)) for d in sealed}

    def _on_connect(self, device: str) -> Callable[..., None]:
        def callback(client, _u, _f, rc, _p) -> None:
            if not rc.is_failure:
                client.subscribe([(self.layout.device_receipt(device), 1), (self.layout.global_model, 1)])
        return callback

    def _on_subscribe(self, device: str) -> Callable[..., None]:
        def callback(*_args) -> None:
            with self._lock:
                self.subscribed.add(device)
        return callback

    def _on_message(self, device: str) -> Callable[..., None]:
        def callback(client, _u, msg) -> None:
            now = time.monotonic()
            with self._lock:
                if msg.topic == self.layout.global_model:
                    if device not in self.published_at:
                        self.published_at[device] = self.last_sent[device] = now
                        client.publish(self.layout.device_update(device), self.sealed[device][0], qos=1)
                    return
                self.receipts.setdefault(device, (now, bytes(msg.payload)))
                if len(self.receipts) == len(self.sealed):
                    self.done.set()
        return callback

    def resend_due(self) -> None:
        """Resend every update still unanswered after ``receipt_timeout_s`` (called from the bench's loop)."""
        now = time.monotonic()
        with self._lock:
            due = [d for d, at in self.last_sent.items() if d not in self.receipts and now - at >= self.timeout_s]
            for device in due:
                self.last_sent[device] = now
                self.resends += 1
                self.clients[device].publish(self.layout.device_update(device), self.sealed[device][0], qos=1)

    def stop(self) -> None:
        for client in self.clients.values():
            client.disconnect()
        for client in self.clients.values():
            client.loop_stop()


class Flooder:
    """The flooding account: publishes ``count`` copies of its sealed update at QoS 1 from its own thread, as fast
    as the broker acknowledges them (at most ``window`` unacknowledged, so the flood is on the wire, not in paho).
    It also wants its update counted: afterwards it resends one copy every ``receipt_timeout_s`` until a receipt
    says accepted (the limiter may have dropped every copy that came after the round opened)."""

    def __init__(self, generated, blob: bytes, nonce: bytes, *, port: int, count: int, receipt_timeout_s: float,
                 window: int = 200) -> None:
        from device_agent.protocol.topics import TopicLayout

        layout = TopicLayout(fleet=FLEET)
        self.topic = layout.device_update(FLOODER)
        self.blob = blob
        self.nonce = nonce
        self.count = count
        self.window = window
        self.timeout_s = receipt_timeout_s
        self.published = 0
        self.acked = 0
        self.started_at = 0.0
        self.finished_at = 0.0
        self.connected = threading.Event()
        self.accepted = threading.Event()
        self._stop = threading.Event()
        self._acks = threading.Condition()
        receipt_topic = layout.device_receipt(FLOODER)
        self.client = client(generated, FLOODER, port, inflight=window, on_publish=self._on_publish,
                              on_connect=lambda c, *a: c.subscribe(receipt_topic, 1),
                              on_subscribe=lambda *a: self.connected.set(), on_message=self._on_receipt)
        self._thread = threading.Thread(target=self._flood, name="flooder", daemon=True)

    def _on_publish(self, *_args: object) -> None:
        with self._acks:
            self.acked += 1
            self._acks.notify()

    def _on_receipt(self, _client, _userdata, msg) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from device_agent.protocol.receipts import ReceiptStatus, open_receipt

        key = Ed25519PrivateKey.from_private_bytes(seed(f"ed25519:{REGION}")).public_key()
        receipt = open_receipt(bytes(msg.payload), trusted_signers=[key])
        if receipt.update_nonce == self.nonce and receipt.status is ReceiptStatus.ACCEPTED:
            self.accepted.set()

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _flood(self) -> None:
        self.started_at = time.monotonic()
        for _ in range(self.count):
            with self._acks:
                while self.published - self.acked >= self.window and not self._stop.is_set():
                    self._acks.wait(1.0)
            self.client.publish(self.topic, self.blob, qos=1)
            self.published += 1
        with self._acks:
            while self.acked < self.published and not self._stop.is_set():
                if not self._acks.wait(30.0):
                    break
        self.finished_at = time.monotonic()
        while not self.accepted.wait(self.timeout_s) and not self._stop.is_set():
            self.client.publish(self.topic, self.blob, qos=1)

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def stop(self) -> None:
        self._stop.set()
        self.client.disconnect()
        self.client.loop_stop()
