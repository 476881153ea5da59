"""The root and regional aggregator services of the demo, each in its own thread.

The aggregator is opened inside the thread that runs its service, so its
SQLite connection never crosses threads. Stores live in the demo's work
directory; rounds close at quorum (every device of the region; every region
at the root) or at the deadline.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from device_agent.protocol.topics import TopicLayout
from sdk.aggregator import RegionalAggregator, RegionalConfig, RootAggregator, RootConfig, RoundPolicy
from sdk.aggregator.mqtt_service import MqttAggregatorService, RegionalService, RootService, ServiceReport
from sdk.aggregator.service_config import BrokerSettings, LoopSettings
from sdk.demo.brokers import LOOPBACK
from sdk.demo.fleet import FLEET, MESSAGE_SIZE_LIMIT, ROOT_ACCOUNT, DemoFleet, aggregator_account
from sdk.demo.settings import DemoError

logger = logging.getLogger(__name__)

LAYOUT = TopicLayout(fleet=FLEET)
_LOOP = LoopSettings(tick_s=0.05, flush_every_s=5.0)
_Build = Callable[[], tuple[MqttAggregatorService, Any]]


class ServiceThread:
    """Runs the service ``build()`` returns (with its aggregator, a context manager) in a daemon thread."""

    def __init__(self, name: str, build: _Build, *, max_seconds: float) -> None:
        self.name = name
        self.report: ServiceReport | None = None
        self.error: BaseException | None = None
        self._build = build
        self._max_seconds = max_seconds
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._service: MqttAggregatorService | None = None
        self._thread = threading.Thread(target=self._main, name=f"fedge-demo-{name}", daemon=True)

    def _main(self) -> None:
        try:
            service, aggregator = self._build()
            with aggregator:
                self._service = service
                self._ready.set()
                self.report = service.run(self._stop, max_seconds=self._max_seconds)
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that waits on this one
            logger.exception("aggregator service %s failed", self.name)
            self.error = exc
        finally:
            self._ready.set()

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the thread; return once the service has subscribed (DemoError if it fails or times out)."""
        self._thread.start()
        if not self._ready.wait(timeout_s) or self.error is not None or self._service is None:
            raise DemoError(f"aggregator service {self.name} did not start: {self.error}")
        if not self._service.subscribed.wait(timeout_s):
            raise DemoError(f"aggregator service {self.name} did not subscribe within {timeout_s:g} s")

    @property
    def service(self) -> MqttAggregatorService | None:
        """The running service (None before :meth:`start` returned), e.g. to serve its metrics."""
        return self._service

    @property
    def alive(self) -> bool:
        """Whether the service thread is still running."""
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the service to stop and wait for its thread (it disconnects and writes its counters)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("aggregator service %s did not stop within %g s", self.name, timeout_s)


def _broker(fleet: DemoFleet, *, broker: str, username: str, share_group: str | None) -> BrokerSettings:
    return BrokerSettings(host=LOOPBACK, port=fleet.port(broker), client_id=f"{username}-svc", username=username,
                          password=fleet.password(username), share_group=share_group, max_packet_size=MESSAGE_SIZE_LIMIT)


def _frames(frames: frozenset[int] | None) -> dict[str, Any]:
    return {} if frames is None else {"update_frames": frames, "announce_frames": True}


def regional_thread(fleet: DemoFleet, region: str, *, spec: Mapping[str, Any], bundle_version: int,
                    deadline_s: float, max_seconds: float, shared: bool = True,
                    frames: frozenset[int] | None = None) -> ServiceThread:
    """The aggregator service of ``region``: quorum = all its devices, plain mean, regional_weight 0.

    ``shared`` False subscribes directly instead of through ``$share/`` (the embedded broker has no shared subscriptions).
    ``frames``: open only these frame versions and announce them in the models (None: the defaults, docs/protocol.md).
    """
    devices = fleet.devices_in(region)
    keys = fleet.region_keys[region]
    config = RegionalConfig(
        fleet=FLEET, region=region, encryption_key=keys.encryption, signing_key=keys.signing, spec=dict(spec),
        bundle_version=bundle_version, policy=RoundPolicy(quorum=len(devices), deadline_s=deadline_s),
        device_keys={d.device_id: d.public_key for d in devices},
        root_verify_key=fleet.root_keys.signing.public_key(), root_encryption_key=fleet.root_keys.encryption.public_key(),
        **_frames(frames),
    )
    account = aggregator_account(region)
    broker = _broker(fleet, broker=region, username=account, share_group=f"{region}-aggregators" if shared else None)
    store = fleet.workdir / "aggregators" / f"{region}.sqlite"

    def build() -> tuple[MqttAggregatorService, Any]:
        aggregator = RegionalAggregator.open(store, config)
        return RegionalService(aggregator, region=region, layout=LAYOUT, broker=broker, loop=_LOOP), aggregator

    return ServiceThread(f"region-{region}", build, max_seconds=max_seconds)


def root_thread(fleet: DemoFleet, *, initial: Mapping[str, np.ndarray], spec: Mapping[str, Any], bundle_version: int,
                deadline_s: float, max_seconds: float, shared: bool = True,
                frames: frozenset[int] | None = None) -> ServiceThread:
    """The root service: quorum = every region, sample-weighted mean of the regions' deltas; round 0 = ``initial``.

    ``shared``, ``frames``: as for :func:`regional_thread`.
    """
    config = RootConfig(
        fleet=FLEET, encryption_key=fleet.root_keys.encryption, signing_key=fleet.root_keys.signing, spec=dict(spec),
        bundle_version=bundle_version, policy=RoundPolicy(quorum=len(fleet.regions), deadline_s=deadline_s, min_updates=0),
        region_keys={name: keys.signing.public_key() for name, keys in fleet.region_keys.items()},
        **_frames(frames),
    )
    broker = _broker(fleet, broker="root", username=ROOT_ACCOUNT, share_group="root" if shared else None)
    store = fleet.workdir / "aggregators" / "root.sqlite"

    def build() -> tuple[MqttAggregatorService, Any]:
        aggregator = RootAggregator.open(store, config)
        return RootService(aggregator, layout=LAYOUT, broker=broker, loop=_LOOP, initial_params=initial), aggregator

    return ServiceThread("root", build, max_seconds=max_seconds)
