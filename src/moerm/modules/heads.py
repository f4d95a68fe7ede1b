"""Reward heads: pooled features (N, H) -> scalar rewards (N,)."""

from __future__ import annotations

import torch
from torch import nn


class RewardHead(nn.Module):
    """A linear layer, or a small MLP (Linear -> GELU -> Dropout -> Linear), producing one reward per row."""

    def __init__(self, hidden_size: int, kind: str = "linear", hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.net: nn.Module = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, 1))
        elif kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(hidden_size, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
            )
        else:
            raise ValueError(f"unknown head kind {kind!r} (linear | mlp)")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)  # (N, H) -> (N,)
