"""Pairwise accuracy ("consistency" in DMoERM) overall, per domain and per subset, reward statistics, seed
aggregation. Every per-group accuracy (domain, subset, route) comes from `group_accuracy`; every interval from
`eval.intervals` (a bootstrap over prompts, the clusters `data.grouping.prompt_key` defines)."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

from moerm.eval.intervals import sample_std
from moerm.data.grouping import pair_keys
from moerm.data.schema import PreferencePair
from moerm.errors import UserError
from moerm.eval.intervals import Interval, accuracy_intervals, paired_differences


NO_SUBSET = "(no subset)"  # a pair without `subset` in a domain whose other pairs have one


def group_accuracy(correct: Sequence[bool], keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Accuracy and pair count per key (domain, subset, route), keys sorted: the one per-group mechanism."""
    per: dict[str, list[bool]] = defaultdict(list)
    for ok, k in zip(correct, keys):
        per[k].append(bool(ok))
    return {k: {"accuracy": sum(v) / len(v), "pairs": len(v)} for k, v in sorted(per.items())}


def subset_groups(subsets: Iterable[str]) -> dict[str, list[str]]:
    """Roll-ups of `/`-separated subset names, label -> the subsets it merges (only those merging two or more, and
    not all of them: that is the domain's own accuracy).

    Every proper prefix is a group (`LLMBar/Adversarial/*`: LLMBar's adversarial sets; `xstest-should-refuse/*`: one
    RM-Bench source over its styles) and so is the last part (`*/style0`: one RM-Bench style over its sources).
    """
    names = sorted(set(subsets))
    groups: dict[str, set[str]] = defaultdict(set)
    for name in names:
        parts = name.split("/")
        if len(parts) < 2:
            continue
        for i in range(1, len(parts)):
            groups["/".join(parts[:i]) + "/*"].add(name)
        groups["*/" + parts[-1]].add(name)
    return {g: sorted(m) for g, m in sorted(groups.items()) if 1 < len(m) < len(names)}


def subset_report(correct: Sequence[bool], domains: Sequence[str], subsets: Sequence[str | None]) -> dict[str, Any]:
    """Per domain whose pairs carry `subset` (RM-Bench's sources and styles, AlpacaEval's sources, HHH's categories),
    accuracy per subset and per roll-up group (`subset_groups`), as RewardBench reports. Empty when no pair has one."""
    with_subset = {d for d, s in zip(domains, subsets) if s is not None}
    per_subset: dict[str, Any] = {}
    per_group: dict[str, Any] = {}
    for d in sorted(with_subset):
        rows = [(ok, s if s is not None else NO_SUBSET) for ok, dd, s in zip(correct, domains, subsets) if dd == d]
        per_subset[d] = group_accuracy([ok for ok, _ in rows], [s for _, s in rows])
        groups = subset_groups(per_subset[d])
        if groups:
            member = {s: [g for g, m in groups.items() if s in m] for s in per_subset[d]}
            flat = [(ok, g) for ok, s in rows for g in member[s]]
            per_group[d] = {g: {**v, "subsets": len(groups[g])}
                            for g, v in group_accuracy([ok for ok, _ in flat], [g for _, g in flat]).items()}
    out: dict[str, Any] = {}
    if per_subset:
        out["per_subset"] = per_subset
    if per_group:
        out["per_subset_group"] = per_group
    return out


def ci_record(ci: Interval) -> dict[str, Any]:
    """An interval as reports store it (`ci` beside the accuracy it belongs to)."""
    return {"low": ci.low, "high": ci.high, "level": ci.level, "prompts": ci.prompts, "resamples": ci.resamples}


def add_intervals(report: dict[str, Any], correct: Sequence[Any], clusters: Sequence[str],
                  domains: Sequence[str]) -> dict[str, Any]:
    """Prompt counts and 95% intervals (prompts resampled within each domain) into an accuracy report or a seed
    aggregate: `prompts`, `accuracy_ci`, `macro_accuracy_ci`, and per domain `prompts` and `ci`.

    `correct`: (N,) 0/1 per pair, or (runs, N) over the same pairs (the interval of the mean over runs)."""
    ivs = accuracy_intervals(correct, clusters, domains)
    report["prompts"] = ivs["overall"].prompts
    report["accuracy_ci"] = ci_record(ivs["overall"])
    report["macro_accuracy_ci"] = ci_record(ivs["macro"])
    for d, ci in ivs["per_domain"].items():
        report["per_domain"][d].update(prompts=ci.prompts, ci=ci_record(ci))
    return report


def pairwise_report(chosen: Sequence[float], rejected: Sequence[float], domains: Sequence[str],
                    subsets: Sequence[str | None] | None = None, clusters: Sequence[str] | None = None,
                    ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy = share of pairs with chosen strictly above rejected (ties are wrong).

    `overall` weights every pair equally; `macro` is the mean of the per-domain accuracies. Given `subsets` (each
    pair's `subset`, None where it has none), also `per_subset` (and `per_subset_group`) for the domains that have them.
    Given `clusters` (each pair's prompt key), the prompt counts and 95% intervals of `add_intervals`; given `ids`,
    `per_pair` (the ids and a string of 0/1, one per pair): what seed aggregates and paired comparisons read.
    """
    if not (len(chosen) == len(rejected) == len(domains)):
        raise ValueError("chosen, rejected and domains must have the same length")
    if subsets is not None and len(subsets) != len(domains):
        raise ValueError("subsets must have one entry per pair")
    if not chosen:
        raise UserError("no pairs to evaluate")
    correct = [c > r for c, r in zip(chosen, rejected)]
    per_domain = group_accuracy(correct, domains)
    rewards = list(chosen) + list(rejected)
    mean = sum(rewards) / len(rewards)
    std = sample_std(rewards)
    report = {
        "pairs": len(chosen),
        "accuracy": sum(correct) / len(chosen),
        "macro_accuracy": sum(v["accuracy"] for v in per_domain.values()) / len(per_domain),
        "per_domain": per_domain,
        **(subset_report(correct, domains, subsets) if subsets is not None else {}),
        "reward_mean": mean,
        "reward_std": std,
        "margin_mean": sum(c - r for c, r in zip(chosen, rejected)) / len(chosen),
    }
    if clusters is not None:
        add_intervals(report, correct, clusters, domains)
    if ids is not None:
        report["per_pair"] = {"ids": list(ids), "correct": "".join("1" if ok else "0" for ok in correct)}
    return report


def evaluate_system(system: Any, pairs: Sequence[PreferencePair], batch_size: int = 32,
                    oracle_domains: bool = False) -> dict[str, Any]:
    """Score chosen and rejected of every pair in one call, time it, and report accuracy per domain.

    Routed systems route with their own router, as in deployment; `oracle_domains=True` hands them each pair's true
    domain instead (an upper bound that isolates the domain RMs from routing errors).
    """
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    domains = [p.domain for p in pairs]
    t0 = time.perf_counter()
    out = system.score(prompts, responses, domains * 2 if oracle_domains else None, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    n = len(pairs)
    report = pairwise_report(out.rewards[:n], out.rewards[n:], domains, [p.subset for p in pairs],
                             clusters=pair_keys(pairs), ids=[p.id for p in pairs])
    report["seconds"] = seconds
    report["routing"] = "oracle domains" if oracle_domains else "own router"
    report["latency_ms_per_pair"] = 1000.0 * seconds / n
    report["pairs_per_second"] = n / seconds if seconds > 0 else float("inf")
    # A routed system's router picks a route per input: the domain itself (RODOS, ARLISS) or a group of domains
    # (DMoERM's tasks); its accuracy is measured against the route each pair's true domain belongs to.
    routes = {d: system.route_of(d) for d in set(domains)} if getattr(system, "routed", False) else {}
    report.update(explanation_report(out.details[:n], [routes.get(d, d) for d in domains]))
    if any(r != d for d, r in routes.items()):
        report.update(task_report(out.rewards[:n], out.rewards[n:], out.details[:n], domains,
                                  {d: r for d, r in routes.items() if r is not None}))
    if any("capability_scores" in det for det in out.details):
        report["capability_accuracy"] = capability_accuracy(pairs, out.details[:n], out.details[n:])
    return report


def task_report(chosen: Sequence[float], rejected: Sequence[float], details: Sequence[dict[str, Any]],
                domains: Sequence[str], task_of: dict[str, str]) -> dict[str, Any]:
    """Systems whose routes group domains (DMoERM's tasks): accuracy per true route, router accuracy and confusion."""
    tasks = [task_of.get(d, "?") for d in domains]
    confusion: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for t, det in zip(tasks, details):
        confusion[t][det.get("router_top") or "?"] += 1
    return {
        "per_task": group_accuracy([c > r for c, r in zip(chosen, rejected)], tasks),
        "task_router_accuracy": sum(det.get("router_top") == t for t, det in zip(tasks, details)) / len(tasks),
        "task_router_confusion": {t: dict(row) for t, row in sorted(confusion.items())},
        "fallback_rate": sum(bool(det.get("fallback")) for det in details) / len(details),
    }


def capability_accuracy(pairs: Sequence[PreferencePair], chosen_details: Sequence[dict[str, Any]],
                        rejected_details: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per domain and capability: how often an expert's sub-score orders a pair as its aspect scores do.

    Only pairs scored on the aspect on both sides, with different scores (ties dropped), count; the expert is the
    one of the task each reply was routed to.
    """
    hits: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for p, dc, dr in zip(pairs, chosen_details, rejected_details):
        sc, sr = dc.get("capability_scores") or {}, dr.get("capability_scores") or {}
        for cap in sc.keys() & sr.keys():
            a = (p.aspects_chosen or {}).get(cap)
            b = (p.aspects_rejected or {}).get(cap)
            if a is None or b is None or a == b:
                continue
            hits[p.domain][cap].append((sc[cap] - sr[cap]) * (a - b) > 0)
    return {d: {c: {"accuracy": sum(v) / len(v), "pairs": len(v)} for c, v in sorted(row.items())}
            for d, row in sorted(hits.items())}


def explanation_report(details: Sequence[dict[str, Any]], domains: Sequence[str]) -> dict[str, Any]:
    """What the score details say, aggregated per true domain: router accuracy and confusion matrix (routed
    systems), expert utilisation (MoE systems), fallback rate. Empty for systems that explain nothing."""
    out: dict[str, Any] = {}
    routed = [(d, det) for d, det in zip(domains, details) if det.get("route_source") == "router"]
    if any("route_source" in det for det in details):
        confusion: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for d, det in zip(domains, details):
            confusion[d][det.get("router_top") or "?"] += 1
        out["router_accuracy"] = (sum(det.get("router_top") == d for d, det in zip(domains, details)) / len(domains))
        out["router_confusion"] = {d: dict(row) for d, row in sorted(confusion.items())}
        out["fallback_rate"] = sum(bool(det.get("fallback")) for det in details) / len(details)
        out["routed_by_router"] = len(routed)
    if any("experts" in det for det in details):
        use: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        counts: dict[str, int] = defaultdict(int)
        for d, det in zip(domains, details):
            counts[d] += 1
            for e in det.get("experts", []):
                use[d][e] += 1.0
        # share of the domain's inputs whose top-k includes each expert
        out["expert_utilisation"] = {d: {e: v / counts[d] for e, v in sorted(row.items())} for d, row in sorted(use.items())}
    return out


def _mean_std(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values)
    std = sample_std(values)
    return {"mean": mean, "std": std, "n": len(values)}


def aggregate_subsets(reports: Sequence[dict[str, Any]], key: str = "per_subset") -> dict[str, Any]:
    """Mean +- std over runs of each domain's per-subset (`key="per_subset_group"`: per-group) accuracy, with the
    pair count; empty when no report has them."""
    acc: dict[tuple[str, str], list[float]] = defaultdict(list)
    meta: dict[tuple[str, str], dict[str, Any]] = {}
    for r in reports:
        for d, row in (r.get(key) or {}).items():
            for s, v in row.items():
                acc[(d, s)].append(v["accuracy"])
                meta[(d, s)] = {k: x for k, x in v.items() if k != "accuracy"}  # pairs (and a group's subsets)
    out: dict[str, dict[str, Any]] = defaultdict(dict)
    for (d, s), values in sorted(acc.items()):
        out[d][s] = {**_mean_std(values), **meta[(d, s)]}
    return dict(out)


def pair_index(pairs: Sequence[PreferencePair]) -> dict[str, tuple[str, str]]:
    """Pair id -> (domain, prompt key): what aligns per-pair results and clusters them."""
    return {p.id: (p.domain, k) for p, k in zip(pairs, pair_keys(pairs))}


def per_pair_rows(reports: Sequence[dict[str, Any]], index: Mapping[str, tuple[str, str]],
                  domains: Iterable[str] | None = None) -> tuple[list[str], list[list[int]]] | None:
    """The ids every report scored (in the first one's order; only `domains`' if given) and each report's 0/1 on
    them: (ids, (runs, N) rows). None when a report carries no per-pair results or they share no pair."""
    if not reports or any("per_pair" not in r for r in reports):
        return None
    maps = [dict(zip(r["per_pair"]["ids"], r["per_pair"]["correct"])) for r in reports]
    keep = None if domains is None else set(domains)
    ids = [i for i in reports[0]["per_pair"]["ids"]
           if i in index and (keep is None or index[i][0] in keep) and all(i in m for m in maps)]
    if not ids:
        return None
    return ids, [[int(m[i]) for i in ids] for m in maps]


def seed_intervals(agg: dict[str, Any], reports: Sequence[dict[str, Any]],
                   index: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    """`add_intervals` on a seed aggregate: the interval of the mean over runs, from each run's per-pair results."""
    rows = per_pair_rows(reports, index)
    if rows is not None:
        ids, correct = rows
        add_intervals(agg, correct, [index[i][1] for i in ids], [index[i][0] for i in ids])
    return agg


def compare_runs(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], index: Mapping[str, tuple[str, str]],
                 domains: Iterable[str] | None = None) -> dict[str, Any] | None:
    """a - b (each one or several runs' reports; with several, their mean) on the pairs both scored: pair-weighted,
    macro and per domain, each with the paired clustered bootstrap's 95% interval. None without per-pair results."""
    ra, rb = per_pair_rows(a, index, domains), per_pair_rows(b, index, domains)
    if ra is None or rb is None:
        return None
    common = set(ra[0]) & set(rb[0])
    ids = [i for i in ra[0] if i in common]
    if not ids:
        return None
    pos_a, pos_b = {i: k for k, i in enumerate(ra[0])}, {i: k for k, i in enumerate(rb[0])}
    xa = [[row[pos_a[i]] for i in ids] for row in ra[1]]
    xb = [[row[pos_b[i]] for i in ids] for row in rb[1]]
    diffs = paired_differences(xa, xb, [index[i][1] for i in ids], [index[i][0] for i in ids])
    return {"pairs": len(ids), "prompts": diffs["overall"].prompts, "runs": [len(xa), len(xb)],
            "overall": diff_record(diffs["overall"]), "macro": diff_record(diffs["macro"]),
            "per_domain": {d: diff_record(v) for d, v in diffs["per_domain"].items()}}


def diff_record(ci: Interval) -> dict[str, Any]:
    """A paired difference as reports store it: the point, its interval, and whether the interval excludes 0."""
    return {"diff": ci.point, **ci_record(ci), "pairs": ci.pairs,
            "excludes_zero": ci.low > 0 or ci.high < 0}


def aggregate_runs(reports: Sequence[dict[str, Any]],
                   index: Mapping[str, tuple[str, str]] | None = None) -> dict[str, Any]:
    """Mean +- std (sample std) over runs with different seeds, overall, per domain and per subset; given `index`
    (`pair_index` of the pairs they scored), prompt counts and the intervals of the mean over runs too."""
    if not reports:
        raise ValueError("no reports to aggregate")
    domains = sorted({d for r in reports for d in r["per_domain"]})
    subsets = {k: agg for k in ("per_subset", "per_subset_group") if (agg := aggregate_subsets(reports, k))}
    agg = {
        "runs": len(reports),
        "accuracy": _mean_std([r["accuracy"] for r in reports]),
        "macro_accuracy": _mean_std([r["macro_accuracy"] for r in reports]),
        "per_domain": {d: _mean_std([r["per_domain"][d]["accuracy"] for r in reports if d in r["per_domain"]])
                       for d in domains},
        **subsets,
        "latency_ms_per_pair": _mean_std([r["latency_ms_per_pair"] for r in reports]),
    }
    for d, v in agg["per_domain"].items():
        v["pairs"] = max(r["per_domain"][d]["pairs"] for r in reports if d in r["per_domain"])
    agg["pairs"] = max(r["pairs"] for r in reports)
    return seed_intervals(agg, reports, index) if index is not None else agg
