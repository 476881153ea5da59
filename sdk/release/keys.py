"""The release keys of a fleet: one Ed25519 key pair per TUF role key, as PEM files in one directory.

Layout (created by :func:`create_release_keys`, normally through ``fedge fleet init``;
``fedge release init`` does it for a fleet made before)::

    keys/release/root-1.key  root-1.pub  root-2.key ...   offline: sign new root versions (threshold, e.g. 2 of 3)
    keys/release/targets-1.key ...                        offline: sign releases (what may be installed)
    keys/release/snapshot-1.key  timestamp-1.key          online: the repository's consistency and freshness
    keys/release/rollout-1.key                            online: the release controller (canary, promote, halt)

A role's public keys are its ``<role>-<i>.pub`` files; signing needs the
``.key`` files, which an operator may keep elsewhere (``--key-dir``): a
command that must sign for a role finds that role's private keys or fails
naming the role and the threshold.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.signer import CryptoSigner, SSlibKey

from device_agent.errors import FedgeError
from device_agent.keys import load_signing_key, load_verify_key, save_private_key, save_public_key

logger = logging.getLogger(__name__)

ROLES = ("root", "targets", "snapshot", "timestamp", "rollout")
"""The TUF roles of a fleet's release repository (``rollout`` is delegated by ``targets``)."""
_FILE = re.compile(r"(root|targets|snapshot|timestamp|rollout)-([1-9][0-9]{0,2})\.(key|pub)")


class ReleaseKeyError(FedgeError, ValueError):
    """Release keys are missing, unreadable or too few for a role's threshold; the message names the role."""


@dataclass(frozen=True, kw_only=True)
class KeyPolicy:
    """How many keys each role has and how many must sign (``<role>_keys``, ``<role>_threshold``).

    Defaults: root 2 of 3 (a lost or stolen root key neither locks the fleet out
    nor lets a thief rotate keys alone), targets 1 of 2 (one spare to rotate to),
    the online roles 1 of 1.
    """

    root_keys: int = 3
    root_threshold: int = 2
    targets_keys: int = 2
    targets_threshold: int = 1
    snapshot_keys: int = 1
    timestamp_keys: int = 1
    rollout_keys: int = 1

    def __post_init__(self) -> None:
        for role in ROLES:
            count = self.count(role)
            if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 9:
                raise ValueError(f"{role}_keys must be an integer in 1..9, got {count!r}")
            threshold = self.threshold(role)
            if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= count:
                raise ValueError(f"{role} threshold must be an integer in 1..{count} ({role}_keys), got {threshold!r}")

    def count(self, role: str) -> int:
        """How many keys ``role`` has."""
        return int(getattr(self, f"{role}_keys"))

    def threshold(self, role: str) -> int:
        """How many of ``role``'s keys must sign."""
        return int(getattr(self, f"{role}_threshold", 1))


def key_file(directory: Path, role: str, index: int, *, private: bool) -> Path:
    """The path of ``role``'s key number ``index`` (1-based)."""
    return directory / f"{role}-{index}.{'key' if private else 'pub'}"


def create_release_keys(directory: str | Path, policy: KeyPolicy = KeyPolicy()) -> dict[str, list[Ed25519PublicKey]]:
    """Write a fresh key pair for every role key under ``directory`` (refuses to overwrite); role -> public keys."""
    directory = Path(directory)
    existing = sorted(p.name for p in directory.glob("*") if _FILE.fullmatch(p.name)) if directory.is_dir() else []
    if existing:
        raise ReleaseKeyError(f"{directory} already holds release keys ({', '.join(existing[:3])}...); "
                              "rotate keys with `fedge release rotate` instead of creating new ones")
    directory.mkdir(parents=True, exist_ok=True)
    public: dict[str, list[Ed25519PublicKey]] = {}
    for role in ROLES:
        for index in range(1, policy.count(role) + 1):
            key = Ed25519PrivateKey.generate()
            save_private_key(key, key_file(directory, role, index, private=True))
            save_public_key(key.public_key(), key_file(directory, role, index, private=False))
            public.setdefault(role, []).append(key.public_key())
    return public


def add_role_key(directory: str | Path, role: str) -> tuple[int, Ed25519PublicKey]:
    """Write one new key pair for ``role`` with the next free number (key rotation); (number, public key)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    directory = Path(directory)
    taken = {int(m.group(2)) for p in directory.glob(f"{role}-*") if (m := _FILE.fullmatch(p.name))}
    index = max(taken, default=0) + 1
    key = Ed25519PrivateKey.generate()
    save_private_key(key, key_file(directory, role, index, private=True))
    save_public_key(key.public_key(), key_file(directory, role, index, private=False))
    return index, key.public_key()


def load_public_keys(directory: str | Path, role: str) -> dict[int, Ed25519PublicKey]:
    """``role``'s public keys in ``directory`` by number (empty when there are none)."""
    found: dict[int, Ed25519PublicKey] = {}
    for path in sorted(Path(directory).glob(f"{role}-*.pub")):
        match = _FILE.fullmatch(path.name)
        if match is None:
            continue
        try:
            found[int(match.group(2))] = load_verify_key(path)
        except (OSError, ValueError) as exc:
            raise ReleaseKeyError(f"{path}: not an Ed25519 public key: {exc}") from exc
    return found


def load_signers(directories: list[Path], role: str) -> list[CryptoSigner]:
    """Signers for every private key of ``role`` found in ``directories`` (first directory wins per file name)."""
    seen: set[str] = set()
    signers: list[CryptoSigner] = []
    for directory in directories:
        for path in sorted(Path(directory).glob(f"{role}-*.key")):
            if _FILE.fullmatch(path.name) is None or path.name in seen:
                continue
            seen.add(path.name)
            try:
                key = load_signing_key(path)
            except (OSError, ValueError) as exc:
                raise ReleaseKeyError(f"{path}: not an Ed25519 private key: {exc}") from exc
            signers.append(signer_for(key))
    return signers


def signer_for(key: Ed25519PrivateKey) -> CryptoSigner:
    """A securesystemslib signer for ``key`` (its TUF key id is :func:`tuf_key`'s)."""
    return CryptoSigner(key, tuf_key(key.public_key()))


def tuf_key(public: Ed25519PublicKey) -> SSlibKey:
    """The TUF key object (Ed25519, key id = SHA-256 of its canonical form) for ``public``."""
    return SSlibKey.from_crypto(public)
