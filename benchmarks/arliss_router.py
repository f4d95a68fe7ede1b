"""ARLISS's router, on one trained ARLISS run with its domain adapters fixed: the saved router against frozen routers
(`options.router_tuning=frozen`) reading the prompt's pretrained states after k blocks, for each k of `--layers`.

    .venv/bin/python benchmarks/arliss_router.py RUN/model --data TEST_PAIRS --domains hh_helpful,webgpt \\
        --layers 1,2,3,4,5 --out runs/arliss-router.json

Every domain adapter scores every held-out reply once (each pair's domain given; under `top` tuning from the trunk
cache, as `moerm bench` evaluates); a router then only routes (hard
top-1, or the run's own `options.routing`), so each row costs one router training (on the run's saved router
prompts, through the system's own `_train_frozen_router`) and one router pass. Columns: the blocks the router's
pass runs through, router accuracy (held-out prompts to their own domain), macro pairwise accuracy over `--domains`
(all test domains by default), and the router's training seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch

from moerm.data.readers import load_pairs
from moerm.data.schema import PreferencePair
from moerm.encoding.trunk import trunk_cache_at_inference
from moerm.encoding.blocks import transformer_blocks
from moerm.systems import load_system
from moerm.systems.arliss import ARLISSSystem
from moerm.systems.base import FitContext
from moerm.systems.routing import combine_rewards, decide_routes


def macro(correct: Sequence[bool], domains: Sequence[str]) -> float:
    per: dict[str, list[bool]] = defaultdict(list)
    for ok, d in zip(correct, domains):
        per[d].append(ok)
    return sum(sum(v) / len(v) for v in per.values()) / len(per) if per else float("nan")


def reward_table(system: ARLISSSystem, test: Sequence[PreferencePair], batch_size: int) -> dict[str, torch.Tensor]:
    """Per domain adapter, the rewards (2N,) of every held-out chosen then rejected reply."""
    prompts = [p.prompt for p in test] * 2
    replies = [p.chosen for p in test] + [p.rejected for p in test]
    with trunk_cache_at_inference(system):  # top tuning: the trunk once per reply, as the bench's evaluation does
        return {d: torch.tensor(system.score(prompts, replies, [d] * len(prompts), batch_size).rewards)
                for d in system.domains}


def evaluate(system: ARLISSSystem, test: Sequence[PreferencePair], table: dict[str, torch.Tensor],
             batch_size: int) -> dict[str, float]:
    """Route the held-out prompts with the system's current router; accuracy through the fixed domain adapters."""
    n = len(test)
    system._require().eval()
    with torch.no_grad():
        probs = system.router.probs([p.prompt for p in test], batch_size)  # (N, D)
    routes = decide_routes(probs, system.domains, None, system.opts)
    chosen = combine_rewards(routes, lambda d, rows: table[d][rows], n)
    rejected = combine_rewards(routes, lambda d, rows: table[d][[n + i for i in rows]], n)
    right = [r.domain == p.domain for r, p in zip(routes, test)]
    return {"router_accuracy": sum(right) / n,
            "macro_accuracy": macro([bool(c > r) for c, r in zip(chosen, rejected)], [p.domain for p in test])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a saved ARLISS model folder")
    ap.add_argument("--data", action="append", required=True, help="held-out pairs (file or folder; repeatable)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--domains", default=None, help="evaluate on these domains only (comma-separated)")
    ap.add_argument("--layers", default="1,2,3", help="frozen routers after these many blocks (comma-separated)")
    ap.add_argument("--router-epochs", type=float, default=10.0)
    ap.add_argument("--router-lr", type=float, default=1e-2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    command = "python benchmarks/arliss_router.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    torch.manual_seed(0)

    system = load_system(args.model)
    if not isinstance(system, ARLISSSystem):
        raise SystemExit(f"{args.model} is a {system.name} model; this benchmark takes an ARLISS one")
    test, _ = load_pairs(args.data, split=args.split)
    keep = set(args.domains.split(",")) if args.domains else set(system.domains)
    test = [p for p in test if p.domain in keep and p.domain in system.domains]
    if not test:
        raise SystemExit("no held-out pairs of the system's domains")
    _, blocks = transformer_blocks(system.model.peft)

    t0 = time.perf_counter()
    table = reward_table(system, test, args.batch_size)
    print(f"{len(test)} held-out pairs, {len(system.domains)} domain adapters: rewards in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    given = macro([bool(table[p.domain][i] > table[p.domain][len(test) + i]) for i, p in enumerate(test)],
                  [p.domain for p in test])
    rows: list[dict[str, Any]] = [{"router": f"saved ({system.opts.router_tuning})",
                                   "blocks": len(blocks) if system.opts.router_tuning == "lora"
                                   else system.opts.router_layer, **evaluate(system, test, table, args.batch_size),
                                   "train_seconds": None}]
    system.opts.router_tuning = "frozen"
    system.config = dataclasses.replace(system.config, components={
        **system.config.components, "router": {"train": {"epochs": args.router_epochs, "lr": args.router_lr}}})
    for k in (int(x) for x in args.layers.split(",")):
        system.opts.router_layer = k
        with tempfile.TemporaryDirectory() as tmp:
            fit = system._train_router(FitContext(Path(tmp), progress=False), None)  # frozen now: a new head
        rows.append({"router": "frozen", "blocks": k, **evaluate(system, test, table, args.batch_size),
                     "train_seconds": fit.seconds})
        print(f"frozen router after {k} blocks: done", file=sys.stderr)

    print(f"command: {command}")
    print(f"{len(test)} held-out pairs; each pair's domain given: {100 * given:.1f}% macro\n")
    print("| router | blocks its pass runs | router accuracy | macro accuracy (own router) | router training s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        secs = f"{r['train_seconds']:.1f}" if r["train_seconds"] is not None else "-"
        print(f"| {r['router']} | {r['blocks']} of {len(blocks)} | {100 * r['router_accuracy']:.1f}% | "
              f"{100 * r['macro_accuracy']:.1f}% | {secs} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": command, "pairs": len(test), "domain_given": given,
                                              "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
