"""What routed systems (RODOS, ARLISS) share: router training data, the cross-entropy step, routing decisions
with a confidence fallback, and the prompts a router was trained on (kept so `add-domain` can retrain it alone).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moerm.backbone import PairEncoder
from moerm.data.schema import PreferencePair
from moerm.inference import sorted_batches
from moerm.train import distributed

ROUTER_PROMPTS = "router_prompts.jsonl.gz"


@dataclass
class RouterOptions:
    """Options shared by routed systems (set with --set options.KEY=VALUE)."""

    router_epochs: float = 3.0
    router_lr: float = 1e-3
    router_tuning: str = "frozen"  # frozen: cached prompt features + linear classifier; full: fine-tune a backbone; lora: LoRA + classifier
    min_confidence: float = 0.0  # below it the router's choice is not trusted: fall back
    fallback: str = "mixture"  # mixture: probability-weighted sum of the domain RMs; general: an RM on all domains
    max_router_prompts_per_domain: int = 2000
    router_max_length: int = 32  # the router reads the prompt's first tokens only: domain cues sit there, and it is cheap

    def __post_init__(self) -> None:
        if self.router_tuning not in ("frozen", "full", "lora"):
            raise ValueError(f"options.router_tuning must be frozen, full or lora; got {self.router_tuning!r}")
        if self.fallback not in ("mixture", "general"):
            raise ValueError(f"options.fallback must be 'mixture' or 'general'; got {self.fallback!r}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError("options.min_confidence must be within [0, 1]")


def router_examples(pairs: Sequence[PreferencePair], cap_per_domain: int) -> list[tuple[str, str]]:
    """Distinct (prompt, domain) examples, at most `cap_per_domain` per domain, in first-seen order."""
    seen: set[tuple[str, str]] = set()
    counts: dict[str, int] = {}
    out = []
    for p in pairs:
        key = (p.prompt, p.domain)
        if key in seen or counts.get(p.domain, 0) >= cap_per_domain:
            continue
        seen.add(key)
        counts[p.domain] = counts.get(p.domain, 0) + 1
        out.append(key)
    return out


def new_domain_of(pairs: Sequence[PreferencePair], existing: Sequence[str]) -> str:
    """The one domain `add-domain` was given; an error when the pairs hold several, or a domain already served."""
    domains = {p.domain for p in pairs}
    if len(domains) != 1:
        raise ValueError(f"add-domain takes the pairs of one new domain; got {sorted(domains)}")
    (domain,) = domains
    if domain in existing:
        raise ValueError(f"domain {domain!r} already has a reward model; choose a new domain name")
    return domain


def save_router_examples(examples: Sequence[tuple[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for prompt, domain in examples:
            f.write(json.dumps({"prompt": prompt, "domain": domain}) + "\n")
    tmp.replace(path)


def load_router_examples(path: Path) -> list[tuple[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [(r["prompt"], r["domain"]) for r in map(json.loads, f)]


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

    def collate(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        enc = self.encoder.pad([b["enc"] for b in batch])  # (B, T)
        enc["labels"] = torch.tensor([b["label"] for b in batch])  # (B,)
        return enc


@dataclass
class FeatureTexts:
    """Cached prompt features (N, H) with labels, for a frozen-backbone router."""

    features: torch.Tensor
    labels: torch.Tensor

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


@torch.no_grad()
def prompt_probs(prompts: Sequence[str], encoder: PairEncoder, logits: Callable[[list[dict[str, list[int]]]], torch.Tensor],
                 num_domains: int, batch_size: int) -> torch.Tensor:
    """(N, D) routing probabilities; each distinct prompt is classified once, in length-sorted batches.

    `logits(encoded_rows)` maps a list of single-text encodings to (b, D) router logits.
    """
    unique = list(dict.fromkeys(prompts))
    encoded = [encoder.encode_single(p) for p in unique]
    out = torch.empty(len(unique), num_domains)
    for idx in sorted_batches(encoded, batch_size):
        out[torch.tensor(idx)] = torch.softmax(logits([encoded[i] for i in idx]).float(), -1).cpu()  # (b, D)
    pos = {p: i for i, p in enumerate(unique)}
    return out[torch.tensor([pos[p] for p in prompts], dtype=torch.long)] if prompts else out


@dataclass
class Route:
    """Where one input goes: a domain RM, or the fallback (domain None)."""

    domain: str | None
    probs: dict[str, float]
    source: str  # "router", "given" (the caller named a known domain) or "fallback"
    reason: str | None = None

    def details(self) -> dict[str, Any]:
        top = max(self.probs, key=self.probs.get) if self.probs else None
        return {"routed_domain": self.domain, "router_top": top,
                "router_confidence": self.probs.get(top, None) if top else None,
                "router_probs": self.probs, "route_source": self.source,
                "fallback": self.source == "fallback", "fallback_reason": self.reason}


def decide_routes(probs: torch.Tensor, domains: Sequence[str], hints: Sequence[str | None] | None,
                  min_confidence: float) -> list[Route]:
    """Top-1 routing with a confidence floor; a caller's known domain wins, an unknown one falls back.

    Args:
        probs: (N, D) router probabilities (softmax of its logits).
        domains: the D domain names, in the router's label order.
        hints: optional per-input domain given by the caller.
    """
    routes = []
    for i in range(probs.shape[0]):
        p = {d: float(probs[i, j]) for j, d in enumerate(domains)}
        hint = hints[i] if hints is not None else None
        if hint is not None:
            if hint in p:
                routes.append(Route(hint, p, "given"))
            else:
                routes.append(Route(None, p, "fallback", f"domain {hint!r} has no reward model"))
            continue
        j = int(probs[i].argmax())
        if float(probs[i, j]) < min_confidence:
            routes.append(Route(None, p, "fallback", f"router confidence {float(probs[i, j]):.2f} < {min_confidence}"))
        else:
            routes.append(Route(domains[j], p, "router"))
    return routes


def combine_rewards(routes: Sequence[Route], per_domain: Callable[[str, list[int]], torch.Tensor], n: int,
                    general: Callable[[list[int]], torch.Tensor] | None = None) -> torch.Tensor:
    """Rewards (n,): each routed input from its domain RM; a fallback input from the `general` RM when given, else
    as the probability-weighted mixture of every domain RM. `per_domain(domain, rows)` scores the given rows with
    that domain's RM, one sub-batch per RM.
    """
    rewards = torch.zeros(n)
    fallback_rows = [i for i, r in enumerate(routes) if r.domain is None]
    if general is not None and fallback_rows:
        rewards[torch.tensor(fallback_rows)] = general(fallback_rows).float()
    need: dict[str, list[int]] = {}
    for i, r in enumerate(routes):
        if r.domain is None and general is not None:
            continue
        for d in ([r.domain] if r.domain is not None else list(r.probs)):
            need.setdefault(d, []).append(i)
    for d, rows in need.items():
        scores = per_domain(d, rows)  # (len(rows),)
        for i, s in zip(rows, scores.tolist()):
            r = routes[i]
            rewards[i] += s if r.domain is not None else r.probs[d] * s
    return rewards
