"""MoRE (Namgoong et al. 2024): one RM whose head is a sparse MoE with an internal router.

backbone -> LayerNorm -> sparse MoE (noisy top-k gating over FFN experts, Shazeer et al. 2017) -> LayerNorm ->
regression layer. Trained on all domains together like the baseline, plus the load-balancing auxiliary loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from moerm.config import RunConfig
from moerm.inference import batched_forward
from moerm.modules.moe import GateOutput, SparseMoE
from moerm.systems.base import ScoreOutput, register
from moerm.systems.baseline import ROUTE, BaselineSystem
from moerm.systems.calibration import CalibrationOptions


@dataclass
class MoREOptions(CalibrationOptions):
    num_experts: int = 8
    top_k: int = 2
    expert_ffn: int | None = None  # hidden width of each FFN expert (default 2 x H)
    expert_dropout: float = 0.1
    w_importance: float = 0.01  # importance term of the balancing loss
    w_load: float = 0.01  # load term of the balancing loss


class MoREHead(nn.Module):
    """Features (N, H) -> LayerNorm -> SparseMoE -> LayerNorm -> Linear -> rewards (N,)."""

    def __init__(self, hidden: int, opts: MoREOptions):
        super().__init__()
        self.norm_in = nn.LayerNorm(hidden)
        self.moe = SparseMoE(hidden, opts.num_experts, opts.top_k, opts.expert_ffn, opts.expert_dropout,
                             opts.w_importance, opts.w_load)
        self.norm_out = nn.LayerNorm(hidden)
        self.regression = nn.Linear(hidden, 1)
        self.aux_loss: torch.Tensor | None = None
        self.last_gate: GateOutput | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        y, gate = self.moe(self.norm_in(features))  # (N, H)
        self.aux_loss, self.last_gate = gate.aux_loss, gate
        return self.regression(self.norm_out(y)).squeeze(-1)  # (N,)


@register
class MoRESystem(BaselineSystem):
    """The baseline with a sparse-MoE head; `score` reports each input's experts and gate weights."""

    name = "more"
    options_class = MoREOptions
    # The regression reads LayerNormed features (unit scale per dimension, not the backbone's small pooled ones), so
    # at the backbone's top rate (1e-3) its reward moves several times faster than the linear head's: on
    # cpu-medium's data (100 pairs per domain, top-1) training diverged early (loss 1.47 at step 20) and ended at
    # chance (50.0% held-out); with head_lr 1e-4, 57.2% (docs/RESULTS.md, the MoRE head rate).
    default_head_lr = {"full": 1e-4, "top": 1e-4}

    @classmethod
    def make_head(cls, config: RunConfig, hidden_size: int) -> nn.Module:
        from moerm.config import from_dict

        return MoREHead(hidden_size, from_dict(MoREOptions, config.options, "options"))

    def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None = None,
              batch_size: int = 32, mode: str | None = None) -> ScoreOutput:
        self.check_mode(mode)
        self.model.eval()
        head: MoREHead = self.head  # type: ignore[assignment]

        def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            r = self.model(**batch)  # (b,)
            g = head.last_gate
            assert g is not None
            return torch.cat([r.unsqueeze(-1), g.top_idx.float(), g.top_w], dim=-1)  # (b, 1 + 2k)

        out = batched_forward(forward, self.encoder, prompts, responses, batch_size, self.device)
        k = (out.shape[1] - 1) // 2 if out.numel() else 0
        names = head.moe.names
        details = [{"system": self.name,
                    "experts": [names[int(i)] for i in row[1 : 1 + k]],
                    "expert_weights": [float(w) for w in row[1 + k :]]} for row in out]
        if not out.numel():
            return ScoreOutput([], details)
        if self.calibration.kind != "none":
            for d, r in zip(details, out[:, 0].tolist()):
                d.update(raw_reward=r, calibration=self.calibration.kind)
        return ScoreOutput(self.calibration(ROUTE, out[:, 0]).tolist(), details)
