"""Exception hierarchy shared by the device agent and the SDK.

Every fedge failure derives from :class:`FedgeError`. Caller mistakes (bad
arguments) raise ``ValueError``/``TypeError`` instead.
"""

from __future__ import annotations


class FedgeError(Exception):
    """Base class of every fedge-specific error."""


class BundleError(FedgeError):
    """A training bundle is malformed (bad manifest, missing file, bad layout)."""


class BundleVerificationError(BundleError):
    """A bundle failed authentication (signature, key or file hash).

    The message is deliberately opaque: it does not reveal which check failed.
    """

    def __init__(self, message: str = "bundle verification failed") -> None:
        super().__init__(message)


class TrainingError(FedgeError):
    """On-device training could not proceed (bad data, wrong shapes, NaN loss)."""


class StateError(FedgeError):
    """Persisted device state is missing, corrupt or from another bundle."""


class AuthenticationError(FedgeError):
    """A message failed authentication or decryption (opaque on purpose)."""

    def __init__(self, message: str = "authentication failed") -> None:
        super().__init__(message)


class MalformedMessageError(FedgeError):
    """A message is structurally invalid; the message says what is wrong."""


class RejectedUpdateError(FedgeError):
    """An authentic update was refused by validation (shape, norm, replay, round...).

    ``reason`` is a short machine-readable code used in receipts and counters.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
