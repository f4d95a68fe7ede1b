"""Inference throughput of every system on the same mixed-domain batch of held-out pairs, side by side.

    .venv/bin/python benchmarks/inference_throughput.py --data examples/data --pairs-per-domain 16 \
        --systems baseline,rodos,arliss --rodos-routing hard,gated --rodos-routers frozen,frozen:null \
        --arliss-routers lora,frozen,frozen:1

Each system is built through its real `fit`. Its reward models take one optimizer step each (`train.max_steps=1`):
their weights' values do not change the arithmetic. Its router trains for real, on the prompts of
`--router-pairs-per-domain` training pairs per domain (10 epochs, lr 1e-2, as the bench presets train it): how
many domain RMs score an input follows from the router's confidence. An untrained router is unsure of every prompt:
gated routing then mixes two RMs for every input, and a confidence floor sends every input to the fallback.

Every system then scores the chosen and rejected replies of the same pairs, shuffled so domains are mixed in each
batch. The median of `--repeats` timed runs, interleaved across systems, is reported as pairs per second, with
ratios to Baseline. `--clock cpu` times the CPU seconds of this process instead of wall time: robust to other work
on a shared machine, blind to time spent waiting.

Rows:
- `rodos-hard` is the paper's top-1 routing (`options.routing=hard`, `options.min_confidence=0`); `rodos-gated`
  is the default (top-1 at router confidence >= `options.min_confidence`, 0.6, else the top-2 mix). Both rows are
  the same trained system with its routing switched.
- `--arliss-routers lora,frozen,frozen:1` times ARLISS with each router: lora is the paper's router adapter (a
  pass through every block); frozen is a linear head on the prompt's pretrained pooled states; `frozen:K` reads
  the states after K blocks (`options.router_layer=K`). Rows are `arliss-<router>-<mode>`.
- `--rodos-routers frozen,frozen:null` does the same for RODOS (its default `frozen` reads 1 block; `frozen:null`
  the whole backbone, the earlier default); rows `rodos-<routing>` and `rodos-frozen@K-<routing>`.
- `<system>-router` rows time the router alone (the routing decisions of the same inputs).

For each routed row it prints the domain-RM passes per input and the router's accuracy on these prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from moerm.bench.measure import CLOCKS, timed_round_robin
from moerm.cpu_memory import keep_cpu_memory
from moerm.config import load_config
from moerm.data.readers import load_pairs
from moerm.runs import cap_per_domain
from moerm.systems import build_system
from moerm.systems.base import FitContext, RewardSystem
from moerm.systems.routing import rm_passes


def build(name: str, overrides: list[str], train: list, work: Path) -> RewardSystem:
    cfg = load_config(None, [f"system={name}", *overrides])
    system = build_system(cfg)
    system.fit(train, None, FitContext(work / name, progress=False))
    return system


def routed(system: Any, routing: str | None = None, min_confidence: float | None = None) -> Any:
    """`system` with its routing options set (in place: the rows of one trained system share it)."""
    if routing is not None:
        system.opts.routing = routing
    if min_confidence is not None:
        system.opts.min_confidence = min_confidence
    return system


def routing_stats(system: Any, prompts: list[str], domains: list[str]) -> dict[str, float]:
    """Domain-RM passes per input and the router's top-1 accuracy on these prompts."""
    routes = system.router.routes(prompts, None)
    right = [max(r.probs, key=r.probs.get) == d for r, d in zip(routes, domains)]
    return {"rm_passes": rm_passes(routes), "router_accuracy": sum(right) / len(right)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="examples/data")
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--pairs-per-domain", type=int, default=16)
    ap.add_argument("--router-pairs-per-domain", type=int, default=64,
                    help="training pairs per domain; the routers train on their prompts (the RMs take one step)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    ap.add_argument("--systems", default="baseline,more,rodos,arliss")
    ap.add_argument("--rodos-routing", default="hard,gated",
                    help="RODOS routings to time on the one trained system: hard (top-1, min_confidence 0), gated")
    ap.add_argument("--arliss-routers", default="lora",
                    help="ARLISS's routers to time, comma-separated: lora (the paper's router adapter, a pass through "
                         "every block), frozen (a head on the pretrained pooled states), frozen:K (on the states "
                         "after K blocks: options.router_layer=K)")
    ap.add_argument("--rodos-routers", default="frozen",
                    help="RODOS's routers, comma-separated: frozen (its default: the states after 1 block), "
                         "frozen:K (after K blocks: options.router_layer=K), frozen:null (the whole backbone's pooled "
                         "states, the earlier default)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override for every system, e.g. --set options.router_max_length=32")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    keep_cpu_memory()  # as the CLI and the server run (moerm.cpu_memory)
    command = "python benchmarks/inference_throughput.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    test, _ = load_pairs([args.data], split="test")
    every = test  # every held-out pair: the routers' accuracy on all their prompts (not timed)

    def every_prompt(system: Any) -> dict[str, Any]:
        """The router's accuracy on every distinct held-out prompt of --data, with its 95% interval."""
        ci = system.router.accuracy([p.prompt for p in every], [p.domain for p in every])
        return {"accuracy": ci.point, "low": ci.low, "high": ci.high, "prompts": ci.prompts}

    test = cap_per_domain(test, args.pairs_per_domain, seed=0)
    random.Random(0).shuffle(test)  # mixed domains in every batch
    train, _ = load_pairs([args.data], split="train")
    train = cap_per_domain(train, args.router_pairs_per_domain, seed=0)
    prompts = [p.prompt for p in test] * 2
    responses = [p.chosen for p in test] + [p.rejected for p in test]
    domains = [p.domain for p in test] * 2
    n = len(test)
    common = [f"model.backbone={args.backbone}", f"model.max_length={args.max_length}", "train.max_steps=1",
              "train.batch_size=8", "train.save_every=0", *args.overrides]
    router = ["components.router.train.epochs=10", "components.router.train.lr=1e-2"]
    runs: dict[str, Callable[[], Any]] = {}
    stats: dict[str, dict[str, float]] = {}

    def score(system: Any, mode: str | None = None, **routing: Any) -> Callable[[], Any]:
        return lambda: routed(system, **routing).score(prompts, responses, batch_size=args.batch_size,
                                                       **({"mode": mode} if mode else {}))

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.systems.split(","):
            if name == "arliss":
                for spec in args.arliss_routers.split(","):
                    kind, _, layer = spec.partition(":")
                    extra = [f"options.router_tuning={kind}"] + ([f"options.router_layer={layer}"] if layer else [])
                    system = build(name, [*common, *router, *extra], train, Path(tmp) / spec.replace(":", "-"))
                    tag = f"arliss-{spec.replace(':', '@')}"
                    for mode in ("switch", "batched"):
                        runs[f"{tag}-{mode}"] = score(system, mode)
                    runs[f"{tag}-router"] = lambda s=system: s.router.routes(prompts, None, args.batch_size)
                    stats[f"{tag}-batched"] = routing_stats(system, prompts, domains)
                    stats[f"{tag}-batched"]["router_accuracy_all"] = every_prompt(system)
            elif name == "rodos":
                for spec in args.rodos_routers.split(","):
                    kind, _, layer = spec.partition(":")
                    extra = [f"options.router_tuning={kind}"] + ([f"options.router_layer={layer}"] if layer else [])
                    system = build(name, [*common, *router, *extra], train, Path(tmp) / f"rodos-{spec}")
                    tag = "rodos" if spec == "frozen" else f"rodos-{spec.replace(':', '@')}"
                    default = system.opts.min_confidence  # RODOS's gated default, 0.6
                    accuracy = every_prompt(system)  # the router's, whatever the routing
                    for r in args.rodos_routing.split(","):
                        floor = 0.0 if r == "hard" else default
                        runs[f"{tag}-{r}"] = score(system, routing=r, min_confidence=floor)
                        stats[f"{tag}-{r}"] = {**routing_stats(routed(system, r, floor), prompts, domains),
                                               "router_accuracy_all": accuracy}
                    runs[f"{tag}-router"] = lambda s=system: s.router.routes(prompts, None, args.batch_size)
            else:
                system = build(name, common, train, Path(tmp))
                runs[name] = score(system)
        rows = {k: statistics.median(v) for k, v in timed_round_robin(runs, args.repeats, args.clock).items()}

    base = rows.get("baseline")
    print(f"command: {command}")
    print(f"{n} held-out pairs from {len({p.domain for p in test})} domains ({2 * n} sequences), "
          f"backbone {args.backbone}, max_length {args.max_length}, batch {args.batch_size}, median of {args.repeats} "
          f"({args.clock} clock), {torch.get_num_threads()} CPU threads, load average "
          f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| system | seconds per pair | pairs/s | ratio to Baseline | RM passes per input | router accuracy "
          "(these prompts) | router accuracy (every held-out prompt) [95%] |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, sec in rows.items():
        ratio = f"{base / sec:.2f}x" if base and not name.endswith("-router") else ""  # a router alone: no ratio
        st = stats.get(name, {})
        passes = f"{st['rm_passes']:.2f}" if st else ""
        acc = f"{st['router_accuracy']:.1%}" if st else ""
        a = st.get("router_accuracy_all")
        every_acc = f"{a['accuracy']:.1%} [{a['low']:.1%}, {a['high']:.1%}] of {a['prompts']}" if a else ""
        print(f"| {name} | {sec / n * 1000:.1f} ms | {n / sec:.2f} | {ratio} | {passes} | {acc} | {every_acc} |")
    for tag in sorted({k.rsplit("-", 1)[0] for k in rows if k.startswith("arliss")}):
        if f"{tag}-switch" in rows and f"{tag}-batched" in rows:
            print(f"\n{tag} batched / switch: {rows[f'{tag}-switch'] / rows[f'{tag}-batched']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": command, "pairs": n, "clock": args.clock, "seconds": rows,
                                              "routing": stats, "load_average": list(os.getloadavg())}, indent=2))


if __name__ == "__main__":
    main()
