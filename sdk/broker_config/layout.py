"""Where each file lives inside one broker's directory, and how its config refers to it.

Every broker gets a directory of its own (``root/``, ``eu/``...) that the
operator copies to that broker's host. ``mosquitto.conf`` names the files in
it as ``base/<relative path>``, where ``base`` is the directory the operator
chooses on the host (``--deploy-dir``), or the output directory itself when the
broker runs in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

CONFIG_FILE = PurePosixPath("mosquitto.conf")
ACL_FILE = PurePosixPath("acl")
PASSWORD_FILE = PurePosixPath("passwords")
PERSISTENCE_DIR = PurePosixPath("data")
INCLUDE_DIR = PurePosixPath("conf.d")
BRIDGE_FILE = INCLUDE_DIR / "bridge-root.conf"
CA_FILE = PurePosixPath("tls/ca.crt")
SERVER_CERT_FILE = PurePosixPath("tls/server.crt")
SERVER_KEY_FILE = PurePosixPath("tls/server.key")
BRIDGE_CERT_FILE = PurePosixPath("tls/bridge.crt")
BRIDGE_KEY_FILE = PurePosixPath("tls/bridge.key")


@dataclass(frozen=True, kw_only=True)
class BrokerPaths:
    """The paths a broker's config files contain: every file sits below ``base``.

    ``base`` may be relative (Mosquitto then resolves it against its working
    directory) or absolute (the directory chosen on the broker's host).
    """

    base: PurePosixPath

    def of(self, relative: PurePosixPath) -> str:
        """``relative`` (one of this module's constants) as the config file names it."""
        return str(self.base / relative)
