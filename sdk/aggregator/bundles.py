"""The bundles an aggregator service can run: the configured one and those its releases brought, verified.

A switch of bundle version (docs/rollout.md) needs the new version's shared
parameter spec (what an update must hold) and, at the root, its initial
shared weights. Both come from a bundle verified with the fleet key, never
from a model message: an aggregator and the devices can then never disagree
about what an update of a version holds. Bundles live in one directory as
``v<version>-<sha12>.fedge``.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np

from device_agent.bundle.archive import install_bundle, verify_bundle
from device_agent.bundle.manifest import BundleManifest
from device_agent.errors import BundleError
from device_agent.keys import TrustedKeys
from sdk.aggregator.config import AggregatorConfig

logger = logging.getLogger(__name__)
_C = TypeVar("_C", bound=AggregatorConfig)


@dataclass(frozen=True, kw_only=True)
class LibraryBundle:
    """One verified bundle: its archive and its manifest."""

    path: Path
    manifest: BundleManifest


class BundleLibrary:
    """Verified bundles by version in ``directory`` (``configured``: the service's own bundle, always available)."""

    def __init__(self, directory: Path, fleet_keys: TrustedKeys, *, configured: Path | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._keys = fleet_keys
        self._bundles: dict[int, LibraryBundle] = {}
        #: The configured bundle's version (None: none configured).
        self.configured_version: int | None = None
        if configured is not None:
            self.configured_version = self._remember(configured).manifest.bundle_version
        for path in sorted(self.directory.glob("v*.fedge")):
            try:
                self._remember(path)
            except BundleError as exc:
                logger.warning("ignoring %s in the bundle library: %s", path.name, exc)

    def _remember(self, path: Path) -> LibraryBundle:
        manifest = verify_bundle(path, self._keys)
        entry = LibraryBundle(path=path, manifest=manifest)
        known = self._bundles.get(manifest.bundle_version)
        if known is not None and known.manifest != manifest:
            raise BundleError(f"{path}: another bundle v{manifest.bundle_version} is already in the library "
                              f"({known.path.name}); a rebuilt bundle needs a higher version")
        self._bundles.setdefault(manifest.bundle_version, entry)
        return self._bundles[manifest.bundle_version]

    def add(self, archive: Path) -> LibraryBundle:
        """Verify ``archive`` and keep a copy; BundleError when it does not verify or conflicts with a kept one."""
        manifest = verify_bundle(archive, self._keys)
        if manifest.bundle_version in self._bundles:
            return self._remember(self._bundles[manifest.bundle_version].path)
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:12]
        target = self.directory / f"v{manifest.bundle_version}-{digest}.fedge"
        shutil.copyfile(archive, target)
        entry = self._remember(target)
        logger.info("bundle library: added %s v%d", manifest.model_name, manifest.bundle_version)
        return entry

    def get(self, version: int) -> LibraryBundle | None:
        """The bundle of ``version``, None when the library has none."""
        return self._bundles.get(version)

    def config_for(self, config: _C, version: int) -> _C:
        """``config`` for bundle ``version`` (its shared spec and version); KeyError when the library lacks it."""
        manifest = self._bundles[version].manifest
        return replace(config, spec=manifest.shared_spec(), bundle_version=version)

    def initial_shared(self, version: int) -> dict[str, np.ndarray]:
        """The initial shared weights of ``version``'s bundle; KeyError when absent."""
        return initial_shared_weights(self._bundles[version].path, self._keys)


def initial_shared_weights(archive: Path, fleet_keys: TrustedKeys) -> dict[str, np.ndarray]:
    """A bundle's initial shared weights, read through ONNX Runtime from its checkpoint (verified first)."""
    from device_agent.trainer import DeviceTrainer  # ONNX Runtime only when it is needed

    with tempfile.TemporaryDirectory(prefix="fedge-bundle-") as scratch:
        bundle = install_bundle(archive, fleet_keys, Path(scratch) / "bundle")
        return DeviceTrainer(bundle).get_shared()
