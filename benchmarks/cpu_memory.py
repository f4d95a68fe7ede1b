"""What kept CPU memory (`moerm.cpu_memory`) and a second tokenization cost per scored pair, counted in fresh processes.

    .venv/bin/python benchmarks/cpu_memory.py runs/demo2/baseline --data examples/data --batch-size 8

For each mode, default (glibc as it starts) and kept (`keep_cpu_memory()`), `--repeats` fresh processes each load
the run, score `--inputs` held-out pairs (prompt, chosen reply; shuffled with seed 0) in calls of `--call` pairs at
`--batch-size`, one torch thread, once to warm up and once measured, in the main thread and again in a worker thread
(the server scores in one). Per pair: minor page faults, system and user CPU ms (`getrusage`, the whole process).
The kept processes also time the pairs' tokenization alone (`encoder.encode` of each pair), the work a second
tokenization adds. Faults and system time are counts of this process's work; the CPU milliseconds move with the
machine's load (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One fresh process's figures (run with --child MODE)."""
    import torch

    from moerm.cpu_memory import keep_cpu_memory
    from moerm.data.readers import load_pairs
    from moerm.systems import load_system

    if args.child == "kept" and not keep_cpu_memory():
        sys.exit("error: kept CPU memory is not available here (glibc on Linux only)")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    pairs, _ = load_pairs([args.data], split="test")
    random.Random(0).shuffle(pairs)
    prompts = [p.prompt for p in pairs[:args.inputs]]
    responses = [p.chosen for p in pairs[:args.inputs]]
    system = load_system(args.run)
    n = len(prompts)

    def calls() -> None:
        for s in range(0, n, args.call):
            system.score(prompts[s:s + args.call], responses[s:s + args.call], batch_size=args.batch_size)

    def measured() -> dict[str, float]:
        calls()  # warm-up: every shape once
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        calls()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return {"faults_per_pair": (r1.ru_minflt - r0.ru_minflt) / n,
                "sys_ms_per_pair": (r1.ru_stime - r0.ru_stime) * 1000 / n,
                "user_ms_per_pair": (r1.ru_utime - r0.ru_utime) * 1000 / n}

    out: dict[str, Any] = {"main thread": measured()}
    with ThreadPoolExecutor(1) as pool:
        out["worker thread"] = pool.submit(measured).result()
    if args.child == "kept":
        encoder = system.encoder
        t0 = time.process_time()
        for p, r in zip(prompts, responses):
            encoder.encode(p, r)
        out["tokenize_ms_per_pair"] = (time.process_time() - t0) * 1000 / n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a saved single-RM run (baseline) or model folder")
    ap.add_argument("--data", default="examples/data")
    ap.add_argument("--inputs", type=int, default=128)
    ap.add_argument("--call", type=int, default=16, help="pairs per scoring call (the server's calls hold about 15)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per mode")
    ap.add_argument("--child", choices=["default", "kept"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    print("command: python benchmarks/cpu_memory.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    env = {**os.environ, "MOERM_KEEP_CPU_MEMORY": "1"}
    print("\n| mode | process | thread | minor faults per pair | system CPU ms per pair | user CPU ms per pair |")
    print("|---|---:|---|---:|---:|---:|")
    tokenize: list[float] = []
    for mode in ("default", "kept"):
        for k in range(args.repeats):
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", mode], capture_output=True,
                                 text=True, env=env)
            if out.returncode != 0:
                sys.exit(f"error: the {mode} process failed: {out.stderr.strip().splitlines()[-1:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            for thread in ("main thread", "worker thread"):
                r = res[thread]
                print(f"| {mode} | {k + 1} | {thread} | {r['faults_per_pair']:,.0f} | {r['sys_ms_per_pair']:.2f} | "
                      f"{r['user_ms_per_pair']:.1f} |")
            if "tokenize_ms_per_pair" in res:
                tokenize.append(res["tokenize_ms_per_pair"])
    print(f"\ntokenizing a pair alone: {', '.join(f'{t:.2f}' for t in tokenize)} CPU ms (kept processes); "
          f"load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
