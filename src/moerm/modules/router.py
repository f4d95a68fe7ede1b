"""Domain router: pooled prompt features (N, H) -> logits over domains (N, D). Pure module, no I/O."""

from __future__ import annotations

import torch
from torch import nn

from moerm.encoding.backbone import Backbone


class DomainClassifier(nn.Module):
    """A sequence classifier over the prompt alone. With `backbone=None` it reads cached features."""

    def __init__(self, backbone: Backbone | None, hidden_size: int, num_domains: int, dropout: float = 0.1,
                 classifier: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        # features (N, H) -> logits (N, D); a given classifier is shared, not copied (ARLISS's router head)
        self.classifier = classifier if classifier is not None else nn.Sequential(
            nn.Dropout(dropout), nn.Linear(hidden_size, num_domains))

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, features: torch.Tensor | None = None,
                trunk_states: torch.Tensor | None = None) -> torch.Tensor:
        if features is None:
            if self.backbone is None:
                raise ValueError("this router reads cached features: pass features=")
            features = self.backbone(input_ids, attention_mask, token_type_ids, trunk_states)  # (N, H)
        return self.classifier(features)  # (N, D)
