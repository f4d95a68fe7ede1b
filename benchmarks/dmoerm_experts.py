"""DMoERM inner model: all K capability experts in one batched pass vs K sequential `set_adapter` passes.

    .venv/bin/python benchmarks/dmoerm_experts.py --data examples/data/summeval --pairs 32 --repeats 5

One task's inner model is built through the real `fit` (summarisation task, its 5 capabilities; one optimizer step
per phase, `train.max_steps=1`: the weights' values do not change the arithmetic). The same held-out pairs (chosen
and rejected replies) are then scored with `mode=batched` (shared lower blocks once, the adapted top blocks as one
mixed-adapter batch) and `mode=sequential` (one full pass per expert after `set_adapter`), repeats interleaved.
Reported: pairs per second of each and the ratio; rewards and sub-scores of both modes are checked equal.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from moerm.bench.measure import timed_round_robin
from moerm.config import load_config
from moerm.data.readers import load_pairs
from moerm.runs import cap_per_domain
from moerm.systems import build_system
from moerm.systems.base import FitContext

TASK = {"summarisation": {"domains": ["summeval", "newsroom"],
                          "capabilities": ["coherence", "consistency", "fluency", "relevance", "informativeness"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=["examples/data/summeval", "examples/data/newsroom"])
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=32, help="held-out pairs scored (chosen and rejected: 2x sequences)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override, e.g. options.expert_layers=6")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    command = "python benchmarks/dmoerm_experts.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    torch.manual_seed(0)

    train, _ = load_pairs(args.data, split="train")
    train = cap_per_domain(train, 60, seed=0)
    test, _ = load_pairs(args.data, split="test")
    test = cap_per_domain(test, max(1, args.pairs // len({p.domain for p in test})), seed=0)[: args.pairs]
    prompts = [p.prompt for p in test] * 2
    responses = [p.chosen for p in test] + [p.rejected for p in test]
    cfg = load_config(None, ["system=dmoerm", f"model.backbone={args.backbone}", f"model.max_length={args.max_length}",
                             "train.max_steps=1", "train.batch_size=4", "train.save_every=0",
                             "components.router.train.epochs=0.01", "components.aggregator.train.epochs=0.01",
                             "options.min_capability_pairs=1", *args.overrides])
    cfg.options["tasks"] = TASK
    with tempfile.TemporaryDirectory() as tmp:
        system = build_system(cfg)
        system.fit(train, None, FitContext(Path(tmp), progress=False))
    task = system.models["summarisation"]
    k = len(task.capabilities)
    layers = task.bank.first_expert_layer
    rb, sb = system.score_task("summarisation", prompts, responses, args.batch_size, mode="batched")
    rs, ss = system.score_task("summarisation", prompts, responses, args.batch_size, mode="sequential")
    max_diff = max(float((rb - rs).abs().max()), float((sb - ss).abs().max()))
    runs = {mode: (lambda m=mode: system.score_task("summarisation", prompts, responses, args.batch_size, mode=m))
            for mode in ("sequential", "batched")}
    secs = {k: statistics.median(v) for k, v in timed_round_robin(runs, args.repeats).items()}
    n = len(test)
    total_layers = len(task.bank.peft.get_base_model().encoder.layer) if hasattr(task.bank.peft.get_base_model(), "encoder") else None
    print(f"command: {command}")
    print(f"{n} pairs ({2 * n} sequences), {k} experts on blocks {layers}..{(total_layers or 0) - 1} of "
          f"{total_layers}, backbone {args.backbone}, max_length {args.max_length}, batch {args.batch_size}, "
          f"median of {args.repeats}, {torch.get_num_threads()} CPU threads; batched vs sequential max |diff| {max_diff:.2e}\n")
    print("| inference | seconds per pair | pairs/s |")
    print("|---|---:|---:|")
    for mode, sec in secs.items():
        print(f"| {mode} | {sec / n * 1000:.1f} ms | {n / sec:.2f} |")
    ratio = secs["sequential"] / secs["batched"]
    print(f"\nbatched / sequential: {ratio:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": command, "pairs": n, "experts": k, "seconds": secs,
                                              "ratio": ratio, "max_abs_diff": max_diff}, indent=2))


if __name__ == "__main__":
    main()
