"""End-to-end round time through Mosquitto: root model out, 50 devices' updates in, root aggregate closed.

One run builds a fresh two-tier fleet on loopback: a generated topology
(root broker + one region ``eu`` bridged to it, ACLs and passwords) started
with the demo's :class:`~sdk.demo.brokers.BrokerSet`; the region's
:class:`~sdk.aggregator.mqtt_service.RegionalService` in its **own subprocess**
(so its peak RSS, ``VmHWM``, is the aggregator's alone); the
:class:`~sdk.aggregator.mqtt_service.RootService` in a thread of this process;
and ``devices`` lightweight device clients (one paho client each, their own
MQTT account and Ed25519 key), here too. Devices do not train: each holds an
update of the shared model sealed in advance with ``seal_update`` (real keys,
not timed) and publishes it the moment the region's signed model reaches it,
then waits for its signed receipt (verified after the run).

Timed, on the monotonic clock: from the root publishing round 0's model to the
root closing the round (the regional aggregate arrived over the bridge and the
next global model was produced). Also per device: publish -> receipt latency.

Variants, alternated and reported as medians:

- ``disk``: fedge as deployed, the region's SQLite store (WAL,
  ``synchronous=FULL``) on the work directory's filesystem.
- ``tmpfs``: the same code with the store on ``/dev/shm``, so fsyncs cost
  nothing: the gap is what durability on this disk costs per round. (A store-less
  in-memory aggregator would need a second service wiring; it is not measured.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sdk.bench.aggregator_bench import SPEC_100K

FLEET = "bench"
REGION = "eu"
ROOT_ACCOUNT = "root-agg"
REGION_ACCOUNT = f"{REGION}-agg"
BUNDLE_VERSION = 1
DELTA_SCALE = 0.01
MESSAGE_SIZE_LIMIT = 1024 * 1024
VARIANTS = ("disk", "tmpfs")

#: The shared trunk of the demo's PersonalizedCNN1D(6 channels, width 32): 15,456 parameters.
SPEC_CNN: dict[str, tuple[int, ...]] = {
    "base.0.weight": (32, 6, 5),
    "base.0.bias": (32,),
    "base.3.weight": (64, 32, 5),
    "base.3.bias": (64,),
    "base.7.weight": (64, 64),
    "base.7.bias": (64,),
}
DEFAULT_MODELS: dict[str, dict[str, tuple[int, ...]]] = {"cnn-15k": SPEC_CNN, "mlp-100k": SPEC_100K}

_REGION_CHILD = textwrap.dedent(
    """
    import hashlib, json, sys, threading, time
    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from device_agent.protocol.topics import TopicLayout
    from sdk.aggregator import RegionalAggregator, RegionalConfig, RoundPolicy
    from sdk.aggregation.influence import InfluencePolicy
    from sdk.aggregator.mqtt_service import RegionalService
    from sdk.aggregator.service_config import BrokerSettings, LoopSettings
    cfg = json.loads(sys.argv[1])
    def seed(label):
        return hashlib.sha256(f"fedge-round-bench:{label}".encode()).digest()
    from sdk.bench.process_memory import status_mb
    config = RegionalConfig(
        fleet=cfg["fleet"], region=cfg["region"],
        encryption_key=X25519PrivateKey.from_private_bytes(seed("x25519:" + cfg["region"])),
        signing_key=Ed25519PrivateKey.from_private_bytes(seed("ed25519:" + cfg["region"])),
        device_keys={d: Ed25519PrivateKey.from_private_bytes(seed("ed25519:" + d)).public_key() for d in cfg["devices"]},
        root_verify_key=Ed25519PrivateKey.from_private_bytes(seed("ed25519:root")).public_key(),
        root_encryption_key=X25519PrivateKey.from_private_bytes(seed("x25519:root")).public_key(),
        spec={name: (tuple(shape), "float32") for name, shape in cfg["spec"].items()}, bundle_version=cfg["bundle_version"],
        policy=RoundPolicy(quorum=len(cfg["devices"]), deadline_s=3600.0), norm_bound=cfg["norm_bound"],
        # Fixed bounds that do not bind (same clipping work as the default), so the round matches the plain reference.
        influence=InfluencePolicy(norm="fixed", norm_bound=cfg["norm_bound"], weight="fixed", max_sample_count=1_000_000),
    )
    broker = BrokerSettings(host="127.0.0.1", port=cfg["port"], client_id=cfg["account"] + "-svc", username=cfg["account"],
                            password=cfg["password"], share_group=cfg["region"] + "-aggregators",
                            max_packet_size=cfg["max_packet_size"])
    stop = threading.Event()
    closed = {}
    class TimedRegionalService(RegionalService):
        def forward_aggregate(self):
            closed.setdefault("closing_at", time.monotonic())
            super().forward_aggregate()
            closed.setdefault("forwarded_at", time.monotonic())
    with RegionalAggregator.open(cfg["store"], config) as aggregator:
        service = TimedRegionalService(aggregator, region=cfg["region"], layout=TopicLayout(fleet=cfg["fleet"]), broker=broker,
                                       loop=LoopSettings(tick_s=0.05, flush_every_s=5.0))
        def announce():
            if service.subscribed.wait(30):
                print(json.dumps({"ready": True, "rss_ready_mb": status_mb("VmRSS")}), flush=True)
            sys.stdin.readline()  # the parent writes a line (or closes stdin) to stop
            stop.set()
        threading.Thread(target=announce, daemon=True).start()
        report = service.run(stop, max_seconds=cfg["max_seconds"])
        rejected = dict(service.counters())
    print(json.dumps({"peak_rss_mb": status_mb("VmHWM"), "ended_by": report.ended_by, "service_counters": rejected, **closed}), flush=True)
    """
)


@dataclass(frozen=True, kw_only=True)
class RoundRun:
    """The raw figures of one round (seconds from the root's model publish; per-device publish -> receipt latencies)."""

    round_s: float
    last_receipt_s: float
    latencies_s: list[float]
    accepted: int
    peak_rss_mb: float
    rss_ready_mb: float
    update_bytes: int


@dataclass(frozen=True, kw_only=True)
class VariantFigures:
    """Median figures of one variant over the repeats.

    ``round_s``: root model published -> root round closed. ``last_receipt_s``:
    root model published -> the last device's receipt arrived. Receipt
    latencies are per device, publish -> receipt, pooled over the repeats before
    taking percentiles. ``peak_rss_mb``: the regional service process's VmHWM;
    ``rss_ready_mb``: its RSS once connected and subscribed, before the round.
    """

    round_s: float
    last_receipt_s: float
    receipt_p50_ms: float
    receipt_p95_ms: float
    peak_rss_mb: float
    rss_ready_mb: float


@dataclass(frozen=True, kw_only=True)
class RoundBenchRow:
    """One model: each variant's median figures and the ratio of round times (disk / tmpfs, None without tmpfs)."""

    model: str
    parameters: int
    update_bytes: int
    devices: int
    repeats: int
    variants: dict[str, VariantFigures]
    accepted_receipts: int
    round_ratio_disk_tmpfs: float | None


def _seed(label: str) -> bytes:
    return hashlib.sha256(f"fedge-round-bench:{label}".encode()).digest()


def _device(i: int) -> str:
    return f"{REGION}-dev-{i}"


def _norm_bound(spec: Mapping[str, tuple[int, ...]]) -> float:
    return 10.0 * DELTA_SCALE * math.sqrt(sum(math.prod(s) for s in spec.values())) + 1.0


def seal_device_updates(spec: Mapping[str, tuple[int, ...]], count: int) -> dict[str, tuple[bytes, bytes]]:
    """device id -> (sealed round-0 update to the region, its nonce), from that device's key; uneven sample counts."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from device_agent.protocol.envelope import seal_update
    from device_agent.protocol.headers import MessageKind, UpdateHeader

    recipient = X25519PrivateKey.from_private_bytes(_seed(f"x25519:{REGION}")).public_key()
    sealed = {}
    for i in range(count):
        device = _device(i)
        rng = np.random.default_rng(1000 + i)
        delta = {name: rng.normal(scale=DELTA_SCALE, size=shape).astype(np.float32) for name, shape in spec.items()}
        header = UpdateHeader.create(kind=MessageKind.UPDATE, fleet=FLEET, sender=device, region=REGION, round=0,
                                     bundle_version=BUNDLE_VERSION, sample_count=5 + (i * 37) % 200)
        blob = seal_update(header, delta, recipient_public_key=recipient,
                           sender_key=Ed25519PrivateKey.from_private_bytes(_seed(f"ed25519:{device}")))
        sealed[device] = (blob, header.nonce)
    return sealed


def _topology(devices: list[str]):  # -> Topology
    from sdk.broker_config import BrokerAddress, Region, RootBroker, Topology
    from sdk.demo.brokers import LOOPBACK, free_port

    def address() -> BrokerAddress:
        return BrokerAddress(host=LOOPBACK, bind=LOOPBACK, port=free_port(), tls_port=free_port())

    return Topology(fleet=FLEET, root=RootBroker(address=address(), aggregators=(ROOT_ACCOUNT,)),
                    regions=(Region(name=REGION, address=address(), aggregators=(REGION_ACCOUNT,), devices=tuple(devices)),),
                    message_size_limit=MESSAGE_SIZE_LIMIT)


def _password(generated, username: str) -> str:  # generated: GeneratedTopology
    return str(json.loads(generated.credential_files[username].read_text())["password"])


class _Devices:
    """``count`` paho clients; each publishes its sealed update when the region's model arrives and records its receipt."""

    def __init__(self, generated, sealed: Mapping[str, tuple[bytes, bytes]], *, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from device_agent.protocol.topics import TopicLayout

        layout = TopicLayout(fleet=FLEET)
        self.sealed = sealed
        self.published_at: dict[str, float] = {}
        self.receipts: dict[str, tuple[float, bytes]] = {}
        self.all_receipts = threading.Event()
        self._subscribed: set[str] = set()
        self._lock = threading.Lock()
        self.clients = []
        for device in sealed:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device, clean_session=True, protocol=mqtt.MQTTv311)
            client.username_pw_set(device, _password(generated, device))
            client.on_connect = self._on_connect(device, layout)
            client.on_subscribe = self._on_subscribe(device)
            client.on_message = self._on_message(device, layout)
            client.connect_async("127.0.0.1", port, keepalive=60)
            self.clients.append(client)

    def _on_connect(self, device: str, layout) -> Callable[..., None]:
        def callback(client, _userdata, _flags, rc, _props) -> None:
            if not rc.is_failure:
                client.subscribe([(layout.device_receipt(device), 1), (layout.global_model, 1)])
        return callback

    def _on_subscribe(self, device: str) -> Callable[..., None]:
        def callback(*_args) -> None:
            with self._lock:
                self._subscribed.add(device)
        return callback

    def _on_message(self, device: str, layout) -> Callable[..., None]:
        update_topic = layout.device_update(device)

        def callback(client, _userdata, msg) -> None:
            now = time.monotonic()
            if msg.topic == layout.global_model:
                # A bench device does no work between model and update: publish here, from paho's thread.
                if device not in self.published_at:
                    self.published_at[device] = now
                    client.publish(update_topic, self.sealed[device][0], qos=1)
                return
            with self._lock:
                self.receipts.setdefault(device, (now, bytes(msg.payload)))
                if len(self.receipts) == len(self.sealed):
                    self.all_receipts.set()
        return callback

    def start(self, timeout_s: float) -> None:
        """Start every client's network thread; return once all have subscribed (RuntimeError on timeout)."""
        for client in self.clients:
            client.loop_start()
        deadline = time.monotonic() + timeout_s
        while len(self._subscribed) < len(self.clients):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(self._subscribed)} of {len(self.clients)} devices subscribed in {timeout_s:g} s")
            time.sleep(0.02)

    def stop(self) -> None:
        """Disconnect every client, then join their threads (one by one, each join waits out paho's 1 s select)."""
        for client in self.clients:
            client.disconnect()
        for client in self.clients:
            client.loop_stop()


def _accepted(receipts: Mapping[str, tuple[float, bytes]], sealed: Mapping[str, tuple[bytes, bytes]]) -> int:
    """How many receipts verify against the region's key, answer that device's update, and say accepted."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_agent.protocol.receipts import ReceiptStatus, open_receipt

    region_key = Ed25519PrivateKey.from_private_bytes(_seed(f"ed25519:{REGION}")).public_key()
    count = 0
    for device, (_, blob) in receipts.items():
        receipt = open_receipt(blob, trusted_signers=[region_key])
        if receipt.device == device and receipt.update_nonce == sealed[device][1] and receipt.status is ReceiptStatus.ACCEPTED:
            count += 1
    return count


def run_one_round(spec: Mapping[str, tuple[int, ...]], *, devices: int, variant: str, timeout_s: float = 120.0) -> RoundRun:
    """One fresh fleet, one round; the raw figures of it (seconds, per-device latencies, the region child's report)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from device_agent.protocol.topics import TopicLayout
    from sdk.aggregator import RootAggregator, RootConfig, RoundPolicy
    from sdk.aggregator.mqtt_service import RootService
    from sdk.aggregator.service_config import BrokerSettings, LoopSettings
    from sdk.broker_config import generate_topology
    from sdk.demo.brokers import BrokerSet, broker_owner

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    ids = [_device(i) for i in range(devices)]
    sealed = seal_device_updates(spec, devices)
    work = Path(tempfile.mkdtemp(prefix="fedge-roundbench-"))
    store_dir = Path(tempfile.mkdtemp(prefix="fedge-roundbench-", dir="/dev/shm")) if variant == "tmpfs" else work
    if os.geteuid() == 0:
        work.chmod(0o711)  # a root-started Mosquitto drops to user mosquitto and must reach its files
    child: subprocess.Popen[str] | None = None
    stop_root = threading.Event()
    fleet_devices: _Devices | None = None
    try:
        generated = generate_topology(_topology(ids), work / "brokers", owner=broker_owner())
        ports = {"root": generated.topology.root.address.port, REGION: generated.topology.regions[0].address.port}
        with BrokerSet(generated):
            cfg = {"fleet": FLEET, "region": REGION, "devices": ids, "spec": {k: list(v) for k, v in spec.items()},
                   "bundle_version": BUNDLE_VERSION, "norm_bound": _norm_bound(spec), "port": ports[REGION],
                   "account": REGION_ACCOUNT, "password": _password(generated, REGION_ACCOUNT),
                   "max_packet_size": MESSAGE_SIZE_LIMIT, "store": str(store_dir / f"{REGION}.sqlite"), "max_seconds": timeout_s}
            env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
            child = subprocess.Popen([sys.executable, "-c", _REGION_CHILD, json.dumps(cfg)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            ready_line = child.stdout.readline() if child.stdout else ""
            if not ready_line.strip():
                child.wait(10)
                raise RuntimeError(f"regional service did not start:\n{child.stderr.read()[-2000:] if child.stderr else ''}")
            ready = json.loads(ready_line)

            fleet_devices = _Devices(generated, sealed, port=ports[REGION])
            fleet_devices.start(timeout_s=30.0)

            times: dict[str, float] = {}
            closed = threading.Event()

            class TimedRootService(RootService):
                def on_connected(self, first: bool) -> None:
                    times.setdefault("model_published_at", time.monotonic())
                    super().on_connected(first)

                def on_tick(self) -> None:
                    closing = self.aggregator.should_close()
                    super().on_tick()
                    if closing and not closed.is_set():
                        times["closed_at"] = time.monotonic()
                        closed.set()

            root_config = RootConfig(
                fleet=FLEET, encryption_key=X25519PrivateKey.from_private_bytes(_seed("x25519:root")),
                signing_key=Ed25519PrivateKey.from_private_bytes(_seed("ed25519:root")),
                spec={name: (shape, "float32") for name, shape in spec.items()}, bundle_version=BUNDLE_VERSION,
                policy=RoundPolicy(quorum=1, deadline_s=3600.0, min_updates=0),
                region_keys={REGION: Ed25519PrivateKey.from_private_bytes(_seed(f"ed25519:{REGION}")).public_key()},
            )
            broker = BrokerSettings(host="127.0.0.1", port=ports["root"], client_id=f"{ROOT_ACCOUNT}-svc", username=ROOT_ACCOUNT,
                                    password=_password(generated, ROOT_ACCOUNT), share_group="root",
                                    max_packet_size=MESSAGE_SIZE_LIMIT)
            initial = {name: np.zeros(shape, dtype=np.float32) for name, shape in spec.items()}
            root_error: list[BaseException] = []

            def serve_root() -> None:
                try:
                    with RootAggregator.open(work / "root.sqlite", root_config) as root:
                        TimedRootService(root, layout=TopicLayout(fleet=FLEET), broker=broker, initial_params=initial,
                                         loop=LoopSettings(tick_s=0.05, flush_every_s=5.0)).run(stop_root, max_seconds=timeout_s)
                except BaseException as exc:  # noqa: BLE001 - reported by the waiting thread
                    root_error.append(exc)
                    closed.set()

            root_thread = threading.Thread(target=serve_root, name="round-bench-root", daemon=True)
            root_thread.start()
            finished = closed.wait(timeout_s) and fleet_devices.all_receipts.wait(10.0)
            stop_root.set()
            root_thread.join(10.0)
            out, err = child.communicate("stop\n", timeout=30.0)
            if root_error:
                raise RuntimeError(f"root service failed: {root_error[0]!r}") from root_error[0]
            if not finished or "closed_at" not in times:
                raise RuntimeError(f"round did not close within {timeout_s:g} s: {len(fleet_devices.receipts)}/{devices} receipts, "
                                   f"region log:\n{err[-2000:]}")
            region = json.loads(out.strip().splitlines()[-1])
    finally:
        if fleet_devices is not None:
            fleet_devices.stop()
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        shutil.rmtree(work, ignore_errors=True)
        if store_dir != work:
            shutil.rmtree(store_dir, ignore_errors=True)
    t0 = times["model_published_at"]
    latencies = [fleet_devices.receipts[d][0] - fleet_devices.published_at[d] for d in ids if d in fleet_devices.receipts]
    return RoundRun(round_s=times["closed_at"] - t0, last_receipt_s=max(at for at, _ in fleet_devices.receipts.values()) - t0,
                    latencies_s=latencies, accepted=_accepted(fleet_devices.receipts, sealed),
                    peak_rss_mb=float(region["peak_rss_mb"]), rss_ready_mb=float(ready["rss_ready_mb"]),
                    update_bytes=int(statistics.median(len(b) for b, _ in sealed.values())))


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def run_round_bench(
    *, models: Mapping[str, Mapping[str, tuple[int, ...]]] = DEFAULT_MODELS, devices: int = 50, repeats: int = 3,
    variants: tuple[str, ...] = VARIANTS, progress: Callable[[int], object] | None = None,
) -> list[RoundBenchRow]:
    """Run every (model, variant) ``repeats`` times, variants alternating, and return median rows.

    RuntimeError when a round does not close or a device lacks an accepted receipt.
    """
    if not variants or not set(variants) <= set(VARIANTS) or "disk" not in variants:
        raise ValueError(f"variants must include 'disk' and be drawn from {VARIANTS}, got {variants}")
    if repeats < 1 or devices < 1:
        raise ValueError("repeats and devices must be >= 1")
    rows = []
    for name, spec in models.items():
        runs: dict[str, list[RoundRun]] = {v: [] for v in variants}
        for _ in range(repeats):
            for variant in variants:
                result = run_one_round(spec, devices=devices, variant=variant)
                if result.accepted != devices:
                    raise RuntimeError(f"{name}/{variant}: {result.accepted} of {devices} devices got an accepted receipt")
                runs[variant].append(result)
            if progress is not None:
                progress(1)
        figures = {}
        for variant, rs in runs.items():
            pooled = [lat for r in rs for lat in r.latencies_s]
            figures[variant] = VariantFigures(
                round_s=statistics.median(r.round_s for r in rs), last_receipt_s=statistics.median(r.last_receipt_s for r in rs),
                receipt_p50_ms=1000 * _percentile(pooled, 50), receipt_p95_ms=1000 * _percentile(pooled, 95),
                peak_rss_mb=statistics.median(r.peak_rss_mb for r in rs), rss_ready_mb=statistics.median(r.rss_ready_mb for r in rs),
            )
        rows.append(RoundBenchRow(
            model=name, parameters=sum(math.prod(s) for s in spec.values()), update_bytes=runs["disk"][0].update_bytes,
            devices=devices, repeats=repeats, variants=figures,
            accepted_receipts=min(r.accepted for rs in runs.values() for r in rs),
            round_ratio_disk_tmpfs=figures["disk"].round_s / figures["tmpfs"].round_s if "tmpfs" in figures else None,
        ))
    return rows


def format_table(rows: list[RoundBenchRow]) -> str:
    """A plain-text table: one line per (model, variant), then the disk/tmpfs round-time ratio."""
    head = (f"{'model':10s} {'params':>8s} {'store':6s} {'round s':>8s} {'last receipt s':>15s} {'receipt p50 ms':>15s} "
            f"{'p95 ms':>8s} {'peak RSS MB':>12s} {'RSS ready MB':>13s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        for v, f in r.variants.items():
            lines.append(f"{r.model:10s} {r.parameters:8d} {v:6s} {f.round_s:8.3f} {f.last_receipt_s:15.3f} {f.receipt_p50_ms:15.1f} "
                         f"{f.receipt_p95_ms:8.1f} {f.peak_rss_mb:12.1f} {f.rss_ready_mb:13.1f}")
        ratio = "" if r.round_ratio_disk_tmpfs is None else f", round time disk/tmpfs {r.round_ratio_disk_tmpfs:.2f}x"
        lines.append(f"{'':10s} {r.devices} devices, {r.update_bytes} B per update, accepted receipts {r.accepted_receipts}/{r.devices}{ratio}")
    return "\n".join(lines)


def write_json(rows: list[RoundBenchRow], path: Path) -> None:
    """Write rows plus machine info as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "round",
           "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
           "rows": [asdict(r) for r in rows]}
    path.write_text(json.dumps(doc, indent=2))
