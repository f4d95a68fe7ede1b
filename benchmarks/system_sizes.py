"""Size of every system on the same backbone and domains: parameters total/trainable and bytes on disk, with the
ratio to Baseline (the router paper's Table 3 comparison).

    .venv/bin/python benchmarks/system_sizes.py --data examples/data

Each system is built through its real `fit` with one optimizer step per component (sizes do not depend on how
long it trains), saved, and described with `describe(saved_folder)`, the same numbers `moerm info` prints.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from moerm.config import load_config
from moerm.data.readers import load_pairs
from moerm.runs import cap_per_domain
from moerm.systems import build_system
from moerm.systems.base import FitContext


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="examples/data")
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--systems", default="baseline,baselora,more,rodos,arliss,rodos:top,arliss:top",
                    help="comma-separated NAME[:TUNING] (e.g. rodos:top: each domain RM's top blocks on a shared trunk)")
    ap.add_argument("--trainable-layers", type=int, default=2, help="top tuning: blocks that train")
    args = ap.parse_args()
    train, _ = load_pairs([args.data], split="train")
    train = cap_per_domain(train, 8, seed=0)
    common = [f"model.backbone={args.backbone}", "model.max_length=64", "train.max_steps=1", "train.batch_size=8",
              "train.save_every=0"]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.systems.split(","):
            name, _, tuning = spec.partition(":")
            extra = ["components.router.train.epochs=0.01"] if name in ("rodos", "arliss") else []
            if tuning:
                extra += [f"model.tuning={tuning}", f"model.trainable_layers={args.trainable_layers}",
                          f"model.trunk_cache={Path(tmp) / 'trunk'}"]
            system = build_system(load_config(None, [f"system={name}", *common, *extra]))
            folder = Path(tmp) / spec.replace(":", "-")
            system.fit(train, None, FitContext(folder, progress=False))
            saved = system.save(folder / "model")
            rows[spec] = system.describe(saved)["total"]
            del system
    base = rows.get("baseline", {}).get("params_total")
    print("command: python benchmarks/system_sizes.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    print(f"{len({p.domain for p in train})} domains, backbone {args.backbone}; NAME:top = model.tuning=top with "
          f"model.trainable_layers={args.trainable_layers}\n")
    print("| system | parameters | % of Baseline | trainable | bytes on disk |")
    print("|---|---:|---:|---:|---:|")
    for name, t in rows.items():
        pct = f"{100 * t['params_total'] / base:.0f}%" if base else ""
        print(f"| {name} | {t['params_total']:,} | {pct} | {t['params_trainable']:,} | {t['bytes_on_disk']:,} |")


if __name__ == "__main__":
    main()
