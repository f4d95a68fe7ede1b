"""Batched inference helpers shared by systems: length-sorted batches, results in input order."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from moerm.encoding import PairEncoder


def sorted_batches(encoded: Sequence[dict[str, list[int]]], batch_size: int) -> Iterator[list[int]]:
    """Indices of `encoded` in batches of similar length, so padding stays small."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    for s in range(0, len(order), batch_size):
        yield order[s : s + batch_size]


def in_sorted_batches(encoded: Sequence[dict[str, list[int]]], batch_size: int,
                      run: Callable[[list[int]], torch.Tensor]) -> torch.Tensor | None:
    """`run(indices)` -> (b, ...) rows for each length-sorted batch of `encoded`; all rows back in input order (None
    when there is nothing to run). The one "sort by length, run, scatter back" of every batched inference path."""
    order: list[int] = []
    outs: list[torch.Tensor] = []
    for idx in sorted_batches(encoded, batch_size):
        outs.append(run(idx))
        order += idx
    if not outs:
        return None
    sorted_out = torch.cat(outs)
    result = torch.empty_like(sorted_out)
    result[torch.tensor(order)] = sorted_out
    return result


@torch.no_grad()
def batched_forward(
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    encoder: PairEncoder,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Run `forward` over length-sorted batches (little padding) and return its rows in input order.

    `forward` maps a padded batch to a tensor whose first dimension is the batch (e.g. rewards (b,) or
    features (b, H)).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    encoded = [encoder.encode(p, r) for p, r in zip(prompts, responses)]

    def run(idx: list[int]) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in encoder.pad([encoded[i] for i in idx]).items()}
        return forward(batch).float().cpu()

    out = in_sorted_batches(encoded, batch_size, run)
    return out if out is not None else torch.zeros(0)
