"""A release repository for tests: keys, a repository, releases of real signed bundles, and a broker stand-in.

``ReleaseFixture.broker`` is a dict of file name -> bytes shaped like what the
publisher puts on the broker (metadata by name, bundles by SHA-256): the
device's :class:`~device_agent.release.tuf_view.BrokerFetcher` reads it the
way it reads retained MQTT messages, so the TUF checks run for real without
a broker. MQTT tests publish the same files with :mod:`sdk.release.publisher`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.release.release_info import ReleaseInfo, ReleaseTargets, SharedStart, Stage, StageRecord
from device_agent.release.tuf_view import BrokerFetcher, TrustedView, refresh_view
from sdk.release.keys import KeyPolicy, create_release_keys, load_signers
from sdk.release.plan import ReleaseChoices, plan_release
from sdk.release.repository import ReleaseRepository, Signers

FLEET = "demo"
DEVICES = {"eu-1": "eu", "eu-2": "eu", "eu-3": "eu", "us-1": "us", "us-2": "us", "us-3": "us"}


@dataclass
class ReleaseFixture:
    """Keys, repository and a simulated broker under ``directory``."""

    directory: Path
    fleet_key: Ed25519PrivateKey
    policy: KeyPolicy = field(default_factory=KeyPolicy)
    message_size_limit: int = 256 * 1024
    fleet: str = FLEET

    def __post_init__(self) -> None:
        self.key_dir = self.directory / "keys"
        public = create_release_keys(self.key_dir, self.policy)
        self.repo = ReleaseRepository.create(self.directory / "repository", public_keys=public, signers=self.signers(),
                                             policy=self.policy)
        self.broker: dict[str, bytes] = {}
        self.bundles: dict[str, bytes] = {}
        self.publish()

    def signers(self, roles: tuple[str, ...] = ("root", "targets", "snapshot", "timestamp", "rollout")) -> Signers:
        """Signers for ``roles`` from the key directory."""
        return {role: load_signers([self.key_dir], role) for role in roles}

    @property
    def root_json(self) -> bytes:
        """Version 1 of root: what provisioning gives a device."""
        return (self.repo.metadata_dir / "1.root.json").read_bytes()

    def add(self, bundle: Path, *, release: int | None = None, stage: Stage = Stage.CANARY, canary: tuple[str, ...] = (),
            targets: ReleaseTargets = ReleaseTargets(), expires_in_s: float = 3600.0, chunk_size: int | None = 4096,
            shared_start: SharedStart = SharedStart.CARRY, publish: bool = True) -> ReleaseInfo:
        """Add ``bundle`` as the next release (or ``release``) at ``stage`` and (by default) publish it."""
        number = release if release is not None else max((e.info.release for e in self.repo.releases()), default=0) + 1
        info, data = plan_release(bundle, release=number, fleet=self.fleet, fleet_key=self.fleet_key.public_key(),
                                  choices=ReleaseChoices(targets=targets, canary=canary, chunk_size=chunk_size,
                                                         expires_ms=int((time.time() + expires_in_s) * 1000),
                                                         shared_start=shared_start),
                                  message_size_limit=self.message_size_limit,
                                  devices=DEVICES if self.fleet == FLEET else None)
        record = StageRecord(release=number, stage=stage, reason="test", decided_ms=int(time.time() * 1000))
        self.repo.add_release(info, data, self.signers(), stage=record)
        self.bundles[info.sha256] = data
        if publish:
            self.publish()
        return info

    def stage(self, release: int, stage: Stage, reason: str = "test") -> None:
        """Set a release's stage and publish."""
        self.repo.set_stage(StageRecord(release=release, stage=stage, reason=reason, decided_ms=int(time.time() * 1000)),
                            self.signers())
        self.publish()

    def publish(self) -> None:
        """Put the repository's current files on the simulated broker (old versions stay, as retained messages would)."""
        self.broker.update(self.repo.published_files())

    def fetcher(self) -> BrokerFetcher:
        """A fetcher over the simulated broker."""
        return BrokerFetcher(metadata=self.broker.get, target=self.bundles.get)

    def view(self, device_dir: Path) -> TrustedView:
        """A device's TUF refresh over the simulated broker, trusting root v1."""
        return refresh_view(device_dir, bootstrap_root=self.root_json, fetcher=self.fetcher())


def utc(seconds_from_now: float) -> datetime:
    """A UTC time ``seconds_from_now`` from now."""
    return datetime.fromtimestamp(time.time() + seconds_from_now, tz=timezone.utc)
