"""The demo's zero-install broker backend: three amqtt brokers and two bridges inside this process.

Used when Mosquitto is not installed (and cannot be installed) or with
``fedge demo --broker embedded``. Each broker is an ``amqtt`` broker on its own
asyncio event loop in its own thread, listening on the generated topology's
loopback port. Each region gets a :class:`TopicBridge`, a pair of paho clients
that does what the generated Mosquitto bridge does (``render_bridge_conf``):
the region's ``<base>/region/<region>/up/#`` out to the root and the root's
``<base>/root/model/#`` in to the region, QoS 1, same topic names on both sides
(the Mosquitto topic lines are identity maps), retain flag as received.

What differs from the Mosquitto topology (dev mode only, see ``docs/demo.md``):

- **No ACLs.** Every authenticated client may publish and subscribe anywhere.
- **Passwords are checked** by amqtt's ``FileAuthPlugin`` (argon2 hashes of the
  generated passwords). That matters beyond security: amqtt queues QoS 1
  messages for offline persistent sessions only for non-anonymous clients.
- **MQTT 3.1.1 only**; amqtt delivers at the subscription's QoS.
- **No shared subscriptions**: services subscribe directly (one per tier here).
- **Retain flags.** v3.1.1 has no retain-as-published: a message delivered live
  arrives with retain 0, so a bridge forwards a model retained only when it was
  already retained when the bridge subscribed (Mosquitto bridges use a private
  protocol extension to keep the flag). amqtt also marks messages queued for an
  offline session as retained when it delivers them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt

from sdk.broker_config import GeneratedTopology
from sdk.demo.brokers import LOOPBACK
from sdk.demo.settings import DemoError

logger = logging.getLogger(__name__)

#: amqtt installs its own dependencies (pydantic, typer, websockets, ...): it is a host-side, demo-only extra.
INSTALL_HINT = "pip install 'amqtt==0.12.1'"


def amqtt_available() -> bool:
    """Whether the ``amqtt`` package can be imported."""
    try:
        import amqtt.broker  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return True


def write_password_file(path: Path, credentials: dict[str, str]) -> None:
    """``username:argon2-hash`` lines for amqtt's ``FileAuthPlugin`` (cheap parameters: a loopback demo, not a fleet)."""
    from pwdlib.hashers.argon2 import Argon2Hasher

    hasher = Argon2Hasher(time_cost=1, memory_cost=8192, parallelism=1)
    path.write_text("".join(f"{user}:{hasher.hash(password)}\n" for user, password in sorted(credentials.items())))
    path.chmod(0o600)


def bridge_password(generated: GeneratedTopology, region: str) -> str:
    """The bridge password of ``region``, read from its generated bridge file (it has no credentials file)."""
    bridge_file = generated.broker(region).bridge_file
    if bridge_file is None:
        raise DemoError(f"the generated topology has no bridge file for region {region}")
    for line in bridge_file.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "remote_password" and value.strip():
            return value.strip()
    raise DemoError(f"no remote_password in {bridge_file}")


class _SnapshotSubscriptions(dict):  # type: ignore[type-arg]
    """amqtt's subscription table, iterated over a snapshot of its keys.

    amqtt 0.12.1 iterates ``Broker._subscriptions`` while awaiting (retained
    messages replayed on every connect; broadcasts): a subscription made by
    another client at that moment raised "dictionary changed size during
    iteration" and killed that client's connect with an asyncio traceback.
    Iterating a snapshot removes the race; lookups and updates are unchanged.
    """

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(super().keys()))

    def items(self):  # type: ignore[no-untyped-def]
        return list(super().items())

    def keys(self):  # type: ignore[no-untyped-def]
        return list(super().keys())


class _ProbeNoise(logging.Filter):
    """Demotes amqtt's warnings about a device agent's MQTT 5 probe (it then speaks 3.1.1) to debug."""

    _MARKERS = ("Invalid connection from", "Will flag set, but will topic", "Invalid protocol from")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and any(m in record.getMessage() for m in self._MARKERS):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_PROBE_FILTER = _ProbeNoise()


class EmbeddedBroker:
    """One amqtt broker on ``127.0.0.1:port`` with password authentication, on its own event-loop thread.

    Exceptions that escape amqtt's own tasks are counted in :attr:`contained`
    and logged as one line each (no traceback below debug level).
    """

    def __init__(self, *, name: str, port: int, password_file: Path) -> None:
        self.name = name
        self.port = port
        self._password_file = password_file
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None
        #: Exceptions raised inside amqtt's tasks and contained by the loop's handler.
        self.contained = 0

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the loop thread and the broker; return once it accepts connections (DemoError otherwise)."""
        from amqtt.broker import Broker  # type: ignore[import-untyped]

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{LOOPBACK}:{self.port}", "max_connections": 0}},
            # Only password auth: no anonymous plugin (it would mark every session anonymous: no offline queues),
            # no $SYS or packet-logging plugins.
            "plugins": {"amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(self._password_file)}},
        }
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(self._contain)
        self._loop = loop
        logging.getLogger("amqtt.broker").addFilter(_PROBE_FILTER)
        self._thread = threading.Thread(target=loop.run_forever, name=f"fedge-embedded-{self.name}", daemon=True)
        self._thread.start()

        async def create_and_start() -> Any:
            broker = Broker(config, loop=loop)
            broker._subscriptions = _SnapshotSubscriptions()  # amqtt==0.12.1 internals: see _SnapshotSubscriptions
            await broker.start()
            return broker

        try:
            self._broker = asyncio.run_coroutine_threadsafe(create_and_start(), loop).result(timeout_s)
        except Exception as exc:
            self.stop()
            raise DemoError(f"embedded broker {self.name} did not start on port {self.port}: {exc}") from exc
        # Broker.start() returns once its listener is open; no probe connection (amqtt logs an error for each).

    def _contain(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The loop's exception handler: one warning line per exception an amqtt task left unhandled."""
        self.contained += 1
        exc = context.get("exception")
        logger.warning("embedded broker %s: %s%s (contained; the client reconnects)", self.name, context.get("message"),
                       f": {type(exc).__name__}: {exc}" if exc is not None else "")
        logger.debug("embedded broker %s: details", self.name, exc_info=exc)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Shut the broker down, stop its loop and join its thread; nothing when it is not running."""
        loop, thread, broker = self._loop, self._thread, self._broker
        self._loop = self._thread = self._broker = None
        if loop is None or thread is None:
            return
        if broker is not None and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(timeout_s)
            except Exception:  # noqa: BLE001 - still stop the loop below
                logger.warning("embedded broker %s did not shut down cleanly", self.name, exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if thread.is_alive():
            logger.warning("embedded broker %s: event-loop thread did not stop within %g s", self.name, timeout_s)
            return
        _cancel_pending(loop)
        loop.close()

    @property
    def alive(self) -> bool:
        """Whether its event-loop thread is running."""
        return self._thread is not None and self._thread.is_alive()


def _cancel_pending(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel and drain whatever tasks the broker left on its (stopped) loop, so closing it warns about nothing."""
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())


class TopicBridge:
    """A region-to-root bridge as a pair of paho clients: ``uplink`` out to the root, ``downlink`` in from it.

    Both clients keep a persistent session (clean session off) under the
    region's bridge account, so QoS 1 messages queue while either side is
    away. Forwarding happens in the receiving client's callback: it only hands
    the message to the other client's outgoing queue (paho's ``publish`` does
    not block).
    """

    def __init__(self, *, name: str, region_port: int, root_port: int, uplink: str, downlink: str,
                 username: str, password: str) -> None:
        self.name = name
        self._filters = {"region": f"{uplink}#", "root": f"{downlink}#"}
        self._subscribed = {side: threading.Event() for side in self._filters}
        self._ports = {"region": region_port, "root": root_port}
        self._clients = {side: self._client(side, username, password) for side in self._filters}
        self.forwarded = {"region": 0, "root": 0}

    def _client(self, side: str, username: str, password: str) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{self.name}-{side}", clean_session=False,
                             protocol=mqtt.MQTTv311)
        client.username_pw_set(username, password)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = lambda c, _u, _f, reason, _p: self._on_connect(side, c, reason)
        client.on_subscribe = lambda _c, _u, _m, _codes, _p: self._subscribed[side].set()
        client.on_message = lambda _c, _u, msg: self._on_message(side, msg)
        return client

    def _on_connect(self, side: str, client: mqtt.Client, reason: Any) -> None:
        if reason.is_failure:
            logger.warning("bridge %s: %s broker refused the connection: %s", self.name, side, reason)
            return
        client.subscribe(self._filters[side], qos=1)

    def _on_message(self, side: str, message: mqtt.MQTTMessage) -> None:
        other = "root" if side == "region" else "region"
        try:
            self._clients[other].publish(message.topic, message.payload, qos=1, retain=message.retain)
            self.forwarded[side] += 1
        except Exception:  # noqa: BLE001 - a callback must not raise into paho's network loop
            logger.exception("bridge %s: forwarding %s from %s failed", self.name, message.topic, side)

    def start(self, timeout_s: float = 10.0) -> None:
        """Connect both clients and return once both subscriptions are granted (DemoError otherwise)."""
        for side, client in self._clients.items():
            try:
                client.connect(LOOPBACK, self._ports[side], keepalive=30)
            except OSError as exc:
                self.stop()
                raise DemoError(f"bridge {self.name} could not reach the {side} broker: {exc}") from exc
            client.loop_start()
        for side, event in self._subscribed.items():
            if not event.wait(timeout_s):
                self.stop()
                raise DemoError(f"bridge {self.name} did not subscribe on the {side} broker within {timeout_s:g} s")

    def stop(self) -> None:
        """Disconnect both clients and join their network threads (their sessions stay on the brokers)."""
        for client in self._clients.values():
            client.disconnect()
            client.loop_stop()


class EmbeddedBrokerSet:
    """The generated topology on amqtt: root and regional brokers plus one :class:`TopicBridge` per region.

    A context manager like :class:`~sdk.demo.brokers.BrokerSet`: brokers start
    root first, then the bridges; everything stops in reverse order.
    """

    def __init__(self, generated: GeneratedTopology, *, passwords: dict[str, str], workdir: Path) -> None:
        """``passwords``: every device's and aggregator's generated password; ``workdir`` gets the password files."""
        if not amqtt_available():
            raise DemoError(f"the embedded broker needs amqtt: {INSTALL_HINT}")
        topology = generated.topology
        passwords = {**passwords, **{r.bridge_username: bridge_password(generated, r.name) for r in topology.regions}}
        base = topology.layout.base
        workdir.mkdir(parents=True, exist_ok=True)
        brokers = []
        for name, port in (("root", topology.root.address.port), *((r.name, r.address.port) for r in topology.regions)):
            users = {a.username for a in topology.accounts(name)}
            if name != "root":  # the bridge's region-side client logs in here too (Mosquitto's bridge is internal)
                users.add(topology.region(name).bridge_username)
            password_file = workdir / f"{name}.passwords"
            write_password_file(password_file, {user: passwords[user] for user in users})
            brokers.append(EmbeddedBroker(name=name, port=port, password_file=password_file))
        self.brokers: Sequence[EmbeddedBroker] = tuple(brokers)
        self.bridges: Sequence[TopicBridge] = tuple(
            TopicBridge(name=f"fedge-{topology.fleet}-{region.name}-bridge", region_port=region.address.port,
                        root_port=topology.root.address.port, uplink=f"{base}/region/{region.name}/up/",
                        downlink=f"{base}/root/model/", username=region.bridge_username,
                        password=passwords[region.bridge_username])
            for region in topology.regions
        )

    def __enter__(self) -> EmbeddedBrokerSet:
        try:
            for broker in self.brokers:
                broker.start()
                logger.info("embedded broker %s listening on %s:%d", broker.name, LOOPBACK, broker.port)
            for bridge in self.bridges:
                bridge.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the bridges, then every broker (regions first), joining every thread."""
        for bridge in self.bridges:
            bridge.stop()
        for broker in reversed(self.brokers):
            broker.stop()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
