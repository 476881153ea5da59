"""``fedge dashboard``'s web server (aiohttp): the page, its live updates, its plots.

Routes: ``/`` the page, ``/static/*`` its script and style (shipped in the
package, nothing from elsewhere), ``/events`` Server-Sent Events (one
``snapshot`` event whenever the view changed, at most every
``push_interval_s``, a comment every 15 s to keep proxies from closing the
stream), ``/api/snapshot`` the same JSON on demand, ``/plots/*.svg`` the
plots (rendered in one worker thread, at most every 2 s), ``/healthz``.

Why Server-Sent Events: the data flows one way, SSE is plain HTTP (same
port, same authentication, passes proxies), the browser reconnects by
itself, and aiohttp streams it natively; a WebSocket would add a protocol
for messages that never go upstream, and polling adds latency and load.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import ssl
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from device_agent.protocol.topics import TopicLayout
from sdk.dashboard.config import DashboardConfig
from sdk.dashboard.plots import accuracy_svg, updates_svg
from sdk.dashboard.rollout import RolloutReading, RolloutWatch
from sdk.dashboard.security import REALM, SECURITY_HEADERS, Credentials
from sdk.dashboard.sources import MonitorClient, apply_message, scrape
from sdk.dashboard.view import FleetView

logger = logging.getLogger(__name__)
_STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
_MAX_STREAMS = 64
_HEARTBEAT_S = 15.0
_PLOT_MIN_S = 2.0
_PUMP_S = 0.1
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _asset(name: str) -> bytes:
    return files("sdk.dashboard").joinpath("static", name).read_bytes()


class Dashboard:
    """The dashboard process: sources feeding a :class:`FleetView`, and the web app over it.

    ``credentials`` None serves without authentication (loopback only: see
    :func:`~sdk.dashboard.security.check_exposure`).
    """

    def __init__(self, config: DashboardConfig, *, credentials: Credentials | None = None) -> None:
        self.config = config
        self.layout = TopicLayout(fleet=config.fleet, root_prefix=config.topic_prefix)
        self.view = FleetView(fleet=config.fleet, history_rounds=config.history_rounds)
        self._credentials = credentials
        self._rollout_dir: Path | None = None
        self._rollout: RolloutWatch | None = None
        if config.release_root is not None and config.mqtt is not None:
            self._rollout_dir = Path(tempfile.mkdtemp(prefix="fedge-dashboard-tuf-"))
            self._rollout = RolloutWatch(root=config.release_root.read_bytes(), directory=self._rollout_dir,
                                         prefix=self.layout.release_metadata(""))
            self.view.apply_rollout(RolloutReading())  # configured; nothing verified yet
        self._monitor = None if config.mqtt is None else MonitorClient(config.mqtt, self.layout,
                                                                         releases=self._rollout is not None)
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._plotter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedge-dashboard-plots")
        self._plots: dict[str, tuple[int, float, bytes]] = {}
        self._plot_lock = asyncio.Lock()
        self._snapshot: tuple[int, bytes] = (-1, b"")
        self._streams = 0
        self.url = ""

    # -- lifecycle ------------------------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application (routes and middlewares)."""
        app = web.Application(middlewares=[self._headers, self._auth])
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/events", self._events)
        app.router.add_get("/api/snapshot", self._snapshot_json)
        app.router.add_get("/plots/{name}", self._plot)
        app.router.add_get("/healthz", self._health)
        return app

    async def start(self) -> str:
        """Start the sources and serve; the page's URL (the bound port when ``port`` was 0)."""
        server = self.config.server
        context = None
        if server.tls_cert_file is not None and server.tls_key_file is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(server.tls_cert_file), str(server.tls_key_file))
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, server.bind, server.port, ssl_context=context, shutdown_timeout=1.0)
        await site.start()
        port = self._runner.addresses[0][1]
        host = f"[{server.bind}]" if ":" in server.bind else server.bind
        self.url = f"{'https' if context else 'http'}://{host}:{port}/"
        if self._monitor is not None:
            self._monitor.start()
            self._tasks.append(asyncio.create_task(self._pump(self._monitor)))
        if self.config.metrics:
            self._tasks.append(asyncio.create_task(self._scrape_loop()))
        logger.info("dashboard of fleet %s on %s (%s)", self.config.fleet, self.url,
                    "basic authentication" if self._credentials else "no authentication: loopback only")
        return self.url

    async def stop(self) -> None:
        """Stop the sources and the server."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._monitor is not None:
            self._monitor.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        self._plotter.shutdown(wait=True)
        if self._rollout_dir is not None:
            shutil.rmtree(self._rollout_dir, ignore_errors=True)

    # -- sources --------------------------------------------------------------------------------

    async def _pump(self, monitor: MonitorClient) -> None:
        """Move queued MQTT messages into the view (verified on the way)."""
        config = self.config
        region = config.mqtt.region if config.mqtt is not None else None
        rollout = self._rollout
        while True:
            for _ in range(2000):
                try:
                    message = monitor.messages.get_nowait()
                except queue.Empty:
                    break
                try:
                    if rollout is not None and rollout.handles(message.topic):
                        rollout.file(message.topic, message.payload)
                    else:
                        apply_message(self.view, message, layout=self.layout, registries=config.registries,
                                      model_keys=config.model_keys, region=region)
                except Exception:  # noqa: BLE001 - one bad message must not stop the dashboard
                    logger.exception("dashboard: could not apply a message on %s", message.topic)
            if rollout is not None and rollout.due():
                try:  # a TUF refresh over what arrived: a few ms of signature checks, in this loop
                    self.view.apply_rollout(rollout.refresh(self._devices()))
                except Exception:  # noqa: BLE001 - the page must keep running whatever the metadata holds
                    logger.exception("dashboard: could not refresh the release metadata")
            await asyncio.sleep(_PUMP_S)

    def _devices(self) -> dict[str, str]:
        """device -> region, from the registries (whom a release targets)."""
        return {device: region for region, keys in self.config.registries.items() for device in keys}

    async def _scrape_loop(self) -> None:
        timeout = min(5.0, max(1.0, self.config.scrape_interval_s))
        async with aiohttp.ClientSession() as session:
            while True:
                results = await asyncio.gather(*(scrape(session, url, timeout) for url in self.config.metrics))
                for url, (reading, error) in zip(self.config.metrics, results):
                    self.view.apply_reading(url, reading, error)
                await asyncio.sleep(self.config.scrape_interval_s)

    # -- middlewares ----------------------------------------------------------------------------

    @web.middleware
    async def _headers(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(SECURITY_HEADERS)
            raise
        response.headers.update(SECURITY_HEADERS)
        return response

    @web.middleware
    async def _auth(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        if self._credentials is not None and request.path != "/healthz":
            if not self._credentials.accepts(request.headers.get("Authorization")):
                raise web.HTTPUnauthorized(headers={"WWW-Authenticate": REALM}, text="authentication required\n")
        return await handler(request)

    # -- handlers -------------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=_asset("index.html"), content_type="text/html", charset="utf-8")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC:
            raise web.HTTPNotFound()
        return web.Response(body=_asset(name), content_type=_STATIC[name], charset="utf-8")

    def snapshot_bytes(self) -> bytes:
        """The current snapshot as JSON (cached per view version)."""
        version, body = self._snapshot
        if version != self.view.version:
            snapshot = self.view.snapshot()
            snapshot["sources"] = {"mqtt_connected": None if self._monitor is None else self._monitor.connected,
                                   "mqtt_dropped": 0 if self._monitor is None else self._monitor.dropped,
                                   "history_note": "accuracy history starts when the dashboard starts"}
            body = json.dumps(snapshot, allow_nan=False, separators=(",", ":")).encode()
            self._snapshot = (self.view.version, body)
        return body

    async def _snapshot_json(self, request: web.Request) -> web.Response:
        return web.Response(body=self.snapshot_bytes(), content_type="application/json")

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if self._streams >= _MAX_STREAMS:
            raise web.HTTPServiceUnavailable(text="too many open dashboards\n")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
        response.headers.update(SECURITY_HEADERS)
        self._streams += 1
        try:
            await response.prepare(request)
            sent, quiet_since = -1, time.monotonic()
            while True:
                if self.view.version != sent:
                    sent = self.view.version
                    await response.write(b"event: snapshot\ndata: " + self.snapshot_bytes() + b"\n\n")
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= _HEARTBEAT_S:
                    await response.write(b": keep-alive\n\n")
                    quiet_since = time.monotonic()
                await asyncio.sleep(self.config.push_interval_s)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._streams -= 1
        return response

    async def _plot(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ("accuracy.svg", "updates.svg"):
            raise web.HTTPNotFound()
        async with self._plot_lock:
            version, made_at, body = self._plots.get(name, (-1, 0.0, b""))
            if version != self.view.version and time.monotonic() - made_at >= _PLOT_MIN_S or not body:
                render = self._plot_job(name)
                body = await asyncio.get_running_loop().run_in_executor(self._plotter, render)
                self._plots[name] = (self.view.version, time.monotonic(), body)
        return web.Response(body=body, content_type="image/svg+xml")

    def _plot_job(self, name: str) -> Callable[[], bytes]:
        """The rendering of ``name`` over a copy of the data taken now (the view keeps changing meanwhile)."""
        if name == "accuracy.svg":
            history = self.view.history
            fleet, regions, devices = history.fleet(), history.regions(), history.devices()
            return lambda: accuracy_svg(fleet, regions, devices)
        tallies = self.view.round_tallies()
        return lambda: updates_svg(tallies)

    async def _health(self, request: web.Request) -> web.Response:
        """200 while the server answers; says whether MQTT is connected (no fleet data: it needs no authentication)."""
        body: dict[str, Any] = {"status": "ok",
                                "mqtt_connected": None if self._monitor is None else self._monitor.connected}
        return web.json_response(body)
