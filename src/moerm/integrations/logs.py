"""What a trainer logs about each reward: which route scored it, whether it fell back, DMoERM's sub-scores.

One mapping from a system's per-pair details (`ScoreOutput.details`, as `/v1/score` returns them) to flat,
trainer-friendly fields, shared by `/get_reward`'s `extra_logs` (OpenRLHF), the TRL reward function's
`log_metric` / `log_extra` and the verl reward function's `reward_extra_info`:

    moerm/fallback        1.0 when the router fell back (low confidence, unknown domain, out of distribution)
    moerm/ood             1.0 when the prompt was flagged out of distribution
    moerm/route/<d>       the weight of domain (or DMoERM task) <d> in this reward: 1.0 for a hard route to <d>
    moerm/cap/<c>         DMoERM: the routed task's capability sub-score <c> (absent for a mixture of tasks)
    moerm/domain          the routed domain as text ("" for a mixture or the general RM); text loggers only

Systems without routing (baseline) give no fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

PREFIX = "moerm/"


def item_fields(details: Mapping[str, Any]) -> dict[str, float | str]:
    """The log fields of one pair (see the module docstring)."""
    if "route_source" not in details and "routed_domain" not in details:
        return {}
    out: dict[str, float | str] = {f"{PREFIX}fallback": float(bool(details.get("fallback"))),
                                   f"{PREFIX}ood": float(bool(details.get("ood"))),
                                   f"{PREFIX}domain": str(details.get("routed_domain") or "")}
    weights = details.get("weights") or {}
    routed = details.get("routed_domain")
    if not weights and routed:
        weights = {routed: 1.0}
    for domain, w in weights.items():
        out[f"{PREFIX}route/{domain}"] = float(w)
    for cap, value in (details.get("capability_scores") or {}).items():
        out[f"{PREFIX}cap/{cap}"] = float(value)
    return out


def numeric_columns(details: Sequence[Mapping[str, Any]], domains: Iterable[str] = ()) -> dict[str, list[float]]:
    """Per-pair numeric fields as columns of equal length (for `/get_reward`'s extra_logs): route weights are 0.0
    where a pair did not use that domain (every domain in `domains` gets a column); a capability sub-score column is
    kept only when every pair has it, so no column holds a made-up value."""
    rows = [item_fields(d) for d in details]
    if not any(rows):
        return {}
    keys = dict.fromkeys([f"{PREFIX}fallback", f"{PREFIX}ood", *(f"{PREFIX}route/{d}" for d in domains)])
    for row in rows:
        keys.update(dict.fromkeys(k for k, v in row.items() if not isinstance(v, str)))
    columns: dict[str, list[float]] = {}
    for key in keys:
        if key.startswith(f"{PREFIX}cap/"):
            if all(key in row for row in rows):
                columns[key] = [float(row[key]) for row in rows]
        else:
            columns[key] = [float(row.get(key, 0.0)) for row in rows]
    return columns


def batch_metrics(details: Sequence[Mapping[str, Any]], domains: Iterable[str] = ()) -> dict[str, float]:
    """Batch means of the numeric fields (TRL's `log_metric`): fallback and OOD rates, each route's share, and each
    capability sub-score's mean over the pairs that have it."""
    rows = [item_fields(d) for d in details]
    if not any(rows):
        return {}
    out = {k: sum(col) / len(col) for k, col in numeric_columns(details, domains).items()}
    caps = {k for row in rows for k in row if k.startswith(f"{PREFIX}cap/")}
    for key in caps:
        values = [float(row[key]) for row in rows if key in row]
        out[key] = sum(values) / len(values)
    return out
