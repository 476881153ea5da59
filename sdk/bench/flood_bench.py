"""Flood resistance: honest devices' round time on real Mosquitto while one device account floods its update topic.

One run builds a fresh fleet on loopback from a generated topology (root +
one region ``eu`` bridged to it, ACLs, passwords, the generated broker
limits) started with :class:`~sdk.demo.brokers.BrokerSet`. The region's
:class:`~sdk.aggregator.mqtt_service.RegionalService` runs in its **own
subprocess** with the default configuration (bounded influence, per-sender
limits). This process plays the root (it publishes the signed G_0 on the
region's root-model topic) and ``devices`` honest device clients (paho, their
own accounts and Ed25519 keys, updates sealed in advance), which publish the
moment the region's model reaches them and resend the same bytes every
``receipt_timeout_s`` until their signed receipt arrives, as the device
agent does. One more account, the **flooder**, is a registered device too.

Variants, alternated and reported as medians:

- ``baseline``: the flooder sends its update once, like everyone else.
- ``flood``: the flooder publishes ``flood`` copies of its (validly signed)
  update at QoS 1 as fast as paho lets it, starting before the round does,
  so its messages are queued ahead of and among the honest ones. Every copy
  that reached the aggregator would cost a signature check, a decryption and
  a store lookup.
- ``flood-unlimited``: the same flood with the aggregator's per-sender limits
  lifted (rate 1e9/s, burst 10^6): what the limits buy.

Timed on the monotonic clock, from G_0's publish to the region's aggregate on
its broker (the round closes at quorum = every honest device + the flooder):
``round_s``; per honest device, publish -> receipt. Also counted: honest
resends, messages the aggregator's inbox dropped before opening them, and
Mosquitto's own "dropped" log lines.
"""

from __future__ import annotations

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

from sdk.bench.flood_clients import FLEET, FLOODER, REGION, Flooder, HonestDevices, client, password, seed
from sdk.bench.round_bench import SPEC_CNN

ROOT_ACCOUNT = "root-agg"
REGION_ACCOUNT = f"{REGION}-agg"
BUNDLE_VERSION = 1
DELTA_SCALE = 0.01
MESSAGE_SIZE_LIMIT = 1024 * 1024
VARIANTS = ("baseline", "flood", "flood-unlimited")

_REGION_CHILD = textwrap.dedent(
    """
    import hashlib, json, sys, threading
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from device_agent.protocol.topics import TopicLayout
    from sdk.aggregator import RegionalAggregator, RegionalConfig, RoundPolicy
    from sdk.aggregator.mqtt_service import RegionalService
    from sdk.aggregator.service_config import BrokerSettings, LoopSettings
    cfg = json.loads(sys.argv[1])
    def seed(label):
        return hashlib.sha256(f"fedge-flood-bench:{label}".encode()).digest()
    config = RegionalConfig(
        fleet=cfg["fleet"], region=cfg["region"],
        encryption_key=X25519PrivateKey.from_private_bytes(seed("x25519:" + cfg["region"])),
        signing_key=Ed25519PrivateKey.from_private_bytes(seed("ed25519:" + cfg["region"])),
        device_keys={d: Ed25519PrivateKey.from_private_bytes(seed("ed25519:" + d)).public_key() for d in cfg["devices"]},
        root_verify_key=Ed25519PrivateKey.from_private_bytes(seed("ed25519:root")).public_key(),
        root_encryption_key=X25519PrivateKey.from_private_bytes(seed("x25519:root")).public_key(),
        spec={name: (tuple(shape), "float32") for name, shape in cfg["spec"].items()}, bundle_version=cfg["bundle_version"],
        policy=RoundPolicy(quorum=len(cfg["devices"]), deadline_s=3600.0),
    )
    broker = BrokerSettings(host="127.0.0.1", port=cfg["port"], client_id=cfg["account"] + "-svc", username=cfg["account"],
                            password=cfg["password"], share_group=cfg["region"] + "-aggregators",
                            max_packet_size=cfg["max_packet_size"])
    loop = LoopSettings(tick_s=0.05, flush_every_s=5.0, **cfg["limits"])
    stop = threading.Event()
    with RegionalAggregator.open(cfg["store"], config) as aggregator:
        service = RegionalService(aggregator, region=cfg["region"], layout=TopicLayout(fleet=cfg["fleet"]), broker=broker, loop=loop)
        def announce():
            if service.subscribed.wait(30):
                print(json.dumps({"ready": True}), flush=True)
            sys.stdin.readline()  # the parent writes a line (or closes stdin) to stop
            stop.set()
        threading.Thread(target=announce, daemon=True).start()
        report = service.run(stop, max_seconds=cfg["max_seconds"])
        status = aggregator.status()
    print(json.dumps({"service": dict(report.counters), "aggregator": dict(status.counters)}), flush=True)
    """
)


@dataclass(frozen=True, kw_only=True)
class FloodRun:
    """The raw figures of one round: seconds from G_0's publish; per honest device publish -> receipt latencies."""

    round_s: float
    honest_s: float
    latencies_s: list[float]
    honest_accepted: int
    honest_resends: int
    flood_published: int
    flood_s: float
    inbox_dropped: int
    flood_opened: int
    broker_drop_lines: int
    broker_drop_clients: list[str]


@dataclass(frozen=True, kw_only=True)
class FloodFigures:
    """Median figures of one variant over the repeats (latencies pooled before the percentiles).

    ``honest_s``: G_0 published -> the last honest device's accepted receipt (the honest devices' round).
    ``round_s``: G_0 published -> the region's aggregate (quorum includes the flooder's own update, which its
    own flood delays: the per-sender limit spends its burst on the flood).
    """

    honest_s: float
    round_s: float
    receipt_p50_ms: float
    receipt_max_ms: float
    honest_accepted: int
    honest_resends: int
    flood_published: int
    flood_s: float
    inbox_dropped: int
    flood_opened: int
    broker_drop_lines: int


@dataclass(frozen=True, kw_only=True)
class FloodBenchRow:
    """One model: each variant's figures and the flood/baseline ratio of the honest devices' round time."""

    model: str
    parameters: int
    update_bytes: int
    devices: int
    flood: int
    receipt_timeout_s: float
    repeats: int
    variants: dict[str, FloodFigures]
    flood_over_baseline: float | None


def _sealed(spec: Mapping[str, tuple[int, ...]], devices: list[str]) -> dict[str, tuple[bytes, bytes]]:
    """device id -> (its sealed round-0 update, its nonce)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from device_agent.protocol.envelope import seal_update
    from device_agent.protocol.headers import UpdateHeader

    recipient = X25519PrivateKey.from_private_bytes(seed(f"x25519:{REGION}")).public_key()
    sealed = {}
    for i, device in enumerate(devices):
        rng = np.random.default_rng(2000 + i)
        delta = {name: rng.normal(scale=DELTA_SCALE, size=shape).astype(np.float32) for name, shape in spec.items()}
        header = UpdateHeader.create(fleet=FLEET, sender=device, region=REGION, round=0, bundle_version=BUNDLE_VERSION,
                                     sample_count=20 + (i * 37) % 200)
        sealed[device] = (seal_update(header, delta, recipient_public_key=recipient,
                                      sender_key=Ed25519PrivateKey.from_private_bytes(seed(f"ed25519:{device}"))), header.nonce)
    return sealed


def _root_model(spec: Mapping[str, tuple[int, ...]]) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_agent.protocol.envelope import sign_model
    from device_agent.protocol.headers import ModelHeader

    header = ModelHeader.create(fleet=FLEET, sender="root", round=0, bundle_version=BUNDLE_VERSION)
    params = {name: np.zeros(shape, dtype=np.float32) for name, shape in spec.items()}
    return sign_model(header, params, signer_key=Ed25519PrivateKey.from_private_bytes(seed("ed25519:root")))


def _topology(devices: list[str]):  # -> Topology
    from sdk.broker_config import BrokerAddress, Region, RootBroker, Topology
    from sdk.demo.brokers import LOOPBACK, free_port

    def address() -> BrokerAddress:
        return BrokerAddress(host=LOOPBACK, bind=LOOPBACK, port=free_port(), tls_port=free_port())

    return Topology(fleet=FLEET, root=RootBroker(address=address(), aggregators=(ROOT_ACCOUNT,)),
                    regions=(Region(name=REGION, address=address(), aggregators=(REGION_ACCOUNT,), devices=tuple(devices)),),
                    message_size_limit=MESSAGE_SIZE_LIMIT)


def _accepted(receipts: Mapping[str, tuple[float, bytes]], sealed: Mapping[str, tuple[bytes, bytes]]) -> int:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_agent.protocol.receipts import ReceiptStatus, open_receipt

    key = Ed25519PrivateKey.from_private_bytes(seed(f"ed25519:{REGION}")).public_key()
    count = 0
    for device, (_, blob) in receipts.items():
        receipt = open_receipt(blob, trusted_signers=[key])
        count += receipt.device == device and receipt.update_nonce == sealed[device][1] and receipt.status is ReceiptStatus.ACCEPTED
    return count


def run_flood_round(spec: Mapping[str, tuple[int, ...]], *, devices: int, flood: int, variant: str,
                    receipt_timeout_s: float = 5.0, timeout_s: float = 120.0) -> FloodRun:
    """One fresh fleet, one round with (or without) the flood; RuntimeError when the round does not close in time."""
    from device_agent.protocol.topics import TopicLayout
    from sdk.broker_config import generate_topology
    from sdk.demo.brokers import BrokerSet, broker_owner

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    honest = [f"{REGION}-dev-{i}" for i in range(devices)]
    sealed = _sealed(spec, [*honest, FLOODER])
    flood_blob, flood_nonce = sealed.pop(FLOODER)
    layout = TopicLayout(fleet=FLEET)
    work = Path(tempfile.mkdtemp(prefix="fedge-floodbench-"))
    if os.geteuid() == 0:
        work.chmod(0o711)
    child: subprocess.Popen[str] | None = None
    parts: list = []
    try:
        generated = generate_topology(_topology([*honest, FLOODER]), work / "brokers", owner=broker_owner())
        port = generated.topology.regions[0].address.port
        with BrokerSet(generated) as brokers:
            limits = {} if variant != "flood-unlimited" else {"sender_rate_per_s": 1e9, "sender_burst": 1_000_000}
            cfg = {"fleet": FLEET, "region": REGION, "devices": [*honest, FLOODER], "spec": {k: list(v) for k, v in spec.items()},
                   "bundle_version": BUNDLE_VERSION, "port": port, "account": REGION_ACCOUNT,
                   "password": password(generated, REGION_ACCOUNT), "max_packet_size": MESSAGE_SIZE_LIMIT,
                   "store": str(work / f"{REGION}.sqlite"), "max_seconds": timeout_s + 30, "limits": limits}
            env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
            child = subprocess.Popen([sys.executable, "-c", _REGION_CHILD, json.dumps(cfg)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            if not (child.stdout and child.stdout.readline().strip()):
                child.wait(10)
                raise RuntimeError(f"regional service did not start:\n{child.stderr.read()[-2000:] if child.stderr else ''}")
            devices_ = HonestDevices(generated, sealed, port=port, receipt_timeout_s=receipt_timeout_s)
            parts.append(devices_)
            flooder = Flooder(generated, flood_blob, flood_nonce, port=port, count=flood if variant != "baseline" else 1,
                               receipt_timeout_s=receipt_timeout_s)
            parts.append(flooder)
            closed = threading.Event()
            watcher = client(generated, REGION_ACCOUNT, port,
                              on_connect=lambda c, *a: c.subscribe(layout.region_aggregate(REGION), 1),
                              on_message=lambda *a: closed.set())
            parts.append(watcher)
            deadline = time.monotonic() + 30
            while len(devices_.subscribed) < devices or not flooder.connected.is_set():
                if time.monotonic() > deadline:
                    raise RuntimeError("bench clients did not connect and subscribe within 30 s")
                time.sleep(0.02)
            time.sleep(0.3)  # the watcher's subscription
            if variant != "baseline":
                flooder.start()
                while flooder.acked < flood // 10 and flooder.alive():
                    time.sleep(0.001)  # the flood is under way, ahead of every honest update
            model_at = time.monotonic()
            watcher.publish(layout.root_model, _root_model(spec), qos=1, retain=True)
            end = model_at + timeout_s
            if variant == "baseline":  # the same account, sending its one update once the round is open, like the others
                while not devices_.published_at and time.monotonic() < end:
                    time.sleep(0.001)
                flooder.start()
            while not (closed.is_set() and devices_.done.is_set()):
                if time.monotonic() > end:
                    raise RuntimeError(f"{variant}: round did not close in {timeout_s:g} s "
                                       f"({len(devices_.receipts)}/{devices} honest receipts)")
                devices_.resend_due()
                closed.wait(0.05)
            closed_at = time.monotonic()
            while flooder.alive() and not (flooder.finished_at and flooder.accepted.is_set()) and time.monotonic() < end:
                time.sleep(0.01)  # the whole flood goes out; the round closed, so the flooder's receipt is on the way
            flooder.stop()
            flooder.join(10.0)
            out, err = child.communicate("stop\n", timeout=60.0)
            report = json.loads(out.strip().splitlines()[-1])
            broker_log = "".join(b.log_file.read_text(errors="replace") for b in brokers.brokers)
    finally:
        for part in parts:
            if hasattr(part, "stop"):
                part.stop()
            else:
                part.disconnect()
                part.loop_stop()
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        shutil.rmtree(work, ignore_errors=True)
    drops = [line for line in broker_log.splitlines() if "dropped" in line]
    aggregator = report["aggregator"]
    opened = sum(n for name, n in aggregator.items() if name.startswith("rejected:") or name == "duplicate")
    return FloodRun(
        round_s=closed_at - model_at, honest_s=max(at for at, _ in devices_.receipts.values()) - model_at,
        latencies_s=[devices_.receipts[d][0] - devices_.published_at[d] for d in honest],
        honest_accepted=_accepted(devices_.receipts, sealed), honest_resends=devices_.resends,
        flood_published=flooder.published, flood_s=flooder.finished_at - flooder.started_at,
        inbox_dropped=sum(n for name, n in report["service"].items() if name.startswith("inbox:")),
        flood_opened=opened, broker_drop_lines=len(drops), broker_drop_clients=sorted({line.rsplit(" ", 1)[-1].rstrip(".")
                                                                                           for line in drops}),
    )


def run_flood_bench(*, models: Mapping[str, Mapping[str, tuple[int, ...]]] | None = None, devices: int = 20,
                    flood: int = 10_000, repeats: int = 3, variants: tuple[str, ...] = VARIANTS,
                    receipt_timeout_s: float = 5.0, progress: Callable[[int], object] | None = None) -> list[FloodBenchRow]:
    """Every (model, variant) ``repeats`` times, variants alternating; median rows. RuntimeError when an honest device
    lacks an accepted receipt."""
    if not variants or not set(variants) <= set(VARIANTS):
        raise ValueError(f"variants must be drawn from {VARIANTS}, got {variants}")
    if repeats < 1 or devices < 1 or flood < 1:
        raise ValueError("repeats, devices and flood must be >= 1")
    rows = []
    for name, spec in (models or {"cnn-15k": SPEC_CNN}).items():
        runs: dict[str, list[FloodRun]] = {v: [] for v in variants}
        for _ in range(repeats):
            for variant in variants:
                result = run_flood_round(spec, devices=devices, flood=flood, variant=variant, receipt_timeout_s=receipt_timeout_s)
                if result.honest_accepted != devices:
                    raise RuntimeError(f"{name}/{variant}: {result.honest_accepted} of {devices} honest devices accepted")
                runs[variant].append(result)
                if progress is not None:
                    progress(1)
        figures = {}
        for variant, rs in runs.items():
            pooled = np.asarray([lat for r in rs for lat in r.latencies_s])
            figures[variant] = FloodFigures(
                honest_s=statistics.median(r.honest_s for r in rs), round_s=statistics.median(r.round_s for r in rs), receipt_p50_ms=float(1000 * np.percentile(pooled, 50)),
                receipt_max_ms=float(1000 * pooled.max()), honest_accepted=min(r.honest_accepted for r in rs),
                honest_resends=int(statistics.median(r.honest_resends for r in rs)),
                flood_published=int(statistics.median(r.flood_published for r in rs)),
                flood_s=statistics.median(r.flood_s for r in rs),
                inbox_dropped=int(statistics.median(r.inbox_dropped for r in rs)),
                flood_opened=int(statistics.median(r.flood_opened for r in rs)),
                broker_drop_lines=int(statistics.median(r.broker_drop_lines for r in rs)),
            )
        ratio = (figures["flood"].honest_s / figures["baseline"].honest_s) if {"flood", "baseline"} <= set(figures) else None
        rows.append(FloodBenchRow(model=name, parameters=sum(math.prod(s) for s in spec.values()),
                                  update_bytes=len(_sealed(spec, [FLOODER])[FLOODER][0]), devices=devices, flood=flood,
                                  receipt_timeout_s=receipt_timeout_s, repeats=repeats, variants=figures,
                                  flood_over_baseline=ratio))
    return rows


def format_table(rows: list[FloodBenchRow]) -> str:
    """A plain-text table: one line per (model, variant)."""
    head = (f"{'model':9s} {'variant':16s} {'honest s':>8s} {'round s':>8s} {'receipt p50 ms':>15s} {'max ms':>8s} {'resends':>8s} "
            f"{'flood sent':>10s} {'flood s':>8s} {'inbox drop':>10s} {'opened':>7s} {'broker drop':>11s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        for v, f in r.variants.items():
            lines.append(f"{r.model:9s} {v:16s} {f.honest_s:8.3f} {f.round_s:8.3f} {f.receipt_p50_ms:15.1f} {f.receipt_max_ms:8.1f} "
                         f"{f.honest_resends:8d} {f.flood_published:10d} {f.flood_s:8.2f} {f.inbox_dropped:10d} "
                         f"{f.flood_opened:7d} {f.broker_drop_lines:11d}")
        ratio = "" if r.flood_over_baseline is None else f"; honest round time flood/baseline {r.flood_over_baseline:.2f}x"
        lines.append(f"{'':9s} {r.devices} honest devices + 1 flooder ({r.flood} messages of {r.update_bytes} B), "
                     f"receipt timeout {r.receipt_timeout_s:g} s, accepted {min(f.honest_accepted for f in r.variants.values())}"
                     f"/{r.devices}{ratio}")
    return "\n".join(lines)


def write_json(rows: list[FloodBenchRow], path: Path) -> None:
    """Write rows plus machine info as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "flood",
           "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
           "rows": [asdict(r) for r in rows]}
    path.write_text(json.dumps(doc, indent=2))
