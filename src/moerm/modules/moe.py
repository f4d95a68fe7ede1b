"""Sparse mixture of feed-forward experts with noisy top-k gating (Shazeer et al. 2017, "Outrageously Large
Neural Networks"), including its importance and load auxiliary losses. Pure modules, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions.normal import Normal

from moerm.errors import UserError


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation: zero when all entries are equal (balanced experts)."""
    if x.numel() <= 1:
        return x.new_zeros(())
    x = x.float()
    return x.var() / (x.mean() ** 2 + eps)


class FeedForwardExpert(nn.Module):
    """Linear(H -> F) -> GELU -> Dropout -> Linear(F -> H)."""

    def __init__(self, hidden: int, ffn: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class GateOutput:
    gates: torch.Tensor  # (B, E): softmax over the top-k noisy logits, zero elsewhere
    top_idx: torch.Tensor  # (B, k): chosen experts, best first
    top_w: torch.Tensor  # (B, k): their gate weights
    aux_loss: torch.Tensor  # (): w_importance * CV(importance)^2 + w_load * CV(load)^2


class NoisyTopKGate(nn.Module):
    """H(x) = x W_g + N(0,1) * softplus(x W_noise) (noise in training only); G(x) = softmax(KeepTopK(H(x), k))."""

    def __init__(self, hidden: int, num_experts: int, k: int, w_importance: float = 0.01, w_load: float = 0.01,
                 noise_eps: float = 1e-2):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise UserError(f"top-k must be between 1 and the number of experts ({num_experts}), got {k}")
        self.num_experts, self.k = num_experts, k
        self.w_importance, self.w_load, self.noise_eps = w_importance, w_load, noise_eps
        # Zero init as in the paper: experts start equally likely, the noise breaks ties while training.
        self.w_gate = nn.Parameter(torch.zeros(hidden, num_experts))
        # With k == E every expert is always chosen: no noise is used, so its weights do not train.
        self.w_noise = nn.Parameter(torch.zeros(hidden, num_experts), requires_grad=k < num_experts)

    def forward(self, x: torch.Tensor) -> GateOutput:
        clean = x @ self.w_gate  # (B, E)
        noisy_training = self.training and self.k < self.num_experts
        if noisy_training:
            noise_std = F.softplus(x @ self.w_noise) + self.noise_eps  # (B, E)
            logits = clean + torch.randn_like(clean) * noise_std
        else:
            logits = clean
        m = min(self.k + 1, self.num_experts)
        top_logits, top_idx = logits.topk(m, dim=-1)  # (B, m)
        k_logits, k_idx = top_logits[:, : self.k], top_idx[:, : self.k]
        k_w = torch.softmax(k_logits, dim=-1)  # (B, k)
        gates = torch.zeros_like(logits).scatter(1, k_idx, k_w)  # (B, E)
        importance = gates.sum(0)  # (E,)
        if noisy_training:
            load = self._prob_in_top_k(clean, logits, noise_std, top_logits).sum(0)  # (E,), differentiable
        else:
            load = (gates > 0).float().sum(0)
        aux = self.w_importance * cv_squared(importance) + self.w_load * cv_squared(load)
        return GateOutput(gates=gates, top_idx=k_idx, top_w=k_w, aux_loss=aux)

    def _prob_in_top_k(self, clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor,
                       top_logits: torch.Tensor) -> torch.Tensor:
        """P(expert i stays in the top k when only its own noise is resampled): the smooth load estimator."""
        normal = Normal(torch.zeros((), device=clean.device), torch.ones((), device=clean.device))
        thr_if_in = top_logits[:, self.k : self.k + 1]  # (B, 1): the (k+1)-th value, to beat if i is in
        thr_if_out = top_logits[:, self.k - 1 : self.k]  # (B, 1): the k-th value, to beat if i is out
        is_in = noisy > thr_if_in
        p_in = normal.cdf((clean - thr_if_in) / noise_std)
        p_out = normal.cdf((clean - thr_if_out) / noise_std)
        return torch.where(is_in, p_in, p_out)  # (B, E)


class SparseMoE(nn.Module):
    """y = sum over the top-k experts of gate_i(x) * expert_i(x); experts in a ModuleDict keyed by name."""

    def __init__(self, hidden: int, num_experts: int = 8, k: int = 2, ffn: int | None = None, dropout: float = 0.0,
                 w_importance: float = 0.01, w_load: float = 0.01):
        super().__init__()
        self.names = [f"expert_{i}" for i in range(num_experts)]
        self.experts = nn.ModuleDict({n: FeedForwardExpert(hidden, ffn or 2 * hidden, dropout) for n in self.names})
        self.gate = NoisyTopKGate(hidden, num_experts, k, w_importance, w_load)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, GateOutput]:
        g = self.gate(x)  # gates (B, E)
        y = torch.zeros_like(x)  # (B, H)
        for e, name in enumerate(self.names):
            rows = g.gates[:, e].nonzero(as_tuple=True)[0]  # only the inputs routed to this expert
            # An expert with no rows still runs (on 0 rows: no arithmetic), so its parameters stay in the autograd
            # graph with zero gradients: multi-process DDP needs every trainable parameter to get a gradient,
            # and this keeps its fast path (no find_unused_parameters).
            y = y.index_add(0, rows, g.gates[rows, e].unsqueeze(-1) * self.experts[name](x[rows]))
        return y, g
