"""``fedge bench downlink``: bytes down per device per round over MQTT, compressed model deltas vs full float32.

One Mosquitto on loopback, one real :class:`~sdk.aggregator.mqtt_service.RegionalService` with
``[downlink] compression`` set, and ``devices`` light clients: a paho client each feeding the device agent's
own :class:`~device_agent.daemon.intake.MessageIntake` (signature, delta apply, base check, fallback), which
subscribes to the full model only while it needs it, as the agent does. The bench publishes the root's model
each round (a random walk: for the dense encodings the bytes do not depend on the values); every device
must reach that round's model, bit for bit the publisher's reconstruction. Bytes are the MQTT payloads each
device received (headers and signatures included), per round from round 2 on, counted by the round each message is for; rounds 0 and 1 are the join.
"""

from __future__ import annotations

import json
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.compression.spec import CompressionSpec
from device_agent.daemon.connection_types import InboundMessage
from device_agent.daemon.intake import MessageIntake
from device_agent.protocol.envelope import sign_model
from device_agent.protocol.headers import ModelHeader
from device_agent.protocol.model_delta import model_digest
from device_agent.protocol.topics import TopicLayout
from sdk.aggregator import RegionalAggregator, RegionalConfig, RoundPolicy
from sdk.aggregator.downlink import DownlinkSettings
from sdk.aggregator.mqtt_service import RegionalService
from sdk.aggregator.service_config import BrokerSettings, LoopSettings
from sdk.demo.brokers import LOOPBACK, BrokerProcess, ensure_mosquitto, free_port

FLEET, REGION = "bench", "eu"
_WAIT_S = 30.0


@dataclass(frozen=True, kw_only=True)
class DownlinkRow:
    """One (model, downlink compression) run. ``bytes_per_device_round``: the mean from round 2 on (steady state);
    ``join_bytes``: what a device received in rounds 0 and 1 (the full model, then the first delta while it still
    listened to the full model's topic, so that round's full model too)."""

    model: str
    params: int
    compression: str
    devices: int
    rounds: int
    full_message_bytes: int
    bytes_per_device_round: float
    ratio: float
    bit_equal: bool
    join_bytes: float


def model_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape of the accuracy benchmark's model (``watch``: the 1D-CNN, ``fmnist``: the 2D-CNN)."""
    from sdk.models import PersonalizedCNN1D, PersonalizedCNN2D

    model = PersonalizedCNN1D(in_channels=6, num_classes=7) if name == "watch" else PersonalizedCNN2D(in_channels=1, num_classes=10)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


class _LightDevice:
    """A paho client feeding the agent's MessageIntake; counts the payload bytes it receives."""

    def __init__(self, index: int, port: int, layout: TopicLayout, intake_args: dict) -> None:
        self.inbox: queue.Queue[InboundMessage] = queue.Queue()
        #: payload bytes received per model round (a message's round read from its header)
        self.by_round: dict[int, int] = {}
        self.layout = layout
        self.intake = MessageIntake(inbox=self.inbox, topics=layout, device_id=f"dev-{index:05d}", region=REGION, **intake_args)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-dev-{index:05d}", clean_session=False)
        self.client.on_message = self._on_message
        self._settled = threading.Event()  # set when the broker acknowledged the last (un)subscribe
        self.client.on_subscribe = lambda *_: self._settled.set()
        self.client.on_unsubscribe = lambda *_: self._settled.set()
        self._full = False
        self.intake.follow_full = self._follow_full
        self.client.connect(LOOPBACK, port)
        self.client.loop_start()
        self.client.subscribe(layout.global_model_delta, qos=1)
        self._follow_full(True)

    def _on_message(self, _c: object, _u: object, m: mqtt.MQTTMessage) -> None:
        payload = bytes(m.payload)
        if payload[:4] in (b"FDGM", b"FDGD"):  # count by the round the message is for (not by arrival time)
            round = json.loads(payload[7:7 + int.from_bytes(payload[5:7], "little")])["round"]
            self.by_round[round] = self.by_round.get(round, 0) + len(payload)
        self.inbox.put(InboundMessage(topic=m.topic, payload=bytes(m.payload), retained=bool(m.retain)))

    def _follow_full(self, wanted: bool) -> None:
        if wanted != self._full:
            self._full = wanted
            self._settled.clear()
            (self.client.subscribe(self.layout.global_model, qos=1) if wanted else self.client.unsubscribe(self.layout.global_model))

    def wait_round(self, round: int) -> None:
        def done() -> bool:
            return self.intake.latest_model is not None and self.intake.latest_model.header.round >= round
        if not self.intake.pump(time.monotonic() + _WAIT_S, done, threading.Event()):
            raise TimeoutError(f"{self.intake.ignored} no model for round {round}")
        # rounds are minutes apart in a fleet, milliseconds here: let a switch to the deltas reach the broker
        # before the next round, or its full model would count although a real device would not receive it
        if not self._settled.wait(_WAIT_S):
            raise TimeoutError("the broker did not acknowledge a subscription change")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_one(model: str, compression: str, *, devices: int, rounds: int, work: Path, binary: str) -> DownlinkRow:
    """One run on a fresh broker and store; see the module docstring."""
    shapes = model_shapes(model)
    spec = {n: (s, "float32") for n, s in shapes.items()}
    port = free_port()
    conf = work / f"{model}-{compression.replace(':', '_').replace('+', '_')}"
    conf.mkdir(parents=True)
    (conf / "mosquitto.conf").write_text(f"listener {port} {LOOPBACK}\nallow_anonymous true\nmax_queued_messages 0\n"
                                         "persistence false\n")
    broker = BrokerProcess(name="bench", binary=binary, config_file=conf / "mosquitto.conf", port=port)
    broker.start()
    root, region = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    layout = TopicLayout(fleet=FLEET)
    config = RegionalConfig(fleet=FLEET, region=REGION, encryption_key=X25519PrivateKey.generate(), signing_key=region,
                            spec=spec, bundle_version=1, policy=RoundPolicy(quorum=devices + 1, deadline_s=3600.0),
                            device_keys={}, root_verify_key=root.public_key(),
                            root_encryption_key=X25519PrivateKey.generate().public_key())
    stop, ready = threading.Event(), threading.Event()
    box: dict[str, object] = {}
    settings = DownlinkSettings(compression=CompressionSpec.parse(compression))

    def serve() -> None:  # the store is opened in the thread that uses it (SQLite)
        try:
            with RegionalAggregator.open(conf / "eu.sqlite", config) as aggregator:
                box["service"] = RegionalService(
                    aggregator, region=REGION, layout=layout, loop=LoopSettings(tick_s=0.05), downlink=settings,
                    broker=BrokerSettings(host=LOOPBACK, port=port, client_id="eu-agg", max_packet_size=64 << 20))
                ready.set()
                box["service"].run(stop)  # type: ignore[attr-defined]
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(_WAIT_S)
    if "service" not in box:
        stop.set()
        broker.stop()
        raise RuntimeError(f"the regional service did not start: {box.get('error')!r}")
    service: RegionalService = box["service"]  # type: ignore[assignment]
    clients: list[_LightDevice] = []
    try:
        if not service.subscribed.wait(_WAIT_S):
            raise TimeoutError("the regional service did not subscribe")
        intake_args = dict(bundle_version=1, spec=spec, model_signers=(region.public_key(), root.public_key()),
                           receipt_signers=(region.public_key(),))
        clients = [_LightDevice(i, port, layout, intake_args) for i in range(devices)]
        publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-root")
        publisher.connect(LOOPBACK, port)
        publisher.loop_start()
        rng = np.random.default_rng(0)
        true = {n: (0.1 * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()}
        full_size = 0
        bit_equal = True
        for number in range(rounds + 2):  # the last round only flushes: once a device has it, round ``rounds``'s
            # messages have all arrived (the region publishes in order, the broker delivers in order)
            true = {n: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in true.items()}
            blob = sign_model(ModelHeader.create(fleet=FLEET, sender="root", round=number, bundle_version=1), true,
                              signer_key=root)
            publisher.publish(layout.root_model, blob, qos=1, retain=True).wait_for_publish(_WAIT_S)
            for c in clients:
                c.wait_round(number)
            if number > rounds:
                break
            chain = service.publisher.held_model() if service.publisher is not None else None
            digest = chain.digest if chain is not None else model_digest(true)
            bit_equal &= all(c.intake.held is not None and c.intake.held.digest == digest for c in clients)
            full_size = service.publisher.last_sizes[0] if service.publisher is not None else 0
        publisher.loop_stop()
        publisher.disconnect()
        per_round = [sum(c.by_round.get(r, 0) for c in clients) for r in range(rounds + 1)]
        mean = float(np.mean(per_round[2:])) / devices
        return DownlinkRow(model=model, params=int(sum(np.prod(s) for s in shapes.values())), compression=compression,
                           devices=devices, rounds=rounds, full_message_bytes=full_size or round(mean),
                           bytes_per_device_round=mean, ratio=1.0, bit_equal=bool(bit_equal),
                           join_bytes=(per_round[0] + per_round[1]) / devices)
    finally:
        for c in clients:
            c.close()
        stop.set()
        thread.join(_WAIT_S)
        broker.stop()


def run(*, models: tuple[str, ...], specs: tuple[str, ...], devices: int, rounds: int, out: Path) -> list[DownlinkRow]:
    """Every (model, spec) run; prints a table and writes JSON to ``out``."""
    binary = ensure_mosquitto()
    work = Path(tempfile.mkdtemp(prefix="fedge-downlink-"))
    rows: list[DownlinkRow] = []
    try:
        for model in models:
            plain = run_one(model, "none", devices=devices, rounds=rounds, work=work, binary=binary)
            rows.append(plain)
            for text in specs:
                row = run_one(model, text, devices=devices, rounds=rounds, work=work, binary=binary)
                rows.append(replace(row, ratio=plain.bytes_per_device_round / row.bytes_per_device_round))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'model':8} {'params':>9} {'down':12} {'full msg B':>11} {'B/device/round':>15} {'ratio':>6} "
          f"{'join B (r0+r1)':>15} bit-equal")
    for r in rows:
        print(f"{r.model:8} {r.params:>9,} {r.compression:12} {r.full_message_bytes:>11,} {r.bytes_per_device_round:>15,.0f} "
              f"{r.ratio:>5.1f}x {r.join_bytes:>15,.0f} {r.bit_equal}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return rows
