"""What the trainer takes and returns: the round budget, training and evaluation reports, and model views."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


@dataclass(frozen=True, kw_only=True)
class TrainBudget:
    """How much local work one round may do.

    ``epochs`` passes over the data per phase, capped at ``max_steps`` steps per
    phase when given (a straggler's partial budget). ``personal_epochs`` sets
    the personal phase: FedAlt's head phase, Ditto's personal model (None: same
    as ``epochs``). ``learning_rate`` None keeps the bundle's default.
    """

    epochs: int = 1
    batch_size: int = 32
    max_steps: int | None = None
    personal_epochs: int | None = None
    learning_rate: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError("max_steps must be >= 0")
        if self.personal_epochs is not None and self.personal_epochs < 0:
            raise ValueError("personal_epochs must be >= 0")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError("learning_rate must be > 0")

    @property
    def head_epochs(self) -> int:
        """Epochs of the personal phase (``personal_epochs``, or ``epochs`` when None)."""
        return self.epochs if self.personal_epochs is None else self.personal_epochs


@dataclass(frozen=True, kw_only=True)
class TrainReport:
    """What one call to :meth:`DeviceTrainer.train` did (``phase_steps``: steps per artifact set)."""

    steps: int
    examples: int
    mean_loss: float
    seconds: float
    phase_steps: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class EvalReport:
    """Loss (mean over examples) and, for classification, accuracy; ``accuracy`` None otherwise."""

    loss: float
    accuracy: float | None
    examples: int


class ModelView(str, Enum):
    """Which of a device's models to evaluate or predict with.

    ``served``: the model the device uses (Ditto: the mixture of its personal and the
    global model chosen on validation; every other mode: the model it trained).
    ``personal``: Ditto's personal model. ``global``: the last received global shared
    layers, with this device's personal head if the bundle has one.
    """

    SERVED = "served"
    PERSONAL = "personal"
    GLOBAL = "global"
