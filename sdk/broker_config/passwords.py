"""Account passwords and Mosquitto 2.0 password files, computed with hashlib.

A Mosquitto 2.0 password file has one ``username:hash`` line per account, the
hash being ``$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512>`` with a
12-byte salt and a 64-byte digest; ``mosquitto_passwd`` uses 101 iterations
and the broker accepts any count written in the line. Passwords made here are
32 random bytes (256 bits), so the iteration count adds no meaningful
protection, while every extra iteration costs the broker CPU on each CONNECT:
the default stays at Mosquitto's 101.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable, Mapping

PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
_DIGEST_BYTES = 64
_PREFIX = "$7$"


def new_password(random_bytes: Callable[[int], bytes] = os.urandom) -> str:
    """A fresh 256-bit password, URL-safe base64 without padding (43 characters)."""
    return base64.urlsafe_b64encode(random_bytes(32)).rstrip(b"=").decode("ascii")


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """The Mosquitto ``$7$`` hash of ``password``; a random salt when ``salt`` is None."""
    if salt is None:
        salt = secrets.token_bytes(SALT_BYTES)
    if len(salt) != SALT_BYTES:
        raise ValueError(f"salt must be {SALT_BYTES} bytes, not {len(salt)}")
    if iterations < 1:
        raise ValueError("iterations must be positive")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, _DIGEST_BYTES)
    b64 = base64.b64encode
    return f"{_PREFIX}{iterations}${b64(salt).decode('ascii')}${b64(digest).decode('ascii')}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash; False (never an error) for any other format."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[:2] != ["", "7"] or not parts[2].isdigit():
        return False
    try:
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, int(parts[2]), len(expected))
    return hmac.compare_digest(digest, expected)


def render_password_file(hashes: Mapping[str, str]) -> str:
    """Password-file text for ``{username: hash}``, sorted by username; empty text for no accounts."""
    for username, encoded in hashes.items():
        if not username or ":" in username or "\n" in username or not encoded.startswith(_PREFIX):
            raise ValueError(f"cannot write a password line for {username!r}")
    return "".join(f"{username}:{hashes[username]}\n" for username in sorted(hashes))
