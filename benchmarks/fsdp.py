"""Peak memory per process and pairs/s of full fine-tuning (AdamW) with DDP and with FSDP, on the same random model,
in one run: moerm's own Trainer, reward model and Bradley-Terry step, under `torchrun --nproc_per_node N`.

    nice -n 19 .venv/bin/python benchmarks/fsdp.py --shape decoder-150m --nproc 2          # CPU, gloo
    .venv/bin/python benchmarks/fsdp.py --shape llama-1b --gpu --dtype bf16                 # one process per GPU

Shapes (random weights built from a config, no download): `tiny` (CI), `decoder-150m` (a Llama-style decoder of
187M parameters), `deberta-v3-large` (DeBERTa-v3-large's shape, 435M) and `llama-1b` (Llama-3.2-1B's shape,
1.24B). Each mode runs `--steps` optimizer steps of `--batch` pairs per process of `--max-length` tokens.
Peak memory: on a GPU, `torch.cuda.max_memory_allocated` over the training steps (weights, gradients, optimizer
state, activations, buffers); on the CPU, the process's peak resident set (VmHWM) over the training steps (the
Linux counter is reset first through /proc/self/clear_refs, after free memory is given back with malloc_trim),
minus its resident set before the model was built (the libraries), so it counts the same things. Memory does not depend on the machine's load;
pairs/s does (quote it only from an idle machine). `--dtype bf16`: FSDP gathers and computes in bf16 (fp32
reductions), DDP autocasts to bf16 (train.mixed_precision); both keep fp32 weights and optimizer state.
Writes its JSON to `--out` (default: printed only); nothing else outside a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # model_type and config fields; random weights
    "tiny": ("llama", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, vocab_size=128)),
    "decoder-150m": ("llama", dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                                   num_attention_heads=16, num_key_value_heads=16, vocab_size=32000)),
    "llama-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                               tie_word_embeddings=True)),
    "deberta-v3-large": ("deberta-v2", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                            num_attention_heads=16, vocab_size=128100, relative_attention=True,
                                            position_buckets=256, max_relative_positions=-1, norm_rel_ebd="layer_norm",
                                            share_att_key=True, pos_att_type=["p2c", "c2p"],
                                            position_biased_input=False, type_vocab_size=0)),
}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _trim() -> None:
    """glibc's malloc_trim(0): return free heap memory to the OS, so the resident set counts what is in use."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def worker(args: argparse.Namespace) -> None:
    """One process of one mode: build, train `--steps` steps, report peak memory and time (rank 0 writes)."""
    import torch
    from transformers import AutoConfig, AutoModel

    from moerm.config import FSDPConfig, TrainConfig
    from moerm.encoding.backbone import Backbone
    from moerm.modules.heads import RewardHead
    from moerm.modules.reward_model import RewardModel
    from moerm.train import distributed
    from moerm.train.pairwise import make_pairwise_step
    from moerm.train.trainer import Trainer

    base = _rss_kib("VmRSS") * 1024  # CPU: the libraries, before any model exists
    model_type, fields = SHAPES[args.shape]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **fields, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    pooling = "last" if model_type == "llama" else "cls"
    model = RewardModel(Backbone(AutoModel.from_config(config), pooling), RewardHead(config.hidden_size))
    n_params = sum(p.numel() for p in model.parameters())
    length, vocab = args.max_length, config.vocab_size
    g = torch.Generator().manual_seed(1)
    n = args.batch * distributed.world_size() * args.steps
    ids = torch.randint(3, vocab, (n, 2, length), generator=g)

    def collate(idx: list[int]) -> dict[str, torch.Tensor]:
        x = ids[torch.tensor(idx)]  # (B, 2, T)
        return {"input_ids": torch.cat([x[:, 0], x[:, 1]]), "attention_mask": torch.ones(2 * len(idx), length,
                                                                                        dtype=torch.long),
                "margin": torch.zeros(len(idx))}

    bf16 = args.dtype == "bf16"
    cfg = TrainConfig(batch_size=args.batch, max_steps=args.steps, lr=1e-5, save_every=0, log_every=args.steps,
                      mixed_precision="bf16" if bf16 and args.mode == "ddp" else "no",
                      fsdp=FSDPConfig(enabled=args.mode == "fsdp", mixed_precision="bf16" if bf16 else "no"))
    out_dir = Path(args.tmp) / args.mode
    dev = distributed.device()
    trainer = Trainer(model, make_pairwise_step(), list(range(n)), collate, cfg, out_dir, progress=False)
    trainer._save = lambda *a, **k: None  # type: ignore[method-assign]  # time and memory of training, not of writing
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        _trim()  # give freed memory (the full copy FSDP replaced by shards) back to the OS, as it would be reused
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    distributed.barrier()
    t0 = time.perf_counter()
    result = trainer.train()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kib("VmHWM") * 1024
    seconds = time.perf_counter() - t0
    used = peak if dev.type == "cuda" else peak - base
    peaks = distributed.gather_rows([used], distributed.world_size())
    if distributed.is_main():
        Path(args.result).write_text(json.dumps({
            "mode": args.mode, "shape": args.shape, "parameters": n_params, "processes": distributed.world_size(),
            "device": dev.type, "dtype": args.dtype, "steps": result.steps, "batch_per_process": args.batch,
            "max_length": length, "peak_bytes_per_process": peaks, "peak_gib_max": max(peaks) / 1024**3,
            "pairs_per_s": args.batch * distributed.world_size() * result.steps / seconds, "seconds": seconds,
            "final_loss": result.final_metrics.get("train_loss")}))


def run_mode(mode: str, args: argparse.Namespace, tmp: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    if not args.gpu:
        env["ACCELERATE_USE_CPU"] = "true"
    result = tmp / f"{mode}.json"
    launcher = ([str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={args.nproc}"]
                if args.nproc > 1 else [sys.executable])
    cmd = [*launcher, str(Path(__file__).resolve()), "--worker", "--mode", mode, "--shape", args.shape,
           "--batch", str(args.batch), "--max-length", str(args.max_length), "--steps", str(args.steps),
           "--dtype", args.dtype, "--tmp", str(tmp), "--result", str(result)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if res.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="decoder-150m")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="pairs per process per step")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--gpu", action="store_true", help="one process per GPU (nccl)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mode")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = {mode: run_mode(mode, args, Path(tmp)) for mode in ("ddp", "fsdp")}
    ddp, fsdp = rows["ddp"], rows["fsdp"]
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "ddp": ddp, "fsdp": fsdp,
              "memory_ratio_fsdp_over_ddp": fsdp["peak_gib_max"] / ddp["peak_gib_max"],
              "speed_ratio_fsdp_over_ddp": fsdp["pairs_per_s"] / ddp["pairs_per_s"]}
    print(f"{args.shape}: {ddp['parameters'] / 1e6:.0f}M parameters, {args.nproc} processes on {ddp['device']}, "
          f"{args.dtype}, batch {args.batch} x {args.max_length} tokens, {args.steps} steps")
    for row in (ddp, fsdp):
        print(f"  {row['mode']:5} peak {row['peak_gib_max']:.3f} GiB/process  {row['pairs_per_s']:.2f} pairs/s")
    print(f"  FSDP / DDP: memory {report['memory_ratio_fsdp_over_ddp']:.3f}x, "
          f"pairs/s {report['speed_ratio_fsdp_over_ddp']:.3f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
