"""Padded tokens over real tokens: the forward passes a batching plan runs, counted, not timed.

    .venv/bin/python benchmarks/padding.py --data examples/data

Two views, on the pairs the speed benchmarks use:
- the server (`serve_load.py`'s inputs: `--inputs` held-out pairs, prompt and chosen reply, shuffled with seed 0),
  its scoring calls holding `--call` pairs in arrival order (`--orders` random orders): offline `score` (all inputs
  sorted, cut every `batch` rows) against a call cut every `batch` rows and a call cut at the cheapest places
  (`serve.forward.plan_passes` with a budget of batch x `--median-tokens`), at each `--batch-sizes`;
- a routed system (`inference_throughput.py`'s 128 pairs: `--pairs-per-domain` per domain, both replies, each
  routed to its true domain): one sorted batch of every row against each domain's own rows sorted and cut every
  `--routed-batch` rows, as RODOS's per-route sub-batches are.
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
from typing import Sequence

from moerm.data.readers import load_pairs
from moerm.encoding import make_encoder
from moerm.runs import cap_per_domain
from moerm.serve.forward import plan_passes


def every_rows(lengths: Sequence[int], rows: int) -> int:
    """Padded tokens of `lengths` sorted and cut every `rows` rows."""
    s = sorted(lengths)
    return sum(len(s[i:i + rows]) * max(s[i:i + rows]) for i in range(0, len(s), rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="examples/data")
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--inputs", type=int, default=128, help="the server view's distinct inputs (serve_load's)")
    ap.add_argument("--call", type=int, default=15, help="pairs per scoring call (the server's mean call)")
    ap.add_argument("--orders", type=int, default=20, help="random arrival orders averaged")
    ap.add_argument("--batch-sizes", default="4,8,32,64")
    ap.add_argument("--median-tokens", type=int, default=128, help="the token budget is batch x this")
    ap.add_argument("--pairs-per-domain", type=int, default=16)
    ap.add_argument("--routed-batch", type=int, default=32)
    args = ap.parse_args()
    print("command: python benchmarks/padding.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    enc = make_encoder(args.backbone, args.max_length)

    pairs, _ = load_pairs([args.data], split="test")
    random.Random(0).shuffle(pairs)
    lengths = [len(enc.encode(p.prompt, p.chosen)["input_ids"]) for p in pairs[:args.inputs]]
    real = sum(lengths)
    print(f"\nserver view: {len(lengths)} inputs, {real} real tokens, calls of {args.call} pairs, "
          f"{args.orders} arrival orders\n")
    print("| forward batch | offline (all sorted) | call cut every batch rows | call cut at the cheapest places |")
    print("|---:|---:|---:|---:|")
    for b in (int(x) for x in args.batch_sizes.split(",")):
        every, cheapest = 0.0, 0.0
        for seed in range(args.orders):
            order = list(range(len(lengths)))
            random.Random(seed).shuffle(order)
            for i in range(0, len(order), args.call):
                call = [lengths[j] for j in order[i:i + args.call]]
                every += every_rows(call, b)
                cheapest += sum(len(p) * max(call[k] for k in p)
                                for p in plan_passes(call, b * args.median_tokens, b))
        n = args.orders * real
        print(f"| {b} | {every_rows(lengths, b) / real:.3f} | {every / n:.3f} | {cheapest / n:.3f} |")

    test, _ = load_pairs([args.data], split="test")
    test = cap_per_domain(test, args.pairs_per_domain, seed=0)
    rows = [(p.domain, len(enc.encode(p.prompt, r)["input_ids"])) for p in test for r in (p.chosen, p.rejected)]
    real = sum(n for _, n in rows)
    by: dict[str, list[int]] = {}
    for d, n in rows:
        by.setdefault(d, []).append(n)
    routed = sum(every_rows(ls, args.routed_batch) for ls in by.values())
    print(f"\nrouted view: {len(rows)} sequences of {len(by)} domains, batch {args.routed_batch}: one sorted batch "
          f"{every_rows([n for _, n in rows], args.routed_batch) / real:.3f}, per-domain sub-batches "
          f"{routed / real:.3f} (padded over real tokens)")


if __name__ == "__main__":
    main()
