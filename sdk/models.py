"""Reference models built as *shared layers + personal head*.

Each model names its shared trunk ``base`` and its personal head ``head`` so
the split is ``ParameterSplit(shared=("base",), personal=("head",))``.
"""

from __future__ import annotations

import torch
from torch import nn

from sdk.model_spec import ParameterSplit

#: The split every model in this module uses.
BASE_HEAD_SPLIT = ParameterSplit(shared=("base",), personal=("head",))


class PersonalizedMLP(nn.Module):
    """A ReLU MLP trunk (``base``) and a linear personal head (``head``)."""

    def __init__(self, in_features: int, hidden: tuple[int, ...] = (64, 32), num_classes: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.base = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x))


class PersonalizedCNN1D(nn.Module):
    """1D-CNN for multichannel sensor windows, e.g. (6, 100) accelerometer+gyroscope.

    Two conv blocks and global average pooling form the shared trunk; the head
    is a small linear classifier, so it holds only a few percent of the weights.
    """

    def __init__(self, in_channels: int = 6, num_classes: int = 7, width: int = 32) -> None:
        super().__init__()
        self.base = nn.Sequential(
            nn.Conv1d(in_channels, width, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(width, width * 2, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(width * 2, width * 2),
            nn.ReLU(),
        )
        self.head = nn.Linear(width * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x))


class LogisticRegression(nn.Module):
    """Multinomial logistic regression (FedProx's Synthetic benchmark); all shared."""

    def __init__(self, in_features: int = 60, num_classes: int = 10) -> None:
        super().__init__()
        self.base = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)


class PersonalizedCNN2D(nn.Module):
    """The 4-layer CNN of the PFLlib leaderboard (2 conv + 2 fc) for 1x28x28 images.

    Trunk: conv5x5(32) -> pool -> conv5x5(64) -> pool -> fc(512); head: fc(num_classes),
    i.e. FedPer/FedRep's split into a shared feature extractor and a personal classifier.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, hidden: int = 512) -> None:
        super().__init__()
        self.base = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, hidden),
            nn.ReLU(),
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x))
