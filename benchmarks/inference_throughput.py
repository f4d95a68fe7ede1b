"""Inference throughput of every system on the same mixed-domain batch of held-out pairs, side by side.

    .venv/bin/python benchmarks/inference_throughput.py --data examples/data --pairs-per-domain 16

Each system is built through its real `fit` with one optimizer step per component (`train.max_steps=1`): the
weights' values do not change the arithmetic, so throughput is measured without hours of training. Every system then
scores the chosen and rejected replies of the same pairs (shuffled so domains are mixed in each batch); the median of
`--repeats` timed runs (interleaved across systems) is reported as pairs per second, with ratios to Baseline and ARLISS-batched / ARLISS-switch. `--arliss-routers lora,frozen` times ARLISS with
each router (frozen: a linear head on the prompt's pretrained states after `options.router_layer` blocks), rows
`arliss-<router>-*`.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from moerm.bench.measure import timed_round_robin
from moerm.config import load_config
from moerm.data.readers import load_pairs
from moerm.runs import cap_per_domain
from moerm.systems import build_system
from moerm.systems.base import FitContext, RewardSystem


def build(name: str, overrides: list[str], train: list, work: Path) -> RewardSystem:
    cfg = load_config(None, [f"system={name}", *overrides])
    system = build_system(cfg)
    system.fit(train, None, FitContext(work / name, progress=False))
    return system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="examples/data")
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--pairs-per-domain", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--systems", default="baseline,more,rodos,arliss")
    ap.add_argument("--arliss-routers", default="lora",
                    help="ARLISS's options.router_tuning values to time, comma-separated: lora (the paper's router "
                         "adapter, a pass through every block), frozen (a head on the first options.router_layer "
                         "blocks' pretrained states)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override for every system, e.g. --set options.router_max_length=32")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    command = "python benchmarks/inference_throughput.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    test, _ = load_pairs([args.data], split="test")
    test = cap_per_domain(test, args.pairs_per_domain, seed=0)
    random.Random(0).shuffle(test)  # mixed domains in every batch
    train, _ = load_pairs([args.data], split="train")
    train = cap_per_domain(train, 8, seed=0)
    prompts = [p.prompt for p in test] * 2
    responses = [p.chosen for p in test] + [p.rejected for p in test]
    n = len(test)
    common = [f"model.backbone={args.backbone}", f"model.max_length={args.max_length}", "train.max_steps=1",
              "train.batch_size=8", "train.save_every=0", *args.overrides]
    router = ["components.router.train.epochs=0.01"]
    runs: dict[str, Callable[[], Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.systems.split(","):
            if name == "arliss":
                routers = args.arliss_routers.split(",")
                for r in routers:
                    system = build(name, [*common, *router, f"options.router_tuning={r}"], train, Path(tmp) / r)
                    tag = "arliss" if routers == ["lora"] else f"arliss-{r}"
                    for mode in ("switch", "batched"):
                        runs[f"{tag}-{mode}"] = (lambda s=system, m=mode: s.score(prompts, responses,
                                                                                  batch_size=args.batch_size, mode=m))
            else:
                system = build(name, common + (router if name == "rodos" else []), train, Path(tmp))
                runs[name] = lambda s=system: s.score(prompts, responses, batch_size=args.batch_size)
        rows = {k: statistics.median(v) for k, v in timed_round_robin(runs, args.repeats).items()}

    base = rows.get("baseline")
    print(f"command: {command}")
    print(f"{n} held-out pairs from {len({p.domain for p in test})} domains ({2 * n} sequences), "
          f"backbone {args.backbone}, max_length {args.max_length}, batch {args.batch_size}, "
          f"median of {args.repeats}, {torch.get_num_threads()} CPU threads\n")
    print("| system | seconds per pair | pairs/s | ratio to Baseline |")
    print("|---|---:|---:|---:|")
    for name, sec in rows.items():
        ratio = f"{base / sec:.2f}x" if base else ""
        print(f"| {name} | {sec / n * 1000:.1f} ms | {n / sec:.2f} | {ratio} |")
    for tag in sorted({k.rsplit("-", 1)[0] for k in rows if k.startswith("arliss")}):
        if f"{tag}-switch" in rows and f"{tag}-batched" in rows:
            print(f"\n{tag} batched / switch: {rows[f'{tag}-switch'] / rows[f'{tag}-batched']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": command, "pairs": n, "seconds": rows}, indent=2))


if __name__ == "__main__":
    main()
