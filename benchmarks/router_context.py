"""How many prompt tokens does the router need? Retrain a saved RODOS run's router with several
`options.router_max_length` values on its own saved router prompts and report held-out routing accuracy.

    .venv/bin/python benchmarks/router_context.py runs/demo/rodos --data examples/data --lengths 32,64
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import tempfile
import time
from pathlib import Path

from moerm.data.readers import load_pairs
from moerm.systems import load_system
from moerm.systems.base import FitContext
from moerm.systems.rodos import Router


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a RODOS run folder")
    ap.add_argument("--data", default="examples/data", help="held-out pairs (test* files in folders)")
    ap.add_argument("--lengths", default="32,64")
    args = ap.parse_args()
    system = load_system(args.run)
    if system.name != "rodos":
        raise SystemExit(f"{args.run} holds a {system.name} system; this script retrains a RODOS router")
    test, _ = load_pairs([args.data], split="test")
    print("command: python benchmarks/router_context.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    print("| router_max_length | held-out routing accuracy | router training seconds |\n|---:|---:|---:|")
    for length in (int(x) for x in args.lengths.split(",")):
        router = Router(system.config, dataclasses.replace(system.opts, router_max_length=length), system.domains)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            router.fit(system.router_examples, Path(tmp), FitContext(Path(tmp), progress=False),
                       system.train_config("router"))
            seconds = time.perf_counter() - t0
        top = router.probs([p.prompt for p in test]).argmax(-1)
        acc = sum(router.domains[int(i)] == p.domain for i, p in zip(top, test)) / len(test)
        print(f"| {length} | {100 * acc:.1f}% | {seconds:.0f} |")


if __name__ == "__main__":
    main()
