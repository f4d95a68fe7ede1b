"""A reward model exported by `moerm export`, for Hugging Face transformers (plain code, no moerm needed).

    AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)

gives one logit per input (`.logits`, shape (B, 1)): the reward moerm gives for the same token ids. It is the
backbone (BASE_MODEL, the stock model class of the base's architecture, under BASE_PREFIX), pooled as moerm pools
(`config.moerm_reward`: first real token, masked mean or last real token, all from the attention mask, so right and
left padding agree), then moerm's head: `score` is a Linear (with a bias) or a small MLP (Linear -> GELU -> Dropout
-> Linear).

config.json's `model_type` is `moerm_reward`, which no stock transformers class claims: loading the folder without
`trust_remote_code=True` is an error, never the stock class of the base with a freshly initialised head. The config
class is the base's own config class under a new model type, and keeps the base's class name, so code that looks
the base model up from the config's class (`AutoModel.from_pretrained(DIR, trust_remote_code=True)`, OpenRLHF's
reward-model loader) finds the stock backbone.

Truncation: moerm keeps the response's start and trims the prompt from its left (`config.moerm_reward["truncation"]`);
the exported tokenizer truncates from the left with `model_max_length` set to moerm's `max_length`.
"""

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

BASE_PREFIX = "model"  # the base model's attribute (and weight-key prefix); `moerm export` writes the backbone's own
BASE_CONFIG = "BertConfig"  # the stock config class of the base architecture; `moerm export` writes the base's own
BASE_MODEL = "BertModel"  # the stock model class of the base architecture; `moerm export` writes the base's own
MODEL_TYPE = "moerm_reward"

# The base's config class under a model type of its own; the class name stays the base's (see the docstring).
MoermRewardConfig = type(BASE_CONFIG, (getattr(transformers, BASE_CONFIG),), {"model_type": MODEL_TYPE})


def pool(hidden, attention_mask, pooling):
    """Token states (B, T, H) -> float32 (B, H): the first real token, the masked mean, or the last real token."""
    mask = attention_mask.long()
    rows = torch.arange(hidden.size(0), device=hidden.device)
    if pooling == "cls":
        return hidden[rows, mask.argmax(1)].float()
    if pooling == "mean":
        total = (hidden * mask.unsqueeze(-1).to(hidden.dtype)).sum(1, dtype=torch.float32)
        return total / mask.sum(1, keepdim=True).clamp(min=1)
    if pooling == "last":
        positions = torch.arange(hidden.size(1), device=hidden.device)
        return hidden[rows, (mask * positions).argmax(1)].float()
    raise ValueError(f"unknown pooling {pooling!r}")


class MoermRewardModel(PreTrainedModel):
    config_class = MoermRewardConfig
    base_model_prefix = BASE_PREFIX
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config):
        super().__init__(config)
        spec = config.moerm_reward
        base = getattr(transformers, BASE_MODEL)(config)
        if getattr(base, "pooler", None) is not None:
            base.pooler = None  # BERT-style poolers are not part of a moerm reward model
        setattr(self, BASE_PREFIX, base)
        hidden = config.hidden_size
        if spec["head"] == "linear":
            self.score = nn.Linear(hidden, 1)
        elif spec["head"] == "mlp":
            self.score = nn.Sequential(nn.Linear(hidden, spec["head_hidden"]), nn.GELU(),
                                       nn.Dropout(spec.get("head_dropout", 0.0)), nn.Linear(spec["head_hidden"], 1))
        else:
            raise ValueError(f"unknown moerm head {spec['head']!r}")
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                return_dict=None, **kwargs):
        spec = self.config.moerm_reward
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if spec.get("decoder_positions"):
            # positions counted over real tokens, so a left-padded row starts at 0 like an unpadded one
            inputs["position_ids"] = (position_ids if position_ids is not None
                                      else (attention_mask.long().cumsum(-1) - 1).clamp(min=0))
        hidden = getattr(self, BASE_PREFIX)(**inputs).last_hidden_state  # (B, T, H)
        features = pool(hidden, attention_mask, spec["pooling"])  # (B, H)
        logits = self.score(features.to(next(self.score.parameters()).dtype))  # (B, 1)
        loss = None
        if labels is not None:  # as HF's regression heads with num_labels 1
            loss = nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
        return SequenceClassifierOutput(loss=loss, logits=logits)
