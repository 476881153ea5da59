"""Errors of the device daemon, all under :class:`~device_agent.errors.FedgeError`."""

from __future__ import annotations

from device_agent.errors import FedgeError


class ConfigError(FedgeError, ValueError):
    """The agent configuration is invalid; the message names the file and the dotted key."""


class ReceiptTimeoutError(FedgeError):
    """No receipt answered an update after every allowed attempt (``attempts`` sends).

    Not a rejection: the update may still have arrived. The sealed update stays
    pending on disk so the next attempt resends the same bytes.
    """

    def __init__(self, round_number: int, attempts: int) -> None:
        super().__init__(f"no receipt for the round {round_number} update after {attempts} attempt(s)")
        self.round_number = round_number
        self.attempts = attempts


class AgentStopped(FedgeError):
    """The agent was asked to stop (its stop event was set) while it waited."""
