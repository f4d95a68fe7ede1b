"""Training throughput of `top` tuning (a cached frozen trunk) against full fine-tuning, side by side in one run.

    .venv/bin/python benchmarks/trunk.py --data examples/data --train-pairs 256 --epochs 3

Every variant trains the same reward model (the backbone, MiniLM by default, and a linear head) on the same pairs
(model.max_length 128, the same batches in the same order), with the moerm pieces the trainer uses: `TokenPairs`
batches, the Bradley-Terry loss, fused AdamW, gradient clipping. Variants: `full` (every block trains), and for each
N in --layers `top-N` (the top N blocks train, the trunk below them is cached: `encoding.trunk`). The epochs are
interleaved (epoch 1 of every variant, then epoch 2 of every variant, ...), so machine drift hits all alike; the
trunk cache starts empty, so a top variant's first epoch includes computing and writing the trunk states.

Reported per variant: training pairs/s in epoch 1 and in the later epochs (median), their ratio to `full`, and
held-out pairwise accuracy (macro over domains) after the same number of steps, scored by the normal full forward
(the inference path, no cache). The load average goes beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from moerm.cli.common import quiet_hf
from moerm.config import ModelConfig
from moerm.data.readers import load_pairs
from moerm.encoding import load_backbone, make_encoder
from moerm.encoding.trunk import attach_trunk
from moerm.encoding.tuning import apply_tuning
from moerm.modules.heads import RewardHead
from moerm.modules.reward_model import RewardModel
from moerm.runs import cap_per_domain
from moerm.train.loss import bradley_terry_loss
from moerm.train.pairwise import TokenPairs


def load_avg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


class Variant:
    """One way to train: a seeded model, its optimizer, its dataset (with trunk states for top variants)."""

    def __init__(self, name: str, backbone: str, layers: int | None, lr: float, max_length: int, cache: Path,
                 train: list, batch_size: int, seed: int):
        self.name, self.layers = name, layers
        torch.manual_seed(seed)
        m = ModelConfig(backbone=backbone, max_length=max_length, tuning="top" if layers else "full",
                        trainable_layers=layers or 2, trunk_cache=str(cache))
        self.backbone = load_backbone(backbone)
        apply_tuning(self.backbone, m.tuning, m, style="full")
        self.model = RewardModel(self.backbone, RewardHead(self.backbone.hidden_size))
        self.encoder = make_encoder(backbone, max_length)
        self.data = TokenPairs.build(train, self.encoder)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)
        self.batch_size, self.seed = batch_size, seed
        self.epoch_seconds: list[float] = []
        self.trunk_seconds = 0.0
        self.steps = 0

    def epoch(self, epoch: int) -> None:
        t0 = time.perf_counter()
        if epoch == 0 and self.layers:
            t1 = time.perf_counter()
            attach_trunk(self.model, [self.data], progress=False)
            self.trunk_seconds = time.perf_counter() - t1
        self.model.train()
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        for s in range(0, len(order), self.batch_size):
            batch = self.data.collate([self.data[i] for i in order[s : s + self.batch_size]])
            margin = batch.pop("margin")
            rewards = self.model(**batch)  # (2B,)
            b = rewards.shape[0] // 2
            loss = bradley_terry_loss(rewards[:b], rewards[b:], margin)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.steps += 1
        self.epoch_seconds.append(time.perf_counter() - t0)

    @torch.no_grad()
    def accuracy(self, test: list, batch_size: int = 64) -> dict[str, float]:
        """Held-out accuracy by the inference path: the whole backbone runs (no cached trunk)."""
        self.model.eval()
        data = TokenPairs.build(test, self.encoder)
        right: dict[str, list[bool]] = {}
        for s in range(0, len(data), batch_size):
            idx = list(range(s, min(s + batch_size, len(data))))
            batch = data.collate([data.items[i] for i in idx])
            batch.pop("margin")
            r = self.model(**batch)
            b = r.shape[0] // 2
            for i, ok in zip(idx, (r[:b] > r[b:]).tolist()):
                right.setdefault(test[i].domain, []).append(ok)
        per = {d: sum(v) / len(v) for d, v in right.items()}
        return {"macro_accuracy": statistics.mean(per.values()),
                "accuracy": sum(sum(v) for v in right.values()) / sum(len(v) for v in right.values()), **per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="examples/data")
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--train-pairs", type=int, default=256, help="training pairs, spread over the domains")
    ap.add_argument("--test-pairs", type=int, default=400, help="held-out pairs, spread over the domains")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--layers", default="2,1", help="top-N variants (comma-separated N)")
    ap.add_argument("--lr", type=float, default=1e-4, help="learning rate of full fine-tuning")
    ap.add_argument("--top-lr", type=float, default=None, help="learning rate of the top variants (default: --lr)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    quiet_hf()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/trunk.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    train, _ = load_pairs([args.data], split="train")
    test, _ = load_pairs([args.data], split="test")
    domains = len({p.domain for p in train})
    train = cap_per_domain(train, max(1, args.train_pairs // domains), seed=args.seed)
    test = cap_per_domain(test, max(1, args.test_pairs // domains), seed=args.seed)
    load_before = load_avg()
    with tempfile.TemporaryDirectory() as tmp:
        variants = [Variant("full", args.backbone, None, args.lr, args.max_length, Path(tmp), train, args.batch_size,
                            args.seed)]
        for n in (int(x) for x in args.layers.split(",") if x.strip()):
            variants.append(Variant(f"top-{n}", args.backbone, n, args.top_lr or args.lr, args.max_length, Path(tmp), train,
                                    args.batch_size, args.seed))
        for epoch in range(args.epochs):
            for v in variants:
                v.epoch(epoch)
                print(f"epoch {epoch + 1} {v.name}: {v.epoch_seconds[-1]:.1f} s", flush=True)
        load_after = load_avg()
        accuracy = {v.name: v.accuracy(test) for v in variants}
    n = len(train)
    rows: dict[str, Any] = {}
    for v in variants:
        first = n / v.epoch_seconds[0]
        later = n / statistics.median(v.epoch_seconds[1:]) if len(v.epoch_seconds) > 1 else None
        rows[v.name] = {"trainable_params": v.trainable, "steps": v.steps, "epoch_seconds": v.epoch_seconds,
                        "trunk_seconds": v.trunk_seconds, "pairs_per_second_epoch1": first,
                        "pairs_per_second_later": later, **accuracy[v.name]}
    full = rows["full"]
    for r in rows.values():
        r["speedup_epoch1"] = r["pairs_per_second_epoch1"] / full["pairs_per_second_epoch1"]
        r["speedup_later"] = (r["pairs_per_second_later"] / full["pairs_per_second_later"]
                              if r["pairs_per_second_later"] else None)
        r["macro_accuracy_vs_full"] = r["macro_accuracy"] - full["macro_accuracy"]
    result = {"command": command, "train_pairs": n, "test_pairs": len(test), "epochs": args.epochs,
              "batch_size": args.batch_size, "max_length": args.max_length, "lr": args.lr,
              "top_lr": args.top_lr or args.lr,
              "threads": torch.get_num_threads(), "load_average_before": load_before,
              "load_average_after": load_after, "rows": rows}
    print(f"\ncommand: {command}")
    print(f"{n} training pairs, {len(test)} held-out, {args.epochs} epochs interleaved, batch {args.batch_size}, "
          f"max_length {args.max_length}, lr {args.lr} (top: {args.top_lr or args.lr}), torch threads {torch.get_num_threads()}")
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}\n")
    print("| variant | trainable params | pairs/s epoch 1 | x full | pairs/s later epochs | x full | macro acc | vs full |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        later = f"{r['pairs_per_second_later']:.2f} | {r['speedup_later']:.2f}x" if r["pairs_per_second_later"] else "- | -"
        print(f"| {name} | {r['trainable_params']:,} | {r['pairs_per_second_epoch1']:.2f} | {r['speedup_epoch1']:.2f}x | "
              f"{later} | {r['macro_accuracy']:.4f} | {r['macro_accuracy_vs_full'] * 100:+.1f} pts |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
