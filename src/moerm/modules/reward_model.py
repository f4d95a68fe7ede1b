"""A reward model: backbone features -> reward head. Pure module, no I/O."""

from __future__ import annotations

import torch
from torch import nn

from moerm.backbone import Backbone
from moerm.modules.heads import RewardHead


class RewardModel(nn.Module):
    """Token ids (N, T) -> rewards (N,). With `backbone=None` it reads cached features (N, H) instead."""

    def __init__(self, backbone: Backbone | None, head: RewardHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        if features is None:
            if self.backbone is None:
                raise ValueError("this reward model reads cached features: pass features=")
            features = self.backbone(input_ids, attention_mask, token_type_ids)  # (N, H)
        return self.head(features)  # (N,)
