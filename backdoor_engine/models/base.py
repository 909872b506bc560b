"""The shape every reference classifier shares: logits are a linear `head` over `penultimate` features."""

from abc import ABC, abstractmethod

import torch
from torch import nn


class ImageClassifier(nn.Module, ABC):
    """`forward(x) == head(penultimate(x))`; detectors capture `penultimate` features (N x feature_dim)."""

    head: nn.Linear

    @abstractmethod
    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """Features fed to `head`, shape [N, feature_dim]."""

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.penultimate(x))
