"""The fleet benchmark's load generator: many device connections multiplexed on one thread of one process.

Run as ``python -m sdk.bench.fleet_load JOB.json`` by :mod:`sdk.bench.fleet_bench`.
Each device it plays is a provisioned device of the fleet directory (its own
Ed25519 key, MQTT account and password, the region's keys). Before anything
is timed it seals every device's update for every round (real
``seal_update``: X25519 + ChaCha20-Poly1305 to the region, Ed25519 by the
device), then opens one paho client per device on the device's regional
broker and drives all of them from one :mod:`selectors` loop through paho's
external-socket callbacks (no thread per client). It prints one JSON line
``{"ready": ...}`` once every client is subscribed. Then each device does
what the agent does without training: when the region's signed model of
round ``r < rounds`` arrives (verified with the root and region keys), it
publishes its sealed update at QoS 1 and waits for its receipt, resending
after ``receipt_timeout_s``. A line on stdin (or EOF) stops it; it then writes
every publish and receipt (monotonic times, shared across processes on
Linux) to the job's ``out`` file.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_MISC_EVERY_S = 1.0


def device_delta(spec: dict[str, tuple[int, ...]], *, index: int, round: int, seed: int) -> dict[str, np.ndarray]:
    """The update device ``index`` sends in ``round``: seeded normal noise whose L2 norm spreads around 1
    (the default first-round clip bound), so bounded influence has work to do. Drawn in name order, so the
    order of ``spec`` does not matter."""
    rng = np.random.default_rng([seed, index, round])
    size = sum(int(np.prod(shape)) for shape in spec.values())
    scale = (0.4 + 1.2 * rng.random()) / np.sqrt(size)
    return {name: rng.normal(scale=scale, size=spec[name]).astype(np.float32) for name in sorted(spec)}


def sample_count(index: int, round: int) -> int:
    """The sample count device ``index`` claims in ``round`` (uneven on purpose)."""
    return 5 + (index * 37 + round * 11) % 200


@dataclass
class _Device:
    """One simulated device: its client, its sealed updates by round, what it sent and received."""

    name: str
    client: Any
    sealed: list[tuple[bytes, bytes]]
    subscribed: bool = False
    sent: dict[int, list[float]] = field(default_factory=dict)
    receipts: list[tuple[float, bytes]] = field(default_factory=list)
    answered: set[int] = field(default_factory=set)


class LoadGenerator:
    """Every device of one job on one selector loop (module docstring)."""

    def __init__(self, job: dict[str, Any]) -> None:
        from device_agent.keys import load_verify_key
        from device_agent.protocol.topics import TopicLayout

        self.job = job
        self.layout = TopicLayout(fleet=job["fleet"])
        self.rounds = int(job["rounds"])
        self.timeout_s = float(job["receipt_timeout_s"])
        self.selector = selectors.DefaultSelector()
        self.devices: dict[str, _Device] = {}
        self.trusted = {region: [load_verify_key(Path(p)) for p in keys] for region, keys in job["model_signers"].items()}
        self._regions = {entry["id"]: entry["region"] for entry in job["devices"]}
        self.models_seen: dict[str, int] = {}
        self.resends = 0
        self.bad_models = 0
        self._sealed: dict[str, list[tuple[bytes, bytes]]] = {}

    # -- setup, not timed --------------------------------------------------------------------------

    def seal_all(self) -> float:
        """Seal every device's update for every round; the seconds it took."""
        from device_agent.keys import load_recipient_key, load_signing_key
        from device_agent.protocol.envelope import seal_update
        from device_agent.protocol.headers import MessageKind, UpdateHeader
        from sdk.fleet import layout

        spec = {name: tuple(shape) for name, shape in self.job["spec"].items()}
        started = time.monotonic()
        for entry in self.job["devices"]:
            directory = Path(entry["dir"])
            key = load_signing_key(directory / layout.DEVICE_KEY)
            recipient = load_recipient_key(directory / layout.DEVICE_AGGREGATOR_PUB)
            blobs = []
            for r in range(self.rounds):
                header = UpdateHeader.create(kind=MessageKind.UPDATE, fleet=self.job["fleet"], sender=entry["id"],
                                             region=entry["region"], round=r, bundle_version=self.job["bundle_version"],
                                             sample_count=sample_count(entry["index"], r))
                delta = device_delta(spec, index=entry["index"], round=r, seed=self.job["seed"])
                blobs.append((seal_update(header, delta, recipient_public_key=recipient, sender_key=key), header.nonce))
            self._sealed[entry["id"]] = blobs
        return time.monotonic() - started

    def connect_all(self, timeout_s: float) -> float:
        """Open every device's connection and wait for every subscription; the seconds it took (RuntimeError on timeout)."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from sdk.fleet import layout

        started = time.monotonic()
        for entry in self.job["devices"]:
            name = entry["id"]
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, clean_session=True, protocol=mqtt.MQTTv311)
            password = (Path(entry["dir"]) / layout.MQTT_PASSWORD).read_text().splitlines()[0]
            client.username_pw_set(name, password)
            client.max_inflight_messages_set(20)
            device = _Device(name=name, client=client, sealed=self._sealed[name])
            client.user_data_set(device)
            client.on_connect = self._on_connect
            client.on_subscribe = self._on_subscribe
            client.on_message = self._on_message
            client.on_socket_open = self._on_socket_open
            client.on_socket_close = self._on_socket_close
            client.on_socket_register_write = self._on_register_write
            client.on_socket_unregister_write = self._on_unregister_write
            self.devices[name] = device
            client.connect("127.0.0.1", int(entry["port"]), keepalive=300)
            self._turn(0.0)  # let CONNACKs in while the rest connect
        deadline = time.monotonic() + timeout_s
        while not all(d.subscribed for d in self.devices.values()):
            if time.monotonic() > deadline:
                missing = sum(not d.subscribed for d in self.devices.values())
                raise RuntimeError(f"{missing} of {len(self.devices)} device clients not subscribed after {timeout_s:g} s")
            self._turn(0.05)
        return time.monotonic() - started

    # -- paho callbacks (run inside loop_read/loop_write on this thread) ---------------------------

    def _on_socket_open(self, client, _userdata, sock) -> None:
        self.selector.register(sock, selectors.EVENT_READ, client)

    def _on_socket_close(self, _client, _userdata, sock) -> None:
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _on_register_write(self, client, _userdata, sock) -> None:
        self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _on_unregister_write(self, client, _userdata, sock) -> None:
        try:
            self.selector.modify(sock, selectors.EVENT_READ, client)
        except (KeyError, ValueError):
            pass

    def _on_connect(self, client, device: _Device, _flags, rc, _props) -> None:
        if rc.is_failure:
            logger.error("%s: connection refused: %s", device.name, rc)
            return
        client.subscribe([(self.layout.device_receipt(device.name), 1), (self.layout.global_model, 1)])

    def _on_subscribe(self, _client, device: _Device, *_args) -> None:
        device.subscribed = True

    def _on_message(self, client, device: _Device, msg) -> None:
        now = time.monotonic()
        if msg.topic == self.layout.global_model:
            self._on_model(client, device, bytes(msg.payload), now)
        else:
            device.receipts.append((now, bytes(msg.payload)))

    def _on_model(self, client, device: _Device, payload: bytes, now: float) -> None:
        from device_agent.errors import FedgeError
        from device_agent.protocol.envelope import open_model

        region = self._region_of(device.name)
        try:
            header = open_model(payload, trusted_signers=self.trusted[region]).header
        except (FedgeError, ValueError):
            self.bad_models += 1
            return
        key = f"{region}:{header.round}"
        self.models_seen[key] = self.models_seen.get(key, 0) + 1
        r = header.round
        if r < self.rounds and r not in device.sent:
            device.sent[r] = [now]
            client.publish(self.layout.device_update(device.name), device.sealed[r][0], qos=1)

    # -- the loop ----------------------------------------------------------------------------------

    def _region_of(self, device: str) -> str:
        return self._regions[device]

    def _turn(self, timeout: float) -> None:
        for key, events in self.selector.select(timeout):
            if key.data is None:
                continue
            client = key.data
            if events & selectors.EVENT_READ:
                client.loop_read()
            if events & selectors.EVENT_WRITE:
                client.loop_write()

    def _misc(self) -> None:
        now = time.monotonic()
        for device in self.devices.values():
            device.client.loop_misc()
            for r, attempts in device.sent.items():
                if r not in device.answered and now - attempts[-1] >= self.timeout_s:
                    if self._answered(device, r):
                        device.answered.add(r)
                        continue
                    attempts.append(now)
                    self.resends += 1
                    device.client.publish(self.layout.device_update(device.name), device.sealed[r][0], qos=1)

    def _answered(self, device: _Device, r: int) -> bool:
        from device_agent.errors import FedgeError
        from device_agent.protocol.receipts import open_receipt

        nonce = device.sealed[r][1]
        for _, blob in device.receipts:
            try:
                if open_receipt(blob, trusted_signers=self.trusted[self._region_of(device.name)]).update_nonce == nonce:
                    return True
            except (FedgeError, ValueError):
                continue
        return False

    def serve(self, stdin_fd: int) -> None:
        """Run until a line (or EOF) arrives on ``stdin_fd``."""
        self.selector.register(stdin_fd, selectors.EVENT_READ, None)
        next_misc = time.monotonic() + _MISC_EVERY_S
        while True:
            stop = False
            for key, events in self.selector.select(0.05):
                if key.data is None:
                    stop = True
                    continue
                if events & selectors.EVENT_READ:
                    key.data.loop_read()
                if events & selectors.EVENT_WRITE:
                    key.data.loop_write()
            if stop:
                return
            if time.monotonic() >= next_misc:
                self._misc()
                next_misc = time.monotonic() + _MISC_EVERY_S

    def close(self) -> None:
        """Disconnect every client (best effort, bounded)."""
        for device in self.devices.values():
            device.client.disconnect()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and len(self.selector.get_map()) > 1:
            self._turn(0.05)

    def results(self) -> dict[str, Any]:
        """What each device sent (per round: publish times) and received (receipt times and blobs, hex)."""
        return {
            "devices": {d.name: {"sent": {str(r): times for r, times in d.sent.items()},
                                 "receipts": [[at, blob.hex()] for at, blob in d.receipts]}
                        for d in self.devices.values()},
            "nonces": {d.name: [nonce.hex() for _, nonce in d.sealed] for d in self.devices.values()},
            "update_bytes": int(np.median([len(b) for d in self.devices.values() for b, _ in d.sealed])) if self.devices else 0,
            "resends": self.resends,
            "bad_models": self.bad_models,
            "models_seen": self.models_seen,
        }


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def main(argv: list[str]) -> int:
    """Entry point of the load generator process (module docstring)."""
    import resource

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s fleet-load: %(message)s")
    job = json.loads(Path(argv[0]).read_text())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 8 * len(job["devices"]) + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    generator = LoadGenerator(job)
    seal_s = generator.seal_all()
    connect_s = generator.connect_all(timeout_s=float(job["connect_timeout_s"]))
    cpu_ready = _cpu_s()
    print(json.dumps({"ready": True, "devices": len(generator.devices), "seal_s": seal_s, "connect_s": connect_s}), flush=True)
    generator.serve(sys.stdin.fileno())
    cpu_served = _cpu_s() - cpu_ready
    generator.close()
    Path(job["out"]).write_text(json.dumps({**generator.results(), "seal_s": seal_s, "connect_s": connect_s,
                                            "cpu_serving_s": cpu_served}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
