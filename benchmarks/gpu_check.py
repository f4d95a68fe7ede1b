"""The GPU check: on a machine with one or more GPUs and no network, DDP vs FSDP full fine-tuning in bf16 on
random-weight models built from configs (DeBERTa-v3-large's shape, Llama-3.2-1B's shape): pairs/s and peak memory
per process of each, and FSDP/DDP as ratios from one run. `benchmarks/gpu_check.sh` runs it with a time limit.

    .venv/bin/python benchmarks/gpu_check.py --out gpu-check.json          # every GPU, one process each
    .venv/bin/python benchmarks/gpu_check.py --tiny --out tiny.json        # CPU, tiny shapes, 2 gloo processes (CI)

With one GPU there is nothing to shard over: both modes run one process and the ratios are ~1 (the report says
so). What it does not cover yet (other checks of the issue): ARLISS batched vs switch vs the baseline, and the
server's dynamic batching at 32 clients.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fsdp as bench  # noqa: E402  (benchmarks/fsdp.py: one mode under torchrun)

GPU_PLAN = [  # shape, pairs per process, tokens: sized so both shapes and both modes fit in ~6 minutes on one H100
    ("deberta-v3-large", 8, 256),
    ("llama-1b", 4, 256),
]
TINY_PLAN = [("tiny", 2, 16)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny shapes, 2 processes (what CI runs)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per mode (default 10 on GPU, 2 tiny)")
    ap.add_argument("--timeout", type=int, default=150, help="seconds per mode and shape")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch

    gpus = 0 if args.tiny else torch.cuda.device_count()
    if not args.tiny and gpus == 0:
        raise SystemExit("no GPU found: run with --tiny for the CPU check")
    plan = TINY_PLAN if args.tiny else GPU_PLAN
    steps = args.steps or (2 if args.tiny else 10)
    report: dict = {"gpus": gpus, "device": torch.cuda.get_device_name(0) if gpus else "cpu", "shapes": {},
                    "note": "1 GPU: nothing to shard, ratios ~1" if gpus == 1 else ""}
    t0 = time.perf_counter()
    for shape, batch, length in plan:
        ns = argparse.Namespace(shape=shape, nproc=2 if args.tiny else gpus, batch=batch, max_length=length,
                                steps=steps, dtype="fp32" if args.tiny else "bf16", threads=1, gpu=not args.tiny,
                                timeout=args.timeout)
        with tempfile.TemporaryDirectory() as tmp:
            rows = {mode: bench.run_mode(mode, ns, Path(tmp)) for mode in ("ddp", "fsdp")}
        report["shapes"][shape] = {
            "parameters": rows["ddp"]["parameters"], "processes": ns.nproc, "batch_per_process": batch,
            "max_length": length, "dtype": ns.dtype,
            **{f"{m}_pairs_per_s": rows[m]["pairs_per_s"] for m in rows},
            **{f"{m}_peak_gib": rows[m]["peak_gib_max"] for m in rows},
            "memory_ratio_fsdp_over_ddp": rows["fsdp"]["peak_gib_max"] / rows["ddp"]["peak_gib_max"],
            "speed_ratio_fsdp_over_ddp": rows["fsdp"]["pairs_per_s"] / rows["ddp"]["pairs_per_s"],
            **{f"{m}_final_loss": rows[m]["final_loss"] for m in rows}}  # the same training: equal in fp32
        r = report["shapes"][shape]
        print(f"{shape} ({r['parameters'] / 1e6:.0f}M, {ns.nproc} x {batch} pairs x {length} tokens, {ns.dtype}): "
              f"DDP {r['ddp_pairs_per_s']:.1f} pairs/s, {r['ddp_peak_gib']:.2f} GiB; FSDP {r['fsdp_pairs_per_s']:.1f} "
              f"pairs/s, {r['fsdp_peak_gib']:.2f} GiB; FSDP/DDP memory {r['memory_ratio_fsdp_over_ddp']:.2f}x, "
              f"speed {r['speed_ratio_fsdp_over_ddp']:.2f}x", flush=True)
    report["seconds"] = time.perf_counter() - t0
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
