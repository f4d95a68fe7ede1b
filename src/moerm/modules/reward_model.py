"""A reward model: backbone features -> reward head. Pure module, no I/O."""

from __future__ import annotations

import torch
from torch import nn

from moerm.encoding.backbone import Backbone


class RewardModel(nn.Module):
    """Token ids (N, T) -> rewards (N,). With `backbone=None` it reads cached features (N, H) instead."""

    def __init__(self, backbone: Backbone | None, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_loss: torch.Tensor | None = None  # set each forward when the head has one (MoE balancing)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, features: torch.Tensor | None = None,
                trunk_states: torch.Tensor | None = None) -> torch.Tensor:
        if features is None:
            if self.backbone is None:
                raise ValueError("this reward model reads cached features: pass features=")
            features = self.backbone(input_ids, attention_mask, token_type_ids, trunk_states)  # (N, H)
        rewards = self.head(features)  # (N,)
        self.aux_loss = getattr(self.head, "aux_loss", None)
        return rewards
