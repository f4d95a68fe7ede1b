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

    @torch.no_grad()
    def start_as_mean_of(self, weights: torch.Tensor, biases: torch.Tensor, scale: float = 0.01) -> None:
        """Start as the mean of K linear expert heads: out = mean_k (w_k . h_k + b_k).

        Hidden unit 0 carries that mean (its input row is [w_1 .. w_K] / K, PReLU starts as the identity); the other
        units start small and random so they can learn what the mean misses.

        Args:
            weights: (K, H) the experts' head weights; biases: (K,) their biases.
        """
        first, act, last = self.net
        first.weight.mul_(scale)
        first.bias.zero_()
        first.weight[0] = weights.reshape(-1) / self.num_experts  # (K*H,)
        act.weight.fill_(1.0)  # identity until trained
        last.weight.mul_(scale)
        last.weight[0, 0] = 1.0
        last.bias.fill_(float(biases.mean()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n, k, h = features.shape  # (N, K, H)
        if (k, h) != (self.num_experts, self.hidden_size):
            raise ValueError(f"expected (N, {self.num_experts}, {self.hidden_size}) expert states, got {tuple(features.shape)}")
        return self.net(features.reshape(n, k * h)).squeeze(-1)  # (N,)
