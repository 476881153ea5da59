"""The HTTP endpoint of a service's metrics: ``/metrics`` (Prometheus text or OpenMetrics) and ``/healthz``.

prometheus-client's WSGI app serves ``/metrics`` (content negotiation,
gzip, ``name[]`` filters); ``/healthz`` answers 200 with a small JSON body
while the service is healthy and 503 with the reasons when not; every
other path is 404. It runs on the standard library's threading WSGI server
in a daemon thread, bound to loopback unless the configuration says
otherwise: the numbers are aggregate counts (no device id, no key, no
model), but an endpoint off loopback belongs on a monitoring network or
behind a proxy that adds TLS and authentication (docs/operations.md).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Health:
    """``ok`` True: healthy. ``problems``: why not (empty when ok). ``detail``: facts to show (JSON-able)."""

    ok: bool
    problems: tuple[str, ...] = ()
    detail: dict[str, Any] = field(default_factory=dict)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr (a scrape every few seconds would drown the service's own lines)."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.debug("metrics endpoint: " + format, *args)


def make_app(registry: CollectorRegistry, health: Callable[[], Health]) -> Callable[..., Iterable[bytes]]:
    """The WSGI app: ``/metrics`` from ``registry``, ``/healthz`` from ``health()``, 404 elsewhere."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            state = health()
            body = json.dumps({"status": "ok" if state.ok else "unhealthy", "problems": list(state.problems),
                               **state.detail}, sort_keys=True).encode()
            start_response("200 OK" if state.ok else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Cache-Control", "no-store")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics or /healthz\n"]

    return app


class MetricsEndpoint:
    """``/metrics`` and ``/healthz`` on ``host:port`` (port 0: any free port; see :attr:`port`), served from a daemon thread."""

    def __init__(self, *, host: str, port: int, registry: CollectorRegistry, health: Callable[[], Health]) -> None:
        server_class = _ThreadingServer6 if ":" in host else _ThreadingServer
        self._server = make_server(host, port, make_app(registry, health), server_class=server_class,
                                   handler_class=_QuietHandler)
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"fedge-metrics-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        """The metrics URL (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> MetricsEndpoint:
        """Serve from now on."""
        self._thread.start()
        logger.info("metrics on %s (health on /healthz)", self.url)
        return self

    def close(self) -> None:
        """Stop serving and release the port; idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5.0)
        self._server.server_close()
