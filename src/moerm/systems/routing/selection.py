"""Route selection on evidence: whether the general RM (one RM trained on every domain) should serve a domain's route
in place of that domain's own RM, decided on the domain's held-back prompt-disjoint pairs.

The domain RM keeps its route (the paper's design) unless the held-back slice shows the general RM better: at least
`min_prompts` prompts held back, and the paired interval of (general RM accuracy - domain RM accuracy) on them,
prompts resampled, lying wholly above 0 at `level`. A tie, a handful of prompts or a difference the slice cannot
resolve keeps the domain RM: on 1-2 held-back pairs a point comparison is a coin toss, and it moved whole domains of
the conflict suite to the general RM (docs/RESULTS.md, issue 23).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Sequence

from moerm.eval.intervals import paired_clustered_diff_ci


@dataclass(frozen=True)
class SelectionRule:
    min_prompts: int = 10  # held-back prompts a domain needs before the general RM may take its route
    level: float = 0.9  # the paired interval's level; its lower end must lie above 0


def select_route(domain: str, domain_correct: Sequence[float], general_correct: Sequence[float],
                 clusters: Sequence[Hashable], rule: SelectionRule, held_back: bool = True) -> dict[str, Any]:
    """Who serves `domain`'s route, with the evidence: each RM's accuracy on the held-back pairs (one 0/1 per pair,
    same pairs, `clusters` each pair's prompt key), the number of pairs and prompts, the paired interval of general
    minus domain RM (when there was enough to compute one) and `served_by` (the domain, or "general").
    `held_back=False` (a single-prompt domain: its slice is its training pairs) keeps the domain RM."""
    n = len(domain_correct)
    prompts = len(set(clusters))
    entry: dict[str, Any] = {
        "domain_rm": sum(domain_correct) / n if n else float("nan"),
        "general_rm": sum(general_correct) / n if n else float("nan"),
        "pairs": n, "prompts": prompts, "served_by": domain,
        "rule": f"general RM only with >= {rule.min_prompts} held-back prompts and its {rule.level:.0%} paired "
                "interval above 0",
    }
    if not held_back or prompts < rule.min_prompts:
        entry["reason"] = "single prompt: nothing held back" if not held_back and n else \
            f"{prompts} held-back prompts (< {rule.min_prompts})"
        return entry
    diff = paired_clustered_diff_ci(list(general_correct), list(domain_correct), list(clusters), level=rule.level)
    entry["general_minus_domain"] = {"point": diff.point, "low": diff.low, "high": diff.high, "level": diff.level}
    if diff.low > 0:
        entry["served_by"] = "general"
        entry["reason"] = "general RM better, interval above 0"
    else:
        entry["reason"] = "general RM not better" if diff.point <= 0 else "general RM better, not resolved"
    return entry
