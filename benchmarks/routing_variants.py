"""Routing that loses less (issue 12 section 3). On one trained RODOS run, with its domain RMs fixed: router variants
(prompt length; router tuning, a router on the trunk states among them) x routing modes (hard top-1, soft top-k mix,
confidence-gated) x out-of-distribution detectors, with in-domain and left-out domains side by side.

    .venv/bin/python benchmarks/routing_variants.py runs/demo/rodos --data examples/data \\
        --left-out ../shared/data/rmbench_chat --left-out ../shared/data/rmbench_code \\
        --left-out ../shared/data/rmbench_safety --left-out ../shared/data/hellaswag \\
        --left-out ../shared/data/hh_helpful --lengths 32,256 --tunings frozen --baseline runs/demo/baseline \\
        --out runs/routing-variants.json

Every domain RM scores every held-out reply once (in-domain and left-out pairs); a variant then only routes, so
each router variant costs one router training and one router pass. Rewards come from the systems' own
`decide_routes` and `combine_rewards`, so a row here is what `moerm eval` gives for that setting (tested).

OOD thresholds are calibrated as the system calibrates them (the `ood_quantile` of held-out in-domain prompts),
cross-fitted so no prompt is scored against a threshold it helped set: in-domain prompts are split in two folds by
a hash of the prompt, each fold flagged with the other fold's threshold; left-out prompts with the threshold of all
in-domain prompts. Columns: router accuracy (held-out in-domain prompts to their own domain), macro pairwise
accuracy (mean over domains), fallback rate, and the load (domain-RM passes per input: 1 for top-1, k for a k-way
mix, every RM for a mixture fallback).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shlex
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch

from moerm.data.readers import load_pairs
from moerm.data.schema import PreferencePair
from moerm.systems import load_system
from moerm.systems.base import FitContext
from moerm.systems.rodos import GENERAL
from moerm.systems.routing import (
    OODCheck, OODDetector, Route, Router, combine_rewards, decide_routes, rm_passes,
)


def macro(correct: Sequence[bool], domains: Sequence[str]) -> tuple[float, dict[str, float]]:
    per: dict[str, list[bool]] = defaultdict(list)
    for ok, d in zip(correct, domains):
        per[d].append(ok)
    accs = {d: sum(v) / len(v) for d, v in sorted(per.items())}
    return (sum(accs.values()) / len(accs) if accs else float("nan")), accs


def cap(pairs: list[PreferencePair], n: int | None) -> list[PreferencePair]:
    """At most n pairs per domain, in file order."""
    if not n:
        return pairs
    seen: dict[str, int] = defaultdict(int)
    out = []
    for p in pairs:
        if seen[p.domain] < n:
            seen[p.domain] += 1
            out.append(p)
    return out


def score_matrix(system: Any, pairs: Sequence[PreferencePair], batch_size: int) -> dict[str, torch.Tensor]:
    """Per domain RM (and `general` when the run has one), its rewards (2N,): chosen replies, then rejected."""
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    if not pairs:
        return {}
    routes = {d: d for d in system.rms}  # each route's rewards on the common scale, as the system mixes them
    if system.general is not None:
        routes["__general__"] = GENERAL
    return {key: system.route_rewards(route, prompts, responses, batch_size) for key, route in routes.items()}


def one_rm_scores(system: Any, pairs: Sequence[PreferencePair], batch_size: int) -> dict[str, torch.Tensor]:
    """A single-RM system's rewards (2N,) under the key "baseline"."""
    if not pairs:
        return {}
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return {"baseline": torch.tensor(system.score(prompts, responses, batch_size=batch_size).rewards)}


def evaluate(routes: list[Route], scores: dict[str, torch.Tensor], pairs: Sequence[PreferencePair]) -> dict[str, Any]:
    """Pairwise accuracy of the routed rewards; a pair's chosen and rejected reply share its prompt's route."""
    n = len(pairs)
    if n == 0:
        return {}
    general = scores.get("__general__")
    rewards = combine_rewards(routes + routes, lambda d, rows: scores[d][torch.tensor(rows)], 2 * n,
                              (lambda rows: general[torch.tensor(rows)]) if general is not None else None)
    correct = (rewards[:n] > rewards[n:]).tolist()
    m, per = macro(correct, [p.domain for p in pairs])
    return {"macro_accuracy": m, "accuracy": sum(correct) / n, "per_domain": per,
            "fallback_rate": sum(r.source == "fallback" for r in routes) / n, "load": rm_passes(routes)}


def folds(prompts: Sequence[str]) -> torch.Tensor:
    """(N,) fold 0 or 1 by a hash of the prompt: the same prompt is always in the same fold."""
    return torch.tensor([zlib.crc32(p.encode()) % 2 for p in prompts])


def ood_checks(detector: OODDetector, quantile: float, inside: tuple[torch.Tensor, torch.Tensor], fold: torch.Tensor,
               outside: tuple[torch.Tensor, torch.Tensor]) -> tuple[OODCheck, OODCheck, dict[str, Any]]:
    """Cross-fitted verdicts for the in-domain prompts, the all-in-domain threshold's for the left-out ones."""
    s_in = detector.scores(inside[1], inside[0])
    flags = torch.zeros(len(s_in), dtype=torch.bool)
    thresholds = []
    for f in (0, 1):
        other = s_in[fold != f]
        if len(other) == 0:  # one fold empty (a handful of prompts): calibrate on all of them
            other = s_in
        detector.calibrate(other, quantile, "held-out prompts (other fold)")
        thresholds.append(detector.threshold)
        flags[fold == f] = s_in[fold == f] > detector.threshold
    detector.calibrate(s_in, quantile, "held-out prompts")
    s_out = detector.scores(outside[1], outside[0]) if len(outside[0]) else torch.empty(0)
    info = {"threshold": detector.threshold, "fold_thresholds": thresholds}
    return (OODCheck(detector.kind, s_in, flags, float("nan")),
            OODCheck(detector.kind, s_out, s_out > detector.threshold, detector.threshold), info)


def train_router(system: Any, length: int, tuning: str, seed: int, tmp: Path, epochs: float | None = None
                 ) -> tuple[Router, float, torch.Tensor]:
    """A router retrained on the run's own router prompts (`epochs`: its training epochs, default the run's); returns
    it, its training seconds and the training prompts' features (a frozen or trunk router's: the ones it read)."""
    opts = dataclasses.replace(system.opts, router_max_length=length, router_tuning=tuning, ood="none",
                               routing="hard", min_confidence=0.0,
                               router_layer=system.opts.router_layer if tuning == "frozen" else None)
    torch.manual_seed(seed)
    router = Router(system.config, opts, system.domains)
    ctx = FitContext(tmp, progress=False)
    t0 = time.perf_counter()
    train_cfg = system.train_config("router")
    router.fit(system.router_examples, tmp, ctx,
               train_cfg if epochs is None else dataclasses.replace(train_cfg, epochs=epochs))
    seconds = time.perf_counter() - t0
    prompts = [p for p, _ in system.router_examples]
    feats = (router._features(system.router_examples, ctx, "features (router)").features
             if tuning in ("frozen", "trunk") else router.outputs(prompts)[1])
    return router, seconds, feats


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a RODOS run (or model) folder")
    ap.add_argument("--data", action="append", required=True, help="in-domain held-out pairs (test* files in folders)")
    ap.add_argument("--left-out", action="append", default=[], help="pairs of domains the run was not trained on")
    ap.add_argument("--lengths", default="32,256", help="router prompt lengths (tokens) to retrain routers with")
    ap.add_argument("--tunings", default="frozen", help="router tunings: frozen, lora, full, trunk (a classifier on "
                    "the prompt's mean states at the output of the frozen trunk: options.router_tuning=trunk)")
    ap.add_argument("--router-epochs", default="", help="comma-separated router training epochs to retrain with "
                    "(default: the run's own components.router.train.epochs)")
    ap.add_argument("--modes", default="hard,soft,gated")
    ap.add_argument("--top-k", type=int, default=2, help="soft/gated: domain RMs in the mix (0: all)")
    ap.add_argument("--min-confidence", type=float, default=0.6, help="gated: top-1 at or above this probability")
    ap.add_argument("--ood", default="none,entropy,knn,mahalanobis", help="OOD detectors (none: no detector)")
    ap.add_argument("--ood-quantile", type=float, default=0.05, help="share of in-domain prompts each threshold flags")
    ap.add_argument("--max-pairs-per-domain", type=int, default=None)
    ap.add_argument("--baseline", help="a baseline run to score on the same pairs, for reference")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write every figure as JSON here")
    args = ap.parse_args(argv)
    command = "python benchmarks/routing_variants.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print("command:", command)

    system = load_system(args.run)
    if system.name != "rodos":
        raise SystemExit(f"{args.run} holds a {system.name} system; this script varies a RODOS run's routing")
    domains = system.domains
    test, _ = load_pairs(args.data, split="test")
    dropped = sorted({p.domain for p in test} - set(domains))
    inside = cap([p for p in test if p.domain in domains], args.max_pairs_per_domain)
    outside: list[PreferencePair] = []
    if args.left_out:
        left, _ = load_pairs(args.left_out, split="test")
        clash = sorted({p.domain for p in left} & set(domains))
        if clash:
            raise SystemExit(f"--left-out domains {clash} have domain RMs in this run: they are not left out")
        outside = cap(left, args.max_pairs_per_domain)
    if not inside:
        raise SystemExit(f"no held-out pairs of the run's domains ({', '.join(domains)}) in {args.data}")

    t0 = time.perf_counter()
    s_in, s_out = score_matrix(system, inside, args.batch_size), score_matrix(system, outside, args.batch_size)
    scoring_seconds = time.perf_counter() - t0
    result: dict[str, Any] = {"command": command, "domains": domains, "dropped_domains": dropped,
                              "pairs": {"in_domain": len(inside), "left_out": len(outside)},
                              "left_out_domains": sorted({p.domain for p in outside}),
                              "rm_scoring_seconds": scoring_seconds, "rows": []}
    # References that need no router: each pair's own domain RM (in-domain), and every domain RM equally weighted.
    oracle = [Route(p.domain, {}, "given", weights={p.domain: 1.0}) for p in inside]
    result["oracle_domain"] = evaluate(oracle, s_in, inside)
    uniform = {d: 1.0 / len(domains) for d in domains}
    result["uniform_mixture"] = {"in_domain": evaluate([Route(None, {}, "fallback", weights=uniform)] * len(inside),
                                                       s_in, inside),
                                 "left_out": evaluate([Route(None, {}, "fallback", weights=uniform)] * len(outside),
                                                      s_out, outside)}
    if args.baseline:
        base = load_system(args.baseline)
        b_in, b_out = one_rm_scores(base, inside, args.batch_size), one_rm_scores(base, outside, args.batch_size)
        one = [Route("baseline", {}, "given", weights={"baseline": 1.0})]
        result["baseline"] = {"in_domain": evaluate(one * len(inside), b_in, inside),
                              "left_out": evaluate(one * len(outside), b_out, outside)}

    p_in, p_out = [p.prompt for p in inside], [p.prompt for p in outside]
    fold = folds(p_in)
    index = {d: i for i, d in enumerate(domains)}
    labels = torch.tensor([index[d] for _, d in system.router_examples])
    modes = args.modes.split(",")
    kinds = args.ood.split(",")
    epochs_list: list[float | None] = [float(x) for x in args.router_epochs.split(",") if x] or [None]
    for tuning, length, epochs in itertools.product(args.tunings.split(","), (int(x) for x in args.lengths.split(",")),
                                                    epochs_list):
        with tempfile.TemporaryDirectory() as tmp:
            router, seconds, train_feats = train_router(system, length, tuning, args.seed, Path(tmp), epochs)
        out_in = router.outputs(p_in, args.batch_size)
        out_out = router.outputs(p_out, args.batch_size) if p_out else (torch.empty(0, len(domains)),
                                                                         torch.empty(0, train_feats.shape[-1]))
        router_acc = sum(domains[int(j)] == p.domain for j, p in zip(out_in[0].argmax(-1), inside)) / len(inside)
        routed_to = defaultdict(lambda: defaultdict(int))
        for j, p in zip(out_out[0].argmax(-1), outside):
            routed_to[p.domain][domains[int(j)]] += 1
        checks: dict[str, tuple[OODCheck | None, OODCheck | None, dict[str, Any]]] = {"none": (None, None, {})}
        for kind in kinds:
            if kind != "none":
                detector = OODDetector.fit(kind, train_feats, labels, len(domains))
                checks[kind] = ood_checks(detector, args.ood_quantile, out_in, fold, out_out)
        for mode in modes:
            opts = dataclasses.replace(system.opts, routing=mode, routing_top_k=args.top_k, ood="none",
                                       min_confidence=args.min_confidence if mode == "gated" else 0.0)
            for kind in kinds:
                c_in, c_out, info = checks[kind]
                row = {"router_tuning": tuning, "router_max_length": length, "routing": mode, "ood": kind,
                       "top_k": args.top_k if mode != "hard" else 1,
                       "min_confidence": opts.min_confidence, "router_accuracy": router_acc,
                       "router_epochs": epochs if epochs is not None else system.train_config("router").epochs,
                       "router_train_seconds": seconds, **({"ood_threshold": info} if info else {}),
                       "in_domain": evaluate(decide_routes(out_in[0], domains, None, opts, c_in), s_in, inside),
                       "left_out": evaluate(decide_routes(out_out[0], domains, None, opts, c_out), s_out, outside),
                       "left_out_routed_to": {d: dict(v) for d, v in sorted(routed_to.items())}}
                result["rows"].append(row)
    print_tables(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}"


def print_tables(result: dict[str, Any]) -> None:
    r = result
    print(f"\n{r['pairs']['in_domain']} in-domain pairs ({', '.join(r['domains'])}), {r['pairs']['left_out']} left-out "
          f"pairs ({', '.join(r['left_out_domains']) or 'none'}); domain RMs scored every reply in "
          f"{r['rm_scoring_seconds']:.0f} s")
    print(f"oracle domain (each pair's own domain RM): {_pct(r['oracle_domain']['macro_accuracy'])}% macro")
    u = r["uniform_mixture"]
    print(f"every domain RM, equally weighted: {_pct(u['in_domain'].get('macro_accuracy'))}% in-domain, "
          f"{_pct(u['left_out'].get('macro_accuracy'))}% left-out macro")
    if "baseline" in r:
        b = r["baseline"]
        print(f"baseline: {_pct(b['in_domain'].get('macro_accuracy'))}% in-domain, "
              f"{_pct(b['left_out'].get('macro_accuracy'))}% left-out macro")
    print("\n| router | routing | ood | router acc. (%) | in-domain macro (%) | in-domain fallback (%) | in-domain load "
          "| left-out macro (%) | left-out fallback (%) | left-out load |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in r["rows"]:
        i, o = row["in_domain"], row["left_out"]
        mode = row["routing"] + (f" k={row['top_k']}" if row["routing"] != "hard" else "")
        mode += f" p>={row['min_confidence']}" if row["routing"] == "gated" else ""
        right = (f"{_pct(o['macro_accuracy'])} | {_pct(o['fallback_rate'])} | {o['load']:.2f} |" if o
                 else "- | - | - |")
        print(f"| {row['router_tuning']} {row['router_max_length']}, {row['router_epochs']:g} ep | {mode} | {row['ood']} | "
              f"{_pct(row['router_accuracy'])} | {_pct(i['macro_accuracy'])} | {_pct(i['fallback_rate'])} | "
              f"{i['load']:.2f} | " + right)


if __name__ == "__main__":
    main()
