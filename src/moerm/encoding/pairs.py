"""Prompt/response pairs as token ids: token-exact truncation, pair special tokens, decoder chat templates."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from moerm.encoding.backbone import BackboneError, is_decoder, load_config, load_tokenizer

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
        """The pair's token ids (input_ids, attention_mask and, where the model reads them, token_type_ids).
        After `remember(n)` the last n pairs' encodings are kept and handed out again: do not change them."""
        remembered = self.__dict__.get("_remembered")
        return remembered(prompt, response) if remembered is not None else self._encode(prompt, response)

    def remember(self, pairs: int) -> None:
        """Keep the encodings of the `pairs` most recently encoded pairs (least recently used dropped first), so
        code that reads a pair's tokens more than once tokenizes it once: the server's token-budget planner, its
        `usage` count and the scoring call all encode each request's pairs (thread-safe; 0 turns it off)."""
        self.__dict__["_remembered"] = functools.lru_cache(maxsize=pairs)(self._encode) if pairs > 0 else None

    def _encode(self, prompt: str, response: str) -> dict[str, list[int]]:
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
        with_trunk = sum("trunk" in e for e in encoded)
        if with_trunk:  # `top` tuning: the cached trunk states (encoding.trunk.attach_trunk) travel with the ids
            if with_trunk != len(encoded):
                raise ValueError("a batch mixes sequences with and without cached trunk states")
            from moerm.encoding.trunk import padded_states

            batch["trunk_states"] = padded_states(encoded, width, left)  # (B, T, H)
        return batch


def max_positions(config) -> int | None:
    """The longest sequence the backbone's position embeddings cover (None when the config does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            if "roberta" in getattr(config, "model_type", ""):  # RoBERTa's positions start after the padding index
                value -= (getattr(config, "pad_token_id", 1) or 1) + 1
            return value
    return None


def make_encoder(name_or_path: str, max_length: int) -> PairEncoder:
    """The pair encoder of a backbone; a max_length past its position embeddings is refused here, when a system is
    built, not later on the first long input."""
    tok = load_tokenizer(name_or_path)
    config = load_config(name_or_path)
    limit = max_positions(config)
    if limit is not None and max_length > limit:
        from moerm.config import ConfigError

        raise ConfigError(f"max_length {max_length} is longer than backbone {name_or_path!r} can read ({limit} "
                          f"positions): set model.max_length (or options.router_max_length) to at most {limit}")
    return PairEncoder(tok, max_length, decoder=is_decoder(config))
