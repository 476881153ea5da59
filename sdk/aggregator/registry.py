"""The aggregator's registry of sender keys: ``<id>.pub`` files of one directory, minus revoked keys, reloadable.

A regional aggregator's devices (``device_keys_dir``) and the root's regions
(``region_keys_dir``) are each a directory of Ed25519 public keys named
``<id>.pub``. A ``revoked.txt`` beside them lists key ids (first word of each
line; ``#`` starts a comment) that are refused even when a ``.pub`` file
holds them (``fedge fleet remove`` / ``rekey`` write it). :class:`KeyRegistry`
is a :data:`~device_agent.protocol.envelope.SenderKeys` lookup; :meth:`KeyRegistry.reload`
re-reads the directory and swaps the whole map at once (the service calls it
on SIGHUP), keeping the previous map when anything in the directory is wrong.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.errors import FedgeError
from device_agent.keys import key_id, load_verify_key
from device_agent.protocol.headers import check_id

logger = logging.getLogger(__name__)

REVOKED_FILE = "revoked.txt"


class RegistryError(FedgeError, ValueError):
    """A registry directory cannot be read as a whole; the message names the file."""


@dataclass(frozen=True, kw_only=True)
class RegistryChange:
    """What a reload changed: ids added, removed, and whose key changed; ``total`` ids now."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    total: int


def read_revoked(directory: Path) -> frozenset[str]:
    """The key ids listed in ``directory/revoked.txt`` (empty when there is no such file)."""
    path = directory / REVOKED_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return frozenset()
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: cannot read: {exc}") from exc
    return frozenset(line.split()[0] for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def read_key_directory(directory: Path, *, what: str = "device") -> dict[str, Ed25519PublicKey]:
    """id -> key from every ``<id>.pub`` of ``directory``, revoked keys left out (logged); RegistryError naming the file."""
    if not directory.is_dir():
        raise RegistryError(f"{directory} is not a directory")
    revoked = read_revoked(directory)
    keys: dict[str, Ed25519PublicKey] = {}
    for pub in sorted(directory.glob("*.pub")):
        try:
            check_id(what, pub.stem)
            key = load_verify_key(pub)
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{pub}: {exc}") from exc
        if key_id(key) in revoked:
            logger.warning("%s registry %s: %s holds the revoked key %s: ignored", what, directory, pub.name, key_id(key))
            continue
        if pub.stem.endswith((".key", ".x25519")):
            logger.warning("%s registry %s: %s registers a %s called %r; if it is %r's key, name the file %s.pub "
                           "(fedge keys generate --out %s.key writes %s.pub)", what, directory, pub.name, what, pub.stem,
                           pub.stem.rsplit(".", 1)[0], pub.stem.rsplit(".", 1)[0], pub.stem.rsplit(".", 1)[0],
                           pub.stem.rsplit(".", 1)[0])
        keys[pub.stem] = key
    return keys


class KeyRegistry:
    """Sender id -> Ed25519 key, read from ``directory`` (module docstring); callable as a SenderKeys lookup.

    RegistryError at construction when the directory cannot be read or holds no key.
    """

    def __init__(self, directory: Path, *, what: str = "device") -> None:
        self.directory = Path(directory)
        self.what = what
        self._lock = threading.Lock()
        self._keys = read_key_directory(self.directory, what=what)
        if not self._keys:
            raise RegistryError(f"no <id>.pub files in {str(self.directory)!r}")
        #: How many reloads have been applied.
        self.generation = 0

    def __call__(self, sender: str) -> Ed25519PublicKey | None:
        """The key of ``sender``, or None for an unknown (or revoked) one."""
        return self._keys.get(sender)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, sender: object) -> bool:
        return sender in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def ids(self) -> tuple[str, ...]:
        """Every registered id, sorted."""
        return tuple(sorted(self._keys))

    def reload(self) -> RegistryChange | None:
        """Re-read the directory and swap the map; None (old map kept, error logged) when it cannot be read."""
        with self._lock:
            try:
                fresh = read_key_directory(self.directory, what=self.what)
            except RegistryError as exc:
                logger.error("%s registry not reloaded, the previous one stays in force: %s", self.what, exc)
                return None
            old = self._keys
            self._keys = fresh  # one assignment: a lookup sees the old map or the new one, never a mix
            self.generation += 1
        change = RegistryChange(
            added=tuple(sorted(set(fresh) - set(old))), removed=tuple(sorted(set(old) - set(fresh))),
            changed=tuple(sorted(i for i in set(fresh) & set(old) if key_id(fresh[i]) != key_id(old[i]))),
            total=len(fresh))
        logger.warning("%s registry %s reloaded: %d %ss (added %s, removed %s, new key %s)", self.what, self.directory,
                       change.total, self.what, list(change.added) or "none", list(change.removed) or "none",
                       list(change.changed) or "none")
        return change
