"""One saved RODOS run, its router retrained with other router options, every domain RM and calibration map kept:
the routed system's accuracy with each router on the same held-out pairs, paired intervals that resample prompts.

    .venv/bin/python benchmarks/router_swap.py runs/demo/rodos --data examples/data --set options.router_layer=1

Each `--set` (repeatable, comma-separated keys in one) gives one variant router, trained as the run trained its own
(its training prompts `router_examples`, its `components.router.train` settings, seed 0). Rows: the run's own router
and each variant, in the run's routing and in hard top-1, with router accuracy on the held-out prompts (each prompt
once) and macro pairwise accuracy; each variant against the run's own router, paired. Accuracy only: not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_ablation import correct_of  # noqa: E402  (the routing benchmarks' one pair-correct rule)

from moerm.config import parse_override  # noqa: E402
from moerm.data.grouping import pair_keys  # noqa: E402
from moerm.data.readers import load_pairs  # noqa: E402
from moerm.eval.intervals import accuracy_intervals, paired_differences  # noqa: E402
from moerm.systems import load_system  # noqa: E402
from moerm.systems.base import FitContext  # noqa: E402
from moerm.systems.routing import Router  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a saved RODOS run (or model) folder")
    ap.add_argument("--data", action="append", required=True, help="held-out pairs (test* files in folders)")
    ap.add_argument("--set", dest="variants", action="append", required=True,
                    help="router options of one variant, e.g. options.router_layer=1 (comma-separated for several)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    command = "python benchmarks/router_swap.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    system = load_system(args.run)
    if system.name != "rodos":
        sys.exit(f"error: {args.run} holds a {system.name} system; this script swaps a RODOS run's router")
    pairs, _ = load_pairs(args.data, split="test")
    pairs = [p for p in pairs if p.domain in system.domains]
    keys, domains = pair_keys(pairs), [p.domain for p in pairs]
    own_router, routing = system.router, system.opts.routing
    rows: dict[str, dict[str, Any]] = {}

    def measure(name: str, router: Router) -> None:
        system.router = router
        routed_right = router.accuracy([p.prompt for p in pairs], [p.domain for p in pairs]).to_dict()
        for mode in dict.fromkeys([routing, "hard"]):
            system.opts.routing = mode
            floor = system.opts.min_confidence
            if mode == "hard":
                system.opts.min_confidence = 0.0
            c = correct_of(system.score, pairs, None, 32)
            system.opts.min_confidence = floor
            rows[f"{name} ({mode})"] = {"correct": c, "router_accuracy": routed_right}
        system.opts.routing = routing

    with system.reusing_route_rewards():  # every router reads the same (route, reply) rewards
        measure("own router", own_router)
        for spec in args.variants:
            overrides = dict(parse_override(item) for item in spec.split(","))
            fields = {k.removeprefix("options."): v for k, v in overrides.items()}
            if "router_tuning" in fields and "router_layer" not in fields:
                fields["router_layer"] = "auto"  # the new tuning's own default, not the run's resolved layer
            opts = dataclasses.replace(system.opts, **fields)
            torch.manual_seed(0)
            router = Router(system.config, opts, system.domains)
            with tempfile.TemporaryDirectory() as tmp:
                router.fit(system.router_examples, Path(tmp), FitContext(Path(tmp), progress=False),
                           system.train_config("router"))
            measure(spec, router)

    out: dict[str, Any] = {"command": command, "pairs": len(pairs), "prompts": len(set(keys)),
                           "load_average": list(os.getloadavg()), "rows": {}}
    print(f"command: {command}\n{len(pairs)} held-out pairs, {len(set(keys))} prompts, "
          f"{len(set(domains))} domains\n")
    print("| router (routing) | router accuracy [95%] | macro [95%] | vs own router, same routing [95% paired] |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        acc = accuracy_intervals(row["correct"], keys, domains)["macro"]
        ra = row["router_accuracy"]
        mode = name.rsplit("(", 1)[1]
        ref = rows[f"own router ({mode}"]["correct"]
        diff = paired_differences(row["correct"], ref, keys, domains)["macro"] if not name.startswith("own") else None
        out["rows"][name] = {"macro": acc.to_dict(), "router_accuracy": ra,
                             **({"vs_own_router": diff.to_dict()} if diff else {})}
        d = f"{100 * diff.point:+.1f} [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]" if diff else ""
        print(f"| {name} | {ra['point']:.1%} [{ra['low']:.1%}, {ra['high']:.1%}] of {ra['prompts']} prompts | "
              f"{acc.point:.1%} [{acc.low:.1%}, {acc.high:.1%}] | {d} |")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
