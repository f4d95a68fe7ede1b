"""Routing that loses less (issue 23 item 4): on one trained RODOS run, with every trained RM fixed, each way of
routing a prompt, against the baseline on the same held-out pairs, with paired intervals that resample prompts.

    .venv/bin/python benchmarks/routing_ablation.py RUN/rodos/seed-0/model RUN/baseline/seed-0/model \\
        --data RUN/data/test.jsonl.gz --domains hh_helpful,hh_harmless,hellaswag,oasst1_en,webgpt,summeval,...

The RODOS run must have its general RM (`options.fallback=general`); `options.select_routes` and
`options.tune_confidence` at training time give the per-domain selection and the confidence threshold, both chosen
on the prompt-disjoint slice held back from training (never on these pairs). Variants, all through the system's own
`score` (so a row is what `moerm eval` gives for that setting), each with its own router:

    hard                  the paper's top-1 domain RM (options.routing=hard, min_confidence 0)
    hard+general          top-1 above the tuned confidence threshold, the general RM below it
    gated                 top-1 above the tuned threshold, the top-2 mix below it
    selection             hard, the domains where the general RM beat the domain RM on the held-back slice, by the
                          evidence rule (`moerm.systems.routing.selection`), served by it
    selection+general     both
    selection+gated       both
    general               every prompt to the general RM (one RM trained on every domain, 90% of the pairs)
    oracle                each pair's domain given, top-1 (the domain RMs alone, no router)
    oracle+selection      each pair's domain given, the selected routes served by the general RM (the conflict
                          suite's setting in the bench)

With `--reselect`, the selection is chosen again under this release's rule, and each selection variant also runs
with the selection saved at training time (`...-as-trained`), on the same rewards.

Each (route, reply) is scored once and shared by every variant (`RODOSSystem.reusing_route_rewards`), so the ablation
costs about what one `moerm eval` with the top-2 mix costs. Accuracies are macro over `--domains`, paired with the
baseline (a separate run trained on every pair) by a clustered bootstrap over prompts within each domain; per
domain, a variant is flagged `worse` when its paired interval against the baseline lies below 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from moerm.data.grouping import pair_keys
from moerm.data.readers import load_pairs
from moerm.data.schema import PreferencePair
from moerm.encoding.trunk import trunk_cache_at_inference
from moerm.eval.intervals import accuracy_intervals, paired_differences
from moerm.runs import load_run_data
from moerm.systems import load_system
from moerm.systems.calibration import hold_back

# variant -> (routing, use the tuned threshold, route selection on, every prompt to the general RM, domain given)
VARIANTS: dict[str, tuple[str, bool, bool, bool, bool]] = {
    "hard": ("hard", False, False, False, False),
    "hard+general": ("hard", True, False, False, False),
    "gated": ("gated", True, False, False, False),
    "selection": ("hard", False, True, False, False),
    "selection+general": ("hard", True, True, False, False),
    "selection+gated": ("gated", True, True, False, False),
    "general": ("hard", False, False, True, False),
    "oracle": ("hard", False, False, False, True),
    "oracle+selection": ("hard", False, True, False, True),
}
GATED_DEFAULT = 0.6  # gated needs a threshold > 0: RODOS's default when the tuned one is 0


def correct_of(score: Callable[..., Any], pairs: Sequence[PreferencePair], domains: list[str] | None,
               batch_size: int) -> list[int]:
    """1 where the chosen reply gets the higher reward, per pair."""
    n = len(pairs)
    out = score([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                domains * 2 if domains is not None else None, batch_size=batch_size)
    r = out.rewards
    return [int(r[i] > r[n + i]) for i in range(n)]


def reselect(rodos: Any) -> dict[str, Any]:
    """The route selection under this release's rule, on the held-back slice rebuilt as `fit` built it: the run's
    training pairs (its config's data files, caps and seed), split by prompt with its calibration share."""
    train, _, _ = load_run_data(rodos.config)
    train, reference = hold_back(train, "zscore", rodos.opts.calibration_share, rodos.config.train.seed)
    for d, saved in rodos.selection.items():
        if len(reference.get(d, [])) != saved.get("pairs"):
            sys.exit(f"error: {d}: the run's training data now gives {len(reference.get(d, []))} held-back pairs, "
                     f"the run held back {saved.get('pairs')}: the data changed since training")
    rodos.select_routes(reference, train)
    return dict(rodos.selection)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rodos", help="a saved RODOS trained with options.fallback=general")
    ap.add_argument("baseline", help="a saved single-RM system to compare with")
    ap.add_argument("--data", action="append", required=True, help="held-out pairs (file or folder; repeatable)")
    ap.add_argument("--domains", default=None, help="comma-separated domains to evaluate (default: all in --data)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--reselect", action="store_true",
                    help="choose the route selection again with this release's evidence rule (options."
                         "select_min_prompts, options.select_level) on the run's held-back slice, rebuilt from its "
                         "training data and seed; the selection saved at training time stays as the variants "
                         "'...selection-as-trained...'")
    args = ap.parse_args()
    command = "python benchmarks/routing_ablation.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    torch.manual_seed(0)

    rodos = load_system(args.rodos)
    baseline = load_system(args.baseline)
    if getattr(rodos, "general", None) is None:
        sys.exit(f"error: {args.rodos}: this RODOS has no general RM (train it with options.fallback=general)")
    pairs, _ = load_pairs(args.data)
    if args.domains:
        keep = set(args.domains.split(","))
        missing = keep - {p.domain for p in pairs}
        if missing:
            sys.exit(f"error: --domains: no held-out pairs for {', '.join(sorted(missing))}")
        pairs = [p for p in pairs if p.domain in keep]
    keys = pair_keys(pairs)
    domains = [p.domain for p in pairs]

    tuned = float(rodos.tuned.get("min_confidence", 0.0)) if rodos.tuned else 0.0
    selection = dict(rodos.selection)
    variants = dict(VARIANTS)
    correct: dict[str, list[int]] = {}
    with ExitStack() as stack:
        stack.enter_context(rodos.reusing_route_rewards())  # every variant reads the same (route, reply) rewards
        stack.enter_context(trunk_cache_at_inference(rodos))
        stack.enter_context(trunk_cache_at_inference(baseline))
        as_trained = selection
        if args.reselect:
            selection = reselect(rodos)
        selections = {name: selection for name in variants}
        if args.reselect:  # each selection variant also with the selection saved at training time
            for name in [n for n, v in VARIANTS.items() if v[2]]:
                alias = name.replace("selection", "selection-as-trained")
                variants[alias], selections[alias] = VARIANTS[name], as_trained
        correct["baseline"] = correct_of(baseline.score, pairs, None, args.batch_size)
        for name, (routing, use_tuned, select, general_only, given) in variants.items():
            floor = tuned if use_tuned else 0.0
            if routing == "gated" and floor <= 0:
                floor = GATED_DEFAULT
            rodos.opts.routing, rodos.opts.min_confidence = routing, floor
            rodos.selection = selections[name] if select else {}
            if general_only:  # every domain served by the general RM: selection that chose it everywhere
                rodos.selection = {d: {"served_by": "general"} for d in rodos.domains}
            correct[name] = correct_of(rodos.score, pairs, domains if given else None, args.batch_size)
            print(f"{name}: done", file=sys.stderr)

    results: dict[str, Any] = {"command": command, "pairs": len(pairs), "prompts": len(set(keys)),
                               "tuned_min_confidence": tuned,
                               "served_by_general": sorted(d for d, s in selection.items()
                                                           if s.get("served_by") == "general"),
                               "selection": selection,
                               **({"served_by_general_as_trained": sorted(
                                   d for d, s in selections["selection-as-trained"].items()
                                   if s.get("served_by") == "general")} if args.reselect else {}),
                               "load_average": list(os.getloadavg()), "variants": {}}
    per_domain_rows = []
    for name, c in correct.items():
        acc = accuracy_intervals(c, keys, domains)
        row: dict[str, Any] = {"macro": acc["macro"].to_dict(),
                               "per_domain": {d: i.to_dict() for d, i in acc["per_domain"].items()}}
        if name != "baseline":
            diff = paired_differences(c, correct["baseline"], keys, domains)
            row["vs_baseline"] = {"macro": diff["macro"].to_dict(),
                                  "per_domain": {d: i.to_dict() for d, i in diff["per_domain"].items()}}
            row["worse_domains"] = sorted(d for d, i in diff["per_domain"].items() if i.high < 0)
        results["variants"][name] = row
        per_domain_rows.append((name, acc, row))

    print(f"command: {command}")
    print(f"{len(pairs)} held-out pairs, {len(set(keys))} prompts, {len(set(domains))} domains; tuned "
          f"min_confidence {tuned}; served by the general RM after selection: "
          f"{', '.join(results['served_by_general']) or 'none'}\n")
    print("| variant | macro [95%] | vs baseline [95% paired] | verdict (> 0) | domains worse (interval < 0) |")
    print("|---|---|---|---|---|")
    for name, row in results["variants"].items():
        m = row["macro"]
        cell = f"{m['point']:.1%} [{m['low']:.1%}, {m['high']:.1%}]"
        if name == "baseline":
            print(f"| baseline | {cell} | | | |")
            continue
        v = row["vs_baseline"]["macro"]
        d = f"{100 * v['point']:+.1f} [{100 * v['low']:+.1f}, {100 * v['high']:+.1f}]"
        verdict = "met" if v["low"] > 0 else "missed" if v["high"] < 0 else "not resolved"
        print(f"| {name} | {cell} | {d} | {verdict} | {', '.join(row['worse_domains']) or 'none'} |")
    print("\nPer domain, accuracy (points vs baseline):\n")
    names = list(results["variants"])
    print("| domain | pairs | prompts | " + " | ".join(names) + " |")
    print("|---|---:|---:|" + "---:|" * len(names))
    for d in sorted(set(domains)):
        base = results["variants"]["baseline"]["per_domain"][d]
        cells = []
        for name in names:
            a = results["variants"][name]["per_domain"][d]["point"]
            cells.append(f"{a:.1%}" if name == "baseline" else
                         f"{a:.1%} ({100 * results['variants'][name]['vs_baseline']['per_domain'][d]['point']:+.1f})")
        print(f"| {d} | {base['pairs']} | {base['prompts']} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
