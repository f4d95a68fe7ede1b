"""K LoRA experts on one frozen base, evaluated together: the shared trunk runs once, only adapted layers fan out.

Experts adapt only the top `expert_layers` transformer blocks (peft `layers_to_transform`), so every block below is
identical for all experts. `ExpertBank.states(..., mode="batched")` works in two passes:

1. the trunk: the model runs on the N inputs only up to the first adapted block, whose hidden-state input (N, T, H)
   a forward pre-hook catches (and stops the pass by raising a private exception);
2. the top: the model runs on the inputs repeated K times (row i -> rows i*K .. i*K+K-1), so it builds its own masks,
   position and relative-position embeddings for N*K rows; the lower blocks are replaced by pass-throughs and the
   first adapted block is fed the caught states, repeated the same way. Each row goes through its own expert
   (`adapters.route_rows`): one peft mixed-adapter batch, or, where the architecture cannot mix adapters (DeBERTa-v3),
   one pass per expert over the N rows.

Nothing is inferred from tensor shapes, so the result is exactly that of `mode="sequential"`, the reference: K full
passes, one `set_adapter` each. The lower blocks run once per input; the top blocks once per (input, expert); only the
embedding lookup and mask construction are repeated for N*K rows.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from moerm.encoding.adapters import Rows, active_adapter, route_rows
from moerm.encoding.backbone import Backbone, decoder_position_ids, pooled
from moerm.encoding.blocks import fed_from_trunk, transformer_blocks, trunk_states
from moerm.encoding.trunk import inference_states


class ExpertBank(nn.Module):
    """A Backbone whose model is a PeftModel holding one adapter per expert; pooled states of all experts."""

    def __init__(self, backbone: Backbone, experts: Sequence[str], first_expert_layer: int):
        super().__init__()
        if not isinstance(backbone.model, PeftModel):
            raise TypeError("ExpertBank needs a backbone whose model is a PeftModel with the expert adapters")
        _, blocks = transformer_blocks(backbone.model)
        below = [f"{i}.{n}" for i in range(first_expert_layer) for n, m in blocks[i].named_modules()
                 if isinstance(m, LoraLayer)]
        if below:  # the trunk is shared only if no adapter touches it
            raise ValueError(f"blocks below first_expert_layer={first_expert_layer} carry LoRA ({below[0]}, ...)")
        self.backbone = backbone
        self.experts = list(experts)
        self.first_expert_layer = first_expert_layer

    @property
    def peft(self) -> PeftModel:
        return self.backbone.model  # type: ignore[return-value]

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
               mode: str = "batched") -> torch.Tensor:
        """Pooled last hidden states (N, K, H) of every expert for every input (call under no_grad, in eval mode)."""
        n, k = input_ids.shape[0], len(self.experts)
        if mode == "sequential":
            out = []
            for name in self.experts:
                with active_adapter(self.peft, name):
                    out.append(self.backbone(input_ids, attention_mask, token_type_ids))  # (N, H)
            return torch.stack(out, dim=1)  # (N, K, H)
        if mode != "batched":
            raise ValueError(f"mode must be batched or sequential; got {mode!r}")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}  # (N, T) each, as Backbone passes them
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if self.backbone.decoder_positions:
            inputs["position_ids"] = decoder_position_ids(attention_mask)
        _, blocks = transformer_blocks(self.peft)
        first = self.first_expert_layer
        repeated = {key: v.repeat_interleave(k, dim=0) for key, v in inputs.items()}  # (N*K, T)
        names = [name for _ in range(n) for name in self.experts]  # row i*K + j -> expert j
        cached = inference_states(self.backbone, inputs, first) if first > 0 else None  # trunk_cache_at_inference
        trunk, like = cached or (trunk_states(self.peft, blocks, first, inputs) if first > 0 else (None, None))  # (N, T, H)
        trunk = trunk.repeat_interleave(k, dim=0) if trunk is not None else None  # (N*K, T, H)

        def run(rows: Rows, adapter_names: list[str] | None) -> torch.Tensor:
            extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
            feed = fed_from_trunk(blocks, first, trunk[rows], like) if trunk is not None else nullcontext()
            with feed:
                return self.peft(**{key: v[rows] for key, v in repeated.items()}, **extra).last_hidden_state  # (b, T, H)

        hidden = route_rows(self.peft, names, run)  # (N*K, T, H)
        return pooled(hidden, repeated["attention_mask"], self.backbone.pooling).view(n, k, -1)  # (N, K, H)
