"""DMoERM's aggregator: the K capability experts' pooled states -> one reward."""

from __future__ import annotations

import torch
from torch import nn


class CapabilityAggregator(nn.Module):
    """Linear(K*H -> H) -> PReLU -> Linear(H -> 1) over the concatenated last hidden states of K experts."""

    def __init__(self, num_experts: int, hidden_size: int):
        super().__init__()
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.net = nn.Sequential(nn.Linear(num_experts * hidden_size, hidden_size), nn.PReLU(),
                                 nn.Linear(hidden_size, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n, k, h = features.shape  # (N, K, H)
        if (k, h) != (self.num_experts, self.hidden_size):
            raise ValueError(f"expected (N, {self.num_experts}, {self.hidden_size}) expert states, got {tuple(features.shape)}")
        return self.net(features.reshape(n, k * h)).squeeze(-1)  # (N,)
