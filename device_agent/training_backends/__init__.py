"""Training backends behind :class:`~device_agent.trainer.DeviceTrainer`.

``ort-training`` runs ONNX Runtime's on-device training artifacts
(onnxruntime-training 1.19, x86_64); ``portable`` runs standard-ops step
graphs on any onnxruntime >= 1.19 (x86_64, aarch64, armhf). Both export and
import the same backend-neutral :class:`TrainingState`.
"""

from device_agent.training_backends.base import BackendName, TrainingBackend
from device_agent.training_backends.runtime import BackendUnavailableError
from device_agent.training_backends.selection import choose_backend, installed_backends, open_backend
from device_agent.training_backends.state import OptimizerState, TrainingState

__all__ = [
    "BackendName",
    "BackendUnavailableError",
    "OptimizerState",
    "TrainingBackend",
    "TrainingState",
    "choose_backend",
    "installed_backends",
    "open_backend",
]
