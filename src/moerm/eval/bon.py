"""Best-of-N against human gold: how good is the reward model's pick among N candidates, by human scores?

The DMoERM paper (Quan 2024), after Gao et al. (2023), also judges a reward model by how well it optimises: draw N
responses, keep the one the RM (the proxy) rewards most, and see what a gold judge thinks of it as N grows. A good RM's
pick climbs towards the oracle's (the best of the N by gold); an overoptimised one keeps rising in proxy reward while
its gold flattens or falls. Here gold is the human scores our pair data was formed from:

Candidate sets (`build_candidate_sets`). The pairs of one domain that share a prompt are comparisons within one pool
of responses (summeval: up to 16 systems' summaries per article). Grouping them by prompt and deduplicating responses
by exact text rebuilds the pool; each candidate's gold is taken from the aspect scores it carries in its pairs
(`aspects_chosen` / `aspects_rejected`), by the criterion the pairs were formed by (../shared/data/SOURCES.md), per
domain (`GOLD_CRITERIA`):

    summeval, newsroom   the mean of the 4 expert aspect scores (pairs: means differ by >= 0.5)
    topical_chat         `overall` (pairs: overall differs by >= 1; the other 5 aspects are on other scales)
    d2t_nlg              `quality` (pairs: quality differs by >= 1)
    any other domain     the mean of its aspect scores, or what `criteria` (`moerm bon --gold DOMAIN=ASPECT|mean`)
                         says; a domain whose pairs carry no aspect scores is skipped, with the reason

One response text can carry different scores in different pairs when two sources wrote the same text (two
summarisation systems with the same summary: 1 text in summeval's test split, 14 in train). The RM scores the text
once, so it is one candidate; its gold is the mean of its distinct gold values, and the domain reports how many texts
were merged so (`conflicts`). `pair_agreement` is the share of pairs whose chosen reply has the higher gold: 100% when
the criterion is the one the pairs were formed by.

The curves (`bon_results`). For each prompt with k candidates and N in 1, 2, 4, ... up to the largest set, N candidates
are drawn uniformly without replacement (a prompt with fewer than N uses all of its k) and the RM picks the one it
rewards most (ties: uniformly among the tied). The expected gold of the pick is computed exactly (`expected_pick`),
not sampled. Curves are means over prompts, with a 95% percentile bootstrap interval over prompts (a fixed seed).
`random` is a random pick (the mean gold of the candidates, whatever N); `oracle` picks the best gold among the N.
The proxy reward of the pick is reported raw and as a z-score over the domain's candidates (per run), beside the
gold as a z-score, so that one axis shows whether the proxy outruns the gold as N grows.

Every system, routed or not (`moerm bon` loads any saved run; a routed system routes each candidate with its own
router, `--oracle-domains` gives it the candidate's domain instead), gets the same curves.

The pooled view (`bon_results`' `pooled`, with two or more domains). An RL loop optimises one reward across prompts
of every domain, so the curves and the rank correlation are also pooled over every prompt of every domain (each
prompt weighs the same). The gold does not share one scale across domains: d2t_nlg's quality is 1-6, the others
1-5, and beyond the range each domain's raters, criterion (a mean of 4 aspects or one overall score) and candidate
quality differ, so a 4.0 in one domain is no 4.0 in another. Min-max normalising to the nominal range would keep
those differences; the pooled gold is therefore each domain's gold as a z-score over that domain's candidates (mean
0, sample std 1 per domain), which keeps every within-domain ordering and distance and makes "better than the
domain's typical candidate" the common unit. The pooled Best-of-N curves (random, oracle, each system) are in those
units; N runs over the powers of 2 up to the largest set of any domain.

Rank correlation (`spearman` per domain and pooled, `moerm.eval.rank`): Spearman's rho between a system's rewards
and the gold over every candidate (per domain: the raw gold, which the z-score does not reorder; pooled: the
per-domain z-scores). Pooled, it is where one reward scale across routes matters: rewards whose offset or spread
differs by route rank a whole domain's candidates above another's whatever their gold. Several runs of a system: the
mean of their rhos.

Intervals: one set of prompt draws per domain (`prompt_draws`) serves every curve and rank correlation of that
domain, and the pooled replicate is every domain's replicate side by side (prompts resampled within each domain, as
the accuracy intervals of `moerm.eval.intervals` do), so all systems' figures are paired.
"""

from __future__ import annotations

import json
import math
import textwrap
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from moerm.eval.intervals import sample_std
from moerm.data.schema import PreferencePair
from moerm.errors import UserError

MEAN = "mean"
# domain -> (criterion, why, scale): the criterion each of our human-scored domains was paired by (SOURCES.md)
GOLD_CRITERIA: dict[str, tuple[str, str, str]] = {
    "summeval": (MEAN, "its pairs' criterion: mean of the 4 expert aspects differs by >= 0.5", "1-5"),
    "newsroom": (MEAN, "its pairs' criterion: mean of the 4 aspects differs by >= 0.5", "1-5"),
    "topical_chat": ("overall", "its pairs' criterion: overall differs by >= 1", "1-5"),
    "d2t_nlg": ("quality", "its pairs' criterion: quality differs by >= 1", "1-6"),
}
BOOTSTRAP_RESAMPLES = 1000
LEVEL = 0.95


@dataclass
class CandidateSet:
    """The deduplicated responses to one prompt, each with its human gold score."""

    domain: str
    prompt: str
    responses: list[str]
    gold: list[float]


@dataclass
class DomainSets:
    """A domain's candidate sets and how they were rebuilt."""

    domain: str
    criterion: str  # "mean" or an aspect name
    criterion_text: str  # what the gold is, for tables
    short: str  # the same for an axis label
    why: str  # where the criterion comes from
    sets: list[CandidateSet]
    pairs: int  # pairs of the domain
    pairs_scored: int  # pairs with aspect scores on both sides
    pair_agreement: float | None  # share of those whose chosen reply has the higher gold
    conflicts: int  # response texts whose gold differed between pairs (averaged)
    dropped_sets: int = 0  # prompts left with fewer than 2 scored candidates
    info: dict[str, Any] = field(default_factory=dict)


def _gold(aspects: Mapping[str, float], criterion: str, domain: str, pair_id: str, side: str,
          keys: dict[str, tuple[str, ...]]) -> float:
    if criterion == MEAN:
        names = tuple(sorted(aspects))
        first = keys.setdefault(domain, names)
        if names != first:  # a mean over other aspects is another scale: refuse rather than mix them
            raise UserError(f"pair {pair_id!r} (domain {domain!r}): {side} has aspects {', '.join(names)}, other pairs "
                            f"of the domain {', '.join(first)}; a mean over different aspects is no common gold. "
                            f"Choose one aspect: --gold {domain}=ASPECT")
        return sum(aspects.values()) / len(aspects)
    if criterion not in aspects:
        raise UserError(f"pair {pair_id!r} (domain {domain!r}): {side} has no aspect {criterion!r} (it has "
                        f"{', '.join(sorted(aspects)) or 'none'}); the gold criterion of {domain} is {criterion!r}"
                        + ("" if domain in GOLD_CRITERIA else f": choose another with --gold {domain}=ASPECT|mean"))
    return aspects[criterion]


def build_candidate_sets(pairs: Sequence[PreferencePair], criteria: Mapping[str, str] | None = None
                         ) -> tuple[dict[str, DomainSets], dict[str, str]]:
    """Candidate sets per domain from pairs that share a prompt, with gold scores (see the module docstring).

    `criteria`: domain -> "mean" or an aspect name, over `GOLD_CRITERIA`. Returns (domain -> its sets, domain ->
    why it was skipped) for every domain of `pairs`.
    """
    criteria = dict(criteria or {})
    by_domain: dict[str, list[PreferencePair]] = defaultdict(list)
    for p in pairs:
        by_domain[p.domain].append(p)
    unknown = sorted(set(criteria) - set(by_domain))
    if unknown:
        raise UserError(f"gold criterion for domain {unknown[0]!r}, which is not in the data (domains: "
                        f"{', '.join(sorted(by_domain))})")
    kept: dict[str, DomainSets] = {}
    skipped: dict[str, str] = {}
    keys: dict[str, tuple[str, ...]] = {}
    for domain, dpairs in sorted(by_domain.items()):
        if not any(p.aspects_chosen or p.aspects_rejected for p in dpairs):
            skipped[domain] = (f"no human scores: none of its {len(dpairs)} pairs carries aspects_chosen / "
                               "aspects_rejected")
            continue
        if domain in criteria:
            criterion, why, scale = criteria[domain], "given", ""
        elif domain in GOLD_CRITERIA:
            criterion, why, scale = GOLD_CRITERIA[domain]
        else:
            criterion, why, scale = MEAN, "the default for a domain without a known pairing criterion", ""
        # prompt -> response -> the distinct gold values it was given (insertion order: first appearance)
        golds: dict[str, dict[str, set[float]]] = defaultdict(dict)
        scored = agree = 0
        for p in dpairs:
            g = {}
            for side, text, aspects in (("chosen", p.chosen, p.aspects_chosen), ("rejected", p.rejected,
                                                                                 p.aspects_rejected)):
                golds[p.prompt].setdefault(text, set())
                if aspects:
                    g[side] = _gold(aspects, criterion, domain, p.id, f"aspects_{side}", keys)
                    golds[p.prompt][text].add(g[side])
            if len(g) == 2:
                scored += 1
                agree += g["chosen"] > g["rejected"]
        sets, dropped, conflicts = [], 0, 0
        for prompt, cands in golds.items():
            with_gold = [(t, v) for t, v in cands.items() if v]
            conflicts += sum(len(v) > 1 for _, v in with_gold)
            if len(with_gold) < 2:
                dropped += 1
                continue
            sets.append(CandidateSet(domain, prompt, [t for t, _ in with_gold],
                                     [sum(v) / len(v) for _, v in with_gold]))
        if not sets:
            skipped[domain] = f"no prompt has two candidates with human scores ({len(dpairs)} pairs)"
            continue
        if criterion == MEAN:
            names = keys.get(domain, ())
            text, short = f"mean of the {len(names)} aspect scores ({', '.join(names)})", f"mean of {len(names)} aspects"
        else:
            text = short = f"aspect `{criterion}`"
        kept[domain] = DomainSets(domain, criterion, text + (f", scale {scale}" if scale else ""),
                                  short + (f", {scale}" if scale else ""), why, sets,
                                  pairs=len(dpairs), pairs_scored=scored,
                                  pair_agreement=agree / scored if scored else None, conflicts=conflicts,
                                  dropped_sets=dropped)
    return kept, skipped


def expected_pick(keys: Sequence[float], values: Sequence[float], n: int) -> float:
    """E[value of the candidate with the highest key among n drawn uniformly without replacement] (exact).

    min(n, k) are drawn from the k candidates; ties in key are broken uniformly at random. The candidate group tied
    at a key holds the subset's maximum when the subset avoids every candidate above it and meets the group:
    P = (C(k - above, n) - C(k - above - size, n)) / C(k, n); the pick is then any member with equal chance.
    """
    k = len(keys)
    if k == 0 or k != len(values):
        raise ValueError("keys and values must be non-empty and of the same length")
    n = max(1, min(n, k))
    order = sorted(range(k), key=lambda i: -keys[i])
    total = math.comb(k, n)
    expectation, above, i = 0.0, 0, 0
    while i < k:
        j = i
        while j < k and keys[order[j]] == keys[order[i]]:
            j += 1
        size = j - i
        p = (math.comb(k - above, n) - math.comb(k - above - size, n)) / total
        expectation += p * sum(values[order[t]] for t in range(i, j)) / size
        above, i = above + size, j
    return expectation


def n_grid(largest: int) -> list[int]:
    """1, 2, 4, ... below `largest`, then `largest` itself."""
    ns = [1]
    while ns[-1] * 2 < largest:
        ns.append(ns[-1] * 2)
    if ns[-1] != largest:
        ns.append(largest)
    return ns


def score_candidates(system: Any, domains: Mapping[str, DomainSets], batch_size: int = 32,
                     oracle_domains: bool = False) -> dict[str, list[list[float]]]:
    """The system's reward of every candidate, in one `score` call: domain -> per set, per candidate.

    Routed systems route with their own router unless `oracle_domains` (then each candidate's domain is given)."""
    prompts, responses, doms = [], [], []
    for d, ds in domains.items():
        for cs in ds.sets:
            prompts += [cs.prompt] * len(cs.responses)
            responses += cs.responses
            doms += [d] * len(cs.responses)
    out = system.score(prompts, responses, doms if oracle_domains else None, batch_size=batch_size)
    bad = sum(not math.isfinite(r) for r in out.rewards)
    if bad:
        raise UserError(f"system {getattr(system, 'name', '?')!r} gave {bad} non-finite rewards of "
                        f"{len(out.rewards)}: the saved model is broken")
    it = iter(out.rewards)
    return {d: [[float(next(it)) for _ in cs.responses] for cs in ds.sets] for d, ds in domains.items()}


def _z(rewards: list[list[float]]) -> list[list[float]]:
    flat = [r for row in rewards for r in row]
    mean = sum(flat) / len(flat)
    std = sample_std(flat) or 1.0
    return [[(r - mean) / std for r in row] for row in rewards]


def prompt_draws(domain: str, prompts: int, resamples: int, seed: int) -> Any:
    """(resamples, prompts) indices of a domain's prompts drawn with replacement: the bootstrap of every curve and
    rank correlation of the domain, and of the pooled view (one set of draws per domain, so they are paired)."""
    import numpy as np

    rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
    return rng.integers(0, prompts, size=(resamples, prompts))


def _candidate_counts(idx: Any, sizes: Sequence[int]) -> Any:
    """(B, P) drawn prompt indices -> (B, sum(sizes)) how often each candidate (prompt by prompt) is in a replicate."""
    import numpy as np

    counts = np.zeros((idx.shape[0], len(sizes)))  # (B, P)
    np.add.at(counts, (np.arange(idx.shape[0])[:, None], idx), 1.0)
    return np.repeat(counts, sizes, axis=1)


def _spearman(runs: Sequence[Sequence[float]], gold: Sequence[float], counts: Any) -> dict[str, Any]:
    """Spearman's rho of rewards (one flat row per run) with gold, the mean over runs, on the data and on the
    replicates whose candidate counts are `counts` (B, M): the point and its percentile interval."""
    import numpy as np

    from moerm.eval.rank import spearman

    point = float(np.mean([spearman(np.asarray(r), np.asarray(gold))[0] for r in runs]))
    reps = np.mean([spearman(np.asarray(r), np.asarray(gold), counts) for r in runs], axis=0)  # (B,)
    tail = 100 * (1 - LEVEL) / 2
    finite = reps[np.isfinite(reps)]
    low, high = (np.percentile(finite, [tail, 100 - tail]).tolist() if finite.size else [math.nan, math.nan])
    clean = [None if not math.isfinite(v) else v for v in (point, low, high)]
    return {"point": clean[0], "low": clean[1], "high": clean[2], "candidates": len(gold),
            "replicates_undefined": int(reps.size - finite.size)}


def _interval(per_prompt: list[list[float]], idx: Any) -> dict[str, list[float]]:
    """Mean over prompts per N, and the bootstrap percentile interval from the resampled prompt indices `idx`."""
    import numpy as np

    values = np.asarray(per_prompt, dtype=float)  # (prompts, len(ns))
    boot = values[idx].mean(axis=1)  # (resamples, len(ns))
    tail = 100 * (1 - LEVEL) / 2
    return {"mean": values.mean(axis=0).tolist(), "low": np.percentile(boot, tail, axis=0).tolist(),
            "high": np.percentile(boot, 100 - tail, axis=0).tolist()}


def bon_results(domains: Mapping[str, DomainSets], rewards: Mapping[str, Sequence[Mapping[str, list[list[float]]]]],
                skipped: Mapping[str, str] | None = None, systems: Mapping[str, dict[str, Any]] | None = None,
                resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Best-of-N curves per domain for every system, JSON-ready.

    `rewards`: system label -> one `score_candidates` result per run (seeds: per-prompt expectations are averaged
    over them). A system that has no rewards for a domain (e.g. a bench plan left the domain out) has no curve there.
    `systems`: label -> what to record about it (its system name, runs).
    """
    import numpy as np

    if resamples < 1:
        raise UserError(f"bootstrap resamples must be at least 1, got {resamples}")
    out: dict[str, Any] = {
        "bootstrap": {"resamples": resamples, "seed": seed, "level": LEVEL, "over": "prompts"},
        "systems": {s: dict((systems or {}).get(s, {})) for s in rewards},
        "domains": {}, "skipped": dict(skipped or {}),
    }
    draws: dict[str, Any] = {}
    for d, ds in domains.items():
        sizes = [len(cs.responses) for cs in ds.sets]
        ns = n_grid(max(sizes))
        all_gold = [g for cs in ds.sets for g in cs.gold]
        g_mean = sum(all_gold) / len(all_gold)
        g_std = sample_std(all_gold)
        # one set of resampled prompts for every curve of the domain: their intervals are comparable (paired)
        idx = prompt_draws(d, len(ds.sets), resamples, seed)
        draws[d] = idx
        random_pp = [[sum(cs.gold) / len(cs.gold)] * len(ns) for cs in ds.sets]
        oracle_pp = [[expected_pick(cs.gold, cs.gold, n) for n in ns] for cs in ds.sets]
        random, oracle = _interval(random_pp, idx), _interval(oracle_pp, idx)
        rec: dict[str, Any] = {
            "criterion": ds.criterion, "gold": ds.criterion_text, "gold_short": ds.short, "criterion_source": ds.why,
            "prompts": len(ds.sets), "candidates": sum(sizes),
            "set_size": {"min": min(sizes), "max": max(sizes), "mean": sum(sizes) / len(sizes)},
            "pairs": ds.pairs, "pairs_scored": ds.pairs_scored, "pair_agreement": ds.pair_agreement,
            "conflicts": ds.conflicts, "dropped_sets": ds.dropped_sets,
            "gold_mean": g_mean, "gold_std": g_std,
            "n": ns, "prompts_with_at_least_n": [sum(k >= n for k in sizes) for n in ns],
            "random": random, "oracle": oracle, "systems": {},
        }
        for label, runs in rewards.items():
            runs = [r[d] for r in runs if d in r]
            if not runs:
                continue
            for r in runs:
                if [len(row) for row in r] != sizes:
                    raise ValueError(f"rewards of {label} for {d} do not match the candidate sets")
            zs = [_z(r) for r in runs]
            gold_pp, proxy_pp, proxy_z_pp = [], [], []
            for i, cs in enumerate(ds.sets):
                gold_pp.append([sum(expected_pick(r[i], cs.gold, n) for r in runs) / len(runs) for n in ns])
                proxy_pp.append([sum(expected_pick(r[i], r[i], n) for r in runs) / len(runs) for n in ns])
                proxy_z_pp.append([sum(expected_pick(r[i], z[i], n) for r, z in zip(runs, zs)) / len(runs)
                                   for n in ns])
            gold = _interval(gold_pp, idx)
            share = [(s - a) / (o - a) if o - a > 1e-12 else None
                     for s, a, o in zip(gold["mean"], random["mean"], oracle["mean"])]
            rec["systems"][label] = {
                "runs": len(runs), "gold": gold,
                "proxy": [sum(col) / len(col) for col in zip(*proxy_pp)],
                "proxy_z": [sum(col) / len(col) for col in zip(*proxy_z_pp)],
                "gold_z": [(g - g_mean) / g_std if g_std > 0 else 0.0 for g in gold["mean"]],
                "oracle_gain_share": share,
                "spearman": _spearman([[x for row in r for x in row] for r in runs], all_gold,
                                      _candidate_counts(idx, sizes)),
            }
        out["domains"][d] = rec
    if len(domains) >= 2:
        out["pooled"] = _pooled(domains, rewards, draws)
    return out


def _pooled(domains: Mapping[str, DomainSets], rewards: Mapping[str, Sequence[Mapping[str, list[list[float]]]]],
            draws: Mapping[str, Any]) -> dict[str, Any]:
    """The optimisation view pooled over every prompt of every domain, gold as per-domain z-scores (see the module
    docstring): Best-of-N curves with random and oracle, and the rank correlation of rewards with gold.

    `draws`: domain -> its (B, P) prompt draws; a pooled replicate is every domain's replicate side by side
    (prompts resampled within each domain), so the pooled intervals are paired with the per-domain ones.
    """
    import numpy as np

    doms = list(domains)
    sets = [cs for d in doms for cs in domains[d].sets]
    sizes = [len(cs.responses) for cs in sets]
    ns = n_grid(max(sizes))
    gold_z: list[list[float]] = []  # per prompt, its candidates' gold as a z-score over their domain's candidates
    for d in doms:
        flat = [g for cs in domains[d].sets for g in cs.gold]
        mean, std = sum(flat) / len(flat), sample_std(flat) or 1.0
        gold_z += [[(g - mean) / std for g in cs.gold] for cs in domains[d].sets]
    offsets = np.cumsum([0] + [len(domains[d].sets) for d in doms])
    idx = np.concatenate([draws[d] + offsets[i] for i, d in enumerate(doms)], axis=1)  # (B, all prompts)
    random = _interval([[sum(z) / len(z)] * len(ns) for z in gold_z], idx)
    oracle = _interval([[expected_pick(z, z, n) for n in ns] for z in gold_z], idx)
    flat_gold = [g for z in gold_z for g in z]
    rec: dict[str, Any] = {
        "domains": doms, "prompts": len(sets), "candidates": sum(sizes),
        "gold": "each domain's gold as a z-score over that domain's candidates (mean 0, sample std 1 per domain)",
        "gold_short": "gold, z-score within its domain",
        "set_size": {"min": min(sizes), "max": max(sizes), "mean": sum(sizes) / len(sizes)},
        "n": ns, "prompts_with_at_least_n": [sum(k >= n for k in sizes) for n in ns],
        "random": random, "oracle": oracle, "systems": {}, "left_out": {},
    }
    for label, runs in rewards.items():
        missing = [d for d in doms if any(d not in r for r in runs)]
        if missing:  # pooled over other prompts than the rest: not comparable, so no pooled figure
            rec["left_out"][label] = f"no rewards for {', '.join(missing)}"
            continue
        per_run = [[row for d in doms for row in r[d]] for r in runs]  # per run: per prompt, per candidate
        z_runs = [[row for d in doms for row in _z(r[d])] for r in runs]  # proxy z within each domain, per run
        gold_pp = [[sum(expected_pick(r[i], z, n) for r in per_run) / len(per_run) for n in ns]
                   for i, z in enumerate(gold_z)]
        proxy_z_pp = [[sum(expected_pick(r[i], zr[i], n) for r, zr in zip(per_run, z_runs)) / len(per_run)
                       for n in ns] for i in range(len(sets))]
        gold = _interval(gold_pp, idx)
        rec["systems"][label] = {
            "runs": len(runs), "gold": gold,
            "proxy_z": [sum(col) / len(col) for col in zip(*proxy_z_pp)],
            "gold_z": gold["mean"],
            "oracle_gain_share": [(s - a) / (o - a) if o - a > 1e-12 else None
                                  for s, a, o in zip(gold["mean"], random["mean"], oracle["mean"])],
            "spearman": _spearman([[x for row in r for x in row] for r in per_run], flat_gold,
                                  _candidate_counts(idx, sizes)),
        }
    return rec


# ------------------------------------------------------------------------------------------------ tables and plot

def _f(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _ci(c: dict[str, list[float]], i: int) -> str:
    return f"{c['mean'][i]:.2f} [{c['low'][i]:.2f}, {c['high'][i]:.2f}]"


def _sizes(size: dict[str, Any]) -> str:
    return str(size["min"]) if size["min"] == size["max"] else f"{size['min']}-{size['max']}"


def _name(res: dict[str, Any], label: str) -> str:
    return res["systems"].get(label, {}).get("display") or label


def _curve_rows(res: dict[str, Any], rec: dict[str, Any], labels: list[str]) -> list[str]:
    """The table of the pick's gold per N (random, oracle, each system) and the share of the oracle's gain."""
    lines = ["| N | prompts with ≥ N | random | oracle | " + " | ".join(_name(res, s) for s in labels) + " |",
             "|---:|---:|---:|---:|" + "---:|" * len(labels)]
    for i, n in enumerate(rec["n"]):
        cells = [_ci(rec["systems"][s]["gold"], i) for s in labels]
        lines.append(f"| {n} | {rec['prompts_with_at_least_n'][i]} | {_ci(rec['random'], i)} | "
                     f"{_ci(rec['oracle'], i)} | " + " | ".join(cells) + " |")
    if labels:
        last = len(rec["n"]) - 1
        shares = [rec["systems"][s]["oracle_gain_share"][last] for s in labels]
        lines.append(f"| **share of the oracle's gain over random at N={rec['n'][last]}** | | | | "
                     + " | ".join("–" if v is None else f"**{100 * v:.0f}%**" for v in shares) + " |")
    return lines


def _rho(v: dict[str, Any] | None) -> str:
    if not v or v["point"] is None:
        return "–"
    return f"{v['point']:.3f} [{_f(v['low'], 3)}, {_f(v['high'], 3)}]"


def rank_correlation_markdown(res: dict[str, Any]) -> list[str]:
    """One row per system: Spearman's rho of its rewards with the gold, pooled (when there is a pooled view) and per
    domain, each with its interval."""
    doms = list(res["domains"])
    pooled = res.get("pooled")
    labels = list(dict.fromkeys(s for d in doms for s in res["domains"][d]["systems"]))
    if not labels:
        return []
    b = res["bootstrap"]
    head = (["pooled"] if pooled else []) + doms
    lines = ["Spearman rank correlation of each system's rewards with the human gold over every candidate "
             f"[{100 * b['level']:.0f}% bootstrap interval, prompts resampled within each domain, the same draws as "
             "the curves]"
             + ("; pooled: over all candidates of " + ", ".join(pooled["domains"]) + ", gold as a z-score within its "
                "domain, so a system whose rewards are on different scales in different domains (uncalibrated "
                "routes) ranks whole domains above others and loses here" if pooled else "") + ":", "",
             "| system | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for s in labels:
        cells = ([_rho(pooled["systems"].get(s, {}).get("spearman"))] if pooled else [])
        cells += [_rho(res["domains"][d]["systems"].get(s, {}).get("spearman")) for d in doms]
        lines.append(f"| {_name(res, s)} | " + " | ".join(cells) + " |")
    return lines


def bon_markdown(res: dict[str, Any], heading: str = "###") -> str:
    """The Best-of-N tables: the pooled view and the rank correlations, then per domain the gold of the pick per N
    (with random and oracle) and its proxy reward."""
    b = res["bootstrap"]
    lines = [
        "Best-of-N against human gold: per prompt, N of its candidates drawn at random without replacement (a prompt "
        "with fewer than N candidates uses all of its own), the reward model picks the one it rewards most, and the "
        "pick's human gold score is shown (exact expectation over the draws, mean over prompts, "
        f"[{100 * b['level']:.0f}% bootstrap interval over prompts, {b['resamples']} resamples, seed {b['seed']}]). "
        "random: a random pick (any N); oracle: the best gold among the N. Candidate sets are rebuilt from the pairs "
        "that share a prompt (responses deduplicated by text).",
    ]
    pooled = res.get("pooled")
    if pooled:
        size = pooled["set_size"]
        lines += ["", f"{heading} pooled over {', '.join(pooled['domains'])}: gold = {pooled['gold']}", "",
                  f"{pooled['prompts']} prompts, {pooled['candidates']} candidates ({_sizes(size)} per prompt, mean "
                  f"{size['mean']:.1f}); every prompt weighs the same. The domains' gold scales differ (d2t_nlg's "
                  "quality is 1-6, the others 1-5) and their raters too, so each domain's gold is standardised over "
                  "its own candidates before pooling.", ""]
        lines += _curve_rows(res, pooled, list(pooled["systems"]))
        if pooled["left_out"]:
            lines += ["", "Left out of the pooled view: " + "; ".join(f"{_name(res, s)}: {why}"
                                                                        for s, why in pooled["left_out"].items())]
    rank = rank_correlation_markdown(res)
    if rank:
        lines += ["", f"{heading} rank correlation with the human gold", ""] + rank
    for d, rec in res["domains"].items():
        labels = list(rec["systems"])
        size = rec["set_size"]
        agree = rec["pair_agreement"]
        lines += ["", f"{heading} {d}: gold = {rec['gold']}", "",
                  f"{rec['prompts']} prompts, {rec['candidates']} candidates ({_sizes(size)} per prompt, "
                  f"mean {size['mean']:.1f}) from {rec['pairs']} pairs; criterion: {rec['criterion_source']}; "
                  f"pairs whose chosen reply has the higher gold: "
                  f"{'–' if agree is None else f'{100 * agree:.1f}%'} of {rec['pairs_scored']}"
                  + (f"; {rec['conflicts']} response text(s) scored differently in different pairs (gold averaged)"
                     if rec["conflicts"] else "")
                  + (f"; {rec['dropped_sets']} prompt(s) with fewer than 2 scored candidates left out"
                     if rec["dropped_sets"] else "") + ".", ""]
        lines += _curve_rows(res, rec, labels)
        if labels:
            lines += ["", "Proxy reward of the pick against its gold, as z-scores over the domain's candidates "
                      "(proxy per run; the proxy outrunning the gold as N grows is overoptimisation); raw proxy "
                      "reward in brackets:", "",
                      "| N | " + " | ".join(f"{_name(res, s)}: proxy z (raw) | gold z" for s in labels) + " |",
                      "|---:|" + "---:|---:|" * len(labels)]
            for i, n in enumerate(rec["n"]):
                cells = [f"{rec['systems'][s]['proxy_z'][i]:.2f} ({rec['systems'][s]['proxy'][i]:.2f}) | "
                         f"{rec['systems'][s]['gold_z'][i]:.2f}" for s in labels]
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if res["skipped"]:
        lines += ["", "Domains without a Best-of-N curve:", ""]
        lines += [f"- {d}: {why}" for d, why in res["skipped"].items()]
    return "\n".join(lines)


def picture_title(res: dict[str, Any], split: str | None) -> str:
    """bon.png's title: what was measured (routing, split, domains), never this machine's paths; the panels give
    the prompt counts."""
    return (f"Best-of-N against human gold, {res['routing']}" + (f", {split} split" if split else "") + ": "
            + ", ".join(res["domains"]))


def plot_bon(res: dict[str, Any], path: str | Path, title: str) -> None:
    """One column per domain (the pooled view first, when there is one): the pick's gold against N (random and
    oracle with bands, each system with its interval), and below it proxy (solid) and gold (dashed) of the pick as
    z-scores against N. PNG, Agg."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    doms = list(res["domains"])
    if not doms:
        raise ValueError("no domain to plot")
    labels = list(dict.fromkeys(s for d in doms for s in res["domains"][d]["systems"]))
    columns = ([("pooled", res["pooled"])] if res.get("pooled") else []) + [(d, res["domains"][d]) for d in doms]
    colours = {s: f"C{i % 10}" for i, s in enumerate(labels)}
    fig = Figure(figsize=(max(6.0, 4.3 * len(columns)), 7.6), dpi=110, layout="constrained")
    axes = fig.subplots(2, len(columns), squeeze=False, sharex="col")
    for j, (d, rec) in enumerate(columns):
        ns = rec["n"]
        top, bottom = axes[0][j], axes[1][j]
        for key, colour, style, name in (("random", "0.45", ":", "random pick"), ("oracle", "black", "--",
                                                                                   "oracle (best gold of N)")):
            c = rec[key]
            top.plot(ns, c["mean"], style, color=colour, lw=1.6, label=name)
            top.fill_between(ns, c["low"], c["high"], color=colour, alpha=0.12, lw=0)
        for s, v in rec["systems"].items():
            c = v["gold"]
            top.plot(ns, c["mean"], "-o", color=colours[s], ms=4, lw=1.8, label=_name(res, s))
            top.fill_between(ns, c["low"], c["high"], color=colours[s], alpha=0.15, lw=0)
            bottom.plot(ns, v["proxy_z"], "-o", color=colours[s], ms=4, lw=1.8)
            bottom.plot(ns, v["gold_z"], "--", color=colours[s], lw=1.4)
        top.set_title(f"{d} ({rec['prompts']} prompts, {_sizes(rec['set_size'])} candidates each)", fontsize=10)
        top.set_ylabel(f"human gold score of the pick\n({rec['gold_short']})", fontsize=9)
        bottom.set_title("overoptimisation view: proxy (solid) vs gold (dashed)", fontsize=9)
        bottom.set_ylabel("pick's score, z-score over\nthe domain's candidates", fontsize=9)
        bottom.axhline(0, color="0.6", lw=0.8)
        bottom.set_xlabel("N (candidates drawn per prompt, log scale)")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    # built here, not read off one panel: a system may have no curve in some domain (a bench plan left it out)
    handles = [Line2D([], [], color=colours[s], lw=1.8, marker="o", ms=4) for s in labels]
    names = [_name(res, s) for s in labels]
    handles += [Line2D([], [], color="0.45", lw=1.6, ls=":"), Line2D([], [], color="black", lw=1.6, ls="--"),
                Line2D([], [], color="0.3", lw=1.8, marker="o", ms=4), Line2D([], [], color="0.3", lw=1.4, ls="--")]
    names += ["random pick", "oracle (best gold of N)", "bottom: proxy reward of the pick (solid)",
              "bottom: gold of the pick (dashed)"]
    fig.legend(handles, names, loc="outside lower center", ncols=min(len(names), max(3, 2 * len(columns))), fontsize=9,
               frameon=False)
    fig.suptitle("\n".join(textwrap.wrap(title, max(60, int(11 * fig.get_figwidth())))), fontsize=11)
    fig.savefig(path, bbox_inches="tight", pad_inches=0.15)  # the legend below the panels is never cut off


# ------------------------------------------------------------------------------------------------ saved runs

def evaluate_bon_runs(runs: Sequence[str | Path], data: Sequence[str], out: str | Path | None = None,
                      split: str | None = "test", criteria: Mapping[str, str] | None = None, batch_size: int = 32,
                      on_invalid: str = "error", oracle_domains: bool = False, resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0, progress: Any = None) -> dict[str, Any]:
    """`moerm bon`: Best-of-N of saved runs on the human-scored domains of `data`; writes bon.json, bon.md, bon.png
    into `out` (default RUN/bon). A folder of seed-* runs is one system, its runs averaged."""
    from moerm.data.readers import load_pairs
    from moerm.runs import _expand_runs
    from moerm.systems.base import load_system
    from moerm.atomic import atomic_write_text

    pairs, _ = load_pairs([str(p) for p in data], split=split, on_invalid=on_invalid)
    domains, skipped = build_candidate_sets(pairs, criteria)
    if not domains:
        raise UserError(f"no domain of {', '.join(map(str, data))} can give a Best-of-N curve: "
                        + "; ".join(f"{d}: {why}" for d, why in skipped.items())
                        + ". It needs pairs with human aspect scores that share a prompt (summeval, newsroom, "
                        "topical_chat, d2t_nlg)")
    groups = _expand_runs([Path(r) for r in runs])
    rewards: dict[str, list[dict[str, list[list[float]]]]] = {}
    meta: dict[str, dict[str, Any]] = {}
    for label, members in groups:
        rewards[label] = []
        names = []
        for run in members:
            if progress is not None:
                progress(f"scoring {sum(len(cs.responses) for ds in domains.values() for cs in ds.sets)} candidates "
                         f"with {run}")
            system = load_system(run)
            names.append(system.name)
            rewards[label].append(score_candidates(system, domains, batch_size, oracle_domains))
            del system
        meta[label] = {"system": names[0], "runs": [str(m) for m in members]}
    counts: dict[str, int] = defaultdict(int)
    for m in meta.values():
        counts[m["system"]] += 1
    for label, m in meta.items():  # the legend: the system's name, with its run folder's name where two share one
        m["display"] = m["system"] if counts[m["system"]] == 1 else f"{m['system']} ({Path(label).name})"
    res = bon_results(domains, rewards, skipped, meta, resamples, seed)
    res["data"] = [str(p) for p in data]
    res["split"] = split
    res["routing"] = "oracle domains" if oracle_domains else "own router"
    out_dir = Path(out) if out is not None else Path(runs[0]) / "bon"
    title = (f"Best-of-N against human gold: {', '.join(map(str, data))}"
             + (f" ({split} split)" if split else "") + "; "
             + ", ".join(f"{d} {r['prompts']} prompts" for d, r in res["domains"].items()))
    picture = picture_title(res, split)
    markdown = f"## {title}\n\n" + bon_markdown(res)
    atomic_write_text(out_dir / "bon.json", json.dumps(res, indent=2))
    atomic_write_text(out_dir / "bon.md", markdown + "\n")
    plot_bon(res, out_dir / "bon.png", picture)
    return {"json": res, "markdown": markdown, "written": str(out_dir),
            "files": [str(out_dir / f) for f in ("bon.json", "bon.md", "bon.png")]}
