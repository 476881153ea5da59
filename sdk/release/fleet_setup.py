"""A fleet's release setup: its keys, its TUF repository and the trust anchor every device and aggregator gets.

``fedge fleet init`` calls :func:`init_release` (``fedge release init`` does the
same for a fleet directory made before): it creates the role keys under
``keys/release/`` (:mod:`sdk.release.keys`), the repository under
``release/repository/`` and copies its version 1 root to ``release/root.json``;
provisioning copies that file into every device's and aggregator's
``keys/release/root.json`` (the ``[release] root_file`` of their TOML).
Newer roots (key rotation) reach them over MQTT: nothing is reflashed.

The key policy comes from the topology's ``[release]`` table (``root_keys``,
``root_threshold``, ``targets_keys``, ``targets_threshold``; defaults
:class:`~sdk.release.keys.KeyPolicy`), which also names the root broker
account the release tools use (``username``, default ``fedge-release``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.errors import FedgeError
from sdk.release.keys import KeyPolicy, create_release_keys, load_signers
from sdk.release.repository import ExpiryPolicy, ReleaseRepository

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

logger = logging.getLogger(__name__)

RELEASE_DIR = Path("release")
REPOSITORY_DIR = RELEASE_DIR / "repository"
ROOT_FILE = RELEASE_DIR / "root.json"
KEYS_DIR = Path("keys") / "release"
#: Where a device or aggregator directory keeps the trusted root (relative to it).
TRUST_ANCHOR = Path("keys") / "release" / "root.json"
POLICY_KEYS = ("root_keys", "root_threshold", "targets_keys", "targets_threshold")


class ReleaseSetupError(FedgeError, ValueError):
    """The fleet's release setup is missing or its ``[release]`` table is wrong; the message says which."""


@dataclass(frozen=True, kw_only=True)
class ReleaseSetup:
    """Where a fleet's release material lives (paths inside ``fleet_dir``)."""

    fleet_dir: Path

    @property
    def key_dir(self) -> Path:
        """The role keys."""
        return self.fleet_dir / KEYS_DIR

    @property
    def repository_dir(self) -> Path:
        """The TUF repository."""
        return self.fleet_dir / REPOSITORY_DIR

    @property
    def root_file(self) -> Path:
        """Version 1 of root: the trust anchor provisioning hands out."""
        return self.fleet_dir / ROOT_FILE

    def repository(self, *, expiry: ExpiryPolicy = ExpiryPolicy()) -> ReleaseRepository:
        """The repository (RepositoryError when the fleet has none)."""
        return ReleaseRepository(self.repository_dir, expiry=expiry)


def key_policy(topology_text: str) -> KeyPolicy:
    """The key policy the topology's ``[release]`` table asks for (module docstring)."""
    data = tomllib.loads(topology_text).get("release", {})
    if not isinstance(data, Mapping):
        raise ReleaseSetupError("[release] must be a table")
    values: dict[str, Any] = {k: data[k] for k in POLICY_KEYS if k in data}
    try:
        return KeyPolicy(**values)
    except (TypeError, ValueError) as exc:
        raise ReleaseSetupError(f"[release]: {exc}") from exc


def init_release(fleet_dir: Path, *, policy: KeyPolicy = KeyPolicy(), expiry: ExpiryPolicy = ExpiryPolicy()) -> ReleaseSetup:
    """Create the keys, the repository and ``release/root.json`` in ``fleet_dir`` (refuses to overwrite any)."""
    setup = ReleaseSetup(fleet_dir=Path(fleet_dir))
    if setup.repository_dir.exists():
        raise ReleaseSetupError(f"{setup.repository_dir} exists: this fleet already has a release repository")
    public = create_release_keys(setup.key_dir, policy)
    signers = {role: load_signers([setup.key_dir], role) for role in public}
    repo = ReleaseRepository.create(setup.repository_dir, public_keys=public, signers=signers, policy=policy, expiry=expiry)
    setup.root_file.write_bytes((repo.metadata_dir / "1.root.json").read_bytes())
    logger.info("release repository of %s: root %d of %d, targets %d of %d", fleet_dir, policy.root_threshold,
                policy.root_keys, policy.targets_threshold, policy.targets_keys)
    return setup
