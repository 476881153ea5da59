"""The device's anti-rollback rule for bundles, and the record that makes it survive a reboot.

The rule (:func:`check_install`) is pure: given what the device has installed
at its highest (an :class:`InstalledRecord`, or None on a fresh device) and a
verified candidate, it answers :attr:`InstallDecision.INSTALL`,
:attr:`InstallDecision.ALREADY_INSTALLED` (same version, same signed manifest:
installing again changes nothing) or raises :class:`BundleDowngradeError`
(an older version, or the same version with different content). Versions are
compared per installation directory, whatever the model name: a device runs
one bundle at a time, and a validly signed older bundle of *another* model is
as much a rollback as one of the same model.

:func:`read_record` / :func:`write_record` keep the highest installed version
in ``<install dir>.versions/highest.json`` next to the installed bundle
(written atomically, before the new bundle becomes current), so wiping or
replacing the installed directory does not reset the floor. The rollout layer
(signed metadata over MQTT) calls :func:`check_offer` with the same record
before it fetches anything.

**The one way back** (:func:`check_revert`): a device may return from the
bundle it runs to the previous version it kept on disk only when it marked
the running bundle failed itself (its training diverged on it) or signed
release metadata withdrew it (halted, rolled back). Then the running bundle
goes into ``failed.json`` next to the record and :func:`check_install`
refuses it forever, while the record keeps its version as the floor: the
failed version is never installed again, nor anything older than it beyond
the one version kept. docs/rollout.md, "The local rollback rule".
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

from device_agent.errors import BundleError
from device_agent.state_store import atomic_write_bytes

RECORD_NAME = "highest.json"
FAILED_NAME = "failed.json"


@dataclass(frozen=True, kw_only=True)
class InstalledRecord:
    """The highest bundle ever installed in one place: its model name, version and manifest SHA-256 (hex)."""

    model_name: str
    bundle_version: int
    manifest_sha256: str


class InstallDecision(str, Enum):
    """What :func:`check_install` allows: install the candidate, or nothing to do (it is already the highest)."""

    INSTALL = "install"
    ALREADY_INSTALLED = "already_installed"


class BundleDowngradeError(BundleError):
    """A verified bundle was refused because it is older than (or conflicts with) the highest installed one.

    ``installed`` is the record that refused it; ``offered`` the candidate's record.
    """

    def __init__(self, *, installed: InstalledRecord, offered: InstalledRecord) -> None:
        if offered.bundle_version < installed.bundle_version:
            message = (f"refusing to install {offered.model_name} v{offered.bundle_version}: this device already "
                       f"installed v{installed.bundle_version} ({installed.model_name}) and bundle versions never go back")
        else:
            message = (f"refusing to install {offered.model_name} v{offered.bundle_version}: a different bundle "
                       f"v{installed.bundle_version} ({installed.model_name}, manifest sha256 "
                       f"{installed.manifest_sha256[:12]}) was installed here; a rebuilt bundle needs a higher version")
        super().__init__(message)
        self.installed = installed
        self.offered = offered


class BundleFailedError(BundleError):
    """A verified bundle was refused because this device marked it failed before (or signed metadata withdrew it)."""

    def __init__(self, offered: InstalledRecord) -> None:
        super().__init__(f"refusing to install {offered.model_name} v{offered.bundle_version}: this device marked it "
                         "failed (or its release was withdrawn) and went back from it; publish a fixed bundle with a "
                         "higher version")
        self.offered = offered


def check_offer(highest: InstalledRecord | None, *, model_name: str, bundle_version: int) -> None:
    """Before fetching anything: BundleDowngradeError when ``bundle_version`` is below the highest installed.

    The same version passes (only its manifest, after the download, tells a
    reinstall from a conflicting rebuild: :func:`check_install` decides then).
    """
    if highest is not None and bundle_version < highest.bundle_version:
        raise BundleDowngradeError(installed=highest, offered=InstalledRecord(model_name=model_name, bundle_version=bundle_version,
                                                                               manifest_sha256=""))


def check_install(highest: InstalledRecord | None, offered: InstalledRecord, *,
                  failed: Collection[InstalledRecord] = ()) -> InstallDecision:
    """The anti-rollback rule: may ``offered`` be installed where ``highest`` is the highest so far (None: nothing)?

    BundleFailedError for a bundle in ``failed`` (same manifest); BundleDowngradeError
    for a lower version, or for the same version with a different manifest.
    """
    if any(f.manifest_sha256 == offered.manifest_sha256 for f in failed):
        raise BundleFailedError(offered)
    if highest is None or offered.bundle_version > highest.bundle_version:
        return InstallDecision.INSTALL
    if offered.bundle_version == highest.bundle_version and offered.manifest_sha256 == highest.manifest_sha256:
        return InstallDecision.ALREADY_INSTALLED
    raise BundleDowngradeError(installed=highest, offered=offered)


def check_revert(highest: InstalledRecord | None, *, running: InstalledRecord, previous: InstalledRecord,
                 marked_failed: bool, withdrawn: bool) -> None:
    """May the device go back from ``running`` to ``previous``, the version it kept from before?

    Only when ``previous`` is older than ``running``, ``running`` is not older
    than anything installed (``highest``: going back is one step from the top,
    never a walk down the history), and either this device marked ``running``
    failed (``marked_failed``) or signed release metadata withdrew it
    (``withdrawn``). BundleDowngradeError otherwise.
    """
    if previous.bundle_version >= running.bundle_version:
        raise ValueError(f"v{previous.bundle_version} is not older than the running v{running.bundle_version}")
    top = highest is None or running.bundle_version >= highest.bundle_version
    if not (top and (marked_failed or withdrawn)):
        raise BundleDowngradeError(installed=highest if highest is not None else running, offered=previous)


def versions_dir(install_dir: str | os.PathLike[str]) -> Path:
    """Where the installed versions and the record of ``install_dir`` live: ``<install_dir>.versions``."""
    path = Path(install_dir)
    return path.with_name(path.name + ".versions")


def read_record(install_dir: str | os.PathLike[str]) -> InstalledRecord | None:
    """The record next to ``install_dir`` (None when there is none); BundleError naming the file when it is damaged."""
    path = versions_dir(install_dir) / RECORD_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the installed-version record: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(raw)
        record = InstalledRecord(model_name=doc["model_name"], bundle_version=doc["bundle_version"],
                                 manifest_sha256=doc["manifest_sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{path}: damaged installed-version record ({exc}); it guards against downgrades, "
                          "so it is not ignored: restore it or remove it on purpose") from exc
    if (not isinstance(record.model_name, str) or isinstance(record.bundle_version, bool)
            or not isinstance(record.bundle_version, int) or not isinstance(record.manifest_sha256, str)):
        raise BundleError(f"{path}: damaged installed-version record (wrong field types)")
    return record


def write_record(install_dir: str | os.PathLike[str], record: InstalledRecord) -> None:
    """Replace the record next to ``install_dir`` atomically (temporary file, fsync, rename)."""
    directory = versions_dir(install_dir)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / RECORD_NAME, json.dumps(asdict(record), sort_keys=True).encode())


def read_failed(install_dir: str | os.PathLike[str]) -> tuple[InstalledRecord, ...]:
    """The bundles this device went back from (``failed.json``); empty when none. BundleError when damaged."""
    path = versions_dir(install_dir) / FAILED_NAME
    try:
        doc = json.loads(path.read_bytes())
        return tuple(InstalledRecord(model_name=str(d["model_name"]), bundle_version=int(d["bundle_version"]),
                                     manifest_sha256=str(d["manifest_sha256"])) for d in doc["failed"])
    except FileNotFoundError:
        return ()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{path}: damaged record of failed bundles ({exc}); it keeps bad bundles out, so it is not "
                          "ignored: restore it or remove it on purpose") from exc


def add_failed(install_dir: str | os.PathLike[str], record: InstalledRecord) -> None:
    """Add ``record`` to ``failed.json`` (atomically; a record already there is not added twice)."""
    failed = [f for f in read_failed(install_dir) if f.manifest_sha256 != record.manifest_sha256] + [record]
    directory = versions_dir(install_dir)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / FAILED_NAME, json.dumps({"failed": [asdict(f) for f in failed]}, sort_keys=True).encode())
