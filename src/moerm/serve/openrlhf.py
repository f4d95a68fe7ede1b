"""Splitting OpenRLHF queries (prompt + response as one decoded string) back into the plain prompt and response.

OpenRLHF's remote reward protocol posts `{"query": [...], "prompts": [...], "labels": [...]}`: each query is the
policy's whole sequence decoded with its special tokens (`tokenizer.decode(prompt_ids + response_ids,
skip_special_tokens=False)`: the chat template's markup, a final EOS, and in older clients that decode a padded
batch, left and right padding); `prompts[i]` is the prompt text as the policy was given it
(`apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`). The reward system must see what
`moerm score` sees for the same pair: the user's words and the response, no markup, no padding, no system block.

A `ChatFormat` is the literal text a chat template puts around message contents: the opener before the first user
turn (which may hold a default system block, as Qwen2.5's does), the optional system block, the text between a user
turn and the assistant's reply (the generation prompt), between a reply and the next user turn, and after a reply.
Presets: `chatml`, `llama3`, `hh`, `plain`; `auto` (the run's backbone tokenizer) and `tokenizer:PATH` derive it
from a tokenizer's own chat template; a string with `{prompt}` and `{response}` is a single-turn format.

For query i (`QuerySplitter.split`):
1. Padding / boundary tokens (`strip_tokens`: the format's and the tokenizer's BOS, EOS and pad) are removed from
   both ends of the query and from the start of `prompts[i]`.
2. With `prompts[i]`: the query must start with it (else an error, never a guess), the response is the rest. The
   prompt must itself parse in the format (opener, turns, generation prompt at its end), else an error.
   Without `prompts`: the query must start with the format's opener; the response is what follows its last
   generation prompt (a format without one, `plain`, cannot split a query alone: an error).
3. The prompt's turns become the plain prompt (`moerm.integrations.conversation.conversation_prompt`): a system
   block is dropped, one user turn is its text, several turns an HH transcript. The reply's closing markup (all of
   it, or without its trailing whitespace, as a generation ending in EOS leaves it) is removed from the response.

Anything that does not fit raises `SplitError` naming the item and what was expected.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moerm.errors import UserError
from moerm.integrations.conversation import conversation_prompt

# Padding / sequence-boundary tokens a decoded sequence may carry at either end, whatever the format.
DEFAULT_STRIP_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|end_of_text|>", "<|begin_of_text|>", "<pad>", "[PAD]",
                                         "<s>", "</s>")
# Chat markup that must not survive into a `plain` prompt or response: its presence means the format is wrong.
CHAT_MARKERS: tuple[str, ...] = ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|eot_id|>", "[INST]",
                                 "<start_of_turn>", "<|user|>", "<|assistant|>")
# Message contents that no real conversation holds, rendered through a chat template to find its markup.
_SYSTEM, _USER, _ASSISTANT, _USER2 = "\ue000SYSTEM\ue001", "\ue000USER\ue001", "\ue000ASSISTANT\ue001", "\ue000NEXT\ue001"


class SplitError(UserError):
    """Item `index` of the request's `field` ("query" or "prompts") could not be split into prompt and response."""

    def __init__(self, index: int, message: str, field: str = "query"):
        super().__init__(message)
        self.index, self.field = index, field


@dataclass(frozen=True)
class ChatFormat:
    """The literal text a chat template puts around message contents.

    Attributes:
        name: how errors and /v1/info name it.
        user_open: text that may open a conversation before its first user content (several: e.g. with and without
            a leading newline); Qwen2.5's includes its default system block.
        reply: between a user content and the assistant's content: the generation prompt ends the prompt text.
            Empty for `plain` (no markup: a query cannot be split without `prompts`).
        reply_close: after an assistant content (`<|im_end|>\\n`); its whitespace-trimmed form also matches.
        turn: between an assistant content and the next user content; None: single-turn (everything between the
            opener and the last `reply` is one user prompt).
        system_open, system_close: the text before a system content and between it and the first user content;
            None: the format has no system turns.
        strip_tokens: tokens removed from the ends of queries (and the start of prompts) before anything else.
        plain: no markup at all: surrounding whitespace is trimmed (the tokenizer's word boundary) and chat markup
            inside the text is an error (a sign the policy used a chat template).
    """

    name: str
    user_open: tuple[str, ...]
    reply: str
    reply_close: str = ""
    turn: str | None = None
    system_open: str | None = None
    system_close: str | None = None
    strip_tokens: tuple[str, ...] = DEFAULT_STRIP_TOKENS
    plain: bool = False

    def describe(self) -> dict[str, Any]:
        """The format as JSON (for /v1/info)."""
        return {"name": self.name, "user_open": list(self.user_open), "reply": self.reply,
                "reply_close": self.reply_close, "turn": self.turn, "system_open": self.system_open,
                "system_close": self.system_close, "strip_tokens": list(self.strip_tokens)}


def _dedup(tokens: Sequence[str | None]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t for t in tokens if t))


PRESETS: dict[str, ChatFormat] = {
    "chatml": ChatFormat("chatml", ("<|im_start|>user\n",), "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n",
                         "<|im_end|>\n<|im_start|>user\n", "<|im_start|>system\n", "<|im_end|>\n<|im_start|>user\n",
                         _dedup([*DEFAULT_STRIP_TOKENS, "<|im_end|>"])),
    "llama3": ChatFormat("llama3", ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",),
                         "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>",
                         "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
                         "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n",
                         "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
                         _dedup([*DEFAULT_STRIP_TOKENS, "<|eot_id|>"])),
    "hh": ChatFormat("hh", ("\n\nHuman: ", "Human: "), "\n\nAssistant: ", "", "\n\nHuman: "),
    "plain": ChatFormat("plain", ("",), "", plain=True),
}
QUERY_FORMATS = (*PRESETS, "auto")
TOKENIZER_PREFIX = "tokenizer:"


def template_format(template: str, strip_tokens: Sequence[str] = DEFAULT_STRIP_TOKENS) -> ChatFormat:
    """A single-turn format from a `{prompt}<separator>{response}` string, e.g. `Question: {prompt}\\nAnswer: {response}`."""
    p, r = template.find("{prompt}"), template.find("{response}")
    if p < 0 or r < 0 or template.count("{prompt}") != 1 or template.count("{response}") != 1 or r < p:
        raise UserError(f"query_template must be one of {', '.join(QUERY_FORMATS)}, {TOKENIZER_PREFIX}PATH, or "
                        f"contain '{{prompt}}' then '{{response}}' once each; got {template!r}")
    if r == p + len("{prompt}"):
        raise UserError("query_template needs a separator between {prompt} and {response}, or a query cannot be "
                        f"split; got {template!r}")
    return ChatFormat("custom", (template[:p],), template[p + len("{prompt}"):r], template[r + len("{response}"):],
                      strip_tokens=tuple(strip_tokens))


def check_query_template(spec: str) -> None:
    """Refuse a query template that can never work (checked at start-up; `auto` and tokenizers load later)."""
    if spec in QUERY_FORMATS:
        return
    if spec.startswith(TOKENIZER_PREFIX):
        if not spec[len(TOKENIZER_PREFIX):]:
            raise UserError(f"query_template {spec!r}: name the policy's tokenizer, e.g. tokenizer:Qwen/Qwen2.5-7B-"
                            "Instruct or tokenizer:/path/to/policy")
        return
    template_format(spec)


def _between(text: str, before: str, after: str) -> str:
    """The text between the end of `before` and the start of `after` in `text` (each must occur once, in order)."""
    i, j = text.find(before), text.find(after)
    if before not in text or after not in text or j < i + len(before):
        raise ValueError("contents not rendered once, in order")
    return text[i + len(before):j]


def format_from_tokenizer(tokenizer: Any, name: str) -> ChatFormat:
    """The format of a tokenizer's chat template, read from renders of marker conversations; a tokenizer without a
    template is `plain` (its BOS / EOS / pad tokens stripped).

    Raises:
        UserError: the template renders a conversation in a way this splitter cannot undo (e.g. a generation prompt
            that differs from the assistant header it writes for a past reply, or contents it rewrites).
    """
    specials = _dedup([*DEFAULT_STRIP_TOKENS, getattr(tokenizer, "bos_token", None),
                       getattr(tokenizer, "eos_token", None), getattr(tokenizer, "pad_token", None)])
    if not getattr(tokenizer, "chat_template", None):
        return replace(PRESETS["plain"], name=name, strip_tokens=specials)

    def render(messages: list[dict[str, str]], generation: bool) -> str:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation))

    user, assistant = {"role": "user", "content": _USER}, {"role": "assistant", "content": _ASSISTANT}
    try:
        one = render([user], True)
        opener, reply = one[:one.index(_USER)], one[one.index(_USER) + len(_USER):]
        closed = render([user, assistant], False)
        if _between(closed, _USER, _ASSISTANT) != reply or not closed.startswith(opener + _USER):
            raise ValueError(f"the generation prompt {reply!r} is not the text before a past reply")
        reply_close = closed[closed.index(_ASSISTANT) + len(_ASSISTANT):]
    except ValueError as e:
        raise UserError(f"cannot read the chat format of {name}'s chat template ({e}); name a preset with "
                        f"--query-template ({', '.join(PRESETS)}) or a '{{prompt}} ... {{response}}' string") from None
    turn: str | None = None
    try:  # multi-turn: the text between a past reply and the next user turn
        multi = render([user, assistant, {"role": "user", "content": _USER2}], True)
        if multi.endswith(_USER2 + reply) and multi.startswith(opener + _USER + reply + _ASSISTANT):
            turn = _between(multi, _ASSISTANT, _USER2)
    except Exception:  # noqa: BLE001 - jinja2 TemplateError or whatever a strict template raises
        turn = None
    system_open = system_close = None
    try:  # a system block (Qwen2.5's default one is in the opener; a given one replaces it)
        sys_text = render([{"role": "system", "content": _SYSTEM}, user], True)
        if sys_text.endswith(_USER + reply):
            system_open, system_close = sys_text[:sys_text.index(_SYSTEM)], _between(sys_text, _SYSTEM, _USER)
    except Exception:  # noqa: BLE001
        system_open = system_close = None
    return ChatFormat(name, (opener,), reply, reply_close, turn, system_open, system_close, specials)


def run_backbone(run_dir: str | Path) -> str:
    """The backbone (HF name or path) a saved run was trained on, read from its system file."""
    from moerm.systems.base import SYSTEM_FILE, find_model_dir

    path = find_model_dir(run_dir) / SYSTEM_FILE
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["config"]["model"]["backbone"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: cannot read the run's backbone for --query-template auto ({e})") from None


def resolve_format(spec: str, strip_tokens: Sequence[str] = (), backbone: str | None = None) -> ChatFormat:
    """The chat format `spec` names: a preset, `auto` (the chat template of `backbone`'s tokenizer),
    `tokenizer:PATH` (that tokenizer's), or a `{prompt}...{response}` string. `strip_tokens` are added to the
    format's own."""
    if spec in PRESETS:
        fmt = PRESETS[spec]
    elif spec == "auto" or spec.startswith(TOKENIZER_PREFIX):
        from moerm.encoding import load_tokenizer

        if spec == "auto":
            if backbone is None:
                raise UserError("--query-template auto reads the chat template of the run's backbone, and this "
                                "reward system has none to read; name a preset or tokenizer:PATH of the policy")
            tok = load_tokenizer(backbone)
            if not getattr(tok, "chat_template", None):
                raise UserError(f"--query-template auto: the run's backbone {backbone!r} has no chat template, so "
                                "it says nothing about the policy's format; use tokenizer:PATH of the policy, a "
                                f"preset ({', '.join(PRESETS)}), or plain if the policy writes plain text")
            fmt = format_from_tokenizer(tok, f"auto ({backbone})")
        else:
            path = spec[len(TOKENIZER_PREFIX):]
            fmt = format_from_tokenizer(load_tokenizer(path), f"tokenizer {path}")
    else:
        fmt = template_format(spec)
    return replace(fmt, strip_tokens=_dedup([*fmt.strip_tokens, *strip_tokens]))


@dataclass
class QuerySplitter:
    """Splits OpenRLHF queries in one `ChatFormat`; see the module docstring for the rules."""

    format: ChatFormat
    _openers: tuple[str, ...] = field(init=False, repr=False)
    _system_open: str | None = field(init=False, repr=False)
    _closes: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        fmt = self.format
        # Markup that starts with a boundary token (Llama-3's <|begin_of_text|>) is compared after the same strip.
        self._openers = tuple(sorted({self._lstrip(o) for o in fmt.user_open}, key=len, reverse=True))
        self._system_open = self._lstrip(fmt.system_open) if fmt.system_open is not None else None
        closes = {fmt.reply_close, fmt.reply_close.rstrip(), self._rstrip(fmt.reply_close),
                  self._rstrip(fmt.reply_close.rstrip())}
        self._closes = tuple(sorted((c for c in closes if c), key=len, reverse=True))

    @classmethod
    def from_spec(cls, spec: str, strip_tokens: Sequence[str] = (), backbone: str | None = None) -> QuerySplitter:
        return cls(resolve_format(spec, strip_tokens, backbone))

    # ---------------------------------------------------------------------------------------------- pieces

    def _lstrip(self, text: str) -> str:
        start, changed = 0, True  # an index, not repeated slicing: a long run of padding costs linear time
        while changed and start < len(text):
            changed = False
            for tok in self.format.strip_tokens:
                if text.startswith(tok, start):
                    start, changed = start + len(tok), True
        return text[start:]

    def _rstrip(self, text: str) -> str:
        end, changed = len(text), True
        while changed and end > 0:
            changed = False
            for tok in self.format.strip_tokens:
                if end >= len(tok) and text.endswith(tok, 0, end):
                    end, changed = end - len(tok), True
        return text[:end]

    def strip(self, text: str) -> str:
        """Remove padding / boundary tokens from both ends, repeatedly."""
        return self._rstrip(self._lstrip(text))

    def _expected_start(self) -> str:
        starts = [repr(o) for o in self._openers]
        if self._system_open is not None:
            starts.append(f"a system block {self._system_open!r}...{self.format.system_close!r}")
        return " or ".join(starts)

    def _open(self, text: str) -> str | None:
        """`text` after its opener (a system block dropped), or None when it does not open like the format."""
        for opener in self._openers:
            if text.startswith(opener):
                return text[len(opener):]
        fmt = self.format
        if self._system_open is not None and fmt.system_close and text.startswith(self._system_open):
            end = text.find(fmt.system_close, len(self._system_open))
            if end >= 0:
                return text[end + len(fmt.system_close):]
        return None

    def _prompt(self, body: str, index: int, field: str) -> str:
        """The plain prompt of the text between the opener and the final generation prompt."""
        fmt = self.format
        if fmt.turn is None:
            return self._plain(body.strip() if fmt.plain else body, index, field, "prompt")
        messages: list[dict[str, str]] = []
        role, pos = "user", 0
        while True:
            sep = fmt.reply if role == "user" else fmt.turn
            end = body.find(sep, pos)
            if end < 0:
                messages.append({"role": role, "content": body[pos:]})
                break
            messages.append({"role": role, "content": body[pos:end]})
            pos, role = end + len(sep), "assistant" if role == "user" else "user"
        if role != "user":
            raise SplitError(index, f"its prompt ends inside an assistant turn: expected user and assistant turns "
                                    f"separated by {fmt.reply!r} and {fmt.turn!r}, ending with a user turn", field)
        return conversation_prompt(messages)

    def _response(self, text: str, index: int) -> str:
        for close in self._closes:
            if text.endswith(close):
                text = text[: len(text) - len(close)]
                break
        return self._plain(text.strip() if self.format.plain else text, index, "query", "response")

    def _plain(self, text: str, index: int, field: str, part: str) -> str:
        if self.format.plain:
            marker = next((m for m in CHAT_MARKERS if m in text), None)
            if marker is not None:
                raise SplitError(index, f"its {part} holds chat markup {marker!r}, but the query template is "
                                        f"{self.format.name}: set --query-template to the policy's chat format "
                                        "(auto, tokenizer:PATH, chatml, llama3)", field)
        return text

    # ----------------------------------------------------------------------------------------------- split

    def split(self, query: str, prompt: str | None = None, index: int = 0) -> tuple[str, str]:
        """(plain prompt, response) of one query; `prompt` is OpenRLHF's `prompts[index]` when it sent one."""
        fmt = self.format
        q = self.strip(query)
        if prompt is not None:
            p = self._lstrip(prompt)
            if not q.startswith(p):
                at = next((k for k, (a, b) in enumerate(zip(q, p)) if a != b), min(len(q), len(p)))
                raise SplitError(index, f"it does not start with prompts[{index}] (after removing padding tokens "
                                        f"{list(fmt.strip_tokens)}): they differ at character {at} "
                                        f"(query {q[at:at + 40]!r}, prompt {p[at:at + 40]!r}); send the exact "
                                        "prompt text the policy was given")
            body = self._open(p)
            if body is None:
                raise SplitError(index, f"prompts[{index}] does not start the way {fmt.name} prompts start: expected "
                                        f"{self._expected_start()}, got {p[:60]!r}; set --query-template to the "
                                        "policy's chat format", "prompts")
            if not body.endswith(fmt.reply):
                raise SplitError(index, f"prompts[{index}] does not end with the {fmt.name} generation prompt "
                                        f"{fmt.reply!r} (got ...{p[-60:]!r}); set --query-template to the policy's "
                                        "chat format", "prompts")
            return (self._prompt(body[: len(body) - len(fmt.reply)], index, "prompts"),
                    self._response(q[len(p):], index))
        body = self._open(q)
        if body is None:
            raise SplitError(index, f"it does not start the way {fmt.name} conversations start: expected "
                                    f"{self._expected_start()} (after padding tokens), got {q[:60]!r}; set "
                                    "--query-template to the policy's chat format, or send `prompts`")
        if not fmt.reply:
            raise SplitError(index, f"the {fmt.name} format has no markup between prompt and response, so a query "
                                    "alone cannot be split; send `prompts` (current OpenRLHF does) or set "
                                    "--query-template to the policy's chat format")
        cut = body.rfind(fmt.reply)
        if cut < 0:
            raise SplitError(index, f"it does not contain the {fmt.name} separator {fmt.reply!r} before the "
                                    "response; set --query-template to the policy's chat format, or send `prompts`")
        return self._prompt(body[:cut], index, "query"), self._response(body[cut + len(fmt.reply):], index)

    def split_all(self, queries: Sequence[str], prompts: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
        """Prompts and responses of every query; `prompts`, when given, must be as long as `queries`."""
        if prompts is not None and len(prompts) != len(queries):
            raise ValueError(f"{len(prompts)} prompts for {len(queries)} queries")
        ps: list[str] = []
        rs: list[str] = []
        for i, q in enumerate(queries):
            p, r = self.split(q, prompts[i] if prompts is not None else None, i)
            ps.append(p)
            rs.append(r)
        return ps, rs


LABEL_DOMAIN_KEY = "domain"


def label_domain(label: Any, index: int) -> str | None:
    """The domain OpenRLHF's `labels[index]` names (with `moerm serve --labels-as-domain`).

    A label is the dataset's `--label_key` column, sent as is: a string is the domain itself ("" or null: none, the
    router decides); an object, or a string holding a JSON object (`{"domain": "math", ...}`), names it under
    "domain" (absent or null: none), so a label column can carry other fields too.

    Raises:
        SplitError: a label of another type, or an object whose "domain" is not a string.
    """
    if label is None:
        return None
    if isinstance(label, str):
        text = label.strip()
        if not text.startswith("{"):
            return text or None
        try:
            label = json.loads(text)
        except ValueError as e:
            raise SplitError(index, f"starts like a JSON object but is not one ({e})", "labels") from None
    if isinstance(label, dict):
        domain = label.get(LABEL_DOMAIN_KEY)
        if domain is None or isinstance(domain, str):
            return domain or None
        raise SplitError(index, f'"domain" must be a string; got {type(domain).__name__}', "labels")
    raise SplitError(index, f"a label names a domain as a string or an object with \"domain\"; got "
                            f"{type(label).__name__}", "labels")
