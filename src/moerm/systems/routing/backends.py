"""Router backends: what turns encoded prompts into the (b, H) features a router's classifier reads. One protocol, five
interchangeable implementations; a `Router` holds one and never asks which.

| backend        | features                                               | what trains with the classifier |
|----------------|--------------------------------------------------------|---------------------------------|
| `CachedPooled` | a frozen backbone's pooled output (cached on disk)     | nothing                         |
| `EarlyLayers`  | mean of the pretrained states after k blocks           | nothing                         |
| `TrunkStates`  | mean of the frozen trunk's output states (`top` mode)  | nothing                         |
| `TunedBackbone`| a fully or LoRA-tuned backbone's pooled output         | that backbone                   |
| `SharedAdapter`| the pooled output through one adapter of a shared base | that adapter (ARLISS)           |

A backend that trains nothing precomputes the features of the training prompts once (`train_features`), so the
classifier trains on cached features; the others train on token batches.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from torch import nn

from moerm.config import ModelConfig
from moerm.encoding import Backbone, PairEncoder
from moerm.encoding.adapters import encode_through
from moerm.encoding.cache import frozen_features
from moerm.encoding.trunk import compute_trunk
from moerm.systems.routing.features import early_features, prompt_features

Rows = list[dict[str, list[int]]]


class RouterBackend(Protocol):
    backbone: Backbone
    encoder: PairEncoder

    @property
    def trained(self) -> nn.Module | None:
        """The module trained together with the classifier; None: the classifier alone, on `train_features`."""

    def features(self, rows: Rows) -> torch.Tensor:
        """(b, H) features of encoded prompts, on the backbone's device."""

    def train_features(self, prompts: Sequence[str], batch_size: int, desc: str, progress: bool) -> torch.Tensor:
        """(N, H) features of the training (or held-out) prompts, for a backend that trains nothing."""


def _device(backbone: nn.Module) -> torch.device:
    return next(backbone.parameters()).device


class _Batched:
    """Shared by the backends whose training features are their inference features, computed in sorted batches."""

    backbone: Backbone
    encoder: PairEncoder

    def features(self, rows: Rows) -> torch.Tensor:
        raise NotImplementedError

    def train_features(self, prompts: Sequence[str], batch_size: int, desc: str, progress: bool) -> torch.Tensor:
        return prompt_features(prompts, self.encoder, self.features, batch_size)


class PooledForward(_Batched):
    """The backbone's pooled output of the prompt."""

    def __init__(self, backbone: Backbone, encoder: PairEncoder):
        self.backbone, self.encoder = backbone, encoder

    def features(self, rows: Rows) -> torch.Tensor:
        b = {k: v.to(_device(self.backbone)) for k, v in self.encoder.pad(rows).items()}  # (b, T)
        return self.backbone(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))  # (b, H)


class CachedPooled(PooledForward):
    """A frozen backbone: its pooled features of the training prompts come from the run's feature cache."""

    def __init__(self, backbone: Backbone, encoder: PairEncoder, model: ModelConfig):
        super().__init__(backbone, encoder)
        self.model = model

    @property
    def trained(self) -> nn.Module | None:
        return None

    def train_features(self, prompts: Sequence[str], batch_size: int, desc: str, progress: bool) -> torch.Tensor:
        return frozen_features(self.backbone, self.encoder, self.model, prompts, None, batch_size, desc, progress)


class TunedBackbone(PooledForward):
    """A backbone trained with the classifier (fully, or its LoRA adapter)."""

    @property
    def trained(self) -> nn.Module | None:
        return self.backbone


class EarlyLayers(_Batched):
    """The mean of the prompt's pretrained states after the first `blocks` blocks (only they run, adapters off)."""

    def __init__(self, backbone: Backbone, encoder: PairEncoder, blocks: int):
        self.backbone, self.encoder, self.blocks = backbone, encoder, blocks

    @property
    def trained(self) -> nn.Module | None:
        return None

    def features(self, rows: Rows) -> torch.Tensor:
        return early_features(self.backbone, self.encoder, rows, self.blocks)  # (b, H)


class TrunkStates:
    """The mean over the prompt's tokens of the frozen trunk's output states (the trunk of `top` tuning)."""

    def __init__(self, backbone: Backbone, encoder: PairEncoder):
        self.backbone, self.encoder = backbone, encoder

    @property
    def trained(self) -> nn.Module | None:
        return None

    def _states(self, rows: Rows, batch_size: int) -> torch.Tensor:
        if not rows:
            return torch.empty(0, self.backbone.hidden_size)
        states = compute_trunk(self.backbone, list(rows), self.encoder, batch_size)  # (T_i, H) each
        return torch.stack([s.mean(0) for s in states])  # (N, H)

    def features(self, rows: Rows) -> torch.Tensor:
        return self._states(rows, len(rows)).to(_device(self.backbone))

    def train_features(self, prompts: Sequence[str], batch_size: int, desc: str, progress: bool) -> torch.Tensor:
        return self._states([self.encoder.encode_single(p) for p in prompts], batch_size)


class SharedAdapter:
    """The pooled output of a shared peft base through one named adapter (ARLISS's router adapter)."""

    def __init__(self, backbone: Backbone, encoder: PairEncoder, adapter: str):
        self.backbone, self.encoder, self.adapter = backbone, encoder, adapter

    @property
    def trained(self) -> nn.Module | None:
        return self.backbone  # only the active adapter's LoRA weights require grad (the system activates it)

    def features(self, rows: Rows) -> torch.Tensor:
        b = {k: v.to(_device(self.backbone)) for k, v in self.encoder.pad(rows).items()}  # (b, T)
        return encode_through(self.backbone, b["input_ids"], b["attention_mask"], b.get("token_type_ids"),
                              [self.adapter] * len(rows))  # (b, H)

    def train_features(self, prompts: Sequence[str], batch_size: int, desc: str, progress: bool) -> torch.Tensor:
        raise RuntimeError("a shared adapter trains with its classifier on token batches, not cached features")
