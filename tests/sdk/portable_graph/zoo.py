"""Models for the portable-graph tests: one holding every supported layer, and ones that must be refused.

Importable as ``fedge bundle build --model tests.sdk.portable_graph.zoo:<Name>``.
"""

from __future__ import annotations

import torch
from torch import nn


class EveryLayerNet(nn.Module):
    """Every layer of ``SUPPORTED_LAYERS`` on a (2, 8, 8) input: a 2D branch, a 1D branch over rows, a linear trunk.

    Pooling both tiles (kernel == stride) and overlaps with padding, the two max-pool paths of the builder.

    ``avg_pool`` False leaves out AvgPool1d/2d (what ORT-training cannot train) so the model trains on both backends.
    """

    def __init__(self, num_classes: int = 3, *, avg_pool: bool = True) -> None:
        super().__init__()
        pool2d: nn.Module = nn.AvgPool2d(2) if avg_pool else nn.MaxPool2d(2)
        pool1d: nn.Module = nn.AvgPool1d(2) if avg_pool else nn.MaxPool1d(2)
        self.base = nn.ModuleDict({
            "conv2d": nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
                                    nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Tanh(), pool2d,
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            "conv1d": nn.Sequential(nn.Conv1d(16, 6, 3, padding=2, dilation=2), nn.Sigmoid(), nn.MaxPool1d(3, stride=2, padding=1),
                                    nn.Conv1d(6, 6, 2, stride=2), pool1d, nn.AdaptiveAvgPool1d(1), nn.Flatten()),
            "trunk": nn.ModuleList([nn.Identity(), nn.Linear(10, 12), nn.ReLU()]),
        })
        self.head = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.base["conv2d"](x)
        b = self.base["conv1d"](x.reshape(x.shape[0], 16, 8))
        h = torch.cat([a, b], dim=1)
        for layer in self.base["trunk"]:
            h = layer(h)
        return self.head(h)


class AvgPoolNet(nn.Module):
    """The two average pools (what only the portable backend trains) behind convolutions, on a (2, 8, 8) input.

    A few ops only: each op costs the bundle build a trace, and EveryLayerNet covers the rest on both backends.
    """

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.base = nn.ModuleDict({
            "conv2d": nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.AvgPool2d(2), nn.Flatten()),
            "conv1d": nn.Sequential(nn.Conv1d(16, 4, 3), nn.AvgPool1d(2), nn.Flatten()),
        })
        self.head = nn.Linear(4 * 4 * 4 + 4 * 3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.base["conv2d"](x)
        b = self.base["conv1d"](x.reshape(x.shape[0], 16, 8))
        return self.head(torch.cat([a, b], dim=1))


class BatchNormNet(nn.Module):
    """An MLP with BatchNorm1d: builds nowhere, since no backend trains batch statistics."""

    def __init__(self, in_features: int = 8, num_classes: int = 3) -> None:
        super().__init__()
        self.base = nn.Sequential(nn.Linear(in_features, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x))


class DropoutNet(nn.Module):
    """An MLP with Dropout."""

    def __init__(self, in_features: int = 8, num_classes: int = 3) -> None:
        super().__init__()
        self.base = nn.Sequential(nn.Linear(in_features, 16), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x))


class GroupedConvNet(nn.Module):
    """A grouped convolution (groups=2), which the portable backward does not cover."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Sequential(nn.Conv1d(4, 4, 3, groups=2), nn.Flatten())
        self.head = nn.Linear(4 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x))


class RecurrentNet(nn.Module):
    """A GRU: a torch.nn layer outside the supported list."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.GRU(4, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x)[0][:, -1])


class CustomOpNet(nn.Module):
    """A user-written forward with an op (lgamma) that has no standard ONNX translation: passes the layer check, fails export."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.lgamma(nn.functional.softplus(self.base(x)) + 1))
