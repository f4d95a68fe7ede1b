"""Routing decisions: from router probabilities (and a caller's known domain) to the domain RMs that score each
input and their weights (hard top-1, a soft top-k mix, or top-1 gated by confidence; the fallback), and the one way
rewards are combined along those routes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from moerm.systems.routing.ood import OODCheck
from moerm.systems.routing.options import RouterOptions


@dataclass
class Route:
    """Where one input goes: the domain RMs it is scored by and their weights (one RM: `domain` names it), or the
    general RM (`general`)."""

    domain: str | None  # the one domain RM used; None for a mix or the general RM
    probs: dict[str, float]
    source: str  # "router", "given" (the caller named a known domain) or "fallback"
    reason: str | None = None
    weights: dict[str, float] = field(default_factory=dict)  # domain -> weight of its reward; empty: the general RM
    general: bool = False
    routing: str = "hard"
    ood: bool = False
    ood_score: float | None = None
    ood_threshold: float | None = None

    def details(self) -> dict[str, Any]:
        top = max(self.probs, key=self.probs.get) if self.probs else None
        out = {"routed_domain": self.domain, "router_top": top,
               "router_confidence": self.probs.get(top, None) if top else None,
               "router_probs": self.probs, "route_source": self.source,
               "fallback": self.source == "fallback", "fallback_reason": self.reason,
               "routing": self.routing, "weights": self.weights, "ood": self.ood}
        if self.ood_score is not None:
            out.update(ood_score=self.ood_score, ood_threshold=self.ood_threshold)
        return out


def top_k_weights(probs: dict[str, float], k: int) -> dict[str, float]:
    """The k most probable domains (0: all), weights renormalised to sum to 1; ties go to the earlier domain."""
    ranked = sorted(probs, key=lambda d: -probs[d])  # stable: label order among equals
    keep = ranked[: k or len(ranked)]
    total = sum(probs[d] for d in keep)
    return {d: probs[d] / total for d in keep} if total > 0 else {d: 1.0 / len(keep) for d in keep}


def decide_routes(probs: torch.Tensor, domains: Sequence[str], hints: Sequence[str | None] | None,
                  options: RouterOptions, ood: OODCheck | None = None) -> list[Route]:
    """Per input, the domain RMs that score it and their weights (`options.routing`); a caller's known domain wins;
    an unknown one, an out-of-distribution prompt (`ood`) and, in hard mode, a top-1 below `options.min_confidence`
    go to the fallback: the general RM (`options.fallback=general`), else a mixture of every domain RM, weighted by
    the router's probabilities, or equally for an out-of-distribution prompt (its router probabilities are what is
    not to be trusted).

    Args:
        probs: (N, D) router probabilities (softmax of its logits).
        domains: the D domain names, in the router's label order.
        hints: optional per-input domain given by the caller.
        ood: optional per-input out-of-distribution scores and flags.
    """
    mode, k = options.routing, options.routing_top_k
    routes = []
    for i in range(probs.shape[0]):
        p = {d: float(probs[i, j]) for j, d in enumerate(domains)}
        extra: dict[str, Any] = {"routing": mode}
        if ood is not None:
            extra.update(ood=bool(ood.flags[i]), ood_score=float(ood.scores[i]), ood_threshold=ood.threshold)

        def fallback(reason: str, equal: bool = False) -> Route:
            if options.fallback == "general":
                return Route(None, p, "fallback", reason, {}, general=True, **extra)
            weights = {d: 1.0 / len(p) for d in p} if equal else dict(p)
            return Route(None, p, "fallback", reason, weights, **extra)

        def chosen(weights: dict[str, float], reason: str | None = None) -> Route:
            one = next(iter(weights)) if len(weights) == 1 else None
            return Route(one, p, "router", reason, weights, **extra)

        hint = hints[i] if hints is not None else None
        if hint is not None:
            routes.append(Route(hint, p, "given", None, {hint: 1.0}, **extra) if hint in p
                          else fallback(f"domain {hint!r} has no reward model"))
            continue
        if ood is not None and bool(ood.flags[i]):
            routes.append(fallback(f"out of distribution: {ood.kind} score {float(ood.scores[i]):.4g} > "
                                   f"{ood.threshold:.4g}", equal=True))
            continue
        j = int(probs[i].argmax())
        confidence = float(probs[i, j])
        if mode == "soft":
            routes.append(chosen(top_k_weights(p, k)))
        elif confidence < options.min_confidence:
            reason = f"router confidence {confidence:.2f} < {options.min_confidence}"
            routes.append(chosen(top_k_weights(p, k), reason + ": top-k mix") if mode == "gated" else fallback(reason))
        else:
            routes.append(chosen({domains[j]: 1.0}))
    return routes


def combine_rewards(routes: Sequence[Route], per_domain: Callable[[str, list[int]], torch.Tensor], n: int,
                    general: Callable[[list[int]], torch.Tensor] | None = None) -> torch.Tensor:
    """Rewards (n,): each input's `weights`-weighted sum of its domain RMs' rewards (summed in the route's own
    order, so an input's reward does not depend on the rest of the batch), or the general RM's reward.
    `per_domain(domain, rows)` scores the given rows with that domain's RM, one sub-batch per RM.
    """
    rewards = torch.zeros(n)
    general_rows = [i for i, r in enumerate(routes) if r.general]
    if general_rows:
        if general is None:
            raise RuntimeError("a route asks for the general RM, but this system has none (options.fallback=general "
                               "at training time trains it)")
        rewards[torch.tensor(general_rows)] = general(general_rows).float()
    need: dict[str, list[int]] = {}
    for i, r in enumerate(routes):
        for d in r.weights:
            need.setdefault(d, []).append(i)
    scores: dict[tuple[int, str], float] = {}
    for d, rows in need.items():
        for i, s in zip(rows, per_domain(d, rows).tolist()):  # (len(rows),)
            scores[(i, d)] = s
    for i, r in enumerate(routes):
        if not r.general:
            rewards[i] = sum(w * scores[(i, d)] for d, w in r.weights.items())
    return rewards


def rm_passes(routes: Sequence[Route]) -> float:
    """The load: reward-model passes per input (1 for a top-1 route or the general RM, k for a k-way mix)."""
    return sum(1 if r.general else len(r.weights) for r in routes) / max(1, len(routes))
