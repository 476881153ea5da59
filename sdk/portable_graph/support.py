"""Which PyTorch layers a fedge bundle may contain, checked before anything is exported.

Every ``torch.nn`` layer in the model must be on the list below (containers
are walked); layers written by the user are traced through, and whatever ops
they use must export to standard ONNX and pass the build's self-check. A
refused model gets one line naming the layer's module path and type, at
``fedge bundle build`` time, instead of a bundle that installs and then fails
to train on the device.
"""

from __future__ import annotations

from torch import nn

from device_agent.errors import FedgeError

#: Layers the portable training graph expresses (tests/sdk/portable_graph trains a model holding each on both backends,
#: except those in ORT_TRAINING_REFUSED, trained on portable only).
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d,
    nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.Flatten, nn.Identity,
)
_CONTAINERS: tuple[type[nn.Module], ...] = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
#: Layers onnxruntime-training 1.19 cannot train: its average-pool gradient dies with SIGFPE (measured), so
#: bundles that carry ORT-training artifacts refuse them; portable-only bundles train them.
ORT_TRAINING_REFUSED: tuple[type[nn.Module], ...] = (nn.AvgPool1d, nn.AvgPool2d)

_REASONS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.modules.batchnorm._BatchNorm, "BatchNorm in training mode (batch statistics, running-stat updates) is not "
                                      "supported by fedge's training graphs; remove it or normalise the inputs before the model"),
    (nn.modules.dropout._DropoutNd, "Dropout is not supported (the training graphs are deterministic so that both "
                                    "backends give the same numbers); remove it"),
)


class UnsupportedModelError(FedgeError):
    """The model holds a layer (or op) fedge's training graphs cannot express; the message names it."""


def _layer_problem(module: nn.Module) -> str | None:
    for kind, reason in _REASONS:
        if isinstance(module, kind):
            return reason
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return "only groups=1, padding_mode='zeros' and numeric padding are supported"
        return None
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d)):
        padded = any(module.padding) if isinstance(module.padding, tuple) else bool(module.padding)
        if padded or module.ceil_mode or getattr(module, "divisor_override", None):
            return "only average pooling without padding, ceil_mode or divisor_override is supported"
        return None
    if isinstance(module, SUPPORTED_LAYERS + _CONTAINERS):
        return None
    if type(module).__module__.startswith("torch.nn"):
        return "this layer type is not covered by fedge's training graphs (supported: " + \
            ", ".join(t.__name__ for t in SUPPORTED_LAYERS) + ")"
    return None  # a user-defined module: traced through, its ops are checked at export


def check_model_supported(model: nn.Module, *, ort_training: bool = True) -> None:
    """Raise UnsupportedModelError naming the first layer (``model.<path> (<Type>)``) that cannot be trained.

    ``ort_training``: the bundle will carry ORT-training artifacts too, so layers that backend cannot train are refused.
    """
    for path, module in model.named_modules():
        problem = _layer_problem(module)
        if problem is None and ort_training and isinstance(module, ORT_TRAINING_REFUSED):
            problem = ("onnxruntime-training 1.19 crashes (SIGFPE) in average pooling's gradient; build a portable-only "
                       "bundle (--artifacts portable) or use AdaptiveAvgPool / MaxPool")
        if problem is not None:
            where = f"model.{path}" if path else "model"
            raise UnsupportedModelError(f"{where} ({type(module).__name__}): {problem}")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise UnsupportedModelError(f"parameters with requires_grad=False are not supported, found {frozen}; use a buffer instead")
