"""Pairwise losses for reward modelling."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """-log sigmoid(r_c - r_r - margin), averaged, plus TRL's centering term coef * mean((r_c + r_r)^2).

    Args:
        r_chosen: (B,) rewards of the preferred replies.
        r_rejected: (B,) rewards of the other replies.
        margin: optional (B,) required gap (as Llama 2's margin loss); 0 where unknown.
        center_coef: weight of the term that pulls rewards towards zero mean.
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * torch.mean((r_chosen + r_rejected) ** 2)
    return loss


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs where the chosen reply scores strictly higher (ties count as wrong)."""
    return (r_chosen > r_rejected).float().mean()
