"""Classification twins of `train/pairwise.py`, for routers: tokenised or cached-feature prompt datasets with integer
labels, the cross-entropy step, and held-out accuracy (sharded over processes, then gathered)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moerm.encoding import PairEncoder
from moerm.train import distributed


@dataclass
class PromptTexts:
    """Tokenised prompts with integer domain labels, for training a router with cross-entropy."""

    items: list[dict[str, Any]]
    encoder: PairEncoder

    @classmethod
    def build(cls, examples: Sequence[tuple[str, str]], domains: Sequence[str], encoder: PairEncoder) -> "PromptTexts":
        index = {d: i for i, d in enumerate(domains)}
        return cls([{"enc": encoder.encode_single(p), "label": index[d]} for p, d in examples], encoder)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]

    def lengths(self) -> list[int]:
        """Per item, its prompt's token count (for `train.group_by_length`)."""
        return [len(it["enc"]["input_ids"]) for it in self.items]

    def collate(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        enc = self.encoder.pad([b["enc"] for b in batch])  # (B, T)
        enc["labels"] = torch.tensor([b["label"] for b in batch])  # (B,)
        return enc


@dataclass
class FeatureTexts:
    """Cached prompt features (N, H) with labels, for a frozen-backbone router."""

    features: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def labelled(cls, features: torch.Tensor, examples: Sequence[tuple[str, str]],
                 domains: Sequence[str]) -> "FeatureTexts":
        """Features (N, H) of (prompt, domain) examples, labelled by each domain's index in `domains`."""
        index = {d: i for i, d in enumerate(domains)}
        return cls(features, torch.tensor([index[d] for _, d in examples], dtype=torch.long))

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        ix = torch.tensor(idx)
        return {"features": self.features[ix], "labels": self.labels[ix]}


def classification_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy on raw logits (never on softmaxed outputs)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs)  # (B, D)
    loss = F.cross_entropy(logits, batch["labels"])
    return loss, {"accuracy": float((logits.argmax(-1) == batch["labels"]).float().mean())}


@torch.no_grad()
def classification_eval(model: nn.Module, data: PromptTexts | FeatureTexts, batch_size: int = 64) -> dict[str, float]:
    """Router accuracy on `data`; under a multi-process launch each process classifies its shard (then gathered)."""
    device = next(model.parameters()).device
    mine = distributed.shard(len(data))
    local: list[bool] = []
    for s in range(0, len(mine), batch_size):
        batch = data.collate([data[i] for i in mine[s : s + batch_size]])
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        local += (model(**inputs).argmax(-1).cpu() == batch["labels"]).tolist()
    rows = distributed.gather_rows(local, len(data))
    return {"accuracy": sum(rows) / len(rows) if rows else float("nan")}
