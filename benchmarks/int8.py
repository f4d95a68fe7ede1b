"""fp32 vs int8 (dynamic quantization of the backbone's Linear layers, `--quantize int8`) on the CPU, one saved run.

    .venv/bin/python benchmarks/int8.py --run runs/baseline --data examples/data
    .venv/bin/python benchmarks/int8.py --data examples/data            # trains a small baseline first

Both copies of the system are loaded from the same folder (`load_system(run, quantize="none" | "int8")`) and score
the chosen and rejected replies of the same held-out pairs (domains mixed in every batch), at the same torch thread
count, timed in one interleaved run (`timed_round_robin`: one warm-up each, then the repeats alternate) so machine
drift hits both alike. Reported: pairs/s of each (median of the repeats) and their ratio, held-out macro (and
overall) accuracy of each, the Spearman rank correlation of their rewards, and the load average (1, 5, 15 min)
before and after the timing: on a shared machine a high load makes the figures noisy.

Without `--run`, a small baseline is trained on `--data`'s train split (`--train-pairs` pairs, model.max_length=128,
1 epoch) into a temporary folder first.
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
from typing import Any

import torch
from scipy.stats import spearmanr

from moerm.bench.measure import timed_round_robin
from moerm.cli.common import quiet_hf
from moerm.config import load_config
from moerm.data.readers import load_pairs
from moerm.encoding.quantize import quantize_system
from moerm.eval.metrics import evaluate_system
from moerm.runs import cap_per_domain
from moerm.systems import build_system
from moerm.systems.base import FitContext, load_system


def _load(data: str, split: str) -> list:
    pairs, _ = load_pairs([data], split=split if Path(data).is_dir() else None)
    return pairs


def _per_domain(pairs: list, total: int) -> int:
    return max(1, total // max(1, len({p.domain for p in pairs})))


def train_small(data: str, train_pairs: int, backbone: str, out: Path) -> Path:
    train = _load(data, "train")
    train = cap_per_domain(train, _per_domain(train, train_pairs), seed=0)
    cfg = load_config(None, ["system=baseline", f"model.backbone={backbone}", "model.max_length=128",
                             "train.epochs=1", "train.batch_size=16", "train.save_every=0"])
    system = build_system(cfg)
    print(f"training a small baseline on {len(train)} pairs into {out} ...", flush=True)
    system.fit(train, None, FitContext(out / "run", progress=False))
    return system.save(out / "run" / "model")


def load_avg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="run folder or saved model folder (default: train a small baseline)")
    ap.add_argument("--data", default="examples/data", help="held-out pairs: a file, or a folder (its test split)")
    ap.add_argument("--pairs", type=int, default=256, help="held-out pairs scored (spread over the domains)")
    ap.add_argument("--train-pairs", type=int, default=400, help="without --run: pairs the small baseline trains on")
    ap.add_argument("--backbone", default="minilm", help="without --run: the backbone of the small baseline")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    ap.add_argument("--keep-fp32", default=None, help="also time a third copy, int8 but with the Linear layers whose "
                    "name matches this regular expression kept fp32 (e.g. 'layer\\.\\d+\\.output\\.dense')")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    quiet_hf()
    torch.manual_seed(0)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/int8.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    test = _load(args.data, "test")
    test = cap_per_domain(test, _per_domain(test, args.pairs), seed=0)
    random.Random(0).shuffle(test)  # mixed domains in every batch
    prompts = [p.prompt for p in test] * 2
    responses = [p.chosen for p in test] + [p.rejected for p in test]
    n = len(test)

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or str(train_small(args.data, args.train_pairs, args.backbone, Path(tmp)))
        systems = {"fp32": load_system(run, device="cpu", quantize="none"),
                   "int8": load_system(run, device="cpu", quantize="int8")}
        if args.keep_fp32:
            partial = load_system(run, device="cpu", quantize="none")
            quantize_system(partial, "int8", keep_fp32=args.keep_fp32)
            systems["int8 partial"] = partial
        # quality first (one pass each), then the interleaved timing
        rewards = {k: s.score(prompts, responses, batch_size=args.batch_size).rewards for k, s in systems.items()}
        reports = {k: evaluate_system(s, test, batch_size=args.batch_size) for k, s in systems.items()}
        load_before = load_avg()
        times = timed_round_robin({k: (lambda s=s: s.score(prompts, responses, batch_size=args.batch_size))
                                   for k, s in systems.items()}, args.repeats)
        load_after = load_avg()
        name = systems["fp32"].name
        quantized_layers = systems["int8"].describe()["quantized_layers"]

    rho = float(spearmanr(rewards["fp32"], rewards["int8"]).statistic)
    rhos = {k: float(spearmanr(rewards["fp32"], rewards[k]).statistic) for k in systems if k != "fp32"}
    rows: dict[str, Any] = {}
    for k in systems:
        sec = statistics.median(times[k])
        rows[k] = {"pairs_per_second": n / sec, "seconds": sec, "seconds_all": times[k],
                   "macro_accuracy": reports[k]["macro_accuracy"], "accuracy": reports[k]["accuracy"]}
    speedup = rows["int8"]["pairs_per_second"] / rows["fp32"]["pairs_per_second"]
    result = {"command": command, "run": args.run or "(small baseline, trained here)", "system": name,
              "pairs": n, "inputs": 2 * n, "batch_size": args.batch_size, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "quantized_layers": quantized_layers,
              "load_average_before": load_before, "load_average_after": load_after, "rows": rows,
              "int8_speedup": speedup, "spearman_rewards": rho, "spearman_by_copy": rhos,
              "keep_fp32": args.keep_fp32}

    print(f"command: {command}")
    print(f"system {name}, {n} held-out pairs ({2 * n} inputs), batch {args.batch_size}, torch threads "
          f"{torch.get_num_threads()}, {args.repeats} interleaved repeats; int8 layers: {quantized_layers}")
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    print()
    print("| weights | pairs/s | s per run (median) | macro acc | overall acc |")
    print("|---|---:|---:|---:|---:|")
    for k, r in rows.items():
        print(f"| {k} | {r['pairs_per_second']:.1f} | {r['seconds']:.3f} | {r['macro_accuracy']:.4f} | "
              f"{r['accuracy']:.4f} |")
    print()
    diff = rows["int8"]["macro_accuracy"] - rows["fp32"]["macro_accuracy"]
    print(f"int8 / fp32 throughput: {speedup:.2f}x; Spearman rank correlation of rewards: {rho:.4f}; "
          f"macro accuracy difference (int8 - fp32): {diff:+.4f}")
    if "int8 partial" in rows:
        p = rows["int8 partial"]
        print(f"int8 with {args.keep_fp32!r} kept fp32: {p['pairs_per_second'] / rows['fp32']['pairs_per_second']:.2f}x; "
              f"Spearman {rhos['int8 partial']:.4f}; macro accuracy difference "
              f"{p['macro_accuracy'] - rows['fp32']['macro_accuracy']:+.4f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
