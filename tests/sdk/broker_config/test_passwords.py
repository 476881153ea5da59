"""Password hashes match what mosquitto_passwd 2.0.11 writes (known-answer vectors in data/)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from sdk.broker_config.passwords import (
    PBKDF2_ITERATIONS,
    SALT_BYTES,
    hash_password,
    new_password,
    render_password_file,
    verify_password,
)

DATA = Path(__file__).parent / "data"


def _vectors() -> list[tuple[str, str, str]]:
    passwords = json.loads((DATA / "mosquitto_passwd_2.0.11.json").read_text(encoding="utf-8"))
    lines = (DATA / "mosquitto_passwd_2.0.11.txt").read_text(encoding="utf-8").splitlines()
    entries = [line.split(":", 1) for line in lines if line and not line.startswith("#")]
    return [(user, passwords[user], encoded) for user, encoded in entries]


@pytest.mark.parametrize(("user", "password", "encoded"), _vectors())
def test_hash_password_reproduces_mosquitto_passwd(user: str, password: str, encoded: str) -> None:
    salt = base64.b64decode(encoded.split("$")[3])
    assert hash_password(password, salt=salt) == encoded
    assert verify_password(password, encoded)
    assert not verify_password(password + "x", encoded)


def test_hash_password_uses_fresh_salts_and_mosquitto_defaults() -> None:
    first, second = hash_password("pw"), hash_password("pw")
    assert first != second
    _, seven, iterations, salt, digest = first.split("$")
    assert (seven, int(iterations)) == ("7", PBKDF2_ITERATIONS)
    assert len(base64.b64decode(salt)) == SALT_BYTES and len(base64.b64decode(digest)) == 64


def test_verify_password_rejects_other_formats_without_raising() -> None:
    for encoded in ("", "$6$abc$def", "$7$x$y$z", "$7$101$!!$!!", "plain"):
        assert not verify_password("pw", encoded)


def test_new_password_is_256_bits_and_injectable() -> None:
    assert new_password(lambda n: b"\x00" * n) == "A" * 43
    assert len({new_password() for _ in range(10)}) == 10


def test_render_password_file_sorts_and_refuses_bad_lines() -> None:
    assert render_password_file({"b": "$7$1$x$y", "a": "$7$1$x$z"}) == "a:$7$1$x$z\nb:$7$1$x$y\n"
    assert render_password_file({}) == ""
    with pytest.raises(ValueError):
        render_password_file({"a:b": "$7$1$x$y"})
    with pytest.raises(ValueError):
        render_password_file({"a": "plaintext"})
    with pytest.raises(ValueError):
        hash_password("pw", salt=b"short")
