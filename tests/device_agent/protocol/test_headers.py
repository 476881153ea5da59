"""Headers: one canonical byte string each, strict parsing, validation where they are built."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from device_agent.errors import MalformedMessageError
from device_agent.protocol.headers import MessageKind, ModelHeader, UpdateHeader
from device_agent.protocol.tensor_codec import Encoding


def test_update_header_canonical_bytes_are_sorted_compact_json(make_header: Callable[..., UpdateHeader]) -> None:
    raw = make_header().to_bytes()
    assert raw == (
        b'{"bundle_version":3,"encoding":"raw","fleet":"demo","kind":"update",'
        b'"nonce":"000102030405060708090a0b0c0d0e0f","protocol":1,"region":"eu","round":5,'
        b'"sample_count":120,"sender":"dev-1","timestamp_ms":1700000000000}'
    )


def test_update_header_round_trips_through_canonical_bytes(make_header: Callable[..., UpdateHeader]) -> None:
    header = make_header(kind=MessageKind.AGGREGATE, encoding=Encoding.INT8)
    assert UpdateHeader.from_bytes(header.to_bytes()) == header


def test_model_header_round_trips_with_and_without_region() -> None:
    for region in (None, "eu"):
        header = ModelHeader(fleet="demo", sender="root", round=2, bundle_version=1, nonce=bytes(16), timestamp_ms=0, region=region)
        assert ModelHeader.from_bytes(header.to_bytes()) == header


def test_update_header_create_uses_injected_clock_and_randomness() -> None:
    header = UpdateHeader.create(
        clock=lambda: 12.3456, random_bytes=lambda n: b"\x01" * n,
        fleet="demo", region="eu", sender="dev-1", round=0, bundle_version=0, sample_count=1,
    )
    assert header.nonce == b"\x01" * 16 and header.timestamp_ms == 12345


def _respell(raw: bytes, **changes: Any) -> bytes:
    data = json.loads(raw)
    data.update(changes)
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda raw: raw.replace(b",", b", "), "canonical"),
        (lambda raw: json.dumps(dict(reversed(json.loads(raw).items())), separators=(",", ":")).encode(), "canonical"),
        (lambda raw: raw[:-1] + b',"round":6}', "canonical"),
        (lambda raw: _respell(raw, extra=1), "keys"),
        (lambda raw: json.dumps({k: v for k, v in json.loads(raw).items() if k != "region"}, sort_keys=True, separators=(",", ":")).encode(), "keys"),
        (lambda raw: raw.replace(b'"round":5', b'"round":5.0'), "non-integer"),
        (lambda raw: _respell(raw, round=True), "round"),
        (lambda raw: _respell(raw, round=-1), "round"),
        (lambda raw: _respell(raw, round=2**60), "round"),
        (lambda raw: _respell(raw, protocol=2), "protocol version"),
        (lambda raw: _respell(raw, sender="a/b"), "sender"),
        (lambda raw: _respell(raw, sender=""), "sender"),
        (lambda raw: _respell(raw, fleet=None), "fleet"),
        (lambda raw: _respell(raw, nonce="00"), "nonce"),
        (lambda raw: _respell(raw, nonce="0001020304050607080910111213141Z"), "hex"),
        (lambda raw: _respell(raw, nonce="000102030405060708090A0B0C0D0E0F"), "lowercase"),
        (lambda raw: _respell(raw, kind="model"), "kind"),
        (lambda raw: _respell(raw, encoding="zip"), "encoding"),
        (lambda raw: b"[1,2]", "object"),
        (lambda raw: b"\xff" + raw, "ASCII JSON"),
        (lambda raw: b'{"a":NaN}', "non-integer"),
        (lambda raw: b" " * 5000, "exceeds"),
        (lambda raw: b"[" * 4000, "nested too deeply"),
    ],
)
def test_update_header_from_bytes_rejects_anything_but_canonical_valid_json(
    make_header: Callable[..., UpdateHeader], mutate: Callable[[bytes], bytes], match: str
) -> None:
    with pytest.raises(MalformedMessageError, match=match):
        UpdateHeader.from_bytes(mutate(make_header().to_bytes()))


@pytest.mark.parametrize(
    "overrides",
    [
        {"fleet": "has space"},
        {"region": "$SYS"},
        {"sender": "x" * 129},
        {"round": -1},
        {"bundle_version": 1.0},
        {"sample_count": False},
        {"nonce": b"short"},
        {"timestamp_ms": None},
        {"kind": "model"},
        {"encoding": "gzip"},
        {"protocol": 2},
    ],
)
def test_update_header_constructor_rejects_invalid_fields(make_header: Callable[..., UpdateHeader], overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make_header(**overrides)


def test_model_header_refuses_update_kinds() -> None:
    with pytest.raises(ValueError, match="kind"):
        ModelHeader(kind=MessageKind.UPDATE, fleet="demo", sender="root", round=0, bundle_version=0, nonce=bytes(16), timestamp_ms=0)
