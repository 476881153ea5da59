"""Opening a training bundle on the device: signature first, then every file hash.

A bundle is a zip archive (``.fedge``) or the directory it was installed to,
holding ``manifest.json``, ``manifest.sig`` (64-byte Ed25519 signature over the
manifest's exact bytes) and the files the manifest lists. Nothing is parsed
before the signature checks out against a trusted fleet key, and no artifact is
used before its SHA-256 matches. Any authentication failure (unknown signer,
bad signature, hash or size mismatch, missing or extra file) raises the same
opaque :class:`BundleVerificationError`; a well-signed but structurally bad
manifest raises :class:`BundleError` with details.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from cryptography.exceptions import InvalidSignature

from device_agent.bundle.install_policy import (
    InstallDecision,
    InstalledRecord,
    add_failed,
    check_install,
    check_revert,
    read_failed,
    read_record,
    versions_dir,
    write_record,
)
from device_agent.bundle.manifest import MANIFEST_NAME, SIGNATURE_NAME, BundleManifest, parse_manifest
from device_agent.errors import BundleError, BundleVerificationError
from device_agent.keys import TrustedKeys, trusted_key_map
from device_agent.state_store import _fsync_dir

logger = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 1 << 20
MAX_FILE_BYTES = 256 << 20
MAX_FILES = 64
_CHUNK = 1 << 20


@dataclass(frozen=True, kw_only=True)
class TrainingBundle:
    """A verified bundle installed in ``directory``; ``manifest`` is authentic."""

    manifest: BundleManifest
    directory: Path
    manifest_sha256: str

    def path(self, file_name: str) -> Path:
        """Path of a file the manifest lists; KeyError for anything else."""
        if file_name not in self.manifest.files:
            raise KeyError(file_name)
        return self.directory / file_name


def _hash_stream(fh: BinaryIO, limit: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while chunk := fh.read(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise BundleVerificationError()
        digest.update(chunk)
    return digest.hexdigest(), size


class _Source:
    """Uniform read access to a zip bundle or an installed bundle directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        if path.is_dir():
            self.names = {p.name for p in path.iterdir() if p.is_file() and not p.name.startswith(".")}
        elif path.is_file():
            try:
                self._zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise BundleError(f"{path} is not a fedge bundle archive: {exc}") from exc
            names = self._zip.namelist()
            if len(names) != len(set(names)) or any("/" in n or "\\" in n or n.startswith(".") for n in names):
                raise BundleVerificationError()
            self.names = set(names)
        else:
            raise BundleError(f"no bundle at {path}")

    def open(self, name: str) -> BinaryIO:
        if name not in self.names:
            raise BundleVerificationError()
        if self._zip is not None:
            return self._zip.open(name)  # type: ignore[return-value]
        return open(self.path / name, "rb")

    def read_small(self, name: str, limit: int) -> bytes:
        with self.open(name) as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise BundleVerificationError()
        return data

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def _verify(source: _Source, trusted: TrustedKeys, on_file: Callable[[str, BinaryIO], None] | None) -> tuple[BundleManifest, bytes]:
    try:
        return _verify_contents(source, trusted, on_file)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        # A member corrupted in transit (bad CRC, broken deflate stream, truncation) is
        # one more way for a bundle to be inauthentic: the same opaque error.
        raise BundleVerificationError() from exc


def _verify_contents(source: _Source, trusted: TrustedKeys,
                     on_file: Callable[[str, BinaryIO], None] | None) -> tuple[BundleManifest, bytes]:
    keys = trusted_key_map(trusted)
    if not keys:
        raise ValueError("no trusted fleet key given")
    raw = source.read_small(MANIFEST_NAME, MAX_MANIFEST_BYTES)
    signature = source.read_small(SIGNATURE_NAME, 64)
    # Try every trusted key rather than trusting the manifest's own signer field before
    # the signature is checked; a fleet rarely has more than two keys (rotation).
    if not any(_signature_ok(k, signature, raw) for k in keys.values()):
        raise BundleVerificationError()
    manifest = parse_manifest(raw)
    if len(manifest.files) > MAX_FILES:
        raise BundleError(f"bundle lists {len(manifest.files)} files; at most {MAX_FILES} are allowed")
    if source.names != set(manifest.files) | {MANIFEST_NAME, SIGNATURE_NAME}:
        raise BundleVerificationError()
    for name, entry in sorted(manifest.files.items()):
        if entry.size > MAX_FILE_BYTES:
            raise BundleVerificationError()
        with source.open(name) as fh:
            digest, size = _hash_stream(fh, entry.size)
        if size != entry.size or digest != entry.sha256:
            raise BundleVerificationError()
        if on_file is not None:
            with source.open(name) as fh:
                on_file(name, fh)
    return manifest, raw


def _signature_ok(key: object, signature: bytes, raw: bytes) -> bool:
    try:
        key.verify(signature, raw)  # type: ignore[attr-defined]
    except InvalidSignature:
        return False
    return True


def verify_bundle(path: str | os.PathLike[str], trusted: TrustedKeys) -> BundleManifest:
    """Check a bundle (archive or directory) against the trusted fleet keys and return its manifest."""
    source = _Source(Path(path))
    try:
        return _verify(source, trusted, None)[0]
    finally:
        source.close()


def install_bundle(path: str | os.PathLike[str], trusted: TrustedKeys, dest: str | os.PathLike[str]) -> TrainingBundle:
    """Verify a bundle and make it the one installed at ``dest``, atomically and never backwards.

    The files go into a directory of their own under ``<dest>.versions/``
    (fsynced), the highest-version record there is updated, and ``dest`` (a
    symbolic link) is repointed to the new directory with one atomic rename:
    a crash leaves ``dest`` on the old bundle or the new one, never a mix.
    An older version than the highest ever installed here, or the same version
    with different content, raises BundleDowngradeError (see
    :mod:`device_agent.bundle.install_policy`); the same bundle again is a no-op.
    The previous version's directory is kept (a process may still read it).
    """
    source = _Source(Path(path))
    dest_path = Path(dest)
    try:
        manifest, raw = _verify(source, trusted, None)
        offered = InstalledRecord(model_name=manifest.model_name, bundle_version=manifest.bundle_version,
                                  manifest_sha256=hashlib.sha256(raw).hexdigest())
        current = _current(dest_path, trusted)
        decision = check_install(_highest(dest_path, current), offered, failed=read_failed(dest_path))
        if decision is InstallDecision.ALREADY_INSTALLED and current is not None and current.manifest == manifest:
            logger.info("bundle %s v%d is already installed in %s", manifest.model_name, manifest.bundle_version, dest_path)
            return current
        version_dir = _stage(source, trusted, dest_path, offered)
        write_record(dest_path, offered)  # before the switch: a crash in between cannot reopen a downgrade
        _point(dest_path, version_dir)
    finally:
        source.close()
    _prune(dest_path, keep={version_dir.name, *(() if current is None else (current.directory.name,))})
    logger.info("installed bundle %s v%s into %s", manifest.model_name, manifest.bundle_version, dest_path)
    return TrainingBundle(manifest=manifest, directory=version_dir, manifest_sha256=offered.manifest_sha256)


def record_of(bundle: TrainingBundle) -> InstalledRecord:
    """The install record describing ``bundle`` (model name, version, manifest SHA-256)."""
    m = bundle.manifest
    return InstalledRecord(model_name=m.model_name, bundle_version=m.bundle_version, manifest_sha256=bundle.manifest_sha256)


def previous_bundle(dest: str | os.PathLike[str], trusted: TrustedKeys) -> TrainingBundle | None:
    """The newest verified version kept under ``<dest>.versions`` that is older than the one installed (None: none kept)."""
    dest_path = Path(dest)
    current = _current(dest_path, trusted)
    if current is None:
        return None
    kept = []
    for entry in versions_dir(dest_path).iterdir():
        if entry.is_dir() and not entry.is_symlink() and entry.name.startswith("v") and entry != current.directory:
            try:
                bundle = load_bundle(entry, trusted)
            except BundleError as exc:
                logger.warning("kept version %s does not verify (%s); it cannot be returned to", entry.name, exc)
                continue
            if bundle.manifest.bundle_version < current.manifest.bundle_version:
                kept.append(bundle)
    return max(kept, key=lambda b: b.manifest.bundle_version, default=None)


def revert_bundle(dest: str | os.PathLike[str], trusted: TrustedKeys, *, marked_failed: bool, withdrawn: bool) -> TrainingBundle:
    """Return ``dest`` to the version kept from before, under the one exception to "never back"
    (:func:`~device_agent.bundle.install_policy.check_revert`): the running bundle was marked failed by this
    device or withdrawn by signed metadata. The running bundle is recorded as failed (before the switch: a
    crash cannot reopen it) and never installed again; the highest-version record stays. BundleError when
    nothing is installed or no older version is kept; BundleDowngradeError when the rule says no."""
    dest_path = Path(dest)
    current = _current(dest_path, trusted)
    if current is None:
        raise BundleError(f"no verified bundle is installed in {dest_path}: nothing to go back from")
    previous = previous_bundle(dest_path, trusted)
    if previous is None:
        raise BundleError(f"{dest_path}: no older version is kept to go back to from v{current.manifest.bundle_version}")
    running = record_of(current)
    check_revert(_highest(dest_path, current), running=running, previous=record_of(previous), marked_failed=marked_failed,
                 withdrawn=withdrawn)
    add_failed(dest_path, running)
    _point(dest_path, previous.directory)
    _prune(dest_path, keep={previous.directory.name})
    logger.warning("went back from bundle %s v%d to v%d (%s)", running.model_name, running.bundle_version,
                   previous.manifest.bundle_version, "marked failed" if marked_failed else "withdrawn by signed metadata")
    return previous


def _highest(dest: Path, current: TrainingBundle | None) -> InstalledRecord | None:
    """The anti-rollback floor: the record, or (no record yet: an older install) ``current``, the verified bundle at ``dest``."""
    record = read_record(dest)
    if record is not None:
        return record
    if current is None:
        return None
    m = current.manifest
    return InstalledRecord(model_name=m.model_name, bundle_version=m.bundle_version, manifest_sha256=current.manifest_sha256)


def _current(dest: Path, trusted: TrustedKeys) -> TrainingBundle | None:
    """The verified bundle installed at ``dest`` now, or None (nothing there, or it does not verify)."""
    if not dest.is_dir():
        return None
    try:
        return load_bundle(dest, trusted)
    except BundleError as exc:
        logger.warning("the bundle installed in %s is not usable (%s); it will be replaced", dest, exc)
        return None


def _stage(source: _Source, trusted: TrustedKeys, dest: Path, record: InstalledRecord) -> Path:
    """Copy and re-verify every file into ``<dest>.versions/v<version>-<sha12>`` (fsynced); that directory."""
    versions = versions_dir(dest)
    versions.mkdir(parents=True, exist_ok=True)
    final = versions / f"v{record.bundle_version}-{record.manifest_sha256[:12]}"
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=versions))
    try:
        def copy(name: str, fh: BinaryIO) -> None:
            with open(staging / name, "wb") as out:
                shutil.copyfileobj(fh, out, _CHUNK)
                out.flush()
                os.fsync(out.fileno())

        _, raw = _verify(source, trusted, copy)  # hashes checked again on the bytes actually copied
        signature = source.read_small(SIGNATURE_NAME, 64)
        for name, data in ((MANIFEST_NAME, raw), (SIGNATURE_NAME, signature)):
            with open(staging / name, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700
        _fsync_dir(staging)
        shutil.rmtree(final, ignore_errors=True)  # an interrupted earlier install of the same version
        os.replace(staging, final)
        _fsync_dir(versions)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _point(dest: Path, version_dir: Path) -> None:
    """Make ``dest`` a symbolic link to ``version_dir`` with one atomic rename (a plain directory is moved aside first)."""
    if dest.is_dir() and not dest.is_symlink():
        # An installation from before versioned directories: move it aside once (not atomic, one time only).
        os.replace(dest, versions_dir(dest) / f"legacy-{os.getpid()}")
    link = dest.with_name(f".{dest.name}.link-{os.getpid()}")
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(os.path.relpath(version_dir, dest.parent), link)
    os.replace(link, dest)
    _fsync_dir(dest.parent)


def _prune(dest: Path, *, keep: set[str]) -> None:
    """Remove version directories other than ``keep`` (and leftovers of interrupted installs)."""
    for entry in versions_dir(dest).iterdir():
        if entry.is_dir() and not entry.is_symlink() and entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)


def load_bundle(directory: str | os.PathLike[str], trusted: TrustedKeys) -> TrainingBundle:
    """Re-verify an installed bundle directory; archives must go through :func:`install_bundle` first."""
    path = Path(directory)
    if not path.is_dir():
        raise BundleError(f"{path} is not an installed bundle directory; install the archive with install_bundle()")
    # Resolve the link: a later install repoints it, but this bundle's files stay where they are.
    source = _Source(path.resolve())
    manifest, raw = _verify(source, trusted, None)
    return TrainingBundle(manifest=manifest, directory=source.path, manifest_sha256=hashlib.sha256(raw).hexdigest())
