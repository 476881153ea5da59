"""What a demo run is asked to do, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from device_agent.errors import FedgeError
from sdk.training_defaults import DEFAULT_LEARNING_RATE

#: Clients of the smartwatch data set (10 subjects x 2 arms).
MAX_DEVICES = 20
#: ``broker`` choices: Mosquitto when installed or installable (as root), else embedded; or either one by name.
BROKER_BACKENDS = ("auto", "mosquitto", "embedded")


class DemoError(FedgeError):
    """The demo could not run: Mosquitto missing, a component failed, or a time limit passed."""


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """One demo run.

    ``devices`` clients of the watch data, split as evenly as possible between
    the left-arm and right-arm regions (2..20). Every device trains ``epochs``
    local passes per phase per round with ``learning_rate`` (AdamW) and the
    FedProx weight ``mu`` on the shared layers. ``round_deadline_s``: a region
    closes a round early (with whatever arrived) after this long;
    ``timeout_s`` bounds the whole run after the brokers are up. ``broker``:
    one of :data:`BROKER_BACKENDS` (``"embedded"``: amqtt brokers in this
    process, no ACLs, see :mod:`sdk.demo.embedded`).
    """

    devices: int = MAX_DEVICES
    rounds: int = 5
    epochs: int = 2
    batch_size: int = 32
    learning_rate: float = DEFAULT_LEARNING_RATE
    mu: float = 0.01
    seed: int = 0
    round_deadline_s: float = 120.0
    timeout_s: float = 900.0
    broker: str = "auto"

    def __post_init__(self) -> None:
        if not 2 <= self.devices <= MAX_DEVICES:
            raise ValueError(f"devices must be in 2..{MAX_DEVICES} (one region per arm), got {self.devices}")
        if self.rounds < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("rounds, epochs and batch_size must be >= 1")
        if not (self.learning_rate > 0 and self.mu >= 0):
            raise ValueError("learning_rate must be > 0 and mu >= 0")
        if not (self.round_deadline_s > 0 and self.timeout_s > 0):
            raise ValueError("round_deadline_s and timeout_s must be > 0")
        if self.broker not in BROKER_BACKENDS:
            raise ValueError(f"broker must be one of {', '.join(BROKER_BACKENDS)}, got {self.broker!r}")
