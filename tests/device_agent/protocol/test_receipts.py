"""Receipts: signed answers to updates, accepted or rejected with a reason code."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.errors import AuthenticationError, MalformedMessageError, RejectedUpdateError
from device_agent.protocol.headers import UpdateHeader
from device_agent.protocol.receipts import Receipt, ReceiptStatus, open_receipt, sign_receipt


@pytest.fixture
def aggregator_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes(range(50, 82)))


def test_receipt_answering_accepted_update_round_trips(make_header: Callable[..., UpdateHeader], aggregator_key: Ed25519PrivateKey) -> None:
    header = make_header()
    receipt = Receipt.answering(header, issuer="agg-eu", clock=lambda: 2.5)
    opened = open_receipt(sign_receipt(receipt, signer_key=aggregator_key), trusted_signers=aggregator_key.public_key())
    assert opened == receipt
    assert opened.status is ReceiptStatus.ACCEPTED and opened.reason == "" and opened.timestamp_ms == 2500
    assert opened.answers(header)


def test_receipt_answering_rejection_carries_its_reason(make_header: Callable[..., UpdateHeader], aggregator_key: Ed25519PrivateKey) -> None:
    receipt = Receipt.answering(make_header(), issuer="agg-eu", rejection=RejectedUpdateError("norm", "too big"))
    opened = open_receipt(sign_receipt(receipt, signer_key=aggregator_key), trusted_signers=[aggregator_key.public_key()])
    assert (opened.status, opened.reason) == (ReceiptStatus.REJECTED, "norm")


def test_receipt_answers_only_its_own_update(make_header: Callable[..., UpdateHeader]) -> None:
    receipt = Receipt.answering(make_header(), issuer="agg-eu")
    assert not receipt.answers(make_header(nonce=b"\xff" * 16))
    assert not receipt.answers(make_header(round=6))
    assert not receipt.answers(make_header(sender="dev-2"))


def test_receipt_from_untrusted_or_tampered_signer_fails_authentication(
    make_header: Callable[..., UpdateHeader], aggregator_key: Ed25519PrivateKey, device_key: Ed25519PrivateKey
) -> None:
    blob = sign_receipt(Receipt.answering(make_header(), issuer="agg-eu"), signer_key=aggregator_key)
    with pytest.raises(AuthenticationError):
        open_receipt(blob, trusted_signers=device_key.public_key())
    flipped = blob.replace(b'"accepted"', b'"rejected"')
    with pytest.raises(AuthenticationError):
        open_receipt(flipped, trusted_signers=aggregator_key.public_key())


def test_receipt_random_corruption_never_opens(
    make_header: Callable[..., UpdateHeader], aggregator_key: Ed25519PrivateKey, corruptions: Callable[..., Iterator[bytes]]
) -> None:
    blob = sign_receipt(Receipt.answering(make_header(), issuer="agg-eu"), signer_key=aggregator_key)
    for mutated in corruptions(blob, seed=3, count=200):
        with pytest.raises((MalformedMessageError, AuthenticationError)):
            open_receipt(mutated, trusted_signers=aggregator_key.public_key())


@pytest.mark.parametrize(
    ("status", "reason"),
    [(ReceiptStatus.ACCEPTED, "norm"), (ReceiptStatus.REJECTED, ""), (ReceiptStatus.REJECTED, "Bad Reason"), ("maybe", "")],
)
def test_receipt_status_and_reason_must_agree(status: ReceiptStatus, reason: str) -> None:
    with pytest.raises(ValueError):
        Receipt(fleet="demo", issuer="agg", device="dev-1", round=1, update_nonce=bytes(16), status=status, reason=reason, timestamp_ms=0)
