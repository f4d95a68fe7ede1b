"""Per-device training memory, planned before launching: weights, gradients, optimizer state and activations, for DDP
(every process holds everything) and FSDP (parameters, gradients and optimizer state sharded over N devices).

Parameter counts are exact: the backbone is built from its config on the `meta` device (no memory, no weights
read). The rest is arithmetic, stated where it is made:
- master weights, gradients and AdamW's two moments are float32 (train.fsdp.mixed_precision=bf16 gathers the
  parameters in bf16 for compute; the shards, gradients and optimizer stay float32), 4 + 4 + 8 bytes per trainable
  parameter; frozen parameters cost their weights only (in `model.dtype`);
- FSDP also holds, at a time, the gathered parameters (and their gradients, in backward) of the block it runs and
  the one it prefetches: 2 blocks; with reshard_after_forward off, every block stays gathered from forward to backward;
- activations follow Korthikanti et al. (2022), "Reducing Activation Recomputation in Large Transformer Models":
  per block and token, 34*h + 5*a*s bytes at 16 bits (h hidden, a heads, s sequence length; the 5*a*s term is the
  attention matrix, which fused attention kernels do not keep), doubled at 32 bits; gradient checkpointing keeps
  each block's input (h values per token) and one block's activations. A pair is two sequences of `max_length`.
It is an estimate: allocator fragmentation, communication buckets, CUDA context (~0.5-1 GiB) and the loss's
temporaries come on top.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

GIB = 1024**3


@dataclass
class ModelCounts:
    """What the estimate needs from a backbone: parameter counts and shape."""

    total: int  # every parameter of the backbone
    trainable: int  # those training changes (all for full tuning; adapters for LoRA)
    block: int  # parameters of the largest transformer block
    blocks: int
    hidden: int
    heads: int


@dataclass
class Estimate:
    """Bytes per device, by kind."""

    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def gib(self) -> dict[str, float]:
        return {**{k: v / GIB for k, v in asdict(self).items()}, "total": self.total / GIB}


def count_backbone(name_or_path: str, tuning: str = "full", lora_r: int = 8,
                   lora_targets: list[str] | None = None) -> ModelCounts:
    """Exact counts of a backbone built from its config on the meta device; LoRA adds r*(in+out) per target Linear."""
    from transformers import AutoModel

    from moerm.encoding.backbone import load_config
    from moerm.encoding.blocks import transformer_blocks

    config = load_config(name_or_path)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    _, blocks = transformer_blocks(model)
    block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    if tuning == "full":
        trainable = total
    elif tuning == "lora":
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

        targets = set(lora_targets or PEFT_DEFAULTS.get(config.model_type, ()))  # peft's defaults, as training uses
        trainable = sum(lora_r * (m.in_features + m.out_features) for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets)
        total += trainable
    else:
        raise ValueError(f"tuning must be full or lora for an estimate; got {tuning!r}")
    return ModelCounts(total=total, trainable=trainable, block=block, blocks=len(blocks),
                       hidden=int(config.hidden_size), heads=int(config.num_attention_heads))


def activation_bytes(c: ModelCounts, batch_size: int, max_length: int, bits: int = 32,
                     checkpointing: bool = False) -> float:
    """Activations kept for backward: `batch_size` pairs (2 sequences each) of `max_length` tokens."""
    tokens = 2 * batch_size * max_length
    per_block_token = (34 * c.hidden + 5 * c.heads * max_length) * bits / 16
    if checkpointing:
        return tokens * (c.blocks * c.hidden * bits / 8 + per_block_token)
    return tokens * c.blocks * per_block_token


def estimate(c: ModelCounts, devices: int, batch_size: int, max_length: int, fsdp: bool, weight_bytes: int = 4,
             bf16: bool = False, reshard_after_forward: bool = True, checkpointing: bool = False) -> Estimate:
    """Per-device bytes of one configuration (see the module docstring for what is assumed)."""
    frozen = c.total - c.trainable
    acts = activation_bytes(c, batch_size, max_length, 16 if bf16 else 32, checkpointing)
    if not fsdp:
        return Estimate(weights=4 * c.trainable + weight_bytes * frozen, gradients=4 * c.trainable,
                        optimizer=8 * c.trainable, activations=acts)
    n = devices
    gathered_dtype = 2 if bf16 else 4
    gathered_blocks = 2 if reshard_after_forward else c.blocks
    trainable_frac = c.trainable / c.total
    return Estimate(
        weights=(4 * c.trainable + weight_bytes * frozen) / n + gathered_blocks * c.block * gathered_dtype,
        gradients=4 * c.trainable / n + 2 * c.block * trainable_frac * 4,
        optimizer=8 * c.trainable / n,
        activations=acts,
    )


def plan(c: ModelCounts, devices: int, batch_size: int, max_length: int, **kw: Any) -> dict[str, Any]:
    """DDP and FSDP side by side at `devices` devices, in GiB, with the counts they came from."""
    return {"parameters": c.total, "trainable": c.trainable, "devices": devices, "batch_size": batch_size,
            "max_length": max_length, "ddp": estimate(c, devices, batch_size, max_length, fsdp=False, **kw).gib(),
            "fsdp": estimate(c, devices, batch_size, max_length, fsdp=True, **kw).gib()}
