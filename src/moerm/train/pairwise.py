"""Pairwise training data (tokens or cached features), its collation, and the Bradley-Terry step and eval."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from moerm.encoding import PairEncoder
from moerm.data.schema import PreferencePair
from moerm.train import distributed
from moerm.train.loss import bradley_terry_loss


@dataclass
class TokenPairs:
    """Pre-tokenised pairs: each item holds chosen and rejected encodings and the margin (0 when unset)."""

    items: list[dict[str, Any]]
    encoder: PairEncoder

    @classmethod
    def build(cls, pairs: Sequence[PreferencePair], encoder: PairEncoder, progress: bool = False) -> "TokenPairs":
        items = [
            {"chosen": encoder.encode(p.prompt, p.chosen), "rejected": encoder.encode(p.prompt, p.rejected),
             "margin": float(p.margin or 0.0)}
            for p in tqdm(pairs, desc="tokenize", disable=not progress or None, leave=False)
        ]
        return cls(items, encoder)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]

    def lengths(self) -> list[int]:
        """Per item, the longer of its chosen and rejected token counts: the width it pads its batch to."""
        return [max(len(it["chosen"]["input_ids"]), len(it["rejected"]["input_ids"])) for it in self.items]

    def collate(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Chosen and rejected go through the model in one forward pass: rows [0, B) chosen, [B, 2B) rejected."""
        enc = self.encoder.pad([b["chosen"] for b in batch] + [b["rejected"] for b in batch])  # (2B, T)
        enc["margin"] = torch.tensor([b["margin"] for b in batch], dtype=torch.float32)  # (B,)
        return enc


@dataclass
class FeaturePairs:
    """Cached pooled features of chosen (N, H) and rejected (N, H) replies, for heads-only training."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    margin: torch.Tensor

    def __len__(self) -> int:
        return self.chosen.shape[0]

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        ix = torch.tensor(idx)
        return {"features": torch.cat([self.chosen[ix], self.rejected[ix]]), "margin": self.margin[ix]}  # (2B, H)


def make_pairwise_step(center_coef: float = 0.0, use_margin: bool = True) -> Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]:
    """The training step of every pairwise reward model: one forward over 2B rows, BT loss on the halves."""

    def step(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = {k: v for k, v in batch.items() if k != "margin"}
        rewards = model(**inputs)  # (2B,)
        b = rewards.shape[0] // 2
        r_c, r_r = rewards[:b], rewards[b:]
        loss = bradley_terry_loss(r_c, r_r, batch["margin"] if use_margin else None, center_coef)
        aux = getattr(getattr(model, "module", model), "aux_loss", None)  # (DDP wraps the model in .module)
        if isinstance(aux, torch.Tensor):  # e.g. an MoE load-balancing term set during forward
            loss = loss + aux
        return loss, {"accuracy": float((r_c > r_r).float().mean())}

    return step


@torch.no_grad()
def pairwise_eval(model: nn.Module, data: TokenPairs | FeaturePairs, batch_size: int = 64) -> dict[str, float]:
    """Accuracy and reward statistics of `model` on held-out pairs (model in eval mode).

    Under a multi-process launch each process scores its shard and the rewards are gathered, so every process
    returns the metrics of the whole set (and none scores it all).
    """
    device = next(model.parameters()).device
    mine = distributed.shard(len(data))
    local: list[tuple[float, float]] = []
    for s in range(0, len(mine), batch_size):
        idx = mine[s : s + batch_size]
        batch = data.collate([data[i] for i in idx])
        inputs = {k: v.to(device) for k, v in batch.items() if k != "margin"}
        r = model(**inputs).float().cpu()  # (2b,)
        b = r.shape[0] // 2
        local += list(zip(r[:b].tolist(), r[b:].tolist()))
    rows = distributed.gather_rows(local, len(data))
    if not rows:
        return {"accuracy": float("nan"), "reward_mean": float("nan"), "reward_std": 0.0, "margin_mean": float("nan")}
    rc = torch.tensor([c for c, _ in rows], dtype=torch.float64)
    rr = torch.tensor([r for _, r in rows], dtype=torch.float64)
    both = torch.cat([rc, rr])
    return {"accuracy": float((rc > rr).double().mean()), "reward_mean": float(both.mean()),
            "reward_std": float(both.std()) if both.numel() > 1 else 0.0, "margin_mean": float((rc - rr).mean())}
