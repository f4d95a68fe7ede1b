"""The same training on 1 process and on N processes (DDP), side by side: pairs/s, final loss, held-out accuracy.

    .venv/bin/python benchmarks/ddp.py --data examples/data --pairs-per-domain 32 --nproc 2

1 process trains with batch N*b, N processes with batch b each (the same global batch, the same data order), each
process on `--threads` torch threads (default 1, so 2 processes on 2 cores do not fight). On CPU the processes talk
over gloo (`ACCELERATE_USE_CPU=true torchrun`); on a GPU machine pass `--gpu` to run one process per GPU with
`torchrun` (nccl). Correctness is the point on 2 CPU cores (the numbers should agree); a speed-up needs real devices.
Writes nothing outside `--out` (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moerm.bench.measure import environment


def _train(out: Path, nproc: int, batch: int, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    if not args.gpu:
        env["ACCELERATE_USE_CPU"] = "true"
    launcher = ([str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = [*launcher, "-m", "moerm.cli", "train", "--system", args.system, "--backbone", args.backbone,
           "--data", args.data, "--out", str(out), "--no-progress",
           "--set", f"train.batch_size={batch}", "--set", f"train.epochs={args.epochs}",
           "--set", f"model.max_length={args.max_length}", "--set", f"train.lr={args.lr}",
           "--set", "train.save_every=0", "--set", f"data.max_train_pairs_per_domain={args.pairs_per_domain}",
           "--set", f"data.max_eval_pairs_per_domain={args.eval_pairs_per_domain}"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    summary = json.loads((out / "train_summary.json").read_text())
    pairs = sum(json.loads((out / "data.json").read_text())["train_pairs"].values())
    seconds = summary["train_seconds"]
    return {"processes": nproc, "batch_per_process": batch, "train_pairs": pairs,
            "pairs_per_s": pairs * args.epochs / seconds, "train_seconds": seconds, "wall_seconds": wall,
            "final_train_loss": summary["metrics"].get("train_loss"),
            "heldout_accuracy": summary["metrics"].get("eval_accuracy"), "command": shlex.join(cmd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="examples/data")
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--system", default="baseline")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="per-process batch (1 process gets nproc x this)")
    ap.add_argument("--pairs-per-domain", type=int, default=32)
    ap.add_argument("--eval-pairs-per-domain", type=int, default=16)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--gpu", action="store_true", help="one process per GPU (nccl) instead of CPU processes (gloo)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    env = environment("cuda" if args.gpu else "cpu")  # its load_average is the one before training
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        rows = [_train(root / "1proc", 1, args.nproc * args.batch, args),
                _train(root / f"{args.nproc}proc", args.nproc, args.batch, args)]
    print(f"# DDP vs 1 process: {args.system} on {args.backbone}, {rows[0]['train_pairs']} pairs, global batch "
          f"{args.nproc * args.batch}, {args.threads} thread(s) per process")
    env["load_average_after"] = list(os.getloadavg())
    print(f"# load average before: {env['load_average']}, after: {env['load_average_after']}")
    print("| processes | batch/process | pairs/s | final train loss | held-out accuracy |")
    print("|---|---|---|---|---|")
    for r in rows:
        loss = f"{r['final_train_loss']:.5f}" if r["final_train_loss"] is not None else "-"
        acc = f"{r['heldout_accuracy']:.4f}" if r["heldout_accuracy"] is not None else "-"
        print(f"| {r['processes']} | {r['batch_per_process']} | {r['pairs_per_s']:.2f} | {loss} | {acc} |")
    print(f"speed ratio ({args.nproc} processes / 1): {rows[1]['pairs_per_s'] / rows[0]['pairs_per_s']:.2f}x")
    print(json.dumps({"environment": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
