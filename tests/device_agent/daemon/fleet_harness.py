"""The other side of the wire for daemon tests: key files, agent configs and a stand-in aggregator.

:class:`Responder` is a small regional aggregator on a real broker speaking
the real protocol: it reassembles chunks, opens sealed updates with
``open_update``, answers each authentic one with a ``sign_receipt`` receipt
(the same receipt again for a nonce it has seen: dedup by nonce), and
publishes retained ``sign_model`` models. Its paho callbacks only enqueue; a
worker thread does the work. :class:`Probe` is a plain client that watches one topic.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.errors import RejectedUpdateError
from device_agent.keys import save_private_key, save_public_key
from device_agent.protocol.chunking import Reassembler, is_chunk
from device_agent.protocol.envelope import OpenedUpdate, open_update, sign_model
from device_agent.protocol.headers import ModelHeader
from device_agent.protocol.receipts import Receipt, sign_receipt
from device_agent.protocol.tensor_codec import Encoding
from device_agent.protocol.topics import TopicLayout

FLEET = "itest"
REGION = "eu"
DEVICE = "eu-dev-0001"
WAIT = 10.0


@dataclass(frozen=True, kw_only=True)
class FleetKeys:
    """Every key of a one-region fleet, and where the device's copies live on disk."""

    directory: Path
    fleet: Ed25519PrivateKey
    root: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    region: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    aggregator: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    device: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    def write(self) -> FleetKeys:
        self.directory.mkdir(parents=True, exist_ok=True)
        save_public_key(self.fleet.public_key(), self.directory / "fleet.pub")
        save_public_key(self.root.public_key(), self.directory / "root.pub")
        save_public_key(self.region.public_key(), self.directory / "region.pub")
        save_public_key(self.aggregator.public_key(), self.directory / "aggregator.pub")
        save_private_key(self.device, self.directory / "device.key")
        return self


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def render_toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """TOML text for ``{section: {key: value}}``; a dict value becomes the sub-table ``[section.key]``.

    A non-table value at the top level is written as a top-level key (to test the errors it causes).
    """
    lines = [f"{k} = {_toml_value(v)}" for k, v in sections.items() if not isinstance(v, Mapping)]
    for name, table in sections.items():
        if not isinstance(table, Mapping):
            continue
        lines.append(f"[{name}]")
        subtables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, Mapping)]
        for sub, values in subtables.items():
            lines.append(f"[{name}.{sub}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def agent_sections(keys: FleetKeys, *, work: Path, port: int, bundle: Path, data: Path) -> dict[str, dict[str, Any]]:
    """A complete agent config (as sections) with test-friendly timings; tweak the dicts, then render."""
    return {
        "device": {"id": DEVICE, "fleet": FLEET, "region": REGION},
        "broker": {"host": "127.0.0.1", "port": port, "keepalive_s": 30, "connect_timeout_s": 5.0},
        "bundle": {"path": bundle, "install_dir": work / "bundle", "fleet_public_key": keys.directory / "fleet.pub"},
        "state": {"dir": work / "state"},
        "keys": {
            "device_private_key": keys.directory / "device.key",
            "aggregator_public_key": keys.directory / "aggregator.pub",
            "model_signers": [keys.directory / "root.pub", keys.directory / "region.pub"],
            "receipt_signers": [keys.directory / "region.pub"],
        },
        "data": {"path": data},
        "training": {"epochs": 1, "batch_size": 32, "seed": 0},
        "submit": {"receipt_timeout_s": 1.0, "max_attempts": 3},
        "backoff": {"initial_s": 0.05, "max_s": 0.3, "jitter": 0.5},
    }


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    path.write_text(render_toml(sections))
    return path


class Responder:
    """A stand-in regional aggregator (see the module docstring).

    ``answering`` cleared: updates are recorded but not answered (a lost
    receipt). ``reject`` set to a reason code: updates are answered rejected.
    ``on_accept(opened)`` runs on the worker thread after an accepted receipt went out.
    """

    def __init__(self, port: int, keys: FleetKeys, *, devices: Mapping[str, Ed25519PublicKey] | None = None,
                 issuer: str = "eu-agg", on_accept: Callable[[OpenedUpdate], None] | None = None) -> None:
        self.keys = keys
        self.topics = TopicLayout(fleet=FLEET)
        self.devices = dict(devices or {DEVICE: keys.device.public_key()})
        self.issuer = issuer
        self.on_accept = on_accept
        self.answering = threading.Event()
        self.answering.set()
        self.reject: str | None = None
        self.frames: list[bytes] = []
        self.blobs: list[bytes] = []
        self.opened: list[OpenedUpdate] = []
        #: Anything the worker failed on (a test's teardown expects none).
        self.errors: list[str] = []
        self.receipts_sent = 0
        #: Connections made so far (each one re-subscribes); a broker restart makes it 2.
        self.connections = 0
        self._receipts: dict[bytes, bytes] = {}
        self._reassembler = Reassembler()
        self._incoming: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"responder-{issuer}", clean_session=False)
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.on_connect = lambda c, u, f, rc, p: self._incoming.put(("$connected", b""))
        self.client.on_message = lambda c, u, m: self._incoming.put((m.topic, bytes(m.payload)))
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self._worker = threading.Thread(target=self._work, daemon=True)
        self._worker.start()
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(WAIT):
            raise TimeoutError("responder did not subscribe")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self._incoming.put(None)
        self._worker.join(WAIT)

    def publish_model(self, round_number: int, tensors: Mapping[str, np.ndarray], *, signer: Ed25519PrivateKey | None = None,
                      bundle_version: int = 1, region: str | None = REGION, encoding: Encoding = Encoding.RAW,
                      frames: tuple[int, ...] | None = None) -> bytes:
        """Sign (with the region key unless ``signer``) and publish a retained model (announcing ``frames``); its bytes."""
        header = ModelHeader.create(fleet=FLEET, sender=self.issuer, round=round_number, bundle_version=bundle_version,
                                    region=region, encoding=encoding, frames=frames)
        blob = sign_model(header, tensors, signer_key=signer or self.keys.region)
        info = self.client.publish(self.topics.global_model, blob, qos=1, retain=True)
        info.wait_for_publish(WAIT)
        return blob

    def _work(self) -> None:
        while (item := self._incoming.get()) is not None:
            topic, payload = item
            if topic == "$connected":
                self.client.subscribe(self.topics.all_device_updates, qos=1)
                self.connections += 1
                continue
            self.frames.append(payload)
            device = self.topics.device_of(topic) or ""
            try:
                blob = self._reassembler.add(payload, sender=device) if is_chunk(payload) else payload
                if blob is not None:
                    self._on_update(device, blob)
            except Exception as exc:  # noqa: BLE001 - recorded for the test to see
                self.errors.append(f"{topic}: {exc!r}")

    def _on_update(self, device: str, blob: bytes) -> None:
        self.blobs.append(blob)
        opened = open_update(blob, recipient_key=self.keys.aggregator, sender_public_key=self.devices)
        if opened.header.sender != device:
            return
        self.opened.append(opened)
        if not self.answering.is_set():
            return
        nonce = opened.header.nonce
        fresh = nonce not in self._receipts
        if fresh:
            rejection = RejectedUpdateError(self.reject) if self.reject else None
            receipt = Receipt.answering(opened.header, issuer=self.issuer, rejection=rejection)
            self._receipts[nonce] = sign_receipt(receipt, signer_key=self.keys.region)
        self.client.publish(self.topics.device_receipt(device), self._receipts[nonce], qos=1).wait_for_publish(WAIT)
        self.receipts_sent += 1
        if fresh and self.reject is None and self.on_accept is not None:
            self.on_accept(opened)


class Probe:
    """A plain paho client that records what arrives on ``topic`` (callbacks only enqueue)."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: queue.Queue[tuple[bytes, bool]] = queue.Queue()
        subscribed: queue.Queue[int] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{id(self)}")
        self.client.on_message = lambda c, u, m: self.messages.put((bytes(m.payload), bool(m.retain)))
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.put(mid)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(topic, qos=1)
        subscribed.get(timeout=WAIT)

    def next(self, timeout: float = 5.0) -> bytes:
        return self.messages.get(timeout=timeout)[0]

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
