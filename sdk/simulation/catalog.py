"""The models the simulator and the benchmarks build, by name, with their shared/personal split."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from sdk.datasets.federated import FederatedDataset
    from sdk.model_spec import ParameterSplit

MODEL_KINDS = ("mlp", "cnn1d", "cnn2d", "logreg")


def build_model(kind: str, data: FederatedDataset, *, personal: bool,
                hidden: tuple[int, ...] = (32,)) -> tuple[torch.nn.Module, ParameterSplit, tuple[str, ...]]:
    """``(model, split, finetune prefixes)`` for ``kind`` sized to ``data``.

    ``personal`` True: trunk ``base`` shared, ``head`` personal. False: every
    parameter shared, and the head offered for local fine-tuning (FedAvg+FT),
    except for logistic regression, which is all head. ``hidden`` sizes the MLP.
    """
    from sdk.model_spec import ParameterSplit
    from sdk.models import BASE_HEAD_SPLIT, LogisticRegression, PersonalizedCNN1D, PersonalizedCNN2D, PersonalizedMLP

    if kind == "logreg":
        if personal:
            raise ValueError("logistic regression has no personal head; use a federated-everything algorithm")
        return LogisticRegression(data.input_shape[0], data.num_classes), ParameterSplit(shared=("*",)), ()
    model: torch.nn.Module
    if kind == "cnn1d":
        model = PersonalizedCNN1D(data.input_shape[0], data.num_classes)
    elif kind == "cnn2d":
        model = PersonalizedCNN2D(data.input_shape[0], data.num_classes)
    elif kind == "mlp":
        model = PersonalizedMLP(data.input_shape[0], hidden, data.num_classes)
    else:
        raise ValueError(f"unknown model {kind!r}; choose from {MODEL_KINDS}")
    if personal:
        return model, BASE_HEAD_SPLIT, ()
    return model, ParameterSplit(shared=("*",)), ("head",)
