"""Operator counts of one mixed-adapter forward: peft's mixed pass against the fused LoRA step, by adapters mixed.

    PYTHONPATH=src .venv/bin/python benchmarks/lora_mixing_ops.py --adapters 8 --batch 32

A load-independent figure (counts, not time): a MiniLM-shaped BERT (12 blocks, width 384, built from its config
with random weights) carries `--adapters` LoRA adapters (r=8, peft's default targets query and value: 24 LoRA
layers); a batch of `--batch` rows mixes k of them, k = 1..--adapters. Every aten operator the forward dispatches
is counted (`TorchDispatchMode`); `matmul` counts mm, addmm, bmm and baddbmm. The columns per LoRA layer subtract
the base model's own operators (the same forward with every adapter disabled) and divide by the LoRA layers. The
header gives the same for one active adapter on every row (no mixing: BaseLoRA's unmerged pass), the bound.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BertConfig, BertModel

from moerm.encoding import Backbone
from moerm.encoding.adapters import encode_through
from moerm.encoding.fused_lora import fused_step

MATMULS = ("mm", "addmm", "bmm", "baddbmm")


class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def counted(fn) -> tuple[int, int]:
    """(matmuls, all operators) that `fn()` dispatches."""
    with torch.no_grad(), Ops() as ops:
        fn()
    return sum(ops.count[m] for m in MATMULS), sum(ops.count.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536)
    names = [f"d{i}" for i in range(args.adapters)]
    model = get_peft_model(BertModel(cfg), LoraConfig(r=8, lora_alpha=16, init_lora_weights=False), names[0])
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False))
    backbone = Backbone(model.eval(), "mean")
    lora_layers = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    ids = torch.randint(1000, 2000, (args.batch, args.tokens))  # (B, T)
    mask = torch.ones_like(ids)
    with model.disable_adapter():
        base = counted(lambda: backbone(ids, mask))
    single = counted(lambda: backbone(ids, mask))  # one active adapter on every row, BaseLoRA's unmerged pass
    print(f"MiniLM-shaped BERT, {lora_layers} LoRA layers, batch {args.batch} x {args.tokens} tokens; "
          f"base model alone: {base[0]} matmuls, {base[1]} operators per forward; one active adapter: {single[0]} "
          f"matmuls, {(single[1] - base[1]) / lora_layers:.1f} operators per LoRA layer\n")
    print("| adapters mixed | peft matmuls | fused matmuls | peft ops per LoRA layer | fused ops per LoRA layer |")
    print("|---:|---:|---:|---:|---:|")
    for k in range(1, args.adapters + 1):
        rows = [names[i % k] for i in range(args.batch)]  # k distinct adapters, every one present
        with torch.no_grad():
            assert fused_step(model, rows) is not None
        peft = counted(lambda: backbone(ids, mask, adapter_names=rows))
        fused = counted(lambda: encode_through(backbone, ids, mask, None, rows))
        per = lambda c: (c[1] - base[1]) / lora_layers  # noqa: E731
        print(f"| {k} | {peft[0]} | {fused[0]} | {per(peft):.1f} | {per(fused):.1f} |")


if __name__ == "__main__":
    main()
