"""The interface every training backend implements, and the backend names."""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum

import numpy as np

from device_agent.bundle.manifest import ArtifactKind, ArtifactSetName
from device_agent.training_backends.state import TrainingState


class BackendName(str, Enum):
    """A training backend, or ``auto`` (choose from what is installed and what the bundle carries)."""

    AUTO = "auto"
    PORTABLE = "portable"
    ORT_TRAINING = "ort-training"

    @property
    def artifact_kind(self) -> ArtifactKind:
        """The bundle artifacts this backend runs (ValueError for ``auto``)."""
        if self is BackendName.AUTO:
            raise ValueError("auto is not a backend")
        return ArtifactKind(self.value)


class TrainingBackend(ABC):
    """One installed bundle's training state and graphs, behind five verbs.

    Parameter names are the model's (``base.0.weight``) plus ``anchor.<name>``
    for FedProx anchors. Every artifact set sees the same parameter values:
    a step of one set is visible to the next step of any other.
    """

    name: BackendName

    @abstractmethod
    def train_step(self, set_name: ArtifactSetName, x: np.ndarray, y: np.ndarray) -> float:
        """Forward, backward and one optimizer step of artifact set ``set_name``; returns the loss."""

    @abstractmethod
    def eval_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Loss (task + FedProx term) and model outputs, updating nothing."""

    @abstractmethod
    def get_parameter(self, name: str) -> np.ndarray:
        """A copy of parameter (or ``anchor.<name>``) ``name``."""

    @abstractmethod
    def set_parameter(self, name: str, value: np.ndarray) -> None:
        """Overwrite parameter (or anchor) ``name``; ``value`` is float32 of the right shape."""

    @abstractmethod
    def set_learning_rate(self, value: float) -> None:
        """The learning rate of every set's next steps."""

    @abstractmethod
    def export_state(self) -> TrainingState:
        """Parameters, anchors and every set's optimizer state as named arrays (copies)."""
