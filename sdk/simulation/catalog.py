"""The built-in models the simulator and the benchmarks build by name, as :class:`ModelSource` s."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdk.simulation.runner import ModelSource

if TYPE_CHECKING:
    import torch

    from sdk.datasets.federated import FederatedDataset
    from sdk.model_spec import ParameterSplit

MODEL_KINDS = ("mlp", "cnn1d", "cnn2d", "logreg")


def default_model_kind(input_shape: tuple[int, ...]) -> str:
    """The built-in model for examples of this shape: (features,) MLP, (channels, length) 1D-CNN, (channels, h, w) 2D-CNN."""
    kinds = {1: "mlp", 2: "cnn1d", 3: "cnn2d"}
    if len(input_shape) not in kinds:
        raise ValueError(f"no built-in model for examples of shape {input_shape}; pass your own model (MODULE:CALLABLE)")
    return kinds[len(input_shape)]


def builtin_model(kind: str, data: FederatedDataset, *, hidden: tuple[int, ...] = (32,)) -> ModelSource:
    """The built-in ``kind`` sized to ``data``: trunk ``base`` shared, ``head`` personal.

    Logistic regression is all head, so it has no personal layers and serves
    only the algorithms that federate everything. ``hidden`` sizes the MLP.
    """
    from sdk.models import LogisticRegression, PersonalizedCNN1D, PersonalizedCNN2D, PersonalizedMLP

    shape, classes = data.input_shape, data.num_classes
    factories = {
        "logreg": lambda: LogisticRegression(shape[0], classes),
        "cnn1d": lambda: PersonalizedCNN1D(shape[0], classes),
        "cnn2d": lambda: PersonalizedCNN2D(shape[0], classes),
        "mlp": lambda: PersonalizedMLP(shape[0], hidden, classes),
    }
    if kind not in factories:
        raise ValueError(f"unknown model {kind!r}; choose from {MODEL_KINDS}")
    build = factories[kind]
    if kind == "logreg":
        return ModelSource(factory=build, name=kind)
    return ModelSource(factory=build, personal=("head",), shared=("base",), name=kind)


def build_model(kind: str, data: FederatedDataset, *, personal: bool,
                hidden: tuple[int, ...] = (32,)) -> tuple[torch.nn.Module, ParameterSplit, tuple[str, ...]]:
    """``(model, split, finetune prefixes)`` for ``kind`` sized to ``data`` (the model built now, with torch's current seed).

    ``personal`` True: trunk ``base`` shared, ``head`` personal. False: every
    parameter shared, and the head offered for local fine-tuning (FedAvg+FT),
    except for logistic regression, which is all head.
    """
    from sdk.simulation.algorithms import algorithm

    source = builtin_model(kind, data, hidden=hidden)
    split, finetune = source.split_for(algorithm("fedalt" if personal else "fedavg"))
    return source.factory(), split, finetune
