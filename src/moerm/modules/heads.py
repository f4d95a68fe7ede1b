"""Reward heads: pooled features (N, H) -> scalar rewards (N,)."""

from __future__ import annotations

import torch
from torch import nn


class RewardHead(nn.Module):
    """A linear layer, or a small MLP (Linear -> GELU -> Dropout -> Linear), producing one reward per row."""

    def __init__(self, hidden_size: int, kind: str = "linear", hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.net: nn.Module = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, 1))
        elif kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(hidden_size, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
            )
        else:
            raise ValueError(f"unknown head kind {kind!r} (linear | mlp)")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)  # (N, H) -> (N,)


# The score heads of Hugging Face `*ForSequenceClassification` reward models, by model_type: whether a dense layer
# and which activation come before the output layer, and whether that layer has a bias.
HF_HEAD_STYLES = {
    "bert": "pooler",  # BertPooler (dense + tanh on [CLS]), dropout, classifier
    "deberta-v2": "context-pooler",  # ContextPooler (dropout, dense + pooler_hidden_act on [CLS]), dropout, classifier
    "roberta": "classification-head",  # RobertaClassificationHead: dropout, dense, tanh, dropout, out_proj on <s>
    "xlm-roberta": "classification-head",
}
DECODER_HEAD = "score"  # decoders: a bias-free `score` Linear on the last non-padding token


class HFScoreHead(nn.Module):
    """The score head of a Hugging Face sequence-classification RM, on pooled features (N, H) -> rewards (N,).

    The backbone pools as the HF class does ([CLS]/<s> for encoders, the last token for decoders), so
    `dense` (optional) -> activation -> `out` reproduces the HF head's logits; `style` names which one it is.
    """

    def __init__(self, hidden_size: int, style: str, activation: str | None = None, dropout: float = 0.0):
        super().__init__()
        from transformers.activations import ACT2FN

        if style not in (*set(HF_HEAD_STYLES.values()), DECODER_HEAD):
            raise ValueError(f"unknown HF head style {style!r}")
        self.style = style
        self.activation = activation or ("tanh" if style in ("pooler", "classification-head") else None)
        self.dense = nn.Linear(hidden_size, hidden_size) if style != DECODER_HEAD else None
        self.act = ACT2FN[self.activation] if self.activation else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, 1, bias=style != DECODER_HEAD)

    @classmethod
    def for_config(cls, config) -> "HFScoreHead":
        """The head of the HF sequence-classification class for `config` (a transformers PretrainedConfig)."""
        style = HF_HEAD_STYLES.get(config.model_type, DECODER_HEAD)
        act = getattr(config, "pooler_hidden_act", "gelu") if style == "context-pooler" else None
        if style == "context-pooler" and getattr(config, "pooler_hidden_size", config.hidden_size) != config.hidden_size:
            raise ValueError("DeBERTa-v2 pooler_hidden_size must equal hidden_size")
        drop = getattr(config, "classifier_dropout", None) or getattr(config, "cls_dropout", None)
        drop = drop if drop is not None else getattr(config, "hidden_dropout_prob", 0.0)
        return cls(int(config.hidden_size), style, act, float(drop or 0.0) if style != DECODER_HEAD else 0.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features  # (N, H)
        if self.dense is not None:
            x = self.act(self.dense(self.dropout(x) if self.style != "pooler" else x))
        return self.out(self.dropout(x)).squeeze(-1)  # (N,)
