"""Who may see the dashboard (pure): the exposure rule, HTTP Basic credentials, and the response headers.

- On loopback the page is open to this machine's users, like any local
  service. Anywhere else it needs credentials (``user:password`` in a file
  only its owner can read) and TLS, or an explicit ``plain_http`` for a
  TLS-terminating proxy in front: :func:`check_exposure` refuses to start otherwise.
- Every response carries a strict Content-Security-Policy (own origin
  only, no inline script or style, no frames, no plugins) and ``nosniff``:
  even if a string ever reached the DOM as markup, it could not run.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from device_agent.errors import FedgeError
from sdk.dashboard.config import ServerSettings

#: Headers of every response.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Server": "fedge-dashboard",
}
REALM = 'Basic realm="fedge dashboard", charset="UTF-8"'


class ExposureError(FedgeError):
    """The dashboard would be reachable from the network without authentication or TLS."""


@dataclass(frozen=True, kw_only=True)
class Credentials:
    """One user's HTTP Basic credentials."""

    user: str
    password: str = field(repr=False)

    def accepts(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries these credentials (compared in constant time)."""
        if not authorization or not authorization.startswith("Basic "):
            return False
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        expected = f"{self.user}:{self.password}".encode()
        return hmac.compare_digest(decoded, expected)


def load_credentials(path: Path) -> Credentials:
    """``user:password`` from the first line of ``path``; ExposureError when the file is readable by others or malformed."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ExposureError(f"{path}: the dashboard's password file must be readable by its owner only (chmod 600)")
    line = path.read_text(encoding="utf-8").splitlines()[:1]
    user, sep, password = (line[0] if line else "").partition(":")
    if not sep or not user or len(password) < 12:
        raise ExposureError(f"{path}: expected one line 'user:password' with a password of at least 12 characters")
    return Credentials(user=user, password=password)


def check_exposure(server: ServerSettings) -> Credentials | None:
    """The credentials to require (None: none); ExposureError when ``server`` would expose the page unprotected."""
    credentials = None if server.auth_file is None else load_credentials(server.auth_file)
    if server.loopback:
        return credentials
    if credentials is None:
        raise ExposureError(f"refusing to serve on {server.bind} without authentication: give --auth-file "
                            "(one line user:password, chmod 600), or bind to 127.0.0.1")
    if server.tls_cert_file is None and not server.plain_http:
        raise ExposureError(f"refusing to send a password in clear text on {server.bind}: give --tls-cert and --tls-key, "
                            "or --plain-http when a TLS-terminating proxy is in front")
    return credentials
