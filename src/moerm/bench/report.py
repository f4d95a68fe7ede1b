"""The bench's outputs: results.json (everything, per seed and aggregated), report.md (tables like the router paper's
Tables 2, 3 and 6 plus routing, expert, per-route and capability tables) and PNG plots (matplotlib, Agg, no display
needed). Nothing here names a system: each table is there for every system whose results carry what it shows."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from moerm.eval.intervals import sample_std
from moerm.bench.bon import best_of_n_markdown, write_best_of_n_plot
from moerm.bench.data import Prepared
from moerm.bench.measure import environment
from moerm.bench.presets import ALL_SYSTEMS, BEST_ROUTED, BenchConfig, Target, ensemble_members
from moerm.atomic import atomic_write_text
from moerm.data.readers import load_pairs
from moerm.eval.intervals import Interval, accuracy_intervals, clustered_accuracy_ci
from moerm.eval.metrics import aggregate_subsets, ci_record, compare_runs, pair_index, per_pair_rows
from moerm.eval.report import ci_text, diff_text, matrix_table

PLOTS = {"accuracy_per_domain": "accuracy per domain, grouped by system",
         "accuracy_vs_params": "average accuracy against total parameters",
         "pairs_per_second": "pairs per second per system (same batch)"}


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = sample_std(values)
    return {"mean": mean, "std": std, "n": n}


# ------------------------------------------------------------------------------------------------ results

def held_out_index(prepared: Prepared) -> dict[str, tuple[str, str]]:
    """Held-out pair id -> (domain, prompt key), over the shared sample and every plan's own held-out file: what
    aligns the cells' per-pair results and clusters them by prompt."""
    files = [prepared.test_path] + [(prepared.out / p["test"]).resolve() for p in prepared.plans.values()
                                    if p.get("status") == "ok" and p.get("test")]
    index: dict[str, tuple[str, str]] = {}
    for f in dict.fromkeys(files):
        if f.exists():
            index.update(pair_index(load_pairs([f])[0]))
    return index


def _reports(cells: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return [c[key] for c in cells if key in c]


def macro_ci(reports: list[dict[str, Any]], index: dict[str, tuple[str, str]],
             domains: list[str]) -> dict[str, Any] | None:
    """The 95% interval of the seed-mean macro accuracy over `domains` (prompts resampled within each domain)."""
    rows = per_pair_rows(reports, index, domains)
    if rows is None:
        return None
    ids, correct = rows
    ci = clustered_accuracy_ci(correct, [index[i][1] for i in ids], [index[i][0] for i in ids], macro=True)
    return ci_record(ci)


def build_results(cfg: BenchConfig, cells: dict[str, dict[str, Any]], inference: dict[str, Any], prepared: Prepared,
                  skipped: dict[str, str], failed: dict[str, str]) -> dict[str, Any]:
    """Aggregate the cells over seeds: accuracy, sizes, training time, routing, experts, routes, capabilities."""
    by_system: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for cell in cells.values():
        by_system[cell["system"]].append(cell)
    given = set(cfg.given_domains())
    index = held_out_index(prepared)
    all_domains = sorted(prepared.info.get("eval_pairs", {}))
    domains = [d for d in all_domains if d not in given]  # scored as deployed (own router)
    res: dict[str, Any] = {
        "name": cfg.name, "date": dt.datetime.now().isoformat(timespec="seconds"), "bench": cfg.to_dict(),
        "environment": environment(cfg.resolved_device()), "data": prepared.info, "plans": prepared.plans,
        "domains": domains, "domains_given": [d for d in all_domains if d in given], "systems": {}, "accuracy": {},
        "accuracy_oracle_routing": {}, "accuracy_domain_given": {}, "accuracy_on_plan_domains": {},
        "sizes": {}, "training": {}, "inference": inference, "routing": {}, "expert_utilisation": {}, "per_route": {},
        "capability_accuracy": {}, "accuracy_per_subset": {}, "failed": failed, "skipped": skipped,
        "cells": {name: c["run_dir"] for name, c in cells.items()}, "learning": {}, "router_hits": {}, "groups": {}, "targets": [],
        "cells_wall_seconds": sum((c.get("wall_seconds") or {}).get("total", 0.0) for c in cells.values()),
    }
    for s in cfg.systems:
        got = sorted(by_system.get(s, []), key=lambda c: c["seed"])
        status = "skipped" if s in skipped else "done" if len(got) == len(cfg.seeds) else "partial" if got else "failed"
        res["systems"][s] = {"status": status, "seeds": [c["seed"] for c in got],
                             **({"routed": got[0].get("routed", "router_accuracy" in (got[0].get("eval") or {}))}
                                if got else {}),
                             **({"reason": skipped[s]} if s in skipped else {})}
        if not got:
            continue
        if all("eval_domain_given" in c for c in got):
            res["accuracy_domain_given"][s] = _accuracy(got, "eval_domain_given", index)
        res["training"][s] = _training(got)
        res["sizes"][s] = _size(got[0])
        res["learning"][s] = _learning(got)
        if not all("eval" in c for c in got):  # only domain-given pairs (its domains all in domain_given groups)
            continue
        res["accuracy"][s] = _accuracy(got, "eval", index)
        if all("eval_oracle_routing" in c for c in got):
            res["accuracy_oracle_routing"][s] = _accuracy(got, "eval_oracle_routing", index)
        routing = _routing(got)
        if routing:
            res["routing"][s] = routing
        if all("router_confusion" in c["eval"] for c in got):
            res["router_hits"][s] = {str(c["seed"]): _router_hits(c["eval"]) for c in got}
        if any("expert_utilisation" in c["eval"] for c in got):
            res["expert_utilisation"][s] = _utilisation(got)
        if any("per_task" in c["eval"] for c in got):  # routes that group domains (e.g. DMoERM's tasks)
            res["per_route"][s] = _per_route(got)
        if any("capability_accuracy" in c["eval"] for c in got):
            res["capability_accuracy"][s] = _capabilities(got)
        if any("per_subset" in c["eval"] for c in got):  # the data's `subset` (RM-Bench, AlpacaEval, HHH, ...)
            res["accuracy_per_subset"][s] = {k: aggregate_subsets([c["eval"] for c in got], k)
                                             for k in ("per_subset", "per_subset_group")}
    for planned, plan in prepared.plans.items():
        sub = [d for d in plan.get("domains") or [] if d in domains]
        if plan.get("status") != "ok" or not sub or set(sub) >= set(domains):
            continue
        # every system on the domains a plan restricted one to: the like-for-like comparison
        res["accuracy_on_plan_domains"][planned] = {"domains": sub, "systems": {
            s: mean_std([sum(v["per_domain"][d] for d in sub) / len(sub) for v in acc["seeds"].values()])
            for s, acc in res["accuracy"].items() if all(d in acc["per_domain"] for d in sub)}}
    base = res["sizes"].get("baseline", {}).get("params_total")
    for size in res["sizes"].values():
        size["params_pct_of_baseline"] = 100.0 * size["params_total"] / base if base else None
    for g in cfg.groups:
        res["groups"][g.name] = _group(res, by_system, g.title, [d for d in g.domains if d in all_domains],
                                       g.domain_given, index, cfg.reference)
    if not cfg.groups and res["accuracy"]:  # no groups: the comparisons over every domain scored as deployed
        res["comparisons"] = _comparisons(res, by_system, domains, False, index, cfg.reference)
    res["budget"] = _budget(cfg, prepared)
    res["targets"] = [row for t in cfg.targets for row in check_target(cfg, res, t, by_system, index)]
    return res


# ------------------------------------------------------------------------------------------------ groups, targets

def _seed_macro(acc: dict[str, Any], domains: list[str]) -> dict[str, float] | None:
    """Mean over seeds of each seed's mean over `domains` (all of which the system must cover)."""
    if not domains or not all(d in acc["per_domain"] for d in domains):
        return None
    return mean_std([sum(v["per_domain"][d] for d in domains) / len(domains) for v in acc["seeds"].values()])


def _covered(acc: dict[str, Any] | None, domains: list[str]) -> list[str]:
    return [d for d in domains if acc and d in acc["per_domain"]]


def _router_hits(e: dict[str, Any]) -> dict[str, Any]:
    """One cell's router: (routed to its own domain, inputs) per true domain, and its overall accuracy."""
    conf = e["router_confusion"]
    return {"by_domain": {d: [row.get(d, 0), sum(row.values())] for d, row in conf.items()},
            "overall": e.get("router_accuracy"), "domains": sorted(e.get("per_domain", {}))}


def router_accuracy(res: dict[str, Any], s: str, domains: list[str]) -> dict[str, float] | None:
    """System `s`'s router accuracy on the held-out chosen replies of `domains` (pooled per seed), over seeds.

    A system whose routes group domains (DMoERM's tasks: its confusion rows are routes) counts its overall route
    accuracy when all of its domains are among `domains`.
    """
    vals = []
    for h in (res.get("router_hits") or {}).get(s, {}).values():
        rows = [h["by_domain"][d] for d in domains if d in h["by_domain"]]
        if rows:
            vals.append(sum(r[0] for r in rows) / max(1, sum(r[1] for r in rows)))
        elif h.get("overall") is not None and h["domains"] and set(h["domains"]) <= set(domains):
            vals.append(h["overall"])
        else:
            return None
    return mean_std(vals) if vals else None


def _with_ci(value: dict[str, float] | None, ci: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if value is None else {**value, **({"ci": ci} if ci else {})}


def _comparisons(res: dict[str, Any], by_system: dict[str, list[dict[str, Any]]], domains: list[str], given: bool,
                 index: dict[str, tuple[str, str]], reference: str | None) -> dict[str, Any]:
    """Paired differences on the same held-out pairs (means over seeds, prompts resampled within each domain):
    every system minus `reference` (`vs_reference`), and each routed system with the true domain given minus the
    same system with its own router (`oracle_minus_own`)."""
    key = "eval_domain_given" if given else "eval"
    table = res["accuracy_domain_given" if given else "accuracy"]
    out: dict[str, Any] = {"reference": reference, "vs_reference": {}, "oracle_minus_own": {}}
    ref_reports = _reports(by_system.get(reference or "", []), key) if reference in table else []
    for s in table:
        cov = _covered(table[s], domains)
        if not cov:
            continue
        mine = _reports(by_system[s], key)
        if ref_reports and s != reference:
            diff = compare_runs(mine, ref_reports, index, cov)
            if diff is not None:
                out["vs_reference"][s] = diff
        if not given and s in res["accuracy_oracle_routing"]:
            diff = compare_runs(_reports(by_system[s], "eval_oracle_routing"), mine, index, cov)
            if diff is not None:
                out["oracle_minus_own"][s] = diff
    return out


def _group(res: dict[str, Any], by_system: dict[str, list[dict[str, Any]]], title: str, domains: list[str],
           given: bool, index: dict[str, tuple[str, str]], reference: str | None = None) -> dict[str, Any]:
    """One domain group's table: per system its accuracy per domain and the macro over the domains it covers (with
    the 95% interval of the seed mean), and the paired differences of `_comparisons` over those domains."""
    table = res["accuracy_domain_given" if given else "accuracy"]
    key = "eval_domain_given" if given else "eval"
    out: dict[str, Any] = {"title": title, "domain_given": given, "domains": domains, "systems": {},
                           "oracle_routing": {}, "router_accuracy": {}}
    for s, acc in table.items():
        cov = _covered(acc, domains)
        if not cov:
            continue
        ci = macro_ci(_reports(by_system[s], key), index, cov)
        out["systems"][s] = {"per_domain": {d: acc["per_domain"][d] for d in cov},
                             "average": _with_ci(_seed_macro(acc, cov), ci),
                             "domains": cov, "pairs": sum(acc["per_domain"][d].get("pairs", 0) for d in cov),
                             "prompts": sum(acc["per_domain"][d].get("prompts", 0) for d in cov)}
        oracle = res["accuracy_oracle_routing"].get(s)
        if not given and oracle and _covered(oracle, cov) == cov:
            out["oracle_routing"][s] = {"per_domain": {d: oracle["per_domain"][d] for d in cov},
                                        "average": _with_ci(_seed_macro(oracle, cov), macro_ci(
                                            _reports(by_system[s], "eval_oracle_routing"), index, cov)),
                                        "domains": cov}
        router = None if given else router_accuracy(res, s, cov)
        if router is not None:
            out["router_accuracy"][s] = router
    out["comparisons"] = _comparisons(res, by_system, domains, given, index, reference)
    return out


def _learning(cells: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Training accuracy in the first and the last epoch, averaged over components and seeds (the budget signal)."""
    rows = [v for c in cells for k, v in (c.get("learning") or {}).items()
            if v.get("epochs", 0) >= 1 and "router" not in k]  # a router's own figure is its routing accuracy
    if not rows:
        return None
    first = sum(r["first_epoch_accuracy"] for r in rows) / len(rows)
    last = sum(r["last_epoch_accuracy"] for r in rows) / len(rows)
    epochs = [r["epochs"] for r in rows]
    return {"first_epoch_accuracy": first, "last_epoch_accuracy": last, "gain": last - first,
            "epochs": max(set(epochs), key=epochs.count), "components": len(rows) // max(1, len(cells))}


def _budget(cfg: BenchConfig, prepared: Prepared) -> dict[str, Any]:
    """What each system trained on: pairs per domain (its plan's or the shared sample) and epochs."""
    shared = dict(prepared.info.get("train_pairs", {}))
    out: dict[str, Any] = {"train_pairs_per_domain": shared, "epochs": cfg.train.get("epochs"), "systems": {}}
    for s in cfg.systems:
        own = (cfg.per_system.get(s) or {}).get("train") or {}
        plan = prepared.plans.get(s) or {}
        doms = plan.get("domains") if plan.get("status") == "ok" else None
        pairs = {d: n for d, n in shared.items() if doms is None or d in doms}
        out["systems"][s] = {"epochs": own.get("epochs", cfg.train.get("epochs", 1)), "train_pairs": sum(pairs.values()),
                             "min_pairs_per_domain": min(pairs.values()) if pairs else 0}
    return out


def _target_domains(cfg: BenchConfig, res: dict[str, Any], t: Target) -> tuple[list[str], bool, str]:
    """The domains a target is measured on, whether they are scored domain-given, and how the report names them."""
    names = t.groups or [g.name for g in cfg.groups if not g.domain_given]
    if not names:
        return list(res["domains"]), False, "all domains"
    groups = [cfg.group(n) for n in names]
    have = set(res["domains"]) | set(res["domains_given"])
    return ([d for g in groups for d in g.domains if d in have], groups[0].domain_given,
            " + ".join(g.title for g in groups))


def _verdicts(parts: list[str]) -> str:
    """All met: met; any missed: missed; else not resolved."""
    return "met" if all(p == "met" for p in parts) else "missed" if "missed" in parts else "not resolved"


def check_target(cfg: BenchConfig, res: dict[str, Any], t: Target,
                 by_system: dict[str, list[dict[str, Any]]] | None = None,
                 index: dict[str, tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """The rows of one target: one per system it names ("all": every system with results), each met, missed or
    not resolved (`status`; `met` is True only when met).

    Figures are means over seeds; a value and its reference are macros over exactly the same domains (those of the
    target's groups that the system covers). The decision reads the 95% intervals (prompts resampled within each
    domain; `by_system`/`index`: the cells' per-pair results and the held-out pairs' prompt keys): the value's
    lower end must reach `min`, the paired difference's lower end `margin`. Without per-pair results (cells of an
    older moerm) it falls back to the point estimates and says so. Nothing here is a number from elsewhere.
    """
    domains, given, where = _target_domains(cfg, res, t)
    table = res["accuracy_domain_given" if given else "accuracy"]
    key = "eval_domain_given" if given else "eval"
    cells = by_system or {}
    index = index or {}
    routed = {s for s, v in res["systems"].items() if v.get("routed")}
    if t.systems == [ALL_SYSTEMS]:
        names = list(table)
    elif t.systems == [BEST_ROUTED]:
        names = [s for s in table if s in routed]
    else:
        names = list(t.systems)
    rows = []
    for s in names:
        cov = _covered(table.get(s), domains)
        row: dict[str, Any] = {"target": t.name, "system": s, "where": where, "domain_given": given, "domains": cov,
                               "min": t.min, "vs": t.vs, "margin": t.margin, "max_params_vs": t.max_params_vs}
        if not cov:
            rows.append({**row, "met": None, "status": "n/a", "why": f"no results for {s} on {where}"})
            continue
        mine = _reports(cells.get(s, []), key)
        value = _with_ci(_seed_macro(table[s], cov), macro_ci(mine, index, cov))
        row["value"] = value
        need = [] if t.min is None else [t.min]
        verdicts: list[str] = []
        point_only = False
        if t.min is not None:
            if value and value.get("ci"):
                verdicts.append(_interval_of(value).verdict(t.min))
            else:
                point_only = True
                verdicts.append("met" if value["mean"] >= t.min else "missed")
        if t.vs is not None:
            ref = _seed_macro(table[t.vs], cov) if t.vs in table else None
            row["ref"] = ref
            if ref is None:
                rows.append({**row, "met": None, "status": "n/a", "why": f"no results for {t.vs} on {', '.join(cov)}"})
                continue
            need.append(ref["mean"] + t.margin)
            diff = compare_runs(mine, _reports(cells.get(t.vs, []), key), index, cov) if s != t.vs else None
            if s == t.vs:  # a system against itself: a difference of exactly 0
                verdicts.append("met" if t.margin <= 0 else "missed")
            elif diff is not None:
                row["difference"] = diff["macro"]
                verdicts.append(_interval_of(diff["macro"]).verdict(t.margin))
            else:
                point_only = True
                verdicts.append("met" if value["mean"] - ref["mean"] >= t.margin - 1e-12 else "missed")
        row["needed"] = max(need)
        if point_only:
            row["why"] = "no per-pair results in its cells: decided on the point estimates, without intervals"
        if t.max_params_vs is not None:
            p, q = (res["sizes"].get(x, {}).get("params_total") for x in (s, t.vs))
            row["params_ratio"] = p / q if p and q else None
            verdicts.append("met" if row["params_ratio"] is not None and row["params_ratio"] < t.max_params_vs
                            else "missed")
        row["status"] = _verdicts(verdicts)
        met = row["status"] == "met"
        row["met"] = met
        row["ablation"] = _ablation(res, s, cov, given, row["needed"])
        if t.vs is not None and t.vs in table:
            row["ablation_vs"] = _ablation(res, t.vs, cov, given, None)
        rows.append(row)
    if t.systems == [BEST_ROUTED]:
        scored = [r for r in rows if r.get("value")]
        if not scored:
            return [{"target": t.name, "system": BEST_ROUTED, "where": where, "domain_given": given, "met": None,
                     "status": "n/a", "why": "no routed system has results there"}]
        best = max(scored, key=lambda r: r["value"]["mean"] - (r["ref"]["mean"] if r.get("ref") else 0.0))
        best["candidates"] = {r["system"]: r["value"]["mean"] for r in scored}
        return [best]
    return rows


def _interval_of(v: dict[str, Any]) -> Interval:
    """A stored figure with its interval (`{mean, ci}` or a difference record) back as an Interval."""
    ci = v.get("ci", v)
    point = v["mean"] if "mean" in v else v["diff"]
    return Interval(point, ci["low"], ci["high"], ci.get("level", 0.95), ci.get("prompts", 0), ci.get("pairs", 0),
                    ci.get("resamples", 0))


def _ablation(res: dict[str, Any], s: str, domains: list[str], given: bool, needed: float | None) -> dict[str, Any]:
    """Router vs domain RMs vs budget for system `s` on `domains`, and the part that falls short (when `needed`).

    oracle: its macro with each pair's true domain given (the domain RMs without router errors); router_accuracy:
    its router on those domains; learning: its training accuracy in the first and the last epoch; budget: pairs and
    epochs it trained on.
    """
    out: dict[str, Any] = {}
    oracle_table = res["accuracy_domain_given"] if given else res["accuracy_oracle_routing"]
    if s in oracle_table:
        out["oracle"] = _seed_macro(oracle_table[s], domains)
    if not given and router_accuracy(res, s, domains) is not None:
        out["router_accuracy"] = router_accuracy(res, s, domains)
    if res["learning"].get(s):
        out["learning"] = res["learning"][s]
    out["budget"] = res.get("budget", {}).get("systems", {}).get(s)
    if needed is not None:
        value = _seed_macro(res["accuracy_domain_given" if given else "accuracy"][s], domains)
        out["falls_short_in"] = _diagnosis(value, out, needed, given)
    return out


STILL_LEARNING = 0.02  # training accuracy gained from the first to the last epoch: more budget would still help
UNDERFIT = 0.65  # training accuracy in the last epoch below this: the budget stopped it before it fit the data


def _diagnosis(value: dict[str, float] | None, abl: dict[str, Any], needed: float, given: bool) -> str:
    """Which part falls short, by the rules the report's Targets section states, over the ablation figures."""
    oracle = abl.get("oracle")
    if not given and oracle is not None and value is not None and oracle["mean"] >= needed:
        return (f"router: with each pair's true domain it reaches {100 * oracle['mean']:.1f}% (needed "
                f"{100 * needed:.1f}%); routing costs {100 * (oracle['mean'] - value['mean']):.1f} points")
    parts = []
    lr = abl.get("learning")
    if lr and (lr["gain"] >= STILL_LEARNING or lr["last_epoch_accuracy"] < UNDERFIT):
        parts.append(f"budget: training accuracy {100 * lr['first_epoch_accuracy']:.1f}% in epoch 1, "
                     f"{100 * lr['last_epoch_accuracy']:.1f}% in epoch {lr['epochs']} (still "
                     f"{'rising' if lr['gain'] >= STILL_LEARNING else 'low'})")
    elif oracle is not None:
        parts.append(f"domain RMs: {100 * oracle['mean']:.1f}% even with the true domain, and training accuracy no "
                     "longer rising (more epochs of this budget would not close it)")
    elif lr:
        parts.append("the model: training accuracy no longer rising (more epochs of this budget would not close it)")
    else:
        parts.append("no ablation figures (no training curve recorded)")
    if not given and oracle is not None and value is not None and oracle["mean"] - value["mean"] > 0.005:
        parts.append(f"the router costs {100 * (oracle['mean'] - value['mean']):.1f} points besides")
    return "; ".join(parts)


def _accuracy(cells: list[dict[str, Any]], key: str = "eval",
              index: dict[str, tuple[str, str]] | None = None) -> dict[str, Any]:
    """Mean ± std over seeds per domain, macro and pair-weighted; with `index` and per-pair results in the cells,
    each with its prompt count and the 95% interval of the seed mean (prompts resampled within each domain)."""
    per: dict[str, list[float]] = defaultdict(list)
    pairs: dict[str, int] = {}
    for c in cells:
        for d, v in c[key]["per_domain"].items():
            per[d].append(v["accuracy"])
            pairs[d] = v["pairs"]
    out = {
        "per_domain": {d: {**mean_std(v), "pairs": pairs[d]} for d, v in sorted(per.items())},
        "average": mean_std([c[key]["macro_accuracy"] for c in cells]),  # mean over domains, then over seeds
        "pair_weighted": mean_std([c[key]["accuracy"] for c in cells]),
        "seeds": {str(c["seed"]): {"per_domain": {d: v["accuracy"] for d, v in c[key]["per_domain"].items()},
                                   "average": c[key]["macro_accuracy"]} for c in cells},
    }
    rows = per_pair_rows([c[key] for c in cells], index or {})
    if rows is not None:
        ids, correct = rows
        ivs = accuracy_intervals(correct, [index[i][1] for i in ids], [index[i][0] for i in ids])  # type: ignore[index]
        out["prompts"] = ivs["overall"].prompts
        out["average"]["ci"] = ci_record(ivs["macro"])
        out["pair_weighted"]["ci"] = ci_record(ivs["overall"])
        for d, ci in ivs["per_domain"].items():
            if d in out["per_domain"]:
                out["per_domain"][d].update(prompts=ci.prompts, ci=ci_record(ci))
    return out


def _training(cells: list[dict[str, Any]]) -> dict[str, Any]:
    comps: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        for comp, sec in c["seconds_per_component"].items():
            comps[comp]["seconds"].append(sec)
            if c["seconds_per_epoch"].get(comp) is not None:
                comps[comp]["seconds_per_epoch"].append(c["seconds_per_epoch"][comp])
    return {
        "seconds": mean_std([c["train_seconds"] for c in cells]),
        "seconds_per_epoch": mean_std([c["train_seconds_per_epoch"] for c in cells]),
        "components": {k: {m: mean_std(v) for m, v in row.items() if v} for k, row in comps.items()},
    }


def _size(cell: dict[str, Any]) -> dict[str, Any]:
    info = cell["size"]
    return {"params_total": info["total"]["params_total"], "params_trained": sum(cell["params_trained"].values()),
            "bytes_on_disk": info["total"].get("bytes_on_disk"), "components": info["components"],
            "trained_by_component": cell["params_trained"], "backbone": info.get("backbone"), "tuning": info.get("tuning")}


def _sum_confusion(mats: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for m in mats:
        for true, row in m.items():
            for pred, v in row.items():
                out[true][pred] += v
    return {t: dict(sorted(r.items())) for t, r in sorted(out.items())}


def _routing(cells: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    evals = [c["eval"] for c in cells]
    if all("router_accuracy" in e for e in evals):
        out["router_accuracy"] = mean_std([e["router_accuracy"] for e in evals])
        out["fallback_rate"] = mean_std([e["fallback_rate"] for e in evals])
        out["confusion"] = _sum_confusion([e["router_confusion"] for e in evals])
    if all("task_router_accuracy" in e for e in evals):
        out["task_router_accuracy"] = mean_std([e["task_router_accuracy"] for e in evals])
        out["fallback_rate"] = mean_std([e["fallback_rate"] for e in evals])
        out["task_confusion"] = _sum_confusion([e["task_router_confusion"] for e in evals])
    return out


def _utilisation(cells: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean over seeds of the share of each domain's inputs whose top-k includes each expert."""
    acc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    n = len(cells)
    for c in cells:
        for d, row in c["eval"].get("expert_utilisation", {}).items():
            for e, v in row.items():
                acc[d][e] += v / n
    return {d: dict(sorted(r.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else kv[0]))
            for d, r in sorted(acc.items())}


def _per_route(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per true route (a group of domains the router picks among), mean over seeds."""
    acc: dict[str, list[float]] = defaultdict(list)
    pairs: dict[str, int] = {}
    for c in cells:
        for t, v in c["eval"].get("per_task", {}).items():
            acc[t].append(v["accuracy"])
            pairs[t] = v["pairs"]
    return {t: {**mean_std(v), "pairs": pairs[t]} for t, v in sorted(acc.items())}


def _capabilities(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per domain and capability: how often the capability's sub-score orders a pair as its aspect scores do."""
    caps: dict[tuple[str, str], list[float]] = defaultdict(list)
    cap_pairs: dict[tuple[str, str], int] = {}
    for c in cells:
        for d, row in c["eval"].get("capability_accuracy", {}).items():
            for cap, v in row.items():
                caps[(d, cap)].append(v["accuracy"])
                cap_pairs[(d, cap)] = v["pairs"]
    return {d: {cap: {**mean_std(caps[(d, cap)]), "pairs": cap_pairs[(d, cap)]} for (dd, cap) in sorted(caps) if dd == d}
            for d in sorted({d for d, _ in caps})}


# ------------------------------------------------------------------------------------------------ markdown

SPREAD_NOTE = ("mean ± sample std over seeds (the seed spread), then [low, high]: the 95% interval of that mean "
               "from a bootstrap that resamples held-out prompts, all pairs of a drawn prompt together, within each domain "
               "(the sampling spread)")


def _pct(v: dict[str, Any] | None, std: bool = True) -> str:
    """"61.3 ± 1.2 [58.1, 64.4]": mean ± std over seeds and, where there is one, the 95% interval over prompts."""
    if not v:
        return "–"
    if not std:
        return f"{100 * v['mean']:.1f}"
    return f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}" + (f" {ci_text(v['ci'])}" if v.get("ci") else "")


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "–" if x is None else fmt.format(x)


def _seconds(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 1 else f"{x:.1f}" if x < 100 else f"{x:,.0f}"


def _accuracy_rows(table: dict[str, Any], domains: list[str]) -> tuple[list[str], list[str]]:
    lines = ["| system | " + " | ".join(domains) + " | **average** |", "|---|" + "---:|" * (len(domains) + 1)]
    partial = []
    for s, acc in table.items():
        cells = [_pct(acc["per_domain"].get(d)) for d in domains]
        avg = _pct(acc["average"])
        if set(acc["per_domain"]) != set(domains):
            avg += " ¹"
            partial.append(f"{s} ({len(acc['per_domain'])} of {len(domains)} domains)")
        lines.append(f"| {s} | " + " | ".join(cells) + f" | **{avg}** |")
    return lines, partial


def _group_rows(table: dict[str, Any], domains: list[str]) -> list[str]:
    lines = ["| system | " + " | ".join(domains) + " | **average** |", "|---|" + "---:|" * (len(domains) + 1)]
    for s, v in table.items():
        avg = _pct(v["average"]) + (" ¹" if v["domains"] != domains else "")
        lines.append(f"| {s} | " + " | ".join(_pct(v["per_domain"].get(d)) for d in domains) + f" | **{avg}** |")
    return lines


def groups_markdown(res: dict[str, Any]) -> str:
    """A table per domain group: accuracy per domain and the macro over the group (routed, or domain given)."""
    seeds = sorted({len(v["seeds"]) for t in (res["accuracy"], res["accuracy_domain_given"]) for v in t.values()})
    out = [f"Pairwise accuracy (%) on the held-out pairs over {' / '.join(map(str, seeds))} seed(s): {SPREAD_NOTE}. "
           "**average** = mean over the group's domains (macro) per seed, then over seeds; ¹ over the domains the "
           "system covers only."]
    for name, g in res["groups"].items():
        how = ("each pair's domain passed to `score` (`domain` in `score`, the server and the TRL function), as an "
               "RLHF trainer that knows each prompt's source passes it; systems that do not route ignore it"
               if g["domain_given"] else "routed systems route with their own router (no domain given)")
        out += ["", f"### {g['title']}", "", f"Domains: {', '.join(g['domains'])}; {how}.", ""]
        if not g["systems"]:
            out += ["No system has results on these domains."]
            continue
        out += _group_rows(g["systems"], g["domains"])
        counts = next(iter(g["systems"].values()))
        if counts.get("prompts"):
            out += ["", f"Held-out pairs (prompts) per domain: " + ", ".join(
                f"{d} {v.get('pairs', '?')} ({v.get('prompts', '?')})" for d, v in counts["per_domain"].items()) + "."]
        if g["router_accuracy"]:
            out += ["", "Router accuracy on these domains (routed domain = true domain): " + "; ".join(
                f"{s} {_pct(v)}%" for s, v in g["router_accuracy"].items()) + "."]
        if g["oracle_routing"]:
            out += ["", "The same domains with oracle routing (each pair's true domain given to the routed systems: "
                    "the domain RMs without router errors):", "", *_group_rows(g["oracle_routing"], g["domains"])]
        if g.get("comparisons"):
            out += ["", *comparisons_markdown(g["comparisons"])]
    return "\n".join(out)


def comparisons_markdown(comp: dict[str, Any]) -> list[str]:
    """The paired differences of a group (or of every domain): each system minus the reference, and each routed
    system's true-domain score minus its own-router score, in points with their 95% intervals."""
    lines: list[str] = []
    rows = [(f"{s} − {comp['reference']}", d) for s, d in comp.get("vs_reference", {}).items()]
    rows += [(f"{s}: true domain − own router", d) for s, d in comp.get("oracle_minus_own", {}).items()]
    if not rows:
        return lines
    lines += ["Paired differences on the same held-out pairs (points, mean over seeds; 95% interval of a paired "
              "bootstrap that draws the same prompts for both sides, within each domain). A difference is resolved "
              "only where its interval excludes 0.", "",
              "| comparison | pairs (prompts) | macro | pair-weighted | domains whose interval excludes 0 |",
              "|---|---:|---:|---:|---|"]
    for name, d in rows:
        sure = [f"{dom} {diff_text(v)}" for dom, v in d["per_domain"].items() if v["excludes_zero"]]
        lines.append(f"| {name} | {d['pairs']} ({d['prompts']}) | {diff_text(d['macro'])} | "
                     f"{diff_text(d['overall'])} | {'; '.join(sure) or 'none'} |")
    return lines


def _pp(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def targets_markdown(res: dict[str, Any]) -> str:
    """The targets table (each row met or missed, from the results) and, for missed rows, the ablation."""
    rows = res.get("targets") or []
    if not rows:
        return ""
    lines = ["Each target is checked on the results above (means over seeds; a value and its reference are macros "
             "over exactly the same domains, those of the target's groups the system covers). A target is **met** "
             "only when the 95% interval clears its line: the value's lower end reaches the floor, and the lower end "
             "of the paired difference from the reference reaches the margin; **missed** when the interval lies "
             "below the line; otherwise **not resolved** (the held-out prompts cannot tell). Intervals resample "
             "prompts within each domain.", "",
             "| target | system | measured on | value (%) | needed (%) | difference (points) | result |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        status = r.get("status") or ("met" if r["met"] else "n/a" if r["met"] is None else "missed")
        res_txt = "n/a: " + r.get("why", "") if status == "n/a" else f"**{status}**"
        if status != "n/a" and r.get("why"):
            res_txt += f" ({r['why']})"
        need = _pp(r.get("needed"))
        if r.get("vs") is not None and r.get("ref"):
            sign = "+" if r["margin"] >= 0 else "−"
            need += f" ({r['vs']} {_pp(r['ref']['mean'])} {sign} {abs(100 * r['margin']):.0f})"
        elif r.get("min") is not None and r.get("needed") is not None:
            need += " (floor)"
        if r.get("max_params_vs") is not None:
            ratio = r.get("params_ratio")
            need += (f"; parameters {100 * ratio:.1f}% of {r['vs']} (< {100 * r['max_params_vs']:.0f}%)"
                     if ratio is not None else "; parameters –")
        where = r["where"] + (" (domain given)" if r["domain_given"] and "domain given" not in r["where"] else "")
        if r.get("candidates"):
            where += "; best of " + ", ".join(f"{k} {_pp(v)}" for k, v in r["candidates"].items())
        lines.append(f"| {r['target']} | {r['system']} | {where} | {_pct(r.get('value'))} | {need} | "
                     f"{diff_text(r.get('difference'))} | {res_txt} |")
    missed = [r for r in rows if r["met"] is False]
    if not missed:
        return "\n".join(lines + ["", "Every target with results is met."])
    lines += ["", "#### Where a target is missed or not resolved: router vs domain RMs vs budget", "",
              "For each row not met: the system's value with its own router, the same domains with each pair's true "
              "domain given (the domain RMs without router errors), its router's accuracy there, its training "
              "accuracy in the first and last epoch (mean over its trained reward-model components and seeds; routers are the router column) and its budget. "
              "Rules: if the true domain lifts it to the needed value, the router falls short; else if its training "
              f"accuracy still rose by {100 * STILL_LEARNING:.0f}+ points into the last epoch or stayed below "
              f"{100 * UNDERFIT:.0f}%, the budget; else the domain RMs (the model at this size and data).", "",
              "| target | system | own router (%) | domain given (%) | router accuracy (%) | training accuracy, "
              "first -> last epoch (%) | budget | falls short in |", "|---|---|---:|---:|---:|---:|---|---|"]
    for r in missed:
        for s, abl, value in ((r["system"], r.get("ablation") or {}, r.get("value")),
                              *(((r["vs"], r["ablation_vs"], r.get("ref")),) if r.get("ablation_vs") else ())):
            lr = abl.get("learning")
            b = abl.get("budget") or {}
            budget = (f"{b['train_pairs']:,} pairs (≥ {b['min_pairs_per_domain']} per domain) x {b['epochs']:g} "
                      "epochs" if b else "–")
            own = "–" if r["domain_given"] else _pct(value)
            lines.append(f"| {r['target']} | {s}{' (reference)' if s != r['system'] else ''} | {own} | "
                         f"{_pct(abl.get('oracle'))} | {_pct(abl.get('router_accuracy'))} | "
                         f"{_pp(lr['first_epoch_accuracy']) + ' -> ' + _pp(lr['last_epoch_accuracy']) if lr else '–'} | "
                         f"{budget} | {abl.get('falls_short_in', '')} |")
    return "\n".join(lines)


def wall_markdown(res: dict[str, Any]) -> str:
    wall = res.get("wall")
    if not wall:
        return ""
    runs = wall.get("runs", [])
    text = f"Wall time of the bench: **{wall['seconds'] / 60:.1f} min**"
    if len(runs) > 1:
        text += (f" over {len(runs)} runs of `moerm bench` into this folder (this run {wall['this_run_seconds'] / 60:.1f}"
                 " min; a rerun that resumed adds its own time)")
    else:
        text += f" (one run, started {runs[0]['started']})" if runs else ""
    cells = res.get("cells_wall_seconds")
    return text + (f"; training and evaluating the cells {cells / 60:.1f} min of it (summed over cells, whichever run "
                   "did them)" if cells else "") + "."


def accuracy_markdown(res: dict[str, Any]) -> str:
    if res.get("groups"):
        out = [groups_markdown(res)]
        tables = [set(g["domains"]) for g in res["groups"].values()]
        for planned, sub in (res.get("accuracy_on_plan_domains") or {}).items():
            if set(sub["domains"]) in tables:  # a group's table already compares every system there
                continue
            out += ["", f"Average over {planned}'s domains only ({', '.join(sub['domains'])}: its bench plan), every "
                    "system:", "", "| system | average |", "|---|---:|"]
            out += [f"| {s} | {_pct(v)} |" for s, v in sub["systems"].items()]
        return "\n".join(out)
    domains = res["domains"]
    n_seeds = {s: len(v["seeds"]) for s, v in res["accuracy"].items()}
    lines, partial = _accuracy_rows(res["accuracy"], domains)
    seeds = sorted(set(n_seeds.values()))
    head = (f"Pairwise accuracy (%) on the held-out pairs: chosen scored strictly above rejected, over "
            f"{' / '.join(map(str, seeds))} seed(s); {SPREAD_NOTE}. "
            "**average** = mean over the system's domains (macro), then over seeds. "
            "Routed systems route with their own router (no domain given).")
    out = [head, "", *lines]
    if partial:
        out += ["", "¹ average over the domains it covers only: " + "; ".join(partial)]
    for planned, sub in (res.get("accuracy_on_plan_domains") or {}).items():
        out += ["", f"Average over {planned}'s domains only ({', '.join(sub['domains'])}: its bench plan), every system:",
                "", "| system | average |", "|---|---:|"]
        out += [f"| {s} | {_pct(v)} |" for s, v in sub["systems"].items()]
    if res.get("accuracy_oracle_routing"):
        rows, _ = _accuracy_rows(res["accuracy_oracle_routing"], domains)
        out += ["", "With oracle routing (each pair's true domain given to the routed systems: the upper bound that "
                "isolates the domain RMs from routing errors):", "", *rows]
    if res.get("comparisons"):
        out += ["", *comparisons_markdown(res["comparisons"])]
    return "\n".join(out)


def size_markdown(res: dict[str, Any]) -> str:
    lines = ["| system | parameters | % of Baseline | trainable (trained) | bytes on disk | train s / epoch | "
             "train s (total) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for s, size in res["sizes"].items():
        tr = res["training"][s]
        pct = size.get("params_pct_of_baseline")
        lines.append(f"| {s} | {size['params_total']:,} | {_num(pct, '{:.0f}%')} | {size['params_trained']:,} | "
                     f"{_num(size['bytes_on_disk'])} | {_seconds(tr['seconds_per_epoch']['mean'])} | "
                     f"{_seconds(tr['seconds']['mean'])} |")
    comp = ["| system | component | train s | s / epoch |", "|---|---|---:|---:|"]
    for s, tr in res["training"].items():
        for name, v in tr["components"].items():
            pe = v.get("seconds_per_epoch")
            comp.append(f"| {s} | {name} | {_seconds(v['seconds']['mean'])} | {_seconds(pe['mean']) if pe else '–'} |")
    return "\n".join([
        "Parameters of the saved system (shared weights counted once); trainable = what the optimizers updated (the "
        "tensors in every component's final checkpoint: LoRA adapters and heads for LoRA systems); bytes on disk of "
        "the saved model folder. Training seconds are the mean over seeds; per epoch divides each component's time by "
        "its own epochs (components.<kind>.train.epochs: routers, DMoERM experts and aggregator, "
        "whose time includes computing the expert states once) and sums the components.",
        "", *lines, "", "#### Training time per component (mean over seeds)", "", *comp])


def _load(env: dict[str, Any]) -> str:
    """", load average 1.23 / 1.10 / 0.98" (1, 5, 15 min) where the environment recorded it."""
    load = env.get("load_average")
    return ", load average " + " / ".join(f"{x:.2f}" for x in load) if load else ""


def inference_markdown(res: dict[str, Any]) -> str:
    inf = res["inference"]
    if not inf:
        return "No system finished: nothing was timed."
    env = inf.get("environment", {})
    extra = []
    timed = {v.get("system", row) for row, v in inf["rows"].items()}
    for s, plan in (res.get("plans") or {}).items():
        if s in timed and plan.get("left_out"):
            extra += ["", f"{s} scores the whole batch too, inputs of the domains its bench plan left out "
                      f"({', '.join(plan['left_out'])}) included."]
    lines = ["| system | mode | seconds per pair | pairs / s | time vs Baseline |", "|---|---|---:|---:|---:|"]
    for row, v in inf["rows"].items():
        ratio = f"{v['time_vs_baseline']:.2f}×" if v.get("time_vs_baseline") else "–"
        lines.append(f"| {row} | {v.get('mode') or '–'} | {v['seconds_per_pair'] * 1000:.2f} ms | "
                     f"{v['pairs_per_second']:.1f} | {ratio} |")
    return "\n".join([
        f"Every system scores the same {inf['pairs']} held-out pairs ({inf['sequences']} sequences, domains "
        f"{', '.join(inf['domains'])} mixed in every batch), forward batch {inf['batch_size']}, median of "
        f"{inf['repeats']} repeats after a warm-up{', interleaved across systems' if inf['interleave'] else ''}; "
        f"{env.get('device', '?')}, threads: {env.get('threads', '?')}{_load(env)}. Routing included; time vs Baseline "
        "above 1 is slower. Each system runs in its default inference mode; `inference.all_modes` adds a row "
        "\"<system> (<mode>)\" per other mode it has.",
        "", *lines] + extra)


def routing_markdown(res: dict[str, Any]) -> str:
    parts = []
    for s, r in res["routing"].items():
        if "router_accuracy" in r:
            parts += [f"#### {s}: router accuracy {_pct(r['router_accuracy'])}%, fallback rate "
                      f"{_pct(r['fallback_rate'])}%", "", "Routed domain per true domain (held-out chosen replies, "
                      "summed over seeds):", "", matrix_table(r["confusion"], "true \\ routed"), ""]
        if "task_router_accuracy" in r:
            parts += [f"#### {s}: router accuracy over its routes {_pct(r['task_router_accuracy'])}%, fallback rate "
                      f"{_pct(r['fallback_rate'])}%", "", "Its routes group domains; routed route per true route "
                      "(held-out chosen replies, summed over seeds):", "",
                      matrix_table(r["task_confusion"], "true route \\ routed"), ""]
    return "\n".join(parts).strip() or "No routed system in this bench."


def utilisation_markdown(res: dict[str, Any]) -> str:
    parts = []
    for s, util in res["expert_utilisation"].items():
        parts += [f"#### {s}", "", "Share of each domain's held-out inputs whose top-k includes the expert (%, mean over "
                  "seeds):", "", matrix_table(util, "domain \\ expert", percent=True), ""]
    return "\n".join(parts).strip() or "No system in this bench reports which experts it used."


def plans_markdown(res: dict[str, Any]) -> str:
    """Every system whose bench plan changed its data: what it kept, what it left out and why, or why it is skipped."""
    parts = []
    for s, plan in (res.get("plans") or {}).items():
        parts += [f"#### {s}", ""]
        if plan.get("status") != "ok":
            parts += [f"{s} skipped: {plan.get('reason', '?')}.", ""]
        if plan.get("report"):
            parts += [*plan["report"], ""]
        if plan.get("status") == "ok":
            parts += [f"Trained and evaluated on {', '.join(plan['domains'])}."]
            if plan.get("left_out"):
                parts += ["", "Domains left out (not trained on, not in its rows):", ""]
                parts += [f"- {d}: {why}" for d, why in plan["left_out"].items()]
            parts += [""]
    return "\n".join(parts).strip() or "Every system trains and is evaluated on the shared pairs."


def routes_markdown(res: dict[str, Any]) -> str:
    """Accuracy per route for systems whose routes group domains (e.g. DMoERM's tasks)."""
    parts = []
    for s, routes in (res.get("per_route") or {}).items():
        parts += [f"#### {s}: consistency (pairwise accuracy) per route", "", "| route | pairs | accuracy (%) |",
                  "|---|---:|---:|"]
        parts += [f"| {t} | {v['pairs']} | {_pct(v)} |" for t, v in routes.items()] + [""]
    return "\n".join(parts).strip() or "No system in this bench routes to groups of domains."


def capabilities_markdown(res: dict[str, Any]) -> str:
    """Per domain and capability, for systems that report capability sub-scores (e.g. DMoERM's experts)."""
    parts = []
    for s, caps in (res.get("capability_accuracy") or {}).items():
        parts += [f"#### {s}", "", "How often the capability's own sub-score orders a held-out pair as its aspect "
                  "scores do (ties dropped; mean over seeds):", "", "| domain | capability | pairs | accuracy (%) |",
                  "|---|---|---:|---:|"]
        for dom, row in caps.items():
            parts += [f"| {dom} | {cap} | {v['pairs']} | {_pct(v)} |" for cap, v in row.items()]
        parts += [""]
    return "\n".join(parts).strip() or "No system in this bench reports capability sub-scores."


def subsets_markdown(res: dict[str, Any]) -> str:
    """Accuracy per subset of each domain whose pairs carry `subset`, every system side by side (mean ± std)."""
    table = res.get("accuracy_per_subset") or {}
    if not table:
        return "No held-out pair carries a `subset`."
    systems = list(table)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for s, v in table.items():
        for key, label in (("per_subset", "{}"), ("per_subset_group", "_{}_")):
            for d, row in (v.get(key) or {}).items():
                for sub, acc in row.items():
                    name = label.format(sub) + (f" ({acc['subsets']} subsets)" if "subsets" in acc else "")
                    rows.setdefault((d, name), {"pairs": acc["pairs"]})[s] = acc
    lines = ["Pairwise accuracy (%) per subset of the held-out pairs (the data's `subset`), mean ± std over seeds; "
             "groups (in italics) roll up `/`-separated names: `*/style0` is one RM-Bench style over its sources.", "",
             "| domain | subset | pairs | " + " | ".join(systems) + " |", "|---|---|---:|" + "---:|" * len(systems)]
    for (d, name), row in rows.items():
        lines.append(f"| {d} | {name} | {row['pairs']} | " + " | ".join(_pct(row.get(s)) for s in systems) + " |")
    return "\n".join(lines)


def report_markdown(res: dict[str, Any]) -> str:
    b = res["bench"]
    data = res["data"]
    env = res["environment"]
    dom_rows = ["| domain | training pairs (prompts) | held-out pairs (prompts) |", "|---|---:|---:|"]
    tp, ep = data.get("train_prompts") or {}, data.get("eval_prompts") or {}
    for d in sorted(set(data.get("train_pairs", {})) | set(data.get("eval_pairs", {}))):
        dom_rows.append(f"| {d} | {data['train_pairs'].get(d, 0)} ({tp.get(d, '–')}) | "
                        f"{data['eval_pairs'].get(d, 0)} ({ep.get(d, '–')}) |")
    status = ["| system | status | seeds |", "|---|---|---|"]
    for s, v in res["systems"].items():
        why = f": {v['reason']}" if v.get("reason") else ""
        status.append(f"| {s} | {v['status']}{why} | {', '.join(map(str, v['seeds'])) or '–'} |")
    out = [
        f"# moerm bench: {res['name']}", "",
        f"{res['date']}; backbone `{b['backbone']}`, max_length {b['max_length']}, seeds {', '.join(map(str, b['seeds']))}; "
        f"{env['device']}, torch threads: {env['threads']}, torch {env['torch']}{_load(env)}.",
    ]
    if res.get("command"):
        out += ["", f"Command: `{res['command']}`"]
    if res.get("wall"):
        out += ["", wall_markdown(res)]
    out += ["", "## Systems", "", *status]
    if b.get("ensemble_members_from") and "ensemble" in res["systems"]:
        out += ["", f"The ensemble trains no members of its own: the ensemble of seed s combines the finished "
                f"`{b['ensemble_members_from']}` cells of "
                f"{ensemble_members(b.get('per_system') or {})} "
                "consecutive seeds from s on "
                "(cyclic), so their training is counted once, in those cells; its train seconds are theirs."]
    if res["failed"]:
        out += ["", "Failed cells (rerun the same command to retry them; the error is in the cell's error.txt):", ""]
        out += [f"- {k}: {v}" for k, v in res["failed"].items()]
    out += ["", "## Data", "", *dom_rows]
    if data.get("eval_sample"):
        out += ["", f"Held-out sample: {data['eval_sample']}. Prompts: distinct prompt keys (the first human turn, "
                "the article, the context or the question), the clusters the intervals resample."]
    if data.get("notes"):
        out += ["", *[f"- {n}" for n in data["notes"]]]
    if data.get("source", {}).get("train"):
        out += ["", f"Training data: {', '.join(data['source']['train'])}; held-out: "
                f"{', '.join(data['source'].get('eval') or [])}."]
    out += ["", "### Data plans", "", plans_markdown(res)]
    if res.get("targets"):
        out += ["", "## Targets", "", targets_markdown(res)]
    out += ["", "## Accuracy per domain", "", accuracy_markdown(res),
            "", "## Accuracy per subset", "", subsets_markdown(res),
            "", "## Size and training cost", "", size_markdown(res),
            "", "## Inference", "", inference_markdown(res),
            "", "## Routing", "", routing_markdown(res),
            "", "## Expert utilisation", "", utilisation_markdown(res),
            "", "## Accuracy per route", "", routes_markdown(res),
            "", "## Capability accuracy", "", capabilities_markdown(res)]
    if res.get("best_of_n"):
        out += ["", "## Best-of-N against human gold", "", best_of_n_markdown(res)]
    out += ["", "## Plots", ""]
    out += [f"- {desc}: ![{name}](plots/{name}.png)" for name, desc in PLOTS.items()]
    if res.get("plots", {}).get("best_of_n"):
        out += ["- Best-of-N: the pick's human gold against N, and its proxy reward: ![best_of_n](plots/best_of_n.png)"]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ plots

def _figure(width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display, Agg when saved as PNG

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig, fig.subplots()


def plot_accuracy_per_domain(res: dict[str, Any], path: Path) -> None:
    systems = list(res["accuracy"])
    groups = res["domains"] + ["average"]
    fig, ax = _figure(max(6.0, 1.0 + 0.5 * len(groups) * max(1, len(systems)) * 0.35), 4.2)
    width = 0.8 / max(1, len(systems))
    for i, s in enumerate(systems):
        acc = res["accuracy"][s]
        vals = [acc["per_domain"].get(d) for d in res["domains"]] + [acc["average"]]
        xs = [g + (i - (len(systems) - 1) / 2) * width for g in range(len(groups))]
        ys = [100 * v["mean"] if v else math.nan for v in vals]
        err = [100 * v["std"] if v else 0.0 for v in vals]
        ax.bar(xs, ys, width, yerr=err, label=s, capsize=2)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel("pairwise accuracy (%)")
    ax.set_ylim(0, 100)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_title(f"Accuracy per domain ({res['name']})")
    ax.legend(fontsize=8, ncols=min(len(systems), 6), loc="lower center", bbox_to_anchor=(0.5, 1.08))
    fig.savefig(path)


def plot_accuracy_vs_params(res: dict[str, Any], path: Path) -> None:
    fig, ax = _figure(6.0, 4.2)
    for s, acc in res["accuracy"].items():
        p = res["sizes"][s]["params_total"]
        ax.errorbar([p], [100 * acc["average"]["mean"]], yerr=[100 * acc["average"]["std"]], fmt="o", capsize=3, label=s)
        ax.annotate(s, (p, 100 * acc["average"]["mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("total parameters (log scale)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title("Accuracy against size")
    fig.savefig(path)


def plot_pairs_per_second(res: dict[str, Any], path: Path) -> None:
    rows = (res["inference"] or {}).get("rows", {})
    fig, ax = _figure(max(5.0, 1.0 + 0.8 * len(rows)), 4.0)
    names = list(rows)
    ax.bar(range(len(names)), [rows[n]["pairs_per_second"] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("pairs per second")
    ax.set_title("Inference throughput (same batch)")
    fig.savefig(path)


def write_report(out: Path, res: dict[str, Any]) -> dict[str, Any]:
    """results.json, report.md and plots/*.png into OUT; returns their paths."""
    out = Path(out)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = {}
    if res["accuracy"]:
        for name, fn in (("accuracy_per_domain", plot_accuracy_per_domain), ("accuracy_vs_params", plot_accuracy_vs_params),
                         ("pairs_per_second", plot_pairs_per_second)):
            fn(res, plots / f"{name}.png")
            written[name] = f"plots/{name}.png"  # relative to OUT, like every path in results.json
        bon_plot = write_best_of_n_plot(res, plots)
        if bon_plot:
            written["best_of_n"] = bon_plot
    res["plots"] = written
    atomic_write_text(out / "results.json", json.dumps(res, indent=2, default=str))
    atomic_write_text(out / "report.md", report_markdown(res))
    return {"report": out / "report.md", "results_json": out / "results.json", "plots": written}
