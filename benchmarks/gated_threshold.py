"""Gated routing's price in RM passes against what it buys in accuracy, per confidence threshold (issue 27 item 5).

    .venv/bin/python benchmarks/gated_threshold.py RUN/rodos --data examples/data --thresholds 0.4,0.5,0.6,0.7

Gated routing (`options.routing=gated`) scores an input with its top-1 domain RM when the router's top probability
is at least `options.min_confidence`, else with the probability-weighted mix of the top `routing_top_k` RMs: each
mixed input costs one RM pass per mixed domain. Its speed against hard routing is therefore bounded by
1 / (RM passes per input), before any router or padding cost; the throughput benchmark's gated row (0.70-0.76x the
baseline at threshold 0.6, where its router mixes 32% of inputs) sits at that bound. This script counts, not times:
for each threshold, on every held-out pair of `--data` and the run's own router,

    mixed       the share of scored texts routed to more than one RM
    passes      RM passes per scored text (1 for hard routing)
    bound       1 / passes: the most gated routing can keep of hard routing's pairs/s
    accuracy    macro over domains, 95% interval resampling prompts within each domain
    vs hard     the paired difference from hard routing on the same pairs (same RMs, same router), 95% interval

Each (route, reply) is scored once and shared by every threshold (`RODOSSystem.reusing_route_rewards`). The
thresholds are read on the held-out pairs, so a row is a description of the trade, not a tuned choice: a run picks
its threshold on its prompt-disjoint held-back slice with `options.tune_confidence`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_ablation import correct_of  # noqa: E402  (the routing benchmarks' one pair-correct rule)

from moerm.cpu_memory import keep_cpu_memory  # noqa: E402
from moerm.data.grouping import pair_keys  # noqa: E402
from moerm.data.readers import load_pairs  # noqa: E402
from moerm.encoding.trunk import trunk_cache_at_inference  # noqa: E402
from moerm.eval.intervals import accuracy_intervals, paired_differences  # noqa: E402
from moerm.systems import load_system  # noqa: E402
from moerm.systems.routing import rm_passes  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rodos", help="a saved RODOS (run folder or model folder)")
    ap.add_argument("--data", action="append", required=True, help="held-out pairs (file or folder; repeatable)")
    ap.add_argument("--split", default="test", help="which split of a data folder (default: test)")
    ap.add_argument("--thresholds", default="0.4,0.5,0.6,0.7,0.8", help="gated confidence thresholds to count")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    command = "python benchmarks/gated_threshold.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    if not thresholds or any(not 0 < t <= 1 for t in thresholds):
        sys.exit(f"error: --thresholds: each must be in (0, 1]; got {args.thresholds!r}")
    torch.manual_seed(0)
    keep_cpu_memory()

    rodos = load_system(args.rodos)
    if getattr(rodos, "name", None) != "rodos":
        sys.exit(f"error: {args.rodos}: not a RODOS run (system {getattr(rodos, 'name', '?')!r})")
    pairs, _ = load_pairs(args.data, split=args.split)
    if not pairs:
        sys.exit(f"error: no {args.split} pairs in {', '.join(args.data)}")
    keys, domains, n = pair_keys(pairs), [p.domain for p in pairs], len(pairs)
    prompts = [p.prompt for p in pairs] * 2  # the texts `correct_of` scores: both replies of each pair

    saved = (rodos.opts.routing, rodos.opts.min_confidence)
    rows: dict[str, dict[str, Any]] = {}
    correct: dict[str, list[int]] = {}
    with ExitStack() as stack:
        stack.enter_context(rodos.reusing_route_rewards())  # every threshold reads the same (route, reply) rewards
        stack.enter_context(trunk_cache_at_inference(rodos))
        for name, routing, floor in [("hard", "hard", 0.0), *((f"gated {t:g}", "gated", t) for t in thresholds)]:
            rodos.opts.routing, rodos.opts.min_confidence = routing, floor
            correct[name] = correct_of(rodos.score, pairs, None, args.batch_size)
            routes = rodos.router.routes(prompts, None, args.batch_size)  # the routes `score` just took
            rows[name] = {"routing": routing, "min_confidence": floor,
                          "mixed": sum(not r.general and len(r.weights) > 1 for r in routes) / len(routes),
                          "passes_per_text": rm_passes(routes)}
            rows[name]["bound_vs_hard"] = 1 / rows[name]["passes_per_text"]
            print(f"{name}: done", file=sys.stderr)
    rodos.opts.routing, rodos.opts.min_confidence = saved

    for name, row in rows.items():
        acc = accuracy_intervals(correct[name], keys, domains)["macro"]
        row["macro"] = acc.to_dict()
        if name != "hard":
            row["vs_hard"] = paired_differences(correct[name], correct["hard"], keys, domains)["macro"].to_dict()
    results = {"command": command, "pairs": n, "prompts": len(set(keys)), "domains": len(set(domains)),
               "top_k": rodos.opts.routing_top_k, "load_average": list(os.getloadavg()), "rows": rows}

    print(f"command: {command}")
    print(f"{n} held-out pairs ({2 * n} texts), {len(set(keys))} prompts, {len(set(domains))} domains; gated mixes "
          f"the top {rodos.opts.routing_top_k or 'all'} below the threshold\n")
    print("| routing | mixed | RM passes per text | bound vs hard (1 / passes) | macro [95%] | vs hard [95% paired] |")
    print("|---|---:|---:|---:|---|---|")
    for name, row in rows.items():
        m = row["macro"]
        vs = row.get("vs_hard")
        cell = "" if vs is None else f"{100 * vs['point']:+.1f} [{100 * vs['low']:+.1f}, {100 * vs['high']:+.1f}]"
        print(f"| {name} | {row['mixed']:.1%} | {row['passes_per_text']:.2f} | {row['bound_vs_hard']:.2f}x | "
              f"{m['point']:.1%} [{m['low']:.1%}, {m['high']:.1%}] | {cell} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"\nwritten: {args.out}")
    return results


if __name__ == "__main__":
    main()
