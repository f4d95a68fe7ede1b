"""Dataset statistics per domain: sizes, token-length percentiles, length bias and aspect coverage."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from moerm.data.grouping import pair_keys
from moerm.data.schema import PreferencePair

OVERALL = "overall"
_TEXTS: tuple[str, ...] = ("prompt", "chosen", "rejected")


def _percentiles(values: list[int]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    arr = np.asarray(values, dtype=float)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(arr.max())}


def _group_stats(pairs: Sequence[PreferencePair], count: Callable[[str], int]) -> dict[str, Any]:
    lengths = {name: [count(getattr(p, name)) for p in pairs] for name in _TEXTS}
    n = len(pairs)
    longer = sum(c > r for c, r in zip(lengths["chosen"], lengths["rejected"]))
    with_aspects = sum(p.aspects_chosen is not None or p.aspects_rejected is not None for p in pairs)
    return {
        "n_pairs": n,
        # distinct prompt keys (`data.grouping.prompt_key`): pairs of one prompt are not independent evidence
        "n_prompts": len(set(pair_keys(pairs))),
        **{f"{name}_tokens": _percentiles(lengths[name]) for name in _TEXTS},
        # Share of pairs whose chosen reply has more tokens: far from 0.5 means a length shortcut is available.
        "chosen_longer": longer / n if n else None,
        "with_aspects": with_aspects / n if n else None,
    }


def dataset_stats(pairs: Sequence[PreferencePair], count_tokens: Callable[[str], int]) -> dict[str, Any]:
    """Stats per domain (sorted) and overall: {"domains": {name: stats}, "overall": stats}."""
    cache: dict[str, int] = {}

    def count(text: str) -> int:
        # Prompts repeat across pairs (several replies per prompt), so tokenise each distinct text once.
        if text not in cache:
            cache[text] = count_tokens(text)
        return cache[text]

    by_domain: dict[str, list[PreferencePair]] = {}
    for p in pairs:
        by_domain.setdefault(p.domain, []).append(p)
    return {
        "domains": {d: _group_stats(by_domain[d], count) for d in sorted(by_domain)},
        OVERALL: _group_stats(pairs, count),
    }


def _fmt_lengths(q: dict[str, float | None]) -> str:
    if q["max"] is None:
        return "-"
    return " / ".join(f"{q[k]:.0f}" for k in ("p50", "p90", "p99", "max"))


def _fmt_share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def stats_markdown(stats: dict[str, Any]) -> str:
    """The output of `dataset_stats` as a Markdown table, one row per domain plus an overall row."""
    header = (
        "| domain | pairs | prompts | prompt tokens p50/p90/p99/max | chosen tokens p50/p90/p99/max "
        "| rejected tokens p50/p90/p99/max | chosen longer | with aspects |"
    )
    rows = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    groups = [*stats["domains"].items(), (f"**{OVERALL}**", stats[OVERALL])]
    for name, s in groups:
        cells = [name, str(s["n_pairs"]), str(s["n_prompts"]), *(_fmt_lengths(s[f"{t}_tokens"]) for t in _TEXTS)]
        cells += [_fmt_share(s["chosen_longer"]), _fmt_share(s["with_aspects"])]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
