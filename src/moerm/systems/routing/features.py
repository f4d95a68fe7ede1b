"""Router features of prompts: every distinct prompt encoded once, in length-sorted batches, and the early-layer
features of a frozen router (the prompt's pretrained states after a few blocks)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from moerm.encoding import Backbone, PairEncoder
from moerm.encoding.backbone import pooled
from moerm.inference import in_sorted_batches


@torch.no_grad()
def prompt_outputs(prompts: Sequence[str], encoder: PairEncoder,
                   features: Callable[[list[dict[str, list[int]]]], torch.Tensor], head: Callable[[torch.Tensor], torch.Tensor],
                   num_domains: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) routing probabilities and (N, H) router features; each distinct prompt is encoded once, in
    length-sorted batches.

    `features(encoded_rows)` maps a list of single-text encodings to (b, H) features, `head` those to (b, D) logits.
    """
    unique = list(dict.fromkeys(prompts))
    encoded = [encoder.encode_single(p) for p in unique]

    def run(idx: list[int]) -> torch.Tensor:
        f = features([encoded[i] for i in idx])  # (b, H)
        return torch.cat([torch.softmax(head(f).float(), -1).cpu(), f.float().cpu()], -1)  # (b, D + H)

    both = in_sorted_batches(encoded, batch_size, run)
    if both is None:
        return torch.empty(0, num_domains), torch.empty(0, 0)
    probs, feats = both[:, :num_domains], both[:, num_domains:]
    where = {p: i for i, p in enumerate(unique)}
    pos = torch.tensor([where[p] for p in prompts], dtype=torch.long)
    return probs[pos], feats[pos]


def early_features(backbone: Backbone, encoder: PairEncoder, rows: Sequence[dict[str, list[int]]],
                   blocks: int) -> torch.Tensor:
    """(b, H) frozen-router features of encoded prompts: the mean over each prompt's tokens of its pretrained states
    after the first `blocks` blocks (`Backbone.early_states`: only they run, adapters off)."""
    device = next(backbone.parameters()).device
    batch = {k: v.to(device) for k, v in encoder.pad(rows).items()}  # (b, T)
    was_training = backbone.training
    backbone.eval()
    try:
        states = backbone.early_states(blocks, batch["input_ids"], batch["attention_mask"],
                                       batch.get("token_type_ids"))  # (b, T, H)
    finally:
        backbone.train(was_training)
    return pooled(states, batch["attention_mask"], "mean")


def prompt_probs(prompts: Sequence[str], encoder: PairEncoder, logits: Callable[[list[dict[str, list[int]]]], torch.Tensor],
                 num_domains: int, batch_size: int) -> torch.Tensor:
    """(N, D) routing probabilities; `logits(encoded_rows)` maps single-text encodings to (b, D) router logits."""
    return prompt_outputs(prompts, encoder, logits, lambda x: x, num_domains, batch_size)[0]




@torch.no_grad()
def prompt_features(prompts: Sequence[str], encoder: PairEncoder,
                    features: Callable[[list[dict[str, list[int]]]], torch.Tensor], batch_size: int) -> torch.Tensor:
    """(N, H) features of prompts (`features(encoded_rows)` -> (b, H)), each distinct prompt once, in length-sorted
    batches; rows in input order."""
    unique = list(dict.fromkeys(prompts))
    encoded = [encoder.encode_single(p) for p in unique]
    out = in_sorted_batches(encoded, batch_size, lambda idx: features([encoded[i] for i in idx]).float().cpu())
    if out is None:
        return torch.empty(0, 0)
    where = {p: i for i, p in enumerate(unique)}
    return out[torch.tensor([where[p] for p in prompts], dtype=torch.long)]
