"""A small learning-rate sweep per tuning mode, on real data: what the default recipes are set from.

    .venv/bin/python benchmarks/recipes.py --data examples/data --per-domain 40 \
        --cell "baseline full train.lr=2e-5" --cell "baselora lora train.lr=5e-4" ... --out sweep.jsonl

Each `--cell` is `SYSTEM TUNING [KEY=VALUE ...]` (config overrides as for `moerm train --set`). Every cell trains
from the same seed on the same pairs (`--per-domain` training pairs per domain of --data's train split) and is
scored on the same held-out pairs (its test split, `--test-per-domain` per domain), domain given. One JSON line per
cell is appended to --out as it finishes (a killed sweep keeps what it finished; cells already in --out are
skipped), with the held-out macro and overall accuracy, the training seconds and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from moerm.cli.common import quiet_hf
from moerm.config import load_config
from moerm.data.readers import load_pairs
from moerm.eval.metrics import evaluate_system
from moerm.runs import cap_per_domain
from moerm.systems import build_system
from moerm.systems.base import FitContext


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="examples/data")
    ap.add_argument("--per-domain", type=int, default=40)
    ap.add_argument("--test-per-domain", type=int, default=50)
    ap.add_argument("--cell", action="append", required=True, help="SYSTEM TUNING [KEY=VALUE ...]")
    ap.add_argument("--set", action="append", default=[], help="overrides for every cell")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    quiet_hf()
    train, _ = load_pairs([args.data], split="train")
    test, _ = load_pairs([args.data], split="test")
    train = cap_per_domain(train, args.per_domain, seed=0)
    test = cap_per_domain(test, args.test_per_domain, seed=0)
    out = Path(args.out)
    done = {json.loads(line)["cell"] for line in out.read_text().splitlines()} if out.exists() else set()
    for cell in args.cell:
        if cell in done:
            continue
        system, tuning, *sets = shlex.split(cell)
        cfg = load_config(None, [f"system={system}", f"model.tuning={tuning}", "model.max_length=128",
                                 "train.save_every=0", *args.set, *sets])
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            built = build_system(cfg)
            built.fit(train, None, FitContext(Path(tmp) / "run", progress=False))
            seconds = time.perf_counter() - t0
            report = evaluate_system(built, test, batch_size=64)
        row = {"cell": cell, "command": "python benchmarks/recipes.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
               "train_pairs": len(train), "test_pairs": len(test), "macro_accuracy": report["macro_accuracy"],
               "accuracy": report["accuracy"], "train_seconds": seconds,
               "load_average": [round(x, 2) for x in os.getloadavg()]}
        print(json.dumps(row), flush=True)
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
